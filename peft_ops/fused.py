"""Autograd over the fused kernels, for every method (DESIGN.md §1 gives each formula).

Forward: ``y = x Wᵀ + b + s·drop((drop(x) D)(U C)ᵀ)``: the core folds into the expand factor
``E = U C`` (N×r) on the host, and one fused GEMM does the rest (see ``peft_ops.kernels``).

Backward, with ``v = drop(g) U`` and ``t = drop(x) D`` (saved, M×r):

* ``dx = g W + s·drop(v (D Cᵀ)ᵀ)``: the same fused GEMM with the roles swapped, ``v`` from its shrink;
* ``P = vᵀ t`` (r×r): ``dC = s·P`` (``s·diag P`` for a diagonal core), ``ds = ⟨P, C⟩``;
* ``dU = s·(drop(g)ᵀ t) Cᵀ`` and ``dD = s·(drop(x)ᵀ v) C``, where those factors train.

Reductions over M are chunked and summed in a fixed order: gradients are bitwise reproducible. Saved
activations: ``t``, plus ``x`` only when ``D`` trains (LoRA, SymLoRA). Dropout masks are regenerated
from the seed.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

__all__ = ["fused_lowrank_linear"]


def _fold(factor: torch.Tensor, core: torch.Tensor | None, scale) -> torch.Tensor:
    """``factor · core`` (an N×r or K×r product), times ``scale`` when the scale is a tensor."""
    if core is not None:
        factor = factor * core if core.dim() == 1 else factor @ core
    return factor * scale if torch.is_tensor(scale) else factor


def _core_transpose(core):
    return core.T if core is not None and core.dim() == 2 else core


class _FusedLowRankLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, up, core, down, scale, dropout_p, dropout_site, seed):
        from peft_ops import kernels

        k = x.shape[-1]
        x2d = x.reshape(-1, k)
        s_tensor = torch.is_tensor(scale)
        needs_t = any(ctx.needs_input_grad[i] for i in (3, 4, 6))  # dU, dC, ds use t
        with torch.no_grad():
            expand = _fold(up, core, scale)
        y, t = kernels.lowrank_linear(x2d, weight, bias, down, expand, 1.0 if s_tensor else scale,
                                      dropout_p=dropout_p, dropout_site=dropout_site, seed=seed, store_t=needs_t)
        ctx.save_for_backward(t, x2d if ctx.needs_input_grad[5] else None, weight, up, core, down,
                              scale if s_tensor else None)
        ctx.scale = None if s_tensor else scale
        ctx.x_shape, ctx.dropout_p, ctx.dropout_site, ctx.seed = x.shape, dropout_p, dropout_site, seed
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        from peft_ops import kernels

        t, x2d, weight, up, core, down, scale_t = ctx.saved_tensors
        need_x, _, need_bias, need_up, need_core, need_down, need_scale = ctx.needs_input_grad[:7]
        n = weight.shape[0]
        g = grad_y.reshape(-1, n)
        s = scale_t.detach() if scale_t is not None else ctx.scale
        p, seed = ctx.dropout_p, ctx.seed
        p_in = p if ctx.dropout_site == "input" else 0.0  # dropout on x (the adapter input)
        p_out = p - p_in  # dropout on the adapter output, i.e. on g in the backward
        need_v = need_core or need_scale or need_down

        dx = v = None
        if need_x:  # one fused GEMM: dx = g W + s·drop(v (D Cᵀ)ᵀ), and v = drop(g) U from its shrink
            site = "output" if ctx.dropout_site == "input" else "input"
            dx, v = kernels.lowrank_linear(g, weight.T, None, up, _fold(down, _core_transpose(core), scale_t),
                                           1.0 if scale_t is not None else s, dropout_p=p, dropout_site=site,
                                           seed=seed, store_t=need_v)
            dx = dx.reshape(ctx.x_shape)
        elif need_v:
            v = kernels.shrink(g, up, dropout_p=p_out, seed=seed)

        d_core = d_scale = d_up = d_down = None
        if need_core or need_scale:
            pvt = kernels.rank_reduce(v, t)  # P = vᵀ t, r×r
            if need_core:
                d_core = (s * (pvt if core.dim() == 2 else pvt.diagonal())).to(core.dtype)
            if need_scale:
                d_scale = (pvt.trace() if core is None else
                           (pvt * core).sum() if core.dim() == 2 else (pvt.diagonal() * core).sum())
                d_scale = d_scale.to(scale_t.dtype).reshape(scale_t.shape)
        if need_up:
            d_up = (s * _fold(kernels.rank_reduce(g, t, dropout_p=p_out, seed=seed),
                              _core_transpose(core), None)).to(up.dtype)
        if need_down:
            d_down = (s * _fold(kernels.rank_reduce(x2d, v, dropout_p=p_in, seed=seed), core, None)).to(down.dtype)
        d_bias = g.sum(0, dtype=torch.float32).to(g.dtype) if need_bias else None
        return dx, None, d_bias, d_up, d_core, d_down, d_scale, None, None, None


def fused_lowrank_linear(x, weight, bias, up, core, down, scale, *, dropout_p: float = 0.0,
                         dropout_site: str = "input", seed: int | None = None):
    """The fused-kernel path of :func:`peft_ops.lowrank_linear`, differentiable in ``x``, ``bias``,
    ``up``, ``core``, ``down`` and a tensor ``scale``. The base weight is frozen: its gradient is not
    computed (it is an error to ask for it). ``seed`` fixes the dropout mask (default: drawn from
    torch's CPU generator, so ``torch.manual_seed`` reproduces it); ``peft_ops.kernels.dropout_mask``
    returns the mask for a seed."""
    if weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("backend='triton' does not compute the base weight's gradient; freeze it "
                           "(weight.requires_grad_(False), as peft_ops.inject does) or use backend='reference'")
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if x.dtype != weight.dtype:
        raise TypeError(f"input dtype {x.dtype} differs from the weight's {weight.dtype}")
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item()) if dropout_p else 0
    return _FusedLowRankLinear.apply(x, weight, bias, up, core, down, scale, float(dropout_p), dropout_site, seed)
