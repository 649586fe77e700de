"""What the kernels need to know about where they run."""
from __future__ import annotations

import os

import torch
import triton
from torch.library import wrap_triton  # launches that torch.compile can trace inside a triton_op

__all__ = ["INTERPRET", "AUTOTUNE", "LAUNCH_OPTIONS", "MAX_RANK", "autotuned", "check_rank", "dot_precision", "rank_block", "multiprocessors", "seed_arg",
           "with_unit_stride", "wrap_triton"]

# Triton decides interpreter or compiler when a kernel is decorated, so this is fixed at import.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")

# Compile options every launch passes, so that what the kernels are compiled to does not hang on
# Triton's defaults. enable_fp_fusion: Triton 3.9 contracts a float multiply and add into one FMA
# unless told otherwise, and warns that 3.10 will not (TRITON_DEFAULT_FP_FUSION); the kernels keep
# 3.9's behaviour, the one every measurement and compiled-code gate result was taken with. The
# contractions are in float32 arithmetic beside the MMA (the epilogue's scale and bias, dropout's
# rescaling, split sums, address-free float math): an FMA rounds once where mul + add rounds twice,
# so results are at least as accurate, and the tolerances of the GPU tests were set with it. The
# dropout masks are integer arithmetic (Philox, an integer threshold): no option changes them. The
# interpreter ignores the option (it runs numpy), so the CPU suite's bit-for-bit comparisons are
# untouched. The compiled-code gate (tests/sm90_compile.py) compiles with the same options.
LAUNCH_OPTIONS = dict(enable_fp_fusion=True)

# PEFT_OPS_AUTOTUNE=0 makes the launchers use one heuristic config per kernel on a GPU too (the test
# suite does this: it checks every config explicitly instead of autotuning each new shape).
AUTOTUNE = not INTERPRET and os.environ.get("PEFT_OPS_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def autotuned(kernel, configs, key, prune):
    """``kernel`` autotuned over the ``configs`` that ``prune(configs, named_args, **meta)`` keeps, or
    None where the launchers pass one config instead: under the interpreter (autotuning has no driver
    to time with) or with autotuning switched off."""
    if not AUTOTUNE:
        return None
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)


def dot_precision(dtype: torch.dtype) -> str:
    """For float32 operands: three tf32 products (about float32's accuracy, still on tensor cores) under
    torch's default "highest" matmul precision, one tf32 product when it allows less. Irrelevant for
    16-bit operands."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "tf32x3"
    return "tf32"


MAX_RANK = 256  # the largest rank the kernels take


def check_rank(rank: int) -> None:
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"rank={rank}: the fused kernels take ranks from 1 to {MAX_RANK}; "
                         f"use backend='reference' for larger ranks")


def rank_block(rank: int) -> int:
    """The rank padded for ``tl.dot`` (every dimension ≥ 16) and ``tl.arange`` (a power of two)."""
    return max(16, triton.next_power_of_2(rank))


def multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def seed_arg(seed, dropout_p: float, unused: torch.Tensor) -> torch.Tensor:
    """The dropout seed as the 0-d int64 device tensor the kernels read (no host sync, traceable by
    torch.compile); without dropout the kernels never read it and ``unused`` stands in."""
    if not dropout_p:
        return unused
    if seed is None:
        raise ValueError(f"dropout_p={dropout_p} needs a seed (an int or a 0-d int64 tensor)")
    return torch.as_tensor(seed, dtype=torch.int64).to(unused.device)


def with_unit_stride(x: torch.Tensor) -> torch.Tensor:
    """``x`` (2-D) if one of its strides is 1, else a contiguous copy. Triton specialises a stride of 1
    to a constant, and only then knows a tile's order: a load of two runtime strides is neither
    vectorised nor asynchronous (its K-loop's stages wait in registers) and the compiler warns that
    it disables the load's pipelining (compiled for sm_90). The kernels are compiled, and gated
    (tests/sm90_compile.py), for operands with a unit stride; a tensor without one (a strided slice)
    is rare enough that one copy is the cheaper answer."""
    return x if 1 in x.stride() else x.contiguous()
