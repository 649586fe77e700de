"""Every kernel variant compiles for a Hopper GPU (sm_90) and fits its shared memory, checked without
one: Triton's compiler runs on the CPU for an explicit target (tests/sm90_compile.py). On a GPU the
ordinary tests compile the kernels for real."""
import json
import os
import subprocess
import sys

import pytest

from peft_ops.kernels import fused_linear
from utils import ON_GPU

GROUPS = 4
HELPER = os.path.join(os.path.dirname(__file__), "sm90_compile.py")


def _compile(which, group, groups):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, HELPER, which, str(group), str(groups)], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(reports) >= 3
    failures = [f"{r['label']}: {r['error']}" for r in reports if "error" in r]
    assert not failures, "\n\n".join(failures)
    too_big = [f"{r['label']}: {r['shared']} bytes" for r in reports if r["shared"] > fused_linear.SHARED_MEMORY]
    assert not too_big, "shared memory beyond Hopper's 227 KiB per block:\n" + "\n".join(too_big)
    # the launchers prune configs by shared_memory_bytes: it must bound what the compiler allocates
    underestimated = [f"{r['label']}: compiled {r['shared']} > estimated {r['estimate']}" for r in reports
                      if r["estimate"] is not None and r["shared"] > r["estimate"]]
    assert not underestimated, "\n".join(underestimated)


@pytest.mark.skipif(ON_GPU, reason="on a GPU the other tests compile and run every kernel")
@pytest.mark.parametrize("group", range(GROUPS))
def test_every_code_path_compiles_for_sm90(group):
    """Every branch of every kernel in float32, float16 and bfloat16, with the launchers' default configs."""
    _compile("paths", group, GROUPS)


@pytest.mark.slow
@pytest.mark.skipif(ON_GPU, reason="on a GPU, test_gpu_only.py compiles and runs every config")
@pytest.mark.parametrize("group", range(GROUPS))
def test_every_autotune_config_compiles_for_sm90(group):
    """Every autotune config that survives pruning (a few minutes: run with -m slow after changing them)."""
    _compile("configs", group, GROUPS)
