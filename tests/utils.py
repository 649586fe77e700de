"""Shared test helpers: devices, tolerances (docs/DESIGN.md §4), relative errors, the oracle, random models."""
from __future__ import annotations

import copy
import types

import torch
from torch import nn

from peft_ops import reference
from peft_ops.layers import is_conv1d

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"

# ‖out − ref‖ / ‖ref‖ against a float64 reference. fp32: exact products in the interpreter, three
# tf32 products per dot on a GPU.
TOLERANCE = {torch.float32: 1e-3 if ON_GPU else 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}
DTYPES = list(TOLERANCE)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values (an unwritten, NaN-poisoned element?)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def randn(*shape, dtype=None, device=DEVICE, requires_grad=False) -> torch.Tensor:
    """``torch.randn`` drawn from the CPU generator, then moved to ``device``: a GPU run checks the very
    data the CPU runs validated (the CUDA generator draws other numbers from the same seed)."""
    return torch.randn(*shape, dtype=dtype).to(device).requires_grad_(requires_grad)


def randn_like(t: torch.Tensor) -> torch.Tensor:
    return randn(*t.shape, dtype=t.dtype, device=t.device)


def randomize_adapters(model: nn.Module, scale: float = 0.5) -> None:
    """Give every trainable adapter tensor non-zero random values (initial values are often zero)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(randn_like(p) * scale)


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D, reproduced: a linear layer with its weight stored as in×out."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * nx ** -0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


class Block(nn.Module):
    def __init__(self, dim: int = 32, kv_dim: int = 16):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, kv_dim)
        self.v_proj, self.o_proj = nn.Linear(dim, kv_dim), nn.Linear(kv_dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        return x + self.mlp(self.o_proj(self.v_proj(x) * self.k_proj(x).sigmoid()) + self.q_proj(x))


class TinyModel(nn.Module):
    """Two blocks and an output head, with fixed random weights for a given seed."""

    def __init__(self, seed: int = 1, dim: int = 32, kv_dim: int = 16, vocab: int = 24):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList([Block(dim, kv_dim), Block(dim, kv_dim)])
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.lm_head(x)


def method_options(method: str) -> dict:
    """Options that let a method adapt every layer of TinyModel (SymLoRA needs the sliced form)."""
    return {"allow_non_square": True} if method == "symlora" else {}


def _oracle_forward(self, x, dropout_p=0.0, dropout_mask=None):
    base = self.base_layer
    weight = base.weight.T if is_conv1d(base) else base.weight
    up, core, down, scale = self.factors()
    return reference.oracle(x, weight, base.bias, up, core, down, scale, dropout_p=dropout_p,
                                    dropout_site=self.method.dropout_site, dropout_mask=dropout_mask)


def oracle_twin(layer: nn.Module) -> nn.Module:
    """A float64 copy of ``layer`` whose forward is the autograd-only oracle,
    ``peft_ops.reference.oracle`` — independent of the custom op and its hand-written backward,
    which both backends share. Same parameter names as ``layer``."""
    twin = copy.deepcopy(layer).double()
    twin.forward = types.MethodType(_oracle_forward, twin)
    return twin
