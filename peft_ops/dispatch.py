"""Which code computes the low-rank linear: the backends a user picks, and per shape the faster of two
implementations of the same step, chosen by timing them on the user's GPU.

Backends (``backend=`` of every layer, of ``inject`` and of :func:`peft_ops.adapted_linear`):

* ``"auto"`` (default): ``"triton"`` for CUDA tensors of the dtypes and ranks the kernels take, else
  ``"reference"``;
* ``"triton"``: the Triton kernels, and per shape the faster of the two implementations below;
* ``"fused"`` or ``"composed"``: one of the two, forced;
* ``"reference"``: the kernels' PyTorch twins (:mod:`peft_ops.reference_kernels`), any device and dtype.

Both implementations compute ``out = a Wᵀ + bias + s·drop_out((drop_in(a) D) Eᵀ)`` (the forward, and
with roles swapped the backward's ``dx``) with the same dropout masks and the same ``t``:

* ``fused``: one Triton GEMM whose epilogue adds the rank-r term (:func:`peft_ops.kernels.lowrank_linear`);
* ``composed``: cuBLAS for the base (its float32 result, for 16-bit inputs too), the shrink kernel for
  ``t``, then the rank-r term and the bias added to cuBLAS's output by a small kernel
  (:func:`peft_ops.kernels.add_lowrank_`): what a user could write, so a layer on ``"triton"`` is never
  slower than that composition.

Both round the whole sum once to the output dtype: the same row is finite (or infinite) whichever runs.

The choice is keyed like an autotuner (:class:`Key`). The first time a key is seen on a GPU both are
timed on the call's own arguments (``triton.testing.do_bench``, a few ms) and the faster is kept for the
process and in a file beside Triton's cache, one per GPU model and peft-ops, torch and Triton version.
That file is untrusted input: only a regular file of at most 4 MiB is read, and only the rows this
version could have written are kept (anything else is measured again). Nothing is timed while
``torch.compile`` traces or a CUDA graph is captured, nor with ``PEFT_OPS_AUTOTUNE=0``: then
:func:`rule` decides. :func:`decisions` lists what was chosen and why.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch

from . import reference_kernels
from .files import open_regular, write_atomically

__all__ = ["BACKENDS", "IMPLEMENTATIONS", "Key", "check_backend", "resolve_backend", "rule", "decisions",
           "clear_decisions", "composed_lowrank_linear", "run_lowrank_linear", "kernel_module"]

BACKENDS = ("auto", "triton", "fused", "composed", "reference")
IMPLEMENTATIONS = ("fused", "composed")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DECODE_ROWS = 16  # the rule's crossover: at most this many rows, one fused launch beats three
DROPOUT_SITES = ("none", "input", "output")
ROLES = ("forward", "dx")
CACHE_MAX_BYTES = 4 << 20  # a real table is a few kB: anything larger is not one we wrote
# cuBLAS writes a 16-bit GEMM's float32 accumulator (torch >= 2.8 on CUDA); without it the composition's
# GEMM runs on float32 copies, and the rule keeps to the fused kernel
FLOAT32_OUTPUT_GEMM = hasattr(torch.ops.aten.mm, "dtype")


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not known; expected one of {', '.join(map(repr, BACKENDS))}")
    return backend


def _interpreting() -> bool:
    """Whether the Triton kernels run under the interpreter (decided when they were first imported)."""
    from peft_ops import kernels

    return kernels.INTERPRET


def resolve_backend(backend: str, x: torch.Tensor, rank: int = 1) -> str:
    """The backend that runs for input ``x`` and an adapter of ``rank``: ``"auto"`` resolved, the others
    checked (an error, never a silent fallback, where they can't run)."""
    if check_backend(backend) == "auto":
        from peft_ops.kernels import MAX_RANK

        return "triton" if x.is_cuda and x.dtype in KERNEL_DTYPES and rank <= MAX_RANK else "reference"
    if backend == "reference":
        return backend
    from peft_ops.kernels import MAX_RANK

    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"backend={backend!r}: input dtype is {x.dtype}; the Triton kernels take float32, float16 "
                        f"or bfloat16 (backend='reference' runs others)")
    if rank > MAX_RANK:
        raise ValueError(f"backend={backend!r}: rank={rank}; the Triton kernels take ranks up to {MAX_RANK} "
                         f"(backend='auto' or 'reference' runs any rank)")
    if not (x.is_cuda or (x.device.type == "cpu" and _interpreting())):
        raise RuntimeError(
            f"backend={backend!r}: input is on {x.device}; the Triton kernels need a CUDA tensor, or a CPU tensor "
            f"with TRITON_INTERPRET=1 set before peft_ops.kernels is first imported. Use backend='reference' (or "
            f"'auto') to run the plain PyTorch path here.")
    return backend


