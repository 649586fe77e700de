"""One model, many callers: what the adapters compute is selected per thread by `with` blocks that compose
and cannot leak, and banks obey every model-level operation."""
import threading

import pytest
import torch
from torch import nn

import peft_ops
from test_adapter_file import _adapted
from test_bank import _adapter_files
from test_inject import _assert_unchanged, _snapshot
from utils import TinyModel, randomize_adapters


def _banked(tmp_path, method="loraxs", count=2):
    paths, _ = _adapter_files(tmp_path, method, count=count)
    model = TinyModel(1)
    peft_ops.load_adapter_bank(model, paths)
    return model


@torch.no_grad()
def _outputs(model, x, names):
    with peft_ops.use_adapters(model, names):
        return model(x)


def test_threads_with_different_selections_never_see_each_other(tmp_path):
    model = _banked(tmp_path)
    x = torch.randn(4, 32)
    selections = {"ab": ["a", "b", None, "a"], "ba": ["b", None, "a", "b"]}
    expected = {k: _outputs(model, x, names) for k, names in selections.items()}
    with torch.no_grad():
        expected["base"] = model(x)
    mismatches, errors = [], []
    start = threading.Barrier(3)

    def worker(kind):
        start.wait()
        try:
            for _ in range(200):
                with torch.no_grad():
                    if kind == "base":
                        with peft_ops.disable_adapters(model):
                            out = model(x)
                    else:
                        out = _outputs(model, x, selections[kind])
                if not torch.equal(out, expected[kind]):
                    mismatches.append(kind)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in ("ab", "ba", "base")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and mismatches == []
    assert not torch.equal(expected["ab"], expected["ba"]) and not torch.equal(expected["ab"], expected["base"])


def test_blocks_exited_out_of_order_leak_nothing(tmp_path):
    model = _banked(tmp_path)
    x = torch.randn(2, 32)
    with torch.no_grad():
        base = model(x)
    expected_b = _outputs(model, x, ["b", "b"])
    outer, inner = peft_ops.use_adapters(model, ["a", "a"]), peft_ops.use_adapters(model, ["b", "b"])
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # the outer block ends first
    with torch.no_grad():
        assert torch.equal(model(x), expected_b)
    inner.__exit__(None, None, None)
    with torch.no_grad():
        assert torch.equal(model(x), base)  # nothing stays switched on
    assert peft_ops.remove_adapters(model, ["a"]) == ["a"]  # and nothing refuses for good


def test_nested_blocks_compose(tmp_path):
    model = _banked(tmp_path)
    x = torch.randn(2, 32)
    with torch.no_grad():
        base = model(x)
        with peft_ops.use_adapters(model, ["a", "b"]):
            with peft_ops.disable_adapters(model):
                assert torch.equal(model(x), base)
            with peft_ops.use_adapters(model, ["b", "b"]):
                inner = model(x)
        assert torch.equal(inner, _outputs(model, x, ["b", "b"]))


def test_disable_adapters_covers_banks(tmp_path):
    model = _banked(tmp_path)
    x = torch.randn(2, 32)
    with torch.no_grad():
        base = model(x)
        with peft_ops.use_adapters(model, ["a", "b"]), peft_ops.disable_adapters(model):
            assert torch.equal(model(x), base)


def test_disabling_a_merged_model_changes_nothing_in_it():
    model = _adapted("tlora")
    x = torch.randn(3, 32)
    with torch.no_grad():
        with peft_ops.disable_adapters(model):
            base = model(x)
        adapted = model(x)
        peft_ops.merge(model)
        merged = _snapshot(model)
        with peft_ops.disable_adapters(model):
            assert torch.allclose(model(x), base, atol=1e-6)
            _assert_unchanged(model, merged)  # the weights stay merged for every other thread
        assert torch.allclose(model(x), adapted, atol=1e-5)


def test_changing_the_model_while_a_block_selects_it_is_refused():
    model = TinyModel(1)
    peft_ops.inject(model, "tlora", 4, target_modules="all-linear")
    peft_ops.merge(model)
    inside, leave = threading.Event(), threading.Event()

    def holder():
        with peft_ops.disable_adapters(model):
            inside.set()
            leave.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    inside.wait(30)
    try:
        for change in (peft_ops.unmerge, peft_ops.unload, lambda m: peft_ops.unload(m, merge=True)):
            with pytest.raises(RuntimeError, match=r"block \(in some thread\) selects"):
                change(model)
        assert model.blocks[0].q_proj.merged
    finally:
        leave.set()
        thread.join()
    assert peft_ops.unload(model)  # once the block has ended
    assert not any(isinstance(m, peft_ops.LowRankLinear) for m in model.modules())


