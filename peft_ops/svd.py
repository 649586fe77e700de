"""Top-r SVD of a frozen weight, deterministic for given weights (LoRA-XS's frozen factors).

Computed in float64 on the CPU (the default) or on another device (the weight's GPU): the same weights
give the same factors to within float64 rounding on any machine and device, so an adapter file can
regenerate them instead of storing them (its signature check tolerates rounding). The default is
a seeded randomised SVD (Halko, Martinsson & Tropp 2011) with 10 power iterations and a sketch of
``rank + max(10, rank)`` columns: at least as accurate as the LoRA-XS authors' scikit-learn
``randomized_svd`` (10 power iterations, 10 extra columns) — on flat spectra, where a randomised SVD
is weakest, its top-r subspace is as close to the exact one and it captures as much of the top-r
energy (``tests/test_svd_fidelity.py`` measures both). ``exact=True`` runs LAPACK's full thin SVD.
Signs follow one convention: each left singular vector has a positive projection on a fixed random
probe. (A rule such as "the largest entry is positive" flips when two entries are near-tied, which
rounding the weight to bfloat16 often causes; the projection moves continuously with the weight.)
"""
from __future__ import annotations

import torch

__all__ = ["top_singular_triplets", "probe"]

_POWER_ITERATIONS = 10


def probe(dim: int) -> torch.Tensor:
    """A fixed random unit-variance direction of length ``dim`` / √dim (float64, the same everywhere)."""
    return torch.randn(dim, generator=torch.Generator().manual_seed(dim), dtype=torch.float64) / dim**0.5


def top_singular_triplets(weight: torch.Tensor, rank: int, *, exact: bool = False, seed: int = 0,
                          device: torch.device | str = "cpu"):
    """Return ``(u, sigma, v)`` in float64 on the CPU with ``weight ≈ u diag(sigma) vᵀ``:
    ``u`` is N×rank, ``sigma`` rank (descending), ``v`` K×rank. Computed in float64 on ``device``."""
    w = weight.detach().to(device=device, dtype=torch.float64)
    n, k = w.shape
    sketch = min(n, k, rank + max(10, rank))
    if exact or sketch >= min(n, k):
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    else:
        g = torch.Generator().manual_seed(seed)
        # drawn on the CPU and moved: the same sketch on every device
        omega = torch.randn(k, sketch, generator=g, dtype=torch.float64).to(w.device)
        q = torch.linalg.qr(w @ omega).Q
        for _ in range(_POWER_ITERATIONS):  # sharpen the spectrum; re-orthonormalise each half-step
            q = torch.linalg.qr(w.T @ q).Q
            q = torch.linalg.qr(w @ q).Q
        ub, s, vh = torch.linalg.svd(q.T @ w, full_matrices=False)
        u = q @ ub
    u, s, v = u[:, :rank], s[:rank], vh[:rank].T
    flip = torch.where(probe(n).to(w.device) @ u < 0, -1.0, 1.0).to(torch.float64)
    return (u * flip).contiguous().cpu(), s.contiguous().cpu(), (v * flip).contiguous().cpu()
