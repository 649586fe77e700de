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
    assert "backend='triton': input is on cpu; the Triton kernels need a CUDA tensor" in result.stderr


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


@pytest.mark.parametrize("method", METHODS)
def test_a_merged_model_survives_a_state_dict_round_trip(method):
    """Loading a state_dict into merged layers unmerges, loads, and merges again with the loaded adapter."""
    model = nn.Sequential(_layer(method).eval(), nn.ReLU(), _layer(method, nn.Linear(48, 40)).eval())
    x = torch.randn(5, 40)
    expected = model(x)
    peft_ops.merge(model)
    model.load_state_dict(model.state_dict())
    assert all(layer.merged for _, layer in peft_ops.adapter_layers(model))
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)  # ΔW kept (it was lost before)
    # the values loaded are the ones that merge: another model's adapter replaces this one's
    other = nn.Sequential(_layer(method).eval(), nn.ReLU(), _layer(method, nn.Linear(48, 40)).eval())
    other.load_state_dict(model.state_dict())  # the weights are equal, the adapters differ
    peft_ops.merge(other)
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other(x), expected, rtol=1e-5, atol=1e-6)
    peft_ops.unmerge(other)
    torch.testing.assert_close(other(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "symlora", "loraxs"])
def test_changing_alpha_changes_the_forward(method, tmp_path):
    """The scale is derived from alpha: forward and the saved file can't disagree."""
    layer = _layer(method)
    x = torch.randn(5, 40)
    base, before = layer.base_layer(x), layer(x)
    layer.alpha *= 3
    assert layer.scaling == layer.alpha / layer.rank
    torch.testing.assert_close(layer(x) - base, 3 * (before - base), rtol=1e-4, atol=1e-6)
    model = nn.Sequential(layer)
    peft_ops.save_adapter(model, tmp_path / "a.safetensors")
    fresh = nn.Sequential(nn.Linear(40, 48))
    fresh[0].load_state_dict(layer.base_layer.state_dict())
    peft_ops.load_adapter(fresh, tmp_path / "a.safetensors", backend="reference")
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize("method", METHODS)
def test_adapter_dtype_as_documented(method):
    """Adapters are created float32 on a 16-bit base; casting the model afterwards casts them like any
    module's tensors (the README says so), and the layer still computes its method."""
    layer = _layer(method, nn.Linear(40, 48).to(torch.bfloat16))
    assert {t.dtype for t in [*layer.parameters(recurse=False), *layer.buffers(recurse=False)]} == {torch.float32}
    layer.half()
    adapter = [*layer.parameters(recurse=False), *(getattr(layer, n) for n in layer.method.frozen)]
    assert {t.dtype for t in adapter} == {torch.float16}
    x = torch.randn(6, 40, dtype=torch.float16)
    up, core, down, scale = layer.factors()
    expected = peft_ops.reference.oracle(x.double(), layer.weight.double(), layer.bias.double(), up.double(),
                                                 None if core is None else core.double(), down.double(),
                                                 scale.double() if torch.is_tensor(scale) else scale)
    assert rel_error(layer(x), expected) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("method", METHODS)
def test_stored_factors_have_one_layout_whatever_their_origin(method, tmp_path):
    """Generated, loaded, moved and cast: every adapter tensor is contiguous, so bit-for-bit results never
    depend on strides (a transposed-view factor made the CPU BLAS sum in another order)."""
    def layouts(model):
        return {f"{n}.{t}": (tuple(v.shape), v.stride()) for n, layer in peft_ops.adapter_layers(model)
                for t, v in [*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)]
                if v is not None}

    model = nn.Sequential(_layer(method), nn.ReLU(), _layer(method, nn.Linear(48, 40)))
    generated = layouts(model)
    assert all(stride == torch.empty(shape).stride() for shape, stride in generated.values()), generated
    peft_ops.save_adapter(model, tmp_path / "a.safetensors", include_frozen=method in ("loraxs", "tlora"))
    fresh = nn.Sequential(nn.Linear(40, 48), nn.ReLU(), nn.Linear(48, 40))
    fresh.load_state_dict({k.replace("base_layer.", ""): v for k, v in model.state_dict().items()
                           if "base_layer" in k})
    peft_ops.load_adapter(fresh, tmp_path / "a.safetensors")
    assert layouts(fresh) == generated
    assert layouts(fresh.to(torch.float64)) == generated
    x = torch.randn(3, 40, dtype=torch.float64)
    assert torch.equal(fresh(x), model.to(torch.float64)(x))
