"""Preemption: turn SIGTERM/SIGUSR1 into "save at the next step boundary, then exit".

Schedulers (SLURM, Kubernetes, torchrun's own teardown) send SIGTERM some time before they
kill a job. The handler only sets a flag; the trainer asks `requested()` after every
optimizer step, and all ranks agree through one all-reduce (a signal may reach the ranks at
different steps), so they all save the same step and leave together.
"""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

logger = logging.getLogger("sft")

EXIT_CODE = 143  # 128 + SIGTERM: the run did not finish, a relaunch resumes it


class Preempted(Exception):
    """Raised after the preemption checkpoint is saved; the CLI exits with EXIT_CODE."""


class PreemptionWatcher:
    def __init__(self, group: dist.ProcessGroup, device: torch.device) -> None:
        self.group, self.device = group, device
        self.flag = False
        self.signum: int | None = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.flag, self.signum = True, signum

    def requested(self) -> bool:
        """True on every rank when any rank received a signal (a collective: call on all ranks)."""
        t = torch.tensor([1.0 if self.flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item() > 0)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
