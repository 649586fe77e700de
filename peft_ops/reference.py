"""The oracle: every method in plain PyTorch under autograd, written from the formulas alone. The kernels
and their PyTorch twins (what ``backend="reference"`` runs) are both checked against it.

    y = x Wᵀ + b + s · ((drop(x) D) Cᵀ) Uᵀ          dropout on the adapter input (LoRA, SymLoRA, LoRA-XS)
    y = x Wᵀ + b + drop(s · ((x D) Cᵀ) Uᵀ)          dropout on the adapter output (TLoRA)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["oracle", "adapter_delta", "apply_core", "delta_weight"]


def apply_core(t: torch.Tensor, core: torch.Tensor | None) -> torch.Tensor:
    """``t Cᵀ`` for a full core, ``t ⊙ c`` for a diagonal one, ``t`` for the identity."""
    if core is None:
        return t
    core = core.to(t.dtype)
    return t * core if core.dim() == 1 else t @ core.T


def _dropout(z: torch.Tensor, p: float, keep: torch.Tensor | None) -> torch.Tensor:
    if keep is None:
        return F.dropout(z, p, training=True)
    return z * keep.to(z.dtype) / (1.0 - p)


def oracle(x, weight, bias, up, core, down, scale, *, dropout_p: float = 0.0, dropout_site: str = "input",
           dropout_mask: torch.Tensor | None = None):
    """The layer's output. Factors are cast to the input's dtype, as PEFT does; ``scale`` is a float or
    a 0-d tensor. With ``dropout_p > 0``, ``dropout_mask`` (bool, True = kept, the shape of ``x`` for
    input-side dropout or of the output for output-side dropout) reproduces a given mask."""
    return F.linear(x, weight, bias) + adapter_delta(x, up, core, down, scale, dropout_p=dropout_p,
                                                     dropout_site=dropout_site, dropout_mask=dropout_mask)


def adapter_delta(x, up, core, down, scale, *, dropout_p: float = 0.0, dropout_site: str = "input",
                  dropout_mask: torch.Tensor | None = None, dtype: torch.dtype | None = None):
    """The adapter's term alone, ``s · ((drop(x) D) Cᵀ) Uᵀ`` (or ``drop(s · ((x D) Cᵀ) Uᵀ)`` for
    output-side dropout), computed in ``dtype`` (default: the input's), returned in the input's dtype."""
    dtype = x.dtype if dtype is None else dtype
    a = _dropout(x, dropout_p, dropout_mask) if dropout_p and dropout_site == "input" else x
    h = apply_core(a.to(dtype) @ down.to(dtype), core)
    delta = (h * scale) @ up.to(dtype).T
    if dropout_p and dropout_site == "output":
        delta = _dropout(delta, dropout_p, dropout_mask)
    return delta.to(x.dtype)


def delta_weight(up, core, down, scale, dtype=torch.float32) -> torch.Tensor:
    """``ΔW = s · U C Dᵀ`` (N×K) in ``dtype``."""
    mid = apply_core(up.to(dtype), None if core is None else core.to(dtype).T if core.dim() == 2 else core)
    return (mid @ down.to(dtype).T) * (scale.to(dtype) if torch.is_tensor(scale) else scale)
