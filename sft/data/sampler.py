"""Which samples each data-parallel rank trains on at each optimizer step, in which micro-batches.

The order of an epoch is a permutation seeded by (seed, epoch); step s takes the global
batch `perm[s*B:(s+1)*B]`. With a fixed micro-batch size, dp rank r takes its r-th contiguous
slice, cut into micro-batches of that size; with a token budget, the whole global batch is
balanced over the ranks by tokens (sft.data.balance). The position is just (epoch, step), so
resuming is O(1) and never re-reads skipped batches, and the same global batch is trained
whatever the number of ranks. Ranks of one sequence-parallel group share a dp rank.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from sft.data.balance import plan_step


class StepBatchSampler:
    """Yields, per optimizer step, this dp rank's micro-batches as lists of sample indices."""

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        micro_batch_size: int,
        lengths: np.ndarray | None = None,
        token_budget: int | None = None,
    ) -> None:
        assert global_batch % dp_size == 0, "validated: the global batch splits over dp ranks"
        assert token_budget is None or lengths is not None, "a token budget needs the sample lengths"
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.per_rank = global_batch // dp_size
        self.micro_batch_size = micro_batch_size
        self.lengths, self.token_budget = lengths, token_budget
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

    def __iter__(self) -> Iterator[list[list[int]]]:
        perm = self.epoch_order(self.epoch)
        for step in range(self.start_step, self.num_samples // self.global_batch):
            batch = perm[step * self.global_batch : (step + 1) * self.global_batch].tolist()
            yield self.micro_batches(batch)

    def micro_batches(self, batch: list[int]) -> list[list[int]]:
        if self.token_budget is None:
            mine = batch[self.dp_rank * self.per_rank : (self.dp_rank + 1) * self.per_rank]
            mbs = self.micro_batch_size
            return [mine[i : i + mbs] for i in range(0, len(mine), mbs)]
        plan = plan_step([int(self.lengths[i]) for i in batch], self.dp_size, self.token_budget)
        return [[batch[pos] for pos in mb] for mb in plan[self.dp_rank]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start_step": self.start_step}

    def load_state_dict(self, state: dict) -> None:
        self.set_position(state["epoch"], state["start_step"])


def eval_indices(num_samples: int, dp_rank: int, dp_size: int) -> list[int]:
    """Every validation sample exactly once over the dp ranks (round robin, no drop)."""
    return list(range(dp_rank, num_samples, dp_size))
