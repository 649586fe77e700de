"""The fused forward against the float64 reference: every method, dtype and awkward shape, outputs
NaN-poisoned before each launch (the ``poisoned`` fixture), dropout reproduced from the kernel's mask."""
import pytest
import torch
import triton
import triton.language as tl
from torch import nn

import peft_ops
from peft_ops import kernels, reference, reference_kernels
from peft_ops.kernels import fused_linear
from peft_ops.kernels.dropout import dropout_threshold, keep_mask
from utils import (DEVICE, DTYPES, TOLERANCE, method_options, oracle_twin, randn, randomize_adapters,
                   rel_error)

METHODS = list(peft_ops.METHODS)
pytestmark = pytest.mark.usefixtures("poisoned")


IMPLEMENTATIONS = list(peft_ops.IMPLEMENTATIONS)  # the fused GEMM and the cuBLAS composition


def make_pair(method, n, k, rank, dtype, adapter_scale=0.5, backend="triton", **kw):
    """A kernel-backed layer (``backend``: "triton" lets the dispatcher choose, "fused" or "composed"
    forces one) with random adapter values, and its float64 oracle twin. alpha ≠ rank, so the scale
    s = alpha / rank is not 1 and a missing factor of s shows."""
    base = nn.Linear(k, n).to(DEVICE, dtype)
    layer = peft_ops.LAYER_CLASSES[method](base, rank, alpha=1.5 * rank, backend=backend,
                                           **method_options(method), **kw)
    randomize_adapters(layer, adapter_scale)
    if method == "tlora":  # a random learnable scale can leave the adapter's share too small to check
        with torch.no_grad():
            layer.tlora_alpha.fill_(2.0)
    return layer, oracle_twin(layer)


def check_forward(layer, ref, x):
    y = layer(x)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], layer.out_features)
    if x.numel() == 0:
        return
    x64 = x.double()
    expected = ref(x64)
    base = ref.base_layer(x64)
    # the adapter's share must be large enough that an error in it would show
    assert (expected - base).norm() > 0.2 * base.norm()
    assert rel_error(y, expected) < TOLERANCE[x.dtype]


@pytest.mark.parametrize("backend", IMPLEMENTATIONS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 17, 300])
def test_forward(backend, method, dtype, m):
    layer, ref = make_pair(method, 90, 70, 3, dtype, backend=backend)  # N, K: multiples of no block size
    check_forward(layer, ref, randn(m, 70, device=DEVICE, dtype=dtype))


@pytest.mark.parametrize("method", METHODS)
def test_empty_input(method):
    layer, _ = make_pair(method, 90, 70, 3, torch.float32)
    y = layer(randn(0, 70, device=DEVICE))
    assert y.shape == (0, 90)
    assert layer(randn(2, 0, 70, device=DEVICE)).shape == (2, 0, 90)


@pytest.mark.parametrize("rank, n, k", [(1, 90, 70), (16, 90, 70), (64, 90, 70), (256, 300, 270)])
@pytest.mark.parametrize("method", ["loraxs", "lora"])
def test_ranks(method, rank, n, k):
    # LoRA-XS at rank 1 only reaches W's top singular direction: a larger core keeps its share visible
    layer, ref = make_pair(method, n, k, rank, torch.bfloat16, adapter_scale=3.0 if rank == 1 else 0.5)
    check_forward(layer, ref, randn(37, k, device=DEVICE, dtype=torch.bfloat16))


def test_rank_beyond_the_kernels_runs_on_the_reference():
    """Ranks above the kernels' 256: backend='triton' is refused (test_errors.py), 'auto' runs the reference."""
    layer = peft_ops.LoRAXSLinear(nn.Linear(270, 300).to(DEVICE), 257, alpha=257.0 * 3)
    randomize_adapters(layer, 1.0)
    assert peft_ops.dispatch.resolve_backend("auto", randn(1, 270, device=DEVICE), 257) == "reference"
    check_forward(layer, oracle_twin(layer), randn(4, 270, device=DEVICE))


