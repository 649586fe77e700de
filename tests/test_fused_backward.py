"""The fused backward against the float64 reference's autograd: every gradient of every method, with
and without dropout, what is saved for backward, determinism, and skipped work."""
import functools

import pytest
import torch

import peft_ops
from peft_ops import kernels, reference
from peft_ops.ops import adapted_linear
from test_fused_forward import IMPLEMENTATIONS, PATH_SHAPES, make_pair
from utils import DEVICE, DTYPES, TOLERANCE, TinyModel, method_options, randn, rel_error

METHODS = list(peft_ops.METHODS)
pytestmark = pytest.mark.usefixtures("poisoned")


def _trainable(layer):
    return {n: p for n, p in layer.named_parameters() if p.requires_grad}


def _backward(layer, x, grad):
    """Gradients of ``(layer(x) * grad).sum()`` for x and every trainable tensor."""
    x = x.detach().requires_grad_()
    layer.zero_grad(set_to_none=True)
    layer(x).backward(grad)
    return {"x": x.grad, **{n: p.grad for n, p in _trainable(layer).items()}}


# A one-element gradient (TLoRA's scale) is one sum of M·N products that cancel, rounded to the 16-bit
# parameter's dtype: its relative error is heavy-tailed. Measured in bf16 (M = 5, 88×72, rank 4, dropout
# 0.3) over 40 seeds: median 0.26%, 4 of 40 above 1%, largest 7.7%, with either dropout-mask scheme. A
# wrong scale (1/(1 - p) missing: 43%) still fails.
SCALAR_TOLERANCE_16BIT = 0.1


def _check_grads(grads, expected, tol):
    assert grads.keys() == expected.keys()
    for name in grads:
        assert grads[name] is not None, name
        sixteen_bit = tol >= TOLERANCE[torch.float16]  # the computation's tolerance says its dtype
        limit = SCALAR_TOLERANCE_16BIT if grads[name].numel() == 1 and sixteen_bit else tol
        assert rel_error(grads[name], expected[name]) < limit, (name, rel_error(grads[name], expected[name]))


@pytest.mark.parametrize("backend", IMPLEMENTATIONS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [0, 1, 17, 300])
def test_gradients(backend, method, dtype, m):
    layer, ref = make_pair(method, 90, 70, 3, dtype, backend=backend)
    x = randn(m, 70, device=DEVICE, dtype=dtype)
    grad = randn(m, 90, device=DEVICE, dtype=dtype)
    _check_grads(_backward(layer, x, grad), _backward(ref, x.double(), grad.double()), TOLERANCE[dtype])


def _check_gradients_with_dropout(method, dtype, m, x_grad, n=90, k=70, backend="triton"):
    """The backward regenerates the forward's mask; the reference is fed that mask."""
    layer, ref = make_pair(method, n, k, 4, dtype)
    site, p, seed = layer.method.dropout_site, 0.3, 4321
    x = randn(m, k, device=DEVICE, dtype=dtype)
    grad = randn(m, n, device=DEVICE, dtype=dtype)
    mask = kernels.dropout_mask(seed, m, k if site == "input" else n, p, DEVICE)

    def run(lay, x, forward):
        x = x.detach().requires_grad_(x_grad)
        u, c, d, s = lay.factors()
        w, b = lay.base_layer.weight, lay.base_layer.bias
        forward(x, w, b, u, c, d, s).backward(grad.to(x.dtype))
        return {**({"x": x.grad} if x_grad else {}), **{n: t.grad for n, t in _trainable(lay).items()}}

    fused = run(layer, x, lambda *a: adapted_linear(*a, dropout_p=p, dropout_site=site, seed=seed, backend=backend))
    expected = run(ref, x.double(), lambda *a: reference.oracle(
        *a, dropout_p=p, dropout_site=site, dropout_mask=mask))
    _check_grads(fused, expected, TOLERANCE[dtype])


