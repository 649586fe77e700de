"""Adapter files: compact, exact round trips, and refusal (model untouched) of files that don't fit."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import peft_ops
from peft_ops import AdapterFileError
from peft_ops.adapter_file import adapter_file_bytes, read_adapter_file
from test_inject import _assert_unchanged, _snapshot
from utils import TinyModel, method_options, randomize_adapters, rel_error

METHODS = list(peft_ops.METHODS)


def _adapted(method, seed=1, **kw):
    model = TinyModel(seed)
    peft_ops.inject(model, method, 4, target_modules="all-linear", seed=5, **method_options(method), **kw)
    randomize_adapters(model, 0.2)
    return model


@pytest.fixture
def saved(tmp_path):
    """A LoRA-XS adapter file and the model it came from."""
    model = _adapted("loraxs")
    path = tmp_path / "adapter.safetensors"
    peft_ops.save_adapter(model, path)
    return model, path


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_is_bit_exact(method, tmp_path):
    model = _adapted(method)
    x = torch.randn(4, 32)
    expected = model(x)
    path = tmp_path / "a.safetensors"
    info = peft_ops.save_adapter(model, path)
    fresh = TinyModel(1)
    names = peft_ops.load_adapter(fresh, path)
    assert names == sorted(n for n, _ in peft_ops.adapter_layers(model))
    assert torch.equal(fresh(x), expected)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}
    assert info.modules == 12 and info.file_bytes == path.stat().st_size
    assert info.trainable_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("method, stored", [
    ("lora", {"lora_A", "lora_B"}), ("symlora", {"symlora_Q", "symlora_lambda"}),
    ("loraxs", {"loraxs_R"}), ("tlora", {"tlora_B", "tlora_alpha"})])
def test_file_holds_only_trainable_tensors(method, stored, tmp_path):
    model = _adapted(method)
    info = peft_ops.save_adapter(model, tmp_path / "a.safetensors")
    file = read_adapter_file(tmp_path / "a.safetensors")
    assert {t for entry in file.entries.values() for t in entry.shapes} == stored
    assert info.tensor_bytes == info.trainable_parameters * 4  # float32
    if method in ("loraxs", "tlora"):  # r×r cores: the frozen factors are regenerated, not stored
        assert info.tensor_bytes == 12 * (16 + (method == "tlora")) * 4


@pytest.mark.parametrize("method", ["loraxs", "tlora"])
def test_include_frozen(method, tmp_path):
    model = _adapted(method)
    x = torch.randn(4, 32)
    info = peft_ops.save_adapter(model, tmp_path / "a.safetensors", include_frozen=True)
    assert info.tensor_bytes > info.trainable_parameters * 4
    fresh = TinyModel(1)
    peft_ops.load_adapter(fresh, tmp_path / "a.safetensors")
    assert torch.equal(fresh(x), model(x))


def test_adapter_dtype_survives_the_round_trip(tmp_path):
    model = _adapted("tlora").to(torch.bfloat16)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    peft_ops.save_adapter(model, tmp_path / "a.safetensors")
    fresh = TinyModel(1).to(torch.bfloat16)
    peft_ops.load_adapter(fresh, tmp_path / "a.safetensors")
    assert fresh.blocks[0].q_proj.tlora_B.dtype == torch.bfloat16
    assert torch.equal(fresh(x), model(x))


def test_refuses_another_base_model(saved):
    _, path = saved
    other = TinyModel(seed=2)  # same architecture, other weights
    before = _snapshot(other)
    with pytest.raises(AdapterFileError, match=r"base weight differs .*\(fingerprint mismatch"):
        peft_ops.load_adapter(other, path)
    _assert_unchanged(other, before)


def test_refuses_another_shape(saved):
    _, path = saved
    other = TinyModel(seed=1, kv_dim=8)
    before = _snapshot(other)
    with pytest.raises(AdapterFileError, match=r"the model's weight is 8×32, the adapter was made for 16×32"):
        peft_ops.load_adapter(other, path)
    _assert_unchanged(other, before)


def test_refuses_a_model_without_the_module(tmp_path):
    model = _adapted("lora")
    peft_ops.save_adapter(model, tmp_path / "a.safetensors")
    other = torch.nn.Sequential(torch.nn.Linear(32, 32))
    before = _snapshot(other)
    with pytest.raises(AdapterFileError, match=r"module 'blocks.0.k_proj' is not in the model"):
        peft_ops.load_adapter(other, tmp_path / "a.safetensors")
    _assert_unchanged(other, before)


@pytest.mark.parametrize("method, rank, message", [
    ("lora", 4, r"module 'blocks.0.k_proj': the file holds a loraxs adapter of rank 4, the model has a lora "
                r"adapter of rank 4 there"),
    ("loraxs", 2, r"the file holds a loraxs adapter of rank 4, the model has a loraxs adapter of rank 2"),
])
def test_refuses_another_method_or_rank(saved, method, rank, message):
    _, path = saved
    model = TinyModel(1)
    peft_ops.inject(model, method, rank, target_modules="all-linear")
    before = _snapshot(model)
    with pytest.raises(AdapterFileError, match=message):
        peft_ops.load_adapter(model, path)
    _assert_unchanged(model, before)


def test_refuses_a_model_with_adapters_the_file_lacks(tmp_path):
    model = TinyModel(1)
    peft_ops.inject(model, "tlora", 4, target_modules=["q_proj"])
    peft_ops.save_adapter(model, tmp_path / "a.safetensors")
    other = TinyModel(1)
    peft_ops.inject(other, "tlora", 4, target_modules=["q_proj", "v_proj"])
    before = _snapshot(other)
    with pytest.raises(AdapterFileError, match=r"the model has adapters on \['blocks.0.v_proj', 'blocks.1.v_proj'\], "
                                               r"which the file lacks"):
        peft_ops.load_adapter(other, tmp_path / "a.safetensors")
    _assert_unchanged(other, before)


@pytest.mark.parametrize("method", METHODS)
def test_load_into_injected_adapters_in_place(method, tmp_path):
    """inject, then load: the file's values go into the existing tensors, which an optimizer may hold."""
    trained = _adapted(method)
    x = torch.randn(4, 32)
    expected = trained(x)
    peft_ops.save_adapter(trained, tmp_path / "a.safetensors")
    model = TinyModel(1)
    peft_ops.inject(model, method, 4, target_modules="all-linear", seed=123, alpha=1.0, **method_options(method))
    params = [p for p in model.parameters() if p.requires_grad]
    peft_ops.load_adapter(model, tmp_path / "a.safetensors")
    assert [p for p in model.parameters() if p.requires_grad] == params  # the same tensor objects
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize("damage", ["truncate", "flip_data_byte", "garbage"])
def test_refuses_a_damaged_file(saved, damage):
    _, path = saved
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 40]
    elif damage == "flip_data_byte":
        data[-3] ^= 0x55
    else:
        data = bytearray(b"not a safetensors file at all")
    path.write_bytes(bytes(data))
    model = TinyModel(1)
    before = _snapshot(model)
    with pytest.raises(AdapterFileError, match=r"not a readable safetensors file|checksum mismatch"):
        peft_ops.load_adapter(model, path)
    _assert_unchanged(model, before)


