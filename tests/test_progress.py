"""inject's progress line: silent for a fast set-up, one line on stderr once the set-up passes
DELAY_SECONDS, never with progress=False. A fake clock stands for the time the set-up takes."""
import pytest

import peft_ops
from peft_ops import progress
from peft_ops.progress import Progress
from utils import TinyModel


@pytest.fixture
def ticks(monkeypatch):
    """A fake clock that advances by ``ticks[0]`` seconds at every reading."""
    state = {"now": 0.0}
    step = [0.0]

    def fake_clock():
        state["now"] += step[0]
        return state["now"]
    monkeypatch.setattr(progress, "clock", fake_clock)
    return step


def test_silent_before_the_delay_then_one_rewritten_line(capsys, ticks):
    ticks[0] = 0.9
    with Progress("set-up", 3) as report:
        report.step()  # 0.9 s after the start
        assert capsys.readouterr().err == ""
        report.step()  # 1.8 s
        assert capsys.readouterr().err == ""
        report.step()  # 2.7 s
    assert capsys.readouterr().err == "\rset-up: 3/3 layers set up (3 s)\n"


def test_disabled_never_prints(capsys, ticks):
    ticks[0] = 100.0
    with Progress("set-up", 2, enabled=False) as report:
        report.step()
        report.step()
    assert capsys.readouterr().err == ""


def test_inject_is_silent_when_fast(capsys, ticks):
    ticks[0] = 0.1  # 12 layers in 1.2 s
    peft_ops.inject(TinyModel(1), "lora", 4, target_modules="all-linear")
    assert capsys.readouterr().err == ""


def test_inject_reports_a_slow_set_up_unless_told_not_to(capsys, ticks):
    ticks[0] = 1.0  # a second per layer: shown from the second layer on
    peft_ops.inject(TinyModel(1), "lora", 4, target_modules="all-linear")
    err = capsys.readouterr().err
    assert err.startswith("\rpeft_ops.inject: 2/12 layers set up (2 s)\r")
    assert err.endswith("\rpeft_ops.inject: 12/12 layers set up (12 s)\n")
    peft_ops.inject(TinyModel(1), "lora", 4, target_modules="all-linear", progress=False)
    assert capsys.readouterr().err == ""


def test_a_failed_set_up_ends_the_line(capsys, ticks):
    ticks[0] = 5.0
    with pytest.raises(ValueError, match="'blocks.0.k_proj': lora: rank=20"):  # q_proj is 32×32, k_proj 16×32
        peft_ops.inject(TinyModel(1), "lora", 20, target_modules=["q_proj", "k_proj"])
    assert capsys.readouterr().err == "\rpeft_ops.inject: 1/4 layers set up (5 s)\n"
