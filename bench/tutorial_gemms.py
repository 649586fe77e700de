"""Two plain Triton GEMMs, ``c = a Wᵀ`` (a: M×K, W: N×K, both K-contiguous, as a linear layer stores
them), written after the pattern of Triton's tutorials, as a yardstick for our kernels' compiled code:

* :func:`pointer_matmul_kernel`, tutorial 03's pattern: one program per output tile in grouped order,
  block pointers advanced by ``BLOCK_K`` each K-step, only the K edge masked (rows and columns wrap
  around with a modulo instead: the wrapped rows are computed and never stored), software-pipelined
  by ``num_stages`` (cp.async, LDGSTS in SASS);
* :func:`persistent_descriptor_matmul_kernel`, tutorial 09's pattern: one program per SM walking the
  tiles in the same grouped order, device-side tensor descriptors (TMA: UTMALDG in SASS) that clip
  the edges in hardware, so the K-loop computes no addresses and no masks; the tile loop flattened
  with the K-loop (one loop in SASS, the store inside it), so the next tile's loads are in flight
  during this tile's store (``FLATTEN=False`` nests the loops, as our kernel does with a given t).

Both take the dot's ``PRECISION``, so that a yardstick is compiled in the precision of the variant it
measures (tf32x3 triples float32's MMA).

tests/sm90_compile.py compiles both for sm_90 as it compiles ours; tests/test_sm90_compile.py checks
that the gate's reading of SASS finds HGMMA (and UTMALDG) in them, and ``python tests/sm90_compile.py
table`` sets their numbers beside ours (bench/NOTES.md). Not used by the package.
"""
import triton
import triton.language as tl


@triton.jit
def _grouped_tile(tile, num_tiles_m, num_tiles_n, GROUP_M: tl.constexpr):
    """Row and column block of ``tile`` when GROUP_M row blocks sweep the columns together (the W
    tiles they share stay in L2)."""
    tiles_per_group = GROUP_M * num_tiles_n
    first_m = (tile // tiles_per_group) * GROUP_M
    group_rows = min(num_tiles_m - first_m, GROUP_M)
    return first_m + (tile % tiles_per_group) % group_rows, (tile % tiles_per_group) // group_rows


@triton.jit
def pointer_matmul_kernel(a_ptr, w_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_wn, stride_wk, stride_cm,
                          stride_cn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
    block_m, block_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = (block_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    cols = (block_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    ks = tl.arange(0, BLOCK_K)
    a_block = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
    w_block = w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn  # Wᵀ's K×N tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_step in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k_step * BLOCK_K
        a = tl.load(a_block, mask=ks[None, :] < k_left, other=0.0)
        w = tl.load(w_block, mask=ks[:, None] < k_left, other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_block += BLOCK_K * stride_ak
        w_block += BLOCK_K * stride_wk
    out_rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    out_cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(c_ptr + out_rows[:, None] * stride_cm + out_cols[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=(out_rows[:, None] < M) & (out_cols[None, :] < N))


@triton.jit
def persistent_descriptor_matmul_kernel(a_ptr, w_ptr, c_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                                        PRECISION: tl.constexpr, FLATTEN: tl.constexpr):
    """Launched with ``NUM_PROGRAMS`` programs (the SM count); K·2 bytes must be a multiple of 16.
    ``FLATTEN``: the tile loop flattened with the K-loop (tutorial 09's form; False: nested, the form
    our kernel compiles to with a given t)."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    num_tiles_m, num_tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles_m * num_tiles_n, NUM_PROGRAMS, flatten=FLATTEN):
        block_m, block_n = _grouped_tile(tile, num_tiles_m, num_tiles_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            a = a_desc.load([block_m * BLOCK_M, k])
            w = w_desc.load([block_n * BLOCK_N, k])
            acc = tl.dot(a, w.T, acc, input_precision=PRECISION)
        c_desc.store([block_m * BLOCK_M, block_n * BLOCK_N], acc.to(c_desc.dtype))
