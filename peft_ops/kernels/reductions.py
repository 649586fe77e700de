"""Deterministic reductions over M for the adapter gradients: ``out = drop(A)ᵀ B``.

``A`` is M×P (g, x or v), ``B`` M×R (float32, rank-r). The M rows are split into fixed chunks; each
program sums one chunk of one output tile into a float32 partial, and a second pass sums the partials
in a fixed order. No atomics, so gradients are bitwise identical from run to run (the chunking
depends only on the shapes and the GPU's multiprocessor count).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import (INTERPRET, LAUNCH_OPTIONS, dot_precision, multiprocessors, rank_block, seed_arg,
                      with_unit_stride, wrap_triton)
from .dropout import dropout_threshold, keep_mask

__all__ = ["rank_reduce"]

# 16 rows a step: b is float32, so the dot runs as tf32x3 (each operand split into a high and a low part),
# and 64-row a and b tiles spilled registers (compiled for sm_90; tests/test_sm90_compile.py checks)
_BLOCK_M, _BLOCK_P = (32, 32) if INTERPRET else (16, 64)


@triton.jit
def _rank_reduce_kernel(a_ptr, b_ptr, partial_ptr, M, P, R, rows_per_chunk,
                        stride_am, stride_ap, stride_bm, stride_br,
                        seed_ptr, drop_threshold, drop_scale,
                        DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr):
    tiles_r = tl.cdiv(R, BLOCK_R)
    pid_p = tl.program_id(0) // tiles_r
    pid_r = tl.program_id(0) % tiles_r
    chunk = tl.program_id(1)
    offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_p, in_r = offs_p < P, offs_r < R
    start = chunk.to(tl.int64) * rows_per_chunk
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
    for m0 in range(0, rows_per_chunk, BLOCK_M):
        offs_m = start + m0 + tl.arange(0, BLOCK_M)
        in_m = offs_m < M
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_p[None, :] * stride_ap,
                    mask=in_m[:, None] & in_p[None, :], other=0.0).to(tl.float32)
        if DROPOUT:
            a = tl.where(keep_mask(seed, offs_m, pid_p * BLOCK_P, P, drop_threshold, BLOCK_P), a, 0.0)
        b = tl.load(b_ptr + offs_m[:, None] * stride_bm + offs_r[None, :] * stride_br,
                    mask=in_m[:, None] & in_r[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
    if DROPOUT:
        acc = acc * drop_scale
    out = partial_ptr + chunk.to(tl.int64) * P * R + offs_p[:, None] * R + offs_r[None, :]
    tl.store(out, acc, mask=in_p[:, None] & in_r[None, :])


def rank_reduce(a: torch.Tensor, b: torch.Tensor, *, dropout_p: float = 0.0, seed=None) -> torch.Tensor:
    """``drop(a)ᵀ b`` in float32 (P×R), for ``a``: M×P, ``b``: M×R, summed deterministically.
    ``dropout_p`` applies the fused kernels' dropout mask (for ``seed``) to ``a``."""
    m, p = a.shape
    r = b.shape[1]
    block_r = min(rank_block(r), 64)
    tiles = triton.cdiv(p, _BLOCK_P) * triton.cdiv(r, block_r)
    if m == 0:
        return torch.zeros(p, r, device=a.device, dtype=torch.float32)
    # enough chunks to fill the GPU about four times over, but no chunk smaller than one block of rows
    chunks = max(1, min(triton.cdiv(4 * multiprocessors(a.device), tiles), triton.cdiv(m, _BLOCK_M)))
    rows_per_chunk = triton.cdiv(triton.cdiv(m, chunks), _BLOCK_M) * _BLOCK_M
    chunks = triton.cdiv(m, rows_per_chunk)
    partial = torch.empty(chunks, p, r, device=a.device, dtype=torch.float32)
    # b with unit stride along M, the dot's K: tf32 wgmma takes its B operand from shared memory K-major
    # only, and a row-major b (t, M×r) was transposed in registers with its loads taken out of the
    # pipeline (Triton warns; compiled for sm_90). The copy is M×r float32, small beside a (M×P).
    a, b = with_unit_stride(a), b if b.stride(0) == 1 else b.t().contiguous().t()
    wrap_triton(_rank_reduce_kernel)[(tiles, chunks)](
        a, b, partial, m, p, r, rows_per_chunk, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        seed_arg(seed, dropout_p, a), dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
        DROPOUT=dropout_p > 0, UPCAST=INTERPRET, PRECISION=dot_precision(torch.float32),
        BLOCK_M=_BLOCK_M, BLOCK_P=_BLOCK_P, BLOCK_R=block_r, **LAUNCH_OPTIONS)
    return partial.sum(0) if chunks > 1 else partial[0]
