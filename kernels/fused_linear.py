"""The fused low-rank linear: one tiled GEMM whose epilogue adds the rank-r term.

    out = a Wᵀ + bias + scale · drop_out( t Eᵀ ),     t = drop_in(a) D        (t: M×r, float32)

``a`` is M×K, ``W`` N×K, ``D`` K×r (the shrink factor), ``E`` N×r (the expand factor). Every method
reaches this form by folding its core into the expand factor on the host: ``s·((x D) Cᵀ) Uᵀ`` equals
``s·(x D)(U C)ᵀ``, and ``U C`` is an N×r product (N·r² FLOPs), so the kernel never holds an r×r core.
The backward's ``dx = g W + s·(g U)(D Cᵀ)ᵀ`` is the same kernel with ``a = g``, ``W → Wᵀ``, ``D → U``,
``E → D Cᵀ`` and the dropout side swapped.

``t`` comes either from the GEMM's own K-loop (one more ``tl.dot`` on the ``a`` tile already loaded;
no second read of ``a``, but repeated for every N-block: cheap when M is small) or from a separate
shrink kernel run first (reads ``a`` once more; the GEMM then only loads ``t``). The launcher picks.
The M×N output is written once; rank-r intermediates and all accumulation are float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import INTERPRET, autotuned, dot_precision, rank_block, seed_arg, wrap_triton
from .dropout import dropout_threshold, keep_mask

__all__ = ["lowrank_linear", "linear", "shrink", "MAX_RANK", "GEMM_CONFIGS", "DECODE_GEMM_CONFIGS",
           "SHRINK_CONFIGS", "SHARED_MEMORY", "shared_memory_bytes", "fitting_configs"]

MAX_RANK = 256
_LOOP_SHRINK_MAX_M = 64  # heuristic until measured on a GPU: at most this many rows, shrink in the K-loop
_LOOP_SHRINK_MAX_RANK = 64  # the in-loop accumulator is BLOCK_M × BLOCK_R float32 registers

# where dropout applies; tl.constexpr because compiled kernels may only read constexpr globals
NO_DROPOUT, DROP_INPUT, DROP_OUTPUT = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _load_tile(ptr, rows, cols, stride_row, stride_col, in_rows, in_cols):
    """A [rows × cols] tile, zero outside the tensor."""
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col,
                   mask=in_rows[:, None] & in_cols[None, :], other=0.0)


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` in float32, ``b`` cast to ``a``'s dtype for a native-rate dot. Under the interpreter
    the operands go up to float32: it multiplies bf16 dot operands wrongly (triton#11584)."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    else:
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _shrink_step(t, a, down_ptr, offs_m, k0, offs_k, offs_r, in_k, in_r, K, stride_dk, stride_dr, seed, drop_threshold,
                 DROPOUT_INPUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One K-step of ``t += drop(a) D`` for the ``a`` tile at rows ``offs_m``, columns ``offs_k`` (from ``k0``)."""
    if DROPOUT_INPUT:
        a = tl.where(keep_mask(seed, offs_m, k0, K, drop_threshold, a.shape[1]), a, 0.0)
    return _mma(a, _load_tile(down_ptr, offs_k, offs_r, stride_dk, stride_dr, in_k, in_r), t, UPCAST, PRECISION)


