"""Compile kernel variants ahead of time for a Hopper GPU (sm_90) on a machine without one, and read
the compiled code.

Triton's own compiler (frontend, MLIR passes, LLVM, ptxas) runs on the CPU given an explicit target,
so what the interpreter forgives — non-constexpr globals, dot shapes, type mismatches, shared memory
beyond the chip's 227 KiB per block — fails here as it would on the GPU. The compiled code also shows
what decides speed without running it: registers, spills (local memory), the instructions of the main
loop (HGMMA/wgmma or HMMA/mma.sync; TMA loads UTMALDG, cp.async LDGSTS or plain LDG) and ptxas's
advisories. It cannot catch what only running shows (wrong results, illegal accesses, timings).

Run by tests/test_sm90_compile.py in a subprocess without TRITON_INTERPRET:
``python tests/sm90_compile.py paths|configs|tutorials|bank GROUP GROUPS`` prints a JSON line per variant of
the group; ``python tests/sm90_compile.py table [paths|configs|bank]`` prints the markdown table of
bench/NOTES.md (our variants beside the tutorial kernels of bench/tutorial_gemms.py).
"""
import contextlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
# Triton's C++ passes print their warnings (the pipeliner's "Pipelining will be disabled") to file
# descriptor 2 only with this set, and only while compiling: no cache hits
os.environ["MLIR_ENABLE_DIAGNOSTICS"] = "warnings"
os.environ["TRITON_ALWAYS_COMPILE"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/, run as a script

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bench import tutorial_gemms  # noqa: E402
from peft_ops.kernels import bank, dequant, dropout, fused_linear, lowrank_add, reductions  # noqa: E402
from peft_ops.kernels._config import dot_precision  # noqa: E402

# The targets the gate compiles for, each with what its compiled code is read for: ``shared`` (bytes a
# block may use: Hopper and Blackwell datacenter 227 KiB, A100 163 KiB, consumer Blackwell 99 KiB, an
# MI300X workgroup's LDS 64 KiB), ``mma`` (the MMA opcodes of its SASS or AMDGCN, the first the one a
# GEMM tile of ``big_rows`` rows or more must use), ``tma`` (whether the descriptor path applies).
TARGETS = {
    "sm_90": dict(target=GPUTarget("cuda", 90, 32), shared=227 * 1024, mma=("HGMMA", "HMMA"), big_rows=64, tma=True),
    "sm_80": dict(target=GPUTarget("cuda", 80, 32), shared=163 * 1024, mma=("HMMA",), big_rows=0, tma=False),
    # tcgen05.mma (UTC*MMA: f16/bf16 kind H, tf32 kind without a letter, fp8 Q, int8 I); mma.sync below 64 rows
    "sm_100": dict(target=GPUTarget("cuda", 100, 32), shared=227 * 1024,
                   mma=("UTCHMMA", "UTCMMA", "UTCQMMA", "UTCIMMA", "HMMA"), big_rows=64, tma=True),
    "sm_120": dict(target=GPUTarget("cuda", 120, 32), shared=99 * 1024, mma=("HMMA",), big_rows=0, tma=False),
    "gfx942": dict(target=GPUTarget("hip", "gfx942", 64), shared=64 * 1024, mma=("v_mfma",), big_rows=0, tma=False),
}


def use_target(name: str) -> None:
    """Compile for ``name`` (a key of TARGETS) from now on."""
    global TARGET_NAME, TARGET, SHARED_MEMORY_LIMIT, MMA
    TARGET_NAME, TARGET = name, TARGETS[name]["target"]
    SHARED_MEMORY_LIMIT, MMA = TARGETS[name]["shared"], TARGETS[name]["mma"]
    _yardsticks.clear()


# What the kernels rely on, set explicitly so that Triton 3.10's new default (off) cannot change the
# compiled code: the launchers pass the same (peft_ops/kernels/_config.py LAUNCH_OPTIONS)
from peft_ops.kernels._config import LAUNCH_OPTIONS  # noqa: E402
TYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
# the dot precision the launchers pick for each dtype (under torch's default float32 matmul precision)
PRECISION = {name: dot_precision(getattr(torch, name)) for name in TYPE}


def _variant(kernel, config, dtype, pointers, constexprs, large=(), estimate=None, unit=(), aligned=()):
    """Signature of ``kernel``: data pointers of ``dtype`` unless ``pointers`` says otherwise, float
    scalars for scale/drop_scale, i32 integers (i64 for the names in ``large``); pointers 16-byte
    aligned, as torch allocates. Like a real launch, the integers named in ``unit`` are specialised to
    the constant 1 and those in ``aligned`` marked divisible by 16. ``estimate``: our bound on its
    shared memory, to check."""
    sig, attrs = {}, {}
    constexprs = {**constexprs, **{name: 1 for name in unit}}
    # constexpr parameters with a default left to it (kept out of the label: T_SPLITS, SPLITS = 1)
    defaults = {name: p.default for name, p in inspect.signature(kernel.fn).parameters.items()
                if p.default is not inspect.Parameter.empty and name not in constexprs and name not in config.kwargs}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs or name in config.kwargs or name in defaults:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, "*" + TYPE[dtype])
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("scale", "drop_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if name in large else "i32"
            if name in aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return dict(kernel=kernel.__name__, config=dict(config.kwargs), warps=config.num_warps, stages=config.num_stages,
                dtype=dtype, constexprs=constexprs, defaults=defaults, signature=sig, attrs={str(k[0]): v for k, v in attrs.items()},
                aligned=list(aligned), estimate=estimate)


_GEMM_BASE = dict(HAS_BIAS=True, HAS_LOW_RANK=True, SHRINK_IN_LOOP=False, OUTPUT_DROPOUT=False, STORE_T=True, TMA=False,
                  W_TRANSPOSED=False, PARTIAL=False, UPCAST=False, PRECISION="tf32", BLOCK_R=16)


def _gemm_variant(config, dtype, layout, path="pointer", **flags):
    """``layout``: "forward" (contiguous x, W and t; D = Aᵀ of an r×K A) or "backward" (contiguous g; W
    transposed; no bias, as dx has none), specialised as real launches are (unit strides, aligned sizes:
    the launchers give every operand a unit stride, see fused_linear's ``_with_unit_stride``).
    ``path``: "pointer" or "tma". Input-side dropout is the shrink kernel's: the GEMM's variant has none."""
    c = dict(_GEMM_BASE, TMA=path == "tma", W_TRANSPOSED=path == "tma" and layout == "backward",
             **(dict(HAS_BIAS=False) if layout == "backward" else {}), **flags)
    if c["PARTIAL"]:  # split-K partial sums: the output is float32
        c["STORE_T"] = False
    fl = fused_linear
    kind = fl._gemm_kind(c["HAS_LOW_RANK"], c["SHRINK_IN_LOOP"])
    size = 4 if dtype == "float32" else 2
    unit, aligned = {"forward": (("stride_ak", "stride_wk", "stride_dk", "stride_er", "stride_on", "stride_b"),
                                 ("K", "N", "stride_am", "stride_wn", "stride_dr", "stride_om")),
                     "backward": (("stride_ak", "stride_wn", "stride_dr", "stride_er", "stride_on"),
                                  ("K", "N", "stride_am", "stride_wk", "stride_dk", "stride_om"))}[layout]
    fp32 = {"expand_ptr": "*fp32", "t_ptr": "*fp32", "seed_ptr": "*i64"}  # D is cast to a's dtype
    pointers = {**fp32, "out_ptr": "*fp32"} if c["PARTIAL"] else fp32
    v = _variant(fl._lowrank_linear_kernel, config, dtype, pointers, c, unit=unit, aligned=aligned,
                 estimate=fl.shared_memory_bytes(config, kind, c["BLOCK_R"], size, c["PRECISION"], path))
    v["extra_mma"] = c["SHRINK_IN_LOOP"]  # t's dot beside the yardstick's in the K-loop
    if path == "tma":
        v["tma"] = True
        # persistent tiles without a given t (the kernel flattens only those: see its FLATTEN): the
        # tile loop must flatten with the K-loop, the epilogue's store inside the one loop
        v["flattened"] = not c["PARTIAL"] and (c["SHRINK_IN_LOOP"] or not c["HAS_LOW_RANK"])
    return v



def variants(which: str):
    """``which``: "paths" (every code path in float32 and bfloat16 and two in float16, with the configs
    the launchers pick without autotuning) or "configs" (every autotune config that survives pruning).
    Variants of the descriptor path carry ``"tma": True``."""
    fl = fused_linear
    shrink, reduce = fl._shrink_kernel, reductions._rank_reduce_kernel
    fp32 = {"expand_ptr": "*fp32", "t_ptr": "*fp32", "seed_ptr": "*i64"}  # D is cast to a's dtype
    gemm_variant = _gemm_variant

    def shrink_variant(config, dtype, block_r, drop, splits=1, layout="forward"):
        """``layout``: "forward" (x and D = Aᵀ of an r×K A: unit K-strides) or "backward" (g and U, N×r)."""
        size = 4 if dtype == "float32" else 2
        unit = ("stride_ak", "stride_dk" if layout == "forward" else "stride_dr")
        aligned = ("K", "stride_am", "stride_dr" if layout == "forward" else "stride_dk")
        v = _variant(shrink, config, dtype, fp32, dict(DROPOUT_INPUT=drop, UPCAST=False, PRECISION=PRECISION[dtype],
                                                       BLOCK_R=block_r, **(dict(SPLITS=splits) if splits > 1 else {})),
                     estimate=fl.shared_memory_bytes(config, "shrink", block_r, size, PRECISION[dtype]),
                     unit=unit, aligned=aligned)
        if drop:  # the input-dropout mask of each a tile, drawn in the K-loop
            v["masked"] = config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_K"] // (32 * config.num_warps)
        return v

    loop_r = fl._LOOP_SHRINK_MIN_BLOCK_R  # the in-loop shrink's smallest BLOCK_R
    out = []
    if which == "configs":
        for path, configs in (("pointer", fl.GEMM_CONFIGS), ("tma", fl.TMA_GEMM_CONFIGS)):
            for config in fl.fitting_configs(configs, "gemm_in_loop", 64, 2, "tf32", path, output_dropout=True):
                out.append(gemm_variant(config, "bfloat16", "forward", path, SHRINK_IN_LOOP=True, OUTPUT_DROPOUT=True,
                                        HAS_BIAS=False, BLOCK_R=64))
            for config in fl.fitting_configs(configs, "gemm", 256, 2, "tf32", path, output_dropout=True):
                out.append(gemm_variant(config, "bfloat16", "forward", path, OUTPUT_DROPOUT=True, BLOCK_R=256))
            for config in fl.fitting_configs(configs, "gemm", 16, 2, "tf32", path, output_dropout=True):
                out.append(gemm_variant(config, "bfloat16", "backward", path, OUTPUT_DROPOUT=True, BLOCK_R=16))
            for config in fl.fitting_configs(configs, "gemm", 256, 4, PRECISION["float32"], path):  # costliest epilogue
                out.append(gemm_variant(config, "float32", "forward", path, BLOCK_R=256,
                                        PRECISION=PRECISION["float32"]))
            for config in fl.fitting_configs(configs, "gemm", 16, 2, "tf32", path):
                out.append(gemm_variant(config, "bfloat16", "backward", path, BLOCK_R=16))
                for bias in (True, False):  # the forward of inference, with and without bias
                    out.append(gemm_variant(config, "bfloat16", "forward", path, HAS_BIAS=bias, BLOCK_R=16))
            for config in fl.fitting_configs(configs, "plain", 16, 2, "tf32", path):  # kernels.linear
                out.append(gemm_variant(config, "bfloat16", "forward", path, HAS_LOW_RANK=False, STORE_T=False))
            for config in fl.fitting_configs(fl.DECODE_GEMM_CONFIGS, "gemm_in_loop", 64, 2, "tf32", path):
                out.append(gemm_variant(config, "bfloat16", "forward", path, SHRINK_IN_LOOP=True, BLOCK_R=64,
                                        PARTIAL=True))
        for config in fl.fitting_configs(fl.SHRINK_CONFIGS, "shrink", 256, 2, "tf32", input_dropout=True):
            out.append(shrink_variant(config, "bfloat16", 256, True))
        return out
    for dtype in TYPE:
        size, precision = 4 if dtype == "float32" else 2, PRECISION[dtype]
        for in_loop in (False, True):
            for bias, drop in ((True, False), (False, False), (True, True)):
                if dtype == "float16" and (drop if in_loop else bias):
                    continue  # fp16 compiles as bf16 does: two of its paths suffice
                kind = fl._gemm_kind(True, in_loop)
                flags = dict(SHRINK_IN_LOOP=in_loop, OUTPUT_DROPOUT=drop, HAS_BIAS=bias, PRECISION=precision)
                # the pointer path (at M ≤ 16 with the in-loop shrink) and the descriptor path: large M
                # (the in-loop shrink up to M = 64) and decoding (split K)
                for path, preferred, extra in (
                        ("pointer", fl._PREFERRED_DECODE_GEMM if in_loop else fl._PREFERRED_GEMM, {}),
                        ("tma", fl._PREFERRED_TMA_GEMM, {}),
                        ("tma", fl._PREFERRED_DECODE_GEMM, dict(PARTIAL=True))):
                    if extra and dtype == "float16":
                        continue
                    block_r = loop_r if in_loop else 16
                    config = fl.default_config(preferred, kind, block_r, size, precision, path, drop)
                    out.append(gemm_variant(config, dtype, "forward", path, BLOCK_R=block_r, **flags, **extra))
        # decoding where the N-blocks fill the GPU (no split of K): the shrink kernel split along K, its
        # partial sums added by the GEMM at each tile's start (T_SPLITS)
        decode_splits = fl._SHRINK_MAX_SPLITS // 2
        if dtype != "float16":
            for bias, drop in ((True, False), (False, False), (True, True)):
                for path in ("pointer", "tma"):
                    if dtype == "float32" and (path == "pointer" or not bias):
                        continue
                    config = fl.default_config(fl._PREFERRED_DECODE_GEMM, "gemm", 16, size, precision, path, drop)
                    out.append(gemm_variant(config, dtype, "forward", path, HAS_BIAS=bias, OUTPUT_DROPOUT=drop,
                                            PRECISION=precision, T_SPLITS=decode_splits))
            for drop in (False, True) if dtype == "bfloat16" else (False,):
                out.append(shrink_variant(fl.default_config(fl._PREFERRED_SHRINK, "shrink", 16, size, precision,
                                                            input_dropout=drop), dtype, 16, drop, decode_splits))
        if dtype == "bfloat16":  # above decoding, t as the partial sums of a shrink split along K (T_SPLITS)
            for layout, path, preferred in (("forward", "pointer", fl._PREFERRED_GEMM),
                                            ("forward", "tma", fl._PREFERRED_TMA_GEMM),
                                            ("backward", "tma", fl._PREFERRED_TMA_GEMM)):
                for drop in (False, True):
                    config = fl.default_config(preferred, "gemm", 16, size, precision, path, drop)
                    out.append(gemm_variant(config, dtype, layout, path, OUTPUT_DROPOUT=drop, PRECISION=precision,
                                            T_SPLITS=3))
        for layout in ("forward", "backward"):  # specialised as real launches are (unit strides, aligned sizes)
            for path, preferred in (("pointer", fl._PREFERRED_GEMM), ("tma", fl._PREFERRED_TMA_GEMM)):
                if path == "tma" and layout == "backward" and dtype == "float32":
                    continue  # float32's Wᵀ takes the pointer path (fused_linear's _descriptor_layout)
                drop = layout == "backward"  # the forward's input-side dropout is the shrink kernel's
                config = fl.default_config(preferred, "gemm", 16, size, precision, path, drop)
                out.append(gemm_variant(config, dtype, layout, path, OUTPUT_DROPOUT=drop, PRECISION=precision))
        if dtype == "float16":
            continue
        for path, preferred in (("pointer", fl._PREFERRED_GEMM), ("tma", fl._PREFERRED_TMA_GEMM)):
            out.append(gemm_variant(fl.default_config(preferred, "plain", 16, size, precision, path), dtype,
                                    "forward", path, HAS_LOW_RANK=False, STORE_T=False, PRECISION=precision))
        for drop in (False, True):
            out.append(shrink_variant(fl.default_config(fl._PREFERRED_SHRINK, "shrink", 64, size, precision,
                                                        input_dropout=drop), dtype, 64, drop))
            out.append(_variant(reduce, triton.Config({}), dtype, {"b_ptr": "*fp32", "partial_ptr": "*fp32",
                                                                   "seed_ptr": "*i64"},
                                dict(DROPOUT=drop, UPCAST=False, PRECISION=PRECISION["float32"],
                                     BLOCK_M=reductions._BLOCK_M, BLOCK_P=reductions._BLOCK_P,
                                     BLOCK_R=64), unit=("stride_ap", "stride_bm")))  # b: float32 whatever a is, M-major
        out.append(shrink_variant(fl.default_config(fl._PREFERRED_SHRINK, "shrink", 16, size, precision), dtype, 16,
                                  False, layout="backward"))  # dx's: g and U
        out.append(_variant(fl._sum_splits_kernel, triton.Config({}), dtype, {"partial_ptr": "*fp32"},
                            dict(BLOCK=1024)))
    # int64 sizes, as for tensors past 2³¹ elements
    out.append(gemm_variant(fl.default_config(fl._PREFERRED_GEMM, "gemm", 16, 2, "tf32", "pointer", True), "bfloat16",
                            "forward", OUTPUT_DROPOUT=True))
    out[-1]["signature"].update({n: "i64" for n in ("M", "stride_am", "stride_tm", "stride_om")})
    # the largest rank without autotuning, in each dtype (float32's tf32x3 epilogue is the largest)
    for dtype, size in (("bfloat16", 2), ("float32", 4)):
        for block_r in (128, 256):
            for path, preferred in (("pointer", fl._PREFERRED_GEMM), ("tma", fl._PREFERRED_TMA_GEMM)):
                out.append(gemm_variant(fl.default_config(preferred, "gemm", block_r, size, PRECISION[dtype], path),
                                        dtype, "forward", path, BLOCK_R=block_r, PRECISION=PRECISION[dtype]))
        out.append(gemm_variant(fl.default_config(fl._PREFERRED_DECODE_GEMM, "gemm", 256, size, PRECISION[dtype]),
                                dtype, "forward", BLOCK_R=256, PRECISION=PRECISION[dtype]))
    out.append(shrink_variant(fl.default_config(fl._PREFERRED_SHRINK, "shrink", 256, 4, PRECISION["float32"]),
                              "float32", 256, False))
    # the low-rank add at its largest rank, with and without dropout, onto cuBLAS's float32 result, with a bias
    for dtype in TYPE:
        for drop in (False, True):
            out.append(_variant(lowrank_add._add_lowrank_kernel, lowrank_add.ADD_LOWRANK_CONFIG, dtype,
                                {"base_ptr": "*fp32", "t_ptr": "*fp32", "expand_ptr": "*bf16", "seed_ptr": "*i64"},
                                dict(HAS_BIAS=True, DROPOUT=drop, PRECISION=PRECISION[dtype], BLOCK_R=256),
                                unit=("stride_on", "stride_bn", "stride_bias", "stride_tr", "stride_er")))
    # dropout masks
    out.append(_variant(dropout._dropout_mask_kernel, triton.Config({}), "float32",
                        {"out_ptr": "*i8", "seed_ptr": "*i64"}, dict(BLOCK_ROWS=32, BLOCK_COLS=64)))
    return out


def tutorial_variants():
    """The tutorial-style GEMMs of bench/tutorial_gemms.py in bfloat16, on the descriptor path's default
    128×128 tile and on the largest autotune tile, specialised as our "forward" layout is (unit K-strides,
    16-divisible sizes)."""
    out = []
    for ours in (fused_linear._PREFERRED_TMA_GEMM[1], fused_linear.GEMM_CONFIGS[0]):
        # the same tile, without our kernel's own keys (the epilogue's sub-tile width)
        config = triton.Config({k: v for k, v in ours.kwargs.items() if k != "EPILOGUE_N"},
                               num_warps=ours.num_warps, num_stages=ours.num_stages)
        out.append(_variant(tutorial_gemms.pointer_matmul_kernel, config, "bfloat16", {}, dict(PRECISION="tf32"),
                            unit=("stride_ak", "stride_wk", "stride_cn"),
                            aligned=("K", "N", "stride_am", "stride_wn", "stride_cm")))
        out.append(_descriptor_yardstick(config, "bfloat16", "tf32", flatten=True))
    return out


def _descriptor_yardstick(config, dtype, precision, flatten):
    v = _variant(tutorial_gemms.persistent_descriptor_matmul_kernel, config, dtype, {},
                 dict(NUM_PROGRAMS=132, PRECISION=precision, FLATTEN=flatten), aligned=("K", "N"))
    v["tma"], v["flattened"] = True, flatten
    return v


# the integer arguments of the kernels compared with tutorial 03 and the yardstick's arguments they stand for
_GEMM_ARGS = {"K": "K", "N": "N", "stride_ak": "stride_ak", "stride_am": "stride_am", "stride_wk": "stride_wk",
              "stride_wn": "stride_wn", "stride_on": "stride_cn", "stride_om": "stride_cm"}
_SHRINK_ARGS = {"K": "K", "stride_ak": "stride_ak", "stride_am": "stride_am", "stride_dk": "stride_wk",
                "stride_dr": "stride_wn"}


def yardstick(v):
    """The tutorial GEMM that ``v``'s main loop is measured against (None: no yardstick): for the fused
    GEMM on the descriptor path tutorial 09 (persistent, descriptors) with the same tile, warps, stages
    and loop form (flattened or nested), on the pointer path and for the shrink kernels tutorial 03
    (pipelined pointer loads) with the same tile, warps, stages and stride specialisation (the rank
    block as the tile's N); both in the variant's dtype and dot precision."""
    c = {**v["constexprs"], **v["config"]}
    if v["kernel"] not in ("_lowrank_linear_kernel", "_shrink_kernel", "_sgmv_shrink_kernel",
                           "_unpipelined_matmul_kernel", "_unpipelined_pointer_kernel"):
        return None
    tile = {"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"] if "BLOCK_N" in c else c["BLOCK_R"], "BLOCK_K": c["BLOCK_K"],
            "GROUP_M": c.get("GROUP_M", 8)}
    config = triton.Config(tile, num_warps=v["warps"], num_stages=v["stages"])
    if v.get("tma"):
        return _descriptor_yardstick(config, v["dtype"], c["PRECISION"], bool(v.get("flattened")))
    same = {name: name for name in _GEMM_ARGS.values()}
    args = {"_lowrank_linear_kernel": _GEMM_ARGS, "_unpipelined_pointer_kernel": same}.get(v["kernel"], _SHRINK_ARGS)
    unit = tuple(args[name] for name in v["constexprs"] if name in args)
    aligned = tuple(args[name] for name in v["aligned"] if name in args)
    return _variant(tutorial_gemms.pointer_matmul_kernel, config, v["dtype"], {}, dict(PRECISION=c["PRECISION"]),
                    unit=unit, aligned=aligned)


