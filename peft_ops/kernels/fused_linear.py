"""The fused low-rank linear: one tiled GEMM that adds the rank-r term to its tile.

    out = a Wᵀ + bias + scale · drop_out( t Eᵀ ),     t = drop_in(a) D        (t: M×r, float32)

``a`` is M×K, ``W`` N×K, ``D`` K×r (the shrink factor), ``E`` N×r (the expand factor). Every method
reaches this form by folding its core into the expand factor on the host: ``s·((x D) Cᵀ) Uᵀ`` equals
``s·(x D)(U C)ᵀ``, and ``U C`` is an N×r product (N·r² FLOPs), so the kernel never holds an r×r core.
The backward's ``dx = g W + s·(g U)(D Cᵀ)ᵀ`` is the same kernel with ``a = g``, ``W → Wᵀ``, ``D → U``,
``E → D Cᵀ`` and the dropout side swapped.

``t`` comes either from the GEMM's own K-loop (one more ``tl.dot`` on the ``a`` tile already loaded;
no second read of ``a``, but repeated for every N-block: cheap when M is small) or from a separate
shrink kernel run first (reads ``a`` once more; the GEMM then only loads ``t``). The launcher picks.
Input-side dropout is always the shrink kernel's: its mask generated in the GEMM's K-loop serialized
the wgmma pipeline (ptxas C7511, compiled for sm_90, at every tile tried), and re-reading ``a`` costs
little at the small M where the in-loop shrink pays.
The M×N output is written once; rank-r intermediates and all accumulation are float32.

Two ways to move the GEMM's operands (``path``), one kernel:

* ``"tma"``: device-side tensor descriptors (``tl.make_tensor_descriptor``; Hopper's TMA unit) load
  the ``a`` and ``W`` tiles and store the output; out-of-bounds parts of a tile load as zeros and are
  clipped on store, so ragged M, N, K need no masks. A persistent grid (about one program per
  multiprocessor) walks the tiles in grouped order. With a given t each tile's K-loop is software-
  pipelined on its own (its loads start ``num_stages - 1`` steps ahead; the next tile's loads start
  after this tile's epilogue): flattening the tile loop with the K-loop disabled Triton's pipeliner
  there (see the kernel). Without one (``linear``, the in-loop shrink) the two loops are flattened
  into one, tutorial 09's form, and the next tile's loads are issued before this tile's epilogue
  (the compiled-code gate checks both forms against tutorial 09). Needs unit stride along K for ``a``, unit
  stride along K or N for ``W`` (the backward's transposed ``Wᵀ`` view is described as the K×N tensor
  it is), 16-byte aligned bases and row strides.
* ``"pointer"``: pointer loads, one program per tile, any GPU: tutorial 03's K-loop (pointer blocks
  advanced by ``BLOCK_K``, only the K edge masked; rows and columns past the tensor wrap around and
  are computed but never stored). Any strides: an operand without a unit stride is copied first
  (``with_unit_stride``), so that Triton knows each tile's order and pipelines its loads (cp.async).

Where the rank-r term is added: with t given (the shrink kernel's), at the tile's start, as the
accumulator's first value (``scale · drop_out(t Eᵀ)``, in rank steps), and the K-loop adds ``a Wᵀ``
to it. In the epilogue, its dot (a second wgmma accumulator beside the main one) made ptxas
serialize every wgmma of the loop (C7511, flattened; C7515 nested), and accumulating into a part of the main
accumulator serialized the main loop's wgmma without bias. With the in-loop shrink t exists only
after the K-loop, so the epilogue adds it (its tiles are at most 32 rows: mma.sync). Both paths
run the epilogue in sub-tiles of ``EPILOGUE_N`` columns (that rank-r dot and its dropout mask, the
bias and the store per sub-tile).

At M ≤ 16 (decoding) the work is reading W: tiles are 16 rows by 32–64 columns, and the K range may
be split (``split_k``) so that N = 1024 still gives every multiprocessor a program. Each split
writes a float32 partial sum (its part of ``a Wᵀ`` and of the rank-r term, which is linear in t;
split 0 adds the bias) and ``_sum_splits_kernel`` adds the splits in a fixed order: deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import (INTERPRET, LAUNCH_OPTIONS, MAX_RANK, autotuned, check_rank, dot_precision, multiprocessors,
                      rank_block, seed_arg, with_unit_stride, wrap_triton)
from .dequant import QuantizedWeight, decodable_configs, decode_shared_bytes, decoded_tile
from .dropout import dropout_threshold, keep_mask
from .tiles import k_stride, load_tile, mma, pointer_block

__all__ = ["lowrank_linear", "linear", "shrink", "MAX_RANK", "GEMM_PATHS", "GEMM_CONFIGS", "TMA_GEMM_CONFIGS",
           "DECODE_GEMM_CONFIGS", "SHRINK_CONFIGS", "SHARED_MEMORY", "shared_memory_bytes", "fitting_configs"]

GEMM_PATHS = ("tma", "pointer")
_LOOP_SHRINK_MAX_M = 64  # heuristic until measured on a GPU: at most this many rows, shrink in the K-loop
_LOOP_SHRINK_MAX_RANK = 64  # the in-loop accumulator is BLOCK_M × BLOCK_R float32 registers
# At BLOCK_M = 16 the four warps split a dot's columns, 8 each at least: the in-loop shrink's 16×16 dot
# at BLOCK_R = 16 was computed twice over (84 HMMA per K-loop body for 16×64×128 tiles, compiled for
# sm_90; 20 for 16×32×128 at BLOCK_R = 32). The launcher pads BLOCK_R to this for the in-loop shrink;
# padded columns of D load as zeros.
_LOOP_SHRINK_MIN_BLOCK_R = 32
_DECODE_MAX_M = 16
_DECODE_BLOCK_N = 32  # the decode configs' narrowest N-block (the split rule counts programs with it)
_SHRINK_SPLIT_COLUMNS, _SHRINK_MAX_SPLITS = 512, 16  # the shrink kernel's K-splits: see _shrink_splits
_SHRINK_BLOCK_M = 32  # the shrink's usual block of rows, for counting its programs
# ranks per step of the rank-r term of a given t (see rank_step_size); constexpr: the kernel reads them
_RANK_STEP, _TF32X3_RANK_STEP = tl.constexpr(64), tl.constexpr(32)


@triton.jit
def _shrink_step(t, a, down, offs_m, k0, K, seed, drop_threshold, DROPOUT_INPUT: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr):
    """One K-step of ``t += drop(a) D`` for the ``a`` tile at rows ``offs_m``, columns from ``k0``, and its
    ``down`` (D) tile."""
    if DROPOUT_INPUT:
        a = tl.where(keep_mask(seed, offs_m, k0, K, drop_threshold, a.shape[1]), a, 0.0)
    return mma(a, down, t, UPCAST, PRECISION)


@triton.jit
def _quantized_w_tile(w_ptr, scale_ptr, code_ptr, scale2_ptr, code2_ptr, offset_ptr, offs_k, in_k, k0, offs_n, in_n,
                      n0, N, K, W_TRANSPOSED: tl.constexpr, W_FORMAT: tl.constexpr, QUANT_BLOCK: tl.constexpr,
                      NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr, PTX_LOOKUP: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The BLOCK_K × BLOCK_N tile of a quantized W, decoded (float32): the stored N×K weight's rows
    ``offs_n`` and columns from ``k0``, transposed; with ``W_TRANSPOSED`` (dx: the kernel's W is the stored
    weight's transpose) its rows ``offs_k`` and columns from ``n0`` as they are."""
    if W_TRANSPOSED:
        return decoded_tile(w_ptr, scale_ptr, code_ptr, scale2_ptr, code2_ptr, offset_ptr, offs_k, in_k, n0, N,
                            BLOCK_N, W_FORMAT, QUANT_BLOCK, NESTED, NESTED_BLOCK, PTX_LOOKUP)
    else:
        return decoded_tile(w_ptr, scale_ptr, code_ptr, scale2_ptr, code2_ptr, offset_ptr, offs_n, in_n, k0, K,
                            BLOCK_K, W_FORMAT, QUANT_BLOCK, NESTED, NESTED_BLOCK, PTX_LOOKUP).T


