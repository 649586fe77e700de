"""The one loading path: every entry point (``inject``, ``load_adapter``, ``import_peft``,
``import_tlora``, ``load_adapter_bank``, and ``modules_to_save`` with any of them) builds a :class:`Plan`
without changing the model, :func:`apply` checks the whole plan against the model and only then changes
it. So a refused load leaves the model exactly as it was."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapter_file import AdapterEntry, AdapterFile, dtype_name, read_adapter_file
from .bank_layer import AdapterBank
from .checks import fingerprint_mismatch, legacy_signature_mismatch, signature_mismatch, signature_rtol
from .dispatch import check_backend
from .errors import AdapterFileError
from .layers import LAYER_CLASSES, LowRankLinear, base_dtype, base_shape
from .methods import get_method
from .model import (adapter_layers, guard_save_pretrained, preserved_on_error, register_modules_to_save,
                    modules_to_save, replace_modules)
from .selection import refuse_while_selected
from .targets import ModelView

__all__ = ["Plan", "apply", "build_layer", "check_base", "check_module_tensors", "plan_adapter_file",
           "load_adapter"]


@dataclass
class Plan:
    """What a load changes, built and checked before anything changes."""

    where: str  # the file, directory or call, for errors
    error: type[Exception] = AdapterFileError
    new: dict[str, nn.Module] = field(default_factory=dict)  # name -> a new adapter layer or bank there
    in_place: list[tuple[LowRankLinear, LowRankLinear]] = field(default_factory=list)  # (existing, built)
    bank_additions: list[tuple[AdapterBank, list[str], list[dict]]] = field(default_factory=list)
    module_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save values, by full key
    saved_whole: list[str] = field(default_factory=list)  # modules to register as modules_to_save


def _own_tensor(model: nn.Module, key: str) -> torch.Tensor | None:
    """The parameter or persistent buffer named by the full name ``key``, or None."""
    module_name, _, tensor_name = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    if tensor_name in module._parameters or (tensor_name in module._buffers
                                             and tensor_name not in module._non_persistent_buffers_set):
        return getattr(module, tensor_name)
    return None


def check_module_tensors(model: nn.Module, described: dict[str, tuple[torch.dtype, tuple]], saved_whole: list[str],
                         error: type[Exception], where: str) -> None:
    """Check that each of the ``modules_to_save`` tensors (full key -> dtype, shape) is a tensor of a module
    in ``saved_whole``, of the same dtype and shape; and that each such module's whole state is given."""
    for key, (dtype, shape) in described.items():
        owner = next((m for m in saved_whole if key.startswith(m + ".")), None)
        own = _own_tensor(model, key) if owner is not None else None
        if own is None:
            raise error(f"{where}: tensor {key!r} (modules_to_save) is not a tensor of a module saved whole")
        if tuple(own.shape) != tuple(shape) or own.dtype != dtype:
            raise error(f"{where}: tensor {key!r} (modules_to_save) is {dtype_name(dtype)} of shape {tuple(shape)}, "
                        f"the model's is {dtype_name(own.dtype)} of shape {tuple(own.shape)}")
    for module in saved_whole:
        lacking = sorted(f"{module}.{k}" for k in model.get_submodule(module).state_dict() if f"{module}.{k}" not in described)
        if lacking:
            raise error(f"{where}: modules_to_save {module!r}: tensors {lacking[:4]} are missing")


def _check(model: nn.Module, plan: Plan) -> None:
    """Everything the plan would change, checked against the model as it is now."""
    view = ModelView.of(model)
    refuse_while_selected(view.adapters().values(), "load")
    for name, module in plan.new.items():
        target = view.target(name, plan.error, plan.where)
        if target is not module.base_layer:
            raise plan.error(f"{plan.where}: module {name!r} changed since the load was planned")
    view.check_saved_whole(plan.saved_whole, plan.new, plan.error, plan.where)


