"""``save_adapter``: a model's adapters as a compact adapter file (:mod:`peft_ops.adapter_file`)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from .adapter_file import FINGERPRINT_SAMPLES, SKETCH, adapter_file_bytes, dtype_name
from .checks import fingerprint, full_tensor, signature
from .files import write_atomically
from .layers import base_dtype
from .model import adapter_banks, adapter_layers, module_tensors, modules_to_save, unsaved_trainable

__all__ = ["save_adapter", "check_savable", "AdapterFileInfo"]


@dataclass(frozen=True)
class AdapterFileInfo:
    path: str
    modules: int
    trainable_parameters: int
    tensor_bytes: int  # bytes of the adapters' tensors stored (the trainable ones, and frozen ones given or included)
    file_bytes: int

    def __str__(self) -> str:
        return (f"{self.path}: {self.modules} modules, {self.trainable_parameters} trainable parameters, "
                f"{self.tensor_bytes} tensor bytes in a {self.file_bytes}-byte file")


def check_savable(model: nn.Module) -> None:
    """What :func:`save_adapter` refuses in a model, whatever the path: no adapters, or trainable parameters
    the file would lose. A ``ValueError`` that says what to do."""
    if next(adapter_layers(model), None) is None:
        banks = sorted({n for _, bank in adapter_banks(model) for n in bank.names})
        if banks:
            raise ValueError(f"model has no peft-ops adapter layers to save, only adapter banks holding {banks}: each "
                             f"of those is the adapter file it was loaded from (peft_ops.read_adapter_info describes it)")
        raise ValueError("model has no peft-ops adapter layers to save (inject or load one first)")
    lost = unsaved_trainable(model)
    if lost:
        listed = ", ".join(f"{n} ({count:,} values)" for n, count in lost[:6]) + (" ..." if len(lost) > 6 else "")
        raise ValueError(
            f"save_adapter: {len(lost)} trainable parameters outside the adapters would not be saved "
            f"({sum(c for _, c in lost):,} values: {listed}). Register their modules with "
            f"inject(..., modules_to_save=[...]) to save them too, or freeze them (requires_grad_(False))")


def save_adapter(model: nn.Module, path: str | os.PathLike, *, include_frozen: bool = False) -> AdapterFileInfo:
    """Write the adapters of ``model`` to a safetensors file at ``path``.

    The trainable tensors are stored. Frozen factors the layer made itself (LoRA-XS's from the SVD of its
    base weight, TLoRA's from its seed) are regenerated at load, unless ``include_frozen=True`` stores them;
    those it was given (``import_peft`` of the LoRA-XS authors' files, ``import_tlora``, a file that stores
    them) are stored always, since nothing could regenerate them: the file loads back whatever the
    argument. The modules registered with ``modules_to_save`` are stored whole. Any
    other trainable parameter is refused, naming it: the file would silently lose it. The previous file
    at ``path`` is replaced only once the new one is complete on disk (a symlink is written through).
    The same adapter gives the same bytes in every process. Returns sizes: the file against the tensor
    bytes. On a model sharded with FSDP2, call it on every rank (it gathers the shards); give rank 0
    the real path."""
    check_savable(model)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path={path!r}; expected a file path (str or os.PathLike)")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"path={path!r} is a directory; expected the path of an adapter file "
                                f"(e.g. {os.path.join(path, 'adapter.safetensors')!r})")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"path={path!r}: the directory {folder!r} does not exist; create it first")
    layers = dict(adapter_layers(model))
    groups: dict[str, dict] = {}
    stored, described = {}, {}
    for name, layer in sorted(layers.items()):
        names = [n for n, _ in layer.named_parameters(recurse=False)]
        if include_frozen or layer.given_frozen_factors:
            names += list(layer.method.frozen)
        for tensor_name in names:
            stored[f"{name}.{tensor_name}"] = full_tensor(getattr(layer, tensor_name)).detach().cpu().contiguous()
        group = {"method": layer.method.name, "rank": layer.rank, "alpha": layer.alpha, "dropout": layer.dropout,
                 "options": layer.options, "in_features": layer.in_features, "out_features": layer.out_features,
                 "dtype": dtype_name(stored[f"{name}.{names[0]}"].dtype),
                 "base_dtype": dtype_name(base_dtype(layer.base_layer)), "bias": layer.base_layer.bias is not None,
                 "tensors": {t: list(stored[f"{name}.{t}"].shape) for t in names}}
        key = json.dumps(group, sort_keys=True)
        groups.setdefault(key, {**group, "modules": []})["modules"].append(name)
        described[name] = layer
    ordered = [groups[k] for k in sorted(groups)]
    order = [name for group in ordered for name in group["modules"]]
    fingerprints = torch.stack([fingerprint(described[n], FINGERPRINT_SAMPLES) for n in order])
    frozen = [n for n in order if described[n].method.frozen]
    signatures = torch.stack([signature(described[n], SKETCH) for n in frozen]) if frozen else None
    saved_modules = {name: {k.removeprefix(name + "."): full_tensor(v) for k, v in module_tensors(model, name).items()}
                     for name in modules_to_save(model)}
    data = adapter_file_bytes(ordered, [described[n].seed for n in order], fingerprints, signatures, stored,
                              saved_modules)
    written = write_atomically(path, data)
    trainable = sum(p.numel() for layer in layers.values() for p in layer.parameters(recurse=False)) + \
        sum(p.numel() for n in saved_modules for p in model.get_submodule(n).parameters())
    return AdapterFileInfo(path, len(layers), trainable,
                           sum(t.numel() * t.element_size() for t in stored.values()), os.path.getsize(written))
