"""Every adapter method as data over one formula.

All methods are a rank-r update with the same three-factor shape (docs/DESIGN.md)::

    ΔW = s · U · C · Dᵀ       U: N×r (up)    C: r×r (core)    D: K×r (down)
    y  = x Wᵀ + b + s · ((x D) Cᵀ) Uᵀ

A :class:`Method` says which tensors a layer stores, how each is initialised, which of them train,
and how the stored tensors map onto ``U``, ``C``, ``D`` and ``s`` (as views, so gradients reach the
stored tensors through autograd; SymLoRA's tied ``U = D = Q`` needs nothing more). Layers, the
reference path, the fused kernels and adapter files all work from these descriptions alone.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy
import torch

from .svd import top_singular_triplets

__all__ = ["Method", "InitContext", "METHODS", "get_method", "LORA", "SYMLORA", "LORAXS", "TLORA", "RECOMMENDED",
           "Recommendation"]


def check_seed(value, context: str = "", name: str = "seed") -> int:
    """A seed as an int: any integer (Python or numpy, not bool) in [0, 2**63), else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < 2**63:
        raise ValueError(f"{context}{name}={value!r}; expected an integer in [0, 2**63)")
    return int(value)


@dataclass(frozen=True)
class InitContext:
    """What a method's ``init`` may use. Random draws come from ``generator`` (CPU, seeded per layer),
    so the same seed gives the same tensors on every device."""

    out_features: int
    in_features: int
    rank: int
    alpha: float
    weight: torch.Tensor  # the frozen N×K weight (a detached view; only LoRA-XS reads it)
    generator: torch.Generator
    options: Mapping[str, Any]
    frozen: Mapping[str, torch.Tensor] | None = None  # given frozen tensors (from a file): don't regenerate


# A stored tensor: name -> (value on the CPU, trainable?); the layer casts it to its adapter dtype
Tensors = dict[str, tuple[torch.Tensor, bool]]
# (U, C, D, s): C is None (identity), 1-D (diagonal) or 2-D; s is a float or a 0-d tensor.
Factors = tuple[torch.Tensor, "torch.Tensor | None", torch.Tensor, "float | torch.Tensor"]


@dataclass(frozen=True)
class Method:
    name: str
    core: str  # "identity" | "diagonal" | "full"
    dropout_site: str  # "input" (on the adapter's input, PEFT convention) | "output" (TLoRA)
    default_alpha: Callable[[int], float]  # s = alpha / rank, or a learnable scale's starting value
    init: Callable[[InitContext], Tensors]
    factors: Callable[[Any], Factors]  # layer -> (U, C, D, s), views of its stored tensors
    trainable_count: Callable[[int, int, int], int]  # (out_features, in_features, rank) -> count
    frozen: tuple[str, ...] = ()  # the stored tensors that don't train (regenerated, not saved)
    options: Mapping[str, Any] = field(default_factory=dict)  # allowed method options and defaults
    check_shape: Callable[[int, int, int, Mapping[str, Any]], None] = lambda n, k, r, opts: None

    def resolve_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            allowed = ", ".join(sorted(self.options)) or "none"
            raise TypeError(f"{self.name}: unknown option(s) {', '.join(map(repr, unknown))}; "
                            f"options this method takes: {allowed}")
        # numpy scalars become Python numbers: options are written to adapter files as JSON
        return {**self.options, **{k: v.item() if isinstance(v, numpy.generic) else v for k, v in given.items()}}


def _kaiming_uniform(shape, generator):
    # torch's own fan-in rule for a 2-D tensor (fan_in = shape[1]), drawn from a seeded CPU generator
    t = torch.empty(shape)
    torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
    return t


def _kaiming_normal(shape, generator):
    t = torch.empty(shape)
    torch.nn.init.kaiming_normal_(t, a=math.sqrt(5), generator=generator)
    return t


# --- LoRA (Hu et al. 2021), PEFT conventions: A (r×K) kaiming-uniform, B (N×r) zero, s = α/r ---

