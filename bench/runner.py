"""``python -m bench``: adapter layers against the frozen matmul alone (cuBLAS: the floor), eager
PyTorch, ``torch.compile``, our Triton GEMM without an adapter, and PEFT's LoRA. Our layer runs three
ways: ``fused`` (the fused GEMM forced), ``composed`` (cuBLAS plus the rank-r kernels forced) and
``dispatch`` (``backend="triton"``: what the dispatcher picks, timed per shape on this GPU).

Every provider is checked against a float64 reference on the same inputs before it is timed; a wrong
result is a failure, not a number. Times are ``triton.testing.do_bench`` medians (p20, p80 kept) with
the L2 flushed between runs. Results: CSV rows, a markdown table and a plot of time relative to the
floor, under ``--out``. Without a GPU the runner says so, runs a correctness smoke of every provider
on the CPU (kernels under Triton's interpreter) and exits 0 without timings.
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime
import importlib.util
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import torch

if not torch.cuda.is_available():  # the fused provider runs under the interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import peft_ops  # noqa: E402
from peft_ops import kernels, reference  # noqa: E402

# Llama-3-8B projections as (out_features, in_features)
SHAPES = {"4096x4096": (4096, 4096), "1024x4096": (1024, 4096), "14336x4096": (14336, 4096),
          "4096x14336": (4096, 14336)}
TOKENS = (1, 16, 128, 2048, 8192)
RANKS = (8, 16, 64)
QUICK = {"shapes": ["4096x4096"], "tokens": (16, 4096), "ranks": (16,)}
SMOKE = {"shapes": {"96x80": (96, 80)}, "tokens": (1, 17), "ranks": (8,)}
PROVIDERS = ("fused", "composed", "dispatch", "eager", "compile", "base", "triton_base", "peft")
LAYER_BACKENDS = {"fused": "fused", "composed": "composed", "dispatch": "triton"}  # provider -> layer backend
MODES = ("forward", "forward_backward")
COLUMNS = ("kernel", "provider", "mode", "metric", "unit", "x", "median", "p20", "p80", "shape", "rank", "dtype",
           "gpu", "torch", "triton", "date")
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 1e-3}


def _peft_available() -> bool:
    return importlib.util.find_spec("peft") is not None


def _rel_error(out, ref) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


class EagerReference(nn.Module):
    """The method as its authors run it: a chain of small PyTorch ops beside the frozen matmul, under
    autograd (``peft_ops.reference.oracle`` over the layer's factors)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        up, core, down, scale = self.layer.factors()
        return reference.oracle(x, self.layer.base_layer.weight, self.layer.base_layer.bias, up, core, down,
                                        scale)


@dataclass
class Case:
    """One adapter method on one projection at one rank: the layers every provider runs, built once."""

    method: str
    n: int
    k: int
    rank: int
    dtype: torch.dtype
    device: torch.device
    compiled: dict = field(default_factory=dict)

    def __post_init__(self):
        torch.manual_seed(0)
        base = nn.Linear(self.k, self.n, bias=False).to(self.device, self.dtype)
        options = {"allow_non_square": True} if self.method == "symlora" else {}
        self.layer = peft_ops.LAYER_CLASSES[self.method](base, self.rank, alpha=2.0 * self.rank, **options)
        with torch.no_grad():  # non-zero adapter values: a zero update would hide errors
            for p in self.layer.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn_like(p) * 0.1)
        self.eager = EagerReference(copy.deepcopy(self.layer))
        self.kernel_layers = {}
        for provider, backend in LAYER_BACKENDS.items():
            self.kernel_layers[provider] = copy.deepcopy(self.layer)
            self.kernel_layers[provider].backend = backend
        self.weight = base.weight

    def trainable(self, module):
        return [p for p in module.parameters() if p.requires_grad]

    def module(self, provider):
        if provider == "compile" and "module" not in self.compiled:
            self.compiled["module"] = torch.compile(copy.deepcopy(self.eager))
        return {**self.kernel_layers, "eager": self.eager}.get(provider) or self.compiled["module"]

    def reference(self, x, g):
        """float64 forward output, and dx with the adapter gradients, of the exact method."""
        layer = copy.deepcopy(self.eager).double()
        x = x.detach().double().requires_grad_()
        y = layer(x)
        grads = torch.autograd.grad(y, [x, *self.trainable(layer)], g.double())
        return y, grads


