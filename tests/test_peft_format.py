"""The standard LoRA format both ways (PEFT as the independent judge), and the authors' LoRA-XS and
TLoRA checkpoints, on tiny Llama and GPT-2 models built from configs with random weights."""
import copy
import json

import pytest
import torch
from safetensors.torch import save_file

import peft_ops
from peft_ops import PeftFormatError
from peft_ops.adapter_file import read_adapter_file
from test_inject import _assert_unchanged, _snapshot
from utils import rel_error

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny_llama():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2():
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}
SQUARE = {"llama": ["q_proj", "o_proj"], "gpt2": ["attn.c_proj"]}  # where SymLoRA applies
TOKENS = torch.randint(64, (2, 9), generator=torch.Generator().manual_seed(3))


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def adapted(arch, method, rank=4, **kw):
    model = BUILD[arch]()
    peft_ops.inject(model, method, rank, target_modules=SQUARE[arch] if method == "symlora" else "all-linear", **kw)
    with torch.no_grad():  # trained-looking adapters: nothing at its zero initial value
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", list(peft_ops.METHODS))
def test_peft_loads_the_export_exactly(arch, method, tmp_path):
    model = adapted(arch, method)
    expected = logits(model)
    assert rel_error(logits(BUILD[arch]()), expected) > 1e-2  # the adapters matter
    peft_ops.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] == (arch == "gpt2") and config["r"] == 4
    theirs = peft.PeftModel.from_pretrained(BUILD[arch](), tmp_path).eval()
    assert rel_error(logits(theirs), expected) <= 1e-5