def _lora_init(c: InitContext) -> Tensors:
    return {
        "lora_A": (_kaiming_uniform((c.rank, c.in_features), c.generator), True),
        "lora_B": (torch.zeros(c.out_features, c.rank), True),
    }


LORA = Method(
    name="lora",
    core="identity",
    dropout_site="input",
    default_alpha=float,
    init=_lora_init,
    factors=lambda m: (m.lora_B, None, m.lora_A.T, m.scaling),
    trainable_count=lambda n, k, r: r * (n + k),
)


# --- SymLoRA (2504.03719): ΔW = s · Q diag(λ) Qᵀ, Q kaiming-uniform, λ = 0 ---

def _symlora_check(n: int, k: int, r: int, opts: Mapping[str, Any]) -> None:
    if n != k and not opts["allow_non_square"]:
        raise ValueError(
            f"symlora: the target weight is {n}×{k} (out_features×in_features), but SymLoRA's "
            f"Q·diag(λ)·Qᵀ is defined for square weights. Pass allow_non_square=True for the sliced "
            f"form U = Q[:out_features], D = Q[:in_features] (no longer symmetric).")


def _symlora_init(c: InitContext) -> Tensors:
    # Q is max(N, K)×r; starting from λ = 0 keeps ΔW = 0 while dλ ≠ 0 (Q = 0 would freeze training).
    n = max(c.out_features, c.in_features)
    return {
        "symlora_Q": (_kaiming_uniform((n, c.rank), c.generator), True),
        "symlora_lambda": (torch.zeros(c.rank), True),
    }


SYMLORA = Method(
    name="symlora",
    core="diagonal",
    dropout_site="input",
    default_alpha=float,
    init=_symlora_init,
    factors=lambda m: (m.symlora_Q[: m.out_features], m.symlora_lambda, m.symlora_Q[: m.in_features],
                       m.scaling),
    trainable_count=lambda n, k, r: r * max(n, k) + r,
    options={"allow_non_square": False},
    check_shape=_symlora_check,
)


# --- LoRA-XS (2405.17604): ΔW = s · U_r R Σ_r V_rᵀ, frozen top-r SVD factors, R ~ N(0, 1e-5) ---

def _loraxs_init(c: InitContext) -> Tensors:
    if c.frozen is None:
        if not torch.isfinite(c.weight).all():
            raise ValueError("loraxs: the base weight has non-finite values (NaN or inf); LoRA-XS's frozen "
                             "factors are its SVD, which needs finite weights")
        device = c.weight.device if c.options["svd_device"] == "weight" else "cpu"
        u, sigma, v = top_singular_triplets(c.weight, c.rank, exact=c.options["svd"] == "exact",
                                            seed=c.options["svd_seed"], device=device)
        _check_spectrum(sigma, c.rank)
        frozen = {"loraxs_B": u, "loraxs_A": sigma[:, None] * v.T}  # U_r (N×r); Σ_r V_rᵀ (r×K) absorbs Σ
    else:
        frozen = c.frozen
    return {
        "loraxs_B": (frozen["loraxs_B"], False),
        "loraxs_A": (frozen["loraxs_A"], False),
        "loraxs_R": (torch.randn(c.rank, c.rank, generator=c.generator) * 1e-5, True),
    }


def _check_spectrum(sigma: torch.Tensor, rank: int) -> None:
    """Directions with a zero singular value give zero columns of Σ_r V_rᵀ: R's matching rows never train."""
    if not sigma[0] > 0:
        raise ValueError("loraxs: the base weight is all zero; LoRA-XS's frozen factors come from its SVD, so "
                         "the adapter and its gradients would stay zero forever (use another method here)")
    tiny = sigma <= sigma[0] * torch.finfo(torch.float32).eps
    if tiny.any():
        warnings.warn(f"loraxs: the base weight has rank {int((~tiny).sum())} < {rank}: the rows of R for its "
                      f"{int(tiny.sum())} zero singular directions will never train", stacklevel=2)


