"""Rank functions for the Ulysses tests (spawned by `run_ranks`, so they live outside test modules).

Every rank builds the same full inputs from one seed, computes the single-rank reference on
the whole packed row itself, then runs the sequence-parallel version on its slice and
asserts that its slice of the output and of the gradients matches.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, PretrainedConfig

from sft.models.attention.varlen import ATTN_NAME, register_varlen_attention, varlen_attention
from sft.parallel.ulysses import ulysses_attention

# Sample lengths of one packed row; the last one is the padding segment that makes T a multiple of 4.
LENGTHS = [7, 12, 1, 9, 3]


def packed_row(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(position_ids [T], cu_seqlens int32 [n+1], max_length) of a row packing `lengths`."""
    pos = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return pos, cu, max(lengths)


def _sp_groups(world: int, sp: int) -> dist.ProcessGroup:
    """This rank's SP group; every rank creates every group, as new_group requires."""
    mine = None
    for start in range(0, world, sp):
        group = dist.new_group(list(range(start, start + sp)))
        if dist.get_rank() in range(start, start + sp):
            mine = group
    return mine


def _check_attention(group: dist.ProcessGroup, heads: int, kv_heads: int) -> None:
    sp, r = dist.get_world_size(group), dist.get_rank(group)
    _, cu, max_len = packed_row(LENGTHS)
    total, d, scale = int(cu[-1]), 8, 8**-0.5
    gen = torch.Generator().manual_seed(1000 * heads + kv_heads)
    q, k, v = (torch.randn(total, h, d, generator=gen) for h in (heads, kv_heads, kv_heads))
    weight = torch.randn(total, heads, d, generator=gen)  # a loss that weighs every output element

    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = varlen_attention(*full, cu, cu, max_len, max_len, scale)  # [T, h, d]
    (ref * weight).sum().backward()

    local = slice(r * total // sp, (r + 1) * total // sp)
    mine = [t[local].clone().requires_grad_() for t in (q, k, v)]  # [T/sp, h, d]

    def attend(qa: torch.Tensor, ka: torch.Tensor, va: torch.Tensor) -> torch.Tensor:
        return varlen_attention(qa, ka, va, cu, cu, max_len, max_len, scale)

    out = ulysses_attention(*mine, group, attend)  # [T/sp, h, d]
    (out * weight[local]).sum().backward()
    where = f"heads={heads} kv_heads={kv_heads} sp={sp} rank={r}"
    torch.testing.assert_close(out, ref[local].detach(), atol=1e-5, rtol=1e-5, msg=lambda m: f"{where}: {m}")
    for name, a, b in zip("qkv", mine, full):
        torch.testing.assert_close(
            a.grad, b.grad[local], atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{where} d{n}: {m}"
        )


def _check_model(config: PretrainedConfig, group: dist.ProcessGroup) -> None:
    sp, r = dist.get_world_size(group), dist.get_rank(group)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=ATTN_NAME)
    pos, cu, max_len = packed_row(LENGTHS)
    total = int(cu[-1])
    ids = torch.randint(0, config.vocab_size, (1, total), generator=torch.Generator().manual_seed(5))
    weight = torch.randn(1, total, config.vocab_size, generator=torch.Generator().manual_seed(6))
    packing = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)

    ref = model(input_ids=ids, position_ids=pos[None], **packing).logits  # [1, T, V]
    (ref * weight).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    local = slice(r * total // sp, (r + 1) * total // sp)
    out = model(input_ids=ids[:, local], position_ids=pos[None, local], sp_group=group, **packing).logits
    torch.testing.assert_close(out, ref[:, local].detach(), atol=1e-5, rtol=1e-5)
    (out * weight[:, local]).sum().backward()
    for name, p in model.named_parameters():
        # Each SP rank holds its tokens' share of the gradient; the SP group's sum is the full gradient.
        dist.all_reduce(p.grad, group=group)
        torch.testing.assert_close(p.grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def ulysses_checks(config: PretrainedConfig, cases: list[tuple[int, int, int]], model_sps: list[int]) -> None:
    """`cases`: (sp, heads, kv_heads) attention checks; `model_sps`: SP sizes of whole-model checks."""
    dist.init_process_group("gloo")
    try:
        register_varlen_attention()
        world = dist.get_world_size()
        for sp, heads, kv_heads in cases:
            _check_attention(_sp_groups(world, sp), heads, kv_heads)
        for sp in model_sps:
            _check_model(config, _sp_groups(world, sp))
    finally:
        dist.destroy_process_group()
