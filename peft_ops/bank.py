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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import dispatch
from .adapter_file import SKETCH, AdapterEntry, AdapterFile, read_adapter_file
from .bank_layer import AdapterBank, RowAdapters, adapter_contribution
from .checks import signature, signature_mismatch, signature_rtol
from .errors import AdapterFileError
from .layers import LowRankLinear, base_weight
from .load import Plan, apply, build_layer, check_base
from .methods import Method, get_method
from .model import adapter_banks, preserved_on_error, replace_modules
from .selection import Selection, refuse_while_selected, selected
from .targets import ModelView

__all__ = ["AdapterBank", "load_adapter_bank", "use_adapters", "remove_adapters", "adapter_banks",
           "bank_adapters"]


def bank_adapters(model: nn.Module) -> list[str]:
    """The names of the adapters in ``model``'s banks, in the order they were loaded."""
    names: dict[str, None] = {}
    for _, bank in adapter_banks(model):
        names.update(dict.fromkeys(bank.names))
    return list(names)


@dataclass
class _PendingBank:
    """One module's adapters read from the files, before anything in the model changes."""

    base: nn.Module
    bank: AdapterBank | None  # the module's existing bank, if any
    method: Method
    rank: int
    frozen: dict[str, torch.Tensor] | None
    signature: torch.Tensor | None
    shared_factors: tuple[torch.Tensor, torch.Tensor] | None = None
    names: list[str] = field(default_factory=list)
    contributions: list[dict[str, torch.Tensor]] = field(default_factory=list)


def _pending_for(file: AdapterFile, entry: AdapterEntry, module: nn.Module) -> _PendingBank:
    """A new pending bank for ``module``: on its existing bank, or on a plain layer."""
    if isinstance(module, LowRankLinear):
        raise AdapterFileError(f"{file.path}: module {entry.name!r} has a single {module.method.name} adapter; a "
                               f"module holds one adapter or one bank: peft_ops.unload(model) first")
    if isinstance(module, AdapterBank):
        return _PendingBank(module.base_layer, module, module.method, module.rank, module.frozen, module.signature)
    return _PendingBank(module, None, get_method(entry.method), entry.rank, None, None)


