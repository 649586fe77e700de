"""Every kernel variant compiles for a Hopper GPU (sm_90), fits its shared memory and passes the
compiled-code gate, checked without one: Triton's compiler runs on the CPU for an explicit target and
the cubin is read with the cuobjdump/nvdisasm that Triton's wheel ships (tests/sm90_compile.py). On a
GPU the ordinary tests compile the kernels for real.

The gate, for every variant the launchers can pick (a subset by default, every autotune config with
``-m slow``): the kernel not compiled to a trap (where the compiler gives up, e.g. beyond sm_100's
tensor memory); HGMMA (wgmma) in the main loop of GEMM tiles with at least 64 rows (16- and 32-row tiles
use HMMA: the table in bench/NOTES.md records it); UTMALDG (TMA) in variants marked "tma"; in the
persistent ones, the tile loop flattened with the K-loop (the epilogue's descriptor store inside the
main loop: the next tile's loads are in flight during the epilogue); no local
memory (no LDL/STL, stack frame 0); no ptxas advisory that wgmma was serialized; shared memory within
the chip's 227 KiB and within the launchers' bound; no compiler warning (read from the compile's
standard error with MLIR_ENABLE_DIAGNOSTICS=warnings: the pipeliner says there when it gives up); and,
for the fused GEMM and the shrink kernels, a main loop pipelined like its yardstick's (tutorial 09 or
03 at the same tile, warps and stages: ``pipeline_failures``). test_gate_flags_an_unpipelined_kernel
shows each of these checks failing on a counterexample. Variants of today's kernels known to fail a check
are listed by exact label and check in sm90_gate_known_failures.json: they are reported as xfail, and a
listed check that passes (or a check not listed that fails) fails the test."""
import json
import os
import subprocess
import sys

import pytest
import torch
import triton

from bench import tutorial_gemms
from peft_ops.kernels import fused_linear
from utils import DEVICE, ON_GPU, randn, rel_error

GROUPS = 4
HERE = os.path.dirname(__file__)
HELPER = os.path.join(HERE, "sm90_compile.py")
with open(os.path.join(HERE, "sm90_gate_known_failures.json")) as f:
    _known = json.load(f)
KNOWN_FAILURES = _known["failures"]
# the other targets' (tests/test_targets_compile.py): target -> label -> checks
KNOWN_FAILURES_BY_TARGET = {target: entry["failures"] for target, entry in _known.get("targets", {}).items()}


def _compile(which, group, groups, target="sm_90"):
    """The JSON reports of ``which``'s variants in ``group`` of ``groups``, compiled for ``target`` (a key
    of sm90_compile.TARGETS) in a subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PEFT_OPS_GATE_TARGET"] = target
    result = subprocess.run([sys.executable, HELPER, which, str(group), str(groups)], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert reports
    failures = [f"{r['label']}: {r['error']}" for r in reports if "error" in r]
    assert not failures, "\n\n".join(failures)
    too_big = [f"{r['label']}: {r['shared']} bytes" for r in reports
               if r["shared"] > min(fused_linear.SHARED_MEMORY, r["shared_limit"])]
    assert not too_big, f"shared memory beyond {target}'s {reports[0]['shared_limit']} bytes per block:\n" + "\n".join(too_big)
    # the launchers prune configs by shared_memory_bytes: it must bound what the compiler allocates
    underestimated = [f"{r['label']}: compiled {r['shared']} > estimated {r['estimate']}" for r in reports
                      if r["estimate"] is not None and r["shared"] > r["estimate"]]
    assert not underestimated, "\n".join(underestimated)
    return reports


def gate_failures(report) -> dict:
    """The gate's checks that ``report`` fails, each with what the compiled code showed."""
    failed = {}
    if report.get("trap"):
        failed["compiled to a trap"] = "the PTX is a trap: the compiler gave up on the kernel"
    if (report["stack"] or report["local"] or report["spill_ld"] or report["spill_st"]
            or report.get("vgpr_spill")):  # AMD's metadata (SGPR spills go to VGPR lanes, not memory)
        failed["local memory"] = (f"{report['registers']} registers, stack frame {report['stack']} B, "
                                  f"{report['spill_ld']} LDL + {report['spill_st']} STL (AMD: scratch loads and "
                                  f"stores; {report.get('vgpr_spill')} VGPR, {report.get('sgpr_spill')} SGPR spills)")
    if report["serialized"]:
        failed["serialized wgmma"] = f"ptxas advisories {report['advisories']}"
    loop = report["main_loop"]
    if report.get("target", "sm_90") == "sm_90":
        if report["rows"] is not None and report["rows"] >= 64 and (loop is None or loop["mma"] != "HGMMA"):
            failed["HGMMA in main loop"] = f"main loop: {loop}"
    elif report["expected_mma"] is not None and (loop is None or loop["mma"] != report["expected_mma"]):
        failed[f"{report['expected_mma']} in main loop"] = f"main loop: {loop}"
    if report["tma"] and not report["utmaldg"]:
        failed["UTMALDG"] = "no TMA load in the kernel"
    if report["flattened"] and (loop is None or not loop["stores"]):
        failed["flattened tile loop"] = "the epilogue's descriptor store is outside the main loop"
    if report["warnings"]:
        failed["compiler warnings"] = "; ".join(report["warnings"])
    ruler = report["yardstick"]
    if ruler is not None:
        failed.update(pipeline_failures(report, ruler))
    return failed