def apply(model: nn.Module, plan: Plan) -> None:
    """Check ``plan`` in full, then change the model: the only function that does on load. A model
    without adapters yet is frozen around its new ones (as PEFT does); once it has some, the
    ``requires_grad`` flags the user set are theirs: only the new adapters' tensors are made trainable."""
    _check(model, plan)
    first = next(adapter_layers(model), None) is None
    with torch.no_grad():
        for existing, built in plan.in_place:
            for tensor_name, value in [*built.named_parameters(recurse=False), *built.named_buffers(recurse=False)]:
                if value is not None:
                    getattr(existing, tensor_name).copy_(value)
            existing.alpha, existing.dropout, existing.seed, existing.options, existing.given_frozen_factors = (
                built.alpha, built.dropout, built.seed, built.options, built.given_frozen_factors)
        for key, value in plan.module_tensors.items():
            _own_tensor(model, key).copy_(value)
    for bank, names, contributions in plan.bank_additions:
        bank.add(names, contributions)
    replace_modules(model, plan.new)
    layers = [m for m in plan.new.values() if isinstance(m, LowRankLinear)]
    if layers and first:
        model.requires_grad_(False)
        register_modules_to_save(model, modules_to_save(model))
    if plan.new:
        guard_save_pretrained(model)
    for layer in layers:
        layer.train(layer.base_layer.training)  # an adapter in a model in eval mode is in eval mode (no dropout)
        layer.requires_grad_(False)
        for p in layer.parameters(recurse=False):
            p.requires_grad_(True)
    register_modules_to_save(model, plan.saved_whole)


def check_base(file: AdapterFile, entry: AdapterEntry, base: nn.Module) -> None:
    """The header-level checks of an entry against the base layer it would adapt: shape and bias."""
    where = f"{file.path}: module {entry.name!r}"
    shape = base_shape(base)
    if shape != (entry.out_features, entry.in_features):
        raise AdapterFileError(f"{where}: the model's weight is {shape[0]}×{shape[1]}, the adapter was made for "
                               f"{entry.out_features}×{entry.in_features} (another base model)")
    if entry.bias != (base.bias is not None):
        raise AdapterFileError(f"{where}: the adapter was made for a layer {'with' if entry.bias else 'without'} a "
                               f"bias; the model's layer {'has' if base.bias is not None else 'has none'}")


def build_layer(file: AdapterFile, entry: AdapterEntry, module: nn.Module, base: nn.Module, backend: str, *,
                frozen: dict[str, torch.Tensor] | None = None, frozen_source: str = "") -> LowRankLinear:
    """A layer holding the entry's adapter, checked: the base weight's fingerprint (``module``: the plain
    layer or its adapter), the frozen factors from the file, else ``frozen`` (``frozen_source`` says
    whose: a bank's shared ones), else regenerated, and then compared with the file's signature; the
    stored tensors from the file."""
    tensors = file.tensors()
    entry = file.entries[entry.name]  # with what the data holds: seed, fingerprint, signature
    where = f"{file.path}: module {entry.name!r}"
    mismatch = fingerprint_mismatch(entry.fingerprint, module)
    if mismatch:
        raise AdapterFileError(f"{where}: {mismatch}")
    method = get_method(entry.method)
    stored_frozen = {t: tensors[f"{entry.name}.{t}"] for t in entry.shapes if t in method.frozen}
    try:
        layer = LAYER_CLASSES[method.name](base, entry.rank, alpha=entry.alpha, dropout=entry.dropout,
                                           seed=entry.seed, backend=backend,
                                           frozen_factors=stored_frozen or frozen or None, **entry.options)
    except (TypeError, ValueError, RuntimeError) as e:
        raise AdapterFileError(f"{where}: the metadata does not make a {method.name} layer ({e})") from None
    trainable = {n for n, _ in layer.named_parameters(recurse=False)}
    if set(entry.shapes) not in (trainable, trainable | set(method.frozen)):
        raise AdapterFileError(f"{where}: the file stores tensors {sorted(entry.shapes)}; a {method.name} layer has "
                               f"{sorted(trainable)} (and frozen {sorted(method.frozen)})")
    for t in [*layer.parameters(recurse=False), *(getattr(layer, n) for n in method.frozen)]:
        t.data = t.data.to(entry.dtype)
    for tensor_name in entry.shapes:
        value, target = tensors[f"{entry.name}.{tensor_name}"], getattr(layer, tensor_name)
        if target.shape != value.shape:
            raise AdapterFileError(f"{where}: tensor {tensor_name!r} has shape {tuple(value.shape)}, the "
                                   f"{method.name} layer expects {tuple(target.shape)}")
        target.data.copy_(value)
    if method.frozen:
        rtol = signature_rtol(entry.base_dtype, base_dtype(base))
        if isinstance(entry.signature, dict):
            mismatch = legacy_signature_mismatch(entry.signature, layer, rtol)
        elif entry.signature is None:
            mismatch = "the file has no signature of the frozen factors"
        else:
            mismatch = signature_mismatch(entry.signature, layer, rtol)
        if mismatch and frozen and not stored_frozen:
            raise AdapterFileError(f"{where}: its frozen {method.name} factors differ from {frozen_source} ({mismatch})")
        if mismatch:
            raise AdapterFileError(
                f"{where}: the regenerated frozen {method.name} factors differ from the ones the adapter was trained "
                f"with: {mismatch}. The base weight or the code that generates the factors changed; save with "
                f"include_frozen=True to carry the factors in the file")
    return layer


