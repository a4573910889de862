"""Rank function for the hybrid-model tests: many tiny hybrids trained in one spawned process group, each
optionally with a planted leak (the packed rows' sample boundaries hidden from the recurrent mixers)."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from family_workers import train_recorded

from sft.models.recurrent.packed import PackedRow
from sft.parallel.distributed import init_distributed, teardown


@contextmanager
def leaking_rows():
    """Every packed row looks like one sample to the recurrent mixers: state and convolution window run on
    across sample boundaries (attention still sees the boundaries)."""
    bounds, sample_index = PackedRow.bounds, PackedRow.sample_index
    PackedRow.bounds = lambda self: [0, self.length]
    PackedRow.sample_index = lambda self: torch.zeros(self.length, dtype=torch.long, device=self.cu.device)
    try:
        yield
    finally:
        PackedRow.bounds, PackedRow.sample_index = bounds, sample_index


def train_hybrids(jobs: list[tuple[list[str], str, bool]], sp: int) -> None:
    """For each (overrides, out_file, leak): train; rank 0 saves full weights, metrics and the packed rows' bounds."""
    ctx = init_distributed("cpu", sp)
    try:
        for overrides, out_file, leak in jobs:
            _, result = train_recorded(ctx, overrides, leaking_rows if leak else nullcontext)
            if ctx.rank == 0:
                torch.save(result, out_file)
    finally:
        teardown()
