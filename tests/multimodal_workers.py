"""Rank function for the multimodal tests: tiny multimodal checkpoints trained in one spawned process group."""

from __future__ import annotations

import torch
from family_workers import train_recorded

from sft.parallel.distributed import init_distributed, teardown


def train_jobs(jobs: list[tuple[list[str], str]], sp: int) -> None:
    """For each (overrides, out_file): train; rank 0 saves the full trained weights, the logged metrics, the names of
    the parameters the optimizer holds, of the model's parameters and buffers, and of the frozen tensors."""
    ctx = init_distributed("cpu", sp)
    try:
        for overrides, out_file in jobs:
            trainer, result = train_recorded(ctx, overrides)
            model = trainer.model
            names = {id(p): n for n, p in model.named_parameters()}
            if ctx.rank == 0:
                result |= {
                    "optimized": [names[id(p)] for g in trainer.optimizer.param_groups for p in g["params"]],
                    "params": [n for n, _ in model.named_parameters()],
                    "buffers": [n for n, _ in model.named_buffers()],
                    "frozen": sorted(model.frozen.tensors),
                }
                torch.save(result, out_file)
    finally:
        teardown()
