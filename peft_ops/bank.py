"""Adapter banks: many adapters on one base model, a different adapter for each row of a batch.

    peft_ops.load_adapter_bank(model, {"alice": "alice.safetensors", "bob": "bob.safetensors"})
    with peft_ops.use_adapters(model, ["alice", None, "bob", "alice"]):  # one entry per batch row
        out = model.generate(input_ids, max_new_tokens=20)              # row 1: the base model alone

Every adapted module becomes an :class:`AdapterBank`: the frozen base layer plus the adapters of one
method and rank that the files give it. LoRA-XS and TLoRA adapters made for the same base (same
weights and SVD options, same seed) share their frozen factors ``U`` and ``D`` and differ only in an
r×r core and a scale, so a bank stores one ``U``, one ``D`` and r² values per adapter, and a batch
costs one shrink ``t = x D``, a per-row r×r product and the expand in the fused GEMM's epilogue,
however many adapters it mixes. LoRA and SymLoRA adapters each keep their own ``D`` and ``E = s·U C``,
gathered per segment of rows that share an adapter (as Punica's SGMV does).

Inference only: a bank has no trainable tensors and no dropout, and refuses inputs that need a
gradient (run under ``torch.no_grad()`` or ``torch.inference_mode()``; ``generate()`` does).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import bank_kernels, dispatch
from .adapter_file import (AdapterFileError, _base_for, _build, _check_every_tensor_used, _metadata_errors, _read,
                           _signature, _signature_mismatch, _signature_rtol)
from .inject import preserved_on_error
from .layers import LowRankLinear, _base_weight
from .methods import Method, get_method

__all__ = ["AdapterBank", "load_adapter_bank", "use_adapters", "remove_adapters", "adapter_banks",
           "bank_adapters"]


def _core_matrix(core: torch.Tensor | None, rank: int, like: torch.Tensor) -> torch.Tensor:
    """A method's core (None: identity, 1-D: diagonal, 2-D: full) as an r×r matrix."""
    if core is None:
        return torch.eye(rank, device=like.device, dtype=like.dtype)
    return torch.diag(core) if core.dim() == 1 else core


