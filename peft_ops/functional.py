"""One entry point for the low-rank linear, dispatched by backend.

``"triton"`` runs the fused Triton kernels (CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1``
was set before the kernels were imported); ``"reference"`` runs the same algorithm in plain PyTorch
(any device and dtype); ``"auto"`` picks triton for CUDA tensors and the reference elsewhere. A backend
that can't run where it is asked raises; it never falls back silently. (The independent oracle that
both are tested against is :func:`peft_ops.reference.lowrank_linear`, plain autograd.)
"""
from __future__ import annotations

import torch

from . import ops

__all__ = ["BACKENDS", "lowrank_linear", "resolve_backend", "check_backend"]

BACKENDS = ("auto", "triton", "reference")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not known; expected one of {', '.join(map(repr, BACKENDS))}")
    return backend


def triton_interpreting() -> bool:
    """Whether the Triton kernels run under the interpreter (decided when they were first imported)."""
    from peft_ops import kernels

    return kernels.INTERPRET


def resolve_backend(backend: str, x: torch.Tensor, rank: int = 1) -> str:
    """The backend that will run for input ``x`` and adapter ``rank``; raises if ``backend`` can't run
    there. "auto" takes the kernels for CUDA tensors of the dtypes and ranks they support."""
    if check_backend(backend) == "auto":
        if not (x.is_cuda and x.dtype in _TRITON_DTYPES):
            return "reference"
        from peft_ops.kernels import MAX_RANK

        return "triton" if rank <= MAX_RANK else "reference"
    if backend == "triton":
        if x.dtype not in _TRITON_DTYPES:
            raise TypeError(f"backend='triton': input dtype is {x.dtype}; the fused kernels take float32, "
                            f"float16 or bfloat16 (use backend='reference' for others)")
        if x.is_cuda:
            return backend
        if x.device.type == "cpu" and triton_interpreting():
            return backend
        raise RuntimeError(
            f"backend='triton': input is on {x.device}; the fused kernels need a CUDA tensor, or a CPU "
            f"tensor with TRITON_INTERPRET=1 set before peft_ops.kernels is first imported. "
            f"Use backend='reference' (or 'auto') to run the plain PyTorch path here.")
    return backend


def lowrank_linear(x, weight, bias, up, core, down, scale, *, dropout_p: float = 0.0,
                   dropout_site: str = "input", backend: str = "auto"):
    """``y = x Wᵀ + b + s·((x D) Cᵀ) Uᵀ`` with dropout on the adapter's input or output.

    ``core`` is None (identity), 1-D (diagonal) or 2-D (full); ``scale`` a float or a 0-d tensor.
    ``dropout_p`` is the effective rate (pass 0 in eval mode). Both backends run the custom op
    ``peft_ops::lowrank_linear`` (see :mod:`peft_ops.ops`): Triton kernels, or their PyTorch twins."""
    return ops.lowrank_linear(x, weight, bias, up, core, down, scale, dropout_p=dropout_p,
                              dropout_site=dropout_site,
                              use_kernels=resolve_backend(backend, x, down.shape[-1]) == "triton")
