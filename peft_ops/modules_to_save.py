"""Whole modules trained and saved beside the adapters (PEFT's ``modules_to_save``): a classification
head, say. ``inject(..., modules_to_save=[...])`` unfreezes them and records their names on the model;
``save_adapter`` stores their tensors, ``load_adapter`` copies them back; ``save_adapter`` refuses a
model with other trainable parameters it would not save."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layers import LowRankLinear

__all__ = ["modules_to_save", "match_modules_to_save", "register_modules_to_save", "module_tensors",
           "unsaved_trainable"]

_ATTRIBUTE = "peft_ops_modules_to_save"  # the names, on the model; state_dict and save_pretrained ignore it


def modules_to_save(model: nn.Module) -> list[str]:
    """The names of the modules registered to be saved beside the adapters."""
    return list(getattr(model, _ATTRIBUTE, ()))


def match_modules_to_save(model: nn.Module, patterns) -> list[str]:
    """Module names for ``patterns`` (name suffixes, as ``target_modules``), checked: each pattern
    matches a module, and none is or holds an adapter layer (its adapter would be saved twice)."""
    if isinstance(patterns, str) or not isinstance(patterns, Sequence | set | frozenset) or \
            not all(isinstance(p, str) and p for p in patterns):
        raise TypeError(f"modules_to_save={patterns!r}; expected a list of module-name suffixes such as ['classifier']")
    names = []
    modules = [(n, m) for n, m in model.named_modules() if n]
    for pattern in patterns:
        found = [(n, m) for n, m in modules if n == pattern or n.endswith("." + pattern)]
        if not found:
            raise ValueError(f"modules_to_save: {pattern!r} matched no module of the model")
        for name, module in found:
            if isinstance(module, LowRankLinear) or any(isinstance(m, LowRankLinear) for m in module.modules()):
                raise ValueError(f"modules_to_save: {name!r} is or holds an adapter layer; save the adapter as an "
                                 f"adapter, and whole modules that have none")
            names.append(name)
    # a module inside another one saved is saved with it
    return sorted({n for n in names if not any(n.startswith(o + ".") for o in names)})


def register_modules_to_save(model: nn.Module, names: Sequence[str]) -> None:
    """Record ``names`` (already checked) on the model and make their parameters trainable."""
    if not names:
        return
    registered = sorted(set(modules_to_save(model)) | set(names))
    registered = [n for n in registered if not any(n.startswith(o + ".") for o in registered)]
    object.__setattr__(model, _ATTRIBUTE, registered)
    for name in names:
        model.get_submodule(name).requires_grad_(True)


def module_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The state (parameters and persistent buffers) of module ``name``, keyed by full names."""
    return {f"{name}.{k}": v for k, v in model.get_submodule(name).state_dict().items()}


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


def check_module_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Check that each of ``tensors`` (full names) is a tensor of ``model`` of the same shape."""
    from .adapter_file import AdapterFileError

    for key, value in tensors.items():
        own = _own_tensor(model, key)
        if own is None:
            raise AdapterFileError(f"{where}: tensor {key!r} (modules_to_save) is not in the model")
        if own.shape != value.shape:
            raise AdapterFileError(f"{where}: tensor {key!r} (modules_to_save) has shape {tuple(value.shape)}, the "
                                   f"model's is {tuple(own.shape)}")


@torch.no_grad()
def load_module_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy checked ``tensors`` into the model's own tensors (in place: an optimizer may hold them)."""
    for key, value in tensors.items():
        _own_tensor(model, key).copy_(value)


def unsaved_trainable(model: nn.Module) -> list[tuple[str, int]]:
    """``(name, number of values)`` of every trainable parameter that ``save_adapter`` would not save:
    neither an adapter's own nor in a registered module."""
    saved = set()
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            saved |= {id(p) for p in module.parameters(recurse=False)}
    for name in modules_to_save(model):
        saved |= {id(p) for p in model.get_submodule(name).parameters()}
    return [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad and id(p) not in saved]