@torch.no_grad()
def _contribution(layer: LowRankLinear, shared: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What a bank stores for one adapter: its scaled core ``s·C`` (r×r) when the bank shares ``U`` and
    ``D``, else its own ``D`` (K×r) and ``E = s·U C`` (N×r)."""
    up, core, down, scale = layer.factors()
    scaled_core = _core_matrix(core, layer.rank, up).to(dtype) * (scale.to(dtype) if torch.is_tensor(scale) else scale)
    if shared:
        return {"cores": scaled_core}
    return {"downs": down.to(dtype), "expands": up.to(dtype) @ scaled_core}


@dataclass
class _Groups:
    """How one input's token rows map onto a bank's adapters, on the input's device: ``rows`` (M, the
    adapter index of every token row, -1 for none) for the shared path, segments for the general one."""

    rows: torch.Tensor
    order: torch.Tensor
    seg_starts: torch.Tensor
    seg_adapters: torch.Tensor
    max_segment_rows: int


@dataclass
class _RowAdapters:
    """One bank's adapter index for every batch row (-1: base model), with the token-level groups
    built once per (tokens per row, device): every decoding step of ``generate()`` reuses them."""

    indices: list[int]
    _cache: dict = field(default_factory=dict)

    def groups(self, tokens_per_row: int, device: torch.device) -> _Groups | None:
        """None when no row has an adapter in this bank."""
        key = (tokens_per_row, device)
        if key not in self._cache:
            self._cache[key] = self._build(tokens_per_row, device)
        return self._cache[key]

    def _build(self, tokens_per_row: int, device: torch.device) -> _Groups | None:
        rows = torch.tensor(self.indices, dtype=torch.int64).repeat_interleave(tokens_per_row)
        active = torch.nonzero(rows >= 0).flatten()
        if not len(active):
            return None
        order = active[torch.argsort(rows[active], stable=True)]
        adapters, counts = torch.unique_consecutive(rows[order], return_counts=True)
        starts = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        return _Groups(rows.to(device), order.to(device), starts.to(device), adapters.to(device),
                       int(counts.max()))


class AdapterBank(nn.Module):
    """A frozen linear layer (``.base_layer``) and a bank of adapters of one method and rank; inside
    :func:`use_adapters` each batch row gets its own adapter (or none), outside it the layer is the
    base layer. Built by :func:`load_adapter_bank`; see the module's docstring for what it stores.
    ``names`` lists the adapters in bank order."""

    def __init__(self, base_layer: nn.Module, method: Method, rank: int, backend: str,
                 frozen: dict[str, torch.Tensor] | None = None, signature: dict | None = None,
                 shared_factors: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        weight = _base_weight(base_layer)
        self.base_layer, self.method, self.rank, self.backend = base_layer, method, rank, backend
        self.out_features, self.in_features = weight.shape
        self.shared = bool(method.frozen)  # frozen U and D: LoRA-XS, TLoRA
        self.names: list[str] = []
        # the shared frozen factors as the method stores them (for building more adapters on them) and
        # their signature (to refuse adapters made on other factors), then U and D themselves
        self.frozen, self.signature = frozen, signature
        dtype = torch.promote_types(weight.dtype, torch.float32)
        empty = lambda *shape: torch.empty(0, *shape, device=weight.device, dtype=dtype)  # noqa: E731
        if self.shared:
            up, down = shared_factors
            self.register_buffer("up", up.to(dtype).contiguous(), persistent=False)
            self.register_buffer("down", down.to(dtype).contiguous(), persistent=False)
            self.register_buffer("cores", empty(rank, rank), persistent=False)
        else:
            self.register_buffer("downs", empty(self.in_features, rank), persistent=False)
            self.register_buffer("expands", empty(self.out_features, rank), persistent=False)
        self._rows: _RowAdapters | None = None

    @property
    def _stacked(self) -> tuple[str, ...]:
        return ("cores",) if self.shared else ("downs", "expands")

    def index(self, name: str | None) -> int:
        """The adapter's position in the bank, -1 for None or an adapter this module doesn't have (its
        file leaves this module alone: the base layer serves that row here)."""
        return self.names.index(name) if name in self.names else -1

    @torch.no_grad()
    def add(self, names: list[str], contributions: list[dict[str, torch.Tensor]]) -> None:
        for key in self._stacked:
            new = torch.stack([c[key] for c in contributions]).to(getattr(self, key))
            setattr(self, key, torch.cat([getattr(self, key), new]))
        self.names += names

    @torch.no_grad()
    def remove(self, names: set[str]) -> None:
        keep = [i for i, n in enumerate(self.names) if n not in names]
        for key in self._stacked:
            setattr(self, key, getattr(self, key)[keep].clone())
        self.names = [self.names[i] for i in keep]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._rows is None:
            return self.base_layer(x)
        weight = _base_weight(self.base_layer)
        if x.dim() < 2 or x.shape[-1] != self.in_features:
            raise ValueError(f"input: shape {tuple(x.shape)}; an adapter bank expects (rows, ..., in_features="
                             f"{self.in_features}): one batch row per name given to use_adapters")
        if x.shape[0] != len(self._rows.indices):
            raise ValueError(f"input: {x.shape[0]} batch rows (shape {tuple(x.shape)}), but use_adapters was given "
                             f"{len(self._rows.indices)} names; give one name (or None) per batch row")
        if x.dtype != weight.dtype:
            raise TypeError(f"input dtype {x.dtype} differs from the base weight's {weight.dtype}; an adapter "
                            f"bank computes in the base dtype (no autocast)")
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("adapter banks serve inference only and have no backward: run the model under "
                               "torch.no_grad() or torch.inference_mode() (generate() does)")
        groups = self._rows.groups(x[0, ..., 0].numel(), x.device)
        if groups is None:
            return self.base_layer(x)
        use_kernels = dispatch.resolve_backend(self.backend, x, self.rank) != "reference"
        if use_kernels:
            from peft_ops import kernels as impl
        else:
            impl = bank_kernels
        a = x.reshape(-1, self.in_features)
        if self.shared:
            h = impl.bank_core(impl.shrink(a, self.down), self.cores, groups.rows)
            out, _ = impl.lowrank_linear(a, weight, self.base_layer.bias, self.down, self.up, 1.0, t=h)
        else:
            segments = (groups.order, groups.seg_starts, groups.seg_adapters, groups.max_segment_rows)
            out = impl.linear(a, weight, self.base_layer.bias)
            impl.sgmv_expand_add(out, impl.sgmv_shrink(a, self.downs, *segments), self.expands, *segments)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"method={self.method.name}, in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, adapters={len(self.names)}, backend={self.backend!r}")


def adapter_banks(model: nn.Module) -> Iterator[tuple[str, AdapterBank]]:
    """``(name, bank)`` for every adapter bank in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterBank):
            yield name, module


