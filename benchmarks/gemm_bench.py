"""Time the decoder's GEMMs at one micro-batch's size, as autograd runs them, against the GPU's square-GEMM rate.

  python3 benchmarks/gemm_bench.py --variant default --rows 48128 --hidden 1536 --inter 8960 --q 1536 --kv 256

Why: matmuls are about three quarters of a Qwen2.5-1.5B training step's device time, and they run slower there
than a large square bf16 GEMM (the `square` row: about 790 TFLOP/s on an H100). This tells
whether the gap is the shapes (K = hidden is short) or the kernels cuBLAS picks for them.

For each projection [out, in] of the layer: the forward x @ W^T, the input gradient dy @ W and the weight
gradient dy^T @ x, in the layouts nn.Linear's autograd uses. Variants (each its own process: the BLAS choice is
process-wide): `default` (what PyTorch picks), `lt` (cuBLASLt preferred), `tunable` (TunableOp tries cuBLAS's
and cuBLASLt's algorithms for each shape and keeps the fastest). Device time per call: CUDA events, median of 20.
One JSON line per GEMM.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from cuda_timing import median_ms  # benchmarks/ is on sys.path when run as a script


def gemms(hidden: int, inter: int, q: int, kv: int) -> list[tuple[str, int, int]]:
    """(name, out, in) of each projection of one decoder layer."""
    return [("q", q, hidden), ("kv", kv, hidden), ("o", hidden, q), ("gate_up", inter, hidden), ("down", hidden, inter)]


def time_case(name: str, op: str, a: torch.Tensor, b: torch.Tensor, flops: float) -> dict:
    ms = median_ms(lambda i: a @ b)
    return {"gemm": name, "op": op, "shape": [a.shape[0], a.shape[1], b.shape[1]], "ms": round(ms, 4),
            "tflops": round(flops / ms / 1e9, 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=["default", "lt", "tunable"], default="default")
    ap.add_argument("--rows", type=int, default=48128)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--inter", type=int, default=8960)
    ap.add_argument("--q", type=int, default=1536)
    ap.add_argument("--kv", type=int, default=256)
    args = ap.parse_args()
    if args.variant == "lt":
        torch.backends.cuda.preferred_blas_library("cublaslt")
    if args.variant == "tunable":
        torch.cuda.tunable.enable(True)
        torch.cuda.tunable.tuning_enable(True)
        torch.cuda.tunable.set_filename(f"/tmp/tunableop_{os.getpid()}.csv")
    torch.manual_seed(0)
    m = args.rows
    base = {"variant": args.variant, "rows": m, "hidden": args.hidden}
    out = []
    sq = torch.randn(8192, 8192, device="cuda").bfloat16()
    out.append(time_case("square", "8192^3", sq, sq, 2 * 8192**3))
    del sq
    for name, n, k in gemms(args.hidden, args.inter, args.q, args.kv):
        x = torch.randn(m, k, device="cuda").bfloat16()
        w = (torch.randn(n, k, device="cuda") * 0.02).bfloat16()
        dy = torch.randn(m, n, device="cuda").bfloat16()
        f = 2.0 * m * n * k
        out.append(time_case(name, "fwd", x, w.t(), f))  # x @ W^T
        out.append(time_case(name, "dgrad", dy, w, f))  # dy @ W
        out.append(time_case(name, "wgrad", dy.t(), x, f))  # dy^T @ x
        del x, w, dy
    for row in out:
        print(json.dumps({**base, **row}))


if __name__ == "__main__":
    main()