INSTRUCTION_MARGIN = 1.25, 16  # a nested K-step: at most 25% and 16 instructions more than the yardstick's
# plus, where the K-loop draws a dropout mask (the shrink's input dropout), this many per masked element
# of a thread: one Philox 4x32-10 call (10 rounds of two 32-bit multiplies, XORs and key additions, about
# 60 integer instructions, plus the counter and the split of its words) serves eight elements. One call
# per element (tl.rand's way, the counterexample) is about 8 times that.
MASK_INSTRUCTIONS = 20
# A K-step that decodes a quantized W (variants with "decodes": elements of W per thread per K-step) may
# add this many instructions per decoded element: the 16-value table lookup (one load, 1), splitting
# and interleaving the two nibbles of a byte (2), the absmax product (1) and its double-quantization
# chain (a code, a table value and the second-level scale per row, with an FMA, held per element in
# the tile's layout: 3), the 16-bit conversion (1), staging the tile for the dot (2) and its masks (2).
# A budget set from the work, not fitted to the compiled counts (bench/NOTES.md, "Quantized bases").
DECODE_INSTRUCTIONS = 12


def pipeline_failures(report, ruler) -> dict:
    """How ``report``'s main loop falls short of its yardstick's (the tutorial GEMM at the same tile,
    warps, stages and loop form, tests/sm90_compile.py's ``yardstick``): the same MMA count and shape
    per K-step (the yardstick's among others where the variant has a second dot in its K-loop, the
    in-loop shrink), the same deepest wgmma.wait_group (0 where each wgmma waits on its own
    predecessor) and at least as deep a cp.async.wait_group (the groups left in flight: the in-loop
    shrink's D tiles add one), on the descriptor path UTMALDG for ``stages - 1`` K-steps issued ahead
    of the loop, and, for nested loops without a second dot (a flattened one also holds the tile's
    start and epilogue; the in-loop shrink also t's dot and D's loads), at most
    ``INSTRUCTION_MARGIN`` more instructions per K-step."""
    failed, loop, ruler_loop = {}, report["main_loop"] or {}, ruler["main_loop"]
    shapes, ruler_shapes = loop.get("mma_shapes", {}), ruler_loop["mma_shapes"]
    if shapes != ruler_shapes and not (report["extra_mma"]
                                       and all(shapes.get(k, 0) >= n for k, n in ruler_shapes.items())):
        failed["MMA per K-step"] = f"{shapes}, yardstick {ruler_shapes}"
    waits = [(kind, report[kind], ruler[kind]) for kind, fewer_in_flight in (
        ("wgmma_wait", lambda ours, theirs: ours != theirs),
        ("cp_async_wait", lambda ours, theirs: ours is None or ours < theirs))
        if ruler[kind] is not None and fewer_in_flight(report[kind], ruler[kind])]
    if waits:
        failed["wait depth"] = ", ".join(f"deepest {kind} {ours}, yardstick {theirs}" for kind, ours, theirs in waits)
    ahead = (report["stages"] - 1) * ruler_loop["loads"].get("UTMALDG", 0)
    if report["prologue_utmaldg"] < ahead:
        failed["prologue loads"] = f"{report['prologue_utmaldg']} UTMALDG before the main loop, {ahead} needed"
    # AMD (no wait_group to read): the global loads issued ahead of the loop, and MFMA issued while
    # the loop's own global loads are in flight (read_amdgcn's prologue_loads and mma_under_loads)
    if report.get("prologue_loads", 0) < ruler.get("prologue_loads", 0):
        failed["prologue loads"] = (f"{report['prologue_loads']} global loads before the main loop, "
                                    f"yardstick {ruler['prologue_loads']}")
    if ruler.get("mma_under_loads") and not report.get("mma_under_loads"):
        failed["loads in flight"] = (f"no MFMA issued with the loop's global loads in flight, yardstick "
                                     f"{ruler['mma_under_loads']}")
    scale, slack = INSTRUCTION_MARGIN
    nested_alike = not report["flattened"] and not report["extra_mma"]
    decoding = DECODE_INSTRUCTIONS * report.get("decodes", 0)  # a quantized W's decoding, per K-step
    budget = scale * ruler_loop["instructions"] + slack + MASK_INSTRUCTIONS * report.get("masked", 0) + decoding
    if nested_alike and loop.get("instructions", 0) > budget:
        failed["instructions per K-step"] = (f"{loop['instructions']}, yardstick {ruler_loop['instructions']}"
                                             f" (budget {budget:.0f})")
    return failed


