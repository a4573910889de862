"""Image blocks in packed attention: the tokens of one image attend to each other both ways (Gemma 3).

transformers' Gemma 3 lets the soft tokens of one image see each other in both directions, and everything before
them causally: OR(causal, same block) on full-attention layers, AND(window, OR(causal, same block)) on sliding ones,
where a window of W keeps key j for query i iff j > i - W (Gemma 4: on the sliding layers only, full layers stay
causal). A block is a run of image tokens; in a packed row each
sample keeps its own. `ImageBlocks` holds a row's blocks, found on the host when the micro-batch is built, with what
the CUDA path needs without a host sync: the rows of the blocks' queries, the rows of the keys each block sees (its
sample's start through its own end) and their cumulative lengths. On CUDA that is one more varlen call over the
block queries, non-causal (sft/models/attention/varlen.py); the reference builds the mask per segment.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch


def runs(flags: list[bool], start: int, end: int) -> list[tuple[int, int]]:
    """The maximal runs [a, b) of true flags within [start, end)."""
    out: list[tuple[int, int]] = []
    t = start
    while t < end:
        if flags[t]:
            a = t
            while t < end and flags[t]:
                t += 1
            out.append((a, t))
        else:
            t += 1
    return out


@dataclass(frozen=True)
class ImageBlocks:
    spans: tuple[tuple[int, int, int], ...]  # (sample start, block start, block end) in row coordinates, host
    rows: torch.Tensor  # int64 [Q]: the blocks' tokens, block after block (the extra call's queries)
    keys: torch.Tensor  # int64 [K]: for each block, its sample's start through its end (that call's keys)
    cu_q: torch.Tensor  # int32 [m + 1]: cumulative block lengths
    cu_k: torch.Tensor  # int32 [m + 1]: cumulative key counts
    max_q: int
    max_k: int
    sliding_only: bool = False  # Gemma 4: only sliding-window layers let a block see itself both ways

    @classmethod
    def find(cls, is_image: torch.Tensor, bounds: list[int], sliding_only: bool = False) -> ImageBlocks | None:
        """The blocks of a packed row: `is_image` [T] (bool, host), `bounds` its samples' cumulative lengths.
        None when the row has no image token."""
        flags = is_image.tolist()
        spans = [(start, a, b) for start, end in zip(bounds[:-1], bounds[1:]) for a, b in runs(flags, start, end)]
        if not spans:
            return None
        rows = torch.cat([torch.arange(a, b) for _, a, b in spans])
        keys = torch.cat([torch.arange(s, b) for s, _, b in spans])
        q_len = torch.tensor([b - a for _, a, b in spans])
        k_len = torch.tensor([b - s for s, _, b in spans])
        zero = torch.zeros(1, dtype=torch.int32)
        return cls(
            spans=tuple(spans),
            rows=rows,
            keys=keys,
            cu_q=torch.cat([zero, q_len.cumsum(0).to(torch.int32)]),
            cu_k=torch.cat([zero, k_len.cumsum(0).to(torch.int32)]),
            max_q=int(q_len.max()),
            max_k=int(k_len.max()),
            sliding_only=sliding_only,
        )

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ImageBlocks:
        """The same blocks with `fn` applied to each tensor (pinning, the copy to the device)."""
        return replace(self, **{k: fn(getattr(self, k)) for k in ("rows", "keys", "cu_q", "cu_k")})

    def block_ids(self, total: int) -> torch.Tensor:
        """[total] int64 on the host: the block index of each row token, -1 outside every block."""
        ids = torch.full((total,), -1, dtype=torch.long)
        for k, (_, a, b) in enumerate(self.spans):
            ids[a:b] = k
        return ids
