"""Adapter files as untrusted input: forged files (their checksum recomputed with the project's own
code, as anyone can), parsing bombs and files with tensors the model has no place for are refused with an
AdapterFileError naming the file and the module or key, and the model is left exactly as it was."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import peft_ops
from peft_ops import AdapterFileError
from peft_ops.adapter_file import checksum, read_adapter_file
from test_adapter_file import _adapted, craft, group_of
from test_inject import _assert_unchanged, _snapshot
from utils import TinyModel


def _refused(path, message, model=None):
    model = model if model is not None else TinyModel(1)
    before = _snapshot(model)
    with pytest.raises(AdapterFileError, match=message) as error:
        peft_ops.load_adapter(model, path)
    assert str(path) in str(error.value)
    _assert_unchanged(model, before)
    if next(peft_ops.adapter_layers(model), None) is not None:  # a model left whole still saves
        peft_ops.save_adapter(model, path.parent / "after.safetensors")


def _with_heads(tmp_path):
    """A LoRA-XS file whose modules_to_save holds lm_head, and a model that has the same adapters."""
    model = TinyModel(1)
    peft_ops.inject(model, "loraxs", 4, target_modules=["q_proj", "k_proj"], modules_to_save=["lm_head"])
    path = tmp_path / "a.safetensors"
    peft_ops.save_adapter(model, path)
    return model, path


def _same_adapters():
    model = TinyModel(1)
    peft_ops.inject(model, "loraxs", 4, target_modules=["q_proj", "k_proj"], modules_to_save=["lm_head"])
    return model


@pytest.mark.parametrize("into", ["fresh model", "model with the adapters"])
def test_modules_to_save_naming_a_base_layer_is_refused(tmp_path, into):
    _, path = _with_heads(tmp_path)
    craft(path, edit_saved=lambda saved: saved.update({"blocks.0.q_proj.base_layer": {"weight": torch.zeros(32, 32)}}))
    message = r"modules_to_save 'blocks.0.q_proj.base_layer' is (not a module|inside the adapter at 'blocks.0.q_proj')"
    model = TinyModel(1) if into == "fresh model" else _same_adapters()
    _refused(path, message, model)
    if into != "fresh model":
        assert not model.blocks[0].q_proj.base_layer.weight.requires_grad


def test_modules_to_save_naming_a_missing_module_is_refused_before_anything_changes(tmp_path):
    _, path = _with_heads(tmp_path)
    craft(path, edit_saved=lambda saved: saved.update({"no.such": {"weight": torch.zeros(2)}}))
    model = TinyModel(1)
    _refused(path, r"modules_to_save 'no.such' is not a module of the model", model)
    assert next(peft_ops.adapter_layers(model), None) is None  # no adapter swapped in


@pytest.mark.parametrize("saved_name", ["blocks.0.q_proj", "blocks.0", "blocks.0.q_proj.base_layer"])
def test_modules_to_save_naming_an_adapter_or_around_one_is_refused(tmp_path, saved_name):
    _, path = _with_heads(tmp_path)
    model = _same_adapters()
    state = {k.removeprefix(saved_name + "."): v for k, v in model.state_dict().items() if k.startswith(saved_name + ".")}
    craft(path, edit_saved=lambda saved: saved.update({saved_name: state}))
    _refused(path, rf"modules_to_save '{saved_name}' is", _same_adapters())


def test_nested_adapter_entries_are_refused(tmp_path):
    model, path = _with_heads(tmp_path)

    def nest(groups):
        group = group_of(groups, "blocks.0.q_proj")
        groups.append({**group, "modules": ["blocks.0.q_proj.base_layer"]})

    def values(stored):
        stored["blocks.0.q_proj.base_layer.loraxs_R"] = stored["blocks.0.q_proj.loraxs_R"].clone()

    def checks(c):
        c["seeds"].append(c["seeds"][0])
        c["fingerprints"] = torch.cat([c["fingerprints"], c["fingerprints"][:1]])
        c["signatures"] = torch.cat([c["signatures"], c["signatures"][:1]])

    craft(path, nest, values, edit_checks=checks)
    _refused(path, r"module 'blocks.0.q_proj.base_layer' is (not in the model|inside the adapter)")
    _refused(path, r"module 'blocks.0.q_proj.base_layer' is inside the adapter at 'blocks.0.q_proj'", _same_adapters())


@pytest.mark.parametrize("where", ["fingerprint", "signature"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_checks_are_refused(tmp_path, where, value):
    _, path = _with_heads(tmp_path)
    key = {"fingerprint": "fingerprints", "signature": "signatures"}[where]
    craft(path, edit_checks=lambda c: c[key].fill_(value))
    _refused(path, r"module 'blocks.0.k_proj': its (base-weight fingerprint|frozen-factor signature) holds non-finite")


@pytest.mark.parametrize("literal", ["Infinity", "NaN", "-Infinity"])
def test_non_finite_json_numbers_are_refused(tmp_path, literal):
    _, path = _with_heads(tmp_path)
    with safe_open(path, "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    metadata["adapter"] = metadata["adapter"].replace('"alpha":4.0', f'"alpha":{literal}')
    metadata["checksum"] = checksum(metadata["adapter"], tensors)
    save_file(tensors, path, metadata=metadata)
    _refused(path, rf"the adapter metadata is not valid JSON \(non-finite number {literal}")


def _retyped(path, key, dtype):
    with safe_open(path, "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors[key] = tensors[key].to(dtype)
    metadata["checksum"] = checksum(metadata["adapter"], tensors)
    save_file(tensors, path, metadata=metadata)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int8, torch.float16, torch.float64])
@pytest.mark.parametrize("key", ["adapter.float32", "peft_ops.fingerprints", "peft_ops.signatures", "lm_head.weight"])
def test_tensors_of_other_dtypes_are_refused_not_cast(tmp_path, key, dtype):
    _, path = _with_heads(tmp_path)
    _retyped(path, key, dtype)
    _refused(path, rf"tensor '{key}'( \(modules_to_save\))? is {str(dtype).removeprefix('torch.')}")


def test_seeds_out_of_range_are_refused(tmp_path):
    _, path = _with_heads(tmp_path)
    craft(path, edit_checks=lambda c: c["seeds"].__setitem__(0, -5))
    _refused(path, r"seed -5; expected an integer in \[0, 2\*\*63\)")


@pytest.mark.parametrize("part", ["adapter metadata", "safetensors header"])
def test_nesting_too_deep_to_parse_is_refused(tmp_path, part):
    _, path = _with_heads(tmp_path)
    deep = "[" * 100_000 + "]" * 100_000
    if part == "adapter metadata":
        with safe_open(path, "pt") as f:
            metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        metadata["adapter"] = deep
        metadata["checksum"] = checksum(deep, tensors)
        save_file(tensors, path, metadata=metadata)
    else:
        header = json.dumps({"__metadata__": {"format": "peft-ops-adapter"}, "x": json.loads("[" * 50 + "]" * 50)})
        header = header.replace("[" * 50 + "]" * 50, deep)
        path.write_bytes(len(header).to_bytes(8, "little") + header.encode())
    _refused(path, rf"the {part} is nested too deeply to parse")


@pytest.mark.parametrize("header_length", [2**62, 10**9, 0])
def test_header_lengths_beyond_the_file_are_refused(tmp_path, header_length):
    path = tmp_path / "a.safetensors"
    path.write_bytes(header_length.to_bytes(8, "little") + b"{}" * 8)
    _refused(path, rf"not a readable safetensors file \(header length {header_length}")


def test_tensors_the_model_has_no_place_for_are_refused_before_any_data_is_read(tmp_path, monkeypatch):
    import peft_ops.adapter_file as adapter_file

    _, path = _with_heads(tmp_path)
    with safe_open(path, "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["padding"] = torch.zeros(16 * 2**20, dtype=torch.uint8)  # 16 MiB the model has no place for
    metadata["checksum"] = checksum(metadata["adapter"], tensors)
    save_file(tensors, path, metadata=metadata)

    def no_data(*args):
        raise AssertionError("tensor data was read before the file was checked against the model")

    monkeypatch.setattr(adapter_file, "_read_data", no_data)
    _refused(path, r"tensors \['padding'\] belong to no module in the metadata")


def test_an_adapter_the_model_cannot_hold_is_refused_before_any_data_is_read(tmp_path, monkeypatch):
    """A file for a larger model (its tensors sized by the metadata): refused on the module's shape."""
    import peft_ops.adapter_file as adapter_file

    _, path = _with_heads(tmp_path)
    craft(path, lambda groups: [g.update(in_features=4096) for g in groups])
    monkeypatch.setattr(adapter_file, "_read_data", lambda *a: (_ for _ in ()).throw(AssertionError("data read")))
    _refused(path, r"module 'blocks.0.k_proj': the model's weight is 16×32, the adapter was made for 16×4096")


