"""Dropout masks regenerated from a seed and the element index, never stored.

Element ``(row, col)`` of an ``n_cols``-wide tensor is kept when 16-bit draw ``col mod 8`` of Philox
4x32-10 at counter ``row · ⌈n_cols / 8⌉ + col // 8`` (as two 32-bit words, so indices past 2³² stay
distinct) is at least ``threshold = round(p · 2¹⁶)``; draw ``2w + h`` is half ``h`` (0: the low 16
bits) of the call's word ``w``. One Philox call gives eight elements of a row: the masks cost half
the instructions of one 32-bit draw per element (a shrink K-step with input dropout was bound by
instruction issue, compiled for sm_90), and p is rounded to a multiple of 2⁻¹⁶ (at most 7.6·10⁻⁶
away). The forward, the backward, :func:`dropout_mask` and the PyTorch twin
(``peft_ops.reference_kernels``) all follow this, so they agree bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import LAUNCH_OPTIONS, seed_arg, wrap_triton

__all__ = ["keep_mask", "dropout_mask", "dropout_threshold"]


def dropout_threshold(p: float) -> int:
    return int(round(p * 2**16))


@triton.jit
def keep_mask(seed, rows, col_start, n_cols, threshold, WIDTH: tl.constexpr):
    """Boolean ``[len(rows), WIDTH]`` block for columns ``col_start ... col_start + WIDTH - 1`` (``col_start``
    a multiple of 8): True where the element survives dropout."""
    groups = (n_cols + 7) // 8
    counters = rows.to(tl.int64)[:, None] * groups + (col_start // 8 + tl.arange(0, WIDTH // 8)).to(tl.int64)[None, :]
    lo = (counters & 0xFFFFFFFF).to(tl.uint32)
    hi = (counters >> 32).to(tl.uint32)
    zero = lo * 0
    r0, r1, r2, r3 = tl.philox(seed, lo, hi, zero, zero)
    words = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))  # column 4j + w ← r_w[j]
    draws = tl.interleave(words & 0xFFFF, words >> 16)  # column 2c + h ← half h of words[:, c]
    return draws.to(tl.int32) >= threshold


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