def bank_variants():
    """The adapter-bank kernels (peft_ops/kernels/bank.py) with the launchers' configs, at the smallest and the
    largest rank block the launchers pass: the shrink and the sum in every dtype of the activations and
    the output (the bank's factors, cores and ``t`` are float32), the per-row core in float32 only."""
    index = {"rows_ptr": "*i64", "order_ptr": "*i64", "starts_ptr": "*i64", "adapters_ptr": "*i64"}
    factors = dict(index, downs_ptr="*fp32", expands_ptr="*fp32", t_ptr="*fp32")
    out = [_variant(bank._bank_core_kernel, bank.BANK_CORE_CONFIG, "float32", index, dict(BLOCK_R=block_r))
           for block_r in (16, fused_linear.MAX_RANK)]
    for dtype in TYPE:
        for block_r in (16, bank._rank_step(fused_linear.MAX_RANK)):
            out.append(_variant(bank._sgmv_shrink_kernel, bank.SGMV_SHRINK_CONFIG, dtype, factors,
                                dict(UPCAST=False, PRECISION=PRECISION[dtype], BLOCK_R=block_r),
                                unit=("stride_ak", "stride_dr"), aligned=("K", "stride_am", "stride_dk")))
            out.append(_variant(bank._sgmv_expand_kernel, bank.SGMV_EXPAND_CONFIG, dtype, factors,
                                dict(PRECISION=PRECISION["float32"], BLOCK_R=block_r)))
    return out


