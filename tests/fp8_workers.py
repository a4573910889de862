"""Rank function of tests/test_fp8.py (importable by spawned children, unlike test modules)."""

from __future__ import annotations

import torch

from sft.config.schema import load_config
from sft.parallel.distributed import init_distributed, teardown
from sft.trainer import FSDPSFTTrainer


def train_runs(runs: list[list[str]], out_file: str) -> None:
    """Train each config in turn on CPU, without validate_config (which refuses model.fp8 there: the trainer then
    emulates FP8); rank 0 saves each run's per-step losses and how many linear layers ran in FP8."""
    from torchao.float8.float8_linear import Float8Linear

    ctx = init_distributed("cpu", 1)
    results = []
    try:
        for overrides in runs:
            trainer = FSDPSFTTrainer(load_config(overrides), ctx)
            logged: list[dict] = []
            original = trainer.metrics.log

            def capture(metrics: dict, step: int, logged=logged, original=original) -> None:
                logged.append(metrics)
                original(metrics, step)

            trainer.metrics.log = capture
            trainer.fit()
            fp8 = sum(isinstance(m, Float8Linear) for m in trainer.model.modules())
            results.append({"losses": [m["train/loss"] for m in logged if "train/loss" in m], "fp8": fp8})
        if ctx.rank == 0:
            torch.save(results, out_file)
    finally:
        teardown()
