"""Training for many steps leaks nothing: no growth in live tensors (CPU, short) or in allocated GPU
memory (a few thousand steps, GPU only)."""
import gc
import warnings

import pytest
import torch

import peft_ops
from utils import DEVICE, ON_GPU, TinyModel, randn


def _training_loop(backend, dropout, methods=None):
    methods = methods or ("lora", "tlora", "loraxs", "symlora")
    model = TinyModel(2).to(DEVICE)
    for targets, method in zip((["q_proj"], ["k_proj"], ["v_proj"], ["o_proj"]), methods):
        peft_ops.inject(model, method, 4, target_modules=targets, dropout=dropout, backend=backend,
                        **({"allow_non_square": True} if method == "symlora" else {}))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = randn(64, 32, device=DEVICE)

    def step():
        loss = model(x).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def _live_tensors():
    gc.collect()
    with warnings.catch_warnings():  # is_tensor on deprecated torch module attributes warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if torch.is_tensor(o))


@pytest.mark.parametrize("backend, steps", [("reference", 60), ("triton", 6)])
def test_no_tensors_leak(backend, steps):
    """Live tensors after two equal windows of steps: a leak of even one tensor a step grows the count
    by ``steps`` in each window; tensors other tests left to the collector do not recur."""
    # under the interpreter, two layers suffice: input-side (LoRA) and output-side (TLoRA) dropout
    step = _training_loop(backend, dropout=0.1, methods=("lora", "tlora") if backend == "triton" else None)
    counts = []
    for _ in range(3):  # the first window also creates the optimizer state
        for _ in range(steps):
            step()
        counts.append(_live_tensors())
    assert counts[2] - counts[1] < steps // 2, counts


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_gpu_memory_is_flat_over_thousands_of_steps():
    step = _training_loop("triton", dropout=0.1)
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(3000):
        step()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