@pytest.mark.parametrize("backend", IMPLEMENTATIONS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m, x_grad", [(17, True), (300, True), (40, False)], ids=["17", "300", "no-dx"])
def test_gradients_with_dropout(backend, method, dtype, m, x_grad):
    """Without dx, v = drop(g) U comes from the shrink kernel instead of the dx GEMM."""
    _check_gradients_with_dropout(method, dtype, m, x_grad, backend=backend)


@pytest.fixture(params=kernels.GEMM_PATHS)
def gemm_path(request, monkeypatch):
    """Every fused GEMM of the layer on one path (under the interpreter the launcher picks "pointer")."""
    monkeypatch.setattr(kernels, "lowrank_linear", functools.partial(kernels.lowrank_linear, path=request.param))
    return request.param


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("m, dtype", [(5, torch.bfloat16), (130, torch.float32)], ids=["5-bfloat16", "130-float32"])
def test_gradients_on_both_gemm_paths(gemm_path, method, m, dtype):
    """Forward and backward (dx with the transposed weight) with dropout, every GEMM forced on one path;
    shapes whose rows the descriptor path can describe."""
    n, k = PATH_SHAPES[gemm_path]
    _check_gradients_with_dropout(method, dtype, m, True, n, k)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_leading_dims_and_non_contiguous(method):
    layer, ref = make_pair(method, 90, 70, 5, torch.float32)
    for x in (randn(2, 9, 70, device=DEVICE), randn(70, 21, device=DEVICE).T,
              randn(3, 70, 7, device=DEVICE).transpose(1, 2)):
        grad = randn(*x.shape[:-1], 90, device=DEVICE).transpose(0, -1).contiguous().transpose(0, -1)
        _check_grads(_backward(layer, x, grad), _backward(ref, x.double(), grad.double()), TOLERANCE[torch.float32])


@pytest.mark.parametrize("rank", [1, 64, 256])
def test_gradients_at_extreme_ranks(rank):
    layer, ref = make_pair("loraxs", 300, 270, rank, torch.float32, adapter_scale=3.0 if rank == 1 else 0.5)
    x = randn(40, 270, device=DEVICE)
    grad = randn(40, 300, device=DEVICE)
    _check_grads(_backward(layer, x, grad), _backward(ref, x.double(), grad.double()), TOLERANCE[torch.float32])


def _saved_activation_elements(layer, x):
    """Elements of the tensors autograd saves during ``layer(x)``, leaving out parameters and buffers."""
    owned = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in owned:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    return sum(t.numel() for t in saved), saved


@pytest.mark.parametrize("method, rank, dropout", [("loraxs", 4, 0.0), ("tlora", 4, 0.0), ("loraxs", 16, 0.3),
                                                   ("tlora", 16, 0.3)])
def test_frozen_down_factor_saves_only_t(method, rank, dropout):
    m, k = 300, 70
    layer, _ = make_pair(method, 90, k, rank, torch.bfloat16, dropout=dropout)
    x = randn(m, k, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    elements, saved = _saved_activation_elements(layer, x)
    assert elements <= m * rank + rank * rank, [tuple(t.shape) for t in saved]  # no mask, no x
    assert any(t.shape == (m, rank) for t in saved)  # t itself, not x (m × k)


@pytest.mark.parametrize("method, keeps_x", [("loraxs", False), ("tlora", False), ("lora", True), ("symlora", True)])
def test_input_is_released_after_the_forward(method, keeps_x):
    """Nothing keeps x alive past the forward unless dD needs it: not saved_tensors, and not anything
    else the op might hold (which saved_tensors_hooks would not see)."""
    import weakref

    layer, _ = make_pair(method, 90, 70, 4, torch.float32, dropout=0.2)
    leaf = randn(40, 70, device=DEVICE, requires_grad=True)
    x = leaf * 2  # not a leaf: only the graph could keep it
    alive = weakref.ref(x)
    y = layer(x)
    del x
    assert (alive() is not None) == keeps_x
    y.sum().backward()
    assert leaf.grad is not None


def test_trainable_down_factor_also_saves_x():
    m, k, rank = 300, 70, 4
    layer, _ = make_pair("lora", 90, k, rank, torch.bfloat16)
    x = randn(m, k, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    elements, _ = _saved_activation_elements(layer, x)
    assert elements == m * rank + m * k  # t, and x for dD


@pytest.mark.parametrize("method", METHODS)
def test_backward_is_bitwise_deterministic(method):
    layer, _ = make_pair(method, 90, 70, 8, torch.bfloat16)
    layer.dropout = 0.2
    x = randn(130, 70, device=DEVICE, dtype=torch.bfloat16)
    grad = randn(130, 90, device=DEVICE, dtype=torch.bfloat16)
    first, second = [], []
    for out in (first, second):
        torch.manual_seed(11)  # the same dropout seed
        out.append(_backward(layer, x, grad))
    for name in first[0]:
        assert torch.equal(first[0][name], second[0][name]), name


def _count_launches(monkeypatch):
    calls = {"lowrank_linear": 0, "shrink": 0, "rank_reduce": 0}
    for name in calls:
        original = getattr(kernels, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counted)
    return calls


def test_no_dx_when_input_needs_no_grad(monkeypatch):
    layer, ref = make_pair("loraxs", 90, 70, 4, torch.float32)
    layer.backend = "fused"  # launches counted for the fused GEMM (the composition launches others)
    x = randn(33, 70, device=DEVICE)
    grad = randn(33, 90, device=DEVICE)
    calls = _count_launches(monkeypatch)
    layer(x).backward(grad)  # x does not require grad
    assert calls == {"lowrank_linear": 1, "shrink": 1, "rank_reduce": 1}  # forward GEMM, v, P = vᵀt
    ref(x.double()).backward(grad.double())
    assert rel_error(layer.loraxs_R.grad, ref.loraxs_R.grad) < TOLERANCE[torch.float32]


def test_frozen_factor_gets_no_gradient_work(monkeypatch):
    layer, ref = make_pair("lora", 90, 70, 4, torch.float32)
    layer.backend = "fused"
    layer.lora_A.requires_grad_(False)
    ref.lora_A.requires_grad_(False)
    x = randn(33, 70, device=DEVICE, requires_grad=True)
    grad = randn(33, 90, device=DEVICE)
    calls = _count_launches(monkeypatch)
    layer(x).backward(grad)
    assert calls == {"lowrank_linear": 2, "shrink": 0, "rank_reduce": 1}  # forward, dx; dU only
    assert layer.lora_A.grad is None
    ref(x.detach().double()).backward(grad.double())
    assert rel_error(layer.lora_B.grad, ref.lora_B.grad) < TOLERANCE[torch.float32]


def test_gradients_accumulate():
    layer, _ = make_pair("symlora", 90, 70, 4, torch.float32)
    x = randn(20, 70, device=DEVICE)
    layer(x).sum().backward()
    once = {n: p.grad.clone() for n, p in _trainable(layer).items()}
    layer(x).sum().backward()
    for name, p in _trainable(layer).items():
        assert torch.allclose(p.grad, 2 * once[name], rtol=1e-6)


def test_double_backward_is_refused():
    layer, _ = make_pair("tlora", 90, 70, 4, torch.float32)
    x = randn(5, 70, device=DEVICE, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="do not support double backward"):
        gx.sum().backward()


def test_trainable_bias_gets_its_gradient():
    layer, ref = make_pair("tlora", 90, 70, 4, torch.float32)
    layer.base_layer.bias.requires_grad_(True)
    ref.base_layer.bias.requires_grad_(True)
    x = randn(25, 70, device=DEVICE)
    grad = randn(25, 90, device=DEVICE)
    layer(x).backward(grad)
    ref(x.double()).backward(grad.double())
    assert rel_error(layer.base_layer.bias.grad, ref.base_layer.bias.grad) < 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_training_matches_reference_backend(method):
    """A few optimizer steps through the fused kernels follow the reference backend's loss curve."""
    x = torch.randn(48, 32, generator=torch.Generator().manual_seed(0)).to(DEVICE)

    def train(backend):
        model = TinyModel(3).to(DEVICE)
        peft_ops.inject(model, method, 4, target_modules=["q_proj", "o_proj"], backend=backend,
                        **method_options(method))
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(5):
            loss = (model(x) - 1.0).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    fused, expected = train("triton"), train("reference")
    assert expected[-1] < expected[0]
    for a, b in zip(fused, expected):
        assert abs(a - b) <= 1e-4 * abs(b), (fused, expected)


def test_no_kernel_uses_atomics():
    """Gradients are reduced in fixed chunks and summed in a fixed order. The interpreter runs programs
    one at a time, so only the source can show that no atomic (order-dependent) update is used."""
    import inspect

    from peft_ops.kernels import dropout, fused_linear, reductions

    for module in (fused_linear, reductions, dropout):
        assert "tl.atomic" not in inspect.getsource(module), module.__name__


def test_tlora_drops_whole_output_elements():
    """TLoRA's dropout is on the adapter's output, the others' on its input: with the adapter's output
    dropped, whole elements of the adapter's term are exactly zero (a zero base leaves only that term)."""
    for method, site in (("lora", "input"), ("symlora", "input"), ("loraxs", "input"), ("tlora", "output")):
        assert peft_ops.METHODS[method].dropout_site == site
        layer, _ = make_pair(method, 90, 70, 4, torch.float32, dropout=0.5)
        with torch.no_grad():
            layer.base_layer.weight.zero_()
            layer.base_layer.bias.zero_()
        zero_fraction = (layer(randn(30, 70, device=DEVICE)) == 0).float().mean().item()
        assert (0.4 < zero_fraction < 0.6) if site == "output" else zero_fraction < 0.01, (method, zero_fraction)
