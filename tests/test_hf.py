"""Hugging Face saving of an injected model, and adapter-only Trainer checkpoints."""
import copy
import types
import warnings

import pytest
import torch

import peft_ops
from utils import rel_error

transformers = pytest.importorskip("transformers")

TOKENS = torch.randint(64, (2, 9), generator=torch.Generator().manual_seed(3))


def tiny_llama():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4)).eval()


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def adapted(build, method="loraxs"):
    model = build()
    peft_ops.inject(model, method, 4, target_modules="all-linear")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    return model


def test_save_pretrained_of_an_injected_model_warns_once(tmp_path):
    model = adapted(tiny_llama)
    with pytest.warns(UserWarning, match=r"from_pretrained of the plain model will NOT load .* "
                                         r"peft_ops.hf.save_pretrained_merged\(model, directory\)"):
        model.save_pretrained(tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path / "b")  # once per model
    # what it saved reloads into a model with the same adapters (as the Trainer resumes)
    again = tiny_llama()
    peft_ops.inject(again, "loraxs", 4, target_modules="all-linear")
    from safetensors.torch import load_file

    result = again.load_state_dict(load_file(tmp_path / "a" / "model.safetensors"), strict=False)
    assert not result.unexpected_keys
    assert torch.equal(logits(again), logits(model))


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("merged", [False, True])
def test_save_pretrained_merged_reloads_as_a_plain_model(build, merged, tmp_path):
    model = adapted(build, "tlora")
    expected = logits(model)
    if merged:
        peft_ops.merge(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        peft_ops.hf.save_pretrained_merged(model, tmp_path)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # the model is unchanged
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert not list(peft_ops.adapter_layers(reloaded))
    assert rel_error(logits(reloaded), expected) <= 1e-5


def test_unload_merge_then_save_pretrained(tmp_path):
    model = adapted(tiny_gpt2, "lora")
    expected = logits(model)
    peft_ops.unload(model, merge=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.save_pretrained(tmp_path)
    assert rel_error(logits(transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()), expected) <= 1e-5


def test_the_guard_follows_a_deepcopy_and_a_pickle(tmp_path):
    model = adapted(tiny_llama)
    twin = copy.deepcopy(model)
    assert twin.save_pretrained.model is twin
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert loaded.save_pretrained.model is loaded and torch.equal(logits(loaded), logits(model))


def test_adapter_checkpoint_callback_on_save(tmp_path):
    model = adapted(tiny_llama)
    checkpoint = tmp_path / "checkpoint-7"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"full weights")
    (checkpoint / "optimizer.pt").write_bytes(b"kept")
    callback = peft_ops.hf.AdapterCheckpointCallback()
    assert isinstance(callback, transformers.TrainerCallback)
    args = types.SimpleNamespace(output_dir=str(tmp_path), load_best_model_at_end=False)
    state = types.SimpleNamespace(global_step=7, is_world_process_zero=True, best_model_checkpoint=None)
    callback.on_save(args, state, control=None, model=model)
    assert sorted(p.name for p in checkpoint.iterdir()) == ["adapter.safetensors", "optimizer.pt"]
    fresh = tiny_llama()
    peft_ops.load_adapter(fresh, checkpoint / "adapter.safetensors")
    assert torch.equal(logits(fresh), logits(model))


def test_trainer_with_the_callback(tmp_path):
    """Two steps of a real Trainer: each checkpoint holds the adapter file and no model weights."""
    model = tiny_llama().train()
    peft_ops.inject(model, "tlora", 4, target_modules="all-linear")
    data = [{"input_ids": TOKENS[0], "labels": TOKENS[0]}] * 4
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, save_steps=1, per_device_train_batch_size=2,
                                          report_to=[], use_cpu=True, logging_strategy="no")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   callbacks=[peft_ops.hf.AdapterCheckpointCallback()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    for step in (1, 2):
        names = {p.name for p in (tmp_path / f"checkpoint-{step}").iterdir()}
        assert "adapter.safetensors" in names and "model.safetensors" not in names
    fresh = tiny_llama()
    peft_ops.load_adapter(fresh, tmp_path / "checkpoint-2" / "adapter.safetensors")
    assert torch.equal(logits(fresh), logits(model.eval()))


def _trainer(model, output_dir, **kwargs):
    data = [{"input_ids": TOKENS[0], "labels": TOKENS[0]}] * 4
    args = transformers.TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=2, report_to=[],
                                          use_cpu=True, logging_strategy="no", **kwargs)
    return transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:2],
                                callbacks=[peft_ops.hf.AdapterCheckpointCallback()])


@pytest.mark.parametrize("greater_is_better, best_step", [(True, 1), (False, 3)])
def test_load_best_model_at_end_finds_the_best_checkpoints_weights(greater_is_better, best_step, tmp_path):
    """With load_best_model_at_end the best checkpoint keeps its full weights, from which the Trainer
    restores the best model at the end; the others lose theirs (a former best too). The eval loss falls
    as it trains: made "best" by greater_is_better, the highest one is the first checkpoint's, and the
    restored model is not the last one."""
    model = tiny_llama().train()
    peft_ops.inject(model, "tlora", 4, target_modules="all-linear")
    trainer = _trainer(model, tmp_path, max_steps=3, save_steps=1, eval_strategy="steps", eval_steps=1,
                       learning_rate=1e-3, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                       greater_is_better=greater_is_better)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    assert [(tmp_path / f"checkpoint-{step}" / "model.safetensors").exists() for step in (1, 2, 3)] == \
        [step == best_step for step in (1, 2, 3)]
    best, last = tiny_llama(), tiny_llama()
    peft_ops.load_adapter(best, tmp_path / f"checkpoint-{best_step}" / "adapter.safetensors")
    peft_ops.load_adapter(last, tmp_path / "checkpoint-3" / "adapter.safetensors")
    assert torch.equal(logits(model.eval()), logits(best))
    assert torch.equal(logits(best), logits(last)) == (best_step == 3)


@pytest.mark.parametrize("unsavable, message", [
    ("no adapters", "model has no peft-ops adapter layers"),
    ("a trainable head", r"save_adapter: 1 trainable parameters outside the adapters would not be saved \(.*lm_head"),
])
def test_a_model_the_callback_cannot_save_is_refused_before_any_step(unsavable, message, tmp_path):
    model = tiny_llama().train()
    if unsavable == "a trainable head":
        peft_ops.inject(model, "tlora", 4, target_modules="all-linear")
        model.lm_head.requires_grad_(True)
    trainer = _trainer(model, tmp_path, max_steps=2, save_steps=1)
    with pytest.raises(ValueError, match=f"AdapterCheckpointCallback: {message}"):
        trainer.train()
    assert trainer.state.global_step == 0 and not list(tmp_path.glob("checkpoint-*"))