def _peft_layer(n, k, rank, dtype, device):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(k, n, bias=False)).to(device, dtype)
    model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["0"]), model)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
    return layer


def _peft_reference(layer, x, g):
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    w, s = layer.base_layer.weight.double(), layer.scaling["default"]
    x = x.detach().double().requires_grad_()
    a, b = a.requires_grad_(), b.requires_grad_()
    y = F.linear(x, w) + s * (x @ a.T) @ b.T
    return y, torch.autograd.grad(y, [x, a, b], g.double())


def build_call(provider, case: Case, x, g, mode, peft_layer=None):
    """(callable to time, callable returning what to check, the float64 expected) for one provider."""
    if provider in ("base", "triton_base"):
        w = case.weight
        if provider == "base":
            def forward():
                return F.linear(x, w)
        else:
            def forward():
                return kernels.linear(x, w)
        expected_y = F.linear(x.double(), w.double())
        if mode == "forward":
            return forward, lambda: (forward(),), (expected_y,)
        expected_dx = g.double() @ w.double()
        if provider == "base":
            xg = x.detach().requires_grad_()

            def step():
                return torch.autograd.grad(F.linear(xg, w), xg, g)
        else:
            def step():
                return forward(), kernels.linear(g, w.T)
        check = (lambda: step()) if provider == "base" else (lambda: (step()[1],))
        return step, check, (expected_dx,)
    if provider == "peft":
        module, expected_y, expected_grads = peft_layer, *_peft_reference(peft_layer, x, g)
        params = [module.lora_A["default"].weight, module.lora_B["default"].weight]
    else:
        module = case.module(provider)
        params = case.trainable(module)
        expected_y, expected_grads = case.reference(x, g)
    if mode == "forward":
        def forward():
            with torch.no_grad():
                return module(x)
        return forward, lambda: (forward(),), (expected_y,)
    xg = x.detach().requires_grad_()

    def step():
        return torch.autograd.grad(module(xg), [xg, *params], g)
    return step, step, expected_grads


def saved_bytes(module, x) -> int:
    """Bytes autograd saves for backward during ``module(x)``, parameters and buffers left out."""
    owned = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    x = x.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


def measure_ceilings(device) -> tuple[float, float]:
    """(bf16 matmul FLOP/s on random data, device copy bytes/s counting read and write)."""
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ a, warmup=50, rep=300)
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=20, rep=200)
    return 2 * 8192**3 / (ms * 1e-3), 2 * src.numel() / (copy_ms * 1e-3)


def floor_ms(m, n, k, mode, rate, bandwidth) -> float:
    """The frozen matmul's own floor: forward, or forward plus dx (bf16, each tensor moved once)."""
    flops, moved = 2 * m * n * k, 2 * (m * k + n * k + m * n)
    if mode == "forward_backward":
        flops, moved = 2 * flops, 2 * moved
    return max(flops / rate, moved / bandwidth) * 1e3


class Progress:
    def __init__(self, total):
        self.total, self.done, self.start, self.tty = total, 0, time.perf_counter(), sys.stderr.isatty()

    def step(self, label):
        self.done += 1
        line = f"[{self.done}/{self.total}] {time.perf_counter() - self.start:6.0f}s  {label}"
        print(("\r" + line.ljust(100)) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr,
              flush=True)

    def close(self):
        if self.tty:
            print(file=sys.stderr)


