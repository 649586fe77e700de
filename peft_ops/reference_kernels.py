"""The fused kernels' contracts implemented with PyTorch ops: what runs behind the custom op on the
CPU (and for ``backend="reference"`` on any device). Same signatures as :mod:`peft_ops.kernels`, same
float32 intermediates, and the same dropout masks bit for bit: Triton's Philox 4x32-10 written with
int64 tensor arithmetic.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dropout_mask", "lowrank_linear", "shrink", "rank_reduce", "add_lowrank_"]

_LOW32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def _mul_hi_lo(a: int, b: torch.Tensor):
    """High and low 32 bits of ``a · b`` for a 32-bit constant and int64 tensors holding uint32 values,
    without overflowing int64 (b is split into 16-bit halves)."""
    p_hi, p_lo = a * (b >> 16), a * (b & 0xFFFF)  # each < 2⁴⁸
    return (p_hi + (p_lo >> 16)) >> 16, (((p_hi & 0xFFFF) << 16) + p_lo) & _LOW32


def _philox(seed, counters: torch.Tensor):
    """Philox 4x32-10 on counters ``(counter mod 2³², counter >> 32, 0, 0)`` with key ``seed``: 4 words."""
    seed = torch.as_tensor(seed, dtype=torch.int64, device=counters.device)
    c0, c1 = counters & _LOW32, counters >> 32
    c2 = c3 = torch.zeros_like(counters)
    k0, k1 = seed & _LOW32, (seed >> 32) & _LOW32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _LOW32, (k1 + _KEY_B) & _LOW32
    return c0, c1, c2, c3


def dropout_mask(seed, n_rows: int, n_cols: int, p: float, device, first_row: int = 0) -> torch.Tensor:
    """The kernels' keep-mask (bool) for rows ``first_row ... first_row + n_rows - 1`` of an
    ``n_cols``-wide tensor: 16-bit draw ``col mod 8`` of Philox at counter ``row · ⌈n_cols / 8⌉ + col // 8``
    (half ``h`` of word ``w`` for draw ``2w + h``), at least ``round(p · 2¹⁶)``. Built a block of rows at a
    time to bound memory."""
    groups = (n_cols + 7) // 8
    threshold = int(round(p * 2**16))
    blocks = []
    step = max(1, 2**22 // max(groups, 1))
    for start in range(first_row, first_row + n_rows, step):
        rows = torch.arange(start, min(start + step, first_row + n_rows), device=device)
        counters = rows[:, None] * groups + torch.arange(groups, device=device)[None, :]
        words = torch.stack(_philox(seed, counters), dim=-1).reshape(len(rows), 4 * groups)
        draws = torch.stack([words & 0xFFFF, words >> 16], dim=-1).reshape(len(rows), 8 * groups)[:, :n_cols]
        blocks.append(draws >= threshold)
    return torch.cat(blocks) if blocks else torch.zeros(0, n_cols, dtype=torch.bool, device=device)


def _dropped(a: torch.Tensor, p: float, seed) -> torch.Tensor:
    """``a`` with the kernels' dropout applied (float32 or wider), ``a`` upcast if p = 0."""
    acc = torch.promote_types(a.dtype, torch.float32)
    if not p:
        return a.to(acc)
    keep = dropout_mask(seed, a.shape[0], a.shape[1], p, a.device)
    return torch.where(keep, a.to(acc) / (1.0 - p), 0.0)


def shrink(a, down, *, dropout_p: float = 0.0, seed=None, config=None) -> torch.Tensor:
    """``t = drop(a) D`` in float32 (float64 for float64 inputs)."""
    t = _dropped(a, dropout_p, seed)
    return t @ down.to(t.dtype)


def lowrank_linear(a, weight, bias, down, expand, scale: float = 1.0, *, dropout_p: float = 0.0,
                   dropout_site: str = "input", seed=None, store_t: bool = False, shrink_in_loop=None,
                   config=None, t=None):
    """``out = a Wᵀ + bias + scale · drop_out((drop_in(a) D) Eᵀ)``, returns ``(out, t or None)``; a given
    ``t`` replaces ``drop_in(a) D``."""
    if shrink_in_loop and dropout_p > 0 and dropout_site == "input":
        raise ValueError("shrink_in_loop=True: input-side dropout is applied by the shrink kernel only; "
                         "pass shrink_in_loop=None or False")
    if t is None:
        t = shrink(a, down, dropout_p=dropout_p if dropout_site == "input" else 0.0, seed=seed)
    low_rank = _low_rank_term(t, expand, scale, dropout_p if dropout_site == "output" else 0.0, seed)
    # like the kernels: accumulate in float32 and round once (a float16 base rounded on its own could
    # overflow where the full sum does not)
    acc = t.dtype
    out = (F.linear(a.to(acc), weight.to(acc), None if bias is None else bias.to(acc)) + low_rank).to(a.dtype)
    return out, (t if store_t else None)


def _low_rank_term(t, expand, scale, dropout_p, seed):
    """``scale · drop(t Eᵀ)`` with the kernels' output-side mask (element (row, col) of the M×N result)."""
    low_rank = (t @ expand.to(t.dtype).T) * scale
    if dropout_p:
        keep = dropout_mask(seed, *low_rank.shape, dropout_p, t.device)
        low_rank = torch.where(keep, low_rank / (1.0 - dropout_p), 0.0)
    return low_rank


def add_lowrank_(out, t, expand, scale: float = 1.0, *, base=None, bias=None, dropout_p: float = 0.0, seed=None):
    """``out = base + bias + scale · drop(t Eᵀ)`` (the output-side mask; ``base`` defaults to ``out``),
    summed in float32 (float64 for a float64 ``t``) and rounded once to ``out``'s dtype; returns ``out``."""
    if out.numel():
        acc = torch.promote_types(t.dtype, torch.float32)
        total = (out if base is None else base).to(acc) + _low_rank_term(t.to(acc), expand, scale, dropout_p, seed)
        out.copy_(total if bias is None else total + bias.to(acc))
    return out


def rank_reduce(a, b, *, dropout_p: float = 0.0, seed=None) -> torch.Tensor:
    """``drop(a)ᵀ b`` in float32 (float64 for float64 inputs)."""
    a = _dropped(a, dropout_p, seed)
    return a.T @ b.to(a.dtype)
