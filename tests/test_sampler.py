"""Which samples each rank trains on: every sample exactly once per epoch, same global batches
for any number of ranks, token-budget micro-batches within budget and equal in number across
ranks, and an O(1) position for resume."""

from __future__ import annotations

import numpy as np
import pytest

from sft.data.balance import plan_step
from sft.data.sampler import StepBatchSampler, eval_indices


def epoch(n: int, batch: int, dp: int, micro: int = 2, lengths=None, budget=None, epoch_no: int = 0):
    """{rank: [step plans]} for one epoch."""
    out = {}
    for r in range(dp):
        s = StepBatchSampler(n, batch, r, dp, seed=7, micro_batch_size=micro, lengths=lengths, token_budget=budget)
        s.set_position(epoch_no, 0)
        out[r] = list(s)
    return out


@pytest.mark.parametrize("dp,budget", [(1, None), (2, None), (4, None), (2, 900), (4, 600)])
def test_every_sample_once_per_epoch_and_equal_micro_batch_counts(dp, budget):
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 300, size=103)
    plans = epoch(103, 16, dp, lengths=lengths, budget=budget)
    steps = 103 // 16
    seen = []
    for step in range(steps):
        counts = {len(plans[r][step]) for r in range(dp)}
        assert len(counts) == 1, f"step {step}: ranks run different numbers of micro-batches {counts}"
        for r in range(dp):
            for mb in plans[r][step]:
                if budget:
                    assert sum(lengths[i] for i in mb) <= budget
                seen += mb
    assert len(seen) == len(set(seen)) == steps * 16  # nothing twice, the remainder dropped


def test_global_batches_do_not_depend_on_rank_count():
    one = epoch(64, 16, 1)[0]
    four = epoch(64, 16, 4)
    for step in range(4):
        merged = sorted(i for r in range(4) for mb in four[r][step] for i in mb)
        assert merged == sorted(i for mb in one[step] for i in mb)


def test_epochs_are_reshuffled_and_position_is_o1():
    e0, e1 = epoch(64, 16, 1)[0], epoch(64, 16, 1, epoch_no=1)[0]
    assert e0 != e1
    s = StepBatchSampler(64, 16, 0, 1, seed=7, micro_batch_size=2)
    s.set_position(1, 2)
    assert list(s) == e1[2:]  # resuming at (epoch 1, step 2) yields exactly the rest, nothing re-read
    assert s.state_dict() == {"epoch": 1, "start_step": 2}


def test_budget_plan_balances_tokens():
    lengths = [500, 400, 300, 300, 200, 100, 100, 100]  # 2000 tokens: 1000 per rank is reachable
    plan = plan_step(lengths, dp_size=2, budget=600)
    per_rank = [sum(lengths[i] for mb in rank for i in mb) for rank in plan]
    assert per_rank == [1000, 1000]
    assert len(plan[0]) == len(plan[1]) == 2  # 1000 tokens need two micro-batches of <= 600
    assert all(sum(lengths[i] for i in mb) <= 600 for rank in plan for mb in rank)
    assert sorted(i for rank in plan for mb in rank for i in mb) == list(range(8))


def test_eval_indices_cover_everything_once():
    parts = [eval_indices(10, r, 3) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(10))
