"""``python -m peft_ops.demo``: every method learns a small task through adapters alone.

A tiny transformer with random (frozen) weights gets each adapter method in turn on all its linear
layers, trains on next-token prediction over sequences from a fixed random Markov chain, and one
table reports: trainable parameters, adapter file bytes, loss before and after. Runs on the CPU in
well under a minute (on a GPU the layers use the fused kernels).
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import torch
from torch import nn
import torch.nn.functional as F

import peft_ops

VOCAB, DIM, HEADS, LAYERS, SEQ = 64, 64, 4, 2, 32
# r×r cores have far fewer parameters and want a larger step (as their papers use)
LEARNING_RATES = {"lora": 3e-3, "symlora": 3e-3, "loraxs": 3e-2, "tlora": 3e-2}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(DIM, DIM) for _ in range(4))
        self.up_proj, self.down_proj = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM)

    def forward(self, x):
        b, s, _ = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(b, s, HEADS, DIM // HEADS).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(attn.transpose(1, 2).reshape(b, s, DIM))
        return x + self.down_proj(F.gelu(self.up_proj(self.norm2(x))))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def markov_batches(steps: int, batch: int, seed: int = 0):
    """Sequences from one fixed sparse Markov chain (each token has two equally likely successors);
    ``seed`` draws the sequences, not the chain."""
    chain = torch.Generator().manual_seed(1234)
    successors = torch.stack([torch.randperm(VOCAB, generator=chain)[:2] for _ in range(VOCAB)])
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.empty(batch, SEQ + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(VOCAB, (batch,), generator=g)
        for i in range(SEQ):
            pick = torch.randint(2, (batch,), generator=g)
            tokens[:, i + 1] = successors[tokens[:, i], pick]
        yield tokens[:, :-1], tokens[:, 1:]


def loss_of(model, inputs, targets):
    return F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())


def run(steps: int = 150, rank: int = 8, device: str = "cpu", seed: int = 0) -> list[dict]:
    """Train each method on the same base model and data; returns one row per method."""
    rows = []
    eval_inputs, eval_targets = next(markov_batches(1, 256, seed=seed + 1))
    eval_inputs, eval_targets = eval_inputs.to(device), eval_targets.to(device)
    for method in peft_ops.METHODS:
        torch.manual_seed(seed)
        model = TinyLM().to(device)
        options = {"allow_non_square": True} if method == "symlora" else {}
        peft_ops.inject(model, method, rank, target_modules="all-linear", seed=seed, **options)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATES[method], weight_decay=0.0)
        with torch.no_grad():
            before = loss_of(model.eval(), eval_inputs, eval_targets).item()
        model.train()
        start = time.perf_counter()
        for inputs, targets in markov_batches(steps, 32, seed=seed):
            loss = loss_of(model, inputs.to(device), targets.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        seconds = time.perf_counter() - start
        with torch.no_grad():
            after = loss_of(model.eval(), eval_inputs, eval_targets).item()
        with tempfile.TemporaryDirectory() as tmp:
            info = peft_ops.save_adapter(model, os.path.join(tmp, "adapter.safetensors"))
        rows.append({"method": method, "trainable": sum(p.numel() for p in trainable),
                     "file_bytes": info.file_bytes, "tensor_bytes": info.tensor_bytes,
                     "loss_before": before, "loss_after": after, "seconds": seconds})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'method':<9} {'trainable':>9} {'file bytes':>10} {'(tensors)':>9} {'loss before':>11} "
             f"{'loss after':>10} {'train s':>7}"]
    for r in rows:
        lines.append(f"{r['method']:<9} {r['trainable']:>9} {r['file_bytes']:>10} {r['tensor_bytes']:>9} "
                     f"{r['loss_before']:>11.3f} {r['loss_after']:>10.3f} {r['seconds']:>7.1f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    print(f"peft-ops {peft_ops.__version__} demo: a {LAYERS}-layer transformer with random frozen weights, "
          f"adapters (rank {args.rank}) on all {LAYERS * 6} linear layers, {args.steps} steps on {args.device}; "
          f"chance-level loss is {math.log(VOCAB):.2f}, the task's floor {math.log(2):.2f}.\n")
    print(format_table(run(args.steps, args.rank, args.device)))


if __name__ == "__main__":
    main()