def bank_adapters(model: nn.Module) -> list[str]:
    """The names of the adapters in ``model``'s banks, in the order they were loaded."""
    names: dict[str, None] = {}
    for _, bank in adapter_banks(model):
        names.update(dict.fromkeys(bank.names))
    return list(names)


def _refuse_while_in_use(model: nn.Module, what: str) -> None:
    if any(bank._rows is not None for _, bank in adapter_banks(model)):
        raise RuntimeError(f"{what} inside `with use_adapters(...)`: leave the context first")


@dataclass
class _PendingBank:
    """One module's adapters read from the files, before anything in the model changes."""

    base: nn.Module
    bank: AdapterBank | None  # the module's existing bank, if any
    method: Method
    rank: int
    frozen: dict[str, torch.Tensor] | None
    signature: dict | None
    shared_factors: tuple[torch.Tensor, torch.Tensor] | None = None
    names: list[str] = field(default_factory=list)
    contributions: list[dict[str, torch.Tensor]] = field(default_factory=list)


def _pending_for(path, module_name: str, entry: dict, module: nn.Module | None) -> _PendingBank:
    """A new pending bank for ``module``: on its existing bank, or on a plain layer (checked later)."""
    where = f"{os.fspath(path)}: module {module_name!r}"
    if isinstance(module, LowRankLinear):
        raise AdapterFileError(f"{where} has a single {module.method.name} adapter; a module holds one adapter or "
                               f"one bank: peft_ops.unload(model) first")
    if isinstance(module, AdapterBank):
        return _PendingBank(module.base_layer, module, module.method, module.rank, module.frozen, module.signature)
    return _PendingBank(module, None, get_method(entry["method"]), entry["rank"], None, None)


def load_adapter_bank(model: nn.Module, paths: Mapping[str, str | os.PathLike], *,
                      backend: str = "auto") -> list[str]:
    """Load adapter files into banks, one bank per adapted module, under the given names; returns the
    names. A model may get more adapters later by calling this again (the others are not reloaded);
    :func:`remove_adapters` takes some out.

    Every file is checked as :func:`peft_ops.load_adapter` checks it (integrity, module names and
    shapes, base-weight fingerprints, frozen-factor signatures), and besides: one method and rank per
    bank, and for LoRA-XS and TLoRA the same frozen factors as the bank's (same base weights and SVD
    options, same seed). On any error the model is left untouched. ``backend``: as for the layers
    (``"auto"``: the Triton kernels for CUDA tensors, the PyTorch reference elsewhere)."""
    dispatch.check_backend(backend)
    if not isinstance(paths, Mapping) or not paths:
        raise TypeError(f"paths={paths!r}; expected a non-empty mapping from adapter name to adapter file")
    loaded = set(bank_adapters(model))
    for name in paths:
        if not isinstance(name, str) or not name:
            raise TypeError(f"paths: adapter name {name!r}; expected a non-empty string")
        if name in loaded:
            raise ValueError(f"paths: adapter {name!r} is already in the model's banks; remove_adapters(model, "
                             f"[{name!r}]) first to replace it")
    _refuse_while_in_use(model, "load_adapter_bank")
    named = dict(model.named_modules())
    pending: dict[str, _PendingBank] = {}
    with preserved_on_error(model):
        for adapter, path in paths.items():
            entries, tensors, saved_modules = _read(path)
            if saved_modules:
                raise AdapterFileError(f"{os.fspath(path)}: the file carries whole modules ({sorted(saved_modules)}, "
                                       f"modules_to_save); a bank serves per-row adapters only, one set of "
                                       f"modules for all rows cannot follow them")
            for module_name, entry in entries.items():
                with _metadata_errors(path, module_name):
                    _add_entry(path, adapter, module_name, entry, tensors, named, pending, backend)
            _check_every_tensor_used(path, entries, tensors)
    for module_name, p in pending.items():
        bank = p.bank or AdapterBank(p.base, p.method, p.rank, backend, p.frozen, p.signature, p.shared_factors)
        bank.add(p.names, p.contributions)
        if p.bank is None:
            parent, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent), child, bank)
    return list(paths)


