"""The one public entry point of the low-rank linear, :func:`adapted_linear`, and the custom operators
behind it, ``peft_ops::adapter_forward`` and ``peft_ops::adapter_backward``.

:func:`adapted_linear` resolves the backend and validates every argument once, then calls the forward
op. Both ops are ``torch.library.triton_op``s, so ``torch.compile(model, fullgraph=True)`` traces straight
through them: on a GPU Inductor sees the Triton kernels themselves; on the CPU (and for
``backend="reference"``) the same algorithm runs over :mod:`peft_ops.reference_kernels`, the kernels'
contracts in plain PyTorch. :mod:`peft_ops.dispatch` picks the implementation of each GEMM step.

The formulas (``y = x Wᵀ + b + s·((x D) Cᵀ) Uᵀ``; ``t = x D``, ``g = ∂L/∂y``): forward
``y = x Wᵀ + b + s·drop((drop(x) D)(U C)ᵀ)``: the core folds into the expand factor ``E = U C`` (N×r)
first, then one GEMM step does the rest. Backward, with ``v = drop(g) U`` and ``t = drop(x) D`` (saved, M×r):

* ``dx = g W + s·drop(v (D Cᵀ)ᵀ)``: the same GEMM step with the roles swapped, ``v`` from its shrink;
* ``P = vᵀ t`` (r×r): ``dC = s·P`` (``s·diag P`` for a diagonal core), ``ds = ⟨P, C⟩``;
* ``dU = s·(drop(g)ᵀ t) Cᵀ`` and ``dD = s·(drop(x)ᵀ v) C``, where those factors train.

Reductions over M are chunked and summed in a fixed order, so gradients are bitwise reproducible.
Saved activations: ``t``, plus ``x`` only when ``D`` trains (LoRA, SymLoRA). Dropout masks are
regenerated from a seed held in a device tensor, never stored.
"""
from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op

from . import dispatch, reference

__all__ = ["adapted_linear", "adapter_term", "quantized_adapted_linear"]


def _fold(factor: Tensor, core: Optional[Tensor], scale) -> Tensor:
    """``factor · core`` (an N×r or K×r product), times ``scale`` when the scale is a tensor."""
    if core is not None:
        factor = factor * core if core.dim() == 1 else factor @ core
    return factor * scale if isinstance(scale, Tensor) else factor


def _core_transpose(core: Optional[Tensor]) -> Optional[Tensor]:
    return core.T if core is not None and core.dim() == 2 else core


@triton_op("peft_ops::adapter_forward", mutates_args=())
def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], up: Tensor, core: Optional[Tensor], down: Tensor,
             scale: Optional[Tensor], scale_value: float, seed: Optional[Tensor], dropout_p: float,
             dropout_site: str, backend: str, store_t: bool) -> tuple[Tensor, Tensor]:
    """(y, t) for a 2-D x; t is empty unless ``store_t``. ``backend`` is resolved (not "auto")."""
    return _adapter_forward(x, weight, bias, up, core, down, scale, scale_value, seed, dropout_p, dropout_site,
                            backend, store_t)


def _adapter_forward(x, weight, bias, up, core, down, scale, scale_value, seed, dropout_p, dropout_site, backend,
                     store_t):
    """The forward op's body; ``weight`` a dense tensor or a quantized weight (:func:`quantized_adapted_linear`)."""
    y, t = dispatch.run_lowrank_linear(
        backend, "forward", x, weight, bias, down, _fold(up, core, scale), scale_value, dropout_p=dropout_p,
        dropout_site=dropout_site, seed=seed, store_t=store_t)
    return y, t if t is not None else x.new_empty(0, dtype=torch.float32)


@triton_op("peft_ops::adapter_backward", mutates_args=())
def _backward(g: Tensor, t: Optional[Tensor], x: Optional[Tensor], weight: Tensor, up: Tensor, core: Optional[Tensor],
              down: Tensor, scale: Optional[Tensor], scale_value: float, seed: Optional[Tensor], dropout_p: float,
              dropout_site: str, backend: str, needs: list[bool]) -> list[Tensor]:
    """[dx, d_bias, d_up, d_core, d_down, d_scale]; entries not asked for in ``needs`` are empty."""
    return _adapter_backward(g, t, x, weight, up, core, down, scale, scale_value, seed, dropout_p, dropout_site,
                             backend, needs)