@triton.jit
def _halves(x):
    """The left and right halves of ``x``'s columns."""
    return tl.split(tl.permute(tl.reshape(x, (x.shape[0], 2, x.shape[1] // 2)), (0, 2, 1)))


@triton.jit
def _tile_position(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row-blocks sweep the columns together so W tiles are reused from L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    tiles_per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_pid_m = (tile // tiles_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + (tile % tiles_per_group) % group_rows, (tile % tiles_per_group) // group_rows


@triton.jit
def _given_t_term(m0, n0, t_ptr, stride_tm, stride_ts, t_rows, t_scale, R, N, expand_ptr, stride_en, stride_er,
                  bias_ptr, stride_b, bias_cols, seed, drop_threshold, HAS_BIAS: tl.constexpr,
                  OUTPUT_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, T_SPLITS: tl.constexpr):
    """``t_scale · drop_out(t Eᵀ)`` plus the bias (its first ``bias_cols`` columns) for the tile at rows
    ``m0 ...``, columns ``n0 ...`` (float32), t read from ``t_ptr`` (rows where ``t_rows``) in rank steps
    of ``rank_step_size`` (one step without a loop where it covers BLOCK_R, so that the tile loop still
    fuses with the K-loop). ``T_SPLITS`` > 1: t is the sum of that many partial sums (the split
    shrink's, ``stride_ts`` apart), added in order. The bias is added last (after the output dropout's
    mask), still before the K-loop: its loads are not left to the epilogue."""
    RANK_STEP: tl.constexpr = min(BLOCK_R, _TF32X3_RANK_STEP if PRECISION == "tf32x3" else _RANK_STEP)
    offs_m = m0.to(tl.int64) + tl.arange(0, BLOCK_M)
    offs_n = n0.to(tl.int64) + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    term = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if BLOCK_R <= RANK_STEP:
        term = _add_rank_step(term, 0, t_ptr, offs_m, stride_tm, stride_ts, t_rows, t_scale, R, expand_ptr, offs_n,
                              in_n, stride_en, stride_er, PRECISION, RANK_STEP, T_SPLITS)
    else:
        for r0 in tl.range(0, R, RANK_STEP, num_stages=1):  # unpipelined: stages of t and E tiles spilled
            term = _add_rank_step(term, r0, t_ptr, offs_m, stride_tm, stride_ts, t_rows, t_scale, R, expand_ptr,
                                  offs_n, in_n, stride_en, stride_er, PRECISION, RANK_STEP, T_SPLITS)
    if OUTPUT_DROPOUT:
        term = tl.where(keep_mask(seed, offs_m, n0, N, drop_threshold, BLOCK_N), term, 0.0)
    if HAS_BIAS:
        term += tl.load(bias_ptr + offs_n * stride_b, mask=offs_n < bias_cols, other=0.0).to(tl.float32)[None, :]
    return term


@triton.jit
def _add_rank_step(term, r0, t_ptr, offs_m, stride_tm, stride_ts, t_rows, t_scale, R, expand_ptr, offs_n, in_n,
                   stride_en, stride_er, PRECISION: tl.constexpr, RANK_STEP: tl.constexpr, T_SPLITS: tl.constexpr):
    """``term + t_scale · t[:, r0 : r0 + RANK_STEP] E[:, r0 : r0 + RANK_STEP]ᵀ`` for the tile's rows and columns
    (t: the sum of ``T_SPLITS`` partial sums, in order)."""
    offs_r = r0 + tl.arange(0, RANK_STEP)
    in_r = offs_r < R
    t_step = load_tile(t_ptr, offs_m, offs_r, stride_tm, 1, t_rows, in_r)
    for s in tl.static_range(1, T_SPLITS):
        t_step += load_tile(t_ptr + s * stride_ts, offs_m, offs_r, stride_tm, 1, t_rows, in_r)
    t_step = t_step * t_scale
    e = load_tile(expand_ptr, offs_r, offs_n, stride_er, stride_en, in_r, in_n).to(tl.float32)
    return tl.dot(t_step, e, term, input_precision=PRECISION)


@triton.jit
def _epilogue_part(acc, m0, n0, t, R, M, N, expand_ptr, stride_en, stride_er, bias_ptr, stride_b, out, stride_om,
                   stride_on, bias_cols, seed, drop_threshold, ADD_LOW_RANK: tl.constexpr, HAS_BIAS: tl.constexpr,
                   OUTPUT_DROPOUT: tl.constexpr, DESCRIPTOR_STORE: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_R: tl.constexpr):
    """Columns ``n0 ...`` of the output tile at rows ``m0 ...``: ``acc`` (float32, BLOCK_M × EPILOGUE_N),
    plus, if ``ADD_LOW_RANK``, the rank-r term of ``t`` (the in-loop shrink's float32 t, already
    scaled; BLOCK_R ≤ 64) in its own accumulator, plus the bias (its first ``bias_cols`` columns: N,
    or 0 in all splits but the first), stored through ``out``: a descriptor if ``DESCRIPTOR_STORE``,
    else a pointer."""
    offs_m = m0 + tl.arange(0, acc.shape[0])
    offs_n = n0 + tl.arange(0, acc.shape[1])
    in_m, in_n = offs_m < M, offs_n < N
    if ADD_LOW_RANK:
        offs_r = tl.arange(0, BLOCK_R)
        e = load_tile(expand_ptr, offs_r, offs_n, stride_er, stride_en, offs_r < R, in_n).to(tl.float32)
        low_rank = tl.dot(t, e, input_precision=PRECISION)  # its own accumulator: see the module's docstring
        if OUTPUT_DROPOUT:  # the mask of this sub-tile only: a whole tile's spilled registers
            low_rank = tl.where(keep_mask(seed, offs_m, n0, N, drop_threshold, acc.shape[1]), low_rank, 0.0)
        acc += low_rank
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_b, mask=offs_n < bias_cols, other=0.0).to(tl.float32)[None, :]
    if DESCRIPTOR_STORE:
        out.store([m0, n0], acc.to(out.dtype))
    else:
        tl.store(out + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, acc.to(out.dtype.element_ty),
                 mask=in_m[:, None] & in_n[None, :])


@triton.jit(do_not_specialize=["M_BUCKET", "split_k"])
def _lowrank_linear_kernel(
        a_ptr, w_ptr, bias_ptr, down_ptr, expand_ptr, t_ptr, out_ptr,
        M, N, K, R,
        stride_am, stride_ak, stride_wn, stride_wk, stride_b, stride_dk, stride_dr, stride_en, stride_er,
        stride_tm, stride_ts, stride_om, stride_on,
        scale, seed_ptr, drop_threshold, drop_scale,
        split_k,  # K is cut into this many ranges of whole BLOCK_K steps
        M_BUCKET,  # autotune key only
        HAS_BIAS: tl.constexpr, HAS_LOW_RANK: tl.constexpr, SHRINK_IN_LOOP: tl.constexpr,
        OUTPUT_DROPOUT: tl.constexpr, STORE_T: tl.constexpr,
        TMA: tl.constexpr, W_TRANSPOSED: tl.constexpr, PARTIAL: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr, EPILOGUE_N: tl.constexpr, T_SPLITS: tl.constexpr = 1,
        q_scale_ptr=None, q_code_ptr=None, q_scale2_ptr=None, q_code2_ptr=None, q_offset_ptr=None,
        W_FORMAT: tl.constexpr = "dense", QUANT_BLOCK: tl.constexpr = 64, NESTED: tl.constexpr = False,
        NESTED_BLOCK: tl.constexpr = 256, PTX_LOOKUP: tl.constexpr = False):
    """``TMA``: descriptor loads of a and W (``W_TRANSPOSED``: W has unit stride along N), descriptor
    stores of the output. ``PARTIAL``: ``out_ptr`` is float32 ``split_k × M × N`` partial sums.
    ``OUTPUT_DROPOUT``: the mask on the rank-r term (input-side dropout is the shrink kernel's).
    ``T_SPLITS``: a given t comes as that many partial sums ``stride_ts`` apart (the split shrink's).
    ``W_FORMAT`` "4bit" or "int8" (pointer path only): ``w_ptr`` and the ``q_*`` tensors are a quantized
    weight (peft_ops/kernels/dequant.py) whose tiles ``dequant.decoded_tile`` decodes in the K-loop; the
    kernel's W is the stored weight, or with ``W_TRANSPOSED`` its transpose (the backward's dx)."""
    GIVEN_T: tl.constexpr = HAS_LOW_RANK and not SHRINK_IN_LOOP
    # the epilogue's sub-tile: with a given t the whole tile (its rank-r term and bias were added at the
    # tile's start, so the epilogue only stores; one descriptor store instead of sub-tiles that each
    # waited for the previous one's staging buffer, compiled for sm_90), else EPILOGUE_N columns
    STORE_N: tl.constexpr = BLOCK_N if GIVEN_T else EPILOGUE_N
    if TMA:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        if W_TRANSPOSED:
            w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K, N], strides=[stride_wk, 1],
                                               block_shape=[BLOCK_K, BLOCK_N])
        else:
            w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1],
                                               block_shape=[BLOCK_N, BLOCK_K])
        if not PARTIAL:
            out_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[stride_om, 1],
                                                 block_shape=[BLOCK_M, STORE_N])
    seed = 0
    if OUTPUT_DROPOUT:
        seed = tl.load(seed_ptr)
    offs_r = tl.arange(0, BLOCK_R)
    in_r = offs_r < R
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), split_k) * BLOCK_K
    # persistent on the TMA path (grid: about one program per multiprocessor), one work item per
    # program otherwise. Flattened with the K-loop only without a given t: the flattened loop seeds the
    # accumulator with the rank-r term in a branch that yields the previous K-step's wgmma result, and
    # Triton's pipeliner then gives up ("operation scheduled before its operands": every wgmma waited
    # on its own loads, compiled for sm_90). Nested, each tile's K-loop is pipelined on its own.
    FLATTEN: tl.constexpr = TMA and not GIVEN_T
    for work in tl.range(tl.program_id(0), tiles * split_k, tl.num_programs(0), flatten=FLATTEN):
        split = work % split_k
        pid_m, pid_n = _tile_position(work // split_k, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        offs_m = m0.to(tl.int64) + tl.arange(0, BLOCK_M)
        offs_n = n0.to(tl.int64) + tl.arange(0, BLOCK_N)
        in_m, in_n = offs_m < M, offs_n < N
        k_start, k_end = 0, K  # bounds not depending on the work item where there are no splits (fusable)
        if PARTIAL:
            k_start = split * k_per_split
            k_end = min(K, k_start + k_per_split)
        t_scale = scale * drop_scale if OUTPUT_DROPOUT else scale
        if GIVEN_T:
            t_rows = offs_m < M * (split == 0)  # the rank-r term from the first split only
            acc = _given_t_term(m0, n0, t_ptr, stride_tm, stride_ts, t_rows, t_scale, R, N, expand_ptr, stride_en,
                                stride_er, bias_ptr, stride_b, N * (split == 0), seed, drop_threshold, HAS_BIAS,
                                OUTPUT_DROPOUT, PRECISION, BLOCK_M, BLOCK_N, BLOCK_R, T_SPLITS)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        # the pointer loads as tutorial 03's: pointer blocks advanced by BLOCK_K, only the K edge masked;
        # rows, columns and D's rank columns wrap around instead (computed, never stored or added: the
        # epilogue masks rows and columns, and E's rows past R load as zeros)
        ks = tl.arange(0, BLOCK_K)
        k_first = k_start + ks.to(tl.int64)
        d_block = pointer_block(down_ptr, k_first, offs_r % R, stride_dk, stride_dr)
        if not TMA:
            a_block = pointer_block(a_ptr, offs_m % M, k_first, stride_am, stride_ak)
            w_block = pointer_block(w_ptr, k_first, offs_n % N, stride_wk, stride_wn)
        for k0 in range(k_start, k_end, BLOCK_K):
            in_k = ks < k_end - k0
            if TMA:  # out-of-bounds parts of a tile load as zeros
                a = a_desc.load([m0, k0])
                if W_TRANSPOSED:
                    w = w_desc.load([k0, n0])
                else:
                    w = w_desc.load([n0, k0]).T
            else:
                a = tl.load(a_block, mask=in_k[None, :], other=0.0)
                a_block += k_stride(stride_ak, BLOCK_K)
                if W_FORMAT == "dense":
                    w = tl.load(w_block, mask=in_k[:, None], other=0.0)
                    w_block += k_stride(stride_wk, BLOCK_K)
                else:
                    offs_k = k0 + ks.to(tl.int64)
                    w = _quantized_w_tile(w_ptr, q_scale_ptr, q_code_ptr, q_scale2_ptr, q_code2_ptr, q_offset_ptr,
                                          offs_k, offs_k < K, k0, offs_n, in_n, n0, N, K, W_TRANSPOSED,
                                          W_FORMAT, QUANT_BLOCK, NESTED, NESTED_BLOCK, PTX_LOOKUP, BLOCK_N, BLOCK_K)
            acc = mma(a, w, acc, UPCAST, PRECISION)
            if HAS_LOW_RANK and SHRINK_IN_LOOP:  # t from the a tile already loaded (no input dropout here)
                d = tl.load(d_block, mask=in_k[:, None], other=0.0)
                d_block += k_stride(stride_dk, BLOCK_K)
                t = _shrink_step(t, a, d, offs_m, k0, K, seed, drop_threshold, False, UPCAST, PRECISION)

        if HAS_LOW_RANK and SHRINK_IN_LOOP:  # each split's t is its own part of the sum, and so is its rank-r term
            if STORE_T:
                if pid_n == 0:  # every N-block computed the same t; the first one writes it (split_k is 1)
                    tl.store(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :], t,
                             mask=in_m[:, None] & in_r[None, :])
            t = t * t_scale
        if PARTIAL:
            out = out_ptr + split.to(tl.int64) * M * N
        elif TMA:
            out = out_desc
        else:
            out = out_ptr
        # the epilogue in sub-tiles of STORE_N columns
        tl.static_assert(STORE_N * 1 == BLOCK_N or STORE_N * 2 == BLOCK_N or STORE_N * 4 == BLOCK_N,
                         "BLOCK_N / EPILOGUE_N must be 1, 2 or 4")
        if STORE_N == BLOCK_N:
            parts = (acc,)
        else:
            left, right = _halves(acc)
            if 2 * STORE_N == BLOCK_N:
                parts = (left, right)
            else:
                left_left, left_right = _halves(left)
                right_left, right_right = _halves(right)
                parts = (left_left, left_right, right_left, right_right)
        for i in tl.static_range(len(parts)):
            _epilogue_part(parts[i], m0, n0 + i * STORE_N, t, R, M, N, expand_ptr, stride_en, stride_er, bias_ptr,
                           stride_b, out, stride_om, stride_on, N * (split == 0), seed, drop_threshold,
                           HAS_LOW_RANK and SHRINK_IN_LOOP, HAS_BIAS and not GIVEN_T, OUTPUT_DROPOUT,
                           TMA and not PARTIAL, PRECISION, BLOCK_R)


