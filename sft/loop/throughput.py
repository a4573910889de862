"""Per-step throughput of the training loop: step time, tokens/s per GPU, MFU and peak memory.

`StepTimer` times steps (synchronising the device first, unless the caller's own read-back does);
`step_rates` turns one step's token counts, useful FLOPs and wall time into the logged
`train/...` rates. FLOP counts themselves come from sft/loop/flops.py.
"""

from __future__ import annotations

import statistics
import time

import torch

from sft.loop.flops import mfu


def step_rates(
    total_tokens: float,
    trained_tokens: float,
    useful_flops: float,
    seconds: float,
    world_size: int,
    peak_flops: float | None,
    device: torch.device,
) -> dict[str, float]:
    """The step's rates from its global counts: tokens/s per GPU (all real tokens, and targets only),
    useful MFU where the GPU's peak is known, and the peak allocated memory on CUDA."""
    out = {
        "train/step_time_s": seconds,
        "train/tokens_per_s_per_gpu": total_tokens / seconds / world_size,
        "train/trained_tokens_per_s_per_gpu": trained_tokens / seconds / world_size,
    }
    if peak_flops:  # None on CPU or an unknown GPU: no train/mfu
        out["train/mfu"] = mfu(useful_flops, seconds, peak_flops, world_size)
    if device.type == "cuda":
        out["train/peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    return out


class StepTimer:
    """Wall time of steps, synchronizing the accelerator so queued kernels are counted.

    The first `warmup` measured steps (allocator growth, autotuning, compilation) are
    returned by `stop()` but kept out of `median_s`. With `sync=False` the caller's own
    read-back inside each step is the synchronisation point (the trainer's loop: one per step),
    so a step's time covers the GPU work queued since the previous step's read-back.
    """

    def __init__(self, device: torch.device, warmup: int = 1, sync: bool = True) -> None:
        self.device = device
        self.sync = sync
        self.warmup = warmup
        self.times: list[float] = []
        self._t0: float | None = None

    def _sync(self) -> None:
        if self.sync and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        assert self._t0 is not None, "StepTimer.stop() without start()"
        self._sync()
        elapsed = time.perf_counter() - self._t0
        self._t0 = None
        if self.warmup > 0:
            self.warmup -= 1
        else:
            self.times.append(elapsed)
        return elapsed

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times) if self.times else None