def _adapter_backward(g, t, x, weight, up, core, down, scale, scale_value, seed, dropout_p, dropout_site, backend,
                      needs):
    """The backward op's body; ``weight`` a dense tensor or a quantized weight (whose ``.T`` the dx GEMM
    decodes along the other axis)."""
    impl = dispatch.kernel_module(backend)
    need_x, need_bias, need_up, need_core, need_down, need_scale = needs
    s = scale if scale is not None else scale_value
    p_in = dropout_p if dropout_site == "input" else 0.0  # dropout on x, the adapter's input
    p_out = dropout_p - p_in  # dropout on the adapter's output: on g in the backward
    need_v = need_core or need_scale or need_down
    # an op's outputs may not alias each other: each gradient not asked for is its own empty tensor
    dx, d_bias, d_up, d_core, d_down, d_scale = (g.new_empty(0) for _ in range(6))

    v = None
    if need_x:  # one fused GEMM: dx = g W + s·drop(v (D Cᵀ)ᵀ), with v = drop(g) U from its shrink
        dx, v = dispatch.run_lowrank_linear(backend, "dx", g, weight.T, None, up,
                                            _fold(down, _core_transpose(core), scale), scale_value,
                                            dropout_p=dropout_p, seed=seed, store_t=need_v,
                                            dropout_site="output" if dropout_site == "input" else "input")
    elif need_v:
        v = impl.shrink(g, up, dropout_p=p_out, seed=seed)
    if need_core or need_scale:
        pvt = impl.rank_reduce(v, t)  # P = vᵀ t, r×r
        if need_core:
            d_core = (s * (pvt if core.dim() == 2 else pvt.diagonal())).to(core.dtype)
        if need_scale:
            d_scale = (pvt.trace() if core is None else
                       (pvt * core).sum() if core.dim() == 2 else (pvt.diagonal() * core).sum())
            d_scale = d_scale.to(scale.dtype).reshape(scale.shape)
    if need_up:
        d_up = (s * _fold(impl.rank_reduce(g, t, dropout_p=p_out, seed=seed), _core_transpose(core), None)).to(up.dtype)
    if need_down:
        d_down = (s * _fold(impl.rank_reduce(x, v, dropout_p=p_in, seed=seed), core, None)).to(down.dtype)
    if need_bias:
        d_bias = g.sum(0, dtype=torch.promote_types(g.dtype, torch.float32)).to(g.dtype)
    return [dx, d_bias, d_up, d_core, d_down, d_scale]


def _setup_context(ctx, inputs, output):
    x, weight, bias, up, core, down, scale, scale_value, seed, dropout_p, dropout_site, backend, store_t = inputs
    t = output[1]
    ctx.mark_non_differentiable(t)
    ctx.save_for_backward(t if store_t else None, x if down.requires_grad else None, weight, up, core, down,
                          scale, seed)
    ctx.scale_value, ctx.dropout_p, ctx.dropout_site, ctx.backend = scale_value, dropout_p, dropout_site, backend


def _differentiate(ctx, grad_y, grad_t):
    t, x, weight, up, core, down, scale, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    needs = [need[0], need[2], need[3], need[4], need[5], need[6]]  # x, bias, up, core, down, scale
    grads = torch.ops.peft_ops.adapter_backward(
        grad_y, t, x, weight, up, core, down, scale, ctx.scale_value, seed, ctx.dropout_p, ctx.dropout_site,
        ctx.backend, needs)
    dx, d_bias, d_up, d_core, d_down, d_scale = (grad if wanted else None for grad, wanted in zip(grads, needs))
    return dx, None, d_bias, d_up, d_core, d_down, d_scale, None, None, None, None, None, None


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError("peft_ops layers do not support double backward: their gradients are computed by "
                       "fused kernels that are not themselves differentiated (create_graph=True)")


torch.library.register_autograd("peft_ops::adapter_forward", _differentiate, setup_context=_setup_context)
torch.library.register_autograd("peft_ops::adapter_backward", _refuse_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


def _call_state(x: Tensor, up: Tensor, core: Optional[Tensor], scale, dropout_p: float, seed):
    """What a call passes to the ops besides its tensors: the scale as a tensor (a trainable one) or a
    float, the dropout seed as a 0-d int64 device tensor (drawn when not given), and whether t must be
    stored for the factors' gradients."""
    scale_tensor = scale if isinstance(scale, Tensor) else None
    scale_value = 1.0 if scale_tensor is not None else float(scale)
    if dropout_p:
        seed = (torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device=x.device) if seed is None
                else torch.as_tensor(seed, dtype=torch.int64).to(x.device))
    else:
        seed = None
    store_t = torch.is_grad_enabled() and any(f is not None and f.requires_grad for f in (up, core, scale_tensor))
    return scale_tensor, scale_value, seed, store_t


