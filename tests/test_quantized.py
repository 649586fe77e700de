"""Adapters over bitsandbytes-quantized bases (QLoRA-style): every method on Linear4bit (NF4/FP4, with and
without double quantization, float32 and bfloat16 compute) and Linear8bitLt, judged against the oracle on
the dequantized weight; inject on a 4-bit Llama; PEFT's QLoRA as the independent judge; adapter files;
the merge policy; memory. bitsandbytes runs all of this on the CPU (in_features a multiple of 64)."""
import copy
import tempfile

import pytest
import torch

import peft_ops
from bench.memory import model_bytes
from peft_ops import reference
from peft_ops.layers import LAYER_CLASSES, logical_weight
from peft_ops.svd import top_singular_triplets
from utils import rel_error

bnb = pytest.importorskip("bitsandbytes", exc_type=ImportError)  # absent, or present but unusable here

OPTIONS = {"symlora": {"allow_non_square": True}}
# (quant_type, double quantization, compute dtype)
CONFIGS = [("nf4", True, torch.float32), ("nf4", False, torch.float32), ("fp4", True, torch.float32),
           ("fp4", False, torch.float32), ("nf4", True, torch.bfloat16)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def linear4bit(n=48, k=64, quant_type="nf4", double=True, compute_dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    dense = torch.nn.Linear(k, n, bias=bias)
    layer = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=compute_dtype, compress_statistics=double,
                              quant_type=quant_type)
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")  # bitsandbytes quantizes here


def randomized(layer, seed=1):
    with torch.no_grad():
        for i, p in enumerate(layer.parameters(recurse=False)):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + i)) * 0.3)
    return layer


def check_against_oracle(layer, tol, x_dtype=torch.float32):
    """Output and every gradient (input, each trainable tensor) against the oracle on the dequantized W."""
    w = logical_weight(layer.base_layer).to(torch.float64)
    bias = layer.base_layer.bias
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(7)).to(x_dtype).requires_grad_()
    y = layer(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(8)).to(y.dtype)  # the oracle's g too
    y.backward(g)
    params = dict(layer.named_parameters(recurse=False))
    twins = {n: p.detach().double().requires_grad_() for n, p in params.items()}
    x64 = x.detach().double().requires_grad_()
    up, core, down, scale = type(layer).method.factors(_View(layer, twins))
    ref = reference.oracle(x64, w, None if bias is None else bias.detach().double(), up, core, down, scale)
    ref.backward(g.double())
    assert rel_error(y, ref) <= tol
    assert rel_error(x.grad, x64.grad) <= tol
    for n, p in params.items():
        assert p.grad is not None, n
        assert rel_error(p.grad, twins[n].grad) <= tol, n


class _View:
    """The layer's tensors with its trainable ones replaced (for Method.factors)."""

    def __init__(self, layer, replaced):
        self._layer, self._replaced = layer, replaced

    def __getattr__(self, name):
        if name in self._replaced:
            return self._replaced[name]
        value = getattr(self._layer, name)
        return value.double() if torch.is_tensor(value) else value


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}-{'dq' if c[1] else 'sq'}-{str(c[2])[6:]}")
@pytest.mark.parametrize("method", list(peft_ops.METHODS))
def test_every_method_over_linear4bit_matches_the_oracle_on_the_dequantized_weight(method, config):
    quant_type, double, compute = config
    base = linear4bit(quant_type=quant_type, double=double, compute_dtype=compute)
    storage = base.weight.data.clone()
    layer = randomized(LAYER_CLASSES[method](base, 4, seed=3, **OPTIONS.get(method, {})))
    assert (layer.in_features, layer.out_features) == (64, 48)
    check_against_oracle(layer, TOL[compute])
    assert type(layer.base_layer.weight).__name__ == "Params4bit"  # still quantized, nothing dense kept
    assert torch.equal(layer.base_layer.weight.data, storage)
    assert not any(t.shape == (48, 64) for t in layer.buffers())


