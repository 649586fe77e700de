"""What a model trains (PEFT's ``print_trainable_parameters``, per method) and what an adapter file
holds, read without a model."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .adapter_file import dtype_name, read_adapter_file
from .methods import get_method
from .model import adapter_banks, adapter_layers, modules_to_save, unsaved_trainable
from .peft_format import LATENT_SUFFIXES, latent_key, read_peft, task_heads

__all__ = ["trainable_summary", "TrainableSummary", "read_adapter_info", "AdapterDescription"]


@dataclass(frozen=True)
class TrainableSummary:
    trainable: int  # parameters with requires_grad, counted as PEFT counts them
    total: int  # every parameter of the model, adapters included
    per_method: dict[str, tuple[int, int]]  # method -> (modules, trainable values)
    modules_to_save: int  # trainable values in registered whole modules
    other: int  # trainable values outside both (save_adapter would refuse them)
    frozen_factor_values: int  # LoRA-XS's and TLoRA's frozen factors: buffers, in neither count above
    banks: tuple[int, int] = (0, 0)  # adapter banks (inference only): modules, adapters

    def __str__(self) -> str:
        share = 100 * self.trainable / self.total if self.total else 0.0
        lines = [f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {share:.4f}"]
        lines += [f"  {method}: {modules} modules, {values:,} trainable" for method, (modules, values)
                  in sorted(self.per_method.items())]
        if self.modules_to_save:
            lines.append(f"  modules_to_save: {self.modules_to_save:,} trainable")
        if self.other:
            lines.append(f"  other trainable parameters (not saved by save_adapter): {self.other:,}")
        if self.banks[0]:
            lines.append(f"  adapter banks (inference only, nothing trains): {self.banks[0]} modules, "
                         f"{self.banks[1]} adapters")
        if self.frozen_factor_values:
            lines.append(f"  frozen factors (buffers, not counted above): {self.frozen_factor_values:,} values")
        return "\n".join(lines)


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Counts of what ``model`` trains: the line PEFT's ``print_trainable_parameters`` prints (the same
    numbers for LoRA), then the trainable values per adapter method, in ``modules_to_save``, and
    elsewhere. ``print(peft_ops.trainable_summary(model))``."""
    per_method: dict[str, list[int]] = {}
    frozen = 0
    for _, layer in adapter_layers(model):
        entry = per_method.setdefault(layer.method.name, [0, 0])
        entry[0] += 1
        entry[1] += sum(p.numel() for p in layer.parameters(recurse=False) if p.requires_grad)
        frozen += sum(getattr(layer, name).numel() for name in layer.method.frozen)
    saved = sum(p.numel() for name in modules_to_save(model)
                for p in model.get_submodule(name).parameters() if p.requires_grad)
    return TrainableSummary(
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total=sum(p.numel() for p in model.parameters()),
        per_method={m: (n, v) for m, (n, v) in per_method.items()},
        modules_to_save=saved,
        other=sum(count for _, count in unsaved_trainable(model)),
        frozen_factor_values=frozen,
        banks=(sum(1 for _ in adapter_banks(model)), len({n for _, b in adapter_banks(model) for n in b.names})),
    )


@dataclass(frozen=True)
class AdapterDescription:
    path: str
    format: str  # "peft-ops" (a save_adapter file) or "peft" (a PEFT adapter directory)
    modules: dict[str, dict] = field(repr=False)  # per module: method, rank, alpha, in/out features, ...
    modules_to_save: list[str]
    trainable_parameters: int  # values stored that train (frozen factors stored beside them excluded)
    tensor_bytes: int
    file_bytes: int

    @property
    def methods(self) -> dict[str, int]:
        """Method -> number of modules."""
        return dict(Counter(entry["method"] for entry in self.modules.values()))

    @property
    def ranks(self) -> dict[int, int]:
        return dict(Counter(entry["rank"] for entry in self.modules.values()))

    def __str__(self) -> str:
        methods = ", ".join(f"{m} ×{n}" for m, n in self.methods.items())
        ranks = ", ".join(f"r={r} ×{n}" for r, n in self.ranks.items())
        return (f"{self.path} ({self.format}): {len(self.modules)} modules ({methods}; {ranks}), "
                f"{self.trainable_parameters:,} trainable values"
                + (f" incl. modules_to_save {self.modules_to_save}" if self.modules_to_save else "")
                + f", {self.tensor_bytes:,} tensor bytes in {self.file_bytes:,} bytes")


def read_adapter_info(path: str | os.PathLike) -> AdapterDescription:
    """Describe an adapter without a model: a ``save_adapter`` file (checked against its checksum; per
    module the method, rank, alpha, shapes, dtype, options and the base-weight fingerprint) or a PEFT
    adapter directory (``adapter_config.json``: LoRA, or LoRA-XS in its authors' layout)."""
    if Path(path).is_dir():
        return _describe_peft(path)
    file = read_adapter_file(path)
    tensors = file.tensors()
    modules = {name: {"method": e.method, "rank": e.rank, "alpha": e.alpha, "dropout": e.dropout,
                      "in_features": e.in_features, "out_features": e.out_features, "dtype": dtype_name(e.dtype),
                      "options": e.options, "base_fingerprint": e.fingerprint.tolist(), "base_bias": e.bias,
                      "tensors": list(e.shapes)}
               for name, e in file.entries.items()}
    stored = [f"{name}.{t}" for name, e in file.entries.items() for t in e.shapes]
    frozen = {f"{name}.{t}" for name, e in file.entries.items() for t in e.shapes if t in get_method(e.method).frozen}
    return AdapterDescription(
        path=file.path, format="peft-ops", modules=modules, modules_to_save=sorted(file.saved_modules),
        trainable_parameters=sum(tensors[k].numel() for k in [*stored, *file.module_tensors()] if k not in frozen),
        tensor_bytes=sum(tensors[k].numel() * tensors[k].element_size() for k in [*stored, *file.module_tensors()]),
        file_bytes=os.path.getsize(file.path))


def _describe_peft(directory) -> AdapterDescription:
    config, tensors = read_peft(directory)
    modules, trainable = {}, 0
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removesuffix(".lora_A.weight")
        b = tensors.get(f"{name}.lora_B.weight")
        latent = latent_key(tensors, name) is not None
        modules[name] = {"method": "loraxs" if latent else "lora", "rank": a.shape[0], "in_features": a.shape[1],
                         "out_features": None if b is None else b.shape[0], "dtype": str(a.dtype).removeprefix("torch.")}
        trainable += a.shape[0] ** 2 if latent else a.numel() + (0 if b is None else b.numel())
    saved = list(config.get("modules_to_save") or [])
    # the task's head, which PEFT saves whole although the config may not say so (PEFT ≤ 0.10)
    saved += [h for h in task_heads(config) if h not in saved
              and any(k.startswith(h + ".") or f".{h}." in k for k in tensors)]
    # LoRA factors, latent mappings, and the frozen copy of a base weight PEFT saves beside an adapted output head
    adapter_keys = {k for k in tensors if ".lora_" in k or k.endswith(LATENT_SUFFIXES) or ".base_layer." in k}
    trainable += sum(t.numel() for k, t in tensors.items() if k not in adapter_keys)
    files = [p for p in Path(directory).iterdir() if p.is_file()]
    return AdapterDescription(
        path=os.fspath(directory), format="peft", modules=modules, modules_to_save=saved,
        trainable_parameters=trainable, tensor_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
        file_bytes=sum(p.stat().st_size for p in files if p.name in ("adapter_config.json", "adapter_model.safetensors",
                                                                     "adapter_model.bin")))
