"""inject / unload / merge over a model: matching, freezing, and nothing half-applied."""
import pytest
import torch
from torch import nn

import peft_ops
from utils import Conv1D, TinyModel, randomize_adapters


def _snapshot(model):
    return ({n: type(m) for n, m in model.named_modules()},
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()})


def _assert_unchanged(model, snapshot):
    modules, params = snapshot
    assert {n: type(m) for n, m in model.named_modules()} == modules
    now = dict(model.named_parameters())
    assert now.keys() == params.keys()
    for name, (value, flag) in params.items():
        # exact equality, NaN included (a refused weight may hold NaN); meta tensors have no values
        same = now[name].shape == value.shape if value.is_meta else torch.allclose(now[name], value, rtol=0, atol=0,
                                                                                 equal_nan=True)
        assert same and now[name].is_meta == value.is_meta and now[name].requires_grad == flag, name


def test_inject_by_suffix_freezes_the_rest():
    model = TinyModel()
    names = peft_ops.inject(model, "loraxs", 4, target_modules=["q_proj", "v_proj"])
    assert names == ["blocks.0.q_proj", "blocks.0.v_proj", "blocks.1.q_proj", "blocks.1.v_proj"]
    assert all(isinstance(model.get_submodule(n), peft_ops.LoRAXSLinear) for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.loraxs_R" for n in names}


def test_inject_by_regex_matches_whole_names():
    model = TinyModel()
    names = peft_ops.inject(model, "tlora", 4, target_modules=r"blocks\.1\.(q|k)_proj")
    assert names == ["blocks.1.q_proj", "blocks.1.k_proj"]
    assert peft_ops.inject(TinyModel(), "lora", 2, target_modules=r".*mlp\.[02]") == [
        "blocks.0.mlp.0", "blocks.0.mlp.2", "blocks.1.mlp.0", "blocks.1.mlp.2"]
    with pytest.raises(ValueError, match="matched no module"):  # a fragment of a name is not a match
        peft_ops.inject(TinyModel(), "lora", 2, target_modules=r"mlp\.[02]")


def test_all_linear_leaves_out_the_output_head():
    model = TinyModel()
    names = peft_ops.inject(model, "lora", 4, target_modules="all-linear")
    assert len(names) == 12 and "lm_head" not in names
    assert isinstance(model.lm_head, nn.Linear)


def test_all_linear_includes_conv1d():
    model = nn.Module()
    model.c_attn, model.c_proj, model.lm_head = Conv1D(48, 16), Conv1D(16, 16), nn.Linear(16, 10)
    assert peft_ops.inject(model, "lora", 4, target_modules="all-linear") == ["c_attn", "c_proj"]


def test_each_layer_gets_its_own_seed():
    model = TinyModel()
    peft_ops.inject(model, "tlora", 4, target_modules=["q_proj"], seed=3)
    a, b = model.blocks[0].q_proj, model.blocks[1].q_proj
    assert a.seed == peft_ops.layer_seed(3, "blocks.0.q_proj") != b.seed
    assert not torch.equal(a.tlora_A, b.tlora_A)
    again = TinyModel()
    peft_ops.inject(again, "tlora", 4, target_modules=["q_proj"], seed=3)
    assert torch.equal(again.blocks[0].q_proj.tlora_A, a.tlora_A)


def test_output_matches_the_base_model_at_init():
    model, base = TinyModel(), TinyModel()
    peft_ops.inject(model, "symlora", 4, target_modules=["q_proj", "o_proj"], allow_non_square=True)
    x = torch.randn(3, 32)
    assert torch.equal(model(x), base(x))


@pytest.mark.parametrize("merge", [False, True])
def test_unload(merge):
    model, base = TinyModel(), TinyModel()
    peft_ops.inject(model, "lora", 4, target_modules="all-linear")
    randomize_adapters(model, 0.1)
    x = torch.randn(5, 32)
    adapted = model(x)
    peft_ops.unload(model, merge=merge)
    assert not list(peft_ops.adapter_layers(model))
    if merge:
        assert torch.allclose(model(x), adapted, rtol=1e-4, atol=1e-5)
    else:
        assert torch.equal(model(x), base(x))


def test_model_level_merge_and_unmerge():
    model = TinyModel()
    peft_ops.inject(model, "tlora", 4, target_modules="all-linear")
    randomize_adapters(model, 0.1)
    x = torch.randn(5, 32)
    expected = model(x)
    peft_ops.merge(model)
    with pytest.warns(UserWarning, match="merged"):  # grad mode is on: a merged adapter cannot train
        merged = model(x)
    assert torch.allclose(merged, expected, rtol=1e-4, atol=1e-5)
    peft_ops.unmerge(model)
    assert torch.equal(model(x), expected)


def test_all_linear_leaves_out_what_is_never_called():
    """nn.MultiheadAttention reads out_proj.weight itself: all-linear must not wrap it (its adapter
    would silently never run)."""
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32)
    assert peft_ops.inject(layer, "lora", 4, target_modules="all-linear") == ["linear1", "linear2"]


def test_integral_arguments_of_any_integer_type():
    """numpy integers are accepted wherever Python ints are (seed, rank, svd_seed), and give the same adapter."""
    import numpy as np

    a, b = TinyModel(), TinyModel()
    peft_ops.inject(a, "loraxs", 4, target_modules=["q_proj"], seed=1, svd_seed=2)
    peft_ops.inject(b, "loraxs", np.int64(4), target_modules=["q_proj"], seed=np.int64(1), svd_seed=np.int32(2))
    for (_, x), (_, y) in zip(peft_ops.adapter_layers(a), peft_ops.adapter_layers(b)):
        assert torch.equal(x.loraxs_R, y.loraxs_R) and torch.equal(x.loraxs_B, y.loraxs_B)
        assert type(y.seed) is int and type(y.options["svd_seed"]) is int and type(y.rank) is int