@triton.jit(do_not_specialize=["M_BUCKET"])
def _lowrank_linear_kernel(
        a_ptr, w_ptr, bias_ptr, down_ptr, expand_ptr, t_ptr, out_ptr,
        M, N, K, R,
        stride_am, stride_ak, stride_wn, stride_wk, stride_b, stride_dk, stride_dr, stride_en, stride_er,
        stride_tm, stride_om, stride_on,
        scale, seed_ptr, drop_threshold, drop_scale,
        M_BUCKET,  # autotune key only
        HAS_BIAS: tl.constexpr, HAS_LOW_RANK: tl.constexpr, SHRINK_IN_LOOP: tl.constexpr,
        DROPOUT: tl.constexpr, STORE_T: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr):
    # grouped tile order: GROUP_M row-blocks sweep the columns together so W tiles are reused from L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    in_m, in_n, in_r = offs_m < M, offs_n < N, offs_r < R

    seed = 0
    if DROPOUT != NO_DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)  # int64: a K-stride may be large (column-major a)
        in_k = offs_k < K
        a = _load_tile(a_ptr, offs_m, offs_k, stride_am, stride_ak, in_m, in_k)
        acc = _mma(a, _load_tile(w_ptr, offs_k, offs_n, stride_wk, stride_wn, in_k, in_n), acc, UPCAST, PRECISION)
        if HAS_LOW_RANK and SHRINK_IN_LOOP:  # t from the a tile already loaded
            t = _shrink_step(t, a, down_ptr, offs_m, k0, offs_k, offs_r, in_k, in_r, K, stride_dk, stride_dr, seed,
                             drop_threshold, DROPOUT == DROP_INPUT, UPCAST, PRECISION)

    if HAS_LOW_RANK:
        if SHRINK_IN_LOOP:
            if DROPOUT == DROP_INPUT:
                t = t * drop_scale
            if STORE_T:
                if pid_n == 0:  # every N-block computed the same t; the first one writes it
                    tl.store(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :], t,
                             mask=in_m[:, None] & in_r[None, :])
        else:
            t = tl.load(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :],
                        mask=in_m[:, None] & in_r[None, :], other=0.0)
        # epilogue: the rank-r term as one more dot (float32 operands), then bias, then the cast
        e = _load_tile(expand_ptr, offs_r, offs_n, stride_er, stride_en, in_r, in_n).to(tl.float32)
        if DROPOUT == DROP_OUTPUT:
            low_rank = tl.dot(t, e, input_precision=PRECISION) * (scale * drop_scale)
            keep = keep_mask(seed, offs_m, pid_n * BLOCK_N, N, drop_threshold, BLOCK_N)
            acc += tl.where(keep, low_rank, 0.0)
        else:  # straight into acc: a second output-sized float32 tile would spill registers
            acc = tl.dot(t * scale, e, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_b, mask=in_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])