def test_unload_removes_banks_and_refuses_to_merge_them(tmp_path):
    model = _banked(tmp_path)
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match=r"cannot be folded"):
        peft_ops.unload(model, merge=True)
    names = peft_ops.unload(model)
    assert names and not list(peft_ops.adapter_banks(model))
    with torch.no_grad():
        assert torch.equal(model(x), TinyModel(1)(x))


class _SequenceFirst(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=False)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

    def forward(self, x):
        return self.encoder(x)


def test_sequence_first_rows_get_their_own_adapters(tmp_path):
    paths = {}
    for name in ("a", "b"):
        model = _SequenceFirst()
        peft_ops.inject(model, "lora", 4, target_modules=["linear1", "linear2"], seed=ord(name))
        randomize_adapters(model, 0.5)
        paths[name] = tmp_path / f"{name}.safetensors"
        peft_ops.save_adapter(model, paths[name])
    model = _SequenceFirst().eval()
    peft_ops.load_adapter_bank(model, paths)
    x = torch.randn(3, 3, 32)  # (sequence, batch, features): as many positions as rows
    names = ["b", None, "a"]
    with torch.no_grad(), peft_ops.use_adapters(model, names):
        out = model(x)
    for i, name in enumerate(names):
        alone = _SequenceFirst().eval()
        if name:
            peft_ops.load_adapter(alone, paths[name])
        with torch.no_grad():
            assert torch.allclose(out[:, i], alone(x[:, i:i + 1])[:, 0], atol=1e-5), (i, name)


def test_a_model_with_both_layouts_asks_for_the_batch_dimension(tmp_path):
    model = _banked(tmp_path)
    model.extra = nn.ModuleList([nn.MultiheadAttention(8, 2, batch_first=True),
                                 nn.MultiheadAttention(8, 2, batch_first=False)])
    with pytest.raises(ValueError, match=r"pass batch_dim="):
        with peft_ops.use_adapters(model, ["a"]):
            pass
    with peft_ops.use_adapters(model, ["a"], batch_dim=0):
        pass


def test_beams_expand_each_rows_adapter(tmp_path):
    model = _banked(tmp_path)
    x = torch.randn(2, 32)
    beams = x.repeat_interleave(3, dim=0)  # as generate(num_beams=3) expands the batch
    with torch.no_grad(), peft_ops.use_adapters(model, ["a", "b"]):
        out = model(beams)
        with pytest.raises(ValueError, match=r"expected a multiple of 2"):
            model(torch.randn(3, 32))
    assert torch.allclose(out, _outputs(model, x, ["a", "b"]).repeat_interleave(3, dim=0), atol=1e-6)


def test_save_pretrained_of_a_model_with_banks_warns_and_the_merged_save_reloads(tmp_path):
    from test_bank import _tiny_llama

    paths = {}
    for name in ("a", "b"):
        source = _tiny_llama()
        peft_ops.inject(source, "loraxs", 4, target_modules=["q_proj", "v_proj"], seed=3)
        paths[name] = tmp_path / f"{name}.safetensors"
        peft_ops.save_adapter(source, paths[name])
    model = _tiny_llama()
    peft_ops.load_adapter_bank(model, paths)
    with pytest.warns(UserWarning, match=r"adapter layers or banks"):
        model.save_pretrained(tmp_path / "raw")
    peft_ops.hf.save_pretrained_merged(model, tmp_path / "merged")
    reloaded = type(model).from_pretrained(tmp_path / "merged")
    tokens = torch.randint(64, (2, 5))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, _tiny_llama()(tokens).logits)


def test_trainable_summary_counts_banks(tmp_path):
    summary = peft_ops.trainable_summary(_banked(tmp_path))
    assert summary.banks == (12, 2) and "adapter banks (inference only, nothing trains): 12 modules, 2 adapters" in \
        str(summary)


def test_compiled_model_follows_the_selection():
    model = _adapted("loraxs")
    x = torch.randn(3, 32)
    with torch.no_grad():
        adapted = model(x)
        with peft_ops.disable_adapters(model):
            base = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        assert torch.allclose(compiled(x), adapted, atol=1e-6)
        with peft_ops.disable_adapters(model):
            assert torch.allclose(compiled(x), base, atol=1e-6)
        assert torch.allclose(compiled(x), adapted, atol=1e-6)


def test_save_adapter_of_a_model_with_only_banks_names_them(tmp_path):
    model = _banked(tmp_path)
    with pytest.raises(ValueError, match=r"only adapter banks holding \['a', 'b'\]: each of those is the adapter file"):
        peft_ops.save_adapter(model, tmp_path / "x.safetensors")