def test_a_base_repacked_by_an_eval_forward_still_passes_gradients():
    # bitsandbytes' CPU repacking (eval, no grad, AVX512-BF16) has no autograd: wrapping undoes it
    base = linear4bit(n=64).eval()
    with torch.no_grad():
        base(torch.randn(1, 64))
    assert base.weight.quant_state.packing_format_for_cpu or not base.support_avx512bf16_for_cpu
    layer = randomized(peft_ops.LoRALinear(base, 4)).train()
    check_against_oracle(layer, 1e-5)
    with torch.no_grad():  # and no later eval forward repacks it
        layer.eval()(torch.randn(1, 64))
    assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False)


def test_loraxs_factors_are_the_svd_of_the_dequantized_weight():
    base = linear4bit()
    layer = peft_ops.LoRAXSLinear(base, 4)
    u, sigma, v = top_singular_triplets(logical_weight(base), 4)
    up, _, down, _ = layer.factors()
    assert torch.allclose(up.double(), u, atol=1e-6) and torch.allclose(down.double(), v * sigma, atol=1e-5)


def test_linear8bitlt_runs_on_the_cpu_with_every_method():
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 64)
    base = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False, threshold=6.0)
    base.load_state_dict(dense.state_dict())
    base = base.to("cpu")
    for method in peft_ops.METHODS:
        layer = randomized(LAYER_CLASSES[method](copy.deepcopy(base), 4))
        # LLM.int8 also rounds the input to int8 per row: about 1e-2 of the output
        check_against_oracle(layer, 2e-2)


def test_an_unknown_quantized_linear_is_refused_by_name():
    class Packed(torch.nn.Linear):  # a quantizer we don't know: storage unlike its out×in weight
        def __init__(self):
            super().__init__(64, 32)
            self.weight = torch.nn.Parameter(torch.zeros(1024, 1, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(TypeError, match="stored as"):
        peft_ops.LoRALinear(Packed(), 4)


# -- a tiny Llama loaded in 4 bits by transformers

transformers = pytest.importorskip("transformers")
TOKENS = torch.randint(64, (2, 9), generator=torch.Generator().manual_seed(3))
CONFIG = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def checkpoints():
    """Two tiny Llama checkpoints (different seeds), saved once."""
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        d = tempfile.mkdtemp()
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).save_pretrained(d)
        dirs.append(d)
    return dirs


def load(directory, four_bit=True):
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=torch.float32) if four_bit else None
    return transformers.AutoModelForCausalLM.from_pretrained(directory, device_map="cpu", quantization_config=q).eval()


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def test_inject_finds_the_4bit_layers_and_leaves_the_head_out(checkpoints):
    model = load(checkpoints[0])
    names = peft_ops.inject(model, "lora", 4, target_modules="all-linear")
    assert len(names) == 14 and not any("lm_head" in n for n in names)
    assert type(model.lm_head) is torch.nn.Linear
    model = load(checkpoints[0])
    assert sorted(n.rsplit(".", 1)[1] for n in peft_ops.inject(model, "loraxs", 4)) == ["q_proj"] * 2 + ["v_proj"] * 2


def test_lora_on_a_4bit_base_equals_peft_qlora(checkpoints, tmp_path):
    peft = pytest.importorskip("peft")
    model = load(checkpoints[0])
    peft_ops.inject(model, "lora", 4, target_modules="all-linear")
    randomized_model(model)
    expected = logits(model)
    assert rel_error(logits(load(checkpoints[0])), expected) > 1e-2  # the adapters matter
    peft_ops.export_peft(model, tmp_path)
    base = load(checkpoints[0])
    for m in base.modules():  # PEFT's base too: no bf16 CPU repacking on eval forwards (see quantized.py)
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    assert rel_error(logits(theirs), expected) <= 1e-4


def randomized_model(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)


