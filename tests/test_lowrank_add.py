"""The in-place low-rank add (``kernels.add_lowrank_``) against float64 and against its PyTorch twin;
its output-side dropout against the fused kernel's, element for element."""
import math

import pytest
import torch
import torch.nn.functional as F

from peft_ops import kernels, reference_kernels
from utils import DEVICE, DTYPES, ON_GPU, TOLERANCE, randn, rel_error

pytestmark = pytest.mark.usefixtures("poisoned")

N, K = 90, 70  # multiples of no block size
SCALE = 0.75


def _factors(m, n, rank, expand_dtype=torch.float32):
    """t (M×r, float32) and E (N×r) scaled so that the rank-r term is about as large as ``out``."""
    return randn(m, rank, device=DEVICE), (randn(n, rank, device=DEVICE) / rank**0.5).to(expand_dtype)


def _expected(out_before, t, expand, scale, keep=None, p=0.0):
    low_rank = scale * (t.double() @ expand.double().T)
    if keep is not None:
        low_rank = torch.where(keep, low_rank / (1 - p), 0.0)
    return out_before.double() + low_rank


def _check(out, out_before, expected, dtype):
    """Close to float64 in norm and element by element: an element left as it was fails the latter."""
    if not out.numel():
        return
    assert (expected - out_before.double()).norm() > 0.2 * out_before.double().norm()  # the term is visible
    assert rel_error(out, expected) < TOLERANCE[dtype]
    rounding = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=rounding, atol=rounding)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [0, 1, 17, 130])
