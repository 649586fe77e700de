"""The compiled-code gate of tests/test_sm90_compile.py for the GPUs users have besides H100/H200,
compiled on the CPU by Triton 3.9's bundled toolchains (tests/sm90_compile.py, one harness, the
target chosen by PEFT_OPS_GATE_TARGET): sm_80 (A100: mma.sync, HMMA in SASS, cp.async), sm_100
(B200: tcgen05.mma, UTCHMMA in SASS; TMA) and gfx942 (MI300X: v_mfma in the AMDGCN assembly, built
down to an hsaco). sm_120 (RTX 50xx: mma.sync, 99 KiB of shared memory) runs with ``-m slow``.

Per target, the subset of ``target_variants`` (the fused GEMM on the pointer path, specialised as a
launch on contiguous tensors is, at rank blocks 16 and 64, bf16 and fp16: forward with and without
bias, with output dropout, and dx; on sm_100 the descriptor path too), each against its yardstick
(tutorial 03, or 09 on the descriptor path, at the same tile, warps and stages). Checked: no compile
error, shared memory within the target's per-block limit and the launchers' bound, no compiler warning,
the target's MMA in the main loop (HMMA; UTCHMMA for tiles of 64+ rows on sm_100; v_mfma), the same
MMA per K-step as the yardstick, no local memory (CUDA: stack frame, LDL/STL; AMD: ScratchSize,
scratch_* instructions, the VGPR/SGPR spill counts of the kernel's metadata), instructions per K-step
within the margin, and loads in flight: on CUDA the deepest cp.async.wait_group at least the
yardstick's (UTMALDG issued ahead of the loop on the descriptor path); on gfx942, where the loop
waits with ``s_waitcnt vmcnt(0)`` either way, the global loads issued before the loop and MFMA issued
while the loop's own global loads are in flight. Known failures per target are in
sm90_gate_known_failures.json under "targets". test_target_gate_flags_a_bad_kernel shows the checks
failing on counterexamples."""
import pytest

from test_sm90_compile import KNOWN_FAILURES_BY_TARGET, _compile, _gate, gate_failures
from utils import ON_GPU

DEFAULT_TARGETS = ("sm_80", "sm_100", "gfx942")
# what the yardstick's main loop shows on each target: its MMA, and its global loads
EXPECTED = {"sm_80": ("HMMA", {"LDGSTS"}), "sm_100": ("UTCHMMA", {"LDGSTS", "UTMALDG"}),
            "sm_120": ("HMMA", {"LDGSTS"}), "gfx942": ("v_mfma", {"global_load"})}

pytestmark = pytest.mark.skipif(ON_GPU, reason="reads compiled code only; a GPU session runs the kernels")


def _check(target):
    reports = _compile("targets", 0, 1, target)
    assert len(reports) == (32 if target == "sm_100" else 16), len(reports)
    mma, loads = EXPECTED[target]
    for r in reports:  # the yardsticks: the target's MMA, fed by its loads
        ruler = r["yardstick"]["main_loop"]
        assert ruler["mma"] == mma and set(ruler["loads"]) <= loads, (target, r["yardstick"])
        assert not r["yardstick"]["warnings"], r["yardstick"]
    if target == "gfx942":
        assert all(r["hsaco"] > 0 for r in reports)
    _gate(reports, KNOWN_FAILURES_BY_TARGET.get(target, {}))


@pytest.mark.parametrize("target", DEFAULT_TARGETS)
def test_fused_gemm_passes_the_gate_on(target):
    _check(target)


@pytest.mark.slow
def test_fused_gemm_passes_the_gate_on_sm_120():
    _check("sm_120")


@pytest.mark.parametrize("target", DEFAULT_TARGETS)
def test_target_gate_flags_a_bad_kernel(target):
    """Tutorial 03 with its K-loop kept out of the software pipeline fails the loads-in-flight checks
    (CUDA: no cp.async group left in flight; gfx942: no global load ahead of the loop, no MFMA with a
    load in flight); pipelined but masking rows and columns with a division every K-step, the
    instruction count. Their yardstick, tutorial 03 itself, passes."""
    unpipelined, masked = _compile("pointer_counterexample", 0, 1, target)
    expected = {"wait depth"} if target.startswith("sm_") else {"prologue loads", "loads in flight"}
    assert set(gate_failures(unpipelined)) == expected, gate_failures(unpipelined)
    assert "instructions per K-step" in gate_failures(masked), gate_failures(masked)
    assert not gate_failures(unpipelined["yardstick"]), gate_failures(unpipelined["yardstick"])


def test_gate_flags_a_kernel_compiled_to_a_trap():
    """A given t (no bias) on a 128×256 descriptor-path tile: for sm_100 Triton compiles the kernel to a
    trap, which the gate reports; the launchers' configs for sm_100 avoid that tile."""
    (report,) = _compile("tensor_memory_counterexample", 0, 1, "sm_100")
    assert "compiled to a trap" in gate_failures(report), gate_failures(report)
    assert report["main_loop"] is None