def test_auto_backend_picks_the_kernels_on_cuda_only():
    resolve = peft_ops.dispatch.resolve_backend
    assert resolve("auto", torch.randn(2, 8)) == "reference"
    assert resolve("auto", randn(2, 8, dtype=torch.float64, device=DEVICE)) == "reference"
    assert resolve("auto", randn(2, 8, device=DEVICE)) == ("triton" if DEVICE.type == "cuda" else "reference")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_leading_dims_and_transposed_view(method, dtype):
    layer, ref = make_pair(method, 90, 70, 5, dtype)
    check_forward(layer, ref, randn(3, 7, 70, device=DEVICE, dtype=dtype))
    transposed = randn(70, 45, device=DEVICE, dtype=dtype).T  # strides (1, 45)
    assert not transposed.is_contiguous()
    check_forward(layer, ref, transposed)
    check_forward(layer, ref, randn(5, 70, 9, device=DEVICE, dtype=dtype).transpose(1, 2))


# --- the kernel directly: both ways of computing t, dropout on either side, on both GEMM paths ---

# N, K: multiples of no block size. The descriptor ("tma") path needs rows of 16-byte multiples (K for
# a and W, N for the output): 88 × 72 there, 90 × 70 (any strides) on the pointer path.
PATH_SHAPES = {"pointer": (90, 70), "tma": (88, 72)}


