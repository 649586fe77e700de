"""Tile helpers the kernels share: loading a masked tile, the dot in float32, and tutorial 03's pointer
blocks walked along K."""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["load_tile", "mma", "pointer_block", "k_stride"]


@triton.jit
def load_tile(ptr, rows, cols, stride_row, stride_col, in_rows, in_cols):
    """A [rows × cols] tile, zero outside the tensor."""
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col,
                   mask=in_rows[:, None] & in_cols[None, :], other=0.0)


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` in float32, ``b`` cast to ``a``'s dtype for a native-rate dot. Under the interpreter
    the operands go up to float32: it multiplies bf16 dot operands wrongly (triton#11584)."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    else:
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION)
    return acc


@triton.jit
def pointer_block(ptr, rows, cols, stride_row, stride_col):
    """Pointers to a [rows × cols] tile (tutorial 03's pointer block, advanced along K by the caller)."""
    return ptr + rows[:, None] * stride_row + cols[None, :] * stride_col


@triton.jit
def k_stride(stride, BLOCK_K: tl.constexpr):
    """``BLOCK_K · stride`` in int64: a K-stride may be large (column-major a)."""
    return tl.cast(BLOCK_K, tl.int64) * stride
