"""``python -m bench --mode memory``: what adapter training holds on a tiny Llama, its base in bfloat16
and the same checkpoint loaded in 4 bits (NF4, double quantization, bfloat16 compute), for every
peft-ops method and PEFT's LoRA (QLoRA on the 4-bit base) when PEFT is installed.

Reported per base and adapter:

* the model's bytes: parameters and buffers, each storage once, with a quantized weight's packed
  storage and its quantization state (block scales, nested scales, code books, int8 row scales);
* the trainable parameters;
* the step peak: the most bytes live at once during one training step (forward, loss, backward, AdamW
  step) above those live when it starts, measured after a warm-up step that creates the optimizer
  state. On CUDA: ``torch.cuda.max_memory_allocated``. On the CPU, whose allocator keeps no peak
  statistic: every allocation and free the profiler records, replayed in time order (``peak_bytes``;
  ``tests/test_memory.py`` checks it on steps of known allocations);
* the peak: model, optimizer state and step peak together.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile

import torch

import peft_ops

# hidden and intermediate sizes are multiples of 64: bitsandbytes' CPU path quantizes 64-value blocks
LLAMA = dict(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=256)
TOKENS = (2, 128)  # batch, sequence
BASES = ("bf16", "nf4")
OPTIONS = {"symlora": {"allow_non_square": True}}  # k, v and the MLP projections are not square


def peak_bytes(step, device: torch.device) -> int:
    """The most bytes of tensors live at once while ``step()`` runs, above those live when it starts. On
    the CPU a tensor made before the step counts as held throughout, even if the step frees it: the
    profiler reports no free of a block it did not see allocated."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # the raw events, not prof.events(): those fold most allocations into the op that made them, which
    # loses when, inside the op, each was made and freed
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
              and e.device_type().name == "CPU"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


def _quantization_tensors(weight) -> list[torch.Tensor]:
    """Tensors a bitsandbytes weight keeps beside its storage: a 4-bit weight's quant_state (its nested
    state included), an int8 weight's row scales."""
    tensors = [t for t in (getattr(weight, "CB", None), getattr(weight, "SCB", None)) if torch.is_tensor(t)]
    states = [getattr(weight, "quant_state", None)]
    while states:
        state = states.pop()
        if state is None:
            continue
        for value in vars(state).values():
            if torch.is_tensor(value):
                tensors.append(value)
            elif type(value) is type(state):
                states.append(value)
    return tensors


def model_bytes(module: torch.nn.Module) -> int:
    """Bytes of every tensor the module holds (parameters, buffers, quantization state), each storage once."""
    storages = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        for t in (tensor, *_quantization_tensors(tensor)):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def save_tiny_llama(directory, config: dict, seed: int = 0) -> None:
    import transformers

    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).save_pretrained(directory)


def load(directory, base: str, device: torch.device):
    """The checkpoint in bfloat16 (``"bf16"``) or in 4 bits (``"nf4"``), its other modules in bfloat16."""
    import transformers

    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16) if base == "nf4" else None
    return transformers.AutoModelForCausalLM.from_pretrained(directory, device_map=device.type, dtype=torch.bfloat16,
                                                             quantization_config=quantization)


def adapt(model, adapter: str, rank: int):
    """``adapter`` (a peft-ops method, or ``"peft-lora"``: PEFT's LoRA) on every linear layer but the head."""
    if adapter == "peft-lora":
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    peft_ops.inject(model, adapter, rank, target_modules="all-linear", **OPTIONS.get(adapter, {}))
    return model


def training_step(model, tokens):
    """A training step of the model's trainable parameters (forward, loss, backward, AdamW step, gradients
    dropped) and its optimizer. Run the step once before measuring it: the first run creates the
    optimizer state."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, optimizer


def measure(model, tokens, device: torch.device) -> dict:
    """Model bytes, trainable parameters and the peaks of a training step of the adapted ``model``."""
    model.train()
    step, optimizer = training_step(model, tokens)
    step()
    step_peak = peak_bytes(step, device)
    optimizer_bytes = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                          for t in state.values() if torch.is_tensor(t))
    held = model_bytes(model)
    return dict(trainable=sum(p.numel() for p in model.parameters() if p.requires_grad), model_bytes=held,
                optimizer_bytes=optimizer_bytes, step_peak_bytes=step_peak,
                peak_bytes=held + optimizer_bytes + step_peak)


def run(adapters, rank: int, config: dict, tokens_shape, device: torch.device) -> list[dict]:
    tokens = torch.randint(config["vocab_size"], tokens_shape, generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        save_tiny_llama(directory, config)
        for adapter in adapters:
            for base in BASES:
                model = adapt(load(directory, base, device), adapter, rank)
                rows.append(dict(base=base, adapter=adapter, rank=rank, **measure(model, tokens, device)))
                del model
    return rows


def markdown(rows) -> str:
    """One line per adapter, the bfloat16 and the 4-bit base side by side, in MiB."""
    by_key = {(r["adapter"], r["base"]): r for r in rows}
    mib = lambda n: f"{n / 2**20:.2f}"  # noqa: E731
    lines = ["| adapter | trainable | model bf16 | model 4-bit | step peak bf16 | step peak 4-bit | peak bf16 | "
             "peak 4-bit |", "|---|---|---|---|---|---|---|---|"]
    for adapter in dict.fromkeys(r["adapter"] for r in rows):
        bf16, nf4 = by_key[adapter, "bf16"], by_key[adapter, "nf4"]
        lines.append(f"| {adapter} | {bf16['trainable']:,} | {mib(bf16['model_bytes'])} | {mib(nf4['model_bytes'])} | "
                     f"{mib(bf16['step_peak_bytes'])} | {mib(nf4['step_peak_bytes'])} | {mib(bf16['peak_bytes'])} | "
                     f"{mib(nf4['peak_bytes'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench --mode memory", description=__doc__.split("\n\n")[0])
    adapters = [*peft_ops.METHODS, "peft-lora"]
    parser.add_argument("--adapters", nargs="+", choices=adapters, default=adapters)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--json", metavar="PATH", help="also write the rows (bytes) as JSON")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: on a CPU shared with other processes, two threads wait on each "
                             "other at every op)")
    args = parser.parse_args(argv)
    missing = [name for name in ("transformers", "bitsandbytes") if importlib.util.find_spec(name) is None]
    if "peft-lora" in args.adapters and importlib.util.find_spec("peft") is None:
        print("peft is not installed: its LoRA was skipped (pip install peft)")
        args.adapters.remove("peft-lora")
    if missing:
        print(f"the memory benchmark needs {' and '.join(missing)} (pip install -e .[bench,quant])")
        return 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    import bitsandbytes

    threads = f"cpu, torch threads: {torch.get_num_threads()}"
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else threads
    print(f"memory: {machine}, torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}; tiny Llama "
          f"{LLAMA}, tokens {TOKENS}, rank {args.rank}, adapters on every linear layer but the head; 4-bit: NF4, "
          f"double quantization, bfloat16 compute; MiB")
    rows = run(args.adapters, args.rank, LLAMA, TOKENS, device)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print("wrote", args.json)
    return 0
