"""The fused GEMM over quantized weights (peft_ops/kernels/dequant.py): W's tiles decoded in the K-loop from
bitsandbytes' own storage (NF4/FP4 with and without double quantization, LLM.int8's int8 weight),
forward and dx, judged against the float64 reference on bitsandbytes' dequantized weight; outputs
NaN-poisoned. bitsandbytes quantizes on the CPU (in_features a multiple of 64)."""
import pytest
import torch
import triton

from peft_ops import quantized
from peft_ops.kernels import dequant, lowrank_linear
from utils import DEVICE, rel_error

bnb = pytest.importorskip("bitsandbytes", exc_type=ImportError)
pytestmark = pytest.mark.usefixtures("poisoned")

FORMATS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def linear4bit(n, k, quant_type, double, seed=0):
    torch.manual_seed(seed)
    return bnb.nn.Linear4bit(k, n, compress_statistics=double, quant_type=quant_type).to("cpu").to(DEVICE)


def linear8bit(n, k, seed=0):
    torch.manual_seed(seed)
    return bnb.nn.Linear8bitLt(k, n, has_fp16_weights=False).to("cpu").to(DEVICE)


@pytest.mark.parametrize("fmt", FORMATS + [("int8", False)], ids=lambda f: f"{f[0]}-{'dq' if f[1] else 'sq'}")
def test_decoding_is_bitsandbytes_dequantization_bit_for_bit(fmt):
    """The kernels' tile decoding (its standalone kernel) against bitsandbytes' dequantize_4bit / the
    int8 weight times its row scales: nibble order, code table, block absmax and its second level."""
    layer = linear8bit(40, 128) if fmt[0] == "int8" else linear4bit(40, 192, *fmt)
    weight = quantized.kernel_weight(layer)
    assert weight.format == fmt[0] and weight.nested == fmt[1] and weight.shape == (40, layer.in_features)
    expected = quantized.dequantize(layer)
    decoded = dequant.dequantize(weight)
    assert torch.equal(decoded, expected.float())
    assert torch.equal(weight.T.dequantized(), expected.T)  # bitsandbytes' own, as the composed path takes it


def _check(weight, w64, m, dtype, bias, rank=5, transposed=False, config=None):
    """``lowrank_linear`` with the quantized ``weight`` (its transpose for dx) against float64."""
    n, k = weight.T.shape if transposed else weight.shape
    a = torch.randn(m, k).to(DEVICE, dtype)
    b = torch.randn(n).to(DEVICE, dtype) if bias else None
    down, expand = torch.randn(k, rank).to(DEVICE), torch.randn(n, rank).to(DEVICE)
    out, t = lowrank_linear(a, weight.T if transposed else weight, b, down, expand, 0.7, store_t=True, config=config)
    w = w64.T if transposed else w64
    t64 = a.double() @ down.double()
    low_rank = 0.7 * t64 @ expand.double().T
    expected = a.double() @ w.T + low_rank + (b.double() if bias else 0)
    assert out.dtype == dtype and out.shape == (m, n)
    assert low_rank.norm() > 0.2 * (expected - low_rank).norm()  # an error in the adapter's share would show
    assert rel_error(out, expected) < TOL[dtype]
    assert rel_error(t, t64) < TOL[dtype]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f[0]}-{'dq' if f[1] else 'sq'}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 3, 17])
def test_fused_4bit_forward_and_dx(fmt, dtype, m):
    """N = 80 (no multiple of the 32- or 64-column tiles), K = 192; the forward with a bias for float32
    and without for bfloat16, dx (the stored weight read transposed) without, as the backward has."""
    layer = linear4bit(80, 192, *fmt)
    weight, w64 = quantized.kernel_weight(layer), quantized.dequantize(layer).double()
    _check(weight, w64, m, dtype, bias=dtype == torch.float32)
    _check(weight, w64, m, dtype, bias=False, transposed=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 17])
def test_fused_int8_forward_and_dx(dtype, m):
    layer = linear8bit(72, 128)
    weight, w64 = quantized.kernel_weight(layer), quantized.dequantize(layer).double()
    _check(weight, w64, m, dtype, bias=True)
    _check(weight, w64, m, dtype, bias=False, transposed=True)


@pytest.mark.parametrize("transposed", [False, True])
def test_tiles_wider_than_a_block_take_a_scale_per_element(transposed):
    """128 columns of the stored weight in one tile (BLOCK_K forward, BLOCK_N for dx) span two 64-value
    blocks: the per-element absmax branch of decoded_tile."""
    layer = linear4bit(48, 256, "nf4", True)
    weight, w64 = quantized.kernel_weight(layer), quantized.dequantize(layer).double()
    wide = dict(BLOCK_N=128, BLOCK_K=32, EPILOGUE_N=64) if transposed else dict(BLOCK_N=32, BLOCK_K=128, EPILOGUE_N=32)
    config = triton.Config({"BLOCK_M": 16, "GROUP_M": 4, **wide})
    _check(weight, w64, 3, torch.float32, bias=not transposed, transposed=transposed, config=config)


def test_split_k_over_a_quantized_weight():
    """At M ≤ 16 with few N-blocks K is split (float32 partial sums, then their sum): each split decodes
    its own range of W's columns."""
    from peft_ops.kernels import fused_linear

    assert fused_linear._split_k(1, 32, 512, torch.device(DEVICE)) > 1
    layer = linear4bit(32, 512, "fp4", True)
    _check(quantized.kernel_weight(layer), quantized.dequantize(layer).double(), 1, torch.bfloat16, bias=True)


def test_a_quantized_weight_is_refused_where_the_kernels_cannot_read_it():
    layer = linear4bit(16, 128, "nf4", False)
    weight = quantized.kernel_weight(layer)
    with pytest.raises(ValueError, match="whole blocks"):
        dequant.QuantizedWeight("nf4", weight.data[:-32], weight.scale, 16, 124, code=weight.code)
    with pytest.raises(ValueError, match="pointer"):
        lowrank_linear(torch.randn(2, 128), weight, None, torch.randn(128, 4), torch.randn(16, 4), path="tma")