def _kernel_inputs(m, n, k, rank, dtype):
    a = randn(m, k, device=DEVICE, dtype=dtype)
    w = (randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    bias = randn(n, device=DEVICE, dtype=dtype)
    down, expand = randn(k, rank, device=DEVICE) / k**0.5, randn(n, rank, device=DEVICE)
    return a, w, bias, down, expand


# input-side dropout is the shrink kernel's only (the in-loop shrink refuses it: see the next test)
@pytest.mark.parametrize("path", kernels.GEMM_PATHS)
@pytest.mark.parametrize("shrink_in_loop, site", [(False, "input"), (True, "output"), (False, "output")],
                         ids=["shrink-kernel-input", "in-loop-output", "shrink-kernel-output"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [17, 130])
def test_kernel_paths_and_dropout(path, shrink_in_loop, dtype, site, m):
    (n, k), rank, p, seed, scale = PATH_SHAPES[path], 6, 0.3, 1234, 0.75
    a, w, bias, down, expand = _kernel_inputs(m, n, k, rank, dtype)
    out, t = kernels.lowrank_linear(a, w, bias, down, expand, scale, dropout_p=p, dropout_site=site, seed=seed,
                                    store_t=True, shrink_in_loop=shrink_in_loop, path=path)
    mask = kernels.dropout_mask(seed, m, k if site == "input" else n, p, DEVICE)
    assert 0.6 < mask.float().mean().item() < 0.8  # the mask keeps about 1 - p
    expected = reference.oracle(a.double(), w.double(), bias.double(), expand.double(), None, down.double(),
                                        scale, dropout_p=p, dropout_site=site, dropout_mask=mask)
    assert rel_error(out, expected) < TOLERANCE[dtype]
    a_in = a.double() * mask / (1 - p) if site == "input" else a.double()
    assert rel_error(t, a_in @ down.double()) < TOLERANCE[dtype]
    # without the mask the reference would disagree: the mask really is the kernel's
    unmasked = reference.oracle(a.double(), w.double(), bias.double(), expand.double(), None,
                                        down.double(), scale)
    assert rel_error(out, unmasked) > 5 * TOLERANCE[dtype]


@pytest.mark.parametrize("path", kernels.GEMM_PATHS)
@pytest.mark.parametrize("site", [None, "input", "output"])
@pytest.mark.parametrize("shrink_in_loop, dtype", [(None, torch.bfloat16), (False, torch.float32)],
                         ids=["launcher-bfloat16", "shrink-kernel-float32"])
def test_decode_splits_k_deterministically(path, site, shrink_in_loop, dtype):
    """M ≤ 16: K is cut into ranges summed in a fixed order (more programs for a narrow N); the result
    is the reference's, the same on every call, and t (stored) is still complete."""
    m, n, k, rank, p, seed = 5, 40, 1104, 6, 0.3, 21
    assert fused_linear._split_k(m, n, k, torch.device(DEVICE)) > 1  # the split really happens
    a, w, bias, down, expand = _kernel_inputs(m, n, k, rank, dtype)
    kw = dict(dropout_p=p if site else 0.0, dropout_site=site or "input", seed=seed, shrink_in_loop=shrink_in_loop,
              path=path)
    out, _ = kernels.lowrank_linear(a, w, bias, down, expand, 0.5, **kw)
    mask = kernels.dropout_mask(seed, m, k if site == "input" else n, p, DEVICE) if site else None
    expected = reference.oracle(a.double(), w.double(), bias.double(), expand.double(), None, down.double(),
                                        0.5, dropout_p=p if site else 0.0, dropout_site=site or "input",
                                        dropout_mask=mask)
    assert rel_error(out, expected) < TOLERANCE[dtype]
    assert torch.equal(out, kernels.lowrank_linear(a, w, bias, down, expand, 0.5, **kw)[0])
    stored, t = kernels.lowrank_linear(a, w, bias, down, expand, 0.5, store_t=True, **kw)  # t needs one split
    assert rel_error(stored, expected) < TOLERANCE[dtype] and t.shape == (m, rank)


def _spy_launches(monkeypatch):
    """The kernels the launchers start, in order, each with its grid."""
    launches, real = [], fused_linear.wrap_triton

    class _Launch:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append((self.kernel.__name__, tuple(grid)))
            return real(self.kernel)[grid]

    monkeypatch.setattr(fused_linear, "wrap_triton", _Launch)
    return launches


def test_decode_plan_on_132_multiprocessors(monkeypatch):
    """The launcher's choices at M ≤ 16 on an H100's 132 SMs: no split of K where the 32-column N-blocks
    give at least half the SMs a program (N = 4096: 128), the shrink kernel then run first, split along
    K (512 columns a program), instead of every N-block re-reading D in its K-loop; where K is split
    (N = 1024: 32 N-blocks × 5 ranges) the in-loop shrink stays (a separate shrink would be a third launch)."""
    monkeypatch.setattr(fused_linear, "multiprocessors", lambda device: 132)
    dev = torch.device(DEVICE)
    plan = fused_linear.decode_plan
    assert plan(16, 4096, 4096, 16, dev) == dict(shrink_in_loop=False, split_k=1, shrink_splits=8)
    assert plan(1, 14336, 4096, 64, dev) == dict(shrink_in_loop=False, split_k=1, shrink_splits=8)
    assert plan(16, 4096, 14336, 16, dev) == dict(shrink_in_loop=False, split_k=1, shrink_splits=16)
    assert plan(16, 2112, 4096, 16, dev)["split_k"] == 1  # 66 N-blocks: half of 132
    assert plan(16, 2080, 4096, 16, dev) == dict(shrink_in_loop=True, split_k=3, shrink_splits=0)  # 65
    assert plan(16, 1024, 4096, 16, dev) == dict(shrink_in_loop=True, split_k=5, shrink_splits=0)
    # input-side dropout is the shrink kernel's, split there too
    assert plan(16, 4096, 4096, 16, dev, dropout_p=0.1) == dict(shrink_in_loop=False, split_k=1, shrink_splits=8)
    assert plan(16, 1024, 4096, 16, dev, dropout_p=0.1) == dict(shrink_in_loop=False, split_k=5, shrink_splits=8)
    assert plan(17, 4096, 4096, 16, dev) == dict(shrink_in_loop=True, split_k=1, shrink_splits=0)
    # above M = 16 the shrink is split so that its programs (blocks of 32 rows × splits) number at least
    # twice the SMs: 128 blocks at M = 4096 → 3 splits (384 programs); none from 264 blocks on
    assert plan(300, 4096, 4096, 16, dev) == dict(shrink_in_loop=False, split_k=1, shrink_splits=8)
    assert plan(4096, 4096, 4096, 16, dev) == dict(shrink_in_loop=False, split_k=1, shrink_splits=3)
    assert plan(8192, 4096, 4096, 16, dev)["shrink_splits"] == 2
    assert plan(8448, 4096, 4096, 16, dev)["shrink_splits"] == 1
    assert plan(4096, 4096, 256, 16, dev)["shrink_splits"] == 1  # K of one split's 512 columns


@pytest.mark.parametrize("path", kernels.GEMM_PATHS)
@pytest.mark.parametrize("site", [None, "input", "output"])
def test_split_shrink_above_decode(monkeypatch, path, site, poisoned):
    """M > 16 with few row blocks (8 "SMs" here): the shrink kernel over 3 ranges of K, the GEMM adding
    the partial sums; the reference's result and t, and `shrink` returns their sum."""
    monkeypatch.setattr(fused_linear, "multiprocessors", lambda device: 8)
    m, k, rank, p, seed = 80, 1104, 6, 0.3, 21  # past the in-loop shrink's 64 rows
    assert fused_linear.decode_plan(m, 152, k, rank, torch.device(DEVICE), dropout_p=p if site else 0.0,
                                    dropout_site=site or "input")["shrink_splits"] == 3
    a, w, bias, down, expand = _kernel_inputs(m, 152, k, rank, torch.float32)
    kw = dict(dropout_p=p if site else 0.0, dropout_site=site or "input", seed=seed)
    out, t = kernels.lowrank_linear(a, w, bias, down, expand, 0.5, store_t=True, path=path, **kw)
    expected, expected_t = reference_kernels.lowrank_linear(a, w, bias, down, expand, 0.5, store_t=True, **kw)
    assert rel_error(out, expected) < TOLERANCE[torch.float32]
    assert rel_error(t, expected_t) < TOLERANCE[torch.float32]
    assert rel_error(kernels.shrink(a, down), a.double() @ down.double()) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("path", kernels.GEMM_PATHS)
@pytest.mark.parametrize("site", [None, "input", "output"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_decode_launches_the_split_shrink_once_and_no_split_k(monkeypatch, path, site, dtype):
    """M ≤ 16 with N-blocks for at least half the SMs (8 here: 5 N-blocks of 32 columns): two launches,
    the shrink kernel over 3 ranges of K (its partial sums) and the GEMM unsplit, which adds them; the
    reference's result, the same bits on every call, and the stored t complete. With fewer N-blocks
    (N = 40) the GEMM splits K and shrinks in its K-loop (no input dropout) instead."""
    monkeypatch.setattr(fused_linear, "multiprocessors", lambda device: 8)
    launches = _spy_launches(monkeypatch)
    m, k, rank, p, seed = 5, 1104, 6, 0.3, 21
    n = 152 if path == "tma" else 150  # the descriptor path's rows: 16-byte multiples
    a, w, bias, down, expand = _kernel_inputs(m, n, k, rank, dtype)
    kw = dict(dropout_p=p if site else 0.0, dropout_site=site or "input", seed=seed, path=path)
    out, t = kernels.lowrank_linear(a, w, bias, down, expand, 0.5, store_t=True, **kw)
    assert [name for name, _ in launches] == ["_shrink_kernel", "_lowrank_linear_kernel"], launches
    assert launches[0][1] == (1, 3) and launches[1][1] == (triton.cdiv(n, 32),), launches
    mask = kernels.dropout_mask(seed, m, k if site == "input" else n, p, DEVICE) if site else None
    expected = reference.oracle(a.double(), w.double(), bias.double(), expand.double(), None, down.double(), 0.5,
                                dropout_p=p if site else 0.0, dropout_site=site or "input", dropout_mask=mask)
    assert rel_error(out, expected) < TOLERANCE[dtype]
    a_in = a.double() * mask / (1 - p) if site == "input" else a.double()
    assert t.shape == (m, rank) and rel_error(t, a_in @ down.double()) < TOLERANCE[dtype]
    assert torch.equal(out, kernels.lowrank_linear(a, w, bias, down, expand, 0.5, **kw)[0])
    launches.clear()
    narrow, _ = kernels.lowrank_linear(a, w[:40], bias[:40], down, expand[:40], 0.5, **kw)
    expected_kernels = ["_lowrank_linear_kernel", "_sum_splits_kernel"]
    assert [name for name, _ in launches] == (["_shrink_kernel"] if site == "input" else []) + expected_kernels
    mask = kernels.dropout_mask(seed, m, k if site == "input" else 40, p, DEVICE) if site else None
    expected = reference.oracle(a.double(), w[:40].double(), bias[:40].double(), expand[:40].double(), None,
                                down.double(), 0.5, dropout_p=p if site else 0.0, dropout_site=site or "input",
                                dropout_mask=mask)
    assert rel_error(narrow, expected) < TOLERANCE[dtype]


_EVERY_GEMM_CONFIG = [(path, c) for path, configs in (("pointer", fused_linear.GEMM_CONFIGS),
                                                       ("tma", fused_linear.TMA_GEMM_CONFIGS),
                                                       ("pointer", fused_linear.DECODE_GEMM_CONFIGS))
                      for c in configs]


def test_every_config_subtiles_its_epilogue_evenly():
    """The epilogue runs in 1, 2 or 4 sub-tiles of EPILOGUE_N columns (the kernel asserts it too):
    a 32-column tile once carried EPILOGUE_N = 64 and stored its columns in the wrong places."""
    for _, c in _EVERY_GEMM_CONFIG:
        assert c.kwargs["BLOCK_N"] // c.kwargs["EPILOGUE_N"] in (1, 2, 4), c
        assert c.kwargs["BLOCK_N"] % c.kwargs["EPILOGUE_N"] == 0, c


@pytest.mark.parametrize("path, config", [(p, c) for p, c in _EVERY_GEMM_CONFIG if c.kwargs["BLOCK_N"] <= 32],
                         ids=lambda c: c if isinstance(c, str) else "{BLOCK_M}x{BLOCK_N}x{BLOCK_K}/{EPILOGUE_N}".format(
                             **c.kwargs))
def test_narrow_tile_configs(path, config):
    """Every autotune config with tiles of at most 32 columns (the cheap ones to interpret), forced, with
    the rank-r term, bias and output dropout, against the reference."""
    (n, k), m, rank, p, seed = PATH_SHAPES[path], 37, 6, 0.3, 5
    a, w, bias, down, expand = _kernel_inputs(m, n, k, rank, torch.float32)
    out, _ = kernels.lowrank_linear(a, w, bias, down, expand, 0.5, dropout_p=p, dropout_site="output", seed=seed,
                                    config=config, path=path)
    mask = kernels.dropout_mask(seed, m, n, p, DEVICE)
    expected = reference.oracle(a.double(), w.double(), bias.double(), expand.double(), None, down.double(), 0.5,
                                dropout_p=p, dropout_site="output", dropout_mask=mask)
    assert rel_error(out, expected) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("path", kernels.GEMM_PATHS)
@pytest.mark.parametrize("m", [3, 70])
def test_transposed_weight_as_in_the_backward(path, m):
    """dx = g W: the weight comes as a transposed view (unit stride along N), which the descriptor
    path describes as the K×N tensor it is."""
    n, k = PATH_SHAPES[path]
    a, _, _, down, expand = _kernel_inputs(m, n, k, 5, torch.bfloat16)
    stored = (randn(k, n, device=DEVICE) / k**0.5).to(torch.bfloat16)  # K×N: stored.T is the N×K weight
    out, _ = kernels.lowrank_linear(a, stored.T, None, down, expand, 0.5, path=path)
    expected = a.double() @ stored.double() + 0.5 * (a.double() @ down.double()) @ expand.double().T
    assert rel_error(out, expected) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("module", [kernels, reference_kernels], ids=["kernels", "twins"])
def test_input_dropout_is_the_shrink_kernels(module, monkeypatch):
    """The launcher keeps the shrink in the GEMM's K-loop at small M, except with input-side dropout
    (its mask there serialized the wgmma pipeline): it then runs the shrink kernel, and forcing the
    in-loop shrink is refused, by the kernels and their twins alike."""
    a, w, bias, down, expand = _kernel_inputs(8, 88, 72, 4, torch.float32)
    kw = dict(dropout_p=0.3, dropout_site="input", seed=7, store_t=True)
    with pytest.raises(ValueError, match="shrink_in_loop=True: input-side dropout"):
        module.lowrank_linear(a, w, bias, down, expand, 0.5, shrink_in_loop=True, **kw)
    calls = []
    if module is kernels:  # count the shrink kernel's launches
        real = fused_linear._shrink
        monkeypatch.setattr(fused_linear, "_shrink", lambda *args, **kwargs: calls.append(1) or
                            real(*args, **kwargs))
    _, t = module.lowrank_linear(a, w, bias, down, expand, 0.5, **kw)
    mask = kernels.dropout_mask(7, 8, 72, 0.3, DEVICE)
    assert rel_error(t, (a.double() * mask / 0.7) @ down.double()) < TOLERANCE[torch.float32]
    module.lowrank_linear(a, w, bias, down, expand, 0.5, store_t=True)  # without dropout: in the loop
    assert calls == ([1] if module is kernels else [])


def test_path_choice_and_refusal():
    a, w, _, _, _ = _kernel_inputs(4, 88, 72, 1, torch.float32)
    assert fused_linear._gemm_path(None, a, w)[0] == "pointer"  # the interpreter, or a CPU tensor
    assert fused_linear._gemm_path("tma", a, w) == ("tma", False)
    w_transposed = randn(72, 88, device=DEVICE).T
    assert fused_linear._gemm_path("tma", a.bfloat16(), w_transposed.bfloat16()) == ("tma", True)
    # float32: tf32 wgmma cannot take Wᵀ's tiles pipelined, the pointer path does
    assert fused_linear._gemm_path(None, a, w_transposed)[0] == "pointer"
    with pytest.raises(ValueError, match="in 16-bit dtypes"):
        fused_linear._gemm_path("tma", a, w_transposed)
    with pytest.raises(ValueError, match="path='tma'"):  # K = 70: rows of 140 bytes
        kernels.linear(randn(4, 70, device=DEVICE), randn(88, 70, device=DEVICE), path="tma")
    with pytest.raises(ValueError, match="path='tma'"):  # a column-major a
        kernels.linear(randn(72, 4, device=DEVICE).T, w, path="tma")
    with pytest.raises(ValueError, match="path: expected"):
        kernels.linear(a, w, path="cuda")


@pytest.mark.parametrize("shrink_in_loop", [False, True])
def test_operands_without_a_unit_stride(shrink_in_loop):
    """Strided views (no stride of 1; NaN between their elements) are copied before the launch (the
    kernels are compiled for a known order): the result and t equal the twins' on contiguous tensors."""
    a, w, bias, down, expand = _kernel_inputs(9, 40, 48, 5, torch.float32)
    strided = [torch.stack([x, torch.full_like(x, float("nan"))], dim=-1)[..., 0] for x in (a, w, down, expand)]
    assert all(1 not in x.stride() for x in strided)
    out, t = kernels.lowrank_linear(*strided[:2], bias, *strided[2:], 0.5, store_t=True, shrink_in_loop=shrink_in_loop)
    expected, expected_t = reference_kernels.lowrank_linear(a, w, bias, down, expand, 0.5, store_t=True)
    assert rel_error(out, expected) < TOLERANCE[torch.float32]
    assert rel_error(t, expected_t) < TOLERANCE[torch.float32]
    assert torch.equal(kernels.shrink(strided[0], strided[2]), kernels.shrink(a, down))


def test_dropout_mask_depends_on_seed_and_position():
    a = kernels.dropout_mask(1, 64, 96, 0.5, DEVICE)
    assert torch.equal(a, kernels.dropout_mask(1, 64, 96, 0.5, DEVICE))
    assert not torch.equal(a, kernels.dropout_mask(2, 64, 96, 0.5, DEVICE))
    # element (i, j) depends on i * n_cols + j only: a wider mask's rows are not the narrow one's
    wide = kernels.dropout_mask(1, 64, 97, 0.5, DEVICE)
    assert torch.equal(wide.flatten()[: 96], a.flatten()[: 96])
    assert abs(a.float().mean().item() - 0.5) < 0.05
    assert kernels.dropout_mask(1, 64, 96, 0.0, DEVICE).all()


@triton.jit
def _row_mask_kernel(out_ptr, row, n_cols, seed, threshold, WIDTH: tl.constexpr):
    """keep_mask for the first WIDTH columns of one row of an n_cols-wide tensor."""
    rows = tl.full((1,), 0, tl.int64) + row
    keep = keep_mask(seed, rows, 0, n_cols, threshold, WIDTH)
    tl.store(out_ptr + tl.arange(0, WIDTH)[None, :], keep.to(tl.int8))


def _row_mask(seed, row, n_cols, width, p):
    out = torch.empty(1, width, dtype=torch.int8, device=DEVICE)
    _row_mask_kernel[(1,)](out, row, n_cols, seed, dropout_threshold(p), WIDTH=width)
    return out[0].bool()


def test_dropout_mask_past_two_to_the_32():
    """Philox counters past 2³² use the second counter word: they must not repeat those 2³² earlier
    (a tensor with more than 2³⁴ elements would otherwise reuse its mask)."""
    cols = 2**20
    far_row = 2**34 // cols  # counters of (far_row, j) are 2³² + j // 4
    near, far = _row_mask(5, 0, cols, 256, 0.5), _row_mask(5, far_row, cols, 256, 0.5)
    # the kernels' own masks equal the twin's (test_kernel_masks_equal_the_pytorch_twin), which is cheap here
    assert torch.equal(near, reference_kernels.dropout_mask(5, 1, cols, 0.5, DEVICE)[0, :256])
    assert not torch.equal(near, far)


@pytest.mark.parametrize("method", METHODS)
def test_module_dropout_matches_reference_with_kernel_mask(method):
    """Dropout through the module: the fused path with a fixed seed equals the reference fed the mask."""
    from peft_ops.ops import adapted_linear

    layer, ref = make_pair(method, 90, 70, 4, torch.float32)
    x = randn(33, 70, device=DEVICE)
    up, core, down, scale = layer.factors()
    site = layer.method.dropout_site
    y = adapted_linear(x, layer.base_layer.weight, layer.base_layer.bias, up, core, down, scale,
                             dropout_p=0.4, dropout_site=site, seed=77, backend="triton")
    mask = kernels.dropout_mask(77, 33, 70 if site == "input" else 90, 0.4, DEVICE)
    u, c, d, s = ref.factors()
    expected = reference.oracle(x.double(), ref.base_layer.weight, ref.base_layer.bias, u, c, d, s,
                                        dropout_p=0.4, dropout_site=site, dropout_mask=mask)
    assert rel_error(y, expected) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("path", kernels.GEMM_PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 300])
def test_plain_gemm_without_adapter(path, dtype, m):
    n, k = PATH_SHAPES[path]
    a, w, bias, _, _ = _kernel_inputs(m, n, k, 1, dtype)
    expected = torch.nn.functional.linear(a.double(), w.double(), bias.double())
    assert rel_error(kernels.linear(a, w, bias, path=path), expected) < TOLERANCE[dtype]
    assert rel_error(kernels.linear(a, w, path=path), expected - bias.double()) < TOLERANCE[dtype]


@pytest.mark.parametrize("seed, rows, cols, p", [(0, 5, 7, 0.5), (123, 64, 96, 0.3), (2**31 - 2, 33, 129, 0.9)])
def test_kernel_masks_equal_the_pytorch_twin(seed, rows, cols, p):
    """The Triton kernels and reference_kernels draw the same Philox masks (so both backends drop the
    same elements, on any Triton version the kernels compile with)."""
    assert torch.equal(kernels.dropout_mask(seed, rows, cols, p, DEVICE),
                       reference_kernels.dropout_mask(seed, rows, cols, p, DEVICE))
    far = 2**34 // 2**20 + 3  # a row whose Philox counters pass 2³²
    assert torch.equal(_row_mask(seed, far, 2**20, 256, p),
                       reference_kernels.dropout_mask(seed, 1, 2**20, p, DEVICE, first_row=far)[0, :256])


@pytest.mark.parametrize("impl, path", [(kernels, "pointer"), (kernels, "tma"), (reference_kernels, None)],
                         ids=["kernels-pointer", "kernels-tma", "twin"])
@pytest.mark.parametrize("dropout_site", [None, "output"])
@pytest.mark.parametrize("m", [5, 19])  # 5: K split in ranges (decoding), the rank-r term added once
def test_given_t_replaces_the_shrink(impl, path, dropout_site, m, poisoned):
    """A caller that transforms t between shrink and expand (the adapter bank) passes it in; D is not read."""
    (n, k), rank, p, seed = PATH_SHAPES[path or "pointer"], 5, 0.25, 99
    k = k * 8 if m == 5 else k
    a, w, bias, down, expand = _kernel_inputs(m, n, k, rank, torch.float32)
    t = randn(m, rank, device=DEVICE)
    p_eff = p if dropout_site else 0.0
    out, _ = impl.lowrank_linear(a, w, bias, torch.full_like(down, float("nan")), expand, 0.5, dropout_p=p_eff,
                                 dropout_site=dropout_site or "input", seed=seed, t=t,
                                 **({"path": path} if path else {}))
    low_rank = 0.5 * t.double() @ expand.double().T
    if dropout_site:
        low_rank = low_rank * kernels.dropout_mask(seed, m, n, p, DEVICE) / (1 - p)
    expected = a.double() @ w.double().T + bias.double() + low_rank
    assert rel_error(out, expected) < TOLERANCE[torch.float32]
