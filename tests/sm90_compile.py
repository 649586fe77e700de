"""Compile kernel variants ahead of time for a Hopper GPU (sm_90) on a machine without one.

Triton's own compiler (frontend, MLIR passes, LLVM, ptxas) runs on the CPU given an explicit target,
so what the interpreter forgives — non-constexpr globals, dot shapes, type mismatches, shared memory
beyond the chip's 227 KiB per block — fails here as it would on the GPU. It cannot catch what only
running shows (wrong results, illegal accesses, register spills); the GPU session does that.

Run by tests/test_sm90_compile.py in a subprocess without TRITON_INTERPRET:
``python tests/sm90_compile.py paths|configs GROUP GROUPS`` prints a JSON line per variant of the group.
"""
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from peft_ops.kernels import dropout, fused_linear, reductions  # noqa: E402
from peft_ops.kernels._config import dot_precision  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SHARED_MEMORY_LIMIT = 227 * 1024  # bytes a Hopper block may use
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
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs or name in config.kwargs:
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
                dtype=dtype, constexprs=constexprs, signature=sig, attrs={str(k[0]): v for k, v in attrs.items()},
                estimate=estimate)


def variants(which: str):
    """``which``: "paths" (every code path in float32 and bfloat16 and two in float16, with the configs
    the launchers pick without autotuning) or "configs" (every autotune config that survives pruning).
    Variants of the descriptor path carry ``"tma": True``."""
    fl = fused_linear
    gemm, shrink, reduce = fl._lowrank_linear_kernel, fl._shrink_kernel, reductions._rank_reduce_kernel
    fp32 = {"expand_ptr": "*fp32", "t_ptr": "*fp32", "seed_ptr": "*i64"}  # D is cast to a's dtype
    base = dict(HAS_BIAS=True, HAS_LOW_RANK=True, SHRINK_IN_LOOP=False, DROPOUT=0, STORE_T=True, TMA=False,
                W_TRANSPOSED=False, PARTIAL=False, UPCAST=False, PRECISION="tf32", BLOCK_R=16)

    def gemm_variant(config, dtype, layout=None, path="pointer", **flags):
        """``layout``: None (general strides), "forward" (contiguous x, W and t; D = Aᵀ of an r×K A) or
        "backward" (contiguous g; W transposed). ``path``: "pointer" or "tma" (which needs a layout)."""
        c = dict(base, TMA=path == "tma", W_TRANSPOSED=path == "tma" and layout == "backward", **flags)
        if c["PARTIAL"]:  # split-K partial sums: the output is float32
            c["STORE_T"] = False
        kind = fl._gemm_kind(c["HAS_LOW_RANK"], c["SHRINK_IN_LOOP"])
        size = 4 if dtype == "float32" else 2
        unit, aligned = {None: ((), ()),
                         "forward": (("stride_ak", "stride_wk", "stride_dk", "stride_er", "stride_on", "stride_b"),
                                     ("K", "N", "stride_am", "stride_wn", "stride_dr", "stride_om")),
                         "backward": (("stride_ak", "stride_wn", "stride_dr", "stride_er", "stride_on"),
                                      ("K", "N", "stride_am", "stride_wk", "stride_dk", "stride_om"))}[layout]
        pointers = {**fp32, "out_ptr": "*fp32"} if c["PARTIAL"] else fp32
        v = _variant(gemm, config, dtype, pointers, c, unit=unit, aligned=aligned,
                     estimate=fl.shared_memory_bytes(config, kind, c["BLOCK_R"], size, c["PRECISION"], path))
        if path == "tma":
            v["tma"] = True
        return v

    def shrink_variant(config, dtype, block_r, drop):
        size = 4 if dtype == "float32" else 2
        return _variant(shrink, config, dtype, fp32, dict(DROPOUT_INPUT=drop, UPCAST=False, PRECISION=PRECISION[dtype],
                                                          BLOCK_R=block_r),
                        estimate=fl.shared_memory_bytes(config, "shrink", block_r, size, PRECISION[dtype]))

    loop_r = fl._LOOP_SHRINK_MIN_BLOCK_R  # the in-loop shrink's smallest BLOCK_R
    out = []
    if which == "configs":
        for path, configs in (("pointer", fl.GEMM_CONFIGS), ("tma", fl.TMA_GEMM_CONFIGS)):
            for config in fl.fitting_configs(configs, "gemm_in_loop", 64, 2, "tf32", path):
                out.append(gemm_variant(config, "bfloat16", "forward", path, SHRINK_IN_LOOP=True, DROPOUT=1,
                                        BLOCK_R=64))
            for config in fl.fitting_configs(configs, "gemm", 256, 2, "tf32", path, output_dropout=True):
                out.append(gemm_variant(config, "bfloat16", "forward", path, DROPOUT=2, BLOCK_R=256))
            for config in fl.fitting_configs(configs, "gemm", 16, 2, "tf32", path, output_dropout=True):
                out.append(gemm_variant(config, "bfloat16", "backward", path, DROPOUT=2, BLOCK_R=16))
            for config in fl.fitting_configs(configs, "gemm", 256, 4, PRECISION["float32"], path):  # costliest epilogue
                out.append(gemm_variant(config, "float32", "forward", path, BLOCK_R=256,
                                        PRECISION=PRECISION["float32"]))
            for config in fl.fitting_configs(configs, "gemm", 16, 2, "tf32", path):
                out.append(gemm_variant(config, "bfloat16", "backward", path, DROPOUT=1, BLOCK_R=16))
            for config in fl.fitting_configs(fl.DECODE_GEMM_CONFIGS, "gemm_in_loop", 64, 2, "tf32", path):
                out.append(gemm_variant(config, "bfloat16", "forward", path, SHRINK_IN_LOOP=True, BLOCK_R=64,
                                        PARTIAL=True))
        for config in fl.fitting_configs(fl.SHRINK_CONFIGS, "shrink", 256, 2, "tf32"):
            out.append(shrink_variant(config, "bfloat16", 256, True))
        return out
    for dtype in TYPE:
        size, precision = 4 if dtype == "float32" else 2, PRECISION[dtype]
        for in_loop in (False, True):
            for drop in (0, 1, 2):
                if dtype == "float16" and drop != (2 if in_loop else 1):
                    continue  # fp16 compiles as bf16 does: two of its paths suffice
                preferred = fl._PREFERRED_DECODE_GEMM if in_loop else fl._PREFERRED_GEMM
                kind = fl._gemm_kind(True, in_loop)
                block_r = loop_r if in_loop else 16
                pointer = fl.default_config(preferred, kind, block_r, size, precision, "pointer", drop == 2)
                out.append(gemm_variant(pointer, dtype, SHRINK_IN_LOOP=in_loop, DROPOUT=drop, HAS_BIAS=drop != 1,
                                        PRECISION=precision, BLOCK_R=block_r))
                # the descriptor path: large M (the in-loop shrink up to M = 64) and decoding (split K)
                tma = fl.default_config(fl._PREFERRED_TMA_GEMM, kind, block_r, size, precision, "tma", drop == 2)
                out.append(gemm_variant(tma, dtype, "forward", "tma", SHRINK_IN_LOOP=in_loop, DROPOUT=drop,
                                        HAS_BIAS=drop != 1, PRECISION=precision, BLOCK_R=block_r))
                if dtype != "float16":
                    decode = fl.default_config(fl._PREFERRED_DECODE_GEMM, kind, block_r, size, precision, "tma",
                                               drop == 2)
                    out.append(gemm_variant(decode, dtype, "forward", "tma", SHRINK_IN_LOOP=in_loop, DROPOUT=drop,
                                            PARTIAL=True, PRECISION=precision, BLOCK_R=block_r))
        for layout in ("forward", "backward"):  # specialised as real launches are (unit strides, aligned sizes)
            for path, preferred in (("pointer", fl._PREFERRED_GEMM), ("tma", fl._PREFERRED_TMA_GEMM)):
                drop = 1 if layout == "forward" else 2
                config = fl.default_config(preferred, "gemm", 16, size, precision, path, drop == 2)
                out.append(gemm_variant(config, dtype, layout, path, DROPOUT=drop, PRECISION=precision))
        if dtype == "float16":
            continue
        for path, preferred in (("pointer", fl._PREFERRED_GEMM), ("tma", fl._PREFERRED_TMA_GEMM)):
            out.append(gemm_variant(fl.default_config(preferred, "plain", 16, size, precision, path), dtype,
                                    "forward" if path == "tma" else None, path, HAS_LOW_RANK=False, STORE_T=False,
                                    PRECISION=precision))
        for drop in (False, True):
            out.append(shrink_variant(fl.default_config(fl._PREFERRED_SHRINK, "shrink", 64, size, precision), dtype, 64,
                                      drop))
            out.append(_variant(reduce, triton.Config({}), dtype, {"b_ptr": "*fp32", "partial_ptr": "*fp32",
                                                                   "seed_ptr": "*i64"},
                                dict(DROPOUT=drop, UPCAST=False, PRECISION=PRECISION["float32"], BLOCK_M=64,
                                     BLOCK_P=64, BLOCK_R=64)))  # b is float32 whatever a is
        out.append(_variant(fl._sum_splits_kernel, triton.Config({}), dtype, {"partial_ptr": "*fp32"},
                            dict(BLOCK=1024)))
    # int64 sizes, as for tensors past 2³¹ elements
    out.append(gemm_variant(fl.default_config(fl._PREFERRED_GEMM, "gemm", 16, 2, "tf32", "pointer", True), "bfloat16",
                            DROPOUT=2))
    out[-1]["signature"].update({n: "i64" for n in ("M", "stride_am", "stride_tm", "stride_om")})
    # the largest rank without autotuning, in each dtype (float32's tf32x3 epilogue is the largest)
    for dtype, size in (("bfloat16", 2), ("float32", 4)):
        for block_r in (128, 256):
            for path, preferred in (("pointer", fl._PREFERRED_GEMM), ("tma", fl._PREFERRED_TMA_GEMM)):
                out.append(gemm_variant(fl.default_config(preferred, "gemm", block_r, size, PRECISION[dtype], path),
                                        dtype, "forward" if path == "tma" else None, path, BLOCK_R=block_r,
                                        PRECISION=PRECISION[dtype]))
        out.append(gemm_variant(fl.default_config(fl._PREFERRED_DECODE_GEMM, "gemm", 256, size, PRECISION[dtype]),
                                dtype, BLOCK_R=256, PRECISION=PRECISION[dtype]))
    out.append(shrink_variant(fl.default_config(fl._PREFERRED_SHRINK, "shrink", 256, 4, PRECISION["float32"]),
                              "float32", 256, False))
    # dropout masks
    out.append(_variant(dropout._dropout_mask_kernel, triton.Config({}), "float32",
                        {"out_ptr": "*i8", "seed_ptr": "*i64"}, dict(BLOCK_ROWS=32, BLOCK_COLS=64)))
    return out


KERNELS = {k.__name__: k for k in (fused_linear._lowrank_linear_kernel, fused_linear._shrink_kernel,
                                   fused_linear._sum_splits_kernel, reductions._rank_reduce_kernel,
                                   dropout._dropout_mask_kernel)}


def compile_variant(v) -> dict:
    kernel = KERNELS[v["kernel"]]
    source = ASTSource(kernel, v["signature"], constexprs={**v["constexprs"], **v["config"]},
                       attrs={(int(k),): a for k, a in v["attrs"].items()})
    try:
        compiled = triton.compile(source, target=TARGET, options=dict(num_warps=v["warps"], num_stages=v["stages"]))
    except Exception as e:  # report every failure, not just the first
        return {"error": f"{type(e).__name__}: {e}"[:3000]}
    return {"shared": compiled.metadata.shared, "estimate": v["estimate"]}


def main(which: str, group: int, groups: int) -> None:
    for index, v in enumerate(variants(which)):
        if index % groups == group:
            label = f"{v['kernel']} {v['dtype']} {v['config']} w{v['warps']}s{v['stages']} {v['constexprs']}"
            print(json.dumps({"label": label, **compile_variant(v)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
