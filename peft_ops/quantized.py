"""Base layers quantized by bitsandbytes (``Linear4bit``: NF4/FP4, with or without double quantization;
``Linear8bitLt``), seen as what they compute: an N×K weight. Their storage is not that weight (4-bit:
packed uint8 of shape (N·K/2, 1)), so shapes come from the module and values from bitsandbytes'
dequantization, made only when asked for (LoRA-XS's SVD, fingerprints) and never kept.

bitsandbytes stays optional: it is imported only when a model already holds one of its layers (then it
is in ``sys.modules``)."""
from __future__ import annotations

import copy
import sys

import torch
from torch import nn

__all__ = ["is_quantized", "quantized_shape", "quantized_dtype", "dequantize", "prepare_for_adapter", "kernel_weight",
           "compute_dtype"]


def _bnb_classes() -> tuple[type, ...]:
    bnb = sys.modules.get("bitsandbytes")
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt) if bnb is not None else ()


def is_quantized(module: nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit`` or ``Linear8bitLt``."""
    classes = _bnb_classes()
    return bool(classes) and isinstance(module, classes)


def _is_4bit(module: nn.Module) -> bool:
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def quantized_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features): the module's, never the storage's."""
    return int(module.out_features), int(module.in_features)


def quantized_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the weight dequantizes to (the original weight's, for 4-bit; float32 for 8-bit's scales)."""
    state = getattr(module.weight, "quant_state", None)
    if _is_4bit(module) and state is not None:
        # bitsandbytes' CPU packing (see prepare_for_adapter) rounds the block scales to bfloat16 and marks
        # the state with original_dtype, which stays after unpacking: the weight is bfloat16-accurate since
        return torch.bfloat16 if hasattr(state, "original_dtype") else state.dtype
    return torch.float32


def _is_cpu_packed(module: nn.Module) -> bool:
    return bool(getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False))


@torch.no_grad()
def dequantize(module: nn.Module) -> torch.Tensor:
    """A new N×K tensor holding the weight the layer computes with (bitsandbytes' own dequantization)."""
    bnb = sys.modules["bitsandbytes"]
    weight = module.weight
    if _is_4bit(module):
        if getattr(weight, "quant_state", None) is None:
            raise ValueError(f"{type(module).__name__}: the weight is not quantized yet (no quant_state); move the "
                             f"model to its device (bitsandbytes quantizes on .to()) before adding adapters")
        data, state = weight.data, weight.quant_state
        if _is_cpu_packed(module):  # undo the CPU layout on copies: the module keeps its own
            data, state = _unpack_for_cpu()(data.clone(), copy.copy(state))
        return bnb.functional.dequantize_4bit(data, state).reshape(quantized_shape(module))
    scb = getattr(weight, "SCB", None)
    if weight.dtype != torch.int8 or scb is None:
        raise ValueError(f"{type(module).__name__}: the weight is not quantized to int8 (has_fp16_weights=True, or "
                         f"not moved to its device yet); peft-ops adapts 8-bit layers holding int8 weights")
    return weight.data.float() * (scb.float()[:, None] / 127.0)  # row-wise absmax scaling (LLM.int8)


def _unpack_for_cpu():
    # bitsandbytes has no public inverse of its CPU packing; its own save path (Linear4bit's
    # _save_to_state_dict) calls this one
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    return _convert_weight_packed_for_cpu_inverse


@torch.no_grad()
def prepare_for_adapter(module: nn.Module) -> None:
    """Keep a 4-bit layer in bitsandbytes' standard layout. On a CPU with AVX512-BF16, ``Linear4bit.forward``
    in eval mode, without grad, repacks the weight once for a bf16 kernel that has no autograd: from then
    on no gradient flows to its input, even in training mode — silently wrong gradients for every adapter
    below it. So the CPU repacking is turned off for adapted layers, and undone if it already happened."""
    if not _is_4bit(module):
        return
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False
    if _is_cpu_packed(module):
        weight = module.weight
        weight.data, weight.quant_state = _unpack_for_cpu()(weight.data, weight.quant_state)
        if getattr(module, "quant_state", None) is not None:
            module.quant_state = weight.quant_state


def kernel_weight(module: nn.Module):
    """The layer's quantized weight as the kernels read it (a ``peft_ops.kernels.dequant.QuantizedWeight``
    of the module's own tensors, nothing copied or dequantized), or None where they cannot: a 4-bit weight
    in bitsandbytes' CPU layout, or rows that are not whole blocks (in_features not a multiple of the
    blocksize). Its ``dense`` is bitsandbytes' dequantization and, for 4-bit, its ``product`` bitsandbytes'
    ``matmul_4bit`` (QLoRA's base product: the composed implementation's forward)."""
    from .kernels.dequant import QuantizedWeight

    n, k = quantized_shape(module)
    weight = module.weight
    if _is_4bit(module):
        state = getattr(weight, "quant_state", None)
        if state is None or _is_cpu_packed(module) or k % 2 or k % state.blocksize:
            return None
        nested = dict(scale2=state.state2.absmax, code2=state.state2.code, nested_blocksize=state.state2.blocksize,
                      offset=torch.as_tensor(state.offset, dtype=torch.float32, device=weight.device).reshape(1)
                      ) if state.nested else {}
        bnb = sys.modules["bitsandbytes"]
        return QuantizedWeight(state.quant_type, weight.data.view(torch.uint8).reshape(-1), state.absmax, n, k,
                               code=state.code.to(device=weight.device, dtype=torch.float32),
                               blocksize=state.blocksize, dense=lambda: dequantize(module),
                               product=lambda a: bnb.matmul_4bit(a, weight.t(), quant_state=state), **nested)
    scb = getattr(weight, "SCB", None)
    if weight.dtype != torch.int8 or scb is None:
        return None
    return QuantizedWeight("int8", weight.data, scb, n, k, dense=lambda: dequantize(module))


def compute_dtype(module: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype bitsandbytes computes the layer's product in for input ``x`` (``Linear4bit.compute_dtype``
    where set, else x's)."""
    return getattr(module, "compute_dtype", None) or x.dtype