def plan_adapter_file(model: nn.Module, file: AdapterFile, backend: str) -> Plan:
    """The plan that loads ``file`` into ``model`` (see :func:`load_adapter`)."""
    view = ModelView.of(model)
    plan = Plan(file.path)
    existing = dict(adapter_layers(model))
    lacking = sorted(set(existing) - set(file.entries))
    if lacking:
        raise AdapterFileError(f"{file.path}: the model has adapters on {lacking}, which the file lacks")
    targets = {}
    for name, entry in sorted(file.entries.items()):
        module = view.target(name, AdapterFileError, file.path)
        where = f"{file.path}: module {name!r}"
        if isinstance(module, AdapterBank):
            raise AdapterFileError(f"{where} holds an adapter bank; peft_ops.remove_adapters(model, "
                                   f"peft_ops.bank_adapters(model)) first")
        base = module
        if isinstance(module, LowRankLinear):
            if (module.method.name, module.rank) != (entry.method, entry.rank):
                raise AdapterFileError(f"{where}: the file holds a {entry.method} adapter of rank {entry.rank}, the "
                                       f"model has a {module.method.name} adapter of rank {module.rank} there")
            if module.merged:
                raise AdapterFileError(f"{where}: the model's adapter is merged; unmerge it before loading")
            base = module.base_layer
        check_base(file, entry, base)
        targets[name] = (module, base)
    plan.saved_whole = view.check_saved_whole(file.saved_modules, file.entries, AdapterFileError, file.path)
    check_module_tensors(model, file.module_tensors(), plan.saved_whole, AdapterFileError, file.path)
    tensors = file.tensors()  # read only now: every tensor has its place in the model
    plan.module_tensors = {key: tensors[key] for key in file.module_tensors()}
    with preserved_on_error(model):
        for name, entry in sorted(file.entries.items()):
            module, base = targets[name]
            layer = build_layer(file, entry, module, base, backend)
            if isinstance(module, LowRankLinear):
                plan.in_place.append((module, layer))
            else:
                plan.new[name] = layer
    return plan


def load_adapter(model: nn.Module, path: str | os.PathLike, *, backend: str = "auto") -> list[str]:
    """Load the adapters stored at ``path`` into ``model``; returns the module names.

    A module that is a plain linear layer gets a new adapter layer (with ``backend``), and the model is
    frozen around the adapters as ``inject`` does; one that already has an adapter of the same method
    and rank (after ``inject``, say) gets the file's values in place, its backend and every
    ``requires_grad`` flag left as they were. Everything is checked first — the file's header, then
    module names, shapes and biases against the model (before any tensor data is read), then the
    checksum, base-weight fingerprints, regenerated frozen factors, and that the model has no adapter
    the file lacks — and on any error the model is left untouched. Modules saved whole
    (``modules_to_save``) get the file's tensors in place and are registered and made trainable."""
    check_backend(backend)
    file = read_adapter_file(path)
    plan = plan_adapter_file(model, file, backend)
    apply(model, plan)
    return sorted(file.entries)
