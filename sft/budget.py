"""The automatic token budget of a packed micro-batch (`use_remove_padding=true`).

The loss is the exact global token mean, so how a rank's samples are cut into micro-batches
does not change the update; only speed and memory depend on it. The budget is therefore the
trainer's choice, for everyone: at least `micro_batch_size_per_gpu x max_length` tokens (the
worst case of a padded micro-batch of the user's keys, so whatever fits in verl fits here),
larger when the device's free memory, estimated from the model shape, holds more activations.
An explicit `data.max_token_len_per_gpu` is a cap that is always obeyed. Every rank takes the
smallest choice of the world, so the micro-batch plans of all ranks stay identical.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import PretrainedConfig

from sft.fused_ce import DEFAULT_CHUNK

logger = logging.getLogger("sft")

GIB = 1024**3
# The estimate below is a model of memory, not a measurement: it is not extrapolated past this.
MAX_AUTO_TOKENS = 65536
# Multiplier on the per-token activation estimate. Measured peaks (one H200, Qwen2.5-1.5B shape, bf16
# master): full checkpointing 19.4 GB with an 8,192-token budget vs 26.1 GB with 65,536 (~61k tokens per
# micro-batch), about 0.13 MB per token, where the formula gives 0.36 MB; no checkpointing (2026-12-01,
# fp32 master, 16k budget) about 1.8 MB per token against the formula's 3.6 MB. The formula alone keeps
# a margin of 2x or more on both, so no further factor.
SAFETY = 1.0
ROUND = 1024
PADDED_COST = (
    "use_remove_padding=false: padded micro-batches of data.micro_batch_size_per_gpu samples compute on padding "
    "and wait for the GPU on every micro-batch; measured 5.9x fewer tokens/s than use_remove_padding=true "
    "(Qwen2.5-1.5B shape, one H100, 2026-11-23, docs/PERFORMANCE.md). The loss is the same either way"
)


@dataclass(frozen=True)
class TokenBudget:
    tokens: int
    reason: str


def activation_bytes_per_token(hf_config: PretrainedConfig, checkpointing: bool) -> float:
    """Peak activation bytes per token of a packed row (bf16 activations, fp32 norm upcasts).

    One layer keeps about 32h + 8kv + 8i bytes per token for its backward (norm upcasts, q/k/v,
    rotary, attention and MLP outputs); its backward roughly doubles that at the peak. With
    checkpointing only each layer's input (2h bytes) is kept, plus one layer recomputed at a time.
    """
    h = hf_config.hidden_size
    layers = hf_config.num_hidden_layers
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or h // heads
    kv = (getattr(hf_config, "num_key_value_heads", None) or heads) * head_dim
    inter = getattr(hf_config, "intermediate_size", None) or 4 * h
    one_layer = 32 * h + 8 * kv + 8 * inter
    tail = 16 * h  # final norm, hidden state and its gradient before the loss
    if checkpointing:
        per = layers * 2 * h + 2 * one_layer + tail
    else:
        per = layers * one_layer + one_layer + tail
    return SAFETY * per


def fixed_bytes_to_come(
    hf_config: PretrainedConfig, n_params: int, n_trainable: int, world: int, param_bytes: int
) -> float:
    """Memory the step will still allocate beyond the loaded shards, whatever the budget.

    Gradients and the two AdamW states of the trainable parameters (master dtype, sharded), the gathered bf16 root
    (embeddings, head) with its fp32 gradient, two gathered layers, and the fused loss's
    fp32 head gradient and chunk buffers.
    """
    h, vocab = hf_config.hidden_size, hf_config.vocab_size
    layers = max(hf_config.num_hidden_layers, 1)
    root = vocab * h * (1 if getattr(hf_config, "tie_word_embeddings", False) else 2)
    layer = max(n_params - root, 0) / layers
    state = 3 * n_trainable * param_bytes / world
    gathered = 2 * root + 4 * root + 2 * 2 * layer
    loss = 4 * vocab * h + 3 * DEFAULT_CHUNK * vocab * 4
    return state + gathered + loss


def auto_tokens(floor: int, cap: int | None, avail_bytes: float | None, per_token: float) -> TokenBudget:
    """The rule, as a pure function: max(floor, what fits), rounded down, bounded, then capped."""
    if avail_bytes is None:
        tokens, why = floor, "no device memory to size from: micro_batch_size_per_gpu x max_length"
    else:
        fits = int(max(avail_bytes, 0) // per_token) // ROUND * ROUND
        if fits <= floor:
            tokens, why = floor, f"memory holds ~{fits} tokens: micro_batch_size_per_gpu x max_length, the floor"
        elif fits > MAX_AUTO_TOKENS:
            tokens, why = MAX_AUTO_TOKENS, f"memory holds ~{fits} tokens; bounded at {MAX_AUTO_TOKENS}"
        else:
            tokens, why = (
                fits,
                f"fits the free memory ({avail_bytes / GIB:.1f} GiB at ~{per_token / 1024:.0f} KiB/token)",
            )
    if cap is not None and cap < tokens:
        return TokenBudget(cap, f"data.max_token_len_per_gpu={cap} caps it (automatic choice: {tokens}, {why})")
    return TokenBudget(tokens, why)


def choose_token_budget(
    cfg, hf_config: PretrainedConfig, model: torch.nn.Module, device: torch.device, group: dist.ProcessGroup
) -> TokenBudget | None:
    """The budget for this run (None in padded mode); call after the model is sharded and loaded."""
    if not cfg.use_remove_padding:
        logger.info(PADDED_COST)
        return None
    floor = cfg.data.micro_batch_size_per_gpu * cfg.data.max_length
    per_token = activation_bytes_per_token(hf_config, cfg.model.enable_gradient_checkpointing)
    avail = None
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        n_params = sum(p.numel() for p in model.parameters())
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        param_bytes = 2 if cfg.model.fsdp_config.model_dtype in ("bf16", "bfloat16") else 4
        world = dist.get_world_size(group)
        reserve = 0.15 * total + 2 * GIB  # allocator fragmentation, NCCL and cuBLAS workspaces
        avail = free - fixed_bytes_to_come(hf_config, n_params, n_trainable, world, param_bytes) - reserve
    budget = auto_tokens(floor, cfg.data.max_token_len_per_gpu, avail, per_token)
    # Identical plans on every rank: the smallest choice of the world.
    t = torch.tensor([budget.tokens], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    tokens = int(t)
    if tokens != budget.tokens:
        budget = TokenBudget(
            tokens, f"the smallest choice over the ranks (this rank: {budget.tokens}, {budget.reason})"
        )
    return budget
