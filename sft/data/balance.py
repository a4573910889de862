"""Token-budget micro-batches, balanced over data-parallel ranks.

Given the lengths of one global batch, `plan_step` splits it over the dp ranks so that every
rank gets about the same number of tokens, then packs each rank's samples into micro-batches
of at most `budget` tokens. Every rank ends with the same number of micro-batches (FSDP's
collectives are matched per forward), as few as the budget allows. The plan depends only on
the lengths, so every rank computes the same plan without talking to the others.
"""

from __future__ import annotations

import heapq


def _spread(lengths: list[int], items: list[int], n_bins: int) -> list[list[int]]:
    """Longest-first onto the currently lightest bin (LPT): near-equal token sums."""
    heap = [(0, b) for b in range(n_bins)]
    bins: list[list[int]] = [[] for _ in range(n_bins)]
    for i in sorted(items, key=lambda i: (-lengths[i], i)):
        load, b = heapq.heappop(heap)
        bins[b].append(i)
        heapq.heappush(heap, (load + lengths[i], b))
    return bins


def _first_fit_count(lengths: list[int], items: list[int], budget: int) -> int:
    """How many bins first-fit-decreasing needs: a lower start for the balanced search."""
    loads: list[int] = []
    for i in sorted(items, key=lambda i: -lengths[i]):
        for b, load in enumerate(loads):
            if load + lengths[i] <= budget:
                loads[b] += lengths[i]
                break
        else:
            loads.append(lengths[i])
    return len(loads)


def plan_step(lengths: list[int], dp_size: int, budget: int) -> list[list[list[int]]]:
    """Positions into `lengths` as [dp rank][micro-batch][sample]; every micro-batch <= budget.

    Each rank holds at least one sample when the batch has at least dp_size samples.
    """
    assert max(lengths) <= budget, "validated: max_token_len_per_gpu >= data.max_length"
    per_rank = _spread(lengths, list(range(len(lengths))), dp_size)
    n_mb = max(_first_fit_count(lengths, items, budget) for items in per_rank)
    while True:
        plan = [_spread(lengths, items, n_mb) for items in per_rank]
        if all(sum(lengths[i] for i in mb) <= budget for rank in plan for mb in rank):
            break
        n_mb += 1  # LPT over n_mb bins overflowed one: one more micro-batch everywhere
    # Keep the samples of a micro-batch in batch order (deterministic, easy to read in logs).
    return [[sorted(mb) for mb in rank] for rank in plan]
