"""Which samples each data-parallel rank trains on at each optimizer step.

The order of an epoch is a permutation seeded by (seed, epoch); step s takes the global
batch `perm[s*B:(s+1)*B]` and data-parallel rank r its r-th contiguous slice. The position
is just (epoch, step), so resuming is O(1) and never re-reads skipped batches; and the same
global batch is trained whatever the number of ranks (what the split-invariance relies on).
Ranks of one sequence-parallel group share a dp rank, hence the same samples.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class StepBatchSampler:
    """Yields, per optimizer step, the list of this dp rank's sample indices."""

    def __init__(self, num_samples: int, global_batch: int, dp_rank: int, dp_size: int, seed: int) -> None:
        assert global_batch % dp_size == 0, "validated: the global batch splits over dp ranks"
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.dp_rank = dp_rank
        self.per_rank = global_batch // dp_size
        self.seed = seed
        self.epoch = 0
        self.start_step = 0

    def __len__(self) -> int:
        return self.num_samples // self.global_batch - self.start_step

    def set_position(self, epoch: int, step_in_epoch: int) -> None:
        self.epoch, self.start_step = epoch, step_in_epoch

    def epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        perm = self.epoch_order(self.epoch)
        for step in range(self.start_step, self.num_samples // self.global_batch):
            batch = perm[step * self.global_batch : (step + 1) * self.global_batch]
            mine = batch[self.dp_rank * self.per_rank : (self.dp_rank + 1) * self.per_rank]
            yield mine.tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start_step": self.start_step}

    def load_state_dict(self, state: dict) -> None:
        self.set_position(state["epoch"], state["start_step"])


def eval_indices(num_samples: int, dp_rank: int, dp_size: int) -> list[int]:
    """Every validation sample exactly once over the dp ranks (round robin, no drop)."""
    return list(range(dp_rank, num_samples, dp_size))
