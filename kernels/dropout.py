"""Dropout masks regenerated from a seed and the element index, never stored.

Element ``(row, col)`` of a row-major ``n_cols``-wide tensor is kept when the Philox draw for counter
``row * n_cols + col`` (as two 32-bit words, so indices past 2³² stay distinct on every Triton
version) is at least ``threshold = round(p · 2³¹)``. The forward, the backward and
:func:`dropout_mask` all call :func:`keep_mask`, so they agree bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import seed_arg, wrap_triton

__all__ = ["keep_mask", "dropout_mask", "dropout_threshold"]


def dropout_threshold(p: float) -> int:
    return int(round(p * 2**31))


@triton.jit
def keep_mask(seed, rows, cols, n_cols, threshold):
    """Boolean ``[len(rows), len(cols)]`` block: True where the element survives dropout."""
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols.to(tl.int64)[None, :]
    lo = (offsets & 0xFFFFFFFF).to(tl.uint32)
    hi = (offsets >> 32).to(tl.uint32)
    zero = lo * 0
    draw, _, _, _ = tl.philox(seed, lo, hi, zero, zero)
    return (draw >> 1).to(tl.int32) >= threshold


@triton.jit
def _dropout_mask_kernel(out_ptr, n_rows, n_cols, seed_ptr, threshold,
                         BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    keep = keep_mask(tl.load(seed_ptr), rows, cols, n_cols, threshold)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(out_ptr + rows[:, None] * n_cols + cols[None, :], keep.to(tl.int8), mask=inside)


def dropout_mask(seed, n_rows: int, n_cols: int, p: float, device) -> torch.Tensor:
    """The keep-mask (bool, ``n_rows × n_cols``) that the fused kernels use for ``seed`` (an int or a
    0-d tensor) and rate ``p``. For tests and for reproducing a fused dropout elsewhere."""
    out = torch.empty(n_rows, n_cols, dtype=torch.int8, device=device)
    if out.numel():
        grid = (triton.cdiv(n_rows, 32), triton.cdiv(n_cols, 64))
        wrap_triton(_dropout_mask_kernel)[grid](out, n_rows, n_cols, seed_arg(seed, 1.0, out),
                                                dropout_threshold(p), BLOCK_ROWS=32, BLOCK_COLS=64)
    return out.bool()