@triton.jit(do_not_specialize=["M_BUCKET"])
def _shrink_kernel(a_ptr, down_ptr, t_ptr, M, K, R,
                   stride_am, stride_ak, stride_dk, stride_dr, stride_tm,
                   seed_ptr, drop_threshold, drop_scale,
                   M_BUCKET,  # autotune key only
                   DROPOUT_INPUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """t = drop(a) D for one block of rows (float32, M×R)."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    in_m, in_r = offs_m < M, offs_r < R
    seed = 0
    if DROPOUT_INPUT:
        seed = tl.load(seed_ptr)
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        in_k = offs_k < K
        a = _load_tile(a_ptr, offs_m, offs_k, stride_am, stride_ak, in_m, in_k)
        t = _shrink_step(t, a, down_ptr, offs_m, k0, offs_k, offs_r, in_k, in_r, K, stride_dk, stride_dr, seed,
                         drop_threshold, DROPOUT_INPUT, UPCAST, PRECISION)
    if DROPOUT_INPUT:
        t = t * drop_scale
    tl.store(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :], t, mask=in_m[:, None] & in_r[None, :])


def _configs(rows, names):
    return [triton.Config(dict(zip(names, row[:-2])), num_stages=row[-2], num_warps=row[-1]) for row in rows]


_GEMM_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
# Hopper autotune candidates (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, stages, warps); the decode family has
# BLOCK_M = 16 and narrow N-blocks, for more programs reading W when M ≤ 16. Pruned per launch to the
# ones whose shared memory fits (see shared_memory_bytes).
GEMM_CONFIGS = _configs([(128, 256, 64, 8, 3, 8), (256, 128, 64, 8, 3, 8), (128, 128, 64, 8, 4, 8),
                         (128, 128, 64, 8, 4, 4), (128, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4),
                         (64, 64, 64, 8, 4, 4), (128, 256, 32, 8, 4, 8), (64, 64, 32, 8, 3, 4),
                         (32, 64, 32, 8, 3, 4)], _GEMM_NAMES)
DECODE_GEMM_CONFIGS = _configs([(16, n, k, 8, s, 4) for n in (32, 64, 128) for k in (64, 128, 256) for s in (3, 4)],
                               _GEMM_NAMES)
SHRINK_CONFIGS = _configs([(m, k, s, 4) for m in (16, 32, 64) for k in (32, 64, 128) for s in (3, 4)],
                          ("BLOCK_M", "BLOCK_K"))
SHARED_MEMORY = 227 * 1024  # bytes of shared memory a Hopper block may use


def shared_memory_bytes(config: triton.Config, kind: str, block_r: int, element_size: int, precision: str) -> int:
    """An upper bound on a config's shared memory. ``kind``: "shrink", "gemm" (t from the shrink kernel),
    "gemm_in_loop" (t computed in the K-loop) or "plain" (no adapter). Each pipeline stage holds its
    input tiles (D too when t is computed alongside, in a's dtype), plus one more a tile for the
    dropout-masked copy; the epilogue's float32 t and E tiles reuse the pipeline's memory once the
    K-loop is done, twice over under "tf32x3" (each is split into a high and a low tf32 part, staged
    separately: 384 KiB for 64×128 tiles at rank 256). tests/test_sm90_compile.py checks the bound
    against the compiler's own numbers."""
    c = config.kwargs
    bm, bk = c["BLOCK_M"], c["BLOCK_K"]
    masked_a = bm * bk * element_size  # a tile rewritten by the dropout mask is staged again for the dot
    if kind == "shrink":
        return config.num_stages * (bm + block_r) * bk * element_size + masked_a
    bn = c["BLOCK_N"]
    if kind == "gemm_in_loop":
        pipeline = config.num_stages * (bm + bn + block_r) * bk * element_size + masked_a
    else:
        pipeline = config.num_stages * (bm + bn) * bk * element_size
    epilogue = (bm + bn) * block_r * 4 * (2 if precision == "tf32x3" else 1)
    return max(pipeline, 0 if kind == "plain" else epilogue)


def fitting_configs(configs, kind: str, block_r: int, element_size: int, precision: str) -> list:
    return [c for c in configs if shared_memory_bytes(c, kind, block_r, element_size, precision) <= SHARED_MEMORY]


def _gemm_kind(has_low_rank, shrink_in_loop) -> str:
    return "plain" if not has_low_rank else "gemm_in_loop" if shrink_in_loop else "gemm"


def _prune_gemm(configs, named_args, **meta):
    kind = _gemm_kind(meta["HAS_LOW_RANK"], meta["SHRINK_IN_LOOP"])
    return fitting_configs(configs, kind, meta["BLOCK_R"], named_args["a_ptr"].element_size(), meta["PRECISION"])


def _prune_shrink(configs, named_args, **meta):
    return fitting_configs(configs, "shrink", meta["BLOCK_R"], named_args["a_ptr"].element_size(), meta["PRECISION"])


_GEMM_KEY = ["M_BUCKET", "N", "K", "BLOCK_R", "HAS_LOW_RANK", "SHRINK_IN_LOOP", "DROPOUT", "HAS_BIAS", "PRECISION"]
_gemm_large = autotuned(_lowrank_linear_kernel, GEMM_CONFIGS, _GEMM_KEY, _prune_gemm)
_gemm_small = autotuned(_lowrank_linear_kernel, DECODE_GEMM_CONFIGS, _GEMM_KEY, _prune_gemm)
_shrink_tuned = autotuned(_shrink_kernel, SHRINK_CONFIGS, ["M_BUCKET", "K", "BLOCK_R", "DROPOUT_INPUT"], _prune_shrink)

# Where nothing is autotuned: the first config of each list that fits. Under the interpreter, big tiles
# keep the number of (slow, Python-level) programs low and nothing limits shared memory.
if INTERPRET:
    _PREFERRED_GEMM = _PREFERRED_DECODE_GEMM = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64,
                                                               "GROUP_M": 4})]
    _PREFERRED_SHRINK = [triton.Config({"BLOCK_M": 32, "BLOCK_K": 64})]
