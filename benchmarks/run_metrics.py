"""Compare or summarise runs' metrics.jsonl (write them with `file` in trainer.logger).

  python3 benchmarks/run_metrics.py compare A.jsonl B.jsonl [--from N] [--label L]
      max / mean |train loss difference| over the steps both runs logged (from step N)
  python3 benchmarks/run_metrics.py rate A.jsonl
      median tokens/s per GPU and step time over the steps after the first two
Files are read with `sft.plot.read_metrics` (a re-run step keeps its later line).
"""

from __future__ import annotations

import argparse
import statistics

from sft.plot import read_metrics


def compare(a: str, b: str, first: int, label: str) -> str:
    la, lb = dict(read_metrics(a)["train/loss"]), dict(read_metrics(b)["train/loss"])
    steps = sorted(s for s in la.keys() & lb.keys() if s >= first)
    d = [abs(la[s] - lb[s]) for s in steps]
    return (
        f"{label}: steps {steps[0]}..{steps[-1]} ({len(steps)}), max |dloss| {max(d):.3e}, mean |dloss| "
        f"{statistics.mean(d):.3e}, identical {sum(x == 0 for x in d)}/{len(d)}, "
        f"loss {la[steps[0]]:.4f} -> {la[steps[-1]]:.4f}"
    )


def rate(path: str) -> str:
    m = read_metrics(path)
    tok = [v for s, v in m["train/tokens_per_s_per_gpu"] if s > 2]
    dt = [v for s, v in m["train/step_time_s"] if s > 2]
    return f"median tokens/s/GPU {statistics.median(tok):.0f}, step {statistics.median(dt):.2f} s"


def main() -> None:
    p = argparse.ArgumentParser(prog="run_metrics.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--from", dest="first", type=int, default=1)
    c.add_argument("--label", default=None)
    r = sub.add_parser("rate")
    r.add_argument("path")
    args = p.parse_args()
    if args.cmd == "compare":
        print(compare(args.a, args.b, args.first, args.label or f"{args.a} vs {args.b}"))
    else:
        print(rate(args.path))


if __name__ == "__main__":
    main()
