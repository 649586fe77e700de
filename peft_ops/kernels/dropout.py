"""Dropout masks regenerated from a seed and the element index, never stored.

Element ``(row, col)`` of an ``n_cols``-wide tensor is kept when draw ``col mod 4`` of Philox 4x32-10
at counter ``row · ⌈n_cols / 4⌉ + col // 4`` (as two 32-bit words, so indices past 2³² stay distinct),
shifted right once, is at least ``threshold = round(p · 2³¹)``. One Philox call gives four elements
of a row. The forward, the backward, :func:`dropout_mask` and the PyTorch twin
(``peft_ops.reference_kernels``) all follow this, so they agree bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import LAUNCH_OPTIONS, seed_arg, wrap_triton

__all__ = ["keep_mask", "dropout_mask", "dropout_threshold"]


def dropout_threshold(p: float) -> int:
    return int(round(p * 2**31))


@triton.jit
def keep_mask(seed, rows, col_start, n_cols, threshold, WIDTH: tl.constexpr):
    """Boolean ``[len(rows), WIDTH]`` block for columns ``col_start ... col_start + WIDTH - 1`` (``col_start``
    a multiple of 4): True where the element survives dropout."""
    groups = (n_cols + 3) // 4
    counters = rows.to(tl.int64)[:, None] * groups + (col_start // 4 + tl.arange(0, WIDTH // 4)).to(tl.int64)[None, :]
    lo = (counters & 0xFFFFFFFF).to(tl.uint32)
    hi = (counters >> 32).to(tl.uint32)
    zero = lo * 0
    r0, r1, r2, r3 = tl.philox(seed, lo, hi, zero, zero)
    draws = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))  # column 4j + i ← r_i[j]
    return (draws >> 1).to(tl.int32) >= threshold


@triton.jit
def _dropout_mask_kernel(out_ptr, n_rows, n_cols, seed_ptr, threshold,
                         BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col_start = tl.program_id(1).to(tl.int64) * BLOCK_COLS
    cols = col_start + tl.arange(0, BLOCK_COLS)
    keep = keep_mask(tl.load(seed_ptr), rows, col_start, n_cols, threshold, BLOCK_COLS)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(out_ptr + rows[:, None] * n_cols + cols[None, :], keep.to(tl.int8), mask=inside)


def dropout_mask(seed, n_rows: int, n_cols: int, p: float, device) -> torch.Tensor:
    """The keep-mask (bool, ``n_rows × n_cols``) that the fused kernels use for ``seed`` (an int or a
    0-d tensor) and rate ``p``. For tests and for reproducing a fused dropout elsewhere."""
    out = torch.empty(n_rows, n_cols, dtype=torch.int8, device=device)
    if out.numel():
        grid = (triton.cdiv(n_rows, 32), triton.cdiv(n_cols, 64))
        wrap_triton(_dropout_mask_kernel)[grid](out, n_rows, n_cols, seed_arg(seed, 1.0, out),
                                                dropout_threshold(p), BLOCK_ROWS=32, BLOCK_COLS=64,
                                                **LAUNCH_OPTIONS)
    return out.bool()
