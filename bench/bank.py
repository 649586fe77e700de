"""``python -m bench --mode bank``: one batch of sequences, each row with its own adapter, on one
square projection.

A batch of ``--batch`` sequences (64) is spread over banks of 1, 8, 64 and 1,024 adapters (row ``i``
uses adapter ``(i mod min(A, batch))·⌊A / batch⌋``, so every row of a 64-row batch has its own adapter
once A ≥ 64), in decode (one token per sequence) and prefill (``--prefill`` tokens per sequence).
Providers, all in ``torch.inference_mode``:

* ``base``: the frozen linear layer alone; ``loraxs-alone`` / ``lora-alone``: one peft-ops adapter for
  every row;
* ``loraxs-bank``: a LoRA-XS bank (shared ``U`` and ``D``, an r×r core per adapter); ``lora-bank``: a
  LoRA bank (each adapter's own A and B, gathered per segment of rows);
* ``peft-mixed``: PEFT's mixed-batch inference (``adapter_names=``) with as many LoRA adapters;
* ``loraxs-loop``: a loop over the batch's adapters, each running its own rows through a single-adapter
  LoRA-XS layer.

Before timing, each bank's output is checked against an independent implementation (LoRA-XS: the
loop; LoRA: PEFT when installed, else the loop over LoRA layers): a wrong result is a failure, not a
number. Reported: the median time, the adapter overhead (time minus ``base``) and that overhead
relative to one adapter alone, plus the memory each extra adapter adds to a bank. On the CPU the
peft-ops layers and banks run their PyTorch reference path; the CPU may be shared, so every time is a
median over repeats.
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import time

import torch
from torch import nn

import peft_ops
from peft_ops.bank import AdapterBank, _contribution

ADAPTERS = (1, 8, 64, 1024)
SIZES = {  # dim: the projection's in = out features
    "cuda": dict(dim=4096, rank=16, batch=64, prefill=128, dtype=torch.bfloat16, adapters=ADAPTERS),
    "cpu": dict(dim=2048, rank=16, batch=64, prefill=32, dtype=torch.float32, adapters=ADAPTERS),
    "smoke": dict(dim=64, rank=4, batch=8, prefill=3, dtype=torch.float32, adapters=(1, 4, 16)),
}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _rows(adapters: int, batch: int) -> list[int]:
    return [(i % min(adapters, batch)) * max(1, adapters // batch) for i in range(batch)]


class Setup:
    """The base layer and ``adapters`` random LoRA-XS and LoRA adapters on it, as single layers, banks
    and (when installed) a PEFT layer."""

    def __init__(self, dim, rank, adapters, dtype, device, backend="auto"):
        gen = torch.Generator().manual_seed(0)
        self.base = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.base.weight.copy_(torch.randn(dim, dim, generator=gen) / dim**0.5)
        self.base.to(device, dtype)
        first = peft_ops.LoRAXSLinear(self.base, rank)
        frozen = {n: getattr(first, n) for n in first.method.frozen}  # one SVD: every adapter shares it
        self.loraxs = [first] + [peft_ops.LoRAXSLinear(self.base, rank, seed=i, frozen_factors=frozen)
                                 for i in range(1, adapters)]
        self.lora = [peft_ops.LoRALinear(self.base, rank, seed=i) for i in range(adapters)]
        with torch.no_grad():
            for layer in self.loraxs:
                layer.loraxs_R.copy_(torch.randn(rank, rank, generator=gen) * 0.1)
            for layer in self.lora:
                layer.lora_B.copy_(torch.randn(dim, rank, generator=gen) * 0.01)
        up, _, down, _ = first.factors()
        self.loraxs_bank = self._bank(self.loraxs, backend, frozen, (up.detach(), down.detach()))
        self.lora_bank = self._bank(self.lora, backend)
        self.peft = self._peft_layer(rank, device, dtype) if importlib.util.find_spec("peft") else None

    def _bank(self, layers, backend, frozen=None, shared_factors=None):
        bank = AdapterBank(self.base, layers[0].method, layers[0].rank, backend, frozen, None, shared_factors)
        dtype = torch.promote_types(self.base.weight.dtype, torch.float32)
        bank.add([f"a{i}" for i in range(len(layers))], [_contribution(l, bank.shared, dtype) for l in layers])
        return bank

    def _peft_layer(self, rank, device, dtype):
        from peft import LoraConfig, inject_adapter_in_model

        model = nn.Sequential(nn.Linear(self.base.in_features, self.base.out_features, bias=False))
        model[0].weight = self.base.weight
        for i, layer in enumerate(self.lora):
            model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=["0"]), model,
                                            adapter_name=f"a{i}")
            with torch.no_grad():
                model[0].lora_A[f"a{i}"].weight.copy_(layer.lora_A)
                model[0].lora_B[f"a{i}"].weight.copy_(layer.lora_B)
        return model[0].to(device, dtype)

    def bytes_per_adapter(self, bank: AdapterBank) -> int:
        return sum(getattr(bank, key)[0].numel() * getattr(bank, key).element_size() for key in bank._stacked)


def _loop(layers, x, rows):
    """Each distinct adapter runs its own rows through its single-adapter layer."""
    out = torch.empty(*x.shape[:-1], layers[0].out_features, dtype=x.dtype, device=x.device)
    index = torch.tensor(rows, device=x.device)
    for adapter in sorted(set(rows)):
        selected = (index == adapter).nonzero().flatten()
        out[selected] = layers[adapter](x[selected])
    return out


def _banked(bank, x, names):
    with peft_ops.use_adapters(bank, names):
        return bank(x)


def providers(setup: Setup, rows: list[int]):
    """name -> (call(x), the check it gets: another provider's name or None)."""
    names = [f"a{r}" for r in rows]
    calls = {
        "loraxs-bank": (lambda x: _banked(setup.loraxs_bank, x, names), "loraxs-loop"),
        "loraxs-loop": (lambda x: _loop(setup.loraxs, x, rows), None),
        "lora-bank": (lambda x: _banked(setup.lora_bank, x, names), "peft-mixed" if setup.peft else "lora-loop"),
    }
    if setup.peft is not None:
        calls["peft-mixed"] = (lambda x: setup.peft(x, adapter_names=names), None)
    else:
        calls["lora-loop"] = (lambda x: _loop(setup.lora, x, rows), None)
    return calls


def _median_ms(fn, x, device, min_repeats, budget_s) -> float:
    if device.type == "cuda":
        import triton

        return triton.testing.do_bench(lambda: fn(x), return_mode="median")
    fn(x)  # warm up
    times, start = [], time.perf_counter()
    while len(times) < min_repeats or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rel_error(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return float("inf") if not torch.isfinite(out).all() else ((out - ref).norm() / ref.norm()).item()


def run(sizes: dict, device: torch.device, min_repeats: int, budget_s: float):
    """Returns (rows of results, failures, bytes per extra adapter by bank)."""
    results, failures, memory = [], [], {}
    batch, dtype = sizes["batch"], sizes["dtype"]
    gen = torch.Generator().manual_seed(1)
    inputs = {mode: (torch.randn(batch, tokens, sizes["dim"], generator=gen) * 0.5).to(device, dtype)
              for mode, tokens in (("decode", 1), ("prefill", sizes["prefill"]))}
    for adapters in sizes["adapters"]:
        setup = Setup(sizes["dim"], sizes["rank"], adapters, dtype, device)
        memory = {"loraxs-bank": setup.bytes_per_adapter(setup.loraxs_bank),
                  "lora-bank": setup.bytes_per_adapter(setup.lora_bank)}
        rows = _rows(adapters, batch)
        calls = providers(setup, rows)
        for mode, x in inputs.items():
            timed = {}
            if adapters == sizes["adapters"][0]:
                timed = {"base": (setup.base, None), "loraxs-alone": (setup.loraxs[0], None),
                         "lora-alone": (setup.lora[0], None)}
            timed |= calls
            with torch.inference_mode():
                outputs = {name: fn(x) for name, (fn, _) in timed.items()}
            for name, (fn, check) in timed.items():
                if check is not None:
                    error = _rel_error(outputs[name], outputs[check])
                    if not error < TOLERANCE[dtype]:
                        failures.append(f"{name} A={adapters} {mode}: relative error {error:.2e} against {check}")
                        continue
                with torch.inference_mode():
                    ms = _median_ms(fn, x, device, min_repeats, budget_s)
                results.append(dict(mode=mode, provider=name, adapters=adapters, ms=ms))
                print(f"{mode:8s} A={adapters:5d} {name:13s} {ms:9.3f} ms", flush=True)
        del setup
    return results, failures, memory


def markdown(results, memory) -> str:
    base = {r["mode"]: r["ms"] for r in results if r["provider"] == "base"}
    alone = {(r["mode"], r["provider"].split("-")[0]): r["ms"] for r in results if r["provider"].endswith("-alone")}
    lines = ["| mode | provider | adapters | ms | overhead ms (− base) | overhead / one adapter's |",
             "|---|---|---|---|---|---|"]
    for r in results:
        overhead = r["ms"] - base[r["mode"]]
        one = alone.get((r["mode"], "loraxs" if r["provider"].startswith("loraxs") else "lora"))
        one_overhead = one - base[r["mode"]] if one is not None else None
        relative = f"{overhead / one_overhead:.2f}" if one_overhead and r["provider"] != "base" else "-"
        adapters = "-" if r["provider"] == "base" or r["provider"].endswith("-alone") else r["adapters"]
        lines.append(f"| {r['mode']} | {r['provider']} | {adapters} | {r['ms']:.3f} | {overhead:.3f} | {relative} |")
    lines.append("")
    lines += [f"Memory per extra adapter in a bank: {name} {nbytes / 1024:.1f} KiB" for name, nbytes in memory.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench --mode bank", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (seconds; for CI)")
    parser.add_argument("--adapters", nargs="+", type=int, help="bank sizes (default 1 8 64 1024)")
    parser.add_argument("--dim", type=int, help="in = out features of the projection")
    parser.add_argument("--prefill", type=int, help="tokens per sequence in prefill")
    parser.add_argument("--repeats", type=int, default=5, help="at least this many timed calls per provider (CPU)")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of repeats per provider (CPU)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = dict(SIZES["smoke" if args.smoke else device.type])
    sizes |= {k: v for k, v in (("adapters", args.adapters), ("dim", args.dim), ("prefill", args.prefill)) if v}
    repeats, budget = (1, 0.0) if args.smoke else (args.repeats, args.budget)
    machine = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"adapter bank: {device.type} ({machine}, {torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"{sizes}")
    results, failures, memory = run(sizes, device, repeats, budget)
    print(markdown(results, memory))
    for failure in failures:
        print("WRONG RESULT, not timed:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
