"""Compile the adapter-bank kernels (kernels/bank.py) for a Hopper GPU (sm_90) on a machine without
one, with tests/sm90_compile.py's helpers: every kernel in float32, bfloat16 and float16 at the
smallest and largest rank block, with the launchers' fixed tiles and Triton's default warps and
stages. Run by tests/test_bank.py in a subprocess without TRITON_INTERPRET; prints a JSON line per
variant."""
import json
import os

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402

import sm90_compile  # noqa: E402
from peft_ops.kernels import bank  # noqa: E402

DEFAULT_LAUNCH = triton.Config({}, num_warps=4, num_stages=3)  # the launchers pass no config
INDEX = {"rows_ptr": "*i64", "order_ptr": "*i64", "starts_ptr": "*i64", "adapters_ptr": "*i64"}


def variants():
    tiles = dict(BLOCK_M=bank._BLOCK_M)
    for dtype, short in sm90_compile.TYPE.items():
        for block_r in (16, 256):
            yield sm90_compile._variant(bank._bank_core_kernel, DEFAULT_LAUNCH, "float32", INDEX,
                                        dict(tiles, BLOCK_R=block_r))
            yield sm90_compile._variant(bank._sgmv_shrink_kernel, DEFAULT_LAUNCH, dtype,
                                        dict(INDEX, downs_ptr="*" + short, t_ptr="*fp32"),
                                        dict(tiles, UPCAST=False, PRECISION=sm90_compile.PRECISION[dtype],
                                             BLOCK_K=bank._BLOCK_K, BLOCK_R=block_r))
            yield sm90_compile._variant(bank._sgmv_expand_kernel, DEFAULT_LAUNCH, dtype,
                                        dict(INDEX, t_ptr="*fp32", expands_ptr="*fp32"),
                                        dict(tiles, PRECISION=sm90_compile.PRECISION["float32"],
                                             BLOCK_N=bank._BLOCK_N, BLOCK_R=block_r))


if __name__ == "__main__":
    sm90_compile.KERNELS.update({k.__name__: k for k in (bank._bank_core_kernel, bank._sgmv_shrink_kernel,
                                                         bank._sgmv_expand_kernel)})
    for v in variants():
        label = f"{v['kernel']} {v['dtype']} BLOCK_R={v['constexprs']['BLOCK_R']}"
        print(json.dumps({"label": label, **sm90_compile.compile_variant(v)}), flush=True)
