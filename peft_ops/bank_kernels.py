"""The adapter-bank kernels' contracts in PyTorch: what an :class:`~peft_ops.bank.AdapterBank` runs on
the CPU (and for ``backend="reference"``). Same signatures as the Triton launchers in
``peft_ops.kernels`` (``peft_ops/kernels/bank.py``); re-exports the fused linear's twins so one namespace
serves a bank's whole forward.

Rows are grouped into *segments* of rows that use the same adapter: ``order`` lists the token rows
segment by segment, segment ``j`` is ``order[seg_starts[j]:seg_starts[j + 1]]`` and uses adapter
``seg_adapters[j]``; rows without an adapter are in no segment.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference_kernels import lowrank_linear, shrink

__all__ = ["bank_core", "sgmv_shrink", "sgmv_expand_add", "linear", "shrink", "lowrank_linear"]

_GATHER_ELEMENTS = 2**24  # bounds the gathered cores' memory (rows × r × r floats) per chunk


def bank_core(t: torch.Tensor, cores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``h_i = t_i C_{rows[i]}ᵀ`` (M×r, float32) for ``t``: M×r float32, ``cores``: A×r×r, ``rows``: M
    adapter indices; ``h_i = 0`` where ``rows[i] < 0`` (no adapter)."""
    h = torch.empty_like(t)
    chunk = max(1, _GATHER_ELEMENTS // max(1, cores[0].numel()))
    for start in range(0, t.shape[0], chunk):
        index = rows[start:start + chunk]
        gathered = cores[index.clamp_min(0)].to(t.dtype)
        h_chunk = torch.einsum("mk,mjk->mj", t[start:start + chunk], gathered)
        h[start:start + chunk] = torch.where((index >= 0)[:, None], h_chunk, 0.0)
    return h


def _segments(seg_starts: torch.Tensor, seg_adapters: torch.Tensor):
    starts = seg_starts.tolist()
    return zip(starts[:-1], starts[1:], seg_adapters.tolist())


def sgmv_shrink(a: torch.Tensor, downs: torch.Tensor, order: torch.Tensor, seg_starts: torch.Tensor,
                seg_adapters: torch.Tensor, max_segment_rows: int) -> torch.Tensor:
    """``t[j] = a[order[j]] D_{adapter of j's segment}`` (len(order)×r, float32, float64 for float64 ``a``);
    ``downs``: A×K×r."""
    t = torch.empty(order.shape[0], downs.shape[2], device=a.device, dtype=torch.promote_types(a.dtype, torch.float32))
    for start, end, adapter in _segments(seg_starts, seg_adapters):
        t[start:end] = (a[order[start:end]].to(t.dtype) @ downs[adapter].to(t.dtype))
    return t


def sgmv_expand_add(out: torch.Tensor, t: torch.Tensor, expands: torch.Tensor, order: torch.Tensor,
                    seg_starts: torch.Tensor, seg_adapters: torch.Tensor, max_segment_rows: int) -> torch.Tensor:
    """``out[order[j]] += t[j] E_{adapter of j's segment}ᵀ`` in place (the sum in float32, rounded to
    ``out``'s dtype once); ``expands``: A×N×r. Returns ``out``."""
    for start, end, adapter in _segments(seg_starts, seg_adapters):
        rows = order[start:end]
        out[rows] = (out[rows].to(t.dtype) + t[start:end] @ expands[adapter].to(t.dtype).T).to(out.dtype)
    return out


def linear(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a Wᵀ + bias`` accumulated in float32 (float64 for float64 inputs) and rounded once, like
    ``kernels.linear``."""
    acc = torch.promote_types(a.dtype, torch.float32)
    return F.linear(a.to(acc), weight.to(acc), None if bias is None else bias.to(acc)).to(a.dtype)