def _loraxs_check(n: int, k: int, r: int, opts: Mapping[str, Any]) -> None:
    if opts["svd"] not in ("randomized", "exact"):
        raise ValueError(f"loraxs: option svd={opts['svd']!r}; expected 'randomized' or 'exact'")
    check_seed(opts["svd_seed"], "loraxs: option ", "svd_seed")
    if opts["svd_device"] not in ("cpu", "weight"):
        raise ValueError(f"loraxs: option svd_device={opts['svd_device']!r}; expected 'cpu' or 'weight' (the "
                         f"weight's own device)")


LORAXS = Method(
    name="loraxs",
    core="full",
    dropout_site="input",
    default_alpha=float,
    init=_loraxs_init,
    factors=lambda m: (m.loraxs_B, m.loraxs_R, m.loraxs_A.T, m.scaling),
    trainable_count=lambda n, k, r: r * r,
    frozen=("loraxs_A", "loraxs_B"),
    # svd_device="cpu": files written before the option existed computed on the CPU (README, "LoRA-XS's SVD")
    options={"svd": "randomized", "svd_seed": 0, "svd_device": "cpu"},
    check_shape=_loraxs_check,
)


# --- TLoRA (2504.18735): Δy = α · x A B C with A (K×r), C (r×N) frozen random, B (r×r) = 0, α = 1 ---

def _tlora_init(c: InitContext) -> Tensors:
    frozen = c.frozen or {"tlora_A": _kaiming_normal((c.in_features, c.rank), c.generator),
                          "tlora_C": _kaiming_normal((c.rank, c.out_features), c.generator)}
    return {
        "tlora_A": (frozen["tlora_A"], False),
        "tlora_B": (torch.zeros(c.rank, c.rank), True),
        "tlora_C": (frozen["tlora_C"], False),
        # a 1-element vector, not a 0-d tensor: FSDP2's fully_shard refuses scalar parameters
        "tlora_alpha": (torch.tensor([float(c.alpha)]), True),
    }


TLORA = Method(
    name="tlora",
    core="full",
    dropout_site="output",
    default_alpha=lambda r: 1.0,
    init=_tlora_init,
    # Δy = α (x A) B C  =  s ((x D) Cᵀ) Uᵀ  with  D = A, core = Bᵀ, U = Cᵀ
    factors=lambda m: (m.tlora_C.T, m.tlora_B.T, m.tlora_A, m.tlora_alpha),
    trainable_count=lambda n, k, r: r * r + 1,
    frozen=("tlora_A", "tlora_C"),
)


METHODS: dict[str, Method] = {m.name: m for m in (LORA, SYMLORA, LORAXS, TLORA)}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"method={name!r} is not known; expected one of {', '.join(map(repr, METHODS))}") from None


@dataclass(frozen=True)
class Recommendation:
    """The settings a method's authors used, as ``inject`` keyword arguments, and where they come from."""

    kwargs: Mapping[str, Any]
    source: str


# The papers' settings, in one place; the defaults stay PEFT-compatible (alpha = rank, no dropout):
#     peft_ops.inject(model, "tlora", 8, targets, **peft_ops.RECOMMENDED["tlora"].kwargs)
RECOMMENDED: dict[str, Recommendation] = {
    "lora": Recommendation({}, "PEFT's defaults (lora_alpha = r, so s = 1; no dropout) are ours"),
    "symlora": Recommendation({}, "no settings beyond LoRA's known to us: LoRA's defaults"),
    "loraxs": Recommendation(
        {"alpha": 16.0, "dropout": 0.0},
        "the authors' GLUE scripts: lora_alpha 16 (s = 16/r), no dropout, ranks 4-25, targets query, value, "
        "attention.output.dense and output.dense, classifier trained beside them (modules_to_save); their SVD "
        "(randomised, 10 power iterations) is matched by our default svd='randomized'"),
    "tlora": Recommendation(
        {"dropout": 0.5, "alpha": 1.0},
        "the paper and its code: dropout 0.5 on the adapter's output, the learnable α starting at 1"),
}