@triton.jit
def _sum_splits_kernel(partial_ptr, out_ptr, size, split_k, BLOCK: tl.constexpr):
    """``out = Σ_s partial[s]`` over the splits in order (fixed, so deterministic), cast to out's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < size
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(split_k):
        total += tl.load(partial_ptr + s * size + offs, mask=inside, other=0.0)
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["M_BUCKET"])
def _shrink_kernel(a_ptr, down_ptr, t_ptr, M, K, R,
                   stride_am, stride_ak, stride_dk, stride_dr, stride_tm, stride_ts,
                   seed_ptr, drop_threshold, drop_scale,
                   M_BUCKET,  # autotune key only
                   DROPOUT_INPUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, SPLITS: tl.constexpr = 1):
    """t = drop(a) D for one block of rows (float32, M×R). ``SPLITS`` > 1: program ``(i, s)`` writes the
    partial sum of K range ``s`` (whole BLOCK_K steps) at ``t_ptr + s · stride_ts``; the GEMM adds them."""
    k_start, k_len = 0, K  # the loop runs from 0 over k_len columns of a and D moved to column k_start
    if SPLITS > 1:  # more programs, each with fewer bytes to read (decoding: one block of rows)
        k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLITS) * BLOCK_K
        k_start = tl.program_id(1) * k_per_split
        k_len = min(K - k_start, k_per_split)
        a_ptr += k_start.to(tl.int64) * stride_ak
        down_ptr += k_start.to(tl.int64) * stride_dk
        t_ptr += tl.program_id(1).to(tl.int64) * stride_ts
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    in_m, in_r = offs_m < M, offs_r < R
    seed = 0
    if DROPOUT_INPUT:
        seed = tl.load(seed_ptr)
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # the GEMM's pointer loop (tutorial 03's): only the K edge masked, rows and rank columns wrapped
    ks = tl.arange(0, BLOCK_K)
    a_block = pointer_block(a_ptr, offs_m % M, ks.to(tl.int64), stride_am, stride_ak)
    d_block = pointer_block(down_ptr, ks.to(tl.int64), offs_r % R, stride_dk, stride_dr)
    for k0 in range(0, k_len, BLOCK_K):
        in_k = ks < k_len - k0
        a = tl.load(a_block, mask=in_k[None, :], other=0.0)
        d = tl.load(d_block, mask=in_k[:, None], other=0.0)
        a_block += k_stride(stride_ak, BLOCK_K)
        d_block += k_stride(stride_dk, BLOCK_K)
        # the dropout mask by the absolute column k_start + k0
        t = _shrink_step(t, a, d, offs_m, k_start + k0, K, seed, drop_threshold, DROPOUT_INPUT, UPCAST, PRECISION)
    if DROPOUT_INPUT:
        t = t * drop_scale
    tl.store(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :], t, mask=in_m[:, None] & in_r[None, :])


# Hopper autotune candidates, pruned per launch to the ones whose shared memory and registers fit (see
# fitting_configs). Epilogues run in sub-tiles of at most 64 columns. The pointer path's:
GEMM_CONFIGS = [triton.Config({**tile, "GROUP_M": 8, "EPILOGUE_N": min(64, tile["BLOCK_N"])}, num_stages=stages,
                               num_warps=warps)
                for tile, stages, warps in (
                    ({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, 3, 8),
                    ({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64}, 3, 8),
                    ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, 4, 8),
                    ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, 4, 4),
                    ({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, 4, 4),
                    ({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, 4, 4),
                    ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, 4, 4),
                    ({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 32}, 4, 8),
                    ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, 3, 4),
                    ({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32}, 3, 4),
                    ({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, 3, 4))]
# the descriptor path's: Triton's tutorial 09 family (128-row tiles, 4 or 8 warps)
TMA_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8, "EPILOGUE_N": 64},
                  num_stages=stages, num_warps=warps)
    for block_n in (128, 256) for block_k in (64, 128) for stages in (3, 4) for warps in (4, 8)] + [
    triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 32, "GROUP_M": 8, "EPILOGUE_N": epilogue_n},
                  num_stages=3, num_warps=4)  # float32 under tf32x3, and large ranks (32×32: its epilogue in
    for block_m, block_n, epilogue_n in ((64, 64, 32), (32, 64, 32), (32, 32, 16))]  # 16 columns, or it spills)
# M ≤ 16 (either path): 16-row tiles and narrow N-blocks, for more programs reading W; four warps (with
# two, pointer loads of general strides spill: they are not asynchronous and stay in registers)
DECODE_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8, "EPILOGUE_N": block_n},
                  num_stages=stages, num_warps=4)
    for block_n in (32, 64) for block_k in (32, 64, 128, 256) for stages in (3, 4)]
SHRINK_CONFIGS = [triton.Config({"BLOCK_M": block_m, "BLOCK_K": block_k}, num_stages=stages, num_warps=4)
                  for block_m in (16, 32, 64) for block_k in (32, 64, 128) for stages in (3, 4)]
SHARED_MEMORY = 227 * 1024  # bytes of shared memory a Hopper block may use


def shared_memory_bytes(config: triton.Config, kind: str, block_r: int, element_size: int, precision: str,
                        path: str = "pointer") -> int:
    """An upper bound on a config's shared memory. ``kind``: "shrink", "gemm" (t from the shrink kernel),
    "gemm_in_loop" (t computed in the K-loop) or "plain" (no adapter). Each pipeline stage holds its
    input tiles (D too when t is computed alongside, in a's dtype); the shrink kernel's one more a tile
    for the dropout-masked copy. Float32 operands of the rank-r dot are staged for it, twice over under
    "tf32x3" (each is split into a high and a low tf32 part): with t given, t and E tiles of one rank
    step (``rank_step_size``) at the tile's start, beside the pipeline's buffers; with the in-loop shrink, t
    and an E sub-tile and their float32 product in the epilogue, which on the pointer path reuses the
    pipeline's memory once the K-loop is done. On the "tma" path the next tile's loads are in flight
    during the epilogue, so everything adds up, plus the staging buffer of the descriptor store (the
    whole tile with a given t); wgmma (tiles of 64+ rows) reads t, its A operand, from registers.
    tests/test_sm90_compile.py checks the bound against the compiler's own numbers."""
    c = config.kwargs
    bm, bk = c["BLOCK_M"], c["BLOCK_K"]
    if kind == "shrink":  # plus the a tile rewritten by the dropout mask, staged again for the dot
        return config.num_stages * (bm + block_r) * bk * element_size + bm * bk * element_size
    bn, sub_n = c["BLOCK_N"], c["EPILOGUE_N"]
    split = 2 if precision == "tf32x3" else 1
    if kind == "gemm_in_loop":
        pipeline = config.num_stages * (bm + bn + block_r) * bk * element_size
        low_rank = ((bm + sub_n) * block_r * split + bm * sub_n) * 4
    else:
        pipeline = config.num_stages * (bm + bn) * bk * element_size
        low_rank = 0 if kind == "plain" else (bm + bn) * rank_step_size(block_r, precision) * split * 4
        if kind == "gemm":
            sub_n = bn  # a given t's tile is stored whole (the kernel's STORE_N)
            if path == "tma" and bm >= 64:  # wgmma takes t, its A operand, from registers: E alone is staged
                low_rank = bn * rank_step_size(block_r, precision) * split * 4
    if path == "tma":  # plus the pipeline's barriers (a few bytes a stage)
        return pipeline + low_rank + bm * sub_n * element_size + 1024
    return max(pipeline, low_rank) if kind == "gemm_in_loop" else pipeline + low_rank


def rank_step_size(block_r: int, precision: str) -> int:
    """Ranks per step of the rank-r term of a given t (the kernel's ``RANK_STEP``): whole float32 t
    and E tiles at rank 128–256 spilled registers, and under "tf32x3" so did steps of 64."""
    return min(block_r, (_TF32X3_RANK_STEP if precision == "tf32x3" else _RANK_STEP).value)


def fitting_configs(configs, kind: str, block_r: int, element_size: int, precision: str, path: str = "pointer",
                    output_dropout: bool = False, tensor_memory: bool = False, input_dropout: bool = False) -> list:
    """The configs whose shared memory fits and whose registers do (compiled for sm_90, the others
    spill or get ptxas's C7511 advisory, wgmma serialized):

    * with the output-side dropout: tiles of at most 128×128 and at most 96 float32 values of the tile
      and of t per thread (128×256 tiles took 249–255 registers and spilled in the main loop);
    * with the in-loop shrink in 16-bit (it serves M ≤ 64, where reading W is the work): tiles of at
      most 32 rows, which run on mma.sync (a second wgmma accumulator in the K-loop, t's, made ptxas
      serialize the wgmma of 64×64 and 128×128 tiles or spill, depending on bias, BLOCK_R and
      stages), the same 96 values per thread, and D tiles of at most 128×64 in the K-loop;
    * otherwise at most 160 float32 values per thread of the tile and of the epilogue's rank-r
      sub-tile (its own accumulator: 128×128 tiles on 4 warps and 256×128 on 8 spilled 184–248 B);
    * with t given at rank blocks of 128 and more (the rank steps at the tile's start), tiles of at
      most 64×64 (128×128 and wider spilled 128–664 B), and 32×64 on the pointer path (general
      strides: its loads stay in registers; 64×64 spilled 16 B);
    * on the pointer path with the output-side dropout, at most 64 columns (128×128 and 64×128 tiles
      spilled 48–56 B) and 64 float32 values per thread of the tile and of t (128×64 on 4 warps
      spilled 56 B once the pointer loads went through cp.async);
    * in the shrink kernel at most 64 values of t per thread, 32 at rank blocks of 256 (32×32 tiles
      with the input dropout spilled 8 B compiled by Triton 3.6), and BLOCK_K ≤ 64 (32×128 tiles of a
      with the input dropout's masked copy spilled 8 B); with the input dropout (``input_dropout``) at
      least 8 elements of a per thread: one Philox call draws 8 elements of a row, and on 16×32 tiles
      (4 per thread) threads repeated each other's calls (279 instructions per K-step against 87 for
      tutorial 03, twice the mask's budget);
    * under "tf32x3" (three products per dot) tiles of at most 64×64 (32×64 on the pointer path:
      64×64 spilled 8–96 B), and 32×32 at rank blocks of 128 and more (64×64 and 32×64 tiles spilled
      56–128 B there), at most 32 values of t per thread in the shrink, and BLOCK_K ≤ 32.

    The GEMM epilogue walks a t read from memory in rank steps of at most 64, so in 16-bit ranks above
    64 add no registers there.

    ``tensor_memory``: for a GPU whose MMA accumulates in tensor memory (Blackwell, compute capability
    10: 512 columns of 32-bit values per multiprocessor). With t given, descriptor-path tiles of at
    most 128×128: at 128×256 Triton compiled the whole kernel to a trap (compiled for sm_100, bf16, rank
    16, without bias: its PTX is one ``trap;``; with a bias too, until the bias moved to the tile's
    start). The same tile without the rank-r term compiles, so presumably the tile's accumulator and the
    term's product outgrow tensor memory; tests/test_targets_compile.py checks the trap is caught."""
    def registers_fit(c):
        bm, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]
        tile, threads = bm * c.kwargs.get("BLOCK_N", 0), 32 * c.num_warps
        if precision == "tf32x3":  # the shrink's t: half the values per thread of the 16-bit case
            return bk <= 32 and (bm * block_r <= 32 * threads if kind == "shrink"
                                 else tile <= (32 * 32 if block_r >= 128 else 32 * 64 if path == "pointer"
                                               else 64 * 64))
        if kind in ("shrink", "gemm_in_loop") and bk * block_r > 128 * 64:
            return False  # the D tiles in flight
        if kind == "shrink":
            return (bk <= 64 and bm * block_r <= (32 if block_r >= 256 else 64) * threads
                    and (not input_dropout or bm * bk >= 8 * threads))
        if kind == "gemm_in_loop" and bm > 32:
            return False
        if kind == "gemm" and block_r >= 128 and tile > (32 * 64 if path == "pointer" else 64 * 64):
            return False
        if path == "pointer" and output_dropout and (c.kwargs["BLOCK_N"] > 64 or tile + bm * block_r > 64 * threads):
            return False
        if output_dropout or kind == "gemm_in_loop":
            return tile <= 128 * 128 and tile + bm * block_r <= 96 * threads
        rank_r_part = 0 if kind == "plain" else bm * c.kwargs["EPILOGUE_N"]
        return tile + rank_r_part <= 160 * threads

    def tensor_memory_fits(c):
        return not (tensor_memory and kind == "gemm" and path == "tma"
                    and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 128 * 128)
    return [c for c in configs if registers_fit(c) and tensor_memory_fits(c)
            and shared_memory_bytes(c, kind, block_r, element_size, precision, path) <= SHARED_MEMORY]


