"""The swap-in modules: shapes, GPT-2 Conv1D, merge/unmerge, and every constructor argument checked."""
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import peft_ops
from utils import TOLERANCE, Conv1D, method_options, randomize_adapters, rel_error

METHODS = list(peft_ops.METHODS)


def _layer(method, base=None, **kw):
    base = base if base is not None else nn.Linear(40, 48)
    layer = peft_ops.LAYER_CLASSES[method](base, 8, backend="reference", **method_options(method), **kw)
    randomize_adapters(layer, 0.1)
    return layer


@pytest.mark.parametrize("method", METHODS)
def test_leading_dimensions(method):
    layer = _layer(method)
    x = torch.randn(2, 3, 5, 40)
    y = layer(x)
    assert y.shape == (2, 3, 5, 48)
    assert torch.allclose(y, layer(x.reshape(-1, 40)).reshape(2, 3, 5, 48), atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_conv1d_equals_linear_with_transposed_weight(method):
    conv = Conv1D(48, 40)
    linear = nn.Linear(40, 48)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    a, b = _layer(method, conv), _layer(method, linear)
    b.load_state_dict({k: v for k, v in a.state_dict().items() if not k.startswith("base_layer")}, strict=False)
    x = torch.randn(7, 40)
    assert torch.allclose(a(x), b(x), atol=1e-5)
    assert a.weight is conv.weight  # code that reads .weight sees the wrapped layer's own tensor


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv1d"])
def test_merge_equals_unmerged_and_unmerge_is_exact(method, dtype, conv):
    base = (Conv1D(48, 40) if conv else nn.Linear(40, 48)).to(dtype)
    layer = _layer(method, base).eval()
    original = base.weight.detach().clone()
    x = torch.randn(9, 40, dtype=dtype)
    expected = layer(x)
    layer.merge()
    assert layer.merged and not torch.equal(base.weight, original)
    assert rel_error(layer(x), expected) < TOLERANCE[dtype]
    for _ in range(100):
        layer.unmerge()
        layer.merge()
    layer.unmerge()
    assert torch.equal(base.weight, original)  # bit for bit
    assert torch.equal(layer(x), expected)


def test_merge_and_unmerge_are_idempotent():
    layer = _layer("loraxs")
    original = layer.base_layer.weight.detach().clone()
    layer.merge()
    merged = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.base_layer.weight, merged)
    layer.unmerge()
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)


def test_unmerge_restores_even_after_adapter_changes():
    layer = _layer("lora")
    original = layer.base_layer.weight.detach().clone()
    layer.merge()
    randomize_adapters(layer)  # e.g. an optimizer step taken while merged
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)


def test_autocast_computes_in_autocast_dtype():
    layer = _layer("loraxs")
    x = torch.randn(4, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert rel_error(y, layer(x)) < TOLERANCE[torch.bfloat16]


def test_triton_backend_without_gpu_or_interpreter_is_an_error():
    code = ("import torch, peft_ops; l = peft_ops.LoRALinear(torch.nn.Linear(8, 8), 2, backend='triton');"
            "l(torch.randn(2, 8))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "backend='triton': input is on cpu; the fused kernels need a CUDA tensor" in result.stderr


def test_repr_names_the_method():
    assert "method=symlora, in_features=40, out_features=48, rank=8" in repr(_layer("symlora"))


def test_training_through_a_merged_layer_warns():
    layer = _layer("loraxs")
    layer.merge()
    with pytest.warns(UserWarning, match=r"loraxs layer is merged: its adapter gets no gradient"):
        layer(torch.randn(3, 40))
    layer.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(3, 40))  # inference while merged is what merging is for


def test_state_dict_of_a_merged_layer_holds_the_original_weight():
    layer = _layer("tlora")
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(5, 40)
    expected = layer(x)
    layer.merge()
    state = layer.state_dict()
    assert torch.equal(state["base_layer.weight"], original)
    fresh = _layer("tlora")
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), expected)  # ΔW applied once, not twice