def _add_entry(path, adapter: str, module_name: str, entry: dict, tensors: dict, named: dict,
               pending: dict[str, _PendingBank], backend: str) -> None:
    """Build one file's adapter for one module and queue it for the module's bank."""
    where = f"{os.fspath(path)}: module {module_name!r}"
    if module_name not in pending:
        pending[module_name] = _pending_for(path, module_name, entry, named.get(module_name) if module_name else None)
    p = pending[module_name]
    base = _base_for(path, module_name, entry, p.base)  # checks shape, bias and fingerprint (and a missing module)
    if (entry["method"], entry["rank"]) != (p.method.name, p.rank):
        raise AdapterFileError(f"{where}: the file holds a {entry['method']} adapter of rank {entry['rank']}; the "
                               f"bank there holds {p.method.name} adapters of rank {p.rank} (one method and rank "
                               f"per bank)")
    if p.signature is not None:
        rtol = _signature_rtol(entry["base"].get("dtype", "float32"), _base_weight(base).dtype)
        mismatch = _signature_mismatch(entry["frozen_signature"], p.signature, p.rank, rtol)
        if mismatch:
            raise AdapterFileError(f"{where}: its frozen {p.method.name} factors differ from the bank's shared ones "
                                   f"({mismatch}); a {p.method.name} bank holds adapters made on the same base "
                                   f"weights with the same seed and options")
    layer = _build(path, module_name, entry, base, tensors, backend, frozen=p.frozen)
    shared = bool(p.method.frozen)
    if shared and p.frozen is None:  # the first adapter of a new bank: its factors become the bank's
        up, _, down, _ = layer.factors()
        p.frozen = {n: getattr(layer, n) for n in p.method.frozen}
        p.signature, p.shared_factors = _signature(layer), (up.detach(), down.detach())
    p.names.append(adapter)
    p.contributions.append(_contribution(layer, shared, torch.promote_types(_base_weight(base).dtype,
                                                                            torch.float32)))


@contextlib.contextmanager
def use_adapters(model: nn.Module, names: Sequence[str | None]):
    """Within the context, batch row ``i`` of every input to the model's banks uses adapter
    ``names[i]`` (``None``: the base model) for all its tokens: inputs are ``(rows, in_features)`` or
    ``(rows, tokens, in_features)``, and ``generate()`` keeps each row's adapter across its decoding
    steps. A row whose adapter leaves a module alone gets the base layer there. Unknown names are
    refused before anything changes; an input whose row count differs from ``len(names)`` is refused
    when it reaches a bank."""
    banks = [bank for _, bank in adapter_banks(model)]
    if not banks:
        raise ValueError("model has no adapter banks; peft_ops.load_adapter_bank(model, {name: path}) first")
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence) or not names:
        raise TypeError(f"names={names!r}; expected a non-empty list with one adapter name (or None) per batch row")
    known = set(bank_adapters(model))
    unknown = [n for n in names if n is not None and (not isinstance(n, str) or n not in known)]
    if unknown:
        raise ValueError(f"names: {sorted(map(repr, unknown))} are not in the model's adapter banks; loaded: "
                         f"{sorted(known)}")
    previous = [bank._rows for bank in banks]
    shared: dict[tuple[int, ...], _RowAdapters] = {}  # banks holding the same adapters share their groups
    for bank in banks:
        indices = tuple(bank.index(n) for n in names)
        bank._rows = shared.setdefault(indices, _RowAdapters(list(indices)))
    try:
        yield
    finally:
        for bank, rows in zip(banks, previous):
            bank._rows = rows


def remove_adapters(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Take adapters out of every bank, leaving the others as they are; a module whose bank is left
    empty gets its base layer back. Returns the names removed."""
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence) or not names:
        raise TypeError(f"names={names!r}; expected a non-empty list of adapter names")
    known = set(bank_adapters(model))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"names: {unknown} are not in the model's adapter banks; loaded: {sorted(known)}")
    _refuse_while_in_use(model, "remove_adapters")
    for module_name, bank in list(adapter_banks(model)):
        bank.remove(set(names))
        if not bank.names:
            parent, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent), child, bank.base_layer)
    return list(names)
