"""What an adapter file records to recognise its base model and its frozen factors, and the comparisons
that refuse a file that doesn't belong: a fingerprint of the base weight (its values at fixed positions)
and a signature of the frozen factors that loading regenerates (LoRA-XS's SVD, TLoRA's seeded draws)."""
from __future__ import annotations

import torch
from torch import nn

from .layers import LowRankLinear, logical_weight
from .svd import probe

__all__ = ["FINGERPRINT_RTOL", "full_tensor", "fingerprint", "fingerprint_mismatch", "signature", "signature_rtol",
           "signature_mismatch", "legacy_signature_mismatch"]

FINGERPRINT_RTOL = 1e-2  # a bf16 copy of the same weights passes; another model's weights don't
# Regenerated factors match the saved ones to rounding when the base weight is the same; a base cast to
# another dtype (the fingerprint allows bf16 copies) moves its SVD by about that dtype's precision.
_SIGNATURE_RTOL = 1e-4
_SIGNATURE_EPS_FACTOR = 8


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2/DTensor shard (a collective: every rank must call), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def fingerprint(module: nn.Module, samples: int) -> torch.Tensor:
    """Values of the logical N×K base weight (unmerged; dequantized for a quantized base) at fixed
    pseudo-random positions, float64 on the CPU."""
    w = full_tensor(module.unmerged_weight() if isinstance(module, LowRankLinear) else logical_weight(module)).detach()
    idx = torch.randint(w.numel(), (16,), generator=torch.Generator().manual_seed(0))[:samples]
    k = w.shape[1]
    return w[(idx // k).to(w.device), (idx % k).to(w.device)].double().cpu()


def fingerprint_mismatch(saved: torch.Tensor, module: nn.Module) -> str | None:
    """Why ``module``'s weight is not the one the fingerprint ``saved`` was taken from, or None: every value
    within :data:`FINGERPRINT_RTOL` of the largest saved magnitude."""
    now = fingerprint(module, len(saved))
    scale = max(float(saved.abs().max()) if len(saved) else 0.0, 1e-12)
    worst = float((now - saved).abs().max()) if len(saved) else 0.0
    if not len(saved) or worst > FINGERPRINT_RTOL * scale:
        return (f"the base weight differs from the one the adapter was saved with (fingerprint mismatch: "
                f"{worst / scale:.2g} of its scale, tolerance {FINGERPRINT_RTOL:g}; another base model, or modified "
                f"weights)")
    return None


def _column_statistics(factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column norms (LoRA-XS's singular values) and projections on a fixed probe (sensitive to sign and
    subspace), float64."""
    f = full_tensor(factor).detach().double().cpu()
    return f.norm(dim=0), probe(f.shape[0]) @ f


def _sketch(rank: int, size: int) -> torch.Tensor:
    """A fixed ±1 matrix (size × rank): the signature keeps ``size`` random signed sums of each statistic
    whatever the rank, so a file stays at the size of its tensors."""
    g = torch.Generator().manual_seed(rank)
    return torch.randint(0, 2, (size, rank), generator=g, dtype=torch.int64).double() * 2 - 1


def signature(layer: LowRankLinear, size: int) -> torch.Tensor:
    """(2, 2·size) float64: per factor (up, down), signed sums of its column norms, then of its probe
    projections."""
    up, _, down, _ = layer.factors()
    sketch = _sketch(layer.rank, size)
    rows = []
    for factor in (up, down):
        norms, projections = _column_statistics(factor)
        rows.append(torch.cat([sketch @ norms, sketch @ projections]))
    return torch.stack(rows)


def signature_rtol(saved_dtype: str, dtype: torch.dtype) -> float:
    """The signature tolerance for a base saved in ``saved_dtype`` and loaded in ``dtype``: the coarser
    dtype's precision bounds how far the regenerated factors can move."""
    eps = max(torch.finfo(getattr(torch, saved_dtype, torch.float32)).eps, torch.finfo(dtype).eps)
    return max(_SIGNATURE_RTOL, _SIGNATURE_EPS_FACTOR * eps)


def signature_mismatch(saved: torch.Tensor, layer: LowRankLinear, rtol: float) -> str | None:
    """The first signature value of ``layer`` that differs from ``saved`` beyond ``rtol`` times the sum of
    its factor's column norms (what a perturbation of every column by ``rtol`` of its norm can move it),
    described; or None."""
    size = saved.shape[1] // 2
    now = signature(layer, size)
    up, _, down, _ = layer.factors()
    for row, (role, factor) in enumerate((("up", up), ("down", down))):
        scale = max(float(_column_statistics(factor)[0].sum()), 1e-12)
        for i in range(2 * size):
            x, y = float(saved[row, i]), float(now[row, i])
            if abs(x - y) > rtol * scale:
                quantity = "column norms" if i < size else "probe projections"
                return (f"signed sum {i % size} of the {role} factor's {quantity} is {y:.7g}, the file says {x:.7g} "
                        f"(difference {abs(x - y) / scale:.2g} of the column norms' sum, tolerance {rtol:.2g})")
    return None


def legacy_signature_mismatch(saved: dict, layer: LowRankLinear, rtol: float) -> str | None:
    """:func:`signature_mismatch` for format version 1, which stored every column's statistics: the first
    value that differs beyond ``rtol`` times its column's norm."""
    quantities = ("column norm", "probe projection")
    up, _, down, _ = layer.factors()
    rank = layer.rank
    for role, factor in (("up", up), ("down", down)):
        a, b = saved.get(role, []), torch.cat(_column_statistics(factor)).tolist()
        if len(a) != len(b):
            return f"the {role} factor's signature has {len(a)} values, the regenerated one {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            scale = max(abs(a[i % rank]), 1e-12)
            if abs(x - y) > rtol * scale:
                return (f"{quantities[i // rank]} {i % rank} of the {role} factor is {y:.7g}, the file says "
                        f"{x:.7g} (difference {abs(x - y) / scale:.2g} of the column's norm, tolerance {rtol:.2g})")
    return None
