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


GLUE_TARGETS = ["query", "value", "attention.output.dense", "output.dense"]  # the LoRA-XS authors' GLUE targets


def authors_loraxs_glue_dir(directory, model, r=4, lora_alpha=16):
    """What the LoRA-XS authors' GLUE script (main_glue.py, PEFT 0.10) saves for a RoBERTa classifier:
    per target ``M.lora_A.weight`` = Σ_r V_rᵀ, ``M.lora_B.weight`` = U_r and ``M_lora_latent_mapping.weight``
    = R (PEFT 0.10 deletes ".default" from every key, the latent's too), the ``classifier`` tensors, and
    a config with task_type SEQ_CLS and modules_to_save null. Returns the model with ΔW and the head in
    place (the expected result)."""
    from test_modules_to_save import tiny_roberta

    expected = copy.deepcopy(model)
    tensors, generator = {}, torch.Generator().manual_seed(5)
    for name in [n for n, _ in model.named_modules() if n.startswith("roberta.encoder")
                 and any(n.endswith("." + t) for t in GLUE_TARGETS)]:
        w = model.get_submodule(name).weight.detach()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        a, b, latent = (torch.diag(s) @ vh)[:r], u[:, :r], torch.randn(r, r, generator=generator) * 0.5
        tensors |= {f"{name}.lora_A.weight": a, f"{name}.lora_B.weight": b, f"{name}_lora_latent_mapping.weight": latent}
        with torch.no_grad():
            expected.get_submodule(name).weight += lora_alpha / r * b @ latent @ a
    for key, value in tiny_roberta().classifier.state_dict().items():
        tensors[f"classifier.{key}"] = torch.randn(value.shape, generator=generator) * 0.3
    expected.classifier.load_state_dict({k.removeprefix("classifier."): v for k, v in tensors.items()
                                         if k.startswith("classifier.")})
    _write_peft_dir(directory, dict(task_type="SEQ_CLS", r=r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                    target_modules=GLUE_TARGETS), tensors)
    assert json.loads((directory / "adapter_config.json").read_text())["modules_to_save"] is None  # as theirs
    return expected


def test_authors_loraxs_glue_checkpoint(tmp_path):
    """The LoRA-XS authors' GLUE files as their pinned PEFT 0.10 writes them: the latent core under
    ``<module>_lora_latent_mapping.weight`` and the classifier inferred from task_type SEQ_CLS."""
    from test_modules_to_save import logits as cls_logits, tiny_roberta

    model = tiny_roberta()
    expected = authors_loraxs_glue_dir(tmp_path / "xs", model)
    names = peft_ops.import_peft(model, tmp_path / "xs")
    assert len(names) == 4 and all(isinstance(model.get_submodule(n), peft_ops.LoRAXSLinear) for n in names)
    assert peft_ops.modules_to_save(model) == ["classifier"]
    assert rel_error(cls_logits(model), cls_logits(expected)) <= 1e-5
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.loraxs_R" for n in names} | {f"classifier.{k}" for k in model.classifier.state_dict()}