@pytest.mark.parametrize("method", list(peft_ops.METHODS))
def test_adapter_files_round_trip_on_4bit_bases_and_refuse_others(method, checkpoints, tmp_path):
    options = OPTIONS.get(method, {})
    model = load(checkpoints[0])
    peft_ops.inject(model, method, 4, target_modules="all-linear", **options)
    randomized_model(model)
    path = tmp_path / "a.safetensors"
    peft_ops.save_adapter(model, path)
    fresh = load(checkpoints[0])
    peft_ops.load_adapter(fresh, path)  # fingerprints and LoRA-XS/TLoRA signatures of the dequantized weight
    assert torch.equal(logits(fresh), logits(model))
    with pytest.raises(peft_ops.AdapterFileError, match="fingerprint mismatch"):
        peft_ops.load_adapter(load(checkpoints[1]), path)  # another 4-bit base
    # the unquantized original: NF4 moves sampled values by ~0.1 of their largest magnitude, the
    # fingerprint allows 0.01, so the original is refused (README, "Quantized bases")
    with pytest.raises(peft_ops.AdapterFileError, match="fingerprint mismatch"):
        peft_ops.load_adapter(load(checkpoints[0], four_bit=False), path)


def test_merge_is_refused_and_unload_gives_back_the_quantized_layers(checkpoints):
    model = load(checkpoints[0])
    peft_ops.inject(model, "lora", 4, target_modules=["q_proj"])
    randomized_model(model)
    before = logits(model)
    with peft_ops.disable_adapters(model):
        base = logits(model)
    layer = model.model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match="quantized"):
        layer.merge()
    with pytest.raises(ValueError, match="quantized"):
        peft_ops.merge(model)
    with pytest.raises(ValueError, match=r"unload\(model\) without merge gives back the quantized base"):
        peft_ops.unload(model, merge=True)
    with pytest.raises(ValueError, match="quantized"):
        peft_ops.hf.merged_state_dict(model)
    assert torch.equal(logits(model), before)  # nothing changed
    assert sorted(peft_ops.unload(model)) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert torch.equal(logits(model), base)


def test_the_requantized_merge_would_lose_most_of_the_adapter():
    # why merge is refused: W + ΔW quantized again (as PEFT merges) is off by about ‖ΔW‖ itself
    layer = randomized(peft_ops.LoRALinear(linear4bit(n=64), 4), seed=5)
    with torch.no_grad():
        layer.lora_B.mul_(0.01)  # a trained-sized ΔW: ~1% of W
    w, delta = logical_weight(layer.base_layer), layer.delta_weight()
    q, state = bnb.functional.quantize_4bit(w + delta, quant_type="nf4", compress_statistics=True)
    error = (bnb.functional.dequantize_4bit(q, state) - (w + delta)).norm() / delta.norm()
    assert error > 0.5


