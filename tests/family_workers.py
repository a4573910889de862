"""Rank functions for the model tests: many tiny models trained in one spawned process group, each run recorded."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from sft.config.checks import validate_config
from sft.config.schema import load_config
from sft.parallel.distributed import DistContext, WorldInfo, init_distributed, teardown
from sft.trainer import FSDPSFTTrainer


def train_recorded(ctx: DistContext, overrides: list[str], around=nullcontext) -> tuple[FSDPSFTTrainer, dict]:
    """Train one run (inside `around()`); returns the trainer and {metrics: every logged step, rows: the cu_seq_lens
    of each packed training row (whole row, SP padding included), weights: the full trained state dict}."""
    cfg = load_config(overrides)
    validate_config(cfg, WorldInfo.from_env())
    trainer = FSDPSFTTrainer(cfg, ctx)
    logged: list[dict] = []
    rows: list[list[int]] = []
    log, forward = trainer.metrics.log, trainer._forward

    def capture(metrics: dict, step: int) -> None:
        logged.append({"step": step, **metrics})
        log(metrics, step)

    def record(mb):
        if trainer.model.training and mb.cu_seq_lens is not None:
            rows.append([int(c) for c in mb.cu_seq_lens])
        return forward(mb)

    trainer.metrics.log, trainer._forward = capture, record
    with around():
        trainer.fit()
    weights = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return trainer, {"weights": weights, "metrics": logged, "rows": rows}


def train_many(jobs: list[tuple[list[str], str]], sp: int) -> None:
    """For each (overrides, out_file): train, then rank 0 saves full weights, metrics and packed rows."""
    ctx = init_distributed("cpu", sp)
    try:
        for overrides, out_file in jobs:
            _, result = train_recorded(ctx, overrides)
            if ctx.rank == 0:
                torch.save(result, out_file)
    finally:
        teardown()


def train_many_batch_wide_rope(jobs: list[tuple[list[str], str]], sp: int) -> None:
    """train_many with a planted error: longrope's frequency set chosen per micro-batch (any sample past the switch
    switches them all, as transformers does), not per sample."""
    import sft.models.loading as loading

    per_sample = loading.long_tokens

    def batch_wide(*args):
        flags = per_sample(*args)
        return flags.any().expand_as(flags)

    loading.long_tokens = batch_wide
    train_many(jobs, sp)
