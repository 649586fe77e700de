"""Non-finite numbers: NaN and Inf in the input propagate as in the reference (never a crash), and
float16 outputs that overflow do what the exact result rounded to float16 does."""
import pytest
import torch
from torch import nn

import peft_ops
from utils import DEVICE, method_options, oracle_twin, randn, randomize_adapters

BACKENDS = ["reference", "triton"]
# the interpreter's numpy warns when it computes with the NaN and Inf these tests feed it on purpose
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


def _layer(method, backend, dtype=torch.float32, n=48, k=40):
    layer = peft_ops.LAYER_CLASSES[method](nn.Linear(k, n).to(DEVICE, dtype), 4, alpha=6.0, backend=backend,
                                           **method_options(method))
    randomize_adapters(layer, 0.3)
    return layer


def _exact(layer, x):
    return oracle_twin(layer)(x.double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", list(peft_ops.METHODS))
def test_nan_and_inf_propagate_like_the_reference(backend, method):
    layer = _layer(method, backend)
    x = randn(9, 40, device=DEVICE)
    x[2, 5] = float("nan")
    x[4, 7] = float("inf")
    x[6, 1] = -float("inf")
    x.requires_grad_()
    y = layer(x)
    expected = _exact(layer, x.detach())
    assert torch.equal(torch.isfinite(y), torch.isfinite(expected))
    assert not torch.isfinite(y[[2, 4, 6]]).any() and torch.isfinite(y[[0, 1, 3, 5, 7, 8]]).all()
    finite = torch.isfinite(expected)
    assert torch.allclose(y[finite].double(), expected[finite], rtol=1e-4, atol=1e-4)
    y.sum().backward()  # gradients of the rows that stayed finite are untouched by the others
    assert torch.isfinite(x.grad[[0, 1, 3, 5, 7, 8]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["loraxs", "tlora"])
def test_float16_overflow_matches_the_exact_result(backend, method):
    layer = _layer(method, backend, torch.float16)
    with torch.no_grad():
        layer.base_layer.weight.mul_(10)
    x = randn(16, 40, device=DEVICE, dtype=torch.float16) * 0.05
    x[8:] = 6e4 * torch.sign(randn(8, 40, device=DEVICE))  # finite inputs whose outputs exceed 65504
    y = layer(x)
    exact = _exact(layer, x)
    overflow, fits = exact.abs() > 65520, exact.abs() < 6e4  # between the two, rounding decides
    assert overflow.sum() > 100 and fits[:8].all()
    assert torch.isinf(y[overflow]).all()
    assert torch.equal(torch.sign(y[overflow]).double(), torch.sign(exact[overflow]))
    assert torch.isfinite(y[fits]).all()
    assert torch.allclose(y[:8].double(), exact[:8], rtol=5e-3, atol=5e-3)


# A square layer and a row whose base product a Wᵀ overflows the dtype while the whole sum need not:
# (features, input and gradient value, weight value, alpha). bfloat16 has float32's exponent range, so
# its base must round to inf in bfloat16 yet stay finite in a float32 accumulator (≈ 1.998·2¹²⁷).
OVERFLOW_CASES = {torch.float16: (32, 4.0, 550.0, 100.0),  # base 70400 > 65504; low-rank term ∓12800
                  torch.bfloat16: (33, 2.0**61, 1.9375 * 2.0**61, 2.0**65 / 33)}  # low-rank term ∓2¹²⁶


@pytest.mark.parametrize("dtype", list(OVERFLOW_CASES), ids=str)
@pytest.mark.parametrize("sign", [-1.0, 1.0], ids=["sum-fits", "sum-overflows"])
@pytest.mark.parametrize("backend", ["reference", "fused", "composed", "triton"])
def test_overflow_does_not_depend_on_the_implementation_or_the_batch(backend, sign, dtype):
    """Every implementation rounds the whole sum once: the row is finite (or infinite) as the exact sum
    rounded to the dtype is, in a batch of 4 rows (the dispatcher's fused kernel) as in one of 32 (the
    cuBLAS composition), in the forward and in the backward's dx (the same sum, the layer being square)."""
    features, value, weight, alpha = OVERFLOW_CASES[dtype]
    layer = peft_ops.LoRALinear(nn.Linear(features, features, bias=False).to(DEVICE, dtype), 1, alpha=alpha,
                                backend=backend)
    with torch.no_grad():
        layer.base_layer.weight.fill_(weight)
        layer.lora_A.fill_(1.0)
        layer.lora_B.fill_(sign)
    layer.requires_grad_(False)  # the backward computes dx alone (the factors' gradients overflow float32)
    exact = torch.tensor(features * value * weight + sign * alpha * features * value, dtype=torch.float64)
    assert torch.isinf(torch.tensor(features * value * weight, dtype=dtype))  # the base alone overflows
    for rows in (4, 32):
        x = torch.full((rows, features), value, dtype=dtype, device=DEVICE, requires_grad=True)
        y = layer(x)
        y.backward(torch.full_like(y, value))
        for name, got in (("forward", y), ("dx", x.grad)):
            expected = torch.full_like(got, exact.to(dtype).item())
            torch.testing.assert_close(got, expected, rtol=torch.finfo(dtype).eps, atol=0, msg=f"{name}, {rows} rows")