@triton.jit
def _unpipelined_matmul_kernel(a_ptr, w_ptr, t_ptr, e_ptr, c_ptr, M, N, K, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                               NUM_PROGRAMS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
                               FLATTEN: tl.constexpr, MASK_A: tl.constexpr):
    """The gate's counterexample: tutorial 09 with the accumulator seeded at each tile's start by a
    rank-r product ``t Eᵀ``, as our kernel did before 2026-12: flattened (``FLATTEN``), Triton's
    pipeliner gives up on the loop. ``MASK_A``: the ``a`` tile masked in registers every K-step (work a
    descriptor makes needless), for the instruction count's check."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    num_tiles_m, num_tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    for tile in tl.range(tl.program_id(0), num_tiles_m * num_tiles_n, NUM_PROGRAMS, flatten=FLATTEN):
        block_m, block_n = tutorial_gemms._grouped_tile(tile, num_tiles_m, num_tiles_n, GROUP_M)
        rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
        t = tl.load(t_ptr + rows[:, None] * BLOCK_R + ranks[None, :], mask=rows[:, None] < M, other=0.0)
        e = tl.load(e_ptr + cols[None, :] * BLOCK_R + ranks[:, None], mask=cols[None, :] < N, other=0.0)
        acc = tl.dot(t, e, input_precision=PRECISION)
        for k in range(0, K, BLOCK_K):
            a = a_desc.load([block_m * BLOCK_M, k])
            if MASK_A:
                a = tl.where((k + tl.arange(0, BLOCK_K))[None, :] < K, a, 0.0)
            w = w_desc.load([block_n * BLOCK_N, k])
            acc = tl.dot(a, w.T, acc, input_precision=PRECISION)
        c_desc.store([block_m * BLOCK_M, block_n * BLOCK_N], acc.to(c_desc.dtype))


def counterexample_variants():
    """The counterexample in bf16 at rank 16 on 128×128×64 tiles, 8 warps, 3 stages (its whole-tile
    store does not fit beside 128×256 ones), flattened (the fused GEMM before the fix) and nested with
    a masked ``a``; each measured against tutorial 09 with the same tile, warps, stages and loop form."""
    ours = fused_linear._PREFERRED_TMA_GEMM[1]
    config = triton.Config({k: v for k, v in ours.kwargs.items() if k != "EPILOGUE_N"},
                           num_warps=ours.num_warps, num_stages=ours.num_stages)
    out = []
    for flatten, mask in ((True, False), (False, True)):
        v = _variant(_unpipelined_matmul_kernel, config, "bfloat16", {"t_ptr": "*fp32", "e_ptr": "*fp32"},
                     dict(NUM_PROGRAMS=132, PRECISION="tf32", BLOCK_R=16, FLATTEN=flatten, MASK_A=mask),
                     aligned=("K", "N"))
        v["tma"], v["flattened"] = True, flatten
        out.append(v)
    return out


@triton.jit
def _unpipelined_pointer_kernel(a_ptr, w_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_wn, stride_wk, stride_cm,
                                stride_cn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                GROUP_M: tl.constexpr, PRECISION: tl.constexpr, PIPELINE: tl.constexpr,
                                MASK_ROWS: tl.constexpr, DROP_A: tl.constexpr = False):
    """The pointer path's counterexample: tutorial 03 (bench/tutorial_gemms.py) with its K-loop kept out
    of the software pipeline (``PIPELINE=False``: the loop's own ``num_stages=1``), or pipelined but with
    rows and columns masked every K-step (``MASK_ROWS``: the instruction count's check), or with its
    ``a`` tile dropped (p = 1/2) by one Philox call per element (``DROP_A``, ``tl.rand``'s way, where the
    kernels draw eight elements per call: the dropout-mask budget's check)."""
    block_m, block_n = tutorial_gemms._grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N),
                                                    GROUP_M)
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_block = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
    w_block = w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_step in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=None if PIPELINE else 1):
        k_left = K - k_step * BLOCK_K
        a_mask = ks[None, :] < k_left
        w_mask = ks[:, None] < k_left
        if MASK_ROWS:
            # a division by a runtime value per element and K-step (not run: what it computes is beside the point)
            a_mask = a_mask & (rows[:, None] < M) & ((rows[:, None] * k_left) % M < K)
            w_mask = w_mask & (cols[None, :] < N) & ((cols[None, :] * k_left) % N < K)
        a = tl.load(a_block, mask=a_mask, other=0.0)
        if DROP_A:
            a = tl.where(tl.rand(0, rows[:, None] * K + (k_step * BLOCK_K + ks)[None, :]) >= 0.5, a, 0.0)
        w = tl.load(w_block, mask=w_mask, other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_block += BLOCK_K * stride_ak
        w_block += BLOCK_K * stride_wk
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


def mask_counterexample_variants():
    """The per-element mask on the shrink's default tile (32 rows, BLOCK_K 64, rank block 64 as the
    tile's N), bf16, measured against tutorial 03 there with the shrink's mask budget."""
    config = triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=3)
    v = _variant(_unpipelined_pointer_kernel, config, "bfloat16", {},
                 dict(PRECISION="tf32", PIPELINE=True, MASK_ROWS=False, DROP_A=True),
                 unit=("stride_ak", "stride_wk", "stride_cn"), aligned=("K", "N", "stride_am", "stride_wn", "stride_cm"))
    v["masked"] = 32 * 64 // (32 * 4)
    return [v]