def _gate(reports, known_failures=None):
    """Assert the gate; known failures of today's kernels (``known_failures``, by label: sm_90's by
    default) end the test as xfail, naming them."""
    known_failures = KNOWN_FAILURES if known_failures is None else known_failures
    unexpected, known, fixed = [], [], []
    for r in reports:
        failed, listed = gate_failures(r), known_failures.get(r["label"], [])
        unexpected += [f"{r['label']}: {check}: {why}" for check, why in failed.items() if check not in listed]
        known += [f"{r['label']}: {check}: {why}" for check, why in failed.items() if check in listed]
        fixed += [f"{r['label']}: {check}" for check in listed if check not in failed]
    assert not unexpected, "compiled-code gate:\n" + "\n".join(unexpected)
    assert not fixed, "passes the gate now: remove it from sm90_gate_known_failures.json\n" + "\n".join(fixed)
    if known:
        pytest.xfail(f"{len(known)} known gate failures (sm90_gate_known_failures.json):\n" + "\n".join(known))


@pytest.mark.skipif(ON_GPU, reason="on a GPU the other tests compile and run every kernel")
@pytest.mark.parametrize("group", range(GROUPS))
def test_every_code_path_compiles_for_sm90(group):
    """Every branch of every kernel in float32, float16 and bfloat16, with the launchers' default configs."""
    _gate(_compile("paths", group, GROUPS))


@pytest.mark.skipif(ON_GPU, reason="on a GPU the other tests compile and run every kernel")
def test_bank_kernels_pass_the_gate():
    """The adapter-bank kernels (peft_ops/kernels/bank.py) in every dtype at the smallest and largest rank block,
    with the launchers' configs: the per-row core without MMA, the shrink and the sum on HMMA (16-row
    tiles: decode segments are often one row)."""
    reports = _compile("bank", 0, 1)
    assert len(reports) == 14
    _gate(reports)
    assert all(r["main_loop"]["mma"] == "HMMA" for r in reports if "sgmv" in r["label"]), reports


@pytest.mark.slow
@pytest.mark.skipif(ON_GPU, reason="on a GPU, test_gpu_only.py compiles and runs every config")
@pytest.mark.parametrize("group", range(GROUPS))
def test_every_autotune_config_compiles_for_sm90(group):
    """Every autotune config that survives pruning (a few minutes: run with -m slow after changing them)."""
    _gate(_compile("configs", group, GROUPS))


@pytest.mark.skipif(ON_GPU, reason="reads compiled code only; a GPU session runs the kernels")
def test_gate_reads_known_fast_kernels():
    """The gate's SASS reading on Triton's tutorial-style GEMMs (bench/tutorial_gemms.py): both pass the
    gate with HGMMA in the K-loop, the pipelined one fed by cp.async (LDGSTS), the persistent one by TMA
    in one flattened loop with its descriptor store. Both are software-pipelined (the rulers of
    ``pipeline_failures``): wgmma.wait_group 1 in the loop, and cp.async groups or UTMALDG of
    ``stages - 1`` K-steps in flight ahead of it."""
    reports = _compile("tutorials", 0, 1)
    assert len(reports) == 4
    for r in reports:
        assert not gate_failures(r), (r["label"], gate_failures(r))
        loop = r["main_loop"]
        assert loop["mma"] == "HGMMA" and loop["mma_count"] >= 4, r
        assert list(loop["loads"]) == (["UTMALDG"] if r["tma"] else ["LDGSTS"]), r
        assert r["utmaldg"] == r["tma"], r
        assert bool(loop["stores"]) == r["tma"] == r["flattened"], r
        assert r["wgmma_wait"] == 1 and not r["warnings"], r
        if r["tma"]:
            assert r["prologue_utmaldg"] == (r["stages"] - 1) * loop["loads"]["UTMALDG"], r
        else:
            assert r["cp_async_wait"] >= 1, r


