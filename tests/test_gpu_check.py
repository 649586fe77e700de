"""The one-call GPU check, rehearsed on the CPU: every stage runs (in smoke mode) and reports, so the first
call on a lent GPU cannot fail on a typo."""
import os
import subprocess
import sys

import pytest

from utils import ON_GPU

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "gpu_check.sh")


@pytest.mark.skipif(ON_GPU, reason="on a GPU, run the check itself")
def test_rehearsal_runs_every_stage(tmp_path):
    result = subprocess.run(["bash", SCRIPT, "--rehearse"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable},
                            cwd=os.path.dirname(SCRIPT) + "/..")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = sorted(os.listdir(tmp_path))
    assert files == ["env.txt", "headline.log", "smoke.log", "suite.log", "summary.md"]
    summary = (tmp_path / "summary.md").read_text()
    for stage in ("smoke", "headline", "memory", "svd", "suite"):
        row = next(line for line in summary.splitlines() if line.startswith(f"| {stage} |"))
        assert "rc=0" in row, summary
    assert "2 passed" in summary and "every provider matched the float64 reference" in summary
    assert "| loraxs | 7,168 |" in summary  # the memory table: LoRA-XS r = 16 on the tiny Llama's 28 projections
    assert "| svd float32 | 0/16384; 0/65536 | 0.0e+00 | accepted both ways" in summary  # on the CPU, "weight" is the CPU
    assert result.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the table comes last
