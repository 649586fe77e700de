"""Swap-in modules: a frozen linear layer plus an adapter described by a :class:`~peft_ops.methods.Method`.

``LoRALinear``, ``SymLoRALinear``, ``LoRAXSLinear`` and ``TLoRALinear`` only name their method; all
behaviour lives in :class:`LowRankLinear`.
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import dispatch, ops, quantized, reference, selection
from .methods import LORA, LORAXS, SYMLORA, TLORA, InitContext, Method, check_seed
from .quantized import is_quantized

__all__ = ["LowRankLinear", "LoRALinear", "SymLoRALinear", "LoRAXSLinear", "TLoRALinear",
           "LAYER_CLASSES", "is_conv1d", "is_adaptable", "is_quantized", "base_weight", "base_shape", "base_dtype",
           "logical_weight"]


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's GPT-2 ``Conv1D``: a linear layer whose weight is stored transposed (K×N)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The logical N×K (out×in) weight of an ``nn.Linear`` or a ``Conv1D``, as a view (dense layers only:
    a quantized layer's storage is not its weight; see :func:`logical_weight`)."""
    return layer.weight.T if is_conv1d(layer) else layer.weight


def base_shape(layer: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a dense or quantized base layer: the module's, not its storage's."""
    if is_quantized(layer):
        return quantized.quantized_shape(layer)
    if isinstance(layer, nn.Linear):
        return int(layer.out_features), int(layer.in_features)
    return tuple(base_weight(layer).shape)


def base_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype of the weight the layer computes with (a quantized layer's dequantized dtype)."""
    return quantized.quantized_dtype(layer) if is_quantized(layer) else layer.weight.dtype


def logical_weight(layer: nn.Module) -> torch.Tensor:
    """The N×K weight the layer computes with: a view of a dense layer's, a new dequantized tensor for a
    quantized one (for SVD, fingerprints; never kept)."""
    return quantized.dequantize(layer) if is_quantized(layer) else base_weight(layer)


class LowRankLinear(nn.Module):
    """``y = base_layer(x) + s·((x D) Cᵀ) Uᵀ`` for the adapter method ``self.method``.

    Args:
        base_layer: the frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) to adapt; kept as ``.base_layer``
            and frozen.
        rank: r, from 1 to min(in_features, out_features).
        alpha: the scale: ``s = alpha / rank`` for LoRA, SymLoRA and LoRA-XS (default ``alpha = rank``,
            so s = 1); TLoRA's learnable α starts at ``alpha`` (default 1).
        dropout: dropout rate on the adapter path (its input, or its output for TLoRA), in [0, 1).
        seed: seeds every random draw of the adapter's initialisation (CPU generator).
        backend: ``"auto"``, ``"triton"``, ``"fused"``, ``"composed"`` or ``"reference"`` (see
            :mod:`peft_ops.dispatch`).
        frozen_factors: values for the method's frozen tensors (LoRA-XS's SVD factors, TLoRA's random
            matrices), to use instead of regenerating them — as an adapter file saved with them does. The
            layer records that they were given (``given_frozen_factors``): nothing could regenerate them,
            so ``save_adapter`` stores them.
        **method_options: the method's own options (``Method.options``).
    """

    method: Method

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
                 seed: int = 0, backend: str = "auto", *, frozen_factors=None, **method_options):
        super().__init__()
        if not is_adaptable(base_layer):
            raise TypeError(f"base_layer: expected a torch.nn.Linear or a transformers Conv1D, "
                            f"got {type(base_layer).__name__}")
        name = self.method.name
        if base_layer.weight.is_meta:
            raise ValueError(f"{name}: the base weight is on the meta device (no values); materialise the model "
                             f"first (e.g. model.to_empty(device=...) and load its weights), then add adapters: "
                             f"LoRA-XS reads the weight's values, and to_empty would discard the other methods' "
                             f"seeded initialisation")
        n, k = base_shape(base_layer)
        if not is_quantized(base_layer) and tuple(base_layer.weight.shape) != ((k, n) if is_conv1d(base_layer) else (n, k)):
            raise TypeError(f"{name}: {type(base_layer).__name__}'s weight is stored as {tuple(base_layer.weight.shape)}, "
                            f"not as its {n}×{k} (out×in) weight: a quantized layer peft-ops does not know; it adapts "
                            f"dense layers and bitsandbytes' Linear4bit and Linear8bitLt")
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 1 <= rank <= min(n, k):
            raise ValueError(f"{name}: rank={rank!r}; expected an integer from 1 to min(in_features, "
                             f"out_features) = {min(n, k)} for this {n}×{k} weight")
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real)
                                  or not math.isfinite(alpha)):
            raise ValueError(f"{name}: alpha={alpha!r}; expected a finite number or None")
        if alpha == 0:
            raise ValueError(f"{name}: alpha={alpha!r}; expected a non-zero number: with alpha = 0 the adapter's "
                             f"output and every gradient of it stay zero, so it could never train")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"{name}: dropout={dropout!r}; expected a rate in [0, 1)")
        seed = check_seed(seed, f"{name}: ")
        dispatch.check_backend(backend)
        options = self.method.resolve_options(method_options)
        self.method.check_shape(n, k, int(rank), options)
        self.quantized = is_quantized(base_layer)
        weight = logical_weight(base_layer)  # dequantized (temporarily) for a quantized base

        self.base_layer = base_layer
        self.in_features, self.out_features, self.rank = k, n, int(rank)
        self.alpha = float(self.method.default_alpha(self.rank) if alpha is None else alpha)
        self.dropout, self.seed, self.backend = float(dropout), int(seed), backend
        self.options = options
        self.merged = False
        self.given_frozen_factors = bool(frozen_factors)

        ctx = InitContext(n, k, self.rank, self.alpha, weight.detach(),
                          torch.Generator().manual_seed(self.seed), options, frozen_factors)
        try:
            tensors = self.method.init(ctx)
        except KeyError as e:
            raise ValueError(f"{name}: frozen_factors lacks {e}") from None
        assert sorted(t for t, (_, trainable) in tensors.items() if not trainable) == sorted(self.method.frozen)
        if frozen_factors is not None and sorted(frozen_factors) != sorted(self.method.frozen):
            raise ValueError(f"{name}: frozen_factors has {sorted(frozen_factors)}; the method's frozen tensors are "
                             f"{sorted(self.method.frozen)}")
        # adapter tensors are float32 (float64 for a float64 base) whatever the base's 16-bit dtype
        dtype = torch.promote_types(weight.dtype, torch.float32)
        for tensor_name, (value, trainable) in tensors.items():
            # one canonical (contiguous) layout whatever the tensor's origin: results that are bit for bit
            # the same must not depend on which strides the BLAS sees
            value = value.to(device=weight.device, dtype=dtype).contiguous()
            if trainable:
                self.register_parameter(tensor_name, nn.Parameter(value))
            else:
                self.register_buffer(tensor_name, value)
        up, _, down, _ = self.factors()
        if up.shape != (n, self.rank) or down.shape != (k, self.rank):
            raise ValueError(f"{name}: frozen_factors give factors of shapes {tuple(up.shape)} and "
                             f"{tuple(down.shape)}; expected {(n, self.rank)} and {(k, self.rank)}")
        self.register_buffer("_original_weight", None, persistent=False)
        self.register_state_dict_post_hook(_unmerged_state_dict)
        self.register_load_state_dict_pre_hook(_unmerge_before_load)
        self.register_load_state_dict_post_hook(_remerge_after_load)
        self._remerge_after_load = False
        self._warned_merged_training = False
        base_layer.requires_grad_(False)  # last: a failure above leaves the base layer as it was
        quantized.prepare_for_adapter(base_layer)

    @property
    def scaling(self) -> float:
        """``alpha / rank``: the fixed scale of LoRA, SymLoRA and LoRA-XS, derived from ``alpha`` so that
        changing ``alpha`` changes the forward and the saved file alike. (TLoRA's scale is its learnable
        ``tlora_alpha``; its ``alpha`` is only that tensor's starting value.)"""
        return self.alpha / self.rank

    # -- the base layer, as code that expects the wrapped layer sees it
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def unmerged_weight(self) -> torch.Tensor:
        """The logical N×K base weight as it is without ΔW (the original while merged): a view, or a
        dequantized copy for a quantized base."""
        if self.merged:
            return self._original_weight.T if is_conv1d(self.base_layer) else self._original_weight
        return logical_weight(self.base_layer)

    def factors(self):
        """``(U, C, D, s)`` as views of this layer's tensors (gradients flow to them)."""
        return self.method.factors(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if selection.is_disabled(self):  # the base layer alone, as it is without ΔW even while merged
            return F.linear(x, self.unmerged_weight(), self.base_layer.bias) if self.merged else self.base_layer(x)
        if self.merged:
            if self.training and torch.is_grad_enabled() and not self._warned_merged_training:
                warnings.warn(f"{self.method.name} layer is merged: its adapter gets no gradient in this forward; "
                              f"unmerge() it before training", stacklevel=2)
                self._warned_merged_training = True
            return self.base_layer(x)
        up, core, down, scale = self.factors()
        dropout_p = self.dropout if self.training else 0.0
        if self.quantized:
            y = self._quantized_forward(x, up, core, down, scale, dropout_p)
            if y is not None:
                return y
            # bitsandbytes' own forward and backward (no saved W), plus the rank-r term alone
            return self.base_layer(x) + ops.adapter_term(x, up, core, down, scale, dropout_p=dropout_p,
                                                         dropout_site=self.method.dropout_site)
        return ops.adapted_linear(x, base_weight(self.base_layer), self.base_layer.bias, up, core, down, scale,
                                  dropout_p=dropout_p, dropout_site=self.method.dropout_site, backend=self.backend)

    def _quantized_forward(self, x, up, core, down, scale, dropout_p):
        """Where the layer's backend resolves to the Triton kernels (a CUDA input, or the interpreter), the
        quantized base through them: the fused GEMM decoding W's tiles (forward and dx) or the composed
        dequantize-then-cuBLAS, as dispatch picks, in bitsandbytes' compute dtype. None where the backend
        resolves to "reference" (today's bitsandbytes forward plus ``adapter_term`` then runs) or the
        kernels cannot read the weight (``quantized.kernel_weight``)."""
        xc = x.to(quantized.compute_dtype(self.base_layer, x)) if x.is_floating_point() else x
        if dispatch.resolve_backend(self.backend, xc, self.rank) == "reference":
            return None
        weight = quantized.kernel_weight(self.base_layer)
        if weight is None:
            return None
        bias = self.base_layer.bias
        y = ops.quantized_adapted_linear(xc, weight, None if bias is None else bias.to(xc.dtype), up, core, down,
                                         scale, dropout_p=dropout_p, dropout_site=self.method.dropout_site,
                                         backend=self.backend)
        return y.to(x.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``ΔW = s·U C Dᵀ`` as an N×K tensor, in float32 (float64 for a float64 base)."""
        up, core, down, scale = self.factors()
        return reference.delta_weight(up, core, down, scale,
                                      torch.promote_types(base_dtype(self.base_layer), torch.float32))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into the base weight (the sum computed in float32, then cast back). A copy of the
        original weight is kept so :meth:`unmerge` restores it bit for bit. No-op if merged."""
        if self.merged:
            return
        if self.quantized:
            raise ValueError(f"merge: the {self.method.name} layer's base is quantized "
                             f"({type(self.base_layer).__name__}); folding ΔW in would quantize W + ΔW "
                             f"again and lose most of the adapter (README, 'Quantized bases'). Keep "
                             f"the adapter unmerged, or merge into the unquantized original model")
        selection.refuse_while_selected([self], "merge")
        weight = self.base_layer.weight
        delta = self.delta_weight()
        self._original_weight = weight.detach().clone()
        weight.copy_((weight.to(delta.dtype) + (delta.T if is_conv1d(self.base_layer) else delta)).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight exactly as it was before :meth:`merge`. No-op if not merged."""
        if not self.merged:
            return
        selection.refuse_while_selected([self], "unmerge")
        self.base_layer.weight.copy_(self._original_weight)
        self._original_weight = None
        self.merged = False

    def forget_original_weight(self) -> None:
        """Make a merge permanent (unload): drop the copy of the original weight that :meth:`unmerge` restores."""
        self._original_weight = None

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters(recurse=False))

    def extra_repr(self) -> str:
        return (f"method={self.method.name}, in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, alpha={self.alpha:g}, dropout={self.dropout:g}, backend={self.backend!r}"
                + (", merged=True" if self.merged else ""))


def _unmerged_state_dict(layer: LowRankLinear, state_dict, prefix, local_metadata) -> None:
    """A merged layer's state_dict holds the original base weight: loaded into an unmerged layer (or a
    fresh model with the adapter injected), it must not apply ΔW twice."""
    if layer.merged:
        state_dict[prefix + "base_layer.weight"] = layer._original_weight.detach()


def _unmerge_before_load(layer: LowRankLinear, *args) -> None:
    """A state_dict holds the unmerged base weight (see above): load it into an unmerged layer, then merge
    again with the loaded adapter, so a merged layer stays merged and correct through the round trip."""
    if layer.merged:
        layer.unmerge()
        layer._remerge_after_load = True


def _remerge_after_load(layer: LowRankLinear, incompatible_keys) -> None:
    if layer._remerge_after_load:
        layer._remerge_after_load = False
        layer.merge()


class LoRALinear(LowRankLinear):
    """LoRA (PEFT conventions): ``ΔW = (α/r)·B A``; trains A (r×K) and B (N×r)."""
    method = LORA


class SymLoRALinear(LowRankLinear):
    """SymLoRA: ``ΔW = (α/r)·Q diag(λ) Qᵀ``; trains Q and λ. Square weights, or the sliced form with
    ``allow_non_square=True``."""
    method = SYMLORA


class LoRAXSLinear(LowRankLinear):
    """LoRA-XS: ``ΔW = (α/r)·U_r R Σ_r V_rᵀ`` with the frozen top-r SVD of the base weight; trains R only.
    Option ``svd="randomized"`` (default, seeded by ``svd_seed``) or ``"exact"``; ``svd_device="cpu"``
    (default) or ``"weight"`` (computed on the weight's own device, a GPU's: faster on large weights)."""
    method = LORAXS


class TLoRALinear(LowRankLinear):
    """TLoRA: ``Δy = α·x A B C`` with frozen seeded random A, C; trains B (r×r) and the scalar α."""
    method = TLORA


LAYER_CLASSES: dict[str, type[LowRankLinear]] = {
    cls.method.name: cls for cls in (LoRALinear, SymLoRALinear, LoRAXSLinear, TLoRALinear)}
