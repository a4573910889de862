"""Time the two gradient sums a decoder layer's backward runs as separate kernels, against fused forms (GPU).

  python3 benchmarks/grad_sum_bench.py --rows 41000 --hidden 1536 --widths 1536,256 --inter 8960

- bias: a projection's bias gradient, dy [rows, n] summed over rows. Autograd runs a reduction kernel
  (`dy.sum(0)`; 252 calls a Qwen2.5-1.5B step); a GEMV against a ones vector
  reads dy once the same way.
- fan_in: the input gradient of sibling projections (gate and up), dx = da @ Wg + db @ Wu. Autograd runs two
  GEMMs and a bf16 add; `addmm` with beta=1 sums the second in its epilogue, in fp32 before rounding.
- qkv_fan_in: the same for q, k and v (widths as --widths): two adds, or the k and v GEMMs adding in place.

Device time per call (CUDA events, median of 20); one JSON line per case.
"""

from __future__ import annotations

import argparse
import json

import torch
from cuda_timing import median_ms  # benchmarks/ is on sys.path when run as a script


def _timed(case: str, variant: str, fn, ref: torch.Tensor, **shape) -> dict:
    """One JSON row: `fn`'s device time and its largest deviation from the fp64 reference."""
    err = float((fn().double() - ref).abs().max())
    return {"case": case, "variant": variant, **shape, "ms": round(median_ms(lambda i: fn()), 4), "max_err": err}


def bias_cases(rows: int, widths: list[int]) -> list[dict]:
    out = []
    for n in widths:
        dy = torch.randn(rows, n, device="cuda").bfloat16()
        ones = torch.ones(rows, device="cuda", dtype=torch.bfloat16)
        ref = dy.double().sum(0)
        out.append(_timed("bias", "reduce", lambda dy=dy: dy.sum(0), ref, rows=rows, n=n))
        out.append(_timed("bias", "gemv", lambda dy=dy, ones=ones: torch.mv(dy.t(), ones), ref, rows=rows, n=n))
    return out


def fan_in_cases(rows: int, hidden: int, inter: int) -> list[dict]:
    da, db = (torch.randn(rows, inter, device="cuda").bfloat16() for _ in range(2))
    wg, wu = ((torch.randn(inter, hidden, device="cuda") * 0.02).bfloat16() for _ in range(2))
    ref = da.double() @ wg.double() + db.double() @ wu.double()
    shape = {"rows": rows, "hidden": hidden, "inter": inter}
    return [
        # two GEMMs and an add, as autograd sums the two input gradients
        _timed("fan_in", "mm_add", lambda: da @ wg + db @ wu, ref, **shape),
        # the second GEMM adds into the first's output
        _timed("fan_in", "addmm", lambda: torch.addmm(da @ wg, db, wu), ref, **shape),
    ]


def qkv_fan_in_cases(rows: int, hidden: int, q: int, kv: int) -> list[dict]:
    """The input gradient of q, k and v (one input, three projections): dx = dq @ Wq + dk @ Wk + dv @ Wv."""
    dq, dk, dv = (torch.randn(rows, n, device="cuda").bfloat16() for n in (q, kv, kv))
    wq, wk, wv = ((torch.randn(n, hidden, device="cuda") * 0.02).bfloat16() for n in (q, kv, kv))
    ref = dq.double() @ wq.double() + dk.double() @ wk.double() + dv.double() @ wv.double()
    shape = {"rows": rows, "hidden": hidden, "q": q, "kv": kv}

    def chained():  # the k and v GEMMs add into the q one's output in their epilogues
        dx = dq @ wq
        dx.addmm_(dk, wk)
        return dx.addmm_(dv, wv)

    return [
        _timed("qkv_fan_in", "mm_add", lambda: dq @ wq + dk @ wk + dv @ wv, ref, **shape),  # as autograd sums them
        _timed("qkv_fan_in", "addmm", chained, ref, **shape),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=41000)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--widths", default="1536,256", help="bias widths (q, and k/v)")
    ap.add_argument("--inter", type=int, default=8960)
    args = ap.parse_args()
    torch.manual_seed(0)
    widths = [int(w) for w in args.widths.split(",")]
    cases = bias_cases(args.rows, widths) + fan_in_cases(args.rows, args.hidden, args.inter)
    for row in cases + qkv_fan_in_cases(args.rows, args.hidden, widths[0], widths[1]):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