METHOD_INDEPENDENT = {"base": "linear", "triton_base": "linear", "peft": "peft-lora"}


def _bench_one(provider, kernel, case, x, g, mode, peft_layer, meta, timed):
    """Check one provider against float64, then (when ``timed``) time it and record its memory.
    Returns (rows, failure message or None)."""
    from triton.testing import do_bench

    fn, check, expected = build_call(provider, case, x, g, mode, peft_layer)
    errors = [_rel_error(o, e) for o, e in zip(check(), expected)]
    label = f"{provider} {kernel} {meta['shape']} M={meta['x']} r={meta['rank']} {mode}"
    if max(errors) > TOLERANCE[x.dtype]:
        return [], f"{label}: relative errors {['%.2e' % e for e in errors]}"
    if not timed:
        return [], None
    common = dict(meta, kernel=kernel, provider=provider, mode=mode)
    med, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    rows = [dict(common, metric="time", unit="ms", median=med, p20=p20, p80=p80)]
    if mode == "forward_backward":
        if provider not in ("base", "triton_base"):
            mib = saved_bytes(peft_layer if provider == "peft" else case.module(provider), x) / 2**20
            rows.append(dict(common, metric="saved_for_backward", unit="MiB", median=mib, p20=mib, p80=mib))
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        before = torch.cuda.memory_allocated(x.device)
        fn()
        torch.cuda.synchronize(x.device)
        mib = (torch.cuda.max_memory_allocated(x.device) - before) / 2**20
        rows.append(dict(common, metric="peak_memory", unit="MiB", median=mib, p20=mib, p80=mib))
    return rows, None


class Stopped(Exception):
    """The time budget ran out or the process was asked to stop: keep what was measured."""


_signal_received = None  # also checked before each provider: torch.compile's caches swallow exceptions


def _stop_on_sigterm(signum, frame):
    global _signal_received
    _signal_received = signum
    raise Stopped(f"signal {signum}")