@pytest.mark.parametrize("special", ["/dev/null", "fifo"])
def test_only_regular_files_are_read(tmp_path, special):
    import os

    path = special if special == "/dev/null" else str(tmp_path / "fifo")
    if special == "fifo":
        os.mkfifo(path)
    with pytest.raises(AdapterFileError, match=r"not a regular file"):
        peft_ops.load_adapter(TinyModel(1), path)
    with pytest.raises(AdapterFileError, match=r"not a regular file"):
        peft_ops.read_adapter_info(path)


def _llama_like(method, rank):
    """32 attention projections named as in a Llama model ('model.layers.N.self_attn.q_proj'), adapted."""
    from torch import nn

    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList()
    for _ in range(8):
        block = nn.Module()
        block.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(block.self_attn, name, nn.Linear(256, 256, bias=False))
        model.model.layers.append(block)
    peft_ops.inject(model, method, rank, target_modules="all-linear")
    return model


@pytest.mark.parametrize("method, rank", [("loraxs", 16), ("tlora", 64)])
def test_files_are_the_size_of_their_tensors(tmp_path, method, rank):
    """Metadata (the file less the adapters' own tensors) of at most 256 B per module."""
    info = peft_ops.save_adapter(_llama_like(method, rank), tmp_path / "a.safetensors")
    per_module = (info.file_bytes - info.tensor_bytes) / info.modules
    assert info.modules == 32 and info.tensor_bytes == 32 * (rank * rank + (method == "tlora")) * 4
    assert per_module <= 256, per_module


def test_the_same_adapter_gives_the_same_bytes_in_every_process(tmp_path):
    code = ("import sys, torch, peft_ops; sys.path.insert(0, 'tests'); from test_adapter_file import _adapted;"
            "torch.manual_seed(0); m = _adapted('tlora'); peft_ops.save_adapter(m, sys.argv[1])")
    for i in range(2):
        env = {"PYTHONHASHSEED": str(i + 1), "TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"}
        result = subprocess.run([sys.executable, "-c", code, str(tmp_path / f"{i}.safetensors")], env=env,
                                capture_output=True, text=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
        assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "0.safetensors").read_bytes() == (tmp_path / "1.safetensors").read_bytes()


def test_the_file_is_standard_safetensors(tmp_path):
    model = _adapted("loraxs")
    peft_ops.save_adapter(model, tmp_path / "a.safetensors")
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        assert f.metadata()["format_version"] == "2"
        assert sorted(f.keys()) == ["adapter.float32", "peft_ops.fingerprints", "peft_ops.seeds", "peft_ops.signatures"]
    assert read_adapter_file(tmp_path / "a.safetensors").version == 2
