"""Hugging Face models and PEFT (the `integration` extra): tiny Llama and GPT-2 built from configs
with random weights, every method that fits each projection, and PEFT's LoRA as an independent
implementation to check our LoRA against."""
import copy

import pytest
import torch
from torch import nn

import peft_ops
from utils import DEVICE, randn, randn_like, randomize_adapters

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny_llama(seed=0):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(DEVICE)


def tiny_gpt2(seed=0):
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).to(DEVICE)


# which projections each method adapts: SymLoRA only where the weight is square
TARGETS = {
    "llama": {"symlora": ["q_proj", "o_proj"], "default": "all-linear"},
    "gpt2": {"symlora": ["attn.c_proj"], "default": "all-linear"},
}
BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def _tokens(batch=4, length=12):
    return torch.randint(64, (batch, length), generator=torch.Generator().manual_seed(1)).to(DEVICE)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", list(peft_ops.METHODS))
def test_train_save_load_merge(arch, method, tmp_path):
    model = BUILD[arch]()
    targets = TARGETS[arch].get(method, TARGETS[arch]["default"])
    names = peft_ops.inject(model, method, 4, target_modules=targets)
    if arch == "gpt2" and targets == "all-linear":
        assert "transformer.h.0.attn.c_attn" in names  # GPT-2's Conv1D layers are adapted
    assert "lm_head" not in names
    tokens = _tokens()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        logits = model(tokens).logits
    peft_ops.save_adapter(model, tmp_path / "adapter.safetensors")
    fresh = BUILD[arch]().eval()
    peft_ops.load_adapter(fresh, tmp_path / "adapter.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(tokens).logits, logits)
        peft_ops.merge(fresh)
        assert torch.allclose(fresh(tokens).logits, logits, rtol=1e-4, atol=1e-4)
        peft_ops.unmerge(fresh)
        assert torch.equal(fresh(tokens).logits, logits)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("shape", [(48, 40), (40, 40)])
def test_lora_matches_peft(backend, shape):
    """The same A, B and scale in our LoRALinear and in PEFT's LoRA: the same outputs and gradients."""
    n, k = shape
    base = nn.Linear(k, n).to(DEVICE)
    ours = peft_ops.LoRALinear(copy.deepcopy(base), 8, alpha=16.0, backend=backend)
    randomize_adapters(ours, 0.3)
    theirs = peft.inject_adapter_in_model(
        peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"], lora_dropout=0.0), nn.Sequential(copy.deepcopy(base)))[0]
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
    assert theirs.scaling["default"] == ours.scaling == 2.0
    x = randn(3, 5, k, device=DEVICE)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = ours(x1), theirs(x2)
    assert torch.allclose(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    g = randn_like(y_ours)
    y_ours.backward(g)
    y_theirs.backward(g)
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(ours.lora_A.grad, theirs.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-5)
    assert torch.allclose(ours.lora_B.grad, theirs.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-5)


def test_peft_default_init_is_ours():
    """PEFT's initialisation rule (A kaiming-uniform(a=√5) on r×K, B = 0) is the one LoRALinear uses."""
    base = nn.Linear(300, 200)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(r=16, target_modules=["0"]), nn.Sequential(base))[0]
    ours = peft_ops.LoRALinear(nn.Linear(300, 200), 16)
    a_theirs, a_ours = theirs.lora_A["default"].weight, ours.lora_A
    assert a_theirs.shape == a_ours.shape == (16, 300)
    assert abs(a_theirs.abs().max().item() - a_ours.abs().max().item()) < 0.05 * a_ours.abs().max().item()
    assert torch.count_nonzero(theirs.lora_B["default"].weight) == torch.count_nonzero(ours.lora_B) == 0