def load_adapter_bank(model: nn.Module, paths: Mapping[str, str | os.PathLike], *,
                      backend: str = "auto") -> list[str]:
    """Load adapter files into banks, one bank per adapted module, under the given names; returns the
    names. A model may get more adapters later by calling this again (the others are not reloaded);
    :func:`remove_adapters` takes some out.

    Every file is checked as :func:`peft_ops.load_adapter` checks it (header, module names and
    shapes, checksum, base-weight fingerprints, frozen-factor signatures), and besides: one method and
    rank per bank, and for LoRA-XS and TLoRA the same frozen factors as the bank's (same base weights and
    SVD options, same seed). On any error the model is left untouched. ``backend``: as for the layers
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
    refuse_while_selected((bank for _, bank in adapter_banks(model)), "load_adapter_bank")
    view = ModelView.of(model)
    pending: dict[str, _PendingBank] = {}
    plan = Plan(", ".join(map(os.fspath, paths.values())))
    with preserved_on_error(model):
        for adapter, path in paths.items():
            file = read_adapter_file(path)
            if file.saved_modules:
                raise AdapterFileError(f"{file.path}: the file carries whole modules ({sorted(file.saved_modules)}, "
                                       f"modules_to_save); a bank serves per-row adapters only, one set of "
                                       f"modules for all rows cannot follow them")
            entries = [file.entries[name] for name in sorted(file.entries)]
            for entry in entries:
                if entry.name not in pending:
                    pending[entry.name] = _pending_for(file, entry, view.target(entry.name, AdapterFileError, file.path))
                check_base(file, entry, pending[entry.name].base)
            for entry in entries:
                _add_entry(file, adapter, entry, pending[entry.name], backend)
        for module_name, p in pending.items():
            if p.bank is None:
                plan.new[module_name] = AdapterBank(p.base, p.method, p.rank, backend, p.frozen, p.signature,
                                                    p.shared_factors)
                plan.bank_additions.append((plan.new[module_name], p.names, p.contributions))
            else:
                plan.bank_additions.append((p.bank, p.names, p.contributions))
        apply(model, plan)
    return list(paths)


def _add_entry(file: AdapterFile, adapter: str, entry: AdapterEntry, p: _PendingBank, backend: str) -> None:
    """Build one file's adapter for one module and queue it for the module's bank."""
    where = f"{file.path}: module {entry.name!r}"
    if (entry.method, entry.rank) != (p.method.name, p.rank):
        raise AdapterFileError(f"{where}: the file holds a {entry.method} adapter of rank {entry.rank}; the "
                               f"bank there holds {p.method.name} adapters of rank {p.rank} (one method and rank "
                               f"per bank)")
    layer = build_layer(file, entry, p.base, p.base, backend, frozen=p.frozen,
                        frozen_source=f"the bank's shared ones; a {p.method.name} bank holds adapters made on the "
                                      f"same base weights with the same seed and options")
    shared = bool(p.method.frozen)
    if shared and p.frozen is None:  # the first adapter of a new bank: its factors become the bank's
        up, _, down, _ = layer.factors()
        p.frozen = {n: getattr(layer, n) for n in p.method.frozen}
        p.signature, p.shared_factors = signature(layer, SKETCH), (up.detach(), down.detach())
    elif shared:
        mismatch = signature_mismatch(p.signature, layer, signature_rtol(entry.base_dtype, base_weight(p.base).dtype))
        if mismatch:
            raise AdapterFileError(f"{where}: its frozen {p.method.name} factors differ from the bank's shared ones "
                                   f"({mismatch}); a {p.method.name} bank holds adapters made on the same base "
                                   f"weights with the same seed and options")
    p.names.append(adapter)
    p.contributions.append(adapter_contribution(layer, shared, torch.promote_types(base_weight(p.base).dtype,
                                                                                   torch.float32)))


def _batch_dim(model: nn.Module) -> int:
    """Where a model's linear layers see the batch rows: dimension 1 in a sequence-first model (torch's
    attention and transformer layers with ``batch_first=False``), else 0; a model with both is refused."""
    firsts = {m.batch_first for m in model.modules() if isinstance(getattr(m, "batch_first", None), bool)}
    if len(firsts) > 1:
        raise ValueError("use_adapters: the model has both batch-first and sequence-first layers; pass "
                         "batch_dim= (the input dimension that holds the batch rows at the banked layers)")
    return 1 if firsts == {False} else 0


@contextlib.contextmanager
def use_adapters(model: nn.Module, names: Sequence[str | None], *, batch_dim: int | None = None):
    """Within the block, in this thread, batch row ``i`` of every input to the model's banks uses adapter
    ``names[i]`` (``None``: the base model) for all its tokens, and ``generate()`` keeps each row's
    adapter across its decoding steps (with ``num_beams`` or ``num_return_sequences`` = k, each name
    covers k consecutive rows, as transformers expands the batch). The rows are dimension ``batch_dim``
    of the banked layers' inputs: by default 0, or 1 in a sequence-first model (torch's attention and
    transformer layers with ``batch_first=False``). A row whose adapter leaves a module alone gets the
    base layer there. Other threads keep their own selection; nested blocks compose, the innermost
    deciding. Unknown names are refused before anything changes; an input whose row count is not a
    multiple of ``len(names)`` is refused when it reaches a bank."""
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
    if batch_dim is None:
        batch_dim = _batch_dim(model)
    elif isinstance(batch_dim, bool) or batch_dim not in (0, 1):
        raise ValueError(f"batch_dim={batch_dim!r}; expected 0 (batch first) or 1 (sequence first)")
    shared: dict[tuple[int, ...], RowAdapters] = {}  # banks holding the same adapters share their groups
    rows = {}
    for bank in banks:
        indices = tuple(bank.index(n) for n in names)
        rows[id(bank)] = shared.setdefault(indices, RowAdapters(list(indices), batch_dim))
    with selected(Selection(rows=rows)):
        yield


def remove_adapters(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Take adapters out of every bank, leaving the others as they are; a module whose bank is left
    empty gets its base layer back. Returns the names removed."""
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence) or not names:
        raise TypeError(f"names={names!r}; expected a non-empty list of adapter names")
    known = set(bank_adapters(model))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"names: {unknown} are not in the model's adapter banks; loaded: {sorted(known)}")
    refuse_while_selected((bank for _, bank in adapter_banks(model)), "remove_adapters")
    for module_name, bank in list(adapter_banks(model)):
        bank.remove(set(names))
        if not bank.names:
            replace_modules(model, {module_name: bank.base_layer})
    return list(names)
