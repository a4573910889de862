"""How long a small torch op takes on the training thread while another thread runs Python code
(the prefetch thread packing the next step), at a given GIL switch interval (sft/data/prefetch.py), and
how much work that other thread got done meanwhile. Run it several times: the outcome is bimodal.

  python3 benchmarks/gil_bench.py 0.005    # Python's default
  python3 benchmarks/gil_bench.py 0.0005   # what sft sets while a prefetch thread runs
"""

from __future__ import annotations

import sys
import threading
import time

import torch


def main() -> None:
    interval = float(sys.argv[1]) if len(sys.argv) > 1 else 0.005
    sys.setswitchinterval(interval)
    stop = threading.Event()

    rounds = [0]

    def python_busy() -> None:
        x = 0
        while not stop.is_set():
            for i in range(1000):
                x += i * i
            rounds[0] += 1

    mask = torch.ones(1, 49152, dtype=torch.bool)  # one packed micro-batch's mask

    def op_ms() -> tuple[float, float, float]:
        times = []
        for _ in range(200):
            start = time.perf_counter()
            int(mask.sum())
            times.append(time.perf_counter() - start)
        times.sort()
        return times[len(times) // 2] * 1e3, times[int(len(times) * 0.97)] * 1e3, sum(times) / len(times) * 1e3

    alone = op_ms()
    worker = threading.Thread(target=python_busy, daemon=True)
    worker.start()
    time.sleep(0.05)
    start, done = time.perf_counter(), rounds[0]
    beside = op_ms()
    rate = (rounds[0] - done) / (time.perf_counter() - start)
    stop.set()
    print(
        f"switch interval {interval * 1e3:g} ms: op alone mean {alone[2]:.3f} ms (median {alone[0]:.3f}); "
        f"beside a Python-busy thread mean {beside[2]:.3f} ms (median {beside[0]:.3f}, p97 {beside[1]:.3f}), "
        f"which meanwhile ran {rate:,.0f} rounds/s"
    )


if __name__ == "__main__":
    main()