def tensor_memory_counterexample_variants():
    """The fused GEMM with a given t and no bias on a 128×256 descriptor-path tile (8 warps, 3 stages,
    bf16, rank 16), the launchers' first choice on Hopper: for sm_100 Triton compiles it to a trap (with
    a bias it did until the bias moved to the tile's start; the launchers keep such tiles off GPUs with
    tensor memory: fused_linear's ``fitting_configs``)."""
    config = fused_linear._PREFERRED_TMA_GEMM[0]
    return [_gemm_variant(config, "bfloat16", "forward", "tma", HAS_BIAS=False)]


def pointer_counterexample_variants():
    """The pointer counterexample in bf16 on the pointer path's default tile (64×64×32, 4 warps, 3
    stages), unpipelined and masked; each measured against tutorial 03 at the same tile, warps and
    stages, specialised alike (unit K-strides, 16-divisible sizes)."""
    ours = fused_linear.default_config(fused_linear._PREFERRED_GEMM, "gemm", 16, 2, "tf32", "pointer")
    config = triton.Config({k: v for k, v in ours.kwargs.items() if k != "EPILOGUE_N"},
                           num_warps=ours.num_warps, num_stages=ours.num_stages)
    return [_variant(_unpipelined_pointer_kernel, config, "bfloat16", {},
                     dict(PRECISION="tf32", PIPELINE=mask, MASK_ROWS=mask),
                     unit=("stride_ak", "stride_wk", "stride_cn"),
                     aligned=("K", "N", "stride_am", "stride_wn", "stride_cm")) for mask in (False, True)]


