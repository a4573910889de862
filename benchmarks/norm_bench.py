"""Time one RMSNorm implementation on the GPU at a packed micro-batch's size (one variant per process).

  python3 benchmarks/norm_bench.py --variant liger     # Liger's Triton kernels, as `model.use_liger` runs them
  python3 benchmarks/norm_bench.py --variant torch     # torch.nn.functional.rms_norm (PyTorch's fused kernel)
  python3 benchmarks/norm_bench.py --variant sft       # sft/ops/rms_norm.py: PyTorch's fused forward, sft's one-pass backward
  python3 benchmarks/norm_bench.py --variant compiled  # transformers' RMSNorm math through torch.compile
  python3 benchmarks/norm_bench.py --variant eager     # transformers' RMSNorm math, eager ops

Why: Liger's RMSNorm backward takes several times what reading and writing its tensors costs (0.36 ms a call
on a [41k, 1536] bf16 input on an H200), which is why sft runs its own (sft/ops/rms_norm.py).
Forward, and forward + backward, of `--rows` x `--hidden` bf16 rows with a bf16 weight: 3 warm-up and 20
timed calls (CUDA events, median), then the largest differences of y, dx and dw from an fp32 computation of
the same math. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from cuda_timing import CALLS, WARMUP, median_ms  # benchmarks/ is on sys.path when run as a script

EPS = 1e-6


def hf_rms_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """transformers' Llama/Qwen2 RMSNorm: normalise in fp32, round to the input dtype, then scale."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return w * h.to(x.dtype)


def variant_fn(name: str, hidden: int):
    if name == "liger":
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        # in_place=True as in the trainer (LigerRMSNorm's default): dx is written over the incoming gradient
        return lambda x, w: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", True)
    if name == "torch":
        return lambda x, w: torch.nn.functional.rms_norm(x, (hidden,), w, EPS)
    if name == "sft":
        from sft.ops.rms_norm import rms_norm

        return lambda x, w: rms_norm(x, w, EPS)
    if name == "compiled":
        return torch.compile(hf_rms_norm, dynamic=True)
    return hf_rms_norm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=["liger", "torch", "sft", "compiled", "eager"], required=True)
    ap.add_argument("--rows", type=int, default=41000)
    ap.add_argument("--hidden", type=int, default=1536)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.rows, args.hidden, device="cuda").bfloat16().requires_grad_()
    w = (1 + 0.1 * torch.randn(args.hidden, device="cuda")).bfloat16().requires_grad_()
    dy = torch.randn(args.rows, args.hidden, device="cuda").bfloat16()
    # One incoming gradient per call, made before timing: Liger writes dx over it.
    dys = [dy.clone() for _ in range(WARMUP + CALLS + 2)]
    fn = variant_fn(args.variant, args.hidden)
    t0 = time.perf_counter()
    fn(x, w).backward(dys[-1])
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0

    def forward(i: int) -> None:
        with torch.no_grad():
            fn(x, w)

    def both(i: int) -> None:
        x.grad = w.grad = None
        fn(x, w).backward(dys[i])

    fwd, fwd_bwd = median_ms(forward), median_ms(both)
    y = fn(x, w)
    x.grad = w.grad = None
    y.backward(dys[-2])
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    yr = hf_rms_norm(xr, wr)  # fp32 throughout: the reference every variant is compared with
    yr.backward(dy.float())
    diff = {
        "y": (y.float() - yr).abs().max().item(),
        "dx": (x.grad.float() - xr.grad).abs().max().item(),
        "dw_rel": ((w.grad.float() - wr.grad).abs().max() / wr.grad.abs().max()).item(),
    }
    print(
        json.dumps(
            {
                "variant": args.variant,
                "rows": args.rows,
                "hidden": args.hidden,
                "forward_ms": round(fwd, 4),
                "forward_backward_ms": round(fwd_bwd, 4),
                "first_call_s": round(first_s, 2),
                "max_diff_vs_fp32": {k: round(v, 5) for k, v in diff.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
