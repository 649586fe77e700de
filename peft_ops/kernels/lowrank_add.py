"""The rank-r term added to an existing output: ``out = base + bias + scale · drop(t Eᵀ)``, in place
when ``base`` is ``out``.

For the composition of a cuBLAS GEMM with the low-rank adapter: ``base`` is cuBLAS's M×N result (float32
for 16-bit inputs, so that the whole sum is rounded once, as in the fused kernel), ``t`` (M×r, float32)
the shrink, ``E`` (N×r) the expand factor. Each tile of ``base`` is read once and of ``out`` written once;
the rank-r dot runs on float32 operands and the sum is rounded once to ``out``'s dtype. Output-side
dropout drops element ``(row, col)`` of the M×N output with the same Philox mask as the fused kernel's
(:func:`keep_mask` at ``(row, col)``), so ``F.linear(a, W, b)`` followed by :func:`add_lowrank_` drops
exactly the elements that ``lowrank_linear(..., dropout_site="output")`` drops.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import LAUNCH_OPTIONS, MAX_RANK, dot_precision, rank_block, seed_arg, with_unit_stride, wrap_triton
from .dropout import dropout_threshold, keep_mask

__all__ = ["add_lowrank_", "ADD_LOWRANK_CONFIG"]

_GRID_AXIS_LIMIT = 65535  # CUDA's limit on grid axes 1 and 2


@triton.jit
def _add_lowrank_kernel(out_ptr, base_ptr, bias_ptr, t_ptr, expand_ptr, M, N, R,
                        stride_om, stride_on, stride_bm, stride_bn, stride_bias, stride_tm, stride_tr, stride_en,
                        stride_er, scale, seed_ptr, drop_threshold, drop_scale,
                        HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    # row blocks on axis 0: M (tokens) is the dimension that can pass axis 1's 65535 blocks
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_start = tl.program_id(1).to(tl.int64) * BLOCK_N
    offs_n = col_start + tl.arange(0, BLOCK_N)
    in_m, in_n = offs_m < M, offs_n < N
    # the rank in steps of at most 64: whole float32 t and E tiles at rank 256 (split in two for tf32x3)
    # would not fit in registers
    RANK_STEP: tl.constexpr = min(BLOCK_R, 64)
    low_rank = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, RANK_STEP):
        offs_r = r0 + tl.arange(0, RANK_STEP)
        in_r = offs_r < R
        t = tl.load(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr,
                    mask=in_m[:, None] & in_r[None, :], other=0.0)
        e = tl.load(expand_ptr + offs_r[:, None] * stride_er + offs_n[None, :] * stride_en,
                    mask=in_r[:, None] & in_n[None, :], other=0.0).to(tl.float32)
        low_rank = tl.dot(t, e, low_rank, input_precision=PRECISION)
    low_rank *= scale
    if DROPOUT:  # the fused kernel's output-side mask, element for element
        keep = keep_mask(tl.load(seed_ptr), offs_m, col_start, N, drop_threshold, BLOCK_N)
        low_rank = tl.where(keep, low_rank * drop_scale, 0.0)
    if HAS_BIAS:
        low_rank += tl.load(bias_ptr + offs_n * stride_bias, mask=in_n, other=0.0).to(tl.float32)[None, :]
    inside = in_m[:, None] & in_n[None, :]
    base = tl.load(base_ptr + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn, mask=inside, other=0.0)
    out = base.to(tl.float32) + low_rank
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, out.to(out_ptr.dtype.element_ty),
             mask=inside)


# 64×64 tiles over 8 warps: no spills at any rank and dtype, and no ptxas serialization advisory
# (tests/test_sm90_compile.py checks); the output tile is a multiple of 8 columns, as the mask needs
ADD_LOWRANK_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=1)


def add_lowrank_(out: torch.Tensor, t: torch.Tensor, expand: torch.Tensor, scale: float = 1.0, *,
                 base: torch.Tensor | None = None, bias: torch.Tensor | None = None, dropout_p: float = 0.0,
                 seed=None) -> torch.Tensor:
    """``out = base + bias + scale · drop(t Eᵀ)`` (``base`` defaults to ``out``: in place); returns ``out``.

    ``out``: M×N (float32, float16 or bfloat16, any strides), ``base``: M×N of those dtypes (may be
    ``out`` itself), ``bias``: N values, ``t``: M×r float32, ``expand``: N×r (any float dtype, any
    strides), r from 1 to 256. The sum is float32, rounded once to ``out``'s dtype.
    With ``dropout_p`` > 0, element ``(row, col)`` is kept (and scaled by 1/(1 − p)) where
    ``dropout_mask(seed, M, N, p)`` is True; ``seed``: an int or a 0-d int64 tensor (read on the device)."""
    if out.dim() != 2 or out.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"out: expected a 2-D float32, float16 or bfloat16 tensor, got {out.dtype} "
                         f"{tuple(out.shape)}")
    m, n = out.shape
    base = out if base is None else base
    if base.shape != out.shape or base.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"base: expected a float32, float16 or bfloat16 tensor of shape {(m, n)}, got {base.dtype} "
                         f"{tuple(base.shape)}")
    if bias is not None and (bias.shape != (n,) or not bias.is_floating_point()):
        raise ValueError(f"bias: expected a float tensor of shape {(n,)}, got {bias.dtype} {tuple(bias.shape)}")
    if t.dim() != 2 or t.shape[0] != m or t.dtype != torch.float32:
        raise ValueError(f"t: expected float32 of shape ({m}, r), got {t.dtype} {tuple(t.shape)}")
    rank = t.shape[1]
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"t: rank {rank}, expected 1 to {MAX_RANK}")
    if expand.dim() != 2 or tuple(expand.shape) != (n, rank) or not expand.is_floating_point():
        raise ValueError(f"expand: expected a float tensor of shape {(n, rank)}, got {expand.dtype} "
                         f"{tuple(expand.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected 0 <= p < 1, got {dropout_p}")
    if m == 0 or n == 0:
        return out
    t, expand = with_unit_stride(t), with_unit_stride(expand)  # the dot's operands (out and base: any strides)
    config = ADD_LOWRANK_CONFIG
    grid = (triton.cdiv(m, config.kwargs["BLOCK_M"]), triton.cdiv(n, config.kwargs["BLOCK_N"]))
    if grid[1] > _GRID_AXIS_LIMIT:
        raise ValueError(f"out: {n} columns need {grid[1]} column blocks, more than the grid's {_GRID_AXIS_LIMIT}")
    wrap_triton(_add_lowrank_kernel)[grid](
        out, base, out if bias is None else bias, t, expand, m, n, rank,
        out.stride(0), out.stride(1), base.stride(0), base.stride(1), 0 if bias is None else bias.stride(0),
        t.stride(0), t.stride(1), expand.stride(0), expand.stride(1),
        float(scale), seed_arg(seed, dropout_p, out), dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
        HAS_BIAS=bias is not None, DROPOUT=dropout_p > 0, PRECISION=dot_precision(out.dtype), BLOCK_R=rank_block(rank),
        **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages, **LAUNCH_OPTIONS)
    return out
