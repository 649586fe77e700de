"""The benchmark runner: its CPU smoke mode, its refusal to time wrong results, and its outputs."""
import csv
import importlib.util
import os
import signal

import pytest
import torch

from bench import runner
from peft_ops import kernels


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke mode is what runs without a GPU")
def test_cpu_smoke_checks_every_provider(capsys):
    assert runner.main(["--methods", "tlora"]) == 0
    out = capsys.readouterr()
    assert "No CUDA GPU here" in out.out and "No timings are taken" in out.out
    assert "every provider matched the float64 reference" in out.out
    for provider in runner.PROVIDERS:
        if provider != "peft" or importlib.util.find_spec("peft"):
            assert f"tlora M=17 forward_backward {provider}" in out.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke mode is what runs without a GPU")
def test_a_wrong_provider_is_a_failure_not_a_number(monkeypatch, capsys):
    monkeypatch.setattr(kernels, "linear", lambda a, w, bias=None: torch.zeros(a.shape[0], w.shape[0]))
    assert runner.main(["--methods", "lora", "--providers", "triton_base", "base"]) == 1
    out = capsys.readouterr().out
    assert "WRONG RESULT, not timed: triton_base linear 96x80 M=1 r=8 forward" in out
    assert "base linear" not in out.replace("triton_base linear", "")


def test_floor_is_the_larger_of_flops_and_bytes():
    # 4096³ forward: 137 GFLOP at 1 PFLOP/s = 0.137 ms; 100 MB at 1 TB/s = 0.1 ms
    assert runner.floor_ms(4096, 4096, 4096, "forward", 1e15, 1e12) == pytest.approx(2 * 4096**3 / 1e15 * 1e3)
    assert runner.floor_ms(1, 4096, 4096, "forward", 1e15, 1e12) == pytest.approx(2 * (4096 + 4096**2 + 4096) / 1e12 * 1e3)
    assert runner.floor_ms(8, 64, 64, "forward_backward", 1e15, 1e12) == pytest.approx(
        2 * runner.floor_ms(8, 64, 64, "forward", 1e15, 1e12))


def _rows():
    meta = dict(gpu="NVIDIA H200", torch="2.11", triton="3.6", date="2026-11-22", dtype="bfloat16", unit="ms",
                metric="time", shape="4096x4096", rank=16)
    rows = []
    for m, base in ((16, 0.010), (2048, 0.100)):
        for kernel, provider, factor in (("-", "floor", 0.9), ("linear", "base", 1.0), ("linear", "triton_base", 1.02),
                                         ("loraxs", "fused", 1.04), ("loraxs", "composed", 1.06),
                                         ("loraxs", "dispatch", 1.04), ("loraxs", "eager", 1.5),
                                         ("loraxs", "compile", 1.3), ("peft-lora", "peft", 1.6)):
            for mode in runner.MODES:
                t = base * factor * (2 if mode == "forward_backward" else 1)
                rows.append(dict(meta, kernel=kernel, provider=provider, mode=mode, x=m, median=t, p20=t, p80=t))
    return rows


def test_outputs_csv_markdown_and_plot(tmp_path):
    written = runner.write_outputs(_rows(), tmp_path)
    stem = tmp_path / "2026-11-22_NVIDIA-H200_sweep"
    assert str(stem) + ".csv" in written and str(stem) + ".md" in written
    with open(str(stem) + ".csv") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == runner.COLUMNS
        assert len(list(reader)) == len(_rows())
    table = (tmp_path / "2026-11-22_NVIDIA-H200_sweep.md").read_text()
    assert "NVIDIA H200, torch 2.11, triton 3.6" in table
    # dispatch ms, base ms; fused, composed, dispatch, eager, compile, triton_base, peft and floor over base
    assert "| loraxs | forward | 4096x4096 | 16 | 2048 | 0.1040 | 0.1000 | 1.040 | 1.060 | 1.040 | 1.500 | 1.300 | " \
           "1.020 | 1.600 | 0.900 |" in table
    assert (str(stem) + ".png" in written) == (importlib.util.find_spec("matplotlib") is not None)


def _fake_bench_one(calls):
    """A stand-in for ``_bench_one`` that records a row per provider and mode without running anything."""
    def bench_one(provider, kernel, case, x, g, mode, peft_layer, cell, timed):
        calls.append((cell["x"], mode, provider))
        return [dict(cell, kernel=kernel, provider=provider, mode=mode)], None
    return bench_one


def test_sigterm_keeps_every_finished_cell_and_drops_the_interrupted_one(monkeypatch):
    """A sweep cut short by a device call's time limit (`timeout` sends SIGTERM) returns whole cells."""
    calls = []
    record = _fake_bench_one(calls)

    def bench_one(*args):
        rows = record(*args)
        if len(calls) == 5:  # in the middle of the second cell (4 calls per cell: 2 providers x 2 modes)
            try:  # torch.compile's caches swallow what the handler raises inside them: the run must still stop
                os.kill(os.getpid(), signal.SIGTERM)
            except runner.Stopped:
                pass
        return rows
    monkeypatch.setattr(runner, "_bench_one", bench_one)
    monkeypatch.setattr(runner, "Case", lambda *args: None)
    previous = signal.signal(signal.SIGTERM, runner._stop_on_sigterm)
    try:
        rows, failures, stopped = runner.run(runner.SMOKE["shapes"], (1, 17, 33), (8,), ["lora"], ["base", "fused"],
                                             runner.MODES, torch.float32, torch.device("cpu"), timed=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped == f"signal {int(signal.SIGTERM)}" and not failures
    assert len(rows) == 4 and {r["x"] for r in rows} == {1}
    assert len(calls) == 5  # nothing ran after the signal


def test_time_budget_stops_between_cells(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(runner, "_bench_one", _fake_bench_one(calls))
    assert runner.main(["--methods", "lora", "--time-budget", "0"]) == 0
    out = capsys.readouterr().out
    assert "STOPPED EARLY (the time budget ran out)" in out and "every provider that ran matched" in out
    assert calls == []


def test_markdown_marks_providers_left_out_of_the_run():
    rows = [r for r in _rows() if r["provider"] in ("dispatch", "floor")]
    line = next(l for l in runner.markdown(rows).splitlines() if l.startswith("| loraxs | forward | 4096x4096 | 16 | 2048"))
    assert line == "| loraxs | forward | 4096x4096 | 16 | 2048 | 0.1040 | — | — | — | — | — | — | — | — | — |"
