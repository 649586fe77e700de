"""The model as peft-ops changes it: the only code that puts modules into a model or takes them out, the
registry of whole modules saved beside the adapters (``modules_to_save``), the guard on transformers'
``save_pretrained``, and the model-level operations on the adapters in place (merge, unmerge, unload,
disable_adapters)."""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from .bank_layer import AdapterBank
from .layers import LowRankLinear
from .selection import Selection, refuse_while_selected, selected

__all__ = ["adapter_layers", "adapter_banks", "replace_modules", "preserved_on_error", "modules_to_save",
           "register_modules_to_save", "module_tensors", "unsaved_trainable", "guard_save_pretrained", "merge",
           "unmerge", "unload", "disable_adapters"]

_MODULES_TO_SAVE = "peft_ops_modules_to_save"  # the names, on the model; state_dict and save_pretrained ignore it


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, LowRankLinear]]:
    """``(name, layer)`` for every peft-ops layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            yield name, module


def adapter_banks(model: nn.Module) -> Iterator[tuple[str, AdapterBank]]:
    """``(name, bank)`` for every adapter bank in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterBank):
            yield name, module


def replace_modules(model: nn.Module, modules: Mapping[str, nn.Module]) -> None:
    """Put each module at its name (already checked by the caller)."""
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)


@contextlib.contextmanager
def preserved_on_error(model: nn.Module):
    """Undo the ``requires_grad`` changes that building layers makes (a layer freezes its base layer) if
    anything below fails."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


def modules_to_save(model: nn.Module) -> list[str]:
    """The names of the whole modules registered to be trained and saved beside the adapters."""
    return list(getattr(model, _MODULES_TO_SAVE, ()))


def register_modules_to_save(model: nn.Module, names: Sequence[str]) -> None:
    """Record ``names`` (already checked) on the model and make their parameters trainable."""
    if not names:
        return
    registered = sorted(set(modules_to_save(model)) | set(names))
    registered = [n for n in registered if not any(n.startswith(o + ".") for o in registered)]
    object.__setattr__(model, _MODULES_TO_SAVE, registered)
    for name in names:
        model.get_submodule(name).requires_grad_(True)


def module_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The state (parameters and persistent buffers) of module ``name``, keyed by full names."""
    return {f"{name}.{k}": v for k, v in model.get_submodule(name).state_dict().items()}


def unsaved_trainable(model: nn.Module) -> list[tuple[str, int]]:
    """``(name, number of values)`` of every trainable parameter that ``save_adapter`` would not save:
    neither an adapter's own nor in a registered module."""
    saved = {id(p) for _, layer in adapter_layers(model) for p in layer.parameters(recurse=False)}
    for name in modules_to_save(model):
        saved |= {id(p) for p in model.get_submodule(name).parameters()}
    return [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad and id(p) not in saved]


class _GuardedSavePretrained:
    """``model.save_pretrained`` that warns while the model has adapters. An object holding the model
    (not a closure), so ``copy.deepcopy`` and pickling give the copy a guard of its own."""

    def __init__(self, model: nn.Module):
        self.model, self.warned = model, False

    def __call__(self, save_directory, *args, **kwargs):
        count = sum(1 for _ in adapter_layers(self.model)) + sum(1 for _ in adapter_banks(self.model))
        if count and not self.warned:
            self.warned = True
            warnings.warn(
                f"save_pretrained: this model has {count} peft-ops adapter layers or banks; the checkpoint stores their base "
                f"weights as '<name>.base_layer.weight', which from_pretrained of the plain model will NOT load (it "
                f"initialises those layers randomly); it reloads only into a model with the same adapters injected. "
                f"For a checkpoint that reloads anywhere use peft_ops.hf.save_pretrained_merged(model, directory) "
                f"(or peft_ops.unload(model, merge=True) first); to keep the adapter, peft_ops.save_adapter(model, "
                f"path).", UserWarning, stacklevel=2)
        return type(self.model).save_pretrained(self.model, save_directory, *args, **kwargs)


def guard_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` (a transformers model's) warn while the model has adapters."""
    if callable(getattr(type(model), "save_pretrained", None)) and "save_pretrained" not in vars(model):
        object.__setattr__(model, "save_pretrained", _GuardedSavePretrained(model))


def merge(model: nn.Module) -> None:
    """Merge every adapter of ``model`` into its base weight (see :meth:`LowRankLinear.merge`)."""
    for _, layer in adapter_layers(model):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):
        layer.unmerge()


def unload(model: nn.Module, *, merge: bool = False) -> list[str]:
    """Put the base layers back in place of the adapter layers and banks. With ``merge=True`` the
    adapter layers are folded into the base weights first (for serving without peft-ops; a bank, which
    holds many adapters, cannot be: refused); otherwise the original weights return. Refused while a
    ``disable_adapters`` or ``use_adapters`` block in any thread selects the model. Returns the names of
    the modules restored."""
    layers, banks = dict(adapter_layers(model)), dict(adapter_banks(model))
    quantized = sorted(n for n, layer in layers.items() if layer.quantized)
    if merge and quantized:
        raise ValueError(f"unload(merge=True): the adapters on {quantized[:4]} have quantized base layers; folding "
                         f"ΔW in would quantize W + ΔW again and lose most of the adapter. unload(model) without "
                         f"merge gives back the quantized base layers unchanged (the adapters are dropped: save them "
                         f"first with peft_ops.save_adapter or export_peft); to merge, load the adapter into the "
                         f"unquantized original model and unload(merge=True) there")
    if merge and banks:
        raise ValueError(f"unload(merge=True): the model holds adapter banks on {sorted(banks)[:4]}, whose many "
                         f"adapters cannot be folded into one weight; remove them first (peft_ops.remove_adapters, "
                         f"or unload(model) without merge, which gives back the base layers)")
    refuse_while_selected([*layers.values(), *banks.values()], "unload")
    for layer in layers.values():
        if merge:
            layer.merge()
            layer.forget_original_weight()
        else:
            layer.unmerge()
    restored = {name: module.base_layer for name, module in {**layers, **banks}.items()}
    replace_modules(model, restored)
    return list(restored)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """``with disable_adapters(model):`` in this thread the model computes as its base model (every
    method, TLoRA's learned α included, merged layers and adapter banks too); other threads keep their
    own selection. Nothing in the model changes."""
    modules = [m for _, m in adapter_layers(model)] + [m for _, m in adapter_banks(model)]
    with selected(Selection(disabled=frozenset(map(id, modules)))):
        yield model