def test_import_peft_adapter_on_the_output_head(tmp_path):
    """PEFT saves lm_head's base weight beside an adapter on lm_head: a copy of the model's is accepted,
    another one refused with the reason."""
    from safetensors.torch import load_file

    torch.manual_seed(1)
    theirs = peft.get_peft_model(BUILD["llama"](), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"])).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    theirs.save_pretrained(tmp_path / "head")
    saved = load_file(tmp_path / "head" / "adapter_model.safetensors")
    assert "base_model.model.lm_head.base_layer.weight" in saved
    ours = BUILD["llama"]()
    assert "lm_head" in peft_ops.import_peft(ours, tmp_path / "head")
    assert rel_error(logits(ours), logits(theirs)) <= 1e-5
    assert peft_ops.read_adapter_info(tmp_path / "head").trainable_parameters == theirs.get_nb_trainable_parameters()[0]
    saved["base_model.model.lm_head.base_layer.weight"][0, 0] += 1.0  # trained on another base
    (tmp_path / "other").mkdir()
    save_file(saved, tmp_path / "other" / "adapter_model.safetensors")
    (tmp_path / "other" / "adapter_config.json").write_text((tmp_path / "head" / "adapter_config.json").read_text())
    fresh = BUILD["llama"]()
    before = _snapshot(fresh)
    with pytest.raises(PeftFormatError, match=r"other: module 'lm_head': lm_head.base_layer.weight is the copy of the "
                                              r"base layer's weight that PEFT saves beside an adapter on an output "
                                              r"head .* differs from the model's \(same shape, other values\)"):
        peft_ops.import_peft(fresh, tmp_path / "other")
    _assert_unchanged(fresh, before)


def _peft_dir(directory, config=None, tensors=None, drop=()):
    """A LoRA adapter on q_proj of layer 0 of the tiny Llama, written by hand: ``config`` entries replace
    the defaults, ``drop`` keys are left out."""
    q = "model.layers.0.self_attn.q_proj"
    tensors = tensors if tensors is not None else {f"{q}.lora_A.weight": torch.randn(4, 32) * 0.1,
                                                   f"{q}.lora_B.weight": torch.randn(32, 4) * 0.1}
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "none"} | (config or {})
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file({f"base_model.model.{k}": v for k, v in tensors.items() if k not in drop},
              directory / "adapter_model.safetensors")
    return directory


def _truncated(directory):
    data = (directory / "adapter_model.safetensors").read_bytes()
    (directory / "adapter_model.safetensors").write_bytes(data[:len(data) - 7])


def _as_legacy_bin(directory, value):
    (directory / "adapter_model.safetensors").unlink()
    torch.save(value, directory / "adapter_model.bin")


def _truncated_legacy_bin(directory):
    _as_legacy_bin(directory, {"x": torch.zeros(3)})
    (directory / "adapter_model.bin").write_bytes((directory / "adapter_model.bin").read_bytes()[:50])


Q = "model.layers.0.self_attn.q_proj"
BAD_PEFT_DIRS = [
    ("lora-alpha-null", dict(config={"lora_alpha": None}), None,
     r"adapter_config.json: lora_alpha=None; expected a finite number"),
    ("lora-alpha-string", dict(config={"lora_alpha": "big"}), None, r"adapter_config.json: lora_alpha='big'; expected"),
    ("rank-float", dict(config={"r": 4.5}), None, r"adapter_config.json: r=4.5; expected an integer"),
    ("dropout-string", dict(config={"lora_dropout": "0.1"}), None, r"adapter_config.json: lora_dropout='0.1'; expected"),
    ("rank-pattern-bad-regex", dict(config={"rank_pattern": {"q_proj(": 2}}), None,
     rf"adapter_config.json: rank_pattern key 'q_proj\(' is not a valid regular expression \(.*\); matched against "
     rf"module '{Q}'"),
    ("alpha-pattern-string", dict(config={"alpha_pattern": {"q_proj": "big"}}), None,
     rf"adapter_config.json: alpha_pattern\['q_proj'\] \(module '{Q}'\)='big'; expected a finite number"),
    ("modules-to-save-string", dict(config={"modules_to_save": "lm_head"}), None,
     r"adapter_config.json: modules_to_save='lm_head'; expected a list of module names"),
    ("lora-a-missing", dict(drop=[f"{Q}.lora_A.weight"]), None,
     rf"module '{Q}': {Q}.lora_A.weight is missing \(the file has {Q}.lora_B.weight\)"),
    ("lora-b-missing", dict(drop=[f"{Q}.lora_B.weight"]), None,
     rf"module '{Q}': {Q}.lora_B.weight is missing \(the file has {Q}.lora_A.weight\)"),
    ("dora-magnitude", dict(tensors={f"{Q}.lora_A.weight": torch.zeros(4, 32), f"{Q}.lora_B.weight": torch.zeros(32, 4),
                                     f"{Q}.lora_magnitude_vector": torch.ones(32)}), None,
     rf"tensors peft-ops has no place for: '{Q}.lora_magnitude_vector' is a DoRA magnitude vector"),
    ("head-without-task", dict(tensors={f"{Q}.lora_A.weight": torch.zeros(4, 32), f"{Q}.lora_B.weight": torch.zeros(32, 4),
                                        "lm_head.weight": torch.zeros(64, 32)}), None,
     r"'lm_head.weight' is a tensor of no adapted module, and of no module saved whole: modules_to_save is None and "
     r"task_type None"),
    ("truncated-safetensors", {}, _truncated, r"adapter_model.safetensors: not a readable safetensors file"),
    ("bin-truncated", {}, _truncated_legacy_bin, r"adapter_model.bin: not a readable torch.save file"),
    ("bin-pickled-model", {}, lambda d: _as_legacy_bin(d, torch.nn.Linear(2, 2)),
     r"adapter_model.bin: holds Python objects other than tensors \(a pickled model, as torch.save\(model\) writes; "
     r"here torch.nn.modules.linear.Linear\), which loading would run as code, so it is refused"),
]