def _rewrite(path, edit_metadata=None):
    with safe_open(path, "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if edit_metadata:
        edit_metadata(metadata)
    save_file(tensors, path, metadata=metadata)


def test_refuses_edited_metadata(saved):
    _, path = saved

    def more_alpha(metadata):
        adapter = json.loads(metadata["adapter"])
        adapter["groups"][0]["alpha"] = 99.0
        metadata["adapter"] = json.dumps(adapter)

    _rewrite(path, more_alpha)
    with pytest.raises(AdapterFileError, match=r"checksum mismatch: the file is damaged or was edited"):
        peft_ops.load_adapter(TinyModel(1), path)


def test_refuses_a_file_that_is_not_an_adapter(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(AdapterFileError, match=r"not a peft-ops adapter file"):
        peft_ops.load_adapter(TinyModel(1), tmp_path / "x.safetensors")


def test_refuses_regenerated_factors_that_differ(saved, monkeypatch):
    """A change in how frozen factors are computed (here: flipped singular-vector signs) must not
    pass silently."""
    import peft_ops.methods as methods

    _, path = saved
    svd = methods.top_singular_triplets

    def flipped(weight, rank, **options):
        u, s, v = svd(weight, rank, **options)
        return -u, s, -v

    monkeypatch.setattr(methods, "top_singular_triplets", flipped)
    model = TinyModel(1)
    before = _snapshot(model)
    with pytest.raises(AdapterFileError, match=r"regenerated frozen loraxs factors differ"):
        peft_ops.load_adapter(model, path)
    _assert_unchanged(model, before)


def craft(path, edit_groups=None, edit_stored=None, edit_saved=None, edit_checks=None):
    """Rewrite an adapter file with edited metadata or tensors and a *valid* checksum, written by the
    project's own code as anyone who reads adapter_file.py can: only validation can stop it.
    ``edit_groups(groups)``, ``edit_stored(tensors by module.tensor)``, ``edit_saved(modules_to_save
    state by module)`` and ``edit_checks(checks)`` (seeds, fingerprints, signatures) edit in place."""
    file = read_adapter_file(path)
    tensors = file.tensors()
    adapter = json.loads(file.adapter_json)
    groups = adapter["groups"]
    stored = {f"{n}.{t}": tensors[f"{n}.{t}"] for n, e in file.entries.items() for t in e.shapes}
    saved = {m: {t: tensors[f"{m}.{t}"] for t in names} for m, names in file.saved_modules.items()}
    order = [n for g in groups for n in g["modules"]]
    frozen = [n for n in order if peft_ops.get_method(file.entries[n].method).frozen]
    checks = {"seeds": [file.entries[n].seed for n in order],
              "fingerprints": torch.stack([file.entries[n].fingerprint for n in order]),
              "signatures": torch.stack([file.entries[n].signature for n in frozen]) if frozen else None}
    for edit, value in ((edit_groups, groups), (edit_stored, stored), (edit_saved, saved), (edit_checks, checks)):
        if edit:
            edit(value)
    path.write_bytes(adapter_file_bytes(groups, checks["seeds"], checks["fingerprints"], checks["signatures"],
                                        stored, saved))


def group_of(groups, module):
    return next(g for g in groups if module in g["modules"])


def _load_refused(path, message, model=None):
    model = model or TinyModel(1)
    before = _snapshot(model)
    with pytest.raises(AdapterFileError, match=message):
        peft_ops.load_adapter(model, path)
    _assert_unchanged(model, before)


def test_refuses_a_tensor_that_is_not_the_layers(saved):
    """A name like 'weight' resolves to the base layer's weight on an adapter layer: it must be refused
    before anything is written."""
    _, path = saved

    def add_weight(groups):
        group = group_of(groups, "blocks.0.k_proj")
        group["tensors"]["weight"] = [16, 32]

    def weights(stored):
        for name in ("blocks.0.k_proj", "blocks.0.v_proj", "blocks.1.k_proj", "blocks.1.v_proj"):
            stored[f"{name}.weight"] = torch.zeros(16, 32)

    craft(path, add_weight, weights)
    _load_refused(path, r"module 'blocks.0.k_proj': the file stores tensors \['loraxs_R', 'weight'\]; a loraxs layer "
                        r"has \['loraxs_R'\]")


def test_refuses_an_incomplete_tensor_list(tmp_path):
    model = _adapted("lora")
    path = tmp_path / "a.safetensors"
    peft_ops.save_adapter(model, path)
    craft(path, lambda groups: [g["tensors"].pop("lora_B") for g in groups])
    _load_refused(path, r"the file stores tensors \['lora_A'\]; a lora layer has \['lora_A', 'lora_B'\]")


@pytest.mark.parametrize("edit, message", [
    (lambda g: g.update(dtype="int64"), r"dtype 'int64', base dtype 'float32'; expected one of float32, float16"),
    (lambda g: g.update(bias=False), r"made for a layer without a bias"),
    (lambda g: g.update(rank=0), r"rank 0, in_features 32, out_features 16; expected positive integers"),
    (lambda g: g.update(rank=True), r"rank True, in_features 32, out_features 16; expected positive integers"),
    (lambda g: g.update(method="dora"), r"method 'dora'; expected one of"),
    (lambda g: g.update(dropout=1.5), r"dropout 1.5; expected finite numbers, dropout in \[0, 1\)"),
    (lambda g: g.update(options={"svd": "magic"}), r"the metadata does not make a loraxs layer"),
    (lambda g: g.pop("alpha"), r"the adapter metadata is malformed \(KeyError: 'alpha'\)"),
])
def test_refuses_inconsistent_metadata(saved, edit, message):
    _, path = saved
    craft(path, lambda groups: edit(group_of(groups, "blocks.0.k_proj")))
    _load_refused(path, message)


def test_refuses_malformed_groups(saved):
    _, path = saved
    with safe_open(path, "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    metadata["adapter"] = json.dumps({"groups": ["blocks.0.q_proj"]})
    save_file(tensors, path, metadata=metadata)
    _load_refused(path, r"groups must be a list of objects")


def test_a_pickle_is_never_unpickled(tmp_path):
    """Loading reads safetensors only: a pickle (which could run code) is refused unread."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "ran"), "w"))

    path = tmp_path / "adapter.safetensors"
    path.write_bytes(pickle.dumps(Payload()))
    _load_refused(path, r"not a readable safetensors file")
    assert not (tmp_path / "ran").exists()


def test_save_from_a_merged_model_loads_into_the_base(tmp_path):
    model = _adapted("tlora")
    x = torch.randn(4, 32)
    expected = model(x)
    peft_ops.merge(model)
    peft_ops.save_adapter(model, tmp_path / "a.safetensors")
    fresh = TinyModel(1)
    peft_ops.load_adapter(fresh, tmp_path / "a.safetensors")
    assert torch.allclose(fresh(x), expected, rtol=1e-5, atol=1e-6)


def test_include_frozen_does_not_regenerate(tmp_path, monkeypatch):
    import peft_ops.methods as methods

    model = _adapted("loraxs")
    x = torch.randn(4, 32)
    peft_ops.save_adapter(model, tmp_path / "a.safetensors", include_frozen=True)

    def no_svd(*args, **kwargs):
        raise AssertionError("the SVD was recomputed")

    monkeypatch.setattr(methods, "top_singular_triplets", no_svd)
    fresh = TinyModel(1)
    peft_ops.load_adapter(fresh, tmp_path / "a.safetensors")
    assert torch.equal(fresh(x), model(x))


def test_loading_in_place_changes_no_requires_grad_flag(tmp_path):
    model = _adapted("loraxs")
    peft_ops.save_adapter(model, tmp_path / "a.safetensors")
    target = TinyModel(1)
    peft_ops.inject(target, "loraxs", 4, target_modules="all-linear")
    target.lm_head.weight.requires_grad_(True)  # the user trains the head too
    target.blocks[0].q_proj.loraxs_R.requires_grad_(False)  # and froze one adapter
    peft_ops.load_adapter(target, tmp_path / "a.safetensors")
    assert target.lm_head.weight.requires_grad and not target.blocks[0].q_proj.loraxs_R.requires_grad


@pytest.mark.parametrize("saved_dtype, loaded_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)],
                         ids=["float32-to-bfloat16", "bfloat16-to-float32"])
def test_loraxs_file_loads_into_a_cast_copy_of_its_base(saved_dtype, loaded_dtype, tmp_path):
    """The fingerprint accepts a bf16 copy of the base on purpose: so must the regenerated-factor check
    (its SVD moves by about bf16's precision), and the adapter must compute the same function."""
    model = _adapted("loraxs").to(saved_dtype)
    peft_ops.save_adapter(model, tmp_path / "a.safetensors")
    fresh = TinyModel(1).to(loaded_dtype)
    peft_ops.load_adapter(fresh, tmp_path / "a.safetensors")
    x = torch.randn(4, 32)
    assert rel_error(fresh.float()(x), model.float()(x)) < 1e-2


def test_a_mismatch_says_which_quantity_differed_by_how_much(saved, monkeypatch):
    import peft_ops.methods as methods

    _, path = saved
    svd = methods.top_singular_triplets
    monkeypatch.setattr(methods, "top_singular_triplets",
                        lambda w, r, **options: (lambda u, s, v: (u, s * 1.01, v))(*svd(w, r, **options)))
    _load_refused(path, r"module 'blocks.0.k_proj': the regenerated frozen loraxs factors differ from the ones the "
                        r"adapter was trained with: signed sum \d of the down factor's column norms is -?[\d.]+, the file says "
                        r"-?[\d.]+ \(difference 0.00\d+ of the column norms' sum, tolerance 0.0001\)")


@pytest.mark.parametrize("method", METHODS)
def test_files_of_format_1_still_load(method):
    """tests/data holds files written by the last version that wrote format 1, and the logits of the model
    that saved them (TinyModel(1), inject(all-linear, rank 4, seed 5), input seeded 7)."""
    data = Path(__file__).parent / "data"
    model = TinyModel(1)
    assert read_adapter_file(data / f"format1-{method}.safetensors").version == 1
    peft_ops.load_adapter(model, data / f"format1-{method}.safetensors")
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(model(x), torch.load(data / f"format1-{method}-logits.pt"))
