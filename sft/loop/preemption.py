"""Preemption: turn SIGTERM/SIGUSR1 into "save at the next step boundary, then exit".

Schedulers (SLURM, Kubernetes, torchrun's own teardown) send SIGTERM some time before they
kill a job. The handler only sets a flag; the trainer asks `requested()` after every
optimizer step, and all ranks agree through one all-reduce (a signal may reach the ranks at
different steps), so they all save the same step and leave together. If that takes longer
than the grace time, a watchdog ends the process: saves are atomic, so the previous complete
checkpoint stays the latest.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import torch
import torch.distributed as dist

logger = logging.getLogger("sft")

EXIT_CODE = 143  # 128 + SIGTERM: the run did not finish, a relaunch resumes it


class Preempted(Exception):
    """Raised after the preemption checkpoint is saved; the CLI exits with EXIT_CODE."""


class PreemptionWatcher:
    def __init__(self, group: dist.ProcessGroup, device: torch.device, grace_s: float) -> None:
        self.group, self.device, self.grace_s = group, device, grace_s
        self.flag = False
        self.signum: int | None = None
        self._watchdog: threading.Timer | None = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.flag, self.signum = True, signum
        if self._watchdog is None:
            self._watchdog = threading.Timer(self.grace_s, self._out_of_time)
            self._watchdog.daemon = True
            self._watchdog.start()

    def _out_of_time(self) -> None:
        logger.error(
            "preemption: trainer.preempt_grace_s=%s passed before the checkpoint was complete; exiting. The previous "
            "complete checkpoint stays the latest",
            self.grace_s,
        )
        logging.shutdown()
        os._exit(EXIT_CODE)

    def requested(self) -> bool:
        """True on every rank when any rank received a signal (a collective: call on all ranks)."""
        t = torch.tensor([1.0 if self.flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item() > 0)

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
