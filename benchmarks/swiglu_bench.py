"""Time one SwiGLU gate, silu(a) * b, on the GPU at a packed micro-batch's size (one variant per process).

  python3 benchmarks/swiglu_bench.py --variant liger   # Liger's Triton kernels (one program per row)
  python3 benchmarks/swiglu_bench.py --variant sft     # sft/ops/swiglu.py: flat kernels, backward in place
  python3 benchmarks/swiglu_bench.py --variant eager   # transformers' math: silu(a) * b, eager ops

Why: Liger's SwiGLU runs one program per row with next_power_of_2(width) lanes (45 % masked at width 8,960);
its backward took 1.09 ms a call on [41k, 8960] bf16 on an H200. Forward, and forward + backward, of `--rows` x `--width` bf16 inputs: 3 warm-up
and 20 timed calls (CUDA events, median); each call gets fresh copies of a and b made before timing (the
in-place backwards overwrite them), and the backward is `torch.autograd.grad` (nothing accumulated into
.grad). Then the largest differences of c, da and db from fp32 math, and the
memory traffic per second (5 tensors of the input's size for forward + backward). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from cuda_timing import CALLS, WARMUP, median_ms  # benchmarks/ is on sys.path when run as a script


def variant_fn(name: str):
    if name == "liger":
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return LigerSiLUMulFunction.apply
    if name == "sft":
        from sft.ops.swiglu import silu_mul

        return silu_mul
    return lambda a, b: F.silu(a) * b


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=["liger", "sft", "eager"], required=True)
    ap.add_argument("--rows", type=int, default=41000)
    ap.add_argument("--width", type=int, default=8960)
    args = ap.parse_args()
    torch.manual_seed(0)
    shape = (args.rows, args.width)
    a0, b0, dc = (torch.randn(shape, device="cuda").bfloat16() for _ in range(3))
    fn = variant_fn(args.variant)
    n = WARMUP + CALLS
    with torch.no_grad():
        fwd_ms = median_ms(lambda i: fn(a0, b0))

    # Fresh inputs per call, made before timing (Liger's backward and sft's write over a and b).
    pairs = [(a0.clone().requires_grad_(), b0.clone().requires_grad_()) for _ in range(n)]

    def fwd_bwd(i: int) -> None:
        a, b = pairs[i]
        # autograd.grad returns the gradients without accumulating them into .grad, so only the op is timed.
        # With .backward() into leaves the timing included accumulating into .grad, which the training step's
        # kernels do not show (sft's backward kernel is faster there than Liger's while the leaf timing said slower).
        torch.autograd.grad(fn(a, b), (a, b), dc)

    both_ms = median_ms(fwd_bwd)
    pairs.clear()
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    c = fn(a * 1, b * 1)  # non-leaf inputs, as the MLP's projections are
    c.backward(dc)
    af, bf = a0.float().requires_grad_(), b0.float().requires_grad_()
    c32 = F.silu(af) * bf
    c32.backward(dc.float())
    gb = 5 * a0.numel() * a0.element_size() / 1e9
    print(
        json.dumps(
            {
                "variant": args.variant,
                "rows": args.rows,
                "width": args.width,
                "forward_ms": round(fwd_ms, 4),
                "forward_backward_ms": round(both_ms, 4),
                "fwd_bwd_tb_per_s": round(gb / both_ms, 2),
                "max_c_diff": float((c.float() - c32).abs().max()),
                "max_da_diff": float((a.grad.float() - af.grad).abs().max()),
                "max_db_diff": float((b.grad.float() - bf.grad).abs().max()),
            }
        )
    )


if __name__ == "__main__":
    main()
