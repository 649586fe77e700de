"""Triton kernels and their launchers (installed as ``peft_ops.kernels``).

* :func:`lowrank_linear`: the fused GEMM ``a Wᵀ + bias + scale·drop((drop(a) D) Eᵀ)``, forward and dx,
  on one of :data:`GEMM_PATHS` ("tma": Hopper's tensor descriptors, persistent; "pointer": any GPU); W
  dense, or quantized (:class:`dequant.QuantizedWeight`: NF4/FP4/int8 tiles decoded in the K-loop, pointer path);
* :func:`linear`: the same GEMM without the adapter (to measure the GEMM alone);
* :func:`shrink`: ``drop(a) D``, the rank-r projection on its own;
* :func:`rank_reduce`: ``drop(A)ᵀ B`` over M, deterministic, for the adapter gradients;
* :func:`dropout_mask`: the exact keep-mask the kernels use for a seed.
"""
from ._config import INTERPRET
from .bank import bank_core, sgmv_expand_add, sgmv_shrink
from .dropout import dropout_mask
from .fused_linear import GEMM_PATHS, MAX_RANK, linear, lowrank_linear, shrink
from .lowrank_add import add_lowrank_
from .reductions import rank_reduce

__all__ = ["INTERPRET", "MAX_RANK", "GEMM_PATHS", "lowrank_linear", "linear", "shrink", "rank_reduce", "dropout_mask",
           "add_lowrank_", "bank_core", "sgmv_shrink", "sgmv_expand_add"]
