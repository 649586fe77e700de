"""Whole modules trained beside the adapters (a classification head), task heads left out of
"all-linear", per-architecture default targets, and requires_grad flags the user set: on a tiny
RobertaForSequenceClassification built from a config."""
import json

import pytest
import torch

import peft_ops
from test_inject import _assert_unchanged, _snapshot
from utils import TinyModel, rel_error

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOKENS = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(3))


def tiny_roberta():
    config = transformers.RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                        intermediate_size=48, max_position_embeddings=72, num_labels=3)
    torch.manual_seed(0)
    return transformers.RobertaForSequenceClassification(config).eval()


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)


def test_all_linear_leaves_out_the_classification_head():
    model = tiny_roberta()
    names = peft_ops.inject(model, "loraxs", 4, target_modules="all-linear")
    assert "roberta.encoder.layer.0.attention.self.query" in names and len(names) == 6
    assert not [n for n in names if n.startswith("classifier")]


@pytest.mark.parametrize("build, expected", [
    (tiny_roberta, ["roberta.encoder.layer.0.attention.self.query", "roberta.encoder.layer.0.attention.self.value"]),
    (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4)),
     ["transformer.h.0.attn.c_attn"]),
    (lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2)), ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]),
    (lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=1, num_attention_heads=4, word_embed_proj_dim=32,
        max_position_embeddings=64)), ["model.decoder.layers.0.self_attn.v_proj", "model.decoder.layers.0.self_attn.q_proj"]),
    (lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4)),
     [f"{stack}.block.0.layer.{i}.{attention}.{p}" for stack, i, attention in
      (("encoder", 0, "SelfAttention"), ("decoder", 0, "SelfAttention"), ("decoder", 1, "EncDecAttention"))
      for p in ("q", "v")]),
])
def test_default_targets_per_architecture(build, expected):
    assert peft_ops.inject(build(), "lora", 2) == expected