def kernel_module(backend: str):
    """The module whose ``shrink``, ``rank_reduce`` and ``lowrank_linear`` a resolved backend runs."""
    if backend == "reference":
        return reference_kernels
    from peft_ops import kernels

    return kernels


def _float32_product(a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``a Wᵀ`` in float32, from cuBLAS's float32 accumulator for 16-bit inputs (``aten::mm.dtype``, torch ≥ 2.8
    on CUDA); elsewhere from float32 copies of the operands (exact products: slower, not less accurate)."""
    if a.dtype == torch.float32:
        return a @ weight.T
    if a.is_cuda and FLOAT32_OUTPUT_GEMM:
        return torch.mm(a, weight.T, out_dtype=torch.float32)
    return a.float() @ weight.float().T


def composed_lowrank_linear(a, weight, bias, down, expand, scale: float = 1.0, *, dropout_p: float = 0.0,
                            dropout_site: str = "input", seed=None, store_t: bool = False, t=None):
    """:func:`peft_ops.kernels.lowrank_linear`'s contract as cuBLAS plus two small Triton kernels: ``a Wᵀ`` in
    float32 (:func:`_float32_product`), the shrink ``t = drop_in(a) D``, and ``out = a Wᵀ + bias +
    scale·drop_out(t Eᵀ)`` rounded once to ``a``'s dtype, as the fused kernel does: a 16-bit ``a Wᵀ`` rounded
    on its own could overflow where the whole sum does not (or round to the largest finite value where
    the fused sum overflows). A quantized ``weight`` (``peft_ops.kernels.dequant.QuantizedWeight``): the
    forward's ``a Wᵀ`` is its quantizer's own product where it has one (bitsandbytes' ``matmul_4bit``:
    QLoRA's base, whose 16-bit output is rounded before the rank-r term is added), else, and for dx,
    the weight dequantized (bitsandbytes' own) in ``a``'s dtype for this call only, then the matmul above:
    QLoRA's forward and dx, with the rank-r term added by one kernel."""
    from peft_ops import kernels

    if isinstance(weight, torch.Tensor):
        base = _float32_product(a, weight)
    elif weight.product is not None and not weight.transposed:  # a quantized weight, its quantizer's product
        base = weight.product(a)
    else:  # a quantized weight dequantized for this call only
        base = _float32_product(a, weight.dequantized().to(a.dtype))
    out = base if a.dtype == torch.float32 else torch.empty(base.shape, dtype=a.dtype, device=a.device)
    if t is None:
        t = kernels.shrink(a, down, dropout_p=dropout_p if dropout_site == "input" else 0.0, seed=seed)
    kernels.add_lowrank_(out, t, expand, scale, base=base, bias=bias,
                         dropout_p=dropout_p if dropout_site == "output" else 0.0, seed=seed)
    return out, (t if store_t else None)


@dataclass(frozen=True)
class Key:
    """What the faster implementation depends on (the M bucket is M's next power of two, at most 8192)."""

    m_bucket: int
    n: int
    k: int
    rank_block: int
    dtype: str
    dropout: str  # one of DROPOUT_SITES
    bias: bool
    role: str  # one of ROLES
    weight: str = "dense"  # or a quantized format ("nf4", "fp4", "int8"; "+dq": double quantization)

    @classmethod
    def of(cls, role, a, weight, bias, rank, dropout_p, dropout_site) -> "Key":
        import triton

        from peft_ops.kernels._config import rank_block

        fmt = "dense" if isinstance(weight, torch.Tensor) else weight.format + ("+dq" if weight.nested else "")
        return cls(min(triton.next_power_of_2(a.shape[0]), 8192), weight.shape[0], a.shape[1], rank_block(rank),
                   str(a.dtype).removeprefix("torch."), dropout_site if dropout_p else "none", bias is not None, role,
                   fmt)

    @classmethod
    def from_json(cls, value) -> "Key | None":
        """The key a disk-cache row names, or None where it is not one :meth:`of` could have made."""
        if isinstance(value, dict) and "weight" not in value:
            value = {**value, "weight": "dense"}  # rows written before quantized weights had a key of their own
        if not isinstance(value, dict) or value.keys() != {field.name for field in fields(cls)}:
            return None
        sizes = (value["m_bucket"], value["n"], value["k"], value["rank_block"])
        if not all(type(size) is int and size > 0 for size in sizes):  # type(), not isinstance(): true is an int
            return None
        if not (isinstance(value["dtype"], str) and value["dropout"] in DROPOUT_SITES and type(value["bias"]) is bool
                and value["role"] in ROLES and isinstance(value["weight"], str)):
            return None
        return cls(**value)


def rule(key: Key) -> str:
    """The choice without timing (``PEFT_OPS_AUTOTUNE=0``, tracing, capture): fused for decode-sized batches
    (M ≤ 16: one launch instead of three, and a fused GEMM reads W once like cuBLAS), composed otherwise
    (cuBLAS's GEMM plus the rank-r term: never slower than what a user would write), except for 16-bit
    inputs where torch lacks the GEMM with a float32 output (:data:`FLOAT32_OUTPUT_GEMM`). A quantized
    weight: composed at every M (QLoRA's own base product plus the rank-r term, so never slower than
    QLoRA): the fused kernel reads a quarter of bf16's bytes for 4-bit, but as compiled its NF4 decoding
    costs ~10 instructions per element, predicted issue-bound, slower than bitsandbytes' own kernel at
    M ≤ 4 (bench/NOTES.md, "Quantized bases"); only a measurement picks it."""
    if key.weight != "dense":
        return "composed"
    if key.m_bucket <= DECODE_ROWS or (key.dtype != "float32" and not FLOAT32_OUTPUT_GEMM):
        return "fused"
    return "composed"


@dataclass
class Decision:
    choice: str
    reason: str  # "measured", "measured (from the disk cache)" or "rule"
    fused_ms: float | None = None
    composed_ms: float | None = None


_decisions: dict[Key, Decision] = {}
_disk_loaded: set[str] = set()


def _time_ms(fn: Callable[[], object]) -> float:
    """Median time of ``fn`` in ms: a few ms of warm-up and repeats, enough to tell the two apart."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=20, return_mode="median")


TIMER: Callable[[Callable[[], object]], float] = _time_ms  # tests substitute a fake timer


def _measuring_allowed(device: torch.device) -> bool:
    from peft_ops.kernels._config import AUTOTUNE

    if not AUTOTUNE or device.type != "cuda" or torch.compiler.is_compiling():
        return False
    return not torch.cuda.is_current_stream_capturing()


@functools.cache
def _peft_ops_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("peft-ops")
    except metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
        from peft_ops import __version__  # here, not at import: peft_ops/__init__ imports this module

        return __version__


def _cache_path(device: torch.device) -> str:
    import triton

    folder = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    tag = f"{name}-peft_ops{_peft_ops_version()}-torch{torch.__version__}-triton{triton.__version__}"
    return os.path.join(folder, "peft_ops", f"dispatch-{re.sub(r'[^A-Za-z0-9.+-]', '_', tag)}.json")


def _read_cache_file(path: str):
    """The file's JSON value, or None where it is not a regular file of at most ``CACHE_MAX_BYTES``."""
    f = open_regular(path)  # a FIFO at the path would otherwise block a forward
    if f is None:
        return None
    with f:
        data = f.read(CACHE_MAX_BYTES + 1)
    return json.loads(data) if len(data) <= CACHE_MAX_BYTES else None


def _is_time(value) -> bool:
    return value is None or type(value) in (int, float) and 0 <= value < math.inf  # NaN fails both comparisons


def _cached_decision(row) -> tuple[Key, Decision] | None:
    """A disk-cache row as ``(key, decision)``, or None where this version would not have written it (a
    choice it does not know would fail every call with that key)."""
    if not isinstance(row, dict):
        return None
    key, times = Key.from_json(row.get("key")), (row.get("fused_ms"), row.get("composed_ms"))
    if key is None or row.get("choice") not in IMPLEMENTATIONS or not all(map(_is_time, times)):
        return None
    return key, Decision(row["choice"], "measured (from the disk cache)", *times)


def _load_disk(device: torch.device) -> None:
    path = _cache_path(device)
    if path in _disk_loaded:
        return
    _disk_loaded.add(path)
    try:
        rows = _read_cache_file(path)
    except (OSError, ValueError, TypeError, RecursionError, MemoryError, UnicodeDecodeError):
        return  # no cache, or not one we can read (deep nesting overflows the parser's stack): measure again
    if not isinstance(rows, list):
        return
    for row in rows:  # row by row: a bad row costs only its own re-measurement
        decision = _cached_decision(row)
        if decision is not None:
            _decisions.setdefault(*decision)


def _save_disk(device: torch.device) -> None:
    path = _cache_path(device)
    rows = [{"key": asdict(k), **asdict(d)} for k, d in _decisions.items() if d.reason.startswith("measured")]
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomically(path, json.dumps(rows).encode())
    except OSError:
        pass  # a read-only or full cache only costs a re-measurement in the next process


def choose(key: Key, candidates: dict[str, Callable[[], object]], device: torch.device) -> str:
    """The implementation for ``key``: decided before, else timed (``candidates`` run the call), else the rule."""
    _load_disk(device)
    decision = _decisions.get(key)
    if decision is not None:
        return decision.choice
    if not _measuring_allowed(device):
        if not torch.compiler.is_compiling():  # a traced call records nothing: eager calls may still measure
            _decisions[key] = Decision(rule(key), "rule")
        return rule(key)
    times = {name: TIMER(fn) for name, fn in candidates.items()}
    choice = min(times, key=times.get)
    _decisions[key] = Decision(choice, "measured", times.get("fused"), times.get("composed"))
    _save_disk(device)
    return choice


def decisions() -> list[dict]:
    """Every choice made in this process: the key's fields, ``choice``, ``reason`` and the measured times."""
    return [{**asdict(k), **asdict(d)} for k, d in _decisions.items()]


def clear_decisions() -> None:
    """Forget this process's choices (the disk cache is read again on the next call)."""
    _decisions.clear()
    _disk_loaded.clear()


def run_lowrank_linear(backend: str, role: str, a, weight, bias, down, expand, scale: float = 1.0, *,
                       dropout_p: float = 0.0, dropout_site: str = "input", seed=None, store_t: bool = False):
    """``(out, t)`` of the launcher contract (:func:`peft_ops.kernels.lowrank_linear`) through the
    implementation that the resolved ``backend`` stands for; ``role`` ("forward" or "dx") is part of the key."""
    kwargs = dict(dropout_p=dropout_p, dropout_site=dropout_site, seed=seed, store_t=store_t)
    if backend == "reference":
        return reference_kernels.lowrank_linear(a, weight, bias, down, expand, scale, **kwargs)
    from peft_ops import kernels

    run = {"fused": lambda: kernels.lowrank_linear(a, weight, bias, down, expand, scale, **kwargs),
           "composed": lambda: composed_lowrank_linear(a, weight, bias, down, expand, scale, **kwargs)}
    if backend == "triton":
        backend = choose(Key.of(role, a, weight, bias, down.shape[1], dropout_p, dropout_site), run, a.device)
    return run[backend]()
