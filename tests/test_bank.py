"""Adapter banks: every row of a mixed batch equals running its adapter alone (None rows: the base
model), for each method, dtype and input shape, through the reference and the kernels; the kernels
on their own against their PyTorch twins; refusals with the model untouched; HF generate()."""

import pytest
import torch

import peft_ops
from peft_ops import AdapterFileError, bank_kernels, kernels
from test_inject import _assert_unchanged, _snapshot
from utils import DEVICE, TOLERANCE, Conv1D, TinyModel, method_options, randn, randomize_adapters, rel_error

METHODS = list(peft_ops.METHODS)
NAMES = ["a", None, "c", "a", "b", None, "c", "a"]  # rows of one adapter scattered through the batch


def _adapter_files(tmp_path, method, dtype=torch.float32, count=3, seed=5, model_seed=1):
    """``count`` adapter files of ``method`` for TinyModel(model_seed) in ``dtype`` (same frozen
    factors: same base, same seed), named a, b, c, ...; and each adapter loaded alone in float64."""
    paths, alone = {}, {}
    for i in range(count):
        name = "abcdefgh"[i]
        model = TinyModel(model_seed).to(DEVICE, dtype)
        peft_ops.inject(model, method, 4, target_modules="all-linear", seed=seed, **method_options(method))
        randomize_adapters(model, 0.3)
        paths[name] = tmp_path / f"{method}-{name}-{seed}-{model_seed}.safetensors"
        peft_ops.save_adapter(model, paths[name])
        alone[name] = model.double()
    return paths, alone


def _expected(alone, base, x, names):
    """Row i: the float64 model with adapter names[i] alone (or the base) on that row only."""
    with torch.no_grad():
        return torch.cat([(alone[n] if n else base)(x[i:i + 1].double()) for i, n in enumerate(names)])


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_every_row_equals_its_adapter_alone(method, dtype, backend, tmp_path, poisoned):
    paths, alone = _adapter_files(tmp_path, method, dtype)
    base = TinyModel(1).to(DEVICE, dtype)
    model = TinyModel(1).to(DEVICE, dtype)
    assert peft_ops.load_adapter_bank(model, paths, backend=backend) == ["a", "b", "c"]
    banks = dict(peft_ops.adapter_banks(model))
    assert len(banks) == 12 and all(b.names == ["a", "b", "c"] for b in banks.values())
    base64 = TinyModel(1).to(DEVICE, dtype).double()
    for shape in [(len(NAMES), 32), (len(NAMES), 5, 32)]:  # 2-D rows, 3-D (batch, seq, features)
        x = randn(*shape, dtype=dtype)
        expected = _expected(alone, base64, x, NAMES)
        with torch.no_grad(), peft_ops.use_adapters(model, NAMES):
            out = model(x)
        assert out.dtype == dtype and out.shape == expected.shape
        for i, name in enumerate(NAMES):
            assert rel_error(out[i], expected[i]) < TOLERANCE[dtype] * 4, (shape, i, name)
        # the adapters matter: a row is not its neighbour's adapter, nor the base
        assert rel_error(expected[0], expected[2]) > 0.05 and rel_error(expected[0], expected[1]) > 0.05
        with torch.no_grad():  # outside the context: the base model
            assert torch.equal(model(x), base(x))


def _segments(rows: list[int]):
    """The segments use_adapters builds for per-row adapter indices (one token per row)."""
    from peft_ops.bank_layer import RowAdapters

    g = RowAdapters(rows).groups((len(rows),), DEVICE)
    return g.rows, (g.order, g.seg_starts, g.seg_adapters, g.max_segment_rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [3, 16, 20, 100])  # 100: two rank steps, the second partly masked
def test_kernels_match_their_twins(rank, dtype, poisoned):
    adapters, m, k, n = 5, 70, 48, 80
    rows = [(i * 7) % (adapters + 1) - 1 for i in range(m)]  # every adapter, and -1, scattered; segment of >16 rows
    rows[:20] = [2] * 20
    index, segments = _segments(rows)
    a = randn(m, k, dtype=dtype)
    t = randn(m, rank, dtype=torch.float32)
    cores, downs, expands = randn(adapters, rank, rank), randn(adapters, k, rank), randn(adapters, n, rank)
    h = kernels.bank_core(t, cores, index)
    assert rel_error(h, bank_kernels.bank_core(t.double(), cores.double(), index)) < 1e-5
    assert torch.all(h[index < 0] == 0)
    s = kernels.sgmv_shrink(a, downs, *segments)
    assert s.dtype == torch.float32 and s.shape == (len(segments[0]), rank)
    assert rel_error(s, bank_kernels.sgmv_shrink(a.double(), downs.double(), *segments)) < TOLERANCE[dtype]
    base = randn(m, n, dtype=dtype)
    out = kernels.sgmv_expand_add(base.clone(), s, expands, *segments)
    expected = bank_kernels.sgmv_expand_add(base.double(), s.double(), expands.double(), *segments)
    assert rel_error(out, expected) < TOLERANCE[dtype]
    assert torch.equal(out[index < 0], base[index < 0])  # rows without an adapter are left alone