def test_export_keeps_lora_bit_for_bit_and_folds_tlora_scale(tmp_path):
    from safetensors.torch import load_file

    model = adapted("llama", "lora", alpha=8.0)
    peft_ops.export_peft(model, tmp_path / "lora")
    saved = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    q = model.model.layers[0].self_attn.q_proj
    assert torch.equal(saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"], q.lora_A)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["lora_alpha"] == 8.0
    model = adapted("llama", "tlora")
    peft_ops.export_peft(model, tmp_path / "tlora")
    assert json.loads((tmp_path / "tlora" / "adapter_config.json").read_text())["lora_alpha"] == 4  # PEFT scale 1
    saved = load_file(tmp_path / "tlora" / "adapter_model.safetensors")
    q = model.model.layers[0].self_attn.q_proj
    b = (q.tlora_alpha * q.tlora_C.T @ q.tlora_B.T).detach()
    assert torch.allclose(saved["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"], b, rtol=1e-6)


def test_export_mixed_ranks_use_rank_pattern(tmp_path):
    model = BUILD["llama"]()
    peft_ops.inject(model, "lora", 4, target_modules=["q_proj"])
    peft_ops.inject(model, "lora", 2, target_modules=["v_proj"], alpha=3.0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    peft_ops.export_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(BUILD["llama"](), tmp_path).eval()
    assert rel_error(logits(theirs), logits(model)) <= 1e-5


def test_export_refuses_a_merged_model(tmp_path):
    model = adapted("llama", "loraxs")
    peft_ops.merge(model)
    with pytest.raises(ValueError, match=r"merged into their base weights; an exported adapter would apply ΔW a "
                                         r"second time .* peft_ops.unmerge\(model\) before export_peft"):
        peft_ops.export_peft(model, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()


@pytest.mark.parametrize("method", list(peft_ops.METHODS))
def test_export_import_round_trip(method, tmp_path):
    model = adapted("gpt2", method)
    peft_ops.export_peft(model, tmp_path)
    fresh = BUILD["gpt2"]()
    names = peft_ops.import_peft(fresh, tmp_path)
    assert names == sorted(n for n, _ in peft_ops.adapter_layers(model))
    assert all(isinstance(layer, peft_ops.LoRALinear) for _, layer in peft_ops.adapter_layers(fresh))
    assert rel_error(logits(fresh), logits(model)) <= 1e-5


@pytest.mark.parametrize("arch, options", [
    ("llama", dict(use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"], lora_alpha=6,
                   rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"], lora_alpha=16, fan_in_fan_out=True)),
])
def test_import_what_peft_saved(arch, options, tmp_path):
    """PEFT's own LoRA (rsLoRA, per-module ranks and alphas, GPT-2's Conv1D): our layers give its logits."""
    torch.manual_seed(1)
    theirs = peft.get_peft_model(BUILD[arch](), peft.LoraConfig(r=4, lora_dropout=0.1, **options)).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    theirs.save_pretrained(tmp_path)
    ours = BUILD[arch]()
    peft_ops.import_peft(ours, tmp_path)
    assert rel_error(logits(ours), logits(theirs)) <= 1e-5
    if arch == "llama":
        v = ours.model.layers[0].self_attn.v_proj
        assert v.rank == 4 and v.scaling == pytest.approx(3 / 2)  # alpha_pattern, rsLoRA: 3/√4
        assert ours.model.layers[0].mlp.down_proj.rank == 2
        assert v.dropout == 0.1
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, _ in ours.named_parameters() if ".lora_" in n}


@pytest.mark.parametrize("options, message", [
    (dict(use_dora=True), r"use_dora \(DoRA"),
    (dict(bias="all"), r"bias='all' \(trained biases\)"),
    (dict(target_modules=["embed_tokens", "q_proj"]), r"targets embedding layers"),
])
def test_import_refuses_what_it_cannot_represent(options, message, tmp_path):
    config = dict(r=4, target_modules=["q_proj"]) | options
    peft.get_peft_model(BUILD["llama"](), peft.LoraConfig(**config)).save_pretrained(tmp_path)
    model = BUILD["llama"]()
    before = _snapshot(model)
    with pytest.raises(PeftFormatError, match=message):
        peft_ops.import_peft(model, tmp_path)
    _assert_unchanged(model, before)
    assert not list(peft_ops.adapter_layers(model))


def test_import_refuses_a_convolution_and_another_model(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.proj = torch.nn.Conv1d(4, 4, 3), torch.nn.Linear(4, 4)

    peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["conv", "proj"])).save_pretrained(tmp_path)
    model = Net()
    before = _snapshot(model)
    with pytest.raises(PeftFormatError, match=r"module 'conv' is a Conv1d; peft-ops adapts only nn.Linear"):
        peft_ops.import_peft(model, tmp_path)
    _assert_unchanged(model, before)
    llama = BUILD["llama"]()
    with pytest.raises(PeftFormatError, match=r"module 'conv' is not in the model"):
        peft_ops.import_peft(llama, tmp_path)


def _write_peft_dir(directory, config, tensors):
    directory.mkdir()
    peft.LoraConfig(**config).save_pretrained(directory)
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in tensors.items()},
              directory / "adapter_model.safetensors")


def _authors_loraxs(model, directory, modules=("q_proj", "v_proj"), r=4, lora_alpha=16):
    """A directory in the LoRA-XS authors' layout for the Llama ``model`` (PEFT's lora_A = Σ_r V_rᵀ and
    lora_B = U_r: their SVD of Wᵀ, frozen; the r×r ``default_lora_latent_mapping`` = R) and a copy of the
    model with ΔW = (lora_alpha/r)·B R A merged; returns the tensors and that copy."""
    expected, tensors = copy.deepcopy(model), {}
    for i in range(2):
        for proj in modules:
            name = f"model.layers.{i}.self_attn.{proj}"
            w = model.get_submodule(name).weight.detach()
            u, s, vh = torch.linalg.svd(w.T, full_matrices=False)  # as their initialisation does
            a, b = (u @ torch.diag(s))[:, :r].T, vh[:r].T
            latent = torch.randn(r, r) * 0.5
            tensors |= {f"{name}.lora_A.weight": a, f"{name}.lora_B.weight": b,
                        f"{name}.default_lora_latent_mapping.weight": latent}
            with torch.no_grad():
                expected.get_submodule(name).weight += lora_alpha / r * b @ latent @ a
    _write_peft_dir(directory, dict(r=r, lora_alpha=lora_alpha, target_modules=list(modules)), tensors)
    return tensors, expected


def _authors_tlora(model, r=4):
    """A state dict in TLoRA's layout for the GPT-2 ``model``'s ``mlp.c_fc`` layers (random_A K×r,
    random_C r×N, lora_B r×r, lora_scaling; Δy = α·x A B C), and a copy of the model with it merged."""
    expected, state = copy.deepcopy(model), {}
    for i in range(2):
        name = f"transformer.h.{i}.mlp.c_fc"  # Conv1D: its weight is stored K×N
        k, n = model.get_submodule(name).weight.shape
        a, c, b, alpha = torch.randn(k, r), torch.randn(r, n), torch.randn(r, r), torch.tensor(0.7)
        state |= {f"{name}.random_A": a, f"{name}.random_C": c, f"{name}.lora_B": b, f"{name}.lora_scaling": alpha}
        with torch.no_grad():
            expected.get_submodule(name).weight += alpha * a @ b @ c
    return state, expected


def test_authors_loraxs_checkpoint(tmp_path):
    """A file in the LoRA-XS authors' layout: their frozen factors and R, held exactly."""
    model = BUILD["llama"]()
    tensors, expected = _authors_loraxs(model, tmp_path / "xs")
    names = peft_ops.import_peft(model, tmp_path / "xs")
    q = model.model.layers[1].self_attn.q_proj
    assert isinstance(q, peft_ops.LoRAXSLinear) and len(names) == 4
    assert torch.equal(q.loraxs_B, tensors["model.layers.1.self_attn.q_proj.lora_B.weight"])
    assert torch.equal(q.loraxs_R, tensors["model.layers.1.self_attn.q_proj.default_lora_latent_mapping.weight"])
    assert [n for n, p in model.named_parameters() if p.requires_grad][0].endswith("loraxs_R")
    assert rel_error(logits(model), logits(expected)) <= 1e-5


def test_authors_tlora_state_dict(tmp_path):
    """TLoRA's layout: random_A (K×r), random_C (r×N), lora_B (r×r), lora_scaling; Δy = α·x A B C."""
    model = BUILD["gpt2"]()
    state, expected = _authors_tlora(model)
    torch.save(state, tmp_path / "tlora.pt")
    peft_ops.import_tlora(model, tmp_path / "tlora.pt")
    fc = model.transformer.h[0].mlp.c_fc
    assert isinstance(fc, peft_ops.TLoRALinear) and fc.tlora_alpha.item() == pytest.approx(0.7)
    assert rel_error(logits(model), logits(expected)) <= 1e-5
    bad = dict(state)
    bad["transformer.h.0.mlp.c_fc.random_A"] = bad["transformer.h.0.mlp.c_fc.random_A"].T.contiguous()
    fresh = BUILD["gpt2"]()
    before = _snapshot(fresh)
    with pytest.raises(PeftFormatError, match=r"random_A has shape \(4, 32\); expected \(32, 4\)"):
        peft_ops.import_tlora(fresh, bad)
    _assert_unchanged(fresh, before)


@pytest.mark.parametrize("method", ["loraxs", "tlora"])
def test_authors_adapters_save_and_load_back(method, tmp_path):
    """The authors' frozen factors are given, not ours to regenerate: ``save_adapter`` (include_frozen left
    False) stores them, so the file loads back into a fresh model, and in place into injected adapters,
    with the same logits, and saves again to the same bytes. Adapters injected beside them store only
    their trainable tensors (their factors are regenerated at load)."""
    arch, given, injected = (("llama", ["q_proj", "v_proj"], ["k_proj"]) if method == "loraxs" else
                             ("gpt2", ["mlp.c_fc"], ["attn.c_attn"]))
    model = BUILD[arch]()
    if method == "loraxs":
        _authors_loraxs(model, tmp_path / "xs")
        peft_ops.import_peft(model, tmp_path / "xs")
    else:
        peft_ops.import_tlora(model, _authors_tlora(model)[0])
    peft_ops.inject(model, method, 4, target_modules=injected)
    path = tmp_path / "a.safetensors"
    peft_ops.save_adapter(model, path)
    trainable = {"loraxs": {"loraxs_R"}, "tlora": {"tlora_B", "tlora_alpha"}}[method]
    frozen = set(peft_ops.METHODS[method].frozen)
    stored = {name: set(entry.shapes) for name, entry in read_adapter_file(path).entries.items()}
    assert stored == {name: trainable | (frozen if any(name.endswith(g) for g in given) else set())
                      for name, _ in peft_ops.adapter_layers(model)}
    data = path.read_bytes()

    fresh, in_place = BUILD[arch](), BUILD[arch]()
    peft_ops.inject(in_place, method, 4, target_modules=given + injected)
    for loaded in (fresh, in_place):
        peft_ops.load_adapter(loaded, path)
        assert torch.equal(logits(loaded), logits(model))
        peft_ops.save_adapter(loaded, tmp_path / "again.safetensors")
        assert (tmp_path / "again.safetensors").read_bytes() == data