def target_variants():
    """The gate's subset for targets other than sm_90 (each compile is about a second): the fused GEMM
    on the pointer path, specialised as launches on contiguous tensors are, at rank blocks 16 and 64,
    in bf16 and fp16: forward with and without bias, with output dropout, and dx (transposed W, output
    dropout, no bias); on the descriptor path too where the target has TMA; the default configs of the
    launchers (which do not look at the target)."""
    fl, out = fused_linear, []
    paths = ("pointer", "tma") if TARGETS[TARGET_NAME]["tma"] else ("pointer",)
    for dtype, size in (("bfloat16", 2), ("float16", 2)):
        for block_r in (16, 64):
            for path in paths:
                preferred = fl._PREFERRED_TMA_GEMM if path == "tma" else fl._PREFERRED_GEMM
                for layout, flags in (("forward", dict(HAS_BIAS=True)), ("forward", dict(HAS_BIAS=False)),
                                      ("forward", dict(OUTPUT_DROPOUT=True)),
                                      ("backward", dict(OUTPUT_DROPOUT=True))):
                    drop = flags.get("OUTPUT_DROPOUT", False)
                    config = fl.default_config(preferred, "gemm", block_r, size, "tf32", path, drop,
                                               tensor_memory=TARGET_NAME == "sm_100")
                    out.append(_gemm_variant(config, dtype, layout, path, BLOCK_R=block_r, **flags))
    return out


# --- quantized weights (issue 22): the fused GEMM decoding NF4 / int8 tiles of W in its K-loop ------------
_QUANTIZED_POINTERS = {"4bit": {"w_ptr": "*u8", "q_scale_ptr": "*u8", "q_code_ptr": "*fp32", "q_scale2_ptr": "*fp32",
                                "q_code2_ptr": "*fp32", "q_offset_ptr": "*fp32"},
                       "int8": {"w_ptr": "*i8", "q_scale_ptr": "*fp32", "q_code_ptr": "*fp32",
                                "q_scale2_ptr": "*fp32", "q_code2_ptr": "*fp32", "q_offset_ptr": "*fp32"}}


def _quantized_variant(config, dtype, layout, w_format, **flags):
    """The pointer path's fused GEMM over a quantized W (``W_FORMAT`` "4bit" with double quantization, or
    "int8"), specialised as launches on contiguous tensors are; ``layout`` "forward" or "backward" (dx:
    the stored weight decoded transposed, ``W_TRANSPOSED``). Marked ``"decodes"``: the gate's instruction
    check allows the decoding work per K-step (tests/test_sm90_compile.py ``DECODE_INSTRUCTIONS``)."""
    quant = dict(W_FORMAT=w_format, QUANT_BLOCK=64 if w_format == "4bit" else 1, NESTED=w_format == "4bit",
                 NESTED_BLOCK=256, PTX_LOOKUP=True)  # as a CUDA launch sets it
    v = _gemm_variant(config, dtype, layout, "pointer", **quant, **flags)
    v["constexprs"]["W_TRANSPOSED"] = layout == "backward"
    names = list(KERNELS["_lowrank_linear_kernel"].arg_names)
    for name, kind in _QUANTIZED_POINTERS[w_format].items():
        v["defaults"].pop(name, None)
        v["signature"][name] = kind
        v["attrs"][str(names.index(name))] = [["tt.divisibility", 16]]
    c = {**v["constexprs"], **v["config"]}
    # elements of W each thread decodes per K-step, the decode work the instruction check allows for
    v["decodes"] = c["BLOCK_N"] * c["BLOCK_K"] // (32 * v["warps"])
    kind = fused_linear._gemm_kind(c["HAS_LOW_RANK"], c["SHRINK_IN_LOOP"])
    v["estimate"] = (fused_linear.shared_memory_bytes(config, kind, c["BLOCK_R"], 2, c["PRECISION"])
                     + dequant.decode_shared_bytes(config))  # the launcher's bound for a quantized W
    return v


def _quantized_config(preferred, layout, w_format):
    """The config the launcher picks for a quantized W (``dequant.decodable_configs``)."""
    fl = fused_linear
    return fl.default_config(dequant.decodable_configs(preferred, w_format, layout == "backward", 64), "gemm", 16, 2,
                             "tf32", "pointer")


def quantized_variants():
    """bf16, NF4 with double quantization, rank block 16: forward and dx with the launchers' configs at
    M ≤ 16 (decode: the split shrink's t, T_SPLITS; the forward's BLOCK_K and dx's BLOCK_N within one
    64-value block) and above (prefill, the pointer path's default tile); int8 forward at decode."""
    fl, out = fused_linear, []
    splits = fl._SHRINK_MAX_SPLITS // 2
    for preferred, extra in ((fl._PREFERRED_DECODE_GEMM, dict(T_SPLITS=splits)), (fl._PREFERRED_GEMM, {})):
        for layout in ("forward", "backward"):
            out.append(_quantized_variant(_quantized_config(preferred, layout, "4bit"), "bfloat16", layout, "4bit",
                                          **extra))
    out.append(_quantized_variant(_quantized_config(fl._PREFERRED_DECODE_GEMM, "forward", "int8"), "bfloat16",
                                  "forward", "int8", T_SPLITS=splits))
    return out


