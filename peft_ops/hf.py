"""Hugging Face transformers: saving a model that has adapters, and adapter-only Trainer checkpoints.

An injected model's ``state_dict`` names each adapted layer's weight ``<name>.base_layer.weight``
(beside the adapter's tensors); ``from_pretrained`` of the plain architecture would not find
``<name>.weight`` and would initialise those layers randomly. So every load that adds adapters
puts a guard on a transformers model's ``save_pretrained`` (:func:`peft_ops.model.guard_save_pretrained`): it saves as before (the checkpoint
reloads into a model with the same adapters, as the Trainer resumes) but warns, once per model,
with the two ways to a checkpoint that reloads anywhere: :func:`save_pretrained_merged` (or
``peft_ops.unload(model, merge=True)`` then ``save_pretrained``), or ``peft_ops.save_adapter``.
Nothing here imports transformers until it is used.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .layers import is_conv1d
from .model import adapter_banks, adapter_layers
from .save import check_savable, save_adapter

__all__ = ["merged_state_dict", "save_pretrained_merged", "AdapterCheckpointCallback"]

ADAPTER_FILENAME = "adapter.safetensors"
_MODEL_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                       "pytorch_model.bin.index.json")


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` as the plain model would have it: each adapter layer's entries
    replaced by ``<name>.weight`` = W + ΔW (summed in float32, in the weight's dtype) and
    ``<name>.bias``; an adapter bank's by its base layer's own (a bank's many adapters have no one ΔW:
    save them with ``save_adapter``). The model is not changed."""
    layers, banks = dict(adapter_layers(model)), dict(adapter_banks(model))
    quantized = sorted(n for n, layer in layers.items() if layer.quantized)
    if quantized:
        raise ValueError(f"merged_state_dict: the adapters on {quantized[:4]} have quantized base layers, whose W + ΔW "
                         f"would have to be quantized again (lossy); save the adapter (save_adapter, export_peft) "
                         f"and merge into the unquantized original model")
    state = {}
    for key, value in model.state_dict().items():
        bank = next((n for n in banks if key.startswith(n + ".base_layer.")), None)
        if bank is not None:
            state[f"{bank}.{key.removeprefix(bank + '.base_layer.')}"] = value
            continue
        owner = next((n for n in layers if key.startswith(n + ".")), None)
        if owner is None:
            state[key] = value
            continue
        if key.removeprefix(owner + ".") != "base_layer.weight":
            if key.removeprefix(owner + ".") == "base_layer.bias":
                state[f"{owner}.bias"] = value
            continue
        layer = layers[owner]
        delta = layer.delta_weight()  # the state dict's weight is the unmerged one, even if the layer is merged
        weight = (value.to(delta.dtype) + (delta.T if is_conv1d(layer.base_layer) else delta)).to(value.dtype)
        state[f"{owner}.weight"] = weight
    return state


def save_pretrained_merged(model: nn.Module, save_directory: str | os.PathLike, **kwargs) -> None:
    """``model.save_pretrained`` of the model with its adapters folded in, without changing the model:
    ``from_pretrained`` of the plain architecture reloads it (the adapters themselves are not kept:
    save them with ``peft_ops.save_adapter``)."""
    type(model).save_pretrained(model, save_directory, state_dict=merged_state_dict(model), **kwargs)


def _remove_model_weights(checkpoint: Path) -> None:
    if checkpoint.is_dir():  # the Trainer may have rotated it away (save_total_limit)
        for path in checkpoint.iterdir():
            sharded = path.name.startswith("model-") and path.name.endswith(".safetensors")
            if path.name in _MODEL_WEIGHT_FILES or sharded:
                path.unlink()


class _AdapterCheckpointSaving:
    """A ``transformers.Trainer`` callback: at each checkpoint, write the adapter file
    (``checkpoint-<step>/adapter.safetensors``, with ``modules_to_save``) and, with
    ``remove_model_weights=True`` (the default), delete the full model weights the Trainer wrote
    there, so a checkpoint costs the adapter's size. With the Trainer's ``load_best_model_at_end=True``
    the best checkpoint keeps its weights (the Trainer reloads the best model from them at the end; the
    other checkpoints lose theirs, the previous best's included). To resume: inject as before,
    ``peft_ops.load_adapter(model, ".../checkpoint-N/adapter.safetensors")``, then train (the
    Trainer's own ``resume_from_checkpoint`` needs the full weights: keep them for it).

    The model is checked when training begins, before any step: a model without adapters, or with
    trainable parameters an adapter file would lose, is a ``ValueError`` (see ``save_adapter``).

        trainer = Trainer(model, args, train_dataset=ds, callbacks=[peft_ops.hf.AdapterCheckpointCallback()])
    """

    def __init__(self, filename: str = ADAPTER_FILENAME, *, remove_model_weights: bool = True,
                 include_frozen: bool = False):
        self.filename, self.remove_model_weights, self.include_frozen = filename, remove_model_weights, include_frozen
        self._kept_weights: Path | None = None  # the best checkpoint so far, kept whole for load_best_model_at_end

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # here, not at the first checkpoint: a model whose adapters cannot be saved costs no training
        if model is None:
            raise ValueError("AdapterCheckpointCallback: the Trainer passed no model")
        try:
            check_savable(model)
        except ValueError as e:
            raise ValueError(f"AdapterCheckpointCallback: {e}") from None
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("AdapterCheckpointCallback.on_save: the Trainer passed no model")
        checkpoint = Path(os.path.abspath(args.output_dir)) / f"checkpoint-{state.global_step}"
        checkpoint.mkdir(parents=True, exist_ok=True)
        if state.is_world_process_zero:
            save_adapter(model, checkpoint / self.filename, include_frozen=self.include_frozen)
            if self.remove_model_weights:
                best = state.best_model_checkpoint if args.load_best_model_at_end else None
                best = Path(os.path.abspath(best)) if best else None
                for folder in {checkpoint, self._kept_weights} - {None, best}:
                    _remove_model_weights(folder)
                self._kept_weights = best
        return control


def __getattr__(name: str):
    # the callback subclasses transformers.TrainerCallback: built on first use, so importing peft_ops
    # does not import transformers
    if name == "AdapterCheckpointCallback":
        from transformers import TrainerCallback

        cls = type("AdapterCheckpointCallback", (_AdapterCheckpointSaving, TrainerCallback),
                   {"__doc__": _AdapterCheckpointSaving.__doc__, "__module__": __name__})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
