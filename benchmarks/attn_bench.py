"""Time each installed packed-attention kernel on the GPU at a model's head shape (sft/models/attention/kernels.py).

  python3 benchmarks/attn_bench.py --heads 12 --kv-heads 2 --head-dim 128   # Qwen2.5-1.5B
  python3 benchmarks/attn_bench.py --heads 14 --kv-heads 2 --head-dim 64    # Qwen2.5-0.5B

One packed row of `--tokens` tokens cut into samples of the benchmark's length law (log-normal, median 800,
capped at 4,096), causal, bf16. Per kernel: forward and forward + backward, 3 warm-up and 10 timed calls
(median), and the largest difference of its output and gradients from the first kernel's. One JSON line each.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from sft.models.attention.kernels import run_kernel, why_not


def lengths(total: int, gen: torch.Generator) -> list[int]:
    out: list[int] = []
    while sum(out) < total:
        n = int(math.exp(math.log(800) + 0.647 * torch.randn(1, generator=gen).item()))
        out.append(max(1, min(n, 4096, total - sum(out))))
    return out


def timed(fn, reps: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=48000)
    ap.add_argument("--kernels", default="fa4,flash_attn,torch")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    lens = lengths(args.tokens, gen)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    total, longest = sum(lens), max(lens)
    q, k, v = (
        torch.randn(total, h, args.head_dim, device="cuda", dtype=torch.bfloat16, generator=None)
        for h in (args.heads, args.kv_heads, args.kv_heads)
    )
    grad = torch.randn(total, args.heads, args.head_dim, device="cuda", dtype=torch.bfloat16)
    # causal FLOPs: forward 2 matmuls of s*s/2 per head, backward 2.5x
    flops_fwd = sum(2 * 2 * n * n / 2 * args.heads * args.head_dim for n in lens)
    first: list[torch.Tensor] | None = None
    major = torch.cuda.get_device_capability()[0]
    for name in args.kernels.split(","):
        row = {
            "kernel": name,
            "shape": [args.heads, args.kv_heads, args.head_dim],
            "tokens": total,
            "samples": len(lens),
        }
        reason = why_not(name, major)
        if reason is not None:
            print(json.dumps(row | {"skipped": reason}), flush=True)
            continue
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]

        def fwd(leaves=leaves, name=name):
            with torch.no_grad():
                return run_kernel(name, *leaves, cu, cu, longest, longest, args.head_dim**-0.5, (-1, 0), None)

        def fwd_bwd(leaves=leaves, name=name):
            for t in leaves:
                t.grad = None
            out = run_kernel(name, *leaves, cu, cu, longest, longest, args.head_dim**-0.5, (-1, 0), None)
            out.backward(grad)
            return out

        try:
            t0 = time.perf_counter()
            out = fwd_bwd()
            torch.cuda.synchronize()
            row["first_call_s"] = round(time.perf_counter() - t0, 2)
            row["fwd_ms"], row["fwd_bwd_ms"] = round(timed(fwd), 3), round(timed(fwd_bwd), 3)
        except Exception as exc:  # one kernel failing must not hide the others' figures
            print(json.dumps(row | {"error": f"{type(exc).__name__}: {exc}"[:500]}), flush=True)
            continue
        row["fwd_tflops"] = round(flops_fwd / row["fwd_ms"] / 1e9, 1)
        row["fwd_bwd_tflops"] = round(3.5 * flops_fwd / row["fwd_bwd_ms"] / 1e9, 1)
        now = [out.detach().float()] + [t.grad.float() for t in leaves]
        if first is None:
            first = now
        else:
            row["max_diff_vs_first"] = {
                n: float((a - b).abs().max()) for n, a, b in zip(("out", "dq", "dk", "dv"), now, first)
            }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