def test_default_targets_are_peft_s():
    """Our table is PEFT's, model type by model type (a copy, so that peft need not be imported)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as theirs

    ours = peft_ops.targets.DEFAULT_TARGET_MODULES
    assert sorted(ours) == sorted(theirs)
    assert {t: ours[t] for t in ours if ours[t] != theirs[t]} == {}


def test_no_default_targets_for_an_unknown_model():
    model = TinyModel()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"target_modules not given and there is no default for this model "
                                         r"\(config.model_type=None; PEFT's defaults for \d+ architectures are in "
                                         r"peft_ops.targets.DEFAULT_TARGET_MODULES\)"):
        peft_ops.inject(model, "lora", 2)
    _assert_unchanged(model, before)


def test_classification_head_round_trip(tmp_path):
    """The head is trained and saved beside the adapters: a fresh model gets the same logits."""
    model = tiny_roberta()
    peft_ops.inject(model, "loraxs", 4, target_modules="all-linear", modules_to_save=["classifier"])
    assert peft_ops.modules_to_save(model) == ["classifier"]
    assert model.classifier.out_proj.weight.requires_grad and not model.roberta.embeddings.word_embeddings.weight.requires_grad
    randomize(model)
    info = peft_ops.save_adapter(model, tmp_path / "a.safetensors")
    head = sum(p.numel() for p in model.classifier.parameters())
    assert info.trainable_parameters == 6 * 16 + head
    fresh = tiny_roberta()
    peft_ops.load_adapter(fresh, tmp_path / "a.safetensors")
    assert torch.equal(logits(fresh), logits(model))
    assert peft_ops.modules_to_save(fresh) == ["classifier"] and fresh.classifier.dense.weight.requires_grad


def test_save_refuses_trainable_parameters_it_would_lose(tmp_path):
    model = tiny_roberta()
    peft_ops.inject(model, "loraxs", 4, target_modules="all-linear")
    model.classifier.requires_grad_(True)  # trained, but not registered
    with pytest.raises(ValueError, match=r"4 trainable parameters outside the adapters would not be saved \(1,155 "
                                         r"values: classifier.dense.weight \(1,024 values\), .*modules_to_save"):
        peft_ops.save_adapter(model, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


def test_modules_to_save_is_checked():
    model = tiny_roberta()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"modules_to_save: 'head' matched no module"):
        peft_ops.inject(model, "lora", 2, target_modules=["query"], modules_to_save=["head"])
    with pytest.raises(ValueError, match=r"module 'classifier.dense' is inside modules_to_save 'classifier'"):
        peft_ops.inject(model, "lora", 2, target_modules=["dense"], modules_to_save=["classifier"])
    _assert_unchanged(model, before)


def test_inject_and_load_keep_the_flags_the_user_set(tmp_path):
    model = tiny_roberta()
    peft_ops.inject(model, "tlora", 2, target_modules=["query"])
    model.roberta.embeddings.LayerNorm.requires_grad_(True)  # the user trains this too
    peft_ops.inject(model, "tlora", 2, target_modules=["value"])
    assert model.roberta.embeddings.LayerNorm.weight.requires_grad
    assert model.roberta.encoder.layer[0].attention.self.value.tlora_B.requires_grad
    trained = tiny_roberta()
    peft_ops.inject(trained, "tlora", 2, target_modules=["query", "value", "key"])
    peft_ops.save_adapter(trained, tmp_path / "a.safetensors")
    peft_ops.load_adapter(model, tmp_path / "a.safetensors")  # adds key's adapter
    assert model.roberta.embeddings.LayerNorm.weight.requires_grad


def test_head_travels_through_the_peft_format(tmp_path):
    """export_peft writes the head as PEFT writes modules_to_save; PEFT loads it; import_peft takes it back."""
    model = tiny_roberta()
    peft_ops.inject(model, "symlora", 4, target_modules=["query", "value"], modules_to_save=["classifier"])
    randomize(model)
    peft_ops.export_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_roberta(), tmp_path).eval()
    assert rel_error(logits(theirs), logits(model)) <= 1e-5
    ours = tiny_roberta()
    peft_ops.import_peft(ours, tmp_path)
    assert rel_error(logits(ours), logits(model)) <= 1e-5
    assert peft_ops.modules_to_save(ours) == ["classifier"]


def _tiny(cls):
    config = transformers.RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                        intermediate_size=48, max_position_embeddings=72,
                                        num_labels=2 if cls.__name__.endswith("QuestionAnswering") else 3)
    torch.manual_seed(0)
    return cls(config).eval()


def outputs(model):
    with torch.no_grad():
        out = model(TOKENS)
    return torch.cat([out.start_logits, out.end_logits]) if hasattr(out, "start_logits") else out.logits


@pytest.mark.parametrize("task_type, cls, head", [
    ("SEQ_CLS", "RobertaForSequenceClassification", "classifier"),
    ("TOKEN_CLS", "RobertaForTokenClassification", "classifier"),
    ("QUESTION_ANS", "RobertaForQuestionAnswering", "qa_outputs"),
])
def test_task_head_saved_without_modules_to_save(task_type, cls, head, tmp_path):
    """PEFT saves the task's head whole for these task types, although the config's modules_to_save may
    be null (PEFT 0.10 wrote it so, the LoRA-XS authors' GLUE files among others): imported as PEFT loads it."""
    build = lambda: _tiny(getattr(transformers, cls))  # noqa: E731
    theirs = peft.get_peft_model(build(), peft.LoraConfig(task_type=task_type, r=4, target_modules=["query", "value"]))
    randomize(theirs)
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["modules_to_save"] = None  # as PEFT 0.10 writes it
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    judge = peft.PeftModel.from_pretrained(build(), tmp_path).eval()
    assert rel_error(outputs(judge), outputs(theirs.eval())) <= 1e-6 and rel_error(outputs(judge), outputs(build())) > 1e-2
    ours = build()
    peft_ops.import_peft(ours, tmp_path)
    assert peft_ops.modules_to_save(ours) == [head]
    assert rel_error(outputs(ours), outputs(judge)) <= 1e-5
    config["task_type"] = None  # nothing then says the head's tensors belong to the adapter
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    fresh = build()
    before = _snapshot(fresh)
    with pytest.raises(peft_ops.PeftFormatError, match=rf"'{head}\..*' \(and \d+ more\) is a tensor of no adapted module, "
                                                       rf"and of no module saved whole: modules_to_save is None and "
                                                       rf"task_type None"):
        peft_ops.import_peft(fresh, tmp_path)
    _assert_unchanged(fresh, before)