def _gemm_kind(has_low_rank, shrink_in_loop) -> str:
    return "plain" if not has_low_rank else "gemm_in_loop" if shrink_in_loop else "gemm"


def _prune_gemm(configs, named_args, **meta):
    kind = _gemm_kind(meta["HAS_LOW_RANK"], meta["SHRINK_IN_LOOP"])
    size, path = named_args["a_ptr"].element_size(), "tma" if meta["TMA"] else "pointer"
    fitting = fitting_configs(configs, kind, meta["BLOCK_R"], size, meta["PRECISION"], path, meta["OUTPUT_DROPOUT"],
                              has_tensor_memory(named_args["a_ptr"].device))
    if meta.get("W_FORMAT", "dense") == "dense":
        return fitting
    return [c for c in decodable_configs(fitting, meta["W_FORMAT"], meta["W_TRANSPOSED"], meta["QUANT_BLOCK"])
            if shared_memory_bytes(c, kind, meta["BLOCK_R"], size, meta["PRECISION"], path)
            + decode_shared_bytes(c) <= SHARED_MEMORY]


def _prune_shrink(configs, named_args, **meta):
    return fitting_configs(configs, "shrink", meta["BLOCK_R"], named_args["a_ptr"].element_size(), meta["PRECISION"],
                           input_dropout=meta["DROPOUT_INPUT"])


