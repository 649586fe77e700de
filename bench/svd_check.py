"""LoRA-XS's SVD computed on the GPU against the CPU (the svd stage of bench/gpu_check.sh): for one
bfloat16 weight (4096×4096, rank 16 by default), the seconds of svd_device="cpu" and "weight", how many
elements of the stored factors differ after the cast to float32 and to bfloat16 and by how much, and
whether the adapter file's signature check accepts each device's factors for the other's.
Without a GPU, "weight" is the CPU too (the rehearsal: every difference is zero).

    python -m bench.svd_check [--shape 4096x4096] [--rank 16]
"""
import argparse
import copy
import time

import torch

from peft_ops.checks import signature, signature_mismatch, signature_rtol
from peft_ops.layers import LoRAXSLinear

SIGNATURE_SIZE = 8  # as save_adapter writes it


def build(base: torch.nn.Linear, rank: int, device: str, svd_device: str) -> tuple[LoRAXSLinear, float]:
    """A LoRA-XS layer on ``device`` and the seconds its set-up took (best of 2; the first call also
    warms up cuSOLVER or LAPACK)."""
    times = []
    for _ in range(2):
        moved = copy.deepcopy(base).to(device)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        layer = LoRAXSLinear(moved, rank, svd_device=svd_device)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return layer, min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4096x4096", help="out×in of the weight")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    n, k = map(int, args.shape.split("x"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():  # drawn on the CPU: the same weight on every machine
        base.weight.copy_(torch.randn(n, k, generator=torch.Generator().manual_seed(0)) / k**0.5)
    on_cpu, cpu_seconds = build(base, args.rank, "cpu", "cpu")
    on_device, device_seconds = build(base, args.rank, device, "weight")
    print(f"svd {n}x{k} r={args.rank} bf16 weight: svd_device='cpu' {cpu_seconds:.3f} s, 'weight' on {device} "
          f"{device_seconds:.3f} s")
    print("| svd factors cast to | element differs (U; ΣVᵀ) | max diff / max |abs| | signature (tolerance) |")
    print("|---|---|---|---|")
    for dtype, rtol in ((torch.float32, signature_rtol("float32", torch.float32)),
                        (torch.bfloat16, signature_rtol("bfloat16", torch.bfloat16))):
        a, b = copy.deepcopy(on_cpu), copy.deepcopy(on_device).cpu()
        counts, worst = [], 0.0
        for name in ("loraxs_B", "loraxs_A"):
            x, y = getattr(a, name).to(dtype), getattr(b, name).to(dtype)
            setattr(a, name, x)
            setattr(b, name, y)
            counts.append(f"{int((x != y).sum())}/{x.numel()}")
            worst = max(worst, float((x.double() - y.double()).abs().max() / x.double().abs().max()))
        verdicts = [signature_mismatch(signature(one, SIGNATURE_SIZE), other, rtol) for one, other in ((a, b), (b, a))]
        verdict = "accepted both ways" if verdicts == [None, None] else f"REFUSED: {next(v for v in verdicts if v)}"
        print(f"| svd {str(dtype).removeprefix('torch.')} | {'; '.join(counts)} | {worst:.1e} | {verdict} ({rtol:g}) |")


if __name__ == "__main__":
    main()
