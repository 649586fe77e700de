"""The dispatcher: the choice between the fused GEMM and the cuBLAS composition, forced, by the fixed rule,
and by timing (a fake timer on the CPU); dropout on both. (Every forward and backward test of
test_fused_forward.py and test_fused_backward.py runs on both implementations.)"""
import pytest
import torch

import peft_ops
from peft_ops import dispatch, kernels, reference
from test_fused_backward import _backward, _check_grads, _trainable
from test_fused_forward import make_pair
from utils import DEVICE, TOLERANCE, randn, rel_error

METHODS = list(peft_ops.METHODS)
pytestmark = pytest.mark.usefixtures("poisoned")


@pytest.fixture(autouse=True)
def _no_decisions():
    dispatch.clear_decisions()
    yield
    dispatch.clear_decisions()


@pytest.fixture
def calls(monkeypatch):
    """Counts of each implementation's runs (the real functions still run)."""
    counts = {"fused": 0, "composed": 0}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(kernels, "lowrank_linear", spy("fused", kernels.lowrank_linear))
    monkeypatch.setattr(dispatch, "composed_lowrank_linear", spy("composed", dispatch.composed_lowrank_linear))
    return counts


@pytest.mark.parametrize("backend", dispatch.IMPLEMENTATIONS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("m", [1, 40])
def test_a_forced_implementation_runs_alone(backend, method, m, calls):
    """The forward and backward tests of every dtype and shape run on both (test_fused_forward.py,
    test_fused_backward.py); here: forcing one runs only that one, forward and dx."""
    dtype = torch.float32
    layer, ref = make_pair(method, 90, 70, 3, dtype, backend=backend)
    x, grad = randn(m, 70, device=DEVICE, dtype=dtype), randn(m, 90, device=DEVICE, dtype=dtype)
    assert rel_error(layer(x), ref(x.double())) < TOLERANCE[dtype]
    _check_grads(_backward(layer, x, grad), _backward(ref, x.double(), grad.double()), TOLERANCE[dtype])
    assert calls[backend] == 3 and sum(calls.values()) == 3  # forward twice, dx once: only the forced one


@pytest.mark.parametrize("backend", dispatch.IMPLEMENTATIONS)
@pytest.mark.parametrize("method", ["loraxs", "tlora"])  # dropout on the adapter's input, on its output
def test_each_implementation_with_dropout(backend, method):
    """Same masks as the fused kernel, regenerated in the backward."""
    layer, ref = make_pair(method, 90, 70, 4, torch.float32)
    site, p, seed = layer.method.dropout_site, 0.3, 4321
    x, grad = randn(33, 70, device=DEVICE), randn(33, 90, device=DEVICE)
    mask = kernels.dropout_mask(seed, 33, 70 if site == "input" else 90, p, DEVICE)

    def run(lay, x, forward):
        x = x.detach().requires_grad_()
        u, c, d, s = lay.factors()
        forward(x, lay.base_layer.weight, lay.base_layer.bias, u, c, d, s).backward(grad.to(x.dtype))
        return {"x": x.grad, **{n: t.grad for n, t in _trainable(lay).items()}}

    got = run(layer, x, lambda *a: peft_ops.adapted_linear(*a, dropout_p=p, dropout_site=site, seed=seed,
                                                           backend=backend))
    expected = run(ref, x.double(), lambda *a: reference.oracle(*a, dropout_p=p, dropout_site=site, dropout_mask=mask))
    _check_grads(got, expected, TOLERANCE[torch.float32])


def test_implementations_agree_on_the_adapter_gradient():
    """Both save t = x D and reduce the core's gradient with the same kernels: only the order of the
    shrink's float32 sums may differ between them."""
    grads = {}
    for backend in dispatch.IMPLEMENTATIONS:
        torch.manual_seed(0)
        layer, _ = make_pair("loraxs", 90, 70, 4, torch.float32)
        layer.backend = backend
        x = randn(40, 70, device=DEVICE)
        layer(x).backward(randn(40, 90, device=DEVICE))
        grads[backend] = layer.loraxs_R.grad
    assert rel_error(grads["fused"], grads["composed"]) < 1e-5


def test_the_rule_without_timing(calls):
    """No timing here (the interpreter; PEFT_OPS_AUTOTUNE=0 on a GPU): fused up to 16 rows, composed above."""
    layer, _ = make_pair("tlora", 90, 70, 3, torch.float32)
    with torch.no_grad():
        layer(randn(16, 70, device=DEVICE))
        assert calls == {"fused": 1, "composed": 0}
        layer(randn(17, 70, device=DEVICE))
        assert calls == {"fused": 1, "composed": 1}
    table = peft_ops.decisions()
    assert [(d["m_bucket"], d["choice"], d["reason"]) for d in table] == [(16, "fused", "rule"), (32, "composed", "rule")]
    assert table[0] | {"m_bucket": 0} == table[1] | {"m_bucket": 0, "choice": "fused"}  # the other fields agree
    assert {d["n"] for d in table} == {90} and {d["role"] for d in table} == {"forward"}


@pytest.fixture
def timing(monkeypatch, tmp_path, calls):
    """Timing switched on, with a fake timer that runs the candidate once, tells which implementation it
    was by the ``calls`` spies, and answers ``times[name]`` ms (composed 1, fused 2 unless changed)."""
    monkeypatch.setattr(dispatch, "_measuring_allowed", lambda device: True)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    times, timed = {"fused": 2.0, "composed": 1.0}, []

    def fake_timer(fn):
        before = dict(calls)
        fn()
        name = next(n for n in calls if calls[n] != before[n])
        timed.append(name)
        return times[name]

    monkeypatch.setattr(dispatch, "TIMER", fake_timer)
    return times, timed


def test_timed_choice_is_measured_once_kept_and_written_to_disk(timing):
    times, timed = timing
    layer, _ = make_pair("loraxs", 90, 70, 3, torch.float32)
    x = randn(40, 70, device=DEVICE)
    with torch.no_grad():
        layer(x)
        assert sorted(timed) == ["composed", "fused"]  # each candidate timed once, on the call's own arguments
        layer(x)
    assert len(timed) == 2  # nothing timed again
    (decision,) = peft_ops.decisions()
    assert (decision["choice"], decision["reason"], decision["fused_ms"], decision["composed_ms"]) == \
        ("composed", "measured", 2.0, 1.0)
    # a new process (here: forgotten decisions) reads the disk cache instead of timing again
    dispatch.clear_decisions()
    times.update(fused=0.5)
    with torch.no_grad():
        layer(x)
    assert len(timed) == 2
    (decision,) = peft_ops.decisions()
    assert (decision["choice"], decision["reason"]) == ("composed", "measured (from the disk cache)")


def test_timed_choice_follows_the_timer(timing):
    times, _ = timing
    times.update(fused=0.5)
    layer, _ = make_pair("lora", 90, 70, 3, torch.float32)
    x = randn(40, 70, device=DEVICE, requires_grad=True)
    layer(x).sum().backward()
    table = {d["role"]: d for d in peft_ops.decisions()}
    assert table.keys() == {"forward", "dx"}  # the backward's dx is its own key
    assert all(d["choice"] == "fused" and d["reason"] == "measured" for d in table.values())
    assert table["dx"]["n"] == 70 and table["dx"]["k"] == 90  # roles swapped: dx = g W


def test_forced_backends_bypass_the_table(timing, calls):
    layer, _ = make_pair("lora", 90, 70, 3, torch.float32)
    for backend in dispatch.IMPLEMENTATIONS:
        layer.backend = backend
        with torch.no_grad():
            layer(randn(40, 70, device=DEVICE))
    assert calls == {"fused": 1, "composed": 1} and peft_ops.decisions() == [] and timing[1] == []


def test_nothing_is_timed_while_tracing_or_capturing(monkeypatch):
    import peft_ops.kernels._config as config

    monkeypatch.setattr(config, "AUTOTUNE", True)
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not dispatch._measuring_allowed(cuda)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not dispatch._measuring_allowed(cuda)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert dispatch._measuring_allowed(cuda)
    assert not dispatch._measuring_allowed(torch.device("cpu"))
    monkeypatch.setattr(config, "AUTOTUNE", False)  # PEFT_OPS_AUTOTUNE=0
    assert not dispatch._measuring_allowed(cuda)


def test_a_traced_call_records_no_rule_decision(monkeypatch):
    """Under tracing the rule answers, but an eager call afterwards may still measure."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    key = dispatch.Key(32, 90, 70, 16, "float32", "none", True, "forward")
    assert dispatch.choose(key, {}, torch.device("cpu")) == "composed" and peft_ops.decisions() == []
