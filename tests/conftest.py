"""Kernels run compiled on a GPU; without one they run under Triton's interpreter, which has to be
switched on before triton is first imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU, one config per kernel instead of autotuning every new shape (each config is checked on its
# own in test_gpu_only.py); PEFT_OPS_AUTOTUNE=1 tests the autotuned launches instead.
os.environ.setdefault("PEFT_OPS_AUTOTUNE", "0")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture
def poisoned(monkeypatch):
    """Every ``torch.empty`` during the test returns NaN-filled memory (integers: -1), so a kernel
    output element that is never written shows up as NaN instead of a lucky zero."""
    empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    monkeypatch.setattr(torch, "empty", poisoned_empty)
