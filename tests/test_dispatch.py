"""The dispatcher: the choice between the fused GEMM and the cuBLAS composition, forced, by the fixed rule,
and by timing (a fake timer on the CPU); dropout on both. (Every forward and backward test of
test_fused_forward.py and test_fused_backward.py runs on both implementations.)"""
import dataclasses
import errno
import json
import os
import stat
import threading

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


@pytest.mark.parametrize("wide_gemm, choice", [(True, "composed"), (False, "fused")])
def test_the_rule_keeps_16_bit_inputs_fused_without_a_float32_output_gemm(monkeypatch, wide_gemm, choice):
    """Without cuBLAS's float32 output (torch < 2.8) the composition's GEMM would run on float32 copies."""
    monkeypatch.setattr(dispatch, "FLOAT32_OUTPUT_GEMM", wide_gemm)
    key = dispatch.Key(64, 90, 70, 16, "bfloat16", "none", False, "forward")
    assert dispatch.rule(key) == choice
    assert dispatch.rule(dataclasses.replace(key, dtype="float32")) == "composed"
    assert dispatch.rule(dataclasses.replace(key, m_bucket=16)) == "fused"


def test_a_traced_call_records_no_rule_decision(monkeypatch):
    """Under tracing the rule answers, but an eager call afterwards may still measure."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    key = dispatch.Key(32, 90, 70, 16, "float32", "none", True, "forward")
    assert dispatch.choose(key, {}, torch.device("cpu")) == "composed" and peft_ops.decisions() == []


# The disk cache is input from outside (another version, another tool, a broken disk): nothing in it may
# fail a forward or a backward, and only what this version could have written is kept.
CPU = torch.device("cpu")
KEY = dispatch.Key(32, 90, 70, 16, "float32", "none", True, "forward")  # the rule says composed
CANDIDATES = {name: (lambda name=name: name) for name in dispatch.IMPLEMENTATIONS}  # each returns its name


def _row(choice="fused", fused_ms=1.0, **key_fields):
    """A disk-cache row as written by _save_disk: KEY with ``key_fields`` changed."""
    return {"key": dataclasses.asdict(KEY) | key_fields, "choice": choice, "reason": "measured", "fused_ms": fused_ms,
            "composed_ms": 2.0}


GOOD_ROW = _row()
BAD_ROWS = {
    "unknown choice": _row("splitk", n=91), "null choice": _row(None, n=91), "int choice": _row(123, n=91),
    "choice in capitals": _row("FUSED", n=91),
    "missing field": {**GOOD_ROW, "key": {k: v for k, v in GOOD_ROW["key"].items() if k != "role"}},
    "extra field": _row(split_k=4), "bool for an int": _row(m_bucket=True), "zero size": _row(k=0),
    "string for a bool": _row(bias="yes"), "unknown role": _row(role="dw"), "unknown dropout": _row(dropout="both"),
    "NaN time": _row(fused_ms=float("nan"), n=91), "negative time": _row(fused_ms=-1.0, n=91),
    "string time": _row(fused_ms="1.0", n=91), "row not an object": "row",
}


@pytest.fixture
def cache_path(monkeypatch, tmp_path):
    """The CPU's cache file, under ``tmp_path``."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    return dispatch._cache_path(CPU)


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


@pytest.fixture
def measuring(monkeypatch):
    """Timing switched on for the CPU, with a timer that answers by the candidate's name (fused is faster)."""
    monkeypatch.setattr(dispatch, "_measuring_allowed", lambda device: True)
    monkeypatch.setattr(dispatch, "TIMER", lambda fn: {"fused": 1.0, "composed": 2.0}[fn()])


