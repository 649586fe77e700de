"""Each method learns: a student adapter fits a teacher of the same method (same frozen factors,
random trainable values), so the target is reachable and the loss must fall by orders of magnitude."""
import pytest
import torch
from torch import nn

import peft_ops
from peft_ops import demo
from utils import DEVICE, randn, randomize_adapters

LEARNING_RATE = {"lora": 1e-2, "symlora": 1e-2, "loraxs": 5e-2, "tlora": 5e-2}


@pytest.mark.parametrize("method", list(peft_ops.METHODS))
def test_student_fits_teacher(method):
    base = nn.Linear(32, 32).to(DEVICE)
    student = peft_ops.LAYER_CLASSES[method](base, 4, seed=3)
    teacher = peft_ops.LAYER_CLASSES[method](base, 4, seed=3)
    randomize_adapters(teacher, 0.3)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=LEARNING_RATE[method])
    x_eval = randn(256, 32, device=DEVICE)

    def loss():
        return (student(x_eval) - teacher(x_eval)).square().mean().item()

    before = loss()
    for _ in range(300):
        x = randn(64, 32, device=DEVICE)
        err = (student(x) - teacher(x).detach()).square().mean()
        optimizer.zero_grad()
        err.backward()
        optimizer.step()
    assert loss() < 1e-2 * before, (before, loss())


def test_demo_every_method_learns():
    rows = demo.run(steps=40)
    assert [r["method"] for r in rows] == list(peft_ops.METHODS)
    for row in rows:
        assert row["loss_after"] < row["loss_before"] - 0.3, row
        assert row["trainable"] > 0 and row["file_bytes"] > row["tensor_bytes"] > 0
    table = demo.format_table(rows)
    assert all(m in table for m in peft_ops.METHODS)
