"""The reference path against each paper's own formula, in float64, and gradcheck of every method."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

import peft_ops
from peft_ops import reference
from peft_ops.svd import probe
from utils import randomize_adapters, rel_error

N, K, R, ALPHA = 12, 12, 4, 6.0


def _layer(method, n=N, k=K, **options):
    base = nn.Linear(k, n, dtype=torch.float64)
    layer = peft_ops.LAYER_CLASSES[method](base, R, alpha=ALPHA, backend="reference", **options)
    randomize_adapters(layer)
    return layer


def _paper_delta_y(method, layer, x):
    """Each method's update written as its paper writes it, from the stored tensors."""
    s = ALPHA / R
    if method == "lora":  # s · B A x
        return s * x @ layer.lora_A.T @ layer.lora_B.T
    if method == "symlora":  # s · Q diag(λ) Qᵀ x  (sliced: Q[:N] diag(λ) Q[:K]ᵀ)
        q, lam = layer.symlora_Q, layer.symlora_lambda
        return s * x @ (q[: layer.out_features] @ torch.diag(lam) @ q[: layer.in_features].T).T
    if method == "loraxs":  # s · U_r R Σ_r V_rᵀ x with the SVD of W recomputed here
        u, sig, vh = torch.linalg.svd(layer.base_layer.weight.detach())
        u, sig, v = u[:, :R], sig[:R], vh[:R].T
        flip = torch.where(probe(u.shape[0]) @ u < 0, -1.0, 1.0).to(u.dtype)  # the sign convention
        u, v = u * flip, v * flip
        return s * x @ (u @ layer.loraxs_R @ torch.diag(sig) @ v.T).T
    if method == "tlora":  # α · x A B C
        return layer.tlora_alpha * x @ layer.tlora_A @ layer.tlora_B @ layer.tlora_C
    raise AssertionError(method)


@pytest.mark.parametrize("method", list(peft_ops.METHODS))
@pytest.mark.parametrize("shape", [(N, K), (7, 12), (12, 7)], ids=["square", "wide", "tall"])
def test_reference_matches_paper_formula(method, shape):
    n, k = shape
    options = {"allow_non_square": True} if method == "symlora" and n != k else {}
    if method == "loraxs":
        options["svd"] = "exact"
    layer = _layer(method, n, k, **options)
    x = torch.randn(3, 5, k, dtype=torch.float64)
    expected = layer.base_layer(x) + _paper_delta_y(method, layer, x)
    assert rel_error(layer(x), expected) < 1e-12


@pytest.mark.parametrize("method", list(peft_ops.METHODS))
def test_delta_weight_matches_forward(method):
    layer = _layer(method, **({"allow_non_square": True} if method == "symlora" else {}))
    x = torch.randn(6, K, dtype=torch.float64)
    assert rel_error(layer.base_layer(x) + x @ layer.delta_weight().T, layer(x)) < 1e-12


@pytest.mark.parametrize("method", list(peft_ops.METHODS))
@pytest.mark.parametrize("shape", [(N, K), (9, 12)], ids=["square", "non-square"])
def test_gradcheck(method, shape):
    """The custom op's hand-written backward (shared by both backends) against finite differences: x,
    every trainable tensor, and a bias made trainable."""
    n, k = shape
    if method == "symlora" and n != k:
        layer = _layer(method, n, k, allow_non_square=True)
    else:
        layer = _layer(method, n, k)
    layer.base_layer.bias.requires_grad_(True)
    names = [name for name, p in layer.named_parameters() if p.requires_grad]
    assert "base_layer.bias" in names
    params = [layer.get_parameter(name).detach().clone().requires_grad_() for name in names]
    x = torch.randn(2, 3, k, dtype=torch.float64, requires_grad=True)

    def f(x, *values):
        return functional_call(layer, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("site", ["input", "output"])
def test_reference_dropout_uses_given_mask(site):
    x = torch.randn(5, K, dtype=torch.float64)
    w, b = torch.randn(N, K, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    up, down, core = (torch.randn(N, R, dtype=torch.float64), torch.randn(K, R, dtype=torch.float64),
                      torch.randn(R, R, dtype=torch.float64))
    p = 0.25
    mask = torch.rand(5, K if site == "input" else N) > p
    y = reference.oracle(x, w, b, up, core, down, 0.5, dropout_p=p, dropout_site=site, dropout_mask=mask)
    if site == "input":
        expected = x @ w.T + b + 0.5 * ((x * mask / (1 - p)) @ down @ core.T) @ up.T
    else:
        expected = x @ w.T + b + (0.5 * (x @ down @ core.T) @ up.T) * mask / (1 - p)
    assert rel_error(y, expected) < 1e-12


def test_module_dropout_only_in_training():
    layer = _layer("lora")
    layer.dropout = 0.5
    x = torch.randn(64, K, dtype=torch.float64)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("method", list(peft_ops.METHODS))
def test_reference_backend_dropout_is_the_oracles_with_the_same_mask(method):
    """The CPU default path (the op over reference_kernels) drops, and rescales, exactly as the oracle
    does when fed the mask for the same seed."""
    from peft_ops import reference_kernels
    from peft_ops.ops import adapted_linear

    layer = _layer(method, **({"allow_non_square": True} if method == "symlora" else {}))
    x = torch.randn(20, K, dtype=torch.float64, requires_grad=True)
    up, core, down, scale = layer.factors()
    site = layer.method.dropout_site
    y = adapted_linear(x, layer.base_layer.weight, layer.base_layer.bias, up, core, down, scale, dropout_p=0.4,
                       dropout_site=site, backend="reference", seed=99)
    mask = reference_kernels.dropout_mask(99, 20, K if site == "input" else N, 0.4, "cpu")
    expected = reference.oracle(x, layer.base_layer.weight, layer.base_layer.bias, up, core, down, scale,
                                dropout_p=0.4, dropout_site=site, dropout_mask=mask)
    assert rel_error(y, expected) < 1e-12
    unmasked = reference.oracle(x, layer.base_layer.weight, layer.base_layer.bias, up, core, down, scale)
    assert rel_error(y, unmasked) > 1e-3  # the mask did something
    (gy,) = torch.autograd.grad(y.sum(), x)
    (ge,) = torch.autograd.grad(expected.sum(), x)
    assert rel_error(gy, ge) < 1e-12
