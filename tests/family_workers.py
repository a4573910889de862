"""Rank function for the family tests: many tiny models trained in one spawned process group."""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from sft.config.checks import validate_config
from sft.config.schema import load_config
from sft.parallel.distributed import WorldInfo, init_distributed, teardown
from sft.trainer import FSDPSFTTrainer


def train_many(jobs: list[tuple[list[str], str]], sp: int) -> None:
    """For each (overrides, out_file): train, then rank 0 saves full weights, metrics and val loss (or the error)."""
    ctx = init_distributed("cpu", sp)
    try:
        for overrides, out_file in jobs:
            cfg = load_config(overrides)
            validate_config(cfg, WorldInfo.from_env())
            trainer = FSDPSFTTrainer(cfg, ctx)
            logged: list[dict] = []
            original = trainer.metrics.log

            def capture(metrics: dict, step: int, logged=logged, original=original) -> None:
                logged.append({"step": step, **metrics})
                original(metrics, step)

            trainer.metrics.log = capture
            trainer.fit()
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            sd = get_model_state_dict(trainer.model, options=opts)
            if ctx.rank == 0:
                torch.save({"weights": sd, "metrics": logged}, out_file)
    finally:
        teardown()
