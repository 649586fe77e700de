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
peft-ops layers and banks run their PyTorch reference path; the CPU may be shared, so providers are
timed in interleaved rounds and every number is a median (see ``_timed_rounds``).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import platform
import statistics
import time
import warnings

import torch
from torch import nn

import peft_ops
from peft_ops.bank_layer import AdapterBank, adapter_contribution

ADAPTERS = (1, 8, 64, 1024)
SIZES = {  # dim: the projection's in = out features
    "cuda": dict(dim=4096, rank=16, batch=64, prefill=128, dtype=torch.bfloat16, adapters=ADAPTERS),
    "cpu": dict(dim=2048, rank=16, batch=64, prefill=16, dtype=torch.float32, adapters=ADAPTERS),
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
        bank.add([f"a{i}" for i in range(len(layers))], [adapter_contribution(l, bank.shared, dtype) for l in layers])
        return bank

    def _peft_layer(self, rank, device, dtype):
        from peft import LoraConfig, inject_adapter_in_model

        model = nn.Sequential(nn.Linear(self.base.in_features, self.base.out_features, bias=False))
        model[0].weight = self.base.weight
        for i, layer in enumerate(self.lora):
            with warnings.catch_warnings():  # "multiple adapters in the model": that is the point here
                warnings.filterwarnings("ignore", "Already found a `peft_config`")
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


def providers(setup: Setup, rows: list[int]):
    """name -> (call(x), the check it gets: another provider's name or None). The banks' calls run
    inside ``use_adapters`` for these rows (entered by the caller, once per batch, as a server does)."""
    names = [f"a{r}" for r in rows]
    calls = {
        "loraxs-bank": (setup.loraxs_bank, "loraxs-loop"),
        "loraxs-loop": (lambda x: _loop(setup.loraxs, x, rows), None),
        "lora-bank": (setup.lora_bank, "peft-mixed" if setup.peft else "lora-loop"),
    }
    if setup.peft is not None:
        calls["peft-mixed"] = (lambda x: setup.peft(x, adapter_names=names), None)
    else:
        calls["lora-loop"] = (lambda x: _loop(setup.lora, x, rows), None)
    return calls


def _time_ms(fn, x, device) -> float:
    if device.type == "cuda":
        import triton

        return triton.testing.do_bench(lambda: fn(x), return_mode="median")
    start = time.perf_counter()
    fn(x)
    return (time.perf_counter() - start) * 1e3


def _timed_rounds(calls: dict, x, device, rounds: int) -> dict[str, tuple[float, float]]:
    """name -> (median ms, median overhead ms over base). Every round times each provider once, in
    turn, with ``base`` first, and the overhead is the median of the differences within a round: load
    from other processes on a shared CPU then shifts a round's times together instead of biasing one
    provider."""
    for fn in calls.values():
        fn(x)  # warm up
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(_time_ms(fn, x, device))
    return {name: (statistics.median(t), statistics.median(a - b for a, b in zip(t, times["base"])))
            for name, t in times.items()}


def _rel_error(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return float("inf") if not torch.isfinite(out).all() else ((out - ref).norm() / ref.norm()).item()


def run(sizes: dict, device: torch.device, rounds: int):
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
        calls = {"base": (setup.base, None), "loraxs-alone": (setup.loraxs[0], None),
                 "lora-alone": (setup.lora[0], None), **providers(setup, rows)}
        for mode, x in inputs.items():
            with torch.inference_mode(), contextlib.ExitStack() as banks:
                for bank in (setup.loraxs_bank, setup.lora_bank):
                    banks.enter_context(peft_ops.use_adapters(bank, [f"a{r}" for r in rows]))
                outputs = {name: fn(x) for name, (fn, _) in calls.items()}
                checked = {}
                for name, (fn, check) in calls.items():
                    error = _rel_error(outputs[name], outputs[check]) if check else 0.0
                    if error < TOLERANCE[dtype]:
                        checked[name] = fn
                    else:
                        failures.append(f"{name} A={adapters} {mode}: relative error {error:.2e} against {check}")
                timed = _timed_rounds(checked, x, device, rounds * (5 if mode == "decode" else 1))  # decode: short
            for name, (ms, overhead) in timed.items():
                results.append(dict(mode=mode, provider=name, adapters=adapters, ms=ms, overhead=overhead))
                print(f"{mode:8s} A={adapters:5d} {name:13s} {ms:9.3f} ms  overhead {overhead:8.3f} ms", flush=True)
        del setup
    return results, failures, memory


def markdown(results, memory) -> str:
    """Per bank size and mode: each provider's median time and overhead over base (paired within
    rounds), and the overhead relative to one adapter alone (LoRA-XS's for LoRA-XS rows, LoRA's else)."""
    alone = {(r["mode"], r["adapters"], r["provider"].split("-")[0]): r["overhead"]
             for r in results if r["provider"].endswith("-alone")}
    lines = ["| adapters | mode | provider | ms | overhead ms (− base) | overhead / one adapter's |",
             "|---|---|---|---|---|---|"]
    for r in results:
        one = alone.get((r["mode"], r["adapters"], "loraxs" if r["provider"].startswith("loraxs") else "lora"))
        relative = f"{r['overhead'] / one:.2f}" if one and one > 0 and r["provider"] != "base" else "-"
        lines.append(f"| {r['adapters']} | {r['mode']} | {r['provider']} | {r['ms']:.3f} | {r['overhead']:.3f} | "
                     f"{relative} |")
    lines.append("")
    lines += [f"Memory per extra adapter in a bank: {name} {nbytes / 1024:.1f} KiB" for name, nbytes in memory.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench --mode bank", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (seconds; for CI)")
    parser.add_argument("--adapters", nargs="+", type=int, help="bank sizes (default 1 8 64 1024)")
    parser.add_argument("--dim", type=int, help="in = out features of the projection")
    parser.add_argument("--prefill", type=int, help="tokens per sequence in prefill")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (each times every provider once)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: on a CPU shared with other processes, two threads wait on each "
                             "other at every op and the times scatter)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    sizes = dict(SIZES["smoke" if args.smoke else device.type])
    sizes |= {k: v for k, v in (("adapters", args.adapters), ("dim", args.dim), ("prefill", args.prefill)) if v}
    machine = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"adapter bank: {device.type} ({machine}, {torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"{sizes}")
    results, failures, memory = run(sizes, device, 1 if args.smoke else args.rounds)
    print(markdown(results, memory))
    for failure in failures:
        print("WRONG RESULT, not timed:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