def adapted_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], up: Tensor, core: Optional[Tensor],
                   down: Tensor, scale, *, dropout_p: float = 0.0, dropout_site: str = "input", backend: str = "auto",
                   seed=None) -> Tensor:
    """``y = x Wᵀ + b + s·((x D) Cᵀ) Uᵀ`` with dropout on the adapter's input or output, for x of any
    leading dimensions: the one entry point every layer calls.

    ``weight``: the frozen N×K base weight (asking for its gradient is an error); ``up``: N×r; ``core``:
    None (identity), r (diagonal) or r×r; ``down``: K×r; ``scale``: a float or a 0-d/1-element tensor.
    Differentiable in ``x``, ``bias``, ``up``, ``core``, ``down`` and a tensor ``scale``. ``dropout_p`` is
    the effective rate (pass 0 in eval mode). ``backend``: see :mod:`peft_ops.dispatch`. ``seed`` fixes the
    dropout mask (default: drawn on x's device from torch's generator, so ``torch.manual_seed`` reproduces
    it); ``peft_ops.kernels.dropout_mask`` returns it. Every argument is checked here, once."""
    if _check_arguments(x, weight, bias, up, core, down, scale):  # under autocast
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    backend = dispatch.resolve_backend(backend, x, down.shape[-1])
    if backend != "reference" and x.device.type == "cpu" and torch.compiler.is_compiling():
        raise RuntimeError(f"backend={backend!r} on the CPU runs the Triton interpreter, which torch.compile "
                           f"cannot trace; compile with backend='reference' (or 'auto') on the CPU")
    scale_tensor, scale_value, seed, store_t = _call_state(x, up, core, scale, dropout_p, seed)
    # inputs are cast to the autocast dtype above; inside, the rank-r work stays float32 (E = U·C, t)
    with torch.autocast(x.device.type, enabled=False):
        y, _ = torch.ops.peft_ops.adapter_forward(
            x.reshape(-1, x.shape[-1]), weight, bias, up, core, down, scale_tensor, scale_value, seed,
            float(dropout_p), dropout_site, backend, store_t)
    return y.reshape(*x.shape[:-1], weight.shape[0])


class _QuantizedAdapter(torch.autograd.Function):
    """The forward and backward ops' bodies over a quantized weight (an object, not a tensor: no op
    schema takes it), under autograd. Saves what the ops save; the quantized weight is the layer's own
    storage, referenced, never dequantized into a saved tensor."""

    @staticmethod
    def forward(ctx, x, bias, up, core, down, scale, weight, scale_value, seed, dropout_p, dropout_site, backend,
                store_t):
        y, t = _adapter_forward(x, weight, bias, up, core, down, scale, scale_value, seed, dropout_p, dropout_site,
                                backend, store_t)
        ctx.save_for_backward(t if store_t else None, x if down.requires_grad else None, up, core, down, scale, seed)
        ctx.weight, ctx.scale_value, ctx.dropout_p = weight, scale_value, dropout_p
        ctx.dropout_site, ctx.backend = dropout_site, backend
        return y

    @staticmethod
    def backward(ctx, grad_y):
        t, x, up, core, down, scale, seed = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:6])  # x, bias, up, core, down, scale
        grads = _adapter_backward(grad_y, t, x, ctx.weight, up, core, down, scale, ctx.scale_value, seed,
                                  ctx.dropout_p, ctx.dropout_site, ctx.backend, needs)
        return (*(grad if wanted else None for grad, wanted in zip(grads, needs)), *(None,) * 7)


