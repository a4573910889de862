"""The step plan: numbers derived from the config, the world and the dataset size.

Per-rank batch, gradient-accumulation steps, steps per epoch, total and warm-up steps. They live here, computed
once when the dataset size is known, and are never written back into the config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sft.config.errors import need
from sft.config.schema import SFTConfig
from sft.loop.optim import resolve_warmup_steps


@dataclass(frozen=True)
class Plan:
    """Numbers derived from the config, the world and the dataset size."""

    dp_size: int
    sp_size: int
    per_rank_batch: int  # samples per data-parallel rank per optimizer step
    micro_batches: int  # gradient-accumulation steps per optimizer step
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def make_plan(cfg: SFTConfig, world_size: int, train_len: int) -> Plan:
    sp = cfg.ulysses_sequence_parallel_size
    dp = world_size // sp
    b = cfg.data.train_batch_size
    steps_per_epoch = train_len // b
    need(
        steps_per_epoch > 0,
        f"data.train_batch_size={b} is larger than the training set ({train_len} usable samples); "
        "lower data.train_batch_size or add data",
    )
    total = cfg.trainer.total_training_steps or steps_per_epoch * cfg.trainer.total_epochs
    need(
        total <= steps_per_epoch * cfg.trainer.total_epochs,
        f"trainer.total_training_steps={total} needs more than trainer.total_epochs={cfg.trainer.total_epochs} "
        f"epochs of {steps_per_epoch} steps; raise trainer.total_epochs",
    )
    o = cfg.optim
    warmup = resolve_warmup_steps(total, o.lr_warmup_steps, o.lr_warmup_steps_ratio)
    need(
        warmup < total or total == 1,
        f"optim warmup of {warmup} steps is not shorter than the {total} training steps; "
        "lower optim.lr_warmup_steps / optim.lr_warmup_steps_ratio",
    )
    return Plan(
        dp_size=dp,
        sp_size=sp,
        per_rank_batch=b // dp,
        micro_batches=math.ceil(b // dp / cfg.data.micro_batch_size_per_gpu),
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=warmup,
    )
