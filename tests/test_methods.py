"""Each method's initialisation, parameter count and options, as docs/DESIGN.md §2 defines them."""
import math

import pytest
import torch
from torch import nn

import peft_ops
from peft_ops.svd import probe, top_singular_triplets
from utils import randomize_adapters


def _base(n=48, k=40, dtype=torch.float32):
    return nn.Linear(k, n, dtype=dtype)


@pytest.mark.parametrize("method", ["lora", "symlora", "tlora"])
def test_update_is_exactly_zero_at_init(method):
    layer = peft_ops.LAYER_CLASSES[method](_base(40, 40), 8)
    assert torch.count_nonzero(layer.delta_weight()) == 0
    x = torch.randn(5, 40)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_loraxs_update_is_tiny_at_init():
    layer = peft_ops.LoRAXSLinear(_base(), 8, svd="exact")
    r = layer.loraxs_R
    assert 0 < r.abs().max() < 1e-4 and abs(r.std().item() - 1e-5) < 3e-6  # N(0, σ = 1e-5)


def test_lora_init_follows_peft():
    layer = peft_ops.LoRALinear(_base(48, 400), 16)
    bound = 1 / math.sqrt(400)  # kaiming-uniform(a=√5) on A (r×K): fan_in = K
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    assert torch.count_nonzero(layer.lora_B) == 0


def test_symlora_init():
    layer = peft_ops.SymLoRALinear(_base(300, 300), 16)
    bound = 1 / math.sqrt(16)  # kaiming-uniform(a=√5) on Q (n×r): torch's fan_in = r
    assert layer.symlora_Q.shape == (300, 16)
    assert 0.9 * bound < layer.symlora_Q.abs().max() <= bound
    assert torch.count_nonzero(layer.symlora_lambda) == 0


def test_tlora_init_statistics():
    n, k, r = 600, 500, 32
    layer = peft_ops.TLoRALinear(_base(n, k), r)
    # kaiming-normal(a=√5) as torch computes fan-in: A (K×r) → fan_in = r; C (r×N) → fan_in = N
    assert layer.tlora_A.shape == (k, r) and layer.tlora_C.shape == (r, n)
    assert layer.tlora_A.std().item() == pytest.approx(1 / math.sqrt(3 * r), rel=0.03)
    assert layer.tlora_C.std().item() == pytest.approx(1 / math.sqrt(3 * n), rel=0.03)
    assert torch.count_nonzero(layer.tlora_B) == 0 and layer.tlora_alpha.item() == 1.0
    assert peft_ops.TLoRALinear(_base(n, k), r, alpha=0.5).tlora_alpha.item() == 0.5


def test_tlora_factors_depend_only_on_seed():
    a = peft_ops.TLoRALinear(_base(), 8, seed=7)
    b = peft_ops.TLoRALinear(_base(), 8, seed=7)  # another base weight, same seed
    c = peft_ops.TLoRALinear(_base(), 8, seed=8)
    assert torch.equal(a.tlora_A, b.tlora_A) and torch.equal(a.tlora_C, b.tlora_C)
    assert not torch.equal(a.tlora_A, c.tlora_A)


def test_frozen_factors_are_buffers_and_only_adapters_train():
    for method, trainable in [("lora", {"lora_A", "lora_B"}), ("symlora", {"symlora_Q", "symlora_lambda"}),
                              ("loraxs", {"loraxs_R"}), ("tlora", {"tlora_B", "tlora_alpha"})]:
        layer = peft_ops.LAYER_CLASSES[method](_base(40, 40), 4)
        assert {n for n, p in layer.named_parameters() if p.requires_grad} == trainable
        assert not any(p.requires_grad for p in layer.base_layer.parameters())
        frozen = {n for n, _ in layer.named_buffers() if not n.startswith("base_layer")}
        assert frozen == {"loraxs": {"loraxs_A", "loraxs_B"}, "tlora": {"tlora_A", "tlora_C"}}.get(method, set())