@pytest.mark.parametrize("bad_row", BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_bad_rows_are_ignored_and_good_ones_beside_them_kept(cache_path, bad_row):
    _write(cache_path, json.dumps([bad_row, GOOD_ROW, bad_row]))
    assert dispatch.choose(KEY, {}, CPU) == "fused"  # the good row's choice, not the rule's
    assert peft_ops.decisions() == [{**GOOD_ROW["key"], "choice": "fused", "reason": "measured (from the disk cache)",
                                     "fused_ms": 1.0, "composed_ms": 2.0}]


FILES_IGNORED = {
    "deep nesting": "[" * 100_000,  # the parser's recursion overflows
    "too large": json.dumps([GOOD_ROW]) + " " * dispatch.CACHE_MAX_BYTES,
    "not a list": json.dumps({"rows": [GOOD_ROW]}),  # (ignored before this test too, by luck)
}


@pytest.mark.parametrize("text", FILES_IGNORED.values(), ids=FILES_IGNORED.keys())
def test_a_file_that_is_not_a_small_list_of_rows_is_ignored(cache_path, text):
    _write(cache_path, text)
    assert dispatch.choose(KEY, {}, CPU) == "composed"
    assert [d["reason"] for d in peft_ops.decisions()] == ["rule"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_fifo_at_the_cache_path_is_not_waited_on(cache_path):
    os.makedirs(os.path.dirname(cache_path))
    os.mkfifo(cache_path)
    chosen = []
    reader = threading.Thread(target=lambda: chosen.append(dispatch.choose(KEY, {}, CPU)), daemon=True)
    reader.start()
    reader.join(timeout=10)
    waited = reader.is_alive()
    if waited:  # a writer's open releases a reader blocked in open(), so the test process can end
        os.close(os.open(cache_path, os.O_WRONLY | os.O_NONBLOCK))
        reader.join()
    assert not waited and chosen == ["composed"]


def test_the_file_name_carries_the_versions_sanitised(cache_path, monkeypatch):
    import triton

    versions = f"peft_ops{peft_ops.__version__}-torch{torch.__version__}-triton{triton.__version__}"
    assert os.path.basename(cache_path) == f"dispatch-cpu-{versions}.json"
    monkeypatch.setattr(torch, "__version__", "9.9 local/build")  # nothing but a file name's characters
    assert os.path.basename(dispatch._cache_path(CPU)) == \
        f"dispatch-cpu-peft_ops{peft_ops.__version__}-torch9.9_local_build-triton{triton.__version__}.json"


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failed_write_leaves_no_file_and_raises_nothing(cache_path, measuring, monkeypatch, failing):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, failing, disk_full)
    assert dispatch.choose(KEY, CANDIDATES, CPU) == "fused"  # measured, and kept for this process
    assert os.listdir(os.path.dirname(cache_path)) == []


def test_the_written_file_has_the_umask_permissions(cache_path, measuring):
    umask = os.umask(0o022)
    try:
        dispatch.choose(KEY, CANDIDATES, CPU)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(cache_path).st_mode) == 0o644
    dispatch.clear_decisions()  # and it reads back
    assert dispatch.choose(KEY, {}, CPU) == "fused" and peft_ops.decisions()[0]["reason"].endswith("disk cache)")


def test_a_poisoned_cache_fails_no_forward_or_backward(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    layer, ref = make_pair("lora", 90, 70, 3, torch.float32, backend="triton")
    x = randn(40, 70, device=DEVICE, requires_grad=True)
    layer(x).sum().backward()  # the rule's decisions name the call's keys, forward and dx
    key_fields = [field.name for field in dataclasses.fields(dispatch.Key)]
    rows = [{"key": {k: d[k] for k in key_fields}, "choice": "splitk"} for d in peft_ops.decisions()]
    assert {row["key"]["role"] for row in rows} == {"forward", "dx"}
    _write(dispatch._cache_path(DEVICE), json.dumps(rows))
    dispatch.clear_decisions()
    _check_grads(_backward(layer, x, x.new_ones(40, 90)), _backward(ref, x.double(), x.new_ones(40, 90).double()),
                 TOLERANCE[torch.float32])


def test_the_rule_takes_a_quantized_weight_composed_and_keys_it_by_format():
    """Without timing a quantized weight goes composed at every M (QLoRA's own base product: never slower
    than QLoRA); its key names the format, so a measured choice for a dense weight of the same shape is not
    reused; cache rows written before the field was added read as dense."""
    dense = dispatch.Key(1, 90, 64, 16, "bfloat16", "none", False, "forward")
    nf4 = dataclasses.replace(dense, weight="nf4+dq")
    assert dispatch.rule(dense) == "fused" and dispatch.rule(nf4) == "composed" and dense != nf4
    old_row = dataclasses.asdict(dense)
    del old_row["weight"]
    assert dispatch.Key.from_json(old_row) == dense
    assert dispatch.Key.from_json(dataclasses.asdict(nf4)) == nf4
    assert dispatch.Key.from_json({**dataclasses.asdict(nf4), "weight": 4}) is None