_GEMM_KEY = ["M_BUCKET", "N", "K", "BLOCK_R", "HAS_LOW_RANK", "SHRINK_IN_LOOP", "OUTPUT_DROPOUT", "HAS_BIAS",
             "PRECISION", "TMA", "W_TRANSPOSED", "split_k", "T_SPLITS", "W_FORMAT", "NESTED"]
_gemm_tuned = {("pointer", False): autotuned(_lowrank_linear_kernel, GEMM_CONFIGS, _GEMM_KEY, _prune_gemm),
               ("tma", False): autotuned(_lowrank_linear_kernel, TMA_GEMM_CONFIGS, _GEMM_KEY, _prune_gemm),
               ("pointer", True): autotuned(_lowrank_linear_kernel, DECODE_GEMM_CONFIGS, _GEMM_KEY, _prune_gemm),
               ("tma", True): autotuned(_lowrank_linear_kernel, DECODE_GEMM_CONFIGS, _GEMM_KEY, _prune_gemm)}
_shrink_tuned = autotuned(_shrink_kernel, SHRINK_CONFIGS, ["M_BUCKET", "K", "BLOCK_R", "DROPOUT_INPUT", "SPLITS"],
                          _prune_shrink)

# Where nothing is autotuned: the first config of each list that fits. Under the interpreter, big tiles
# keep the number of (slow, Python-level) programs low and nothing limits shared memory.
if INTERPRET:
    _PREFERRED_GEMM = _PREFERRED_TMA_GEMM = [
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4, "EPILOGUE_N": 32})]
    _PREFERRED_DECODE_GEMM = [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 4, "EPILOGUE_N": 32})]
    _PREFERRED_SHRINK = [triton.Config({"BLOCK_M": 32, "BLOCK_K": 64})]