@pytest.mark.parametrize("method", list(peft_ops.METHODS))
@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)])
def test_trainable_count_formula(method, shape):
    n, k = shape
    r = 16
    expected = {"lora": r * (n + k), "symlora": r * max(n, k) + r, "loraxs": r * r, "tlora": r * r + 1}[method]
    assert peft_ops.METHODS[method].trainable_count(n, k, r) == expected


@pytest.mark.parametrize("method", list(peft_ops.METHODS))
def test_trainable_count_matches_layer(method):
    layer = peft_ops.LAYER_CLASSES[method](_base(48, 40), 8, **({"allow_non_square": True} if method == "symlora" else {}))
    assert layer.trainable_parameter_count() == peft_ops.METHODS[method].trainable_count(48, 40, 8)


def test_symlora_refuses_non_square_without_opt_in():
    with pytest.raises(ValueError, match=r"48×40.*square.*allow_non_square=True"):
        peft_ops.SymLoRALinear(_base(48, 40), 4)
    layer = peft_ops.SymLoRALinear(_base(48, 40), 4, allow_non_square=True)
    up, core, down, _ = layer.factors()
    assert up.shape == (48, 4) and down.shape == (40, 4) and core.shape == (4,)
    assert torch.equal(up[:40], down)  # the sliced form shares Q's first rows


def test_symlora_tied_factor_gets_both_gradients():
    layer = peft_ops.SymLoRALinear(_base(16, 16, torch.float64), 4, backend="reference")
    randomize_adapters(layer)
    x = torch.randn(8, 16, dtype=torch.float64)
    layer(x).square().sum().backward()
    q = layer.symlora_Q.detach().requires_grad_()
    lam = layer.symlora_lambda.detach()
    y = layer.base_layer(x) + layer.scaling * x @ (q @ torch.diag(lam) @ q.T).T
    (grad,) = torch.autograd.grad(y.square().sum(), q)
    assert torch.allclose(layer.symlora_Q.grad, grad)


def _decaying_weight(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q[:, :k]
    v = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64)).Q
    return (u * torch.logspace(0, -3, k, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "randomized"])
def test_loraxs_factors_are_the_top_svd(exact):
    w = _decaying_weight(120, 80)
    base = nn.Linear(80, 120, dtype=torch.float64)
    with torch.no_grad():
        base.weight.copy_(w)
    layer = peft_ops.LoRAXSLinear(base, 8, svd="exact" if exact else "randomized")
    up, sigma_v = layer.loraxs_B, layer.loraxs_A.T  # U_r (N×r) and V_r Σ_r (K×r)
    sig = torch.linalg.svdvals(w)[:8]
    # the randomised sketch (8 + 10 columns, 4 power iterations) on a spectrum decaying 8% per step
    rtol, atol = (1e-10, 1e-10) if exact else (1e-6, 1e-4)
    assert torch.allclose(up.T @ up, torch.eye(8, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(sigma_v.norm(dim=0), sig, rtol=rtol)
    # U_r Σ_r V_rᵀ is the best rank-8 approximation of W
    assert torch.allclose(up @ sigma_v.T, _best_rank(w, 8), atol=atol)
    # sign convention: each column projects positively on a fixed probe
    assert (probe(120) @ up > 0).all()


def test_loraxs_signs_survive_rounding_the_weight_to_bfloat16():
    """The bf16 copy of a base regenerates the same factors up to its rounding, signs included (a
    largest-entry sign rule flipped columns, and an adapter file refused its own base in bf16)."""
    w = _decaying_weight(256, 192)
    u, s, v = top_singular_triplets(w, 16)
    u16, s16, v16 = top_singular_triplets(w.to(torch.bfloat16), 16)
    assert ((u16 * u).sum(0) > 0.99).all() and ((v16 * v).sum(0) > 0.99).all()  # cosines: no column flipped
    assert torch.allclose(s16, s, rtol=1e-2)


def _best_rank(w, r):
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :r] * s[:r] @ vh[:r]


def test_randomized_svd_is_deterministic_and_seeded():
    w = torch.randn(200, 150)
    a = top_singular_triplets(w, 16)
    b = top_singular_triplets(w.clone(), 16)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], top_singular_triplets(w, 16, seed=1)[0])  # the sketch is seeded
