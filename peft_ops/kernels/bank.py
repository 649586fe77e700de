"""Kernels for an adapter bank: many adapters of one method on one base layer, one per batch row.

* Shared basis (LoRA-XS, TLoRA: every adapter has the same frozen ``U`` and ``D``, its own r×r core):
  ``t = a D`` once for all rows (:func:`shrink`), then :func:`bank_core` gives ``h_i = t_i C_{a(i)}ᵀ``
  with the core gathered per row, and the fused GEMM adds ``h Uᵀ`` in its epilogue
  (``lowrank_linear(..., t=h)``): the adapters cost one shrink, an M·r² product and the epilogue.
* General (LoRA, SymLoRA: every adapter has its own ``D`` and ``E = s·U C``): rows are grouped into
  segments by adapter, as Punica's SGMV does; :func:`sgmv_shrink` computes ``t = a D`` per segment
  with the segment's ``D``, and :func:`sgmv_expand_add` adds ``t Eᵀ`` into the base output per
  segment. A segment ``j`` is ``order[seg_starts[j]:seg_starts[j + 1]]`` with adapter ``seg_adapters[j]``.

The PyTorch twins, with the same signatures, are in ``peft_ops.bank_kernels``. Inference only: no
backward, no dropout.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import INTERPRET, LAUNCH_OPTIONS, check_rank, dot_precision, rank_block, with_unit_stride
from .tiles import k_stride, load_tile, mma, pointer_block

__all__ = ["bank_core", "sgmv_shrink", "sgmv_expand_add"]

# The launchers' tiles and warps; tests/test_sm90_compile.py compiles these for sm_90 and checks that no
# rank block spills. 16 rows per program: the smallest tl.dot tile (decode segments are often one row).
# At 64 rank columns a float32 shrink with 64-wide K-steps and a 4-warp expand (tf32x3) each took 253
# of 255 registers; 32-wide K-steps and 8 warps leave room (159 and 145 at most).
BANK_CORE_CONFIG = triton.Config({"BLOCK_M": 16}, num_warps=4, num_stages=3)
SGMV_SHRINK_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_K": 32}, num_warps=4, num_stages=4)
SGMV_EXPAND_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=8, num_stages=3)
# the most rank columns the shrink and the expand hold at once: whole float32 tiles at rank 256 (split
# in two for tf32x3) spill, as kernels/lowrank_add.py found
MAX_RANK_STEP = 64
_GRID_AXIS_LIMIT = 65535  # CUDA's limit on grid axes 1 and 2


@triton.jit
def _bank_core_kernel(t_ptr, cores_ptr, rows_ptr, h_ptr, M, R,
                      stride_tm, stride_tr, stride_ca, stride_cj, stride_ck, stride_hm,
                      BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """``h = t C_{a(i)}ᵀ`` for a block of rows, one rank-1 update per k (the core differs per row, so
    there is no shared tile for a tl.dot); rows with ``a(i) < 0`` get zeros."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_R)
    in_m, in_j = offs_m < M, offs_j < R
    adapter = tl.load(rows_ptr + offs_m, mask=in_m, other=-1).to(tl.int64)
    active = in_m & (adapter >= 0)
    core_rows = cores_ptr + adapter[:, None] * stride_ca + offs_j[None, :] * stride_cj
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, R):
        t_k = tl.load(t_ptr + offs_m * stride_tm + k * stride_tr, mask=active, other=0.0)
        c_k = tl.load(core_rows + k * stride_ck, mask=active[:, None] & in_j[None, :], other=0.0)
        h += t_k[:, None] * c_k.to(tl.float32)
    tl.store(h_ptr + offs_m[:, None] * stride_hm + offs_j[None, :], h, mask=in_m[:, None] & in_j[None, :])


@triton.jit
def _segment_rows(order_ptr, starts_ptr, BLOCK_M: tl.constexpr):
    """This program's slots in ``order`` (a block of its segment, axis 1 of the grid), which of them lie
    inside the segment, and the token rows they name."""
    segment = tl.program_id(1)
    end = tl.load(starts_ptr + segment + 1).to(tl.int64)
    slots = tl.load(starts_ptr + segment).to(tl.int64) + tl.program_id(0).to(tl.int64) * BLOCK_M \
        + tl.arange(0, BLOCK_M)
    in_m = slots < end
    return slots, in_m, tl.load(order_ptr + slots, mask=in_m, other=0).to(tl.int64)