def quantized_adapted_linear(x: Tensor, weight, bias: Optional[Tensor], up: Tensor, core: Optional[Tensor],
                             down: Tensor, scale, *, dropout_p: float = 0.0, dropout_site: str = "input",
                             backend: str = "triton", seed=None) -> Tensor:
    """:func:`adapted_linear` over a quantized base weight (a ``peft_ops.kernels.dequant.QuantizedWeight``,
    e.g. ``peft_ops.quantized.kernel_weight(layer)``): the fused GEMM decodes W's tiles in its K-loop
    (forward, and dx in the backward), or the composed implementation dequantizes W for the call and
    runs cuBLAS; :mod:`peft_ops.dispatch` picks as for a dense weight. ``backend``: a Triton one
    ("triton", "fused", "composed"); x is computed in its own dtype. Runs eagerly under autograd
    (torch.compile does not trace it: the ops' schemas take no quantized weight)."""
    n, k = weight.shape
    if x.shape[-1:] != (k,):
        raise ValueError(f"input: shape {tuple(x.shape)}; expected a last dimension of in_features={k}")
    r = down.shape[-1]
    if tuple(up.shape) != (n, r) or tuple(down.shape) != (k, r):
        raise ValueError(f"up, down: shapes {tuple(up.shape)}, {tuple(down.shape)}; expected {(n, r)}, {(k, r)}")
    if x.device != weight.device:
        raise RuntimeError(f"input is on {x.device} but the layer's weights are on {weight.device}")
    backend = dispatch.resolve_backend(backend, x, r)
    if backend == "reference":
        raise ValueError("quantized_adapted_linear runs the Triton kernels; backend='reference' has no quantized "
                         "GEMM (a layer then runs bitsandbytes' forward plus adapter_term)")
    scale_tensor, scale_value, seed, store_t = _call_state(x, up, core, scale, dropout_p, seed)
    with torch.autocast(x.device.type, enabled=False):
        y = _QuantizedAdapter.apply(x.reshape(-1, k), bias, up, core, down, scale_tensor, weight, scale_value, seed,
                                    float(dropout_p), dropout_site, backend, store_t)
    return y.reshape(*x.shape[:-1], n)


def adapter_term(x: Tensor, up: Tensor, core: Optional[Tensor], down: Tensor, scale, *, dropout_p: float = 0.0,
                 dropout_site: str = "input") -> Tensor:
    """``s·((drop(x) D) Cᵀ) Uᵀ`` (dropout on the input, or on the output for ``dropout_site="output"``)
    alone, in plain PyTorch under autograd, for a base layer that computes its own ``x Wᵀ + b`` (a
    quantized one: its weight is no N×K tensor for the fused GEMM). The rank-r work runs in float32 (or
    the factors' wider dtype) and the result is returned in x's dtype."""
    k, r = down.shape
    if x.shape[-1:] != (k,):
        raise ValueError(f"input: shape {tuple(x.shape)}; expected a last dimension of in_features={k}")
    if tuple(up.shape[1:]) != (r,):
        raise ValueError(f"up: shape {tuple(up.shape)}; expected (out_features, {r})")
    if x.device != down.device:
        raise RuntimeError(f"input is on {x.device} but the adapter's tensors are on {down.device}")
    dtype = torch.promote_types(torch.promote_types(x.dtype, down.dtype), torch.float32)
    return reference.adapter_delta(x, up, core, down, scale, dropout_p=dropout_p, dropout_site=dropout_site,
                                   dtype=dtype)


def _check_arguments(x, weight, bias, up, core, down, scale) -> bool:
    """Every argument, with an error that names it: what the kernels would otherwise read out of bounds,
    compute in the wrong dtype, or differentiate wrongly. Returns whether autocast is on for x's device."""
    n, k = weight.shape
    if not x.is_floating_point():
        raise TypeError(f"input dtype {x.dtype}: expected a floating-point tensor (as nn.Linear, which autocast "
                        f"does not cast integer inputs for either)")
    if x.shape[-1:] != (k,):
        raise ValueError(f"input: shape {tuple(x.shape)}; expected a last dimension of in_features={k}")
    if x.device != weight.device:
        raise RuntimeError(f"input is on {x.device} but the layer's weights are on {weight.device}")
    autocast = torch.is_autocast_enabled(x.device.type)
    if x.dtype != weight.dtype and not autocast:
        raise TypeError(f"input dtype {x.dtype} differs from the base weight's {weight.dtype}; cast one of them "
                        f"(or run under torch.autocast)")
    if weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("peft_ops layers do not compute the base weight's gradient; freeze it "
                           "(weight.requires_grad_(False), as peft_ops.inject does)")
    r = down.shape[-1] if down.dim() == 2 else -1
    expected = {"up": (up, (n, r)), "down": (down, (k, r)), "bias": (bias, (n,))}
    if core is not None:
        expected["core"] = (core, (r,) if core.dim() == 1 else (r, r))
    if isinstance(scale, Tensor):
        expected["scale"] = (scale, (1,) if scale.dim() == 1 else ())
    for name, (tensor, shape) in expected.items():
        if tensor is None:
            continue
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)}; expected {shape} for a {n}×{k} weight at rank {r}")
        if tensor.device != x.device:
            raise RuntimeError(f"{name} is on {tensor.device} but the input is on {x.device}")
    return autocast