@pytest.mark.parametrize("spec, damage, message", [c[1:] for c in BAD_PEFT_DIRS], ids=[c[0] for c in BAD_PEFT_DIRS])
def test_import_peft_refuses_with_the_reason(spec, damage, message, tmp_path):
    directory = _peft_dir(tmp_path / "adapter", **spec)
    if damage:
        damage(directory)
    model = BUILD["llama"]()
    before = _snapshot(model)
    with pytest.raises(PeftFormatError, match=message):
        peft_ops.import_peft(model, directory)
    _assert_unchanged(model, before)


def test_a_peft_model_is_refused_with_what_to_pass(tmp_path):
    """PEFT's PeftModel in place of the model: every name inside it carries PEFT's prefix."""
    theirs = peft.get_peft_model(BUILD["llama"](), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    theirs.save_pretrained(tmp_path / "peft")
    ours = adapted("llama", "lora")
    peft_ops.save_adapter(ours, tmp_path / "ours.safetensors")
    tlora = {f"{Q}.random_A": torch.randn(32, 2), f"{Q}.random_C": torch.randn(2, 32), f"{Q}.lora_B": torch.zeros(2, 2),
             f"{Q}.lora_scaling": torch.ones(1)}
    before = _snapshot(theirs)
    wrapped = r"the model is PEFT's PeftModel, whose module names carry PEFT's prefix .*; pass the model it wraps: " \
              r"peft_model.get_base_model\(\), or peft_model.unload\(\)"
    with pytest.raises(PeftFormatError, match=wrapped):
        peft_ops.import_peft(theirs, tmp_path / "peft")
    with pytest.raises(PeftFormatError, match=wrapped):
        peft_ops.import_tlora(theirs, tlora)
    with pytest.raises(peft_ops.AdapterFileError, match=wrapped):
        peft_ops.load_adapter(theirs, tmp_path / "ours.safetensors")
    with pytest.raises(PeftFormatError, match=rf"module '{Q}' is PEFT's own adapter layer \(Linear\); take PEFT's "
                                              rf"adapters out first: peft_model.unload\(\)"):
        peft_ops.import_peft(theirs.get_base_model(), tmp_path / "peft")
    _assert_unchanged(theirs, before)


class AuthorsTLoRALayer(torch.nn.Module):
    """The layout of the TLoRA authors' layer (github.com/itanvir/tlora, tlora.py), rebuilt for the tests:
    the base layer kept as ``.linear``; ``random_A`` (K×r) and ``random_C`` (r×N) frozen, ``lora_B`` (r×r)
    and ``lora_scaling`` (shape (1,)) trained; dropout 0.5 on the adapter's output after the scaling."""

    def __init__(self, base, rank, seed):
        super().__init__()
        n, k = base.weight.shape
        g = torch.Generator().manual_seed(seed)
        self.linear = base
        self.random_A = torch.nn.Parameter(torch.randn(k, rank, generator=g), requires_grad=False)
        self.lora_B = torch.nn.Parameter(torch.randn(rank, rank, generator=g) * 0.3)  # trained: not at 0
        self.random_C = torch.nn.Parameter(torch.randn(rank, n, generator=g), requires_grad=False)
        self.lora_scaling = torch.nn.Parameter(torch.tensor([0.7]))
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.linear(x) + self.dropout(self.lora_scaling * (x @ self.random_A @ self.lora_B @ self.random_C))


def authors_tlora_model():
    """A tiny RoBERTa with the authors' layers on query and value, as their create_lora_model places them."""
    from test_modules_to_save import tiny_roberta

    model = tiny_roberta()
    attention = model.roberta.encoder.layer[0].attention.self
    attention.query = AuthorsTLoRALayer(attention.query, 4, seed=1)
    attention.value = AuthorsTLoRALayer(attention.value, 4, seed=2)
    return model.eval()


def test_authors_tlora_model_and_its_pickle(tmp_path):
    """Their experiments.py saves torch.save(model): the model object imports; the pickle is refused with
    what it is, and loads once the trusted file is unpickled by hand."""
    from test_modules_to_save import logits as cls_logits, tiny_roberta

    theirs = authors_tlora_model()
    expected = cls_logits(theirs)
    ours = tiny_roberta()
    names = peft_ops.import_tlora(ours, theirs)
    assert names == [f"roberta.encoder.layer.0.attention.self.{p}" for p in ("query", "value")]
    assert rel_error(cls_logits(ours), expected) <= 1e-5
    torch.save(theirs, tmp_path / "model.pt")
    fresh = tiny_roberta()
    before = _snapshot(fresh)
    with pytest.raises(PeftFormatError, match=r"model.pt: holds Python objects other than tensors \(a pickled model, "
                                              r"as torch.save\(model\) writes; here transformers\..*\), which loading "
                                              r"would run as code, so it is refused. Only "
                                              r"for a file you trust: torch.load\(path, weights_only=False\)"
                                              r".state_dict\(\) gives its state dict"):
        peft_ops.import_tlora(fresh, tmp_path / "model.pt")
    _assert_unchanged(fresh, before)
    trusted = torch.load(tmp_path / "model.pt", weights_only=False).state_dict()
    peft_ops.import_tlora(fresh, trusted)
    assert rel_error(cls_logits(fresh), expected) <= 1e-5


def test_import_tlora_blames_the_tensor_at_fault():
    model = BUILD["gpt2"]()
    name = "transformer.h.0.mlp.c_fc"  # 32 -> 128
    state = {f"{name}.random_A": torch.randn(32, 4), f"{name}.random_C": torch.randn(4, 128),
             f"{name}.lora_B": torch.randn(4, 4), f"{name}.lora_scaling": 0.5}  # α as a plain number
    fresh = BUILD["gpt2"]()
    peft_ops.import_tlora(fresh, state)
    assert fresh.transformer.h[0].mlp.c_fc.tlora_alpha.item() == 0.5
    before = _snapshot(model)
    with pytest.raises(PeftFormatError, match=rf"checkpoint: {name}.lora_B has shape \(5, 5\); expected \(4, 4\) "
                                              rf"\(A: K×r, C: r×N, B: r×r, at rank 4\) for the model's 128×32 layer$"):
        peft_ops.import_tlora(model, state | {f"{name}.lora_B": torch.randn(5, 5)})
    with pytest.raises(PeftFormatError, match=rf"checkpoint: {name}.lora_scaling is a str; expected a tensor"):
        peft_ops.import_tlora(model, state | {f"{name}.lora_scaling": "0.5"})
    _assert_unchanged(model, before)


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