def test_more_segments_than_the_grid_takes_are_refused():
    """Segments sit on grid axis 1 (at most 65535 blocks): more are refused before anything launches."""
    segments, k, n, rank = 65536, 16, 16, 4
    order = torch.arange(segments, device=DEVICE)
    starts = torch.arange(segments + 1, device=DEVICE)
    with pytest.raises(ValueError, match="seg_adapters: 65536 segments .* at most 65535"):
        kernels.sgmv_shrink(randn(segments, k), randn(segments, k, rank), order, starts, order, 1)
    with pytest.raises(ValueError, match="seg_adapters: 65536 segments .* at most 65535"):
        kernels.sgmv_expand_add(randn(segments, n), randn(segments, rank), randn(segments, n, rank), order, starts,
                                order, 1)


def test_adapters_are_added_and_removed_without_reloading_the_others(tmp_path):
    paths, alone = _adapter_files(tmp_path, "loraxs", count=3)
    model = TinyModel(1).to(DEVICE)
    peft_ops.load_adapter_bank(model, {"a": paths["a"], "b": paths["b"]})
    bank = model.blocks[0].q_proj
    core_a = bank.cores[0].clone()
    peft_ops.load_adapter_bank(model, {"c": paths["c"]})
    assert peft_ops.bank_adapters(model) == ["a", "b", "c"] and torch.equal(bank.cores[0], core_a)
    peft_ops.remove_adapters(model, ["b"])
    assert peft_ops.bank_adapters(model) == ["a", "c"] and bank.cores.shape[0] == 2
    names = ["c", None, "a", "c"]
    x = randn(4, 3, 32)
    with torch.no_grad(), peft_ops.use_adapters(model, names):
        out = model(x)
    assert rel_error(out, _expected(alone, TinyModel(1).to(DEVICE).double(), x, names)) < 1e-5
    with pytest.raises(ValueError, match="'b'"):
        with peft_ops.use_adapters(model, ["b"]):
            pass
    peft_ops.remove_adapters(model, ["a", "c"])  # an emptied bank gives the base layer back
    assert not list(peft_ops.adapter_banks(model)) and type(model.blocks[0].q_proj) is torch.nn.Linear


def test_a_memory_per_extra_shared_basis_adapter_is_its_core(tmp_path):
    paths, _ = _adapter_files(tmp_path, "tlora", count=2)
    model = TinyModel(1).to(DEVICE)
    peft_ops.load_adapter_bank(model, paths)
    bank = model.blocks[0].v_proj
    assert bank.cores.shape == (2, 4, 4) and bank.up.shape == (16, 4) and bank.down.shape == (32, 4)


def test_refusals_leave_the_model_untouched(tmp_path):
    paths, _ = _adapter_files(tmp_path, "tlora", count=2)
    other_seed, _ = _adapter_files(tmp_path, "tlora", count=1, seed=6)  # other frozen A and C
    other_base, _ = _adapter_files(tmp_path, "tlora", count=1, model_seed=2)
    lora, _ = _adapter_files(tmp_path, "lora", count=1)
    model = TinyModel(1).to(DEVICE)
    peft_ops.load_adapter_bank(model, {"a": paths["a"]})
    snapshot = _snapshot(model)
    banks = {n: (b.names[:], b.cores.clone()) for n, b in peft_ops.adapter_banks(model)}

    def untouched():
        _assert_unchanged(model, snapshot)
        assert {n: (b.names, b.cores) for n, b in peft_ops.adapter_banks(model)}.keys() == banks.keys()
        for n, b in peft_ops.adapter_banks(model):
            assert b.names == banks[n][0] and torch.equal(b.cores, banks[n][1])

    with pytest.raises(AdapterFileError, match=r"tlora-a-6-1\.safetensors: module 'blocks\.0\.k_proj'.*frozen tlora "
                                               r"factors differ from the bank's"):
        peft_ops.load_adapter_bank(model, {"b": paths["b"], "x": other_seed["a"]})  # b is not half-loaded
    untouched()
    with pytest.raises(AdapterFileError, match="fingerprint mismatch"):
        peft_ops.load_adapter_bank(model, {"x": other_base["a"]})
    untouched()
    with pytest.raises(AdapterFileError, match="lora adapter of rank 4; the bank there holds tlora adapters"):
        peft_ops.load_adapter_bank(model, {"x": lora["a"]})
    untouched()
    with pytest.raises(ValueError, match="already in the model's banks"):
        peft_ops.load_adapter_bank(model, {"a": paths["b"]})
    with pytest.raises(ValueError, match=r"names: \[\"'nobody'\"\] are not in the model's adapter banks"):
        with peft_ops.use_adapters(model, ["a", "nobody"]):
            pass
    untouched()
    x = randn(3, 32)
    with pytest.raises(ValueError, match=r"shape \(3, 32\); use_adapters was given 2 names"):
        with torch.no_grad(), peft_ops.use_adapters(model, ["a", None]):
            model(x)
    untouched()
    with pytest.raises(TypeError, match="one adapter name"):
        with peft_ops.use_adapters(model, "a"):
            pass
    with pytest.raises(RuntimeError, match="inference only"):
        with peft_ops.use_adapters(model, ["a"] * 3):
            model(x.requires_grad_())
    untouched()