else:
    # for float32 under tf32x3 and for large ranks, whose epilogues need the most memory and registers
    _SMALL_TILES = TMA_GEMM_CONFIGS[-3:]
    # On Hopper the pointer path serves general strides, whose loads stay in registers: with an adapter,
    # 128×128 tiles spill 8–224 B or get ptxas's C7511 (with BLOCK_K 64 or 32), 64×128 ones 168–1080 B
    _PREFERRED_GEMM = _SMALL_TILES
    _PREFERRED_TMA_GEMM = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": block_n, "BLOCK_K": 64, "GROUP_M": 8, "EPILOGUE_N": 64},
                      num_stages=3, num_warps=8) for block_n in (256, 128)] + _SMALL_TILES
    _PREFERRED_DECODE_GEMM = [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "GROUP_M": 8, "EPILOGUE_N": 32},
                      num_stages=4, num_warps=4),
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 8, "EPILOGUE_N": 32},
                      num_stages=3, num_warps=4),
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8, "EPILOGUE_N": 32},
                      num_stages=3, num_warps=4)]
    _PREFERRED_SHRINK = [triton.Config({"BLOCK_M": 32, "BLOCK_K": 128}, num_stages=3, num_warps=4),
                         triton.Config({"BLOCK_M": 32, "BLOCK_K": 64}, num_stages=3, num_warps=4),
                         triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_stages=3, num_warps=4),
                         triton.Config({"BLOCK_M": 16, "BLOCK_K": 64}, num_stages=3, num_warps=4),
                         triton.Config({"BLOCK_M": 16, "BLOCK_K": 32}, num_stages=3, num_warps=4)]


def default_config(preferred, kind: str, block_r: int, element_size: int, precision: str,
                   path: str = "pointer", output_dropout: bool = False, tensor_memory: bool = False,
                   input_dropout: bool = False) -> triton.Config:
    """The first preferred config that fits (see fitting_configs; the interpreter has no limits)."""
    if INTERPRET:
        return preferred[0]
    return fitting_configs(preferred, kind, block_r, element_size, precision, path, output_dropout, tensor_memory,
                           input_dropout)[0]


