"""Time sibling projections on the GPU: separate linears, or one linear over their concatenated weights.

  python3 benchmarks/proj_bench.py --group qkv --variant separate          # q_proj, k_proj, v_proj as transformers runs them
  python3 benchmarks/proj_bench.py --group qkv --variant fused             # one GEMM over [Wq; Wk; Wv], then split
  python3 benchmarks/proj_bench.py --group qkv --variant fused_contiguous  # the same, the pieces copied contiguous
  python3 benchmarks/proj_bench.py --group qkv --variant fused_split_copy  # the same, one split-copy kernel for all
  python3 benchmarks/proj_bench.py --group gate_up --variant fused         # the MLP's gate_proj and up_proj

Why: a Qwen2.5-1.5B step without sft's joined q/k/v node runs 591 bf16 adds (56 ms on an H200), most of them autograd
summing the input gradients of projections that read one tensor (q/k/v: 2 per layer, gate/up: 1), and
252 bias-gradient reductions (15 ms); the k and v GEMMs are narrow (256 columns at 1.5B). One GEMM over the
concatenated weights has one input gradient (no adds), one bias reduction, and wider GEMMs, at the cost of a
weight concatenation per call and, where a consumer needs contiguous pieces, their copies
(`fused_contiguous`). Forward + backward of one layer's group at a packed micro-batch's size: 3 warm-up and
20 timed calls (CUDA events, median); the input gradient's largest difference from `separate`. One JSON line.

Measured (one H200, 41k rows, 1.5B): separate 1.51 ms, fused 1.25, fused_contiguous 1.41; gate/up fused was
slower (10.65 against 10.08 ms). In the training step the views save the adds and bias reductions (about 25 ms a
step) but pay as much in strided copies of the slices (Liger's RoPE makes q and k contiguous, the attention v)
and the split's backward, so sft keeps separate GEMMs and joins only their backward (sft/ops/qkv_proj.py).
`fused_split_copy` times the contiguous pieces from one kernel instead.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

SHAPES = {  # hidden, query width, key/value width, MLP width
    "qwen2.5-1.5b": (1536, 1536, 256, 8960),
    "qwen2.5-0.5b": (896, 896, 128, 4864),
}
CALLS, WARMUP = 20, 3


def widths(group: str, shape: str) -> tuple[list[int], bool]:
    """Output widths of the group's projections, and whether they have biases (Qwen2's q/k/v do)."""
    _, q, kv, inter = SHAPES[shape]
    return ([q, kv, kv], True) if group == "qkv" else ([inter, inter], False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--group", choices=["qkv", "gate_up"], required=True)
    ap.add_argument("--variant", choices=["separate", "fused", "fused_contiguous", "fused_split_copy"], required=True)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    ap.add_argument("--rows", type=int, default=41000)
    args = ap.parse_args()
    hidden = SHAPES[args.shape][0]
    outs, bias = widths(args.group, args.shape)
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(args.rows, hidden, device=dev, dtype=bf).requires_grad_()
    ws = [(torch.randn(o, hidden, device=dev) * hidden**-0.5).to(bf).requires_grad_() for o in outs]
    bs = [torch.zeros(o, device=dev, dtype=bf).requires_grad_() for o in outs] if bias else [None] * len(outs)
    grads = [torch.randn(args.rows, o, device=dev, dtype=bf) for o in outs]

    def run() -> None:
        if args.variant == "separate":
            pieces = [F.linear(x, w, b) for w, b in zip(ws, bs)]
        else:
            fused = F.linear(x, torch.cat(ws), torch.cat(bs) if bias else None)
            if args.variant == "fused_split_copy":  # contiguous pieces from one kernel
                pieces = list(torch.split_with_sizes_copy(fused, outs, dim=-1))
            else:
                pieces = list(fused.split(outs, dim=-1))
            if args.variant == "fused_contiguous":
                pieces = [p.contiguous() for p in pieces]
        torch.autograd.backward(pieces, grads)

    times = []
    for i in range(WARMUP + CALLS):
        for t in [x, *ws, *[b for b in bs if b is not None]]:
            t.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        if i >= WARMUP:
            times.append(start.elapsed_time(end))
    dx = x.grad.float()
    x.grad = None
    for w, b, g in zip(ws, bs, grads):  # the separate computation, as the reference for dx
        F.linear(x, w, b).backward(g)
    diff = (dx - x.grad.float()).abs().max().item()
    print(
        json.dumps(
            {
                "group": args.group,
                "variant": args.variant,
                "shape": args.shape,
                "rows": args.rows,
                "forward_backward_ms": round(sorted(times)[len(times) // 2], 4),
                "max_dx_diff_vs_separate": round(diff, 5),
            }
        )
    )


if __name__ == "__main__":
    main()