def test_files_for_another_model_or_a_single_adapter_module_are_refused(tmp_path):
    paths, _ = _adapter_files(tmp_path, "loraxs", count=1)
    model = TinyModel(1).to(DEVICE)
    peft_ops.inject(model, "loraxs", 4, target_modules=["q_proj"])
    snapshot = _snapshot(model)
    with pytest.raises(AdapterFileError, match="has a single loraxs adapter"):
        peft_ops.load_adapter_bank(model, paths)
    _assert_unchanged(model, snapshot)
    with pytest.raises(AdapterFileError, match="is not in the model"):
        peft_ops.load_adapter_bank(torch.nn.Sequential(torch.nn.Linear(32, 32)), paths)


def test_inject_leaves_banks_alone(tmp_path):
    paths, _ = _adapter_files(tmp_path, "loraxs", count=1)
    model = TinyModel(1).to(DEVICE)
    peft_ops.load_adapter_bank(model, paths)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="'blocks.0.q_proj' holds an adapter bank"):
        peft_ops.inject(model, "lora", 2, target_modules=["q_proj"])
    _assert_unchanged(model, snapshot)
    with pytest.raises(ValueError, match="matched no module; the linear layers of this model are: lm_head"):
        peft_ops.inject(model, "lora", 2, target_modules="all-linear")  # not the banks' base layers
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("method", ["loraxs", "lora"])
def test_conv1d_bases(method, backend, tmp_path, poisoned):
    """GPT-2's Conv1D stores its weight transposed (K×N): both paths read it through strides."""
    def build():
        torch.manual_seed(3)
        return torch.nn.Sequential(Conv1D(24, 32)).to(DEVICE)

    paths, alone = {}, {}
    for name in ("a", "b"):
        model = build()
        peft_ops.inject(model, method, 4, target_modules="all-linear")
        randomize_adapters(model, 0.3)
        paths[name] = tmp_path / f"{name}.safetensors"
        peft_ops.save_adapter(model, paths[name])
        alone[name] = model.double()
    model = build()
    peft_ops.load_adapter_bank(model, paths, backend=backend)
    names = ["b", None, "a", "b"]
    x = randn(4, 3, 32)
    with torch.no_grad(), peft_ops.use_adapters(model, names):
        out = model(x)
    assert rel_error(out, _expected(alone, build().double(), x, names)) < 1e-5


transformers = pytest.importorskip("transformers")


def _tiny_llama(seed=0):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(DEVICE).eval()


@pytest.mark.parametrize("method", METHODS)
def test_hf_generate_keeps_each_rows_adapter(method, tmp_path):
    targets = ["q_proj", "o_proj"] if method == "symlora" else "all-linear"
    paths = {}
    for name in ("a", "b"):
        model = _tiny_llama()
        peft_ops.inject(model, method, 4, target_modules=targets, seed=3)
        randomize_adapters(model, 0.5)
        paths[name] = tmp_path / f"{name}.safetensors"
        peft_ops.save_adapter(model, paths[name])
    names = ["b", None, "a", "b"]
    prompts = torch.randint(64, (len(names), 6), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    generate = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)  # no early EOS
    model = _tiny_llama()
    peft_ops.load_adapter_bank(model, paths)
    with peft_ops.use_adapters(model, names):
        tokens = model.generate(prompts, **generate)
        with torch.no_grad():
            logits = model(prompts).logits
    expected = []
    for i, name in enumerate(names):
        alone = _tiny_llama()
        if name:
            peft_ops.load_adapter(alone, paths[name])
        expected.append(alone.generate(prompts[i:i + 1], **generate))
        with torch.no_grad():
            assert rel_error(logits[i], alone(prompts[i:i + 1]).logits[0]) < 1e-5
    assert torch.equal(tokens, torch.cat(expected))
    assert not torch.equal(expected[0], expected[1]) or not torch.equal(expected[0], expected[2])


def test_bench_bank_mode_smoke(capsys):
    from bench import runner

    assert runner.main(["--mode", "bank", "--smoke"]) == 0
    out = capsys.readouterr().out
    for provider in ("base", "loraxs-alone", "loraxs-bank", "loraxs-loop", "lora-bank"):
        assert f"| decode | {provider} |" in out and f"| prefill | {provider} |" in out
    assert "Memory per extra adapter in a bank: loraxs-bank 0.1 KiB" in out  # 4×4 float32 core
    assert "WRONG RESULT" not in out