def has_tensor_memory(device: torch.device) -> bool:
    """Whether the GPU's MMA accumulates in tensor memory (Blackwell datacenter, compute capability 10)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 10


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(m), 8192)


def _run(kernel, tuned, grid, kwargs, config, default):
    """Launch ``kernel`` with its arguments by name, with ``config`` when one is given, else autotuned
    (``tuned``) where autotuning is on, else with ``default()``."""
    if config is None and tuned is not None:
        wrap_triton(tuned)[grid](**kwargs, **LAUNCH_OPTIONS)
        return
    config = config or default()
    wrap_triton(kernel)[grid(config.kwargs)](**kwargs, **config.kwargs, num_warps=config.num_warps,
                                             num_stages=config.num_stages, **LAUNCH_OPTIONS)


def shrink(a: torch.Tensor, down: torch.Tensor, *, dropout_p: float = 0.0, seed=None,
           config: triton.Config | None = None) -> torch.Tensor:
    """``t = drop(a) D`` (M×r, float32) with ``a``: M×K (any strides), ``D``: K×r. ``seed``: an int or
    a 0-d int64 tensor (read on the device). ``config`` forces one kernel configuration."""
    t = _shrink(a, down, dropout_p=dropout_p, seed=seed, config=config, splits=_shrink_splits(*a.shape, a.device))
    return t[0] if t.shape[0] == 1 else t.sum(0)  # the partial sums in order (deterministic)


def _shrink(a: torch.Tensor, down: torch.Tensor, *, dropout_p: float = 0.0, seed=None,
            config: triton.Config | None = None, splits: int = 1) -> torch.Tensor:
    """``splits`` partial sums of ``t = drop(a) D`` over consecutive ranges of K (``splits × M × r``,
    float32; their sum in order is t), ``splits`` programs per block of rows."""
    m, k = a.shape
    rank = down.shape[1]
    check_rank(rank)
    t = torch.empty(splits, m, rank, device=a.device, dtype=torch.float32)
    if m == 0:
        return t
    a = with_unit_stride(a)
    down = with_unit_stride(down.to(a.dtype))  # the dot runs in a's dtype anyway; half the bytes for 16-bit a
    kwargs = dict(a_ptr=a, down_ptr=down, t_ptr=t, M=m, K=k, R=rank,
                  stride_am=a.stride(0), stride_ak=a.stride(1), stride_dk=down.stride(0), stride_dr=down.stride(1),
                  stride_tm=t.stride(1), stride_ts=t.stride(0), seed_ptr=seed_arg(seed, dropout_p, a),
                  drop_threshold=dropout_threshold(dropout_p), drop_scale=1.0 / (1.0 - dropout_p),
                  M_BUCKET=_m_bucket(m), DROPOUT_INPUT=dropout_p > 0, UPCAST=INTERPRET,
                  PRECISION=dot_precision(a.dtype), BLOCK_R=rank_block(rank), SPLITS=splits)
    _run(_shrink_kernel, _shrink_tuned, lambda c: (triton.cdiv(m, c["BLOCK_M"]), splits), kwargs, config,
         lambda: default_config(_PREFERRED_SHRINK, "shrink", kwargs["BLOCK_R"], a.element_size(),
                                kwargs["PRECISION"], input_dropout=dropout_p > 0))
    return t


def _descriptor_rows(x: torch.Tensor) -> bool:
    """Whether a 2-D tensor with unit stride along its columns can be described for TMA: 16-byte
    aligned base and row stride."""
    size = x.element_size()
    return x.stride(1) == 1 and x.data_ptr() % 16 == 0 and x.stride(0) * size % 16 == 0


def _descriptor_layout(a: torch.Tensor, weight: torch.Tensor) -> bool | None:
    """None where the "tma" path cannot describe the operands, else whether W is described
    transposed (as the K×N tensor it is, when its unit stride runs along N: the backward's ``Wᵀ``, in
    16-bit dtypes only)."""
    if 0 in weight.shape or not _descriptor_rows(a) or weight.shape[0] * a.element_size() % 16:
        return None  # empty tensors have no descriptor; the output (M×N, contiguous) is described too
    if _descriptor_rows(weight):
        return False
    if _descriptor_rows(weight.T) and a.element_size() < 4:
        # not float32: tf32 wgmma takes its B operand from shared memory K-major only, so a Wᵀ tile would be
        # transposed in registers with its loads taken out of the pipeline (Triton warns; compiled for
        # sm_90). The pointer path's float32 tiles (mma.sync) take it pipelined.
        return True
    return None


def _gemm_path(path, a: torch.Tensor, weight: torch.Tensor) -> tuple[str, bool]:
    """The path (see the module's docstring) and whether it describes W transposed. ``path=None``:
    "tma" on a GPU of compute capability 9 or more when the operands allow a descriptor, "pointer"
    otherwise and under the interpreter (which runs the pointer path's programs faster)."""
    if path not in (None, *GEMM_PATHS):
        raise ValueError(f"path: expected one of {GEMM_PATHS} or None, got {path!r}")
    transposed = _descriptor_layout(a, weight)
    if path == "tma" and transposed is None:
        raise ValueError(f"path='tma': the operands cannot be described (a: strides {a.stride()}, weight: strides "
                         f"{weight.stride()}, N={weight.shape[0]}); expected unit stride along K for a and along K "
                         f"(or, in 16-bit dtypes, N) for weight, 16-byte aligned bases, row strides and output rows")
    if path is None:
        hopper = a.is_cuda and torch.cuda.get_device_capability(a.device)[0] >= 9
        path = "tma" if hopper and not INTERPRET and transposed is not None else "pointer"
    return path, path == "tma" and transposed


def _quantized_path(path, weight: QuantizedWeight) -> tuple[str, bool]:
    """A quantized W is decoded on the pointer path (its bytes are no tile a descriptor could load as
    the dot's operand); W_TRANSPOSED says the kernel's W is the stored weight's transpose."""
    if path not in (None, "pointer"):
        raise ValueError(f"path={path!r}: a quantized weight ({weight.format}) is read on the 'pointer' path only")
    return "pointer", weight.transposed


def _split_k(m: int, n: int, k: int, device: torch.device) -> int:
    """How many ranges K is cut into at M ≤ 16. Not at all where the 32-column N-blocks already give at
    least half the multiprocessors a program (N ≥ 2112 on 132 SMs: 4096 gives 128 programs on 132 SMs,
    each streaming 256 KiB of W): a split there costs a second launch and ``split × M × N`` float32
    partials (512 KiB at M = 16, N = 4096) written and read back to fill the last few SMs. Below that,
    enough ranges to give every multiprocessor a program, keeping at least 256 columns of K per range
    (N = 1024: 32 N-blocks × 5 ranges)."""
    if m > _DECODE_MAX_M or n == 0:
        return 1
    sms, blocks = multiprocessors(device), triton.cdiv(n, _DECODE_BLOCK_N)
    if 2 * blocks >= sms:
        return 1
    return max(1, min(triton.cdiv(sms, blocks), k // 256))


def _shrink_splits(m: int, k: int, device: torch.device) -> int:
    """Programs per block of rows of the shrink kernel, each summing one range of K into its own float32
    partial (the GEMM adds them, ``T_SPLITS``), one per ``_SHRINK_SPLIT_COLUMNS`` columns of K at most
    and at most ``_SHRINK_MAX_SPLITS`` (each GEMM program then reads ``splits × BLOCK_M × r`` float32
    partials: 16 KiB at M = 16, r = 16, 16 splits).

    At M ≤ 16 (one block of rows) as many as that allows: one program would stream x and D (256 KiB at
    K = 4096, r = 16, bf16) alone, about 3 stages of 8 KiB in flight: several µs. Above, enough to give
    every multiprocessor two programs, counting blocks of ``_SHRINK_BLOCK_M`` rows: ⌈4096 / 32⌉ = 128
    blocks on 132 SMs ran one program of 4 warps per SM with 12–24 KiB in flight, below the ≈ 15 KiB per
    SM that copy bandwidth needs by Little's law (3.35 TB/s × ≈ 0.6 µs over 132 SMs) once the masks'
    instructions are counted; 3 splits give 384 programs, each reading a third of D (no more bytes of
    D than one split), and add 3 × M × r × 4 bytes of partials (768 KiB at M = 4096, r = 16)."""
    splits = min(triton.cdiv(k, _SHRINK_SPLIT_COLUMNS), _SHRINK_MAX_SPLITS)
    if m > _DECODE_MAX_M:
        programs, blocks = 2 * multiprocessors(device), triton.cdiv(m, _SHRINK_BLOCK_M)
        splits = min(splits, triton.cdiv(programs, blocks)) if blocks < programs else 1
    return max(1, splits)


def decode_plan(m: int, n: int, k: int, rank: int, device: torch.device, *, dropout_p: float = 0.0,
                dropout_site: str = "input", shrink_in_loop: bool | None = None) -> dict:
    """What ``lowrank_linear`` launches for these sizes (no given t): ``shrink_in_loop`` (t in the
    GEMM's K-loop), ``split_k`` (the GEMM's K ranges; > 1 adds the sum of the splits' launch) and
    ``shrink_splits`` (the shrink kernel's programs per block of rows, 0 where it does not run).

    At M ≤ 16 the in-loop shrink makes every N-block's program read D again (``cdiv(N, 32)`` times
    D's bytes from L2: 128 × 128 KiB = 16 MiB at N = K = 4096, r = 16, half of W's 32 MiB): it is kept
    only where the N-blocks are fewer than half the SMs (few re-reads; K is split there unless it is
    short, and a separate shrink would be a third launch). Where they are more (K is not split), the
    shrink kernel runs first, split along K (``_shrink_splits``), and the GEMM reads t: D once, x once
    more (128 KiB), still two launches."""
    input_dropout = dropout_p > 0 and dropout_site == "input"
    block_r = rank_block(rank)
    split_k = _split_k(m, n, k, device)
    if shrink_in_loop is None:
        shrink_in_loop = (m <= _LOOP_SHRINK_MAX_M and block_r <= _LOOP_SHRINK_MAX_RANK and not input_dropout
                          and (m > _DECODE_MAX_M or 2 * triton.cdiv(n, _DECODE_BLOCK_N) < multiprocessors(device)))
    return dict(shrink_in_loop=shrink_in_loop, split_k=split_k,
                shrink_splits=0 if shrink_in_loop else _shrink_splits(m, k, device))


def _descriptor_scratch(size: int, alignment: int, stream):
    """Global memory where each program writes its tensor descriptors (``triton.set_allocator``)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _launch_gemm(a, weight, bias, out, down, expand, t, scale, seed, dropout_p, *, has_low_rank, shrink_in_loop,
                 output_dropout, store_t, block_r, config, path):
    m, k = a.shape
    n = weight.shape[0]
    quantized = isinstance(weight, QuantizedWeight)
    path, w_transposed = _quantized_path(path, weight) if quantized else _gemm_path(path, a, weight)
    w_strides = (0, 0) if quantized else weight.stride()
    tma = path == "tma"
    decode = m <= _DECODE_MAX_M
    split_k = 1 if shrink_in_loop and store_t else _split_k(m, n, k, a.device)
    partial = torch.empty(split_k, m, n, device=a.device, dtype=torch.float32) if split_k > 1 else out
    if tma and not INTERPRET:  # per launch: the allocator is per thread (autograd's backward has its own)
        triton.set_allocator(_descriptor_scratch)
    kwargs = dict(
        a_ptr=a, w_ptr=weight, bias_ptr=bias if bias is not None else out, down_ptr=down, expand_ptr=expand, t_ptr=t,
        out_ptr=partial, M=m, N=n, K=k, R=down.shape[1],
        stride_am=a.stride(0), stride_ak=a.stride(1), stride_wn=w_strides[0], stride_wk=w_strides[1],
        stride_b=bias.stride(0) if bias is not None else 0, stride_dk=down.stride(0), stride_dr=down.stride(1),
        stride_en=expand.stride(0), stride_er=expand.stride(1), stride_tm=t.stride(-2),
        stride_ts=t.stride(0) if t.dim() == 3 else 0, T_SPLITS=t.shape[0] if t.dim() == 3 else 1,
        stride_om=partial.stride(-2), stride_on=partial.stride(-1),
        scale=float(scale), seed_ptr=seed_arg(seed, dropout_p, a), drop_threshold=dropout_threshold(dropout_p),
        drop_scale=1.0 / (1.0 - dropout_p), split_k=split_k, M_BUCKET=_m_bucket(m),
        HAS_BIAS=bias is not None, HAS_LOW_RANK=has_low_rank, SHRINK_IN_LOOP=shrink_in_loop,
        OUTPUT_DROPOUT=output_dropout, STORE_T=store_t, TMA=tma, W_TRANSPOSED=w_transposed, PARTIAL=split_k > 1,
        UPCAST=INTERPRET, PRECISION=dot_precision(a.dtype), BLOCK_R=block_r)
    if quantized:  # w_ptr and the q_* tensors, W_FORMAT and its block sizes
        kwargs.update(weight.kernel_arguments())
    programs = multiprocessors(a.device) if tma and not decode else None  # persistent

    def grid(c):
        work = triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]) * split_k
        return (min(work, programs) if programs else work,)

    kind = _gemm_kind(has_low_rank, shrink_in_loop)
    preferred = _PREFERRED_DECODE_GEMM if decode else _PREFERRED_TMA_GEMM if tma else _PREFERRED_GEMM
    if quantized:
        preferred = decodable_configs(preferred, kwargs["W_FORMAT"], w_transposed, kwargs["QUANT_BLOCK"])
    _run(_lowrank_linear_kernel, _gemm_tuned[path, decode], grid, kwargs, config,
         lambda: default_config(preferred, kind, block_r, a.element_size(), kwargs["PRECISION"], path,
                                output_dropout, has_tensor_memory(a.device)))
    if split_k > 1:
        block = 1024
        wrap_triton(_sum_splits_kernel)[(triton.cdiv(m * n, block),)](
            partial_ptr=partial, out_ptr=out, size=m * n, split_k=split_k, BLOCK=block, **LAUNCH_OPTIONS)


def lowrank_linear(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
                   expand: torch.Tensor, scale: float = 1.0, *, dropout_p: float = 0.0, dropout_site: str = "input",
                   seed=None, store_t: bool = False, shrink_in_loop: bool | None = None,
                   config: triton.Config | None = None, t: torch.Tensor | None = None, path: str | None = None):
    """``out = a Wᵀ + bias + scale · drop_out((drop_in(a) D) Eᵀ)``; returns ``(out, t)``.

    ``a``: M×K, ``weight``: N×K, ``bias``: N or None, ``down``: K×r, ``expand``: N×r (any strides;
    ``weight`` may be a transposed view; an operand without a unit stride is copied first). ``out`` has ``a``'s dtype. ``t = drop_in(a) D`` (M×r, float32)
    is returned when ``store_t`` (else None). ``dropout_site`` is ``"input"`` (on ``a`` inside the
    adapter path) or ``"output"`` (on the rank-r term). ``shrink_in_loop`` forces where ``t`` is
    computed (None: the launcher decides by shape; never in the loop with input-side dropout, see the
    module's docstring); ``config`` forces the GEMM's configuration. A given ``t`` (M×r, float32) is
    used as is instead of computing it (``down`` is then not read), for callers that transform t
    between the shrink and the expand; input-side dropout is then theirs to apply.
    ``path``: "tma", "pointer" or None (the launcher picks; see the module's docstring)."""
    m, k = a.shape
    n = weight.shape[0]
    rank = down.shape[1]
    check_rank(rank)
    out = torch.empty(m, n, device=a.device, dtype=a.dtype)
    if m == 0:
        return out, (torch.empty(0, rank, device=a.device, dtype=torch.float32) if store_t else None)
    block_r = rank_block(rank)
    a, expand = with_unit_stride(a), with_unit_stride(expand)
    weight = weight if isinstance(weight, QuantizedWeight) else with_unit_stride(weight)
    down = with_unit_stride(down.to(a.dtype))  # the dot runs in a's dtype anyway; half the bytes for 16-bit a
    input_dropout = dropout_p > 0 and dropout_site == "input"
    if t is not None:
        if input_dropout or shrink_in_loop or t.shape != (m, rank) or t.dtype != torch.float32:
            raise ValueError(f"t: a given t must be float32 of shape {(m, rank)}, without input-side dropout "
                             f"or an in-loop shrink; got {t.dtype} {tuple(t.shape)}")
        shrink_in_loop = False
    else:
        if shrink_in_loop and input_dropout:
            raise ValueError("shrink_in_loop=True: input-side dropout is applied by the shrink kernel only; "
                             "pass shrink_in_loop=None or False")
        plan = decode_plan(m, n, k, rank, a.device, dropout_p=dropout_p, dropout_site=dropout_site,
                           shrink_in_loop=shrink_in_loop)
        shrink_in_loop = plan["shrink_in_loop"]
        if shrink_in_loop:
            block_r = max(block_r, _LOOP_SHRINK_MIN_BLOCK_R)
            t = torch.empty(m, rank, device=a.device, dtype=torch.float32) if store_t else out  # out: unused pointer
        else:  # split along K at M ≤ 16: the GEMM adds the partial sums (T_SPLITS)
            t = _shrink(a, down, dropout_p=dropout_p if input_dropout else 0.0, seed=seed,
                        splits=plan["shrink_splits"])
            t = t[0] if t.shape[0] == 1 else t
    _launch_gemm(a, weight, bias, out, down, expand, t, scale, seed, dropout_p, has_low_rank=True,
                 shrink_in_loop=shrink_in_loop, output_dropout=dropout_p > 0 and not input_dropout, store_t=store_t,
                 block_r=block_r, config=config, path=path)
    if store_t and t.dim() == 3:
        t = t.sum(0)  # the partials' sum, for the backward (the GEMM added them itself)
    return out, (t if store_t else None)


def linear(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           config: triton.Config | None = None, path: str | None = None) -> torch.Tensor:
    """``a Wᵀ + bias``: the same GEMM with the low-rank path compiled out (for measuring the GEMM alone)."""
    m = a.shape[0]
    out = torch.empty(m, weight.shape[0], device=a.device, dtype=a.dtype)
    a, weight = with_unit_stride(a), with_unit_stride(weight)
    if m:
        _launch_gemm(a, weight, bias, out, out, out, out, 1.0, None, 0.0, has_low_rank=False, shrink_in_loop=False,
                     output_dropout=False, store_t=False, block_r=16, config=config, path=path)
    return out