def saved_bytes(model):
    """Bytes autograd keeps for the backward of one step beyond the model's own tensors (each storage once):
    a dequantized weight saved for backward would show here."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(TOKENS, labels=TOKENS).loss
    loss.backward()
    return sum(seen.values())


def test_a_4bit_base_takes_well_under_a_third_of_the_fp32_bytes(tmp_path):
    config = dict(CONFIG, hidden_size=256, intermediate_size=512)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).save_pretrained(tmp_path)
    sizes = {}
    for four_bit in (False, True):
        model = load(tmp_path, four_bit).train()
        peft_ops.inject(model, "lora", 4, target_modules="all-linear")
        sizes[four_bit] = model_bytes(model), saved_bytes(model)
    (fp32, fp32_saved), (q4, q4_saved) = sizes[False], sizes[True]
    # the 4-bit model keeps its embeddings and head in fp32; its 14 projections take ~1/7 of their fp32 size
    assert q4 < fp32 / 3, (q4, fp32)
    assert q4_saved <= fp32_saved * 1.05, (q4_saved, fp32_saved)  # no dequantized weight saved for backward


@pytest.mark.parametrize("backend", ["fused", "composed"])
@pytest.mark.parametrize("method", list(peft_ops.METHODS))
@pytest.mark.parametrize("config", [("nf4", True, torch.float32), ("fp4", False, torch.bfloat16)],
                         ids=lambda c: f"{c[0]}-{'dq' if c[1] else 'sq'}-{str(c[2])[6:]}")
def test_triton_backends_run_the_quantized_base_through_the_kernels(config, method, backend, monkeypatch, poisoned):
    """With a Triton backend (here the interpreter) a quantized layer's forward and dx run the fused GEMM
    decoding the packed weight (or the composed dequantize-then-matmul): bitsandbytes' forward is not
    called, the kernels see the QuantizedWeight twice (forward, dx), and the output and every gradient
    match the oracle on the dequantized weight."""
    from peft_ops import kernels
    from peft_ops.kernels.dequant import QuantizedWeight

    quant_type, double, compute = config
    base = linear4bit(quant_type=quant_type, double=double, compute_dtype=compute)
    storage = base.weight.data.clone()
    layer = randomized(LAYER_CLASSES[method](base, 4, seed=3, backend=backend, **OPTIONS.get(method, {})))
    monkeypatch.setattr(base, "forward", lambda x: pytest.fail("bitsandbytes' forward ran"))
    seen = []
    entry = "lowrank_linear" if backend == "fused" else "add_lowrank_"
    original = getattr(kernels, entry)

    def spy(*args, **kwargs):
        seen.append(isinstance(args[1], QuantizedWeight) if backend == "fused" else args[0].dtype)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, entry, spy)
    if compute == torch.float32:
        check_against_oracle(layer, TOL[compute])
    else:  # against the same layer over the dense bfloat16 weight: bfloat16 compute rounds the adapter's
        # path too (D, g), which TLoRA's scalar α gradient amplifies past 1e-2 dense or quantized alike
        _check_against_dense_twin(layer, backend)  # the twin's two calls come after the layer's
    twice = 1 if compute == torch.float32 else 2
    assert seen == ([True, True] + [False, False] * (twice - 1) if backend == "fused" else [compute] * 2 * twice)
    assert torch.equal(base.weight.data, storage)  # still quantized
    assert not any(t.shape == (48, 64) for t in layer.buffers())
    saved = []  # what autograd keeps for the backward: no dequantized W (dx decodes it again)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(torch.randn(3, 64).to(compute).requires_grad_()).sum().backward()
    assert saved and not any(t.numel() >= 48 * 64 for t in saved), [tuple(t.shape) for t in saved]


def test_linear8bitlt_through_the_fused_kernel_matches_the_oracle_without_input_rounding(poisoned):
    torch.manual_seed(0)
    base = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False, threshold=6.0)
    base.load_state_dict(torch.nn.Linear(64, 64).state_dict())
    layer = randomized(peft_ops.LoRALinear(base.to("cpu"), 4, backend="fused"))
    check_against_oracle(layer, 1e-5)  # bitsandbytes' forward (input rounded to int8) is within 2e-2 only


def _check_against_dense_twin(layer, backend):
    """Output and every gradient of a quantized layer on the Triton kernels equal those of the same layer
    over an nn.Linear holding the dequantized weight in the compute dtype (x in that dtype too), within
    bfloat16's rounding (a few outputs differ by an ulp: the interpreter's casts to bfloat16)."""
    base = layer.base_layer
    dense = torch.nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None).to(base.compute_dtype)
    with torch.no_grad():
        dense.weight.copy_(logical_weight(base))
        if base.bias is not None:
            dense.bias.copy_(base.bias)
    twin = type(layer)(dense, layer.rank, alpha=layer.alpha, seed=layer.seed, backend=backend, **layer.options)
    twin.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("base_layer.")},
                         strict=False)
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(7)).to(base.compute_dtype)
    results = []
    for lay in (layer, twin):
        xi = x.clone().requires_grad_()
        y = lay(xi)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(8)).to(y.dtype))
        results.append([y, xi.grad] + [p.grad for _, p in sorted(lay.named_parameters(recurse=False))])
    assert len(results[0]) > 2
    for ours, theirs in zip(*results):
        assert rel_error(ours, theirs) <= TOL[torch.bfloat16]