@pytest.mark.skipif(ON_GPU, reason="reads compiled code only; a GPU session runs the kernels")
def test_gate_flags_an_unpipelined_kernel():
    """Each check the pipeline added fails on the counterexample of tests/sm90_compile.py (tutorial 09
    with the accumulator seeded at the tile's start, as the fused GEMM was): flattened, the pipeliner's
    warning, wgmma.wait_group 0 against the yardstick's 1, no UTMALDG ahead of the loop and the
    seeding dot inside it; nested with the ``a`` tile masked in registers, the instruction count."""
    flattened, masked = _compile("counterexample", 0, 1)
    assert set(gate_failures(flattened)) == {"compiler warnings", "wait depth", "prologue loads",
                                             "MMA per K-step"}, gate_failures(flattened)
    assert "Pipelining will be disabled" in gate_failures(flattened)["compiler warnings"]
    assert set(gate_failures(masked)) == {"instructions per K-step"}, gate_failures(masked)


def test_gate_flags_a_mask_drawn_per_element():
    """The shrink's mask budget (MASK_INSTRUCTIONS per masked element) fails on tutorial 03 masking its
    ``a`` tile with one Philox call per element, while the shrink with input dropout (eight elements
    per call) passes it: see the "paths" variants."""
    (report,) = _compile("mask_counterexample", 0, 1)
    assert "instructions per K-step" in gate_failures(report), gate_failures(report)


@pytest.mark.skipif(ON_GPU, reason="on a GPU the other tests compile and run every kernel")
def test_quantized_weight_variants_pass_the_gate():
    """The fused GEMM decoding an NF4 (double-quantized) or int8 W in its K-loop, bf16, with the launchers'
    configs for a quantized W: forward and dx at decode (16-row tiles, HMMA) and prefill (32×64, HMMA: see dequant.decodable_configs).
    The instruction check allows DECODE_INSTRUCTIONS per decoded element; the rest of the gate as for
    every variant (pipelined: cp.async groups in flight at least as deep as tutorial 03's)."""
    reports = _compile("quantized", 0, 1)
    assert len(reports) == 5 and all(r["decodes"] > 0 for r in reports), reports
    assert all(r["cp_async_wait"] >= r["yardstick"]["cp_async_wait"] for r in reports), reports
    _gate(reports)


@pytest.mark.skipif(ON_GPU, reason="reads compiled code only; a GPU session runs the kernels")
def test_gate_flags_a_quantized_tile_decoded_with_an_absmax_per_element():
    """The decode-instruction allowance still fails a bad decoding: a 4-bit forward whose BLOCK_K spans two
    absmax blocks (an absmax, with its double-quantization chain, per element; not a launcher's config)."""
    (bad,) = _compile("quantized_counterexample", 0, 1)
    failed = gate_failures(bad)
    assert {"instructions per K-step", "local memory"} <= set(failed), failed


def test_tutorial_gemms_compute_a_times_w_transposed(poisoned):
    """The yardstick kernels are GEMMs indeed: ``a Wᵀ`` on ragged sizes (the descriptor kernel needs
    16-byte-aligned rows: N and K multiples of 4 in float32)."""
    m, n, k, block = 70, 92, 48, dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=2)
    a, w = randn(m, k, device=DEVICE), randn(n, k, device=DEVICE)
    expected = a.double() @ w.double().T
    out = torch.empty(m, n, device=DEVICE)
    tiles = triton.cdiv(m, 32) * triton.cdiv(n, 32)
    tutorial_gemms.pointer_matmul_kernel[(tiles,)](a, w, out, m, n, k, *a.stride(), *w.stride(), *out.stride(), **block,
                                                   PRECISION="ieee")
    tolerance = 1e-2 if ON_GPU else 1e-6  # tf32 dots on a GPU
    assert rel_error(out, expected) < tolerance
    # device-side descriptors take their scratch memory from Triton's allocator
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=DEVICE))
    out = torch.empty(m, n, device=DEVICE)
    for flatten in (True, False):
        out = torch.empty(m, n, device=DEVICE)
        tutorial_gemms.persistent_descriptor_matmul_kernel[(3,)](a, w, out, m, n, k, **block, NUM_PROGRAMS=3,
                                                                 PRECISION="ieee", FLATTEN=flatten)
        assert rel_error(out, expected) < tolerance