def quantized_counterexample_variants():
    """The forward at 16×32×128 (w4s4), which the launcher does not pick for a 4-bit W: its 128 columns
    of K span two absmax blocks, decoded with an absmax per element (the per-element branch of
    ``dequant.decoded_tile``): the gate's decode-instruction check must fail it (and it spills)."""
    fl = fused_linear
    v = _quantized_variant(fl._PREFERRED_DECODE_GEMM[0], "bfloat16", "forward", "4bit",
                           T_SPLITS=fl._SHRINK_MAX_SPLITS // 2)
    v["estimate"] = None  # not a launcher's config: no bound of ours to check
    return [v]


KERNELS = {k.__name__: k for k in (_unpipelined_matmul_kernel, _unpipelined_pointer_kernel,
                                   fused_linear._lowrank_linear_kernel, fused_linear._shrink_kernel,
                                   fused_linear._sum_splits_kernel, reductions._rank_reduce_kernel,
                                   dropout._dropout_mask_kernel,
                                   lowrank_add._add_lowrank_kernel, tutorial_gemms.pointer_matmul_kernel,
                                   tutorial_gemms.persistent_descriptor_matmul_kernel)}
# the dimension of a kernel's main-loop dot that the MMA's M is (rows per warpgroup instruction: 64 for
# wgmma); kernels without a K-loop are absent. Kernels not named here: BLOCK_M.
MAIN_LOOP_ROWS = {"_rank_reduce_kernel": "BLOCK_P", "_dropout_mask_kernel": None, "_add_lowrank_kernel": None,
                  "_sum_splits_kernel": None}
KERNELS.update({k.__name__: k for k in (bank._bank_core_kernel, bank._sgmv_shrink_kernel, bank._sgmv_expand_kernel)})
MAIN_LOOP_ROWS["_bank_core_kernel"] = None  # rank-1 updates, no MMA


def _tool(name: str) -> str:
    """A CUDA tool from Triton's wheel, or where TRITON_<NAME>_PATH points (as Triton resolves it)."""
    return getattr(triton.knobs.nvidia, name).path


_MLIR_WARNING = re.compile(r"^\S+:\d+:\d+: warning: (.*)$", re.MULTILINE)


def _compile_with_log(source, options):
    """The compiled kernel, ptxas's messages (its advisories, e.g. C7510/C7512 "wgmma.mma_async
    instructions are serialized ..."): Triton prints them only while ``dump_ptxas_log`` is set, and
    not at all on a cache hit, where ptxas runs again here) and the compiler's warnings (the MLIR
    passes', e.g. the pipeliner's, written by C++ to file descriptor 2: read from there)."""
    triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with tempfile.TemporaryFile() as stderr, contextlib.redirect_stdout(log):
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(stderr.fileno(), 2)
        try:
            compiled = triton.compile(source, target=TARGET, options=options)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        stderr.seek(0)
        warnings = sorted(set(_MLIR_WARNING.findall(stderr.read().decode(errors="replace"))))
    log = log.getvalue()
    if TARGET.backend != "cuda":
        return compiled, log, warnings
    return compiled, log if "ptxas" in log else _ptxas_log(compiled.asm["ptx"], compiled.metadata), warnings


def _ptxas_log(ptx: str, options) -> str:
    """ptxas's messages for ``ptx``, run as Triton runs it."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        fmad = [] if options.enable_fp_fusion else ["--fmad=false"]
        result = subprocess.run([get_ptxas(TARGET.arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2", *fmad,
                                 f"--gpu-name={sm_arch_from_capability(TARGET.arch)}", source,
                                 "-o", os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
    return result.stdout + result.stderr


def _run_tool(name: str, args, cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([_tool(name), *args, path], capture_output=True, text=True, check=True).stdout


_INSTRUCTION = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([^;]*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
GLOBAL_LOADS = ("UTMALDG", "LDGSTS", "LDG")
# integer and address arithmetic, vector and uniform datapaths (the loop's overhead besides MMA and loads)
_INTEGER = re.compile(r"^(U?I[A-Z]|U?LEA|U?LOP|U?SHF|U?SEL|VI)")


def read_sass(sass: str):
    """The instructions of ``nvdisasm -c`` output as (address, opcode, text), predicates dropped, and the
    address of each label."""
    instructions, labels, pending = [], {}, []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        found = _INSTRUCTION.search(line)
        if found:
            address, text = int(found.group(1), 16), found.group(2)
            labels.update({name: address for name in pending})
            pending = []
            instructions.append((address, text.split()[0].split(".")[0], text))
    return instructions, labels


def main_loop(instructions, labels):
    """The K-loop: of the innermost loops (backward branches' spans holding no other such loop) that hold
    MMA instructions, those fed by asynchronous copies (UTMALDG, LDGSTS: the software-pipelined loop)
    if any, and of them the one with the most MMA; None if no loop holds one. Returns its
    instructions. (The fewest instructions would pick the drain loop Triton emits after a flattened
    tile loop, which holds the rank-r dot and the stores of the last tiles; the most MMA alone, the
    unpipelined rank-step loop of a given t at rank blocks of 128 and more.)"""
    spans = []
    for address, opcode, text in instructions:
        target = _BRANCH_TARGET.search(text)
        if opcode == "BRA" and target and labels.get(target.group(1), address + 1) < address:
            spans.append((labels[target.group(1)], address))
    bodies = {span: [i for i in instructions if span[0] <= i[0] <= span[1]] for span in spans}
    with_mma = [span for span in spans if any(op in MMA for _, op, _ in bodies[span])]
    innermost = [span for span in with_mma
                 if not any(other != span and span[0] <= other[0] and other[1] <= span[1] for other in with_mma)]
    if not innermost:
        return None

    def asynchronous_then_most_mma_then_fewest_instructions(span):
        ops = [op for _, op, _ in bodies[span]]
        return ("UTMALDG" in ops or "LDGSTS" in ops), sum(op in MMA for op in ops), -len(ops)
    return bodies[max(innermost, key=asynchronous_then_most_mma_then_fewest_instructions)]


def _deepest_wait(ptx: str, instruction: str):
    """The largest N of ``instruction`` N (a wait_group) in ``ptx``, None if it has none: a software
    pipeline's loop waits with groups still in flight (N > 0), an unpipelined one at 0."""
    depths = [int(n) for n in re.findall(rf"{re.escape(instruction)}\s+(\d+)", ptx)]
    return max(depths) if depths else None


def read_compiled(compiled, log: str, warnings=()) -> dict:
    """What the cubin says about speed: whether the compiler gave up and emitted a ``trap`` instead
    (the kernel would abort on the GPU), registers, stack and local memory, spill instructions, and the
    main loop's MMA kind and shapes, loads and instruction count per K-step (one iteration: Triton does
    not unroll it); the UTMALDG issued before the main loop (a pipeline's prologue); from the PTX the
    deepest wgmma and cp.async wait_group; ptxas's advisories from its ``log`` and the compiler's
    ``warnings``."""
    usage = _run_tool("cuobjdump", ["-res-usage"], compiled.asm["cubin"])
    registers, stack, local = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK", "LOCAL"))
    instructions, labels = read_sass(_run_tool("nvdisasm", ["-c"], compiled.asm["cubin"]))
    opcodes = [op for _, op, _ in instructions]
    report = dict(registers=registers, stack=stack, local=local, spill_ld=opcodes.count("LDL"),
                  spill_st=opcodes.count("STL"), utmaldg="UTMALDG" in opcodes,
                  serialized=bool(re.search(r"wgmma\.mma_async instructions are serialized", log)),
                  advisories=sorted(set(re.findall(r"\((C\d{4})\)", log))), warnings=list(warnings),
                  trap=bool(re.search(r"^\s*trap;", compiled.asm["ptx"], re.MULTILINE)),
                  wgmma_wait=_deepest_wait(compiled.asm["ptx"], "wgmma.wait_group.sync.aligned"),
                  cp_async_wait=_deepest_wait(compiled.asm["ptx"], "cp.async.wait_group"),
                  prologue_utmaldg=0, main_loop=None)
    loop = main_loop(instructions, labels)
    if loop is not None:
        ops = [op for _, op, _ in loop]
        report["prologue_utmaldg"] = sum(op == "UTMALDG" and address < loop[0][0] for address, op, _ in instructions)
        # e.g. 64x256x16, 16816 (tcgen05's UTCHMMA has no suffix: its shape is in the descriptors)
        shapes = [(text.split()[0].split(".") + [op])[1] for _, op, text in loop if op in MMA]
        report["main_loop"] = dict(
            instructions=len(ops), integer=sum(bool(_INTEGER.match(op)) for op in ops),
            mma=next((kind for kind in MMA if kind in ops), None), mma_count=sum(op in MMA for op in ops),
            mma_shapes={shape: shapes.count(shape) for shape in sorted(set(shapes))},
            loads={kind: ops.count(kind) for kind in GLOBAL_LOADS if kind in ops},
            waits=sum(text.startswith("WARPGROUP.DEPBAR") for _, _, text in loop),
            stores=ops.count("UTMASTG"),  # descriptor stores in the loop: the tile loop is flattened
            spills=ops.count("LDL") + ops.count("STL"))
    return report



_AMD_LABEL = re.compile(r"^(?:\.L(BB\d+_\d+):|; %(bb)\.\d+:)(.*)$")
_AMD_HEADER = re.compile(r"Loop Header: Depth=(\d+)")
_AMD_IN_LOOP = re.compile(r"in Loop: Header=(BB\d+_\d+)")
_AMD_GLOBAL_LOAD = re.compile(r"^(global_load|buffer_load)")
_AMD_VMCNT = re.compile(r"vmcnt\((\d+)\)")
_AMD_INTEGER = re.compile(r"^(s_(add|sub|mul|lshl|lshr|ashr|and|or|xor|cselect|cmp|min|max|bfe|mov)|"
                          r"v_(add|sub|mad|mul_lo|lshl|lshr|ashr|and|or|xor|bfe|bfi|cndmask|perm|cmp)\w*_(u|i|b)(32|64))")


def read_amdgcn_loops(asm: str):
    """The instructions of AMDGCN assembly as (line, opcode, text), and the loops LLVM's comments name:
    header -> the lines of the blocks whose innermost loop it heads ("Loop Header", "in Loop:
    Header=..."), in execution order (from the header, wrapping round to blocks placed before it), and
    header -> its loop's depth."""
    instructions, loops, current, block, depth = [], {}, None, None, {}
    for number, line in enumerate(asm.splitlines()):
        label = _AMD_LABEL.match(line)
        text = line.split(";")[0].strip()
        if label or (not text and ";" in line and block is not None):
            # a block's label, or a comment line continuing its label's comment (LLVM writes
            # "Parent Loop ... / =>  This Inner Loop Header" on lines of their own)
            comment = label.group(3) if label else line
            if label:
                block, current = label.group(1), None
            inside = _AMD_IN_LOOP.search(comment)
            if block and _AMD_HEADER.search(comment):
                current = block
                depth[block] = int(_AMD_HEADER.search(comment).group(1))
            elif inside:
                current = inside.group(1)
            continue
        if text:
            block = None  # comments after the block's first instruction say nothing of loops
        if not text or text.startswith("."):
            continue
        if text.endswith(":"):
            current = None  # the function's own label
            continue
        instructions.append((number, text.split()[0], text))
        if current is not None:
            loops.setdefault(current, []).append(instructions[-1])
    header_line = {}
    for number, line in enumerate(asm.splitlines()):
        label = _AMD_LABEL.match(line)
        if label and label.group(1) in loops:
            header_line[label.group(1)] = number
    ordered = {h: [i for i in body if i[0] >= header_line.get(h, 0)] + [i for i in body if i[0] < header_line.get(h, 0)]
               for h, body in loops.items()}
    return instructions, ordered, depth


def _mma_under_loads(body) -> int:
    """MFMA instructions of one pass over ``body`` issued while a global load of the same pass is
    still outstanding (before the ``s_waitcnt vmcnt`` that retires it): the loop overlaps the next
    K-step's loads with this one's MMA, as a software pipeline does."""
    outstanding, overlapped = 0, 0
    for _, op, text in body:
        if _AMD_GLOBAL_LOAD.match(op):
            outstanding += 1
        elif op == "s_waitcnt" and _AMD_VMCNT.search(text):
            outstanding = min(outstanding, int(_AMD_VMCNT.search(text).group(1)))
        elif op.startswith("v_mfma") and outstanding:
            overlapped += 1
    return overlapped


def read_amdgcn(compiled, log: str = "", warnings=()) -> dict:
    """``read_compiled`` for an AMD target, from the AMDGCN assembly (the hsaco is built from it): VGPRs
    (with AGPRs), scratch (ScratchSize, the spill counts of the kernel's metadata, scratch_* instructions),
    and the main loop (of LLVM's loops with v_mfma, the deepest, then the one with the most): its MFMA opcodes, global and
    buffer loads, instructions per K-step, the MFMA issued with its loads in flight, and the global
    loads issued before it (the pipeline's prologue)."""
    asm = compiled.asm["amdgcn"]

    def meta(key, default=0):
        found = re.search(rf"{key}\s*(\d+)", asm)
        return int(found.group(1)) if found else default
    instructions, loops, depth = read_amdgcn_loops(asm)
    opcodes = [op for _, op, _ in instructions]
    report = dict(registers=meta(r"; TotalNumVgprs:"), agprs=meta(r"; NumAgprs:"), sgprs=meta(r"\.sgpr_count:"),
                  stack=meta(r"; ScratchSize:"), local=meta(r"\.private_segment_fixed_size:"),
                  spill_ld=sum(op.startswith("scratch_load") for op in opcodes),
                  spill_st=sum(op.startswith("scratch_store") for op in opcodes),
                  vgpr_spill=meta(r"\.vgpr_spill_count:"), sgpr_spill=meta(r"\.sgpr_spill_count:"),
                  utmaldg=False, serialized=False, advisories=[], warnings=list(warnings), wgmma_wait=None,
                  cp_async_wait=None, prologue_utmaldg=0, prologue_loads=0, mma_under_loads=0, main_loop=None,
                  hsaco=len(compiled.asm.get("hsaco") or b""))
    with_mma = {h: body for h, body in loops.items() if any(op.startswith("v_mfma") for _, op, _ in body)}
    if with_mma:
        # the deepest (a K-loop inside a tile or rank loop), then the one with the most MFMA
        body = with_mma[max(with_mma, key=lambda h: (depth.get(h, 0), sum(op.startswith("v_mfma") for _, op, _ in
                                                                           with_mma[h]), -len(with_mma[h])))]
        ops = [op for _, op, _ in body]
        first = min(number for number, _, _ in body)
        report["prologue_loads"] = sum(bool(_AMD_GLOBAL_LOAD.match(op)) for number, op, _ in instructions
                                       if number < first)
        report["mma_under_loads"] = _mma_under_loads(body)
        shapes = [op.removeprefix("v_mfma_") for op in ops if op.startswith("v_mfma")]
        report["main_loop"] = dict(
            instructions=len(ops), integer=sum(bool(_AMD_INTEGER.match(op)) for op in ops), mma="v_mfma",
            mma_count=len(shapes), mma_shapes={shape: shapes.count(shape) for shape in sorted(set(shapes))},
            loads={kind: n for kind in ("global_load", "buffer_load") if (n := sum(op.startswith(kind) for op in ops))},
            waits=ops.count("s_waitcnt"), stores=0, spills=sum(op.startswith("scratch_") for op in ops))
    return report


_MFMA_SHAPE = re.compile(r"(\d+)x(\d+)x(\d+)")


def _per_k_step(loop, c, waves):
    """Divide an AMD main loop's counts by the K-steps one pass holds: LLVM unrolls some K-loops (tutorial
    03's by two on gfx942), and the gate compares one K-step with one K-step. The K-steps per pass are
    its MFMA over the MFMA one BLOCK_K step of the tile needs per wave (the tile's products over one
    instruction's, e.g. 32x32x8); recorded as ``k_steps``."""
    (shape, count), = loop["mma_shapes"].items() if len(loop["mma_shapes"]) == 1 else ((None, 0),)
    dims = _MFMA_SHAPE.search(shape or "")
    if dims is None:
        return
    m, n, k = map(int, dims.groups())
    per_k_step = c["BLOCK_M"] * c.get("BLOCK_N", c.get("BLOCK_R", 0)) * c["BLOCK_K"] // (m * n * k * waves)
    if not per_k_step or count % per_k_step or count == per_k_step:
        return
    steps = count // per_k_step
    loop["k_steps"] = steps
    loop["mma_shapes"] = {shape: per_k_step}
    loop["mma_count"] = per_k_step
    loop["loads"] = {kind: n // steps for kind, n in loop["loads"].items()}
    for key in ("instructions", "integer", "waits"):
        loop[key] //= steps


def main_loop_rows(v):
    """Rows of the main loop's MMA tile (None: the kernel has no K-loop)."""
    key = MAIN_LOOP_ROWS.get(v["kernel"], "BLOCK_M")
    return None if key is None else {**v["constexprs"], **v["config"]}.get(key)


_yardsticks = {}
use_target(os.environ.get("PEFT_OPS_GATE_TARGET", "sm_90"))


def compile_variant(v) -> dict:
    """What ``read_compiled`` reads from ``v``, and under "yardstick" the same of its yardstick
    (``yardstick(v)``; compiled once per process)."""
    kernel = KERNELS[v["kernel"]]
    source = ASTSource(kernel, v["signature"], constexprs={**v.get("defaults", {}), **v["constexprs"], **v["config"]},
                       attrs={(int(k),): a for k, a in v["attrs"].items()})
    try:
        compiled, log, warnings = _compile_with_log(source, dict(num_warps=v["warps"], num_stages=v["stages"],
                                                                 **LAUNCH_OPTIONS))
    except Exception as e:  # report every failure, not just the first
        return {"error": f"{type(e).__name__}: {e}"[:3000]}
    read = read_compiled if TARGET.backend == "cuda" else read_amdgcn
    rows = main_loop_rows(v)
    report = {"target": TARGET_NAME, "shared": compiled.metadata.shared, "shared_limit": SHARED_MEMORY_LIMIT,
              "estimate": v["estimate"], "tma": bool(v.get("tma")),
              "flattened": bool(v.get("flattened")), "stages": v["stages"], "extra_mma": bool(v.get("extra_mma")),
              "masked": v.get("masked", 0),
              "decodes": v.get("decodes", 0),
              "rows": rows, "expected_mma": None if rows is None else MMA[0 if rows >= TARGETS[TARGET_NAME]["big_rows"]
                                                                          else -1],
              **read(compiled, log, warnings), "yardstick": None}
    if TARGET.backend != "cuda" and report["main_loop"] and not v.get("extra_mma"):
        _per_k_step(report["main_loop"], {**v["constexprs"], **v["config"]}, v["warps"])
    ruler = yardstick(v)
    if ruler is not None:
        if label(ruler) not in _yardsticks:
            _yardsticks[label(ruler)] = {"label": label(ruler), **compile_variant(ruler)}
        report["yardstick"] = _yardsticks[label(ruler)]
    return report


def label(v) -> str:
    """Names a variant uniquely: kernel, dtype, config, constexprs, the integers widened to int64, TMA."""
    wide = [name for name, kind in v["signature"].items() if kind == "i64"]
    return (f"{v['kernel']} {v['dtype']} {v['config']} w{v['warps']}s{v['stages']} {v['constexprs']}"
            + (f" i64 {wide}" if wide else "") + (" tma" if v.get("tma") else ""))


def _variants(which: str):
    """The variants of ``which``: "paths", "configs", "tutorials" or "bank", each once (two branches of the
    enumeration may reach the same variant, as input dropout without an in-loop shrink compiles as none)."""
    every = {"tutorials": tutorial_variants, "bank": bank_variants, "targets": target_variants,
             "counterexample": counterexample_variants,
             "pointer_counterexample": pointer_counterexample_variants,
             "tensor_memory_counterexample": tensor_memory_counterexample_variants,
             "mask_counterexample": mask_counterexample_variants, "quantized": quantized_variants,
             "quantized_counterexample": quantized_counterexample_variants}.get(which, lambda: variants(which))()
    return list({label(v): v for v in every}.values())


def table_row(v, r) -> str:
    """A markdown row: the variant in short, then what its compiled code says."""
    c = {**v["constexprs"], **v["config"]}
    kernel = v["kernel"].strip("_").removesuffix("_kernel")
    tile = "×".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_P") if k in c)
    drop = c.get("OUTPUT_DROPOUT") or c.get("DROPOUT_INPUT") or c.get("DROPOUT")
    output_drop = c.get("OUTPUT_DROPOUT") or (bool(drop) and kernel == "add_lowrank")
    flags = {"no adapter": c.get("HAS_LOW_RANK") is False, "no bias": c.get("HAS_BIAS") is False,
             "in-loop shrink": c.get("SHRINK_IN_LOOP"),
             "out dropout": output_drop, "in dropout": bool(drop) and not output_drop,
             f"r≤{c.get('BLOCK_R')}": "BLOCK_R" in c, f"t in {c.get('T_SPLITS')} parts": c.get("T_SPLITS", 1) > 1,
             f"{c.get('SPLITS')} K-splits": c.get("SPLITS", 1) > 1, f"W {c.get('W_FORMAT')}": "W_FORMAT" in c,
             "unit strides": any(k.startswith("stride_") for k in c),
             "i64 sizes": "i64" in v["signature"].values(), "tma": v.get("tma")}
    flags = [flag for flag, shown in flags.items() if shown]
    name = " ".join(part for part in [kernel, TYPE[v["dtype"]], tile, f"w{v['warps']}s{v['stages']}", *flags] if part)
    if "error" in r:
        return f"| {name} | compile error | | | | | | |"
    loop = r["main_loop"] or {}
    loads = " ".join(f"{k}×{n}" for k, n in loop.get("loads", {}).items()) or "–"
    per_step = f"{loop['instructions']} ({loop['integer']} int)" if loop else "no K-loop"
    mma = f"{loop['mma']}×{loop['mma_count']}" if loop.get("mma") else "–"
    local = f"{r['stack']} B, {r['spill_ld']}/{r['spill_st']}" if r["stack"] or r["spill_ld"] or r["spill_st"] else "0"
    return (f"| {name} | {r['registers']} | {r['shared'] // 1024} | {local} | {per_step} | {mma} | {loads} | "
            f"{' '.join(r['advisories']) or '–'} |")


def table(which: str = "paths") -> None:
    """The markdown table of bench/NOTES.md: our variants of ``which``, then the tutorial GEMMs."""
    print("| variant | registers | shared KiB | stack, LDL/STL | instructions per K-step (integer) "
          "| main-loop MMA | main-loop loads | ptxas advisories |")
    print("|---|---|---|---|---|---|---|---|")
    for v in _variants(which) + tutorial_variants():
        print(table_row(v, compile_variant(v)), flush=True)


def main(which: str, group: int, groups: int) -> None:
    every = _variants(which)
    labels = [label(v) for v in every]
    assert len(set(labels)) == len(labels), "two variants share a label (the gate's known failures are keyed by it)"
    for index, v in enumerate(every):
        if index % groups == group:
            print(json.dumps({"label": label(v), **compile_variant(v)}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "table":
        table(*sys.argv[2:])
    else:
        main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
