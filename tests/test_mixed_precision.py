"""torch.autocast and torch.utils.checkpoint around peft-ops layers, on both backends."""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import peft_ops
from utils import DEVICE, method_options, oracle_twin, randn, randn_like, randomize_adapters, rel_error

BACKENDS = ["reference", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", list(peft_ops.METHODS))
def test_autocast_bf16(backend, method):
    """Under autocast the layer computes in bf16 with float32 accumulation (K = 512: a bf16 accumulator
    would be off by several percent) and the float32 adapter tensors get float32 gradients."""
    k, n = 512, 96
    layer = peft_ops.LAYER_CLASSES[method](nn.Linear(k, n).to(DEVICE), 8, alpha=12.0, backend=backend,
                                           **method_options(method))
    randomize_adapters(layer, 0.3)
    x = randn(33, k, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    # the exact result for bf16-rounded input and weight
    ref = oracle_twin(layer)
    with torch.no_grad():
        ref.base_layer.weight.copy_(layer.base_layer.weight.bfloat16().double())
        ref.base_layer.bias.copy_(layer.base_layer.bias.bfloat16().double())
    x64 = x.bfloat16().double()
    assert rel_error(y, ref(x64)) < 1e-2
    g = randn_like(y)
    y.backward(g)
    ref(x64).backward(g.double())
    for name, p in layer.named_parameters():
        if p.requires_grad:
            assert p.grad.dtype == torch.float32, name
            assert rel_error(p.grad, dict(ref.named_parameters())[name].grad) < 2e-2, name


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_gives_the_same_gradients(backend):
    """Recomputation in the backward draws the same dropout seed (checkpoint restores the RNG state),
    so a checkpointed block's gradients equal the plain block's."""
    block = _Block().to(DEVICE)
    peft_ops.inject(block, "tlora", 4, target_modules=["up"], dropout=0.2, backend=backend)
    peft_ops.inject(block, "loraxs", 4, target_modules=["down"], dropout=0.2, backend=backend)
    randomize_adapters(block, 0.2)
    block.train()
    x = randn(24, 32, device=DEVICE)

    def grads(use_checkpoint):
        block.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        xi = x.clone().requires_grad_()
        y = checkpoint(block, xi, use_reentrant=False) if use_checkpoint else block(xi)
        y.square().sum().backward()
        return [xi.grad] + [p.grad for p in block.parameters() if p.requires_grad]

    plain, checkpointed = grads(False), grads(True)
    assert len(plain) == 4  # x, TLoRA B and α, LoRA-XS R
    for a, b in zip(plain, checkpointed):
        assert torch.equal(a, b)
