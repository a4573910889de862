"""Ulysses sequence parallelism: all-to-all between sequence and head sharding on an explicit group.

Each rank of a sequence-parallel (SP) group of size k holds a contiguous 1/k slice of the packed
row, slice i on group rank i. Around attention an all-to-all trades that slice for the whole
sequence over 1/k of the heads, attention runs on complete samples, and a second all-to-all
trades back. `check_sp_heads` says up front which SP sizes a model's head counts allow.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


def check_sp_heads(num_heads: int, num_kv_heads: int, sp: int) -> None:
    """Raise ValueError unless `sp` ranks can share the query heads and (split or replicated) KV heads."""
    if sp < 1:
        raise ValueError(f"ulysses_sequence_parallel_size={sp}: must be >= 1")
    if num_heads % sp == 0 and (num_kv_heads % sp == 0 or sp % num_kv_heads == 0):
        return
    valid = [
        p for p in range(1, num_heads + 1) if num_heads % p == 0 and (num_kv_heads % p == 0 or p % num_kv_heads == 0)
    ]
    raise ValueError(
        f"ulysses_sequence_parallel_size={sp} cannot split the model's attention heads "
        f"(num_attention_heads={num_heads}, num_key_value_heads={num_kv_heads}): it must divide "
        f"num_attention_heads and either divide num_key_value_heads or be a multiple of it. "
        f"Set ulysses_sequence_parallel_size to one of {valid}"
    )


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup, to_heads: bool) -> torch.Tensor:
    k = dist.get_world_size(group)
    if to_heads:
        s_local, h, d = x.shape
        assert h % k == 0, f"{h} heads cannot be split over {k} ranks"
        # [s/k, h, d] -> [k, s/k, h/k, d]: chunk j holds head group j and goes to group rank j.
        send = x.reshape(s_local, k, h // k, d).transpose(0, 1).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
        # Chunk j came from group rank j, i.e. sequence slice j: [k, s/k, h/k, d] -> [s, h/k, d].
        return recv.reshape(k * s_local, h // k, d)
    s, h_local, d = x.shape
    assert s % k == 0, f"sequence of {s} tokens cannot be split over {k} ranks"
    # [s, h/k, d] -> [k, s/k, h/k, d]: chunk j is sequence slice j and goes to group rank j.
    send = x.reshape(k, s // k, h_local, d).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # Chunk j came from group rank j, i.e. head group j: [k, s/k, h/k, d] -> [s/k, k, h/k, d] -> [s/k, h, d].
    return recv.transpose(0, 1).reshape(s // k, k * h_local, d)


class SeqAllToAll(torch.autograd.Function):
    """All-to-all between `[s/k, h, d]` (sequence-sharded) and `[s, h/k, d]` (head-sharded).

    The backward of one direction is the all-to-all in the other direction.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, to_heads: bool) -> torch.Tensor:
        ctx.group, ctx.to_heads = group, to_heads
        return _all_to_all(x, group, to_heads)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _all_to_all(grad.contiguous(), ctx.group, not ctx.to_heads), None, None


def seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """`[s/k, h, d]` -> `[s, h/k, d]` over the k ranks of `group` (differentiable)."""
    return SeqAllToAll.apply(x, group, True)


def heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """`[s, h/k, d]` -> `[s/k, h, d]` over the k ranks of `group` (differentiable)."""
    return SeqAllToAll.apply(x, group, False)


def ulysses_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    group: dist.ProcessGroup,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Attention over the whole sequence from local slices: q `[s/k, h, d]`, k/v `[s/k, h_kv, d]` -> `[s/k, h, d]`.

    `attend(q [s, h/k, d], k [s, h_kv', d], v)` runs the full-sequence attention on this rank's heads
    (GQA included: query head i reads KV head i // (h / h_kv'), as in Hugging Face models).
    """
    sp = dist.get_world_size(group)
    num_heads, num_kv_heads = query.shape[1], key.shape[1]
    check_sp_heads(num_heads, num_kv_heads, sp)
    if num_kv_heads < sp:
        # Fewer KV heads than ranks: rank r holds query heads [r*h/k, (r+1)*h/k), which all read KV head
        # r // (k/h_kv). repeat_interleave lays the copies out as [kv0, kv0, ..., kv1, kv1, ...], so the
        # head split below hands rank r exactly that head. [s/k, h_kv, d] -> [s/k, k, d]
        key = key.repeat_interleave(sp // num_kv_heads, dim=1)
        value = value.repeat_interleave(sp // num_kv_heads, dim=1)
    # [s/k, h, d] -> [s, h/k, d]; with h_kv % k == 0 each rank gets the contiguous KV group its queries read.
    q, k, v = (seq_to_heads(t, group) for t in (query, key, value))
    out = attend(q, k, v)  # [s, h/k, d]
    return heads_to_seq(out, group)  # [s/k, h, d]


def local_heads(group: dist.ProcessGroup | None, num_heads: int) -> slice:
    """The query heads this rank attends to inside `ulysses_attention`: the r-th of k equal groups.

    Per-head parameters (e.g. gpt-oss's sink logits `[h]`) are sliced with it to match `[s, h/k, d]`.
    """
    assert group is not None, "per-head parameters only need slicing under sequence parallelism"
    k, r = dist.get_world_size(group), dist.get_rank(group)
    return slice(r * num_heads // k, (r + 1) * num_heads // k)