def run(shapes, tokens, ranks, methods, providers, modes, dtype, device, timed: bool, budget_s: float | None = None):
    """Check every provider and, when ``timed``, measure it. Returns (CSV rows as dicts, failures, why it
    stopped early or None). Past ``budget_s`` seconds, or on SIGTERM, it stops between cells and returns
    the rows of every cell it finished: a sweep cut short by a device call's limit still leaves numbers.
    """
    global _signal_received
    _signal_received = None
    meta = {"dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "date": datetime.date.today().isoformat(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    rows, failures, stopped = [], [], None
    providers = [p for p in providers if p != "peft" or _peft_available()]
    # providers that don't depend on the method run with the first method only
    per_method = {m: [p for p in providers if i == 0 or p not in METHOD_INDEPENDENT] for i, m in enumerate(methods)}
    progress = Progress(len(shapes) * len(ranks) * len(tokens) * len(modes) * sum(map(len, per_method.values())))
    deadline = None if budget_s is None else time.monotonic() + budget_s
    try:
        if timed:
            rate, bandwidth = measure_ceilings(device)
            rows += [dict(meta, kernel="-", provider="ceiling", mode="-", metric=metric, unit=unit, x=0,
                          median=value, p20=value, p80=value, shape="-", rank=0)
                     for metric, unit, value in (("matmul_rate", "TFLOP/s", rate / 1e12),
                                                 ("copy_bandwidth", "TB/s", bandwidth / 1e12))]
        for shape_name, (n, k) in shapes.items():
            for rank in ranks:
                peft_layer = _peft_layer(n, k, rank, dtype, device) if "peft" in providers else None
                for method in methods:
                    case = Case(method, n, k, rank, dtype, device)
                    for m in tokens:
                        if deadline is not None and time.monotonic() > deadline:
                            raise Stopped("the time budget ran out")
                        x = torch.randn(m, k, device=device, dtype=dtype)
                        g = torch.randn(m, n, device=device, dtype=dtype)
                        cell = dict(meta, shape=shape_name, rank=rank, x=m)
                        cell_rows, cell_failures = [], []  # kept only once every provider and mode ran
                        for mode in modes:
                            if timed and method == methods[0]:
                                fl = floor_ms(m, n, k, mode, rate, bandwidth)
                                cell_rows.append(dict(cell, kernel="-", provider="floor", mode=mode, metric="time",
                                                      unit="ms", median=fl, p20=fl, p80=fl))
                            for provider in per_method[method]:
                                if _signal_received is not None:
                                    raise Stopped(f"signal {_signal_received}")
                                progress.step(f"{shape_name} r={rank} {method} M={m} {mode} {provider}")
                                kernel = METHOD_INDEPENDENT.get(provider, method)
                                new_rows, failure = _bench_one(provider, kernel, case, x, g, mode, peft_layer, cell,
                                                               timed)
                                cell_rows += new_rows
                                if failure:
                                    cell_failures.append(failure)
                        rows += cell_rows
                        failures += cell_failures
    except Stopped as stop:
        stopped = str(stop)
    progress.close()
    return rows, failures, stopped


def _times(rows):
    return {(r["kernel"], r["provider"], r["mode"], r["shape"], r["rank"], r["x"]): r["median"]
            for r in rows if r["metric"] == "time"}


RATIO_COLUMNS = (("fused", None), ("composed", None), ("dispatch", None), ("eager", None), ("compile", None),
                 ("triton_base", "linear"), ("peft", "peft-lora"), ("floor", "-"))  # (provider, kernel; None: the method)


def markdown(rows) -> str:
    """Per method, mode, shape, rank and M: our layer's time (as dispatched) and every provider's ratio to the
    frozen matmul alone (cuBLAS)."""
    t = _times(rows)
    lines = ["| method | mode | shape | r | M | dispatch ms | base ms | "
             + " | ".join(f"{p}/base" for p, _ in RATIO_COLUMNS) + " |", "|" + "---|" * (7 + len(RATIO_COLUMNS))]
    keys = sorted({(k[0], k[2], k[3], k[4], k[5]) for k in t if k[1] in LAYER_BACKENDS})
    for method, mode, shape, rank, m in keys:
        base = t.get(("linear", "base", mode, shape, rank, m))
        get = lambda kernel, provider: t.get((kernel, provider, mode, shape, rank, m))  # noqa: E731
        ratio = lambda v: f"{v / base:.3f}" if v and base else "—"  # noqa: E731
        ms = lambda v: f"{v:.4f}" if v else "—"  # noqa: E731  (a provider left out of the run)
        ratios = " | ".join(ratio(get(kernel or method, provider)) for provider, kernel in RATIO_COLUMNS)
        lines.append(f"| {method} | {mode} | {shape} | {rank} | {m} | {ms(get(method, 'dispatch'))} | {ms(base)} | "
                     f"{ratios} |")
    return "\n".join(lines)


def plot(rows, path) -> bool:
    """Time relative to the floor against M, per method (one column) and mode (one row)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    t = _times(rows)
    methods = sorted({k[0] for k in t if k[1] in LAYER_BACKENDS})
    if not methods:
        return False
    shape = sorted({k[3] for k in t})[0]
    ranks = sorted({k[4] for k in t if k[1] in LAYER_BACKENDS})
    rank = ranks[len(ranks) // 2]
    fig, axes = plt.subplots(len(MODES), len(methods), figsize=(4 * len(methods), 3.2 * len(MODES)), squeeze=False)
    for row, mode in enumerate(MODES):
        for col, method in enumerate(methods):
            ax = axes[row][col]
            for kernel, provider in [*((method, p) for p in LAYER_BACKENDS), (method, "eager"), (method, "compile"),
                                     ("linear", "base"), ("linear", "triton_base"), ("peft-lora", "peft")]:
                ms = sorted(m for (kk, p, mo, s, r, m) in t if (kk, p, mo, s, r) == (kernel, provider, mode, shape, rank))
                if ms:
                    ax.plot(ms, [t[(kernel, provider, mode, shape, rank, m)] / t[("-", "floor", mode, shape, rank, m)]
                                 for m in ms], marker="o", label=provider)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{method}, {mode}, {shape}, r={rank}", fontsize=9)
            ax.set_xlabel("tokens M")
            ax.set_ylabel("time / floor")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def write_outputs(rows, out_dir, label: str = "sweep") -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    gpu = rows[0]["gpu"].replace(" ", "-")
    stem = os.path.join(out_dir, f"{rows[0]['date']}_{gpu}_{label}")
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    header = (f"# Benchmark {rows[0]['date']}: {rows[0]['gpu']}, torch {rows[0]['torch']}, triton {rows[0]['triton']}, "
              f"{rows[0]['dtype']}\n\nRatios are to `F.linear` alone (cuBLAS), forward or forward + dx.\n\n")
    with open(stem + ".md", "w") as f:
        f.write(header + markdown(rows) + "\n")
    written = [stem + ".csv", stem + ".md"]
    if plot(rows, stem + ".png"):
        written.append(stem + ".png")
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="peft-ops microbenchmarks (see bench/NOTES.md)")
    parser.add_argument("--quick", action="store_true", help="one shape, two token counts, r=16 (about a minute)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument("--ranks", nargs="+", type=int, default=list(RANKS))
    parser.add_argument("--methods", nargs="+", choices=list(peft_ops.METHODS), default=list(peft_ops.METHODS))
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--label", help="names the result files (default: quick or sweep)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="start no new cell after this long; write what was measured (SIGTERM does the same)")
    parser.add_argument("--mode", choices=("kernels", "bank", "memory"), default="kernels",
                        help="bank: the adapter-bank benchmark (bench/bank.py); memory: model bytes and training-step "
                             "peaks on a 4-bit and a bf16 base (bench/memory.py); both take their own options")
    known, rest = parser.parse_known_args(argv)
    if known.mode == "bank":
        from . import bank

        return bank.main(rest)
    if known.mode == "memory":
        from . import memory

        return memory.main(rest)
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.tokens, args.ranks = QUICK["shapes"], list(QUICK["tokens"]), list(QUICK["ranks"])
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)  # `timeout` asks politely: keep the rows
    try:
        if not torch.cuda.is_available():
            print("No CUDA GPU here: running a correctness smoke of every provider on the CPU (fused kernels under "
                  "Triton's interpreter). No timings are taken.")
            rows, failures, stopped = run(SMOKE["shapes"], SMOKE["tokens"], SMOKE["ranks"], args.methods,
                                          args.providers, args.modes, torch.float32, torch.device("cpu"),
                                          timed=False, budget_s=args.time_budget)
            if not _peft_available() and "peft" in args.providers:
                print("peft is not installed: its provider was skipped (pip install peft)")
        else:
            shapes = {name: SHAPES[name] for name in args.shapes}
            rows, failures, stopped = run(shapes, args.tokens, args.ranks, args.methods, args.providers,
                                          args.modes, torch.bfloat16, torch.device("cuda"), timed=True,
                                          budget_s=args.time_budget)
            if any(r["provider"] != "ceiling" for r in rows):
                label = args.label or ("quick" if args.quick else "sweep")
                for path in write_outputs(rows, args.out, label + ("-partial" if stopped else "")):
                    print("wrote", path)
                print(markdown(rows))
    finally:
        signal.signal(signal.SIGTERM, previous)
    if stopped:
        print(f"STOPPED EARLY ({stopped}): the results hold only the cells finished before it")
    for failure in failures:
        print("WRONG RESULT, not timed:", failure)
    if not failures:
        print("every provider " + ("that ran " if stopped else "") + "matched the float64 reference")
    return 1 if failures else 0
