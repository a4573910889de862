"""Time sft's fused linear cross-entropy on the GPU at a model's head size (one variant per process).

  python3 benchmarks/ce_bench.py --variant fused     # as the trainer runs it (sft/ops/fused_ce.py, sft/ops/ce_softmax.py)
  python3 benchmarks/ce_bench.py --variant inductor  # the softmax pass compiled by torch.compile instead
                                                     # (three reads of the logits)
  python3 benchmarks/ce_bench.py --variant eager     # the same math with eager ops: bf16 logits cast to fp32,
                                                     # the softmax pass uncompiled, the head gradient summed outside the GEMM
`--chunk` sets the rows of logits per chunk (default: the trainer's). Forward + backward of `--rows` targets
against a `--vocab` x `--hidden` bf16 head, 2 warm-up and 5 timed calls. `--pass-only` times only the softmax
pass over one chunk of fp32 logits (CUDA events, median of 20); `--block` / `--warps` set the kernel's.
Prints one JSON line (ms per call, peak GB).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from cuda_timing import median_ms  # benchmarks/ is on sys.path when run as a script

import sft.ops.ce_softmax as ces
import sft.ops.fused_ce as fce


def eager_variant() -> None:
    fce._softmax_pass = fce._softmax_grad
    fce._logits = lambda h, w: (h @ w.t()).float()

    def accumulate(grad_w, g, h):
        grad_w += (g.t() @ h).float()

    fce._accumulate_grad_w = accumulate


def inductor_variant() -> None:
    """The softmax pass as torch.compile makes it (one compile, the row count dynamic)."""
    compiled = torch.compile(fce._softmax_grad, fullgraph=True, dynamic=False)

    def softmax_pass(logits, y, softcap, dtype):
        torch._dynamo.mark_dynamic(logits, 0)
        torch._dynamo.mark_dynamic(y, 0)
        return compiled(logits, y, softcap, dtype)

    fce._softmax_pass = softmax_pass


def pass_only(args) -> dict:
    torch.manual_seed(0)
    logits = torch.randn(args.chunk, args.vocab, device="cuda") * 4
    y = torch.randint(0, args.vocab, (args.chunk,), device="cuda")
    return {"pass_ms": round(median_ms(lambda i: fce._softmax_pass(logits, y, None, torch.bfloat16)), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=["fused", "inductor", "eager"], required=True)
    ap.add_argument("--rows", type=int, default=52000)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--chunk", type=int, default=fce.DEFAULT_CHUNK, help="rows of logits per chunk")
    ap.add_argument("--pass-only", action="store_true", help="time the softmax pass of one chunk only")
    ap.add_argument("--block", type=int, default=ces.BLOCK)
    ap.add_argument("--warps", type=int, default=ces.WARPS)
    args = ap.parse_args()
    ces.BLOCK, ces.WARPS = args.block, args.warps
    if args.variant == "eager":
        eager_variant()
    elif args.variant == "inductor":
        inductor_variant()
    if args.pass_only:
        out = {
            "variant": args.variant,
            "vocab": args.vocab,
            "chunk": args.chunk,
            "block": args.block,
            "warps": args.warps,
        }
        print(json.dumps({**out, **pass_only(args)}))
        return
    torch.manual_seed(0)
    h = (torch.randn(args.rows, args.hidden, device="cuda") * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(args.vocab, args.hidden, device="cuda") * 0.02).bfloat16().requires_grad_()
    y = torch.randint(0, args.vocab, (args.rows,), device="cuda")
    times, t_first = [], time.perf_counter()
    for i in range(7):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _ = fce.fused_linear_cross_entropy(h, w, y, chunk=args.chunk)
        loss.backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if i == 0:
            t_first = time.perf_counter() - t_first
    timed = sorted(times[2:])
    print(
        json.dumps(
            {
                "variant": args.variant,
                "rows": args.rows,
                "vocab": args.vocab,
                "hidden": args.hidden,
                "chunk": args.chunk,
                "block": args.block,
                "warps": args.warps,
                "ms_median": round(1000 * timed[len(timed) // 2], 2),
                "first_call_s": round(t_first, 2),
                "loss": float(loss),
                "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
