"""The memory benchmark (bench/memory.py): its CPU peak of a step, checked on steps of known allocations;
what it says of a tiny Llama with a 4-bit base against a bfloat16 one; its command line."""
import json

import pytest
import torch

from bench import memory

CPU = torch.device("cpu")
EIGHT_MIB = 8 * 2**20


def eight_mib():
    return torch.ones(2**21)  # float32


def test_the_cpu_peak_counts_what_is_live_at_once():
    def one():
        eight_mib()

    def two_at_once():
        a, b = eight_mib(), eight_mib()
        del a, b

    def one_after_another():
        a = eight_mib()
        del a
        b = eight_mib()
        del b

    assert memory.peak_bytes(lambda: torch.ones(1024).sum(), CPU) < 2**16
    assert EIGHT_MIB <= memory.peak_bytes(one, CPU) < EIGHT_MIB + 2**16
    assert memory.peak_bytes(two_at_once, CPU) >= 2 * EIGHT_MIB
    assert memory.peak_bytes(one_after_another, CPU) < EIGHT_MIB + 2**16  # frees are replayed


def test_the_cpu_peak_counts_a_tensor_made_before_the_step_as_held_throughout():
    # the profiler reports no free of a block allocated before it started (torch warns about it)
    held = [eight_mib()]

    def replace():
        held[0] = None
        held[0] = eight_mib()
    assert EIGHT_MIB <= memory.peak_bytes(replace, CPU) < EIGHT_MIB + 2**16


pytest.importorskip("bitsandbytes", exc_type=ImportError)
pytest.importorskip("transformers")
CONFIG = dict(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
TOKENS = torch.randint(64, (2, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: a second thread only waits on the first, and on a shared CPU it waits long."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    memory.save_tiny_llama(directory, CONFIG)
    return directory


def projections(model):
    return [m for name, m in model.named_modules() if name.endswith("_proj")]


def test_a_4bit_projection_takes_its_bit_widths(checkpoint):
    bf16, nf4 = (projections(memory.load(checkpoint, base, CPU)) for base in ("bf16", "nf4"))
    assert len(bf16) == len(nf4) == 14
    dense = sum(memory.model_bytes(m) for m in bf16)
    quantized = sum(memory.model_bytes(m) for m in nf4)
    assert dense == sum(m.weight.numel() for m in bf16) * 2
    # per weight: 4 bits, and a uint8 block scale per 64 (double quantization: the scales in 8 bits, a
    # float32 scale per 256 blocks, and per layer the 16-value NF4 and 256-value scale code books)
    per_bf16_byte = (4 + 8 / 64) / 16
    assert dense * per_bf16_byte <= quantized  # the packed weight alone would be dense / 4: absmax counted
    assert quantized <= dense * (per_bf16_byte + 32 / (64 * 256) / 16) + len(nf4) * (16 + 256 + 1) * 4


def retaining_dequantized_weights(model):
    """Forward hooks that keep every 4-bit layer's dequantized weight until the step ends: what an
    adapter that kept W for its backward would hold."""
    from peft_ops import quantized

    kept = []
    for module in model.modules():
        if quantized.is_quantized(module):
            module.register_forward_hook(lambda m, args, out: kept.append(quantized.dequantize(m)))
    return kept


def test_a_4bit_base_holds_less_and_peaks_lower_and_keeps_no_dequantized_weight(checkpoint):
    results = {}
    for base in memory.BASES:
        model = memory.adapt(memory.load(checkpoint, base, CPU), "loraxs", 16)
        results[base] = memory.measure(model, TOKENS, CPU)
    bf16, nf4 = results["bf16"], results["nf4"]
    assert bf16["trainable"] == nf4["trainable"] == 14 * 16 * 16
    assert nf4["model_bytes"] < 0.5 * bf16["model_bytes"]  # the float32 adapter factors U, D stay as they are
    assert nf4["peak_bytes"] < 0.75 * bf16["peak_bytes"]
    # what a step adds above the model: no more than with the bf16 base, whose W is the model's own
    assert nf4["step_peak_bytes"] <= bf16["step_peak_bytes"]

    model = memory.adapt(memory.load(checkpoint, "nf4", CPU), "loraxs", 16)
    kept = retaining_dequantized_weights(model)
    retaining = memory.measure(model, TOKENS, CPU)
    assert len(kept) == 2 * 14  # the warm-up step and the measured one
    assert retaining["step_peak_bytes"] > bf16["step_peak_bytes"]  # the check above would catch it


def test_the_command_line_prints_a_table_and_writes_json(checkpoint, monkeypatch, capsys, tmp_path):
    pytest.importorskip("peft")
    monkeypatch.setattr(memory, "LLAMA", CONFIG)
    monkeypatch.setattr(memory, "TOKENS", tuple(TOKENS.shape))
    path = tmp_path / "memory.json"
    assert memory.main(["--adapters", "lora", "peft-lora", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| adapter | trainable | model bf16 | model 4-bit | step peak bf16 | step peak 4-bit |" in out
    rows = json.loads(path.read_text())
    assert [(r["adapter"], r["base"]) for r in rows] == [("lora", "bf16"), ("lora", "nf4"), ("peft-lora", "bf16"),
                                                          ("peft-lora", "nf4")]
    ours, peft = rows[1], rows[3]  # LoRA on the 4-bit base: the same tensors as PEFT's QLoRA
    # r·(in + out) per projection: q, k, v, o, gate, up, down
    assert ours["trainable"] == peft["trainable"] == 2 * 16 * (512 + 384 + 384 + 512 + 3 * 768)
    assert ours["model_bytes"] == peft["model_bytes"]
    assert f"| lora | {ours['trainable']:,} |" in out