@triton.jit
def _sgmv_shrink_kernel(a_ptr, downs_ptr, order_ptr, starts_ptr, adapters_ptr, t_ptr, K, R,
                        stride_am, stride_ak, stride_da, stride_dk, stride_dr, stride_tm,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """``t = a D`` for a block of a segment's rows and the ``BLOCK_R`` rank columns of grid axis 2."""
    slots, in_m, rows = _segment_rows(order_ptr, starts_ptr, BLOCK_M)
    down_ptr = downs_ptr + tl.load(adapters_ptr + tl.program_id(1)).to(tl.int64) * stride_da
    offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_r = offs_r < R
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if tl.max(in_m.to(tl.int32), axis=0) > 0:  # blocks past the segment's end do nothing
        # tutorial 03's loop: only the K edge masked; slots past the segment read row 0 (order's "other"),
        # rank columns past R wrap around (neither is stored)
        ks = tl.arange(0, BLOCK_K).to(tl.int64)
        a_block = pointer_block(a_ptr, rows, ks, stride_am, stride_ak)
        d_block = pointer_block(down_ptr, ks, offs_r % R, stride_dk, stride_dr)
        for k0 in range(0, K, BLOCK_K):
            in_k = ks < K - k0
            a = tl.load(a_block, mask=in_k[None, :], other=0.0)
            # D goes to a's dtype in the dot, not on the host (that would copy the whole bank every call)
            t = mma(a, tl.load(d_block, mask=in_k[:, None], other=0.0), t, UPCAST, PRECISION)
            a_block += k_stride(stride_ak, BLOCK_K)
            d_block += k_stride(stride_dk, BLOCK_K)
        tl.store(t_ptr + slots[:, None] * stride_tm + offs_r[None, :], t, mask=in_m[:, None] & in_r[None, :])


@triton.jit
def _sgmv_expand_kernel(out_ptr, t_ptr, expands_ptr, order_ptr, starts_ptr, adapters_ptr, N, R,
                        stride_om, stride_on, stride_tm, stride_ea, stride_en, stride_er,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_R: tl.constexpr):
    """``out += t Eᵀ`` for a block of a segment's rows and the columns of grid axis 2, the rank walked in
    steps of ``BLOCK_R``."""
    slots, in_m, rows = _segment_rows(order_ptr, starts_ptr, BLOCK_M)
    if tl.max(in_m.to(tl.int32), axis=0) > 0:
        expand_ptr = expands_ptr + tl.load(adapters_ptr + tl.program_id(1)).to(tl.int64) * stride_ea
        offs_n = tl.program_id(2).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_n = offs_n < N
        low_rank = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            in_r = offs_r < R
            t = tl.load(t_ptr + slots[:, None] * stride_tm + offs_r[None, :], mask=in_m[:, None] & in_r[None, :],
                        other=0.0)
            e = load_tile(expand_ptr, offs_r, offs_n, stride_er, stride_en, in_r, in_n).to(tl.float32)
            low_rank = tl.dot(t, e, low_rank, input_precision=PRECISION)
        out_tile = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
        inside = in_m[:, None] & in_n[None, :]
        out = tl.load(out_tile, mask=inside, other=0.0).to(tl.float32) + low_rank
        tl.store(out_tile, out.to(out_ptr.dtype.element_ty), mask=inside)


def _rank_step(rank: int) -> int:
    """The rank columns the shrink and the expand hold at once (their ``BLOCK_R``) for ``rank``."""
    return min(rank_block(rank), MAX_RANK_STEP)


def _segment_grid(config: triton.Config, max_segment_rows: int, seg_adapters: torch.Tensor, blocks: int):
    """Row blocks of the longest segment on axis 0 (the dimension that can grow past 65535), the
    segments on axis 1, ``blocks`` (rank or column blocks) on axis 2."""
    grid = (triton.cdiv(max_segment_rows, config.kwargs["BLOCK_M"]), seg_adapters.shape[0], blocks)
    if max(grid[1:]) > _GRID_AXIS_LIMIT:
        raise ValueError(f"seg_adapters: {grid[1]} segments with {grid[2]} column or rank blocks each; the grid "
                         f"takes at most {_GRID_AXIS_LIMIT} of either")
    return grid


def _launch(kernel, grid, config: triton.Config, *args, **meta) -> None:
    kernel[grid](*args, **meta, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages,
                 **LAUNCH_OPTIONS)


def bank_core(t: torch.Tensor, cores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``h_i = t_i C_{rows[i]}ᵀ`` (M×r, float32) for ``t``: M×r float32, ``cores``: A×r×r, ``rows``: M
    adapter indices (``h_i = 0`` where ``rows[i] < 0``)."""
    m, rank = t.shape
    check_rank(rank)
    h = torch.empty(m, rank, device=t.device, dtype=torch.float32)
    if m:
        _launch(_bank_core_kernel, (triton.cdiv(m, BANK_CORE_CONFIG.kwargs["BLOCK_M"]),), BANK_CORE_CONFIG,
                t, cores, rows, h, m, rank, t.stride(0), t.stride(1), cores.stride(0), cores.stride(1),
                cores.stride(2), h.stride(0), BLOCK_R=rank_block(rank))
    return h


def sgmv_shrink(a: torch.Tensor, downs: torch.Tensor, order: torch.Tensor, seg_starts: torch.Tensor,
                seg_adapters: torch.Tensor, max_segment_rows: int) -> torch.Tensor:
    """``t[j] = a[order[j]] D_{adapter of j's segment}`` (len(order)×r, float32); ``a``: M×K, ``downs``:
    A×K×r (any float dtype: the dot runs in ``a``'s), ``max_segment_rows``: the longest segment (sizes
    the grid without reading the device)."""
    rank = downs.shape[2]
    check_rank(rank)
    t = torch.empty(order.shape[0], rank, device=a.device, dtype=torch.float32)
    a = with_unit_stride(a)
    if downs.stride(1) != 1 and downs.stride(2) != 1:
        downs = downs.contiguous()  # a known order for the dot's operand (see with_unit_stride)
    if order.shape[0]:
        step = _rank_step(rank)
        grid = _segment_grid(SGMV_SHRINK_CONFIG, max_segment_rows, seg_adapters, triton.cdiv(rank, step))
        _launch(_sgmv_shrink_kernel, grid, SGMV_SHRINK_CONFIG,
                a, downs, order, seg_starts, seg_adapters, t, a.shape[1], rank, a.stride(0), a.stride(1),
                downs.stride(0), downs.stride(1), downs.stride(2), t.stride(0), UPCAST=INTERPRET,
                PRECISION=dot_precision(a.dtype), BLOCK_R=step)
    return t


def sgmv_expand_add(out: torch.Tensor, t: torch.Tensor, expands: torch.Tensor, order: torch.Tensor,
                    seg_starts: torch.Tensor, seg_adapters: torch.Tensor, max_segment_rows: int) -> torch.Tensor:
    """``out[order[j]] += t[j] E_{adapter of j's segment}ᵀ`` in place, summed in float32 and rounded
    once to ``out``'s dtype; ``expands``: A×N×r. Returns ``out``."""
    n, rank = out.shape[1], expands.shape[2]
    check_rank(rank)
    if order.shape[0]:
        grid = _segment_grid(SGMV_EXPAND_CONFIG, max_segment_rows, seg_adapters,
                             triton.cdiv(n, SGMV_EXPAND_CONFIG.kwargs["BLOCK_N"]))
        _launch(_sgmv_expand_kernel, grid, SGMV_EXPAND_CONFIG,
                out, t, expands, order, seg_starts, seg_adapters, n, rank, out.stride(0), out.stride(1),
                t.stride(0), expands.stride(0), expands.stride(1), expands.stride(2),
                PRECISION=dot_precision(torch.float32), BLOCK_R=_rank_step(rank))
    return out