@pytest.mark.parametrize("rank", [1, 3, 16, 64, 256])
def test_matches_float64(dtype, m, rank):
    out = randn(m, N, device=DEVICE, dtype=dtype)
    t, expand = _factors(m, N, rank)
    out_before = out.clone()
    assert kernels.add_lowrank_(out, t, expand, SCALE) is out
    _check(out, out_before, _expected(out_before, t, expand, SCALE), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("rank", [3, 64])
def test_non_contiguous_out_expand_and_t(dtype, layout, rank):
    m = 37
    if layout == "transposed":  # column-major out and t, E stored r×N
        out = randn(N, m, device=DEVICE, dtype=dtype).T
        t = randn(rank, m, device=DEVICE).T
        expand = (randn(rank, N, device=DEVICE, dtype=torch.bfloat16) / rank**0.5).T
    else:  # every other column of wider tensors
        out = randn(m, 2 * N, device=DEVICE, dtype=dtype)[:, ::2]
        t = randn(m, 2 * rank, device=DEVICE)[:, 1::2]
        expand = (randn(N, 3 * rank, device=DEVICE, dtype=torch.float16) / rank**0.5)[:, ::3]
    assert not (out.is_contiguous() or t.is_contiguous() or expand.is_contiguous())
    out_before = out.clone()
    kernels.add_lowrank_(out, t, expand, SCALE)
    _check(out, out_before, _expected(out_before, t, expand, SCALE), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [17, 130])
@pytest.mark.parametrize("seed", [1234, torch.tensor(77)], ids=["int-seed", "tensor-seed"])
def test_dropout_is_the_fused_kernels_output_dropout(dtype, m, seed):
    """F.linear + add_lowrank_ drops exactly the elements that the fused kernel drops at the output."""
    p, rank = 0.3, 6
    a = randn(m, K, device=DEVICE, dtype=dtype)
    weight = (randn(N, K, device=DEVICE) / K**0.5).to(dtype)
    bias = randn(N, device=DEVICE, dtype=dtype)
    down, expand = randn(K, rank, device=DEVICE) / K**0.5, randn(N, rank, device=DEVICE) / rank**0.5
    fused, t = kernels.lowrank_linear(a, weight, bias, down, expand, SCALE, dropout_p=p, dropout_site="output",
                                      seed=seed, store_t=True, shrink_in_loop=False)
    base = F.linear(a, weight, bias)
    out = base.clone()
    kernels.add_lowrank_(out, t, expand, SCALE, dropout_p=p, seed=seed)

    keep = kernels.dropout_mask(seed, m, N, p, DEVICE)
    assert 0.6 < keep.float().mean().item() < 0.8
    assert torch.equal(out[~keep], base[~keep])  # dropped: out + 0, rounded back to itself
    assert (out[keep] != base[keep]).float().mean() > 0.9
    _check(out, base, _expected(base, t, expand, SCALE, keep, p), dtype)
    assert rel_error(out, fused) < TOLERANCE[dtype]  # the composition equals the fused kernel

    twin = reference_kernels.add_lowrank_(base.clone(), t, expand, SCALE, dropout_p=p, seed=seed)
    assert torch.equal(reference_kernels.dropout_mask(seed, m, N, p, DEVICE), keep)
    assert torch.equal(twin[~keep], base[~keep])  # the twin drops the same elements
    assert rel_error(out, twin) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", [1, 256])
def test_kernel_equals_twin(dtype, rank):
    out = randn(130, N, device=DEVICE, dtype=dtype)
    t, expand = _factors(130, N, rank, torch.bfloat16)
    out_before = out.clone()
    twin = reference_kernels.add_lowrank_(out.clone(), t, expand, SCALE)
    kernels.add_lowrank_(out, t, expand, SCALE)
    assert rel_error(out, twin) < TOLERANCE[dtype]
    twin64 = reference_kernels.add_lowrank_(out_before.double(), t.double(), expand, SCALE)
    torch.testing.assert_close(twin64, _expected(out_before, t, expand, SCALE), rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy, on purpose
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not ON_GPU, reason="the interpreter casts float32 to bfloat16 toward zero, a GPU to nearest"))], ids=str)
def test_a_float32_base_and_a_bias_are_rounded_once_into_out(dtype):
    """The composition's step, ``out = base + bias + scale·t Eᵀ`` with a float32 ``base`` just past ``out``'s
    range (rounded on its own, every element would be inf): each element is inf exactly where the exact
    sum rounds to inf. Small integers times a power of two make every sum exact in float32, so the kernel
    and its twin must give the float64 sum rounded once, bit for bit; ``base`` is left alone."""
    finfo = torch.finfo(dtype)
    ulp = 2.0 ** (math.frexp(finfo.max)[1] - 1) * finfo.eps  # the spacing of the dtype's largest values
    integers = lambda *shape: torch.randint(-2, 3, shape).float().to(DEVICE)  # noqa: E731
    t, expand, scale = integers(130, 8), integers(N, 8), ulp / 8
    bias = (integers(N) * scale).to(dtype)
    base = torch.where(torch.rand(130, 1, device=DEVICE) < 0.5, -1.0, 1.0).expand(130, N) * (finfo.max + 0.75 * ulp)
    before = base.clone()
    expected = (base.double() + bias.double() + scale * (t.double() @ expand.double().T)).to(dtype)
    assert torch.isinf(expected).float().mean() > 0.2 and torch.isfinite(expected).float().mean() > 0.2
    for add in (kernels.add_lowrank_, reference_kernels.add_lowrank_):
        out = torch.empty(130, N, device=DEVICE, dtype=dtype)
        assert add(out, t, expand, scale, base=base, bias=bias) is out
        assert torch.equal(out, expected) and torch.equal(base, before)


@pytest.mark.parametrize("bad, message", [
    (dict(out=torch.zeros(4, 9, dtype=torch.int32)), "out: expected a 2-D float32"),
    (dict(t=torch.zeros(4, 3, dtype=torch.float16)), r"t: expected float32 of shape \(4, r\)"),
    (dict(t=torch.zeros(5, 3)), r"t: expected float32 of shape \(4, r\)"),
    (dict(t=torch.zeros(4, 257), expand=torch.zeros(9, 257)), "t: rank 257, expected 1 to 256"),
    (dict(expand=torch.zeros(9, 4)), r"expand: expected a float tensor of shape \(9, 3\)"),
    (dict(dropout_p=1.0, seed=1), "dropout_p: expected 0 <= p < 1, got 1.0"),
])
def test_bad_input_is_refused_and_out_left_alone(bad, message):
    args = dict(out=torch.ones(4, 9), t=torch.ones(4, 3), expand=torch.ones(9, 3))
    args.update({k: v.to(DEVICE) for k, v in bad.items() if isinstance(v, torch.Tensor)})
    args = {k: v.to(DEVICE) for k, v in args.items()}
    before = args["out"].clone()
    with pytest.raises(ValueError, match=message):
        kernels.add_lowrank_(args["out"], args["t"], args["expand"], 1.0,
                             **{k: v for k, v in bad.items() if not isinstance(v, torch.Tensor)})
    assert torch.equal(args["out"], before)
