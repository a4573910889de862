"""One optimizer step under torch.profiler, for `python -m sft.bench --profile DIR`.

The benchmark runs one extra step after its timed ones and records it here, so the timed
figures are not slowed by the profiler. Rank 0 writes a Chrome trace (open it in
chrome://tracing or Perfetto) and `ops.txt`: the ops and kernels that took the most device time.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

logger = logging.getLogger("sft")


class StepProfiler:
    """Start when step `step - 1` is logged, stop and write when `step` is logged."""

    def __init__(self, out_dir: Path, step: int, rank: int) -> None:
        self.out_dir, self.step, self.rank = out_dir, step, rank
        self.prof: profile | None = None

    def on_step_logged(self, step: int) -> None:
        if step == self.step - 1:
            activities = [ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(ProfilerActivity.CUDA)
            self.prof = profile(activities=activities, record_shapes=False)
            self.prof.__enter__()
        elif step == self.step and self.prof is not None:
            self.prof.__exit__(None, None, None)
            if self.rank == 0:
                self._write()
            self.prof = None

    def _write(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.out_dir / f"trace_step{self.step}.json"))
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = self.prof.key_averages().table(sort_by=sort, row_limit=40)
        (self.out_dir / "ops.txt").write_text(table)
        logger.info("profile of step %d written to %s", self.step, self.out_dir)
