"""torch.compile and the custom ops: no graph break with fullgraph=True, the eager results, and the
op registrations (schema, fake tensors, autograd) checked by torch.library.opcheck. On the CPU the
reference implementation is behind the op; on a GPU the Triton kernels are."""
import copy

import pytest
import torch
import torch._inductor.config as inductor_config

import peft_ops
import peft_ops.ops  # noqa: F401  (registers torch.ops.peft_ops.*)
from utils import DEVICE, ON_GPU, TinyModel, randn, randomize_adapters

FORWARD = torch.ops.peft_ops.adapter_forward.default
BACKWARD = torch.ops.peft_ops.adapter_backward.default
# The Triton kernels go through opcheck's fake-tensor and AOT checks only when compiled: the
# interpreter cannot run on fake tensors.
BACKENDS = ["reference", "fused", "composed", "triton"] if ON_GPU else ["reference"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _all_methods_model(dropout=0.0, methods=("lora", "symlora", "loraxs", "tlora")):
    """TinyModel with a different method on each attention projection."""
    model = TinyModel(3).to(DEVICE)
    for name, method in zip(("q_proj", "k_proj", "v_proj", "o_proj"), methods):
        peft_ops.inject(model, method, 4, target_modules=[name], dropout=dropout,
                        **({"allow_non_square": True} if method == "symlora" else {}))
    randomize_adapters(model, 0.2)
    return model


def _step(model, x, seed=0):
    torch.manual_seed(seed)
    y = model(x)
    y.square().mean().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters() if p.requires_grad}
    return y, grads


def _assert_same_step(eager, compiled, x):
    y_e, g_e = _step(eager, x)
    y_c, g_c = _step(compiled, x)
    assert torch.allclose(y_c, y_e, rtol=1e-5, atol=1e-6)
    assert g_c.keys() == g_e.keys() and all(g is not None for g in g_e.values())
    for name in g_e:
        assert torch.allclose(g_c[name], g_e[name], rtol=1e-4, atol=1e-7), name


def test_fullgraph_compile_matches_eager():
    """fullgraph=True fails on any graph break: forward and backward of all four methods compile
    whole and give the eager outputs and gradients."""
    model = _all_methods_model()
    _assert_same_step(model, torch.compile(copy.deepcopy(model), fullgraph=True), randn(6, 32, device=DEVICE))


def test_fullgraph_compile_with_dropout(monkeypatch):
    """Dropout's seed is drawn inside the graph; with Inductor's fallback RNG it is the eager draw, so
    the masks (regenerated from it in the backward) and every result agree."""
    monkeypatch.setattr(inductor_config, "fallback_random", True)
    model = _all_methods_model(dropout=0.3, methods=("loraxs", "tlora"))  # an input-side and an output-side site
    model.train()
    _assert_same_step(model, torch.compile(copy.deepcopy(model), fullgraph=True), randn(6, 32, device=DEVICE))


def _op_args(core_kind, dropout, backend, dtype=torch.float32):
    m, k, n, r = 7, 40, 24, 3
    grad = dict(device=DEVICE, requires_grad=True)
    x = randn(m, k, device=DEVICE, dtype=dtype, requires_grad=True)
    weight = randn(n, k, device=DEVICE, dtype=dtype)
    bias = randn(n, device=DEVICE, dtype=dtype, requires_grad=True)
    core = {"identity": None, "diagonal": torch.randn(r, **grad), "full": torch.randn(r, r, **grad)}[core_kind]
    seed = torch.tensor(11, device=DEVICE) if dropout else None
    return (x, weight, bias, torch.randn(n, r, **grad), core, torch.randn(k, r, **grad), torch.tensor(0.7, **grad),
            1.0, seed, 0.3 if dropout else 0.0, "output" if core_kind == "full" else "input", backend, True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("core_kind", ["identity", "diagonal", "full"])
@pytest.mark.parametrize("dropout", [False, True])
def test_opcheck_forward(core_kind, dropout, backend):
    torch.library.opcheck(FORWARD, _op_args(core_kind, dropout, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_backward(backend):
    m, k, n, r = 7, 40, 24, 3
    t = lambda *shape: randn(*shape, device=DEVICE)  # noqa: E731
    args = (t(m, n), t(m, r), t(m, k), t(n, k), t(n, r), t(r, r), t(k, r), torch.tensor(0.7, device=DEVICE), 1.0,
            torch.tensor(3, device=DEVICE), 0.3, "input", backend, [True] * 6)
    torch.library.opcheck(BACKWARD, args)


@pytest.mark.skipif(ON_GPU, reason="the interpreter only runs without a GPU here")
def test_compiling_the_interpreter_is_a_clear_error():
    model = TinyModel(3)
    peft_ops.inject(model, "loraxs", 4, target_modules=["q_proj"], backend="triton")
    with pytest.raises(Exception, match=r"backend='triton' on the CPU runs the Triton interpreter, which "
                                        r"torch.compile cannot trace"):
        torch.compile(model, fullgraph=True)(torch.randn(6, 32))
