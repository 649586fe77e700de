"""disable_adapters, trainable_summary, read_adapter_info."""
import pytest
import torch

import peft_ops
from utils import TinyModel, method_options, randomize_adapters

METHODS = list(peft_ops.METHODS)


def _adapted(method):
    model = TinyModel(1)
    peft_ops.inject(model, method, 4, target_modules="all-linear", **method_options(method))
    randomize_adapters(model, 0.3)
    return model


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_disable_adapters_gives_the_base_model(method, merged):
    model, base = _adapted(method), TinyModel(1)
    x = torch.randn(4, 32)
    with torch.no_grad():
        adapted = model(x)
        if merged:
            peft_ops.merge(model)
        with peft_ops.disable_adapters(model):
            assert torch.equal(model(x), base(x))
        assert all(layer.merged == merged for _, layer in peft_ops.adapter_layers(model))
        after = model(x)
    assert torch.equal(after, adapted) if not merged else torch.allclose(after, adapted, rtol=1e-5, atol=1e-5)


def test_disable_adapters_restores_on_error():
    model = _adapted("tlora")
    x = torch.randn(2, 32)
    expected = model(x)
    with pytest.raises(RuntimeError, match="inside"):
        with peft_ops.disable_adapters(model):
            raise RuntimeError("inside")
    assert torch.equal(model(x), expected)


def test_trainable_summary_counts_like_peft():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    theirs = peft.get_peft_model(transformers.LlamaForCausalLM(config), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ours = transformers.LlamaForCausalLM(config)
    peft_ops.inject(ours, "lora", 4, target_modules=["q_proj", "v_proj"])
    summary = peft_ops.trainable_summary(ours)
    assert (summary.trainable, summary.total) == theirs.get_nb_trainable_parameters()
    assert summary.per_method == {"lora": (4, summary.trainable)} and summary.other == 0
    assert str(summary).splitlines()[0].startswith(f"trainable params: {summary.trainable:,} || all params: "
                                                   f"{summary.total:,} || trainable%: ")


def test_trainable_summary_per_method():
    model = TinyModel(1)
    peft_ops.inject(model, "loraxs", 4, target_modules=["q_proj"])
    peft_ops.inject(model, "tlora", 2, target_modules=["v_proj"])
    model.lm_head.requires_grad_(True)
    summary = peft_ops.trainable_summary(model)
    assert summary.per_method == {"loraxs": (2, 32), "tlora": (2, 10)}
    assert summary.other == model.lm_head.weight.numel() and summary.trainable == 42 + summary.other
    assert summary.frozen_factor_values == 2 * 4 * (32 + 32) + 2 * 2 * (32 + 16)
    text = str(summary)
    assert "loraxs: 2 modules, 32 trainable" in text and "not saved by save_adapter" in text


def test_read_adapter_info_without_a_model(tmp_path):
    model = _adapted("loraxs")
    info = peft_ops.save_adapter(model, tmp_path / "a.safetensors")
    described = peft_ops.read_adapter_info(tmp_path / "a.safetensors")
    assert described.format == "peft-ops" and described.methods == {"loraxs": 12} and described.ranks == {4: 12}
    assert (described.trainable_parameters, described.tensor_bytes, described.file_bytes) == (
        info.trainable_parameters, info.tensor_bytes, info.file_bytes)
    q = described.modules["blocks.0.q_proj"]
    assert (q["in_features"], q["out_features"], q["alpha"]) == (32, 32, 4.0)
    assert len(q["base_fingerprint"]) == 8
    assert "12 modules (loraxs ×12; r=4 ×12)" in str(described)


def test_read_adapter_info_of_a_peft_directory(tmp_path):
    pytest.importorskip("peft")
    model = _adapted("tlora")
    peft_ops.export_peft(model, tmp_path)
    described = peft_ops.read_adapter_info(tmp_path)
    assert described.format == "peft" and described.methods == {"lora": 12} and described.ranks == {4: 12}
    assert described.modules["blocks.0.k_proj"]["out_features"] == 16


@pytest.mark.parametrize("method", METHODS)
def test_recommended_settings_are_valid_inject_arguments(method):
    recommendation = peft_ops.RECOMMENDED[method]
    assert recommendation.source
    model = TinyModel(1)
    peft_ops.inject(model, method, 4, target_modules=["q_proj"], **recommendation.kwargs)
    layer = model.blocks[0].q_proj
    assert all(getattr(layer, k, layer.options.get(k)) == v for k, v in recommendation.kwargs.items())
    assert peft_ops.RECOMMENDED["tlora"].kwargs["dropout"] == 0.5


def test_read_adapter_info_of_the_loraxs_authors_glue_files(tmp_path):
    """Their PEFT 0.10 files: the latent core under '<module>_lora_latent_mapping.weight', the classifier
    saved whole for task_type SEQ_CLS although modules_to_save is null."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from test_modules_to_save import tiny_roberta
    from test_peft_format import authors_loraxs_glue_dir

    model = tiny_roberta()
    authors_loraxs_glue_dir(tmp_path / "xs", model, r=4)
    described = peft_ops.read_adapter_info(tmp_path / "xs")
    assert described.methods == {"loraxs": 4} and described.ranks == {4: 4}
    assert described.modules_to_save == ["classifier"]
    assert described.trainable_parameters == 4 * 4 * 4 + sum(p.numel() for p in model.classifier.parameters())
