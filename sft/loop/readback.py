"""The step's one read-back: what a training step reports, copied from the device in one go, by name.

Everything a step logs or checks (loss sum, argmax hits, gradient norm, the global token counts, the
preemption flag, useful FLOPs) sits in one float64 device vector that the trainer reads back with a
single `.tolist()` after the last backward: one host synchronisation per step. `StepReadback` names the
entries of that vector; `host_counts` builds its counts part from this rank's micro-batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sft.data.batch import MicroBatch


@dataclass(frozen=True)
class StepReadback:
    """One step's values on the host, summed over the world (in the order of the device vector)."""

    loss_sum: float  # token cross-entropy summed over every target of the global batch
    correct: float  # targets whose argmax prediction is right
    grad_norm: float  # total gradient norm, before clipping
    targets: float  # target tokens of the global batch
    real_tokens: float  # real (non-padding) tokens
    slots: float  # token positions run, padding included
    preempt: float  # > 0 when any rank got a preemption signal
    useful_flops: float  # the step's useful FLOPs (0 where no peak is known: MFU is not reported)

    @staticmethod
    def host_counts(micro_batches: Sequence[MicroBatch], preempt: bool, useful_flops: float) -> torch.Tensor:
        """This rank's `[targets, real_tokens, slots, preempt, useful_flops]`, float64 on the host, from counts
        the micro-batch builder found on the host: making it reads nothing back from the device."""
        return torch.tensor(
            [
                sum(mb.targets for mb in micro_batches),
                sum(mb.real_tokens for mb in micro_batches),
                sum(mb.slots for mb in micro_batches),
                1.0 if preempt else 0.0,
                useful_flops,
            ],
            dtype=torch.float64,
        )

    @classmethod
    def read(cls, sums: torch.Tensor, grad_norm: torch.Tensor, counts: torch.Tensor) -> StepReadback:
        """The step's one read-back (the host waits for the device here): `sums` = [loss sum, hits] and the
        world-summed `host_counts` vector, with the 0-d `grad_norm` between them."""
        values = torch.cat([sums, grad_norm.double().reshape(1), counts]).tolist()
        assert len(values) == len(fields(cls)), f"{len(values)} values read back for {len(fields(cls))} fields"
        return cls(*values)

    @property
    def loss(self) -> float:
        """Mean token cross-entropy of the global batch."""
        return self.loss_sum / self.targets