else:
    # the last is for float32 at ranks above 128 under tf32x3, whose epilogue needs the most memory
    _PREFERRED_GEMM = _configs([(128, 128, 64, 8, 3, 8), (64, 128, 64, 8, 3, 4), (64, 64, 32, 8, 3, 4),
                                (32, 64, 32, 8, 3, 4)], _GEMM_NAMES)
    _PREFERRED_DECODE_GEMM = _configs([(16, 64, 128, 8, 4, 4), (16, 64, 64, 8, 3, 4), (16, 32, 64, 8, 3, 4)],
                                      _GEMM_NAMES)
    _PREFERRED_SHRINK = _configs([(32, 128, 3, 4), (32, 64, 3, 4), (16, 32, 3, 4)], ("BLOCK_M", "BLOCK_K"))


def default_config(preferred, kind: str, block_r: int, element_size: int, precision: str) -> triton.Config:
    """The first preferred config whose shared memory fits (the interpreter's has no limit)."""
    if INTERPRET:
        return preferred[0]
    return fitting_configs(preferred, kind, block_r, element_size, precision)[0]


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(m), 8192)


def _check_rank(rank: int) -> None:
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"rank={rank}: the fused kernels take ranks from 1 to {MAX_RANK}; "
                         f"use backend='reference' for larger ranks")


def _run(kernel, tuned, grid, args, meta, config, default):
    """Launch ``kernel`` with ``config`` when one is given, else autotuned (``tuned``) where autotuning
    is on, else with ``default()``."""
    if config is None and tuned is not None:
        wrap_triton(tuned)[grid](*args, **meta)
        return
    config = config or default()
    wrap_triton(kernel)[grid(config.kwargs)](*args, **meta, **config.kwargs, num_warps=config.num_warps,
                                             num_stages=config.num_stages)


def shrink(a: torch.Tensor, down: torch.Tensor, *, dropout_p: float = 0.0, seed=None,
           config: triton.Config | None = None) -> torch.Tensor:
    """``t = drop(a) D`` (M×r, float32) with ``a``: M×K (any strides), ``D``: K×r. ``seed``: an int or
    a 0-d int64 tensor (read on the device). ``config`` forces one kernel configuration."""
    m, k = a.shape
    rank = down.shape[1]
    _check_rank(rank)
    t = torch.empty(m, rank, device=a.device, dtype=torch.float32)
    if m == 0:
        return t
    down = down.to(a.dtype)  # the dot runs in a's dtype anyway; half the bytes to stage for 16-bit a
    args = (a, down, t, m, k, rank, a.stride(0), a.stride(1), down.stride(0), down.stride(1), t.stride(0),
            seed_arg(seed, dropout_p, a), dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p), _m_bucket(m))
    meta = dict(DROPOUT_INPUT=dropout_p > 0, UPCAST=INTERPRET, PRECISION=dot_precision(a.dtype),
                BLOCK_R=rank_block(rank))
    _run(_shrink_kernel, _shrink_tuned, lambda c: (triton.cdiv(m, c["BLOCK_M"]),), args, meta, config,
         lambda: default_config(_PREFERRED_SHRINK, "shrink", meta["BLOCK_R"], a.element_size(), meta["PRECISION"]))
    return t


def _launch_gemm(a, weight, bias, out, down, expand, t, scale, seed, dropout_p, *, has_low_rank, shrink_in_loop,
                 dropout, store_t, block_r, config):
    m, k = a.shape
    n = weight.shape[0]
    args = (a, weight, bias if bias is not None else out, down, expand, t, out, m, n, k, down.shape[1],
            a.stride(0), a.stride(1), weight.stride(0), weight.stride(1), bias.stride(0) if bias is not None else 0,
            down.stride(0), down.stride(1), expand.stride(0), expand.stride(1), t.stride(0), out.stride(0),
            out.stride(1),
            float(scale), seed_arg(seed, dropout_p, a), dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
            _m_bucket(m))
    meta = dict(HAS_BIAS=bias is not None, HAS_LOW_RANK=has_low_rank, SHRINK_IN_LOOP=shrink_in_loop,
                DROPOUT=dropout, STORE_T=store_t, UPCAST=INTERPRET, PRECISION=dot_precision(a.dtype),
                BLOCK_R=block_r)
    decode = m <= 16
    kind = _gemm_kind(has_low_rank, shrink_in_loop)
    _run(_lowrank_linear_kernel, _gemm_small if decode else _gemm_large,
         lambda c: (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),), args, meta, config,
         lambda: default_config(_PREFERRED_DECODE_GEMM if decode else _PREFERRED_GEMM, kind, block_r,
                                a.element_size(), meta["PRECISION"]))


