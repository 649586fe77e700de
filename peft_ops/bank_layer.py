"""The adapter bank module: a frozen linear layer and many adapters of one method and rank, a different
adapter for each batch row (:mod:`peft_ops.bank` loads, selects and removes them)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import bank_kernels, dispatch, selection
from .layers import LowRankLinear, base_weight, is_quantized
from .methods import Method

__all__ = ["AdapterBank", "RowAdapters", "adapter_contribution"]


def _core_matrix(core: torch.Tensor | None, rank: int, like: torch.Tensor) -> torch.Tensor:
    """A method's core (None: identity, 1-D: diagonal, 2-D: full) as an r×r matrix."""
    if core is None:
        return torch.eye(rank, device=like.device, dtype=like.dtype)
    return torch.diag(core) if core.dim() == 1 else core


@torch.no_grad()
def adapter_contribution(layer: LowRankLinear, shared: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What a bank stores for one adapter: its scaled core ``s·C`` (r×r) when the bank shares ``U`` and
    ``D``, else its own ``D`` (K×r) and ``E = s·U C`` (N×r)."""
    up, core, down, scale = layer.factors()
    scaled_core = _core_matrix(core, layer.rank, up).to(dtype) * (scale.to(dtype) if torch.is_tensor(scale) else scale)
    if shared:
        return {"cores": scaled_core}
    return {"downs": down.to(dtype), "expands": up.to(dtype) @ scaled_core}


@dataclass
class _Groups:
    """How one input's token rows map onto a bank's adapters, on the input's device: ``rows`` (M, the
    adapter index of every token row, -1 for none) for the shared path, segments for the general one."""

    rows: torch.Tensor
    order: torch.Tensor
    seg_starts: torch.Tensor
    seg_adapters: torch.Tensor
    max_segment_rows: int


@dataclass
class RowAdapters:
    """One bank's adapter index for every batch row (-1: base model) and which input dimension holds the
    batch rows, with the token-level groups built once per (input shape, device): every decoding step of
    ``generate()`` reuses them."""

    indices: list[int]
    batch_dim: int = 0
    _cache: dict = field(default_factory=dict)

    def groups(self, shape: tuple[int, ...], device: torch.device) -> _Groups | None:
        """The groups for an input of ``shape`` (less its feature dimension); None when no row has an
        adapter in this bank. An input with k·len(indices) rows (``generate`` with ``num_beams`` or
        ``num_return_sequences`` = k) gives each row's adapter to k consecutive rows, as transformers
        expands the batch."""
        key = (shape, device)
        if key not in self._cache:
            self._cache[key] = self._build(shape, device)
        return self._cache[key]

    def _build(self, shape: tuple[int, ...], device: torch.device) -> _Groups | None:
        batch = shape[self.batch_dim]
        per_row = torch.tensor(self.indices, dtype=torch.int64).repeat_interleave(batch // len(self.indices))
        view = [1] * len(shape)
        view[self.batch_dim] = batch
        rows = per_row.view(view).expand(shape).reshape(-1)
        active = torch.nonzero(rows >= 0).flatten()
        if not len(active):
            return None
        order = active[torch.argsort(rows[active], stable=True)]
        adapters, counts = torch.unique_consecutive(rows[order], return_counts=True)
        starts = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        return _Groups(rows.to(device), order.to(device), starts.to(device), adapters.to(device),
                       int(counts.max()))


class AdapterBank(nn.Module):
    """A frozen linear layer (``.base_layer``) and a bank of adapters of one method and rank; inside
    :func:`use_adapters` each batch row gets its own adapter (or none), outside it the layer is the
    base layer. Built by :func:`load_adapter_bank`; see the module's docstring for what it stores.
    ``names`` lists the adapters in bank order."""

    def __init__(self, base_layer: nn.Module, method: Method, rank: int, backend: str,
                 frozen: dict[str, torch.Tensor] | None = None, signature: dict | None = None,
                 shared_factors: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        if is_quantized(base_layer):
            raise ValueError(f"adapter bank: the base layer is quantized ({type(base_layer).__name__}); adapter banks "
                             f"need a dense base weight for their fused GEMM (not yet done for quantized bases)")
        weight = base_weight(base_layer)
        self.base_layer, self.method, self.rank, self.backend = base_layer, method, rank, backend
        self.out_features, self.in_features = weight.shape
        self.shared = bool(method.frozen)  # frozen U and D: LoRA-XS, TLoRA
        self.names: list[str] = []
        # the shared frozen factors as the method stores them (for building more adapters on them) and
        # their signature (to refuse adapters made on other factors), then U and D themselves
        self.frozen, self.signature = frozen, signature
        dtype = torch.promote_types(weight.dtype, torch.float32)
        empty = lambda *shape: torch.empty(0, *shape, device=weight.device, dtype=dtype)  # noqa: E731
        if self.shared:
            up, down = shared_factors
            self.register_buffer("up", up.to(dtype).contiguous(), persistent=False)
            self.register_buffer("down", down.to(dtype).contiguous(), persistent=False)
            self.register_buffer("cores", empty(rank, rank), persistent=False)
        else:
            self.register_buffer("downs", empty(self.in_features, rank), persistent=False)
            self.register_buffer("expands", empty(self.out_features, rank), persistent=False)

    @property
    def _stacked(self) -> tuple[str, ...]:
        return ("cores",) if self.shared else ("downs", "expands")

    def index(self, name: str | None) -> int:
        """The adapter's position in the bank, -1 for None or an adapter this module doesn't have (its
        file leaves this module alone: the base layer serves that row here)."""
        return self.names.index(name) if name in self.names else -1

    @torch.no_grad()
    def add(self, names: list[str], contributions: list[dict[str, torch.Tensor]]) -> None:
        for key in self._stacked:
            new = torch.stack([c[key] for c in contributions]).to(getattr(self, key))
            setattr(self, key, torch.cat([getattr(self, key), new]))
        self.names += names

    @torch.no_grad()
    def remove(self, names: set[str]) -> None:
        keep = [i for i, n in enumerate(self.names) if n not in names]
        for key in self._stacked:
            setattr(self, key, getattr(self, key)[keep].clone())
        self.names = [self.names[i] for i in keep]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = None if selection.is_disabled(self) else selection.rows_of(self)
        if rows is None:
            return self.base_layer(x)
        weight = base_weight(self.base_layer)
        if x.dim() < 2 or x.shape[-1] != self.in_features:
            raise ValueError(f"input: shape {tuple(x.shape)}; an adapter bank expects (rows, ..., in_features="
                             f"{self.in_features}): one batch row per name given to use_adapters")
        named = len(rows.indices)
        if x.dim() < 2 + rows.batch_dim or x.shape[rows.batch_dim] % named:
            raise ValueError(f"input: shape {tuple(x.shape)}; use_adapters was given {named} names for the batch "
                             f"rows in dimension {rows.batch_dim}: expected a multiple of {named} there (one name, or "
                             f"None, per batch row; k per row with num_beams or num_return_sequences = k)")
        if x.dtype != weight.dtype:
            raise TypeError(f"input dtype {x.dtype} differs from the base weight's {weight.dtype}; an adapter "
                            f"bank computes in the base dtype (no autocast)")
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("adapter banks serve inference only and have no backward: run the model under "
                               "torch.no_grad() or torch.inference_mode() (generate() does)")
        groups = rows.groups(tuple(x.shape[:-1]), x.device)
        if groups is None:
            return self.base_layer(x)
        use_kernels = dispatch.resolve_backend(self.backend, x, self.rank) != "reference"
        if use_kernels:
            from peft_ops import kernels as impl
        else:
            impl = bank_kernels
        a = x.reshape(-1, self.in_features)
        if self.shared:
            h = impl.bank_core(impl.shrink(a, self.down), self.cores, groups.rows)
            out, _ = impl.lowrank_linear(a, weight, self.base_layer.bias, self.down, self.up, 1.0, t=h)
        else:
            segments = (groups.order, groups.seg_starts, groups.seg_adapters, groups.max_segment_rows)
            out = impl.linear(a, weight, self.base_layer.bias)
            impl.sgmv_expand_add(out, impl.sgmv_shrink(a, self.downs, *segments), self.expands, *segments)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"method={self.method.name}, in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, adapters={len(self.names)}, backend={self.backend!r}")
