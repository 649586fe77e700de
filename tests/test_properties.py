"""Property-based: random methods, dtypes, shapes, ranks, leading dimensions, strides and dropout;
the fused path against the float64 oracle, forward and backward. Bounded so CI stays fast."""
import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import peft_ops
from peft_ops import kernels, reference
from peft_ops.ops import adapted_linear
from utils import DEVICE, TOLERANCE, randn, randn_like, rel_error

pytestmark = pytest.mark.usefixtures("poisoned")
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])  # the poison may persist


@st.composite
def problems(draw):
    method = draw(st.sampled_from(list(peft_ops.METHODS)))
    n, k = draw(st.integers(1, 80)), draw(st.integers(1, 80))
    rank = draw(st.integers(1, min(n, k, 40)))
    leading = draw(st.lists(st.integers(0, 9), min_size=1, max_size=3))
    return dict(method=method, n=n, k=k, rank=rank, leading=leading,
                dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
                transposed=draw(st.booleans()), dropout=draw(st.sampled_from([0.0, 0.0, 0.4])),
                seed=draw(st.integers(0, 2**31 - 2)), data_seed=draw(st.integers(0, 2**16)))


@SETTINGS
@given(problems())
def test_fused_matches_the_oracle(p):
    torch.manual_seed(p["data_seed"])
    layer = peft_ops.LAYER_CLASSES[p["method"]](
        nn.Linear(p["k"], p["n"]).to(DEVICE, p["dtype"]), p["rank"], alpha=1.5 * p["rank"], backend="triton",
        **({"allow_non_square": True} if p["method"] == "symlora" else {}))
    with torch.no_grad():
        for t in layer.parameters():
            if t.requires_grad:
                t.copy_(randn_like(t) * 0.3)
    shape = (*p["leading"], p["k"])
    x = (randn(*reversed(shape), device=DEVICE).permute(*reversed(range(len(shape)))) if p["transposed"]
         else randn(*shape, device=DEVICE)).to(p["dtype"]).requires_grad_()
    g = randn(*p["leading"], p["n"], device=DEVICE, dtype=p["dtype"])
    site, rate = layer.method.dropout_site, p["dropout"]
    up, core, down, scale = layer.factors()
    y = adapted_linear(x, layer.base_layer.weight, layer.base_layer.bias, up, core, down, scale,
                       dropout_p=rate, dropout_site=site, seed=p["seed"], backend="triton")
    y.backward(g)

    ref = copy.deepcopy(layer).double()
    rows = x[..., 0].numel()
    mask = kernels.dropout_mask(p["seed"], rows, p["k"] if site == "input" else p["n"], rate, DEVICE) if rate else None
    x64 = x.detach().double().reshape(rows, p["k"]).requires_grad_()
    u, c, d, s = ref.factors()
    y64 = reference.oracle(x64, ref.base_layer.weight, ref.base_layer.bias, u, c, d, s,
                                   dropout_p=rate, dropout_site=site, dropout_mask=mask)
    y64.backward(g.double().reshape(rows, p["n"]))
    tol = 2 * TOLERANCE[p["dtype"]]  # tiny shapes: a few rounding errors weigh more in the norm
    if rows == 0:
        assert y.shape == (*p["leading"], p["n"])
        return
    assert rel_error(y.reshape(rows, p["n"]), y64) < tol
    assert rel_error(x.grad.reshape(rows, p["k"]), x64.grad) < tol
    # An adapter gradient sums many terms, which may cancel (a 1×1 LoRA-XS core): beyond the relative
    # tolerance, allow a few roundings of the sum of their magnitudes, which the oracle gives when every
    # tensor is made positive.
    magnitude = copy.deepcopy(ref)
    with torch.no_grad():
        for t in [*magnitude.parameters(), *magnitude.buffers()]:
            t.abs_()
    u, c, d, s = magnitude.factors()
    reference.oracle(x64.detach().abs(), magnitude.base_layer.weight, magnitude.base_layer.bias, u, c, d, s,
                             dropout_p=rate, dropout_site=site, dropout_mask=mask
                             ).backward(g.double().abs().reshape(rows, p["n"]))
    for name, t in layer.named_parameters():
        if t.requires_grad:
            expected = dict(ref.named_parameters())[name].grad
            bound = dict(magnitude.named_parameters())[name].grad.norm().item()
            error = (t.grad.double().cpu() - expected.cpu()).norm().item()
            allowed = tol * expected.norm().item() + 16 * torch.finfo(p["dtype"]).eps * bound
            assert torch.isfinite(t.grad).all() and error <= allowed, (name, error, allowed)