def lowrank_linear(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
                   expand: torch.Tensor, scale: float = 1.0, *, dropout_p: float = 0.0, dropout_site: str = "input",
                   seed=None, store_t: bool = False, shrink_in_loop: bool | None = None,
                   config: triton.Config | None = None, t: torch.Tensor | None = None):
    """``out = a Wᵀ + bias + scale · drop_out((drop_in(a) D) Eᵀ)``; returns ``(out, t)``.

    ``a``: M×K, ``weight``: N×K, ``bias``: N or None, ``down``: K×r, ``expand``: N×r (any strides;
    ``weight`` may be a transposed view). ``out`` has ``a``'s dtype. ``t = drop_in(a) D`` (M×r, float32)
    is returned when ``store_t`` (else None). ``dropout_site`` is ``"input"`` (on ``a`` inside the
    adapter path) or ``"output"`` (on the rank-r term). ``shrink_in_loop`` forces where ``t`` is
    computed (None: the launcher decides by shape); ``config`` forces the GEMM's configuration. A given
    ``t`` (M×r, float32) is used as is instead of computing it (``down`` is then not read), for callers that
    transform t between the shrink and the expand; input-side dropout is then theirs to apply."""
    m, k = a.shape
    n = weight.shape[0]
    rank = down.shape[1]
    _check_rank(rank)
    out = torch.empty(m, n, device=a.device, dtype=a.dtype)
    if m == 0:
        return out, (torch.empty(0, rank, device=a.device, dtype=torch.float32) if store_t else None)
    block_r = rank_block(rank)
    down = down.to(a.dtype)  # the dot runs in a's dtype anyway; half the bytes to stage for 16-bit a
    dropout = (NO_DROPOUT if dropout_p == 0 else DROP_INPUT if dropout_site == "input" else DROP_OUTPUT).value
    if t is not None:
        if dropout == DROP_INPUT.value or shrink_in_loop or t.shape != (m, rank) or t.dtype != torch.float32:
            raise ValueError(f"t: a given t must be float32 of shape {(m, rank)}, without input-side dropout "
                             f"or an in-loop shrink; got {t.dtype} {tuple(t.shape)}")
        shrink_in_loop = False
    else:
        if shrink_in_loop is None:
            shrink_in_loop = m <= _LOOP_SHRINK_MAX_M and block_r <= _LOOP_SHRINK_MAX_RANK
        if shrink_in_loop:
            t = torch.empty(m, rank, device=a.device, dtype=torch.float32) if store_t else out  # out: unused pointer
        else:
            t = shrink(a, down, dropout_p=dropout_p if dropout == DROP_INPUT.value else 0.0, seed=seed)
    _launch_gemm(a, weight, bias, out, down, expand, t, scale, seed, dropout_p, has_low_rank=True,
                 shrink_in_loop=shrink_in_loop, dropout=dropout, store_t=store_t, block_r=block_r, config=config)
    return out, (t if store_t else None)


def linear(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           config: triton.Config | None = None) -> torch.Tensor:
    """``a Wᵀ + bias``: the same GEMM with the low-rank path compiled out (for measuring the GEMM alone)."""
    m = a.shape[0]
    out = torch.empty(m, weight.shape[0], device=a.device, dtype=a.dtype)
    if m:
        _launch_gemm(a, weight, bias, out, out, out, out, 1.0, None, 0.0, has_low_rank=False, shrink_in_loop=False,
                     dropout=NO_DROPOUT.value, store_t=False, block_r=16, config=config)
    return out
