"""The automatic token budget of a packed micro-batch (`use_remove_padding=true`).

The loss is the exact global token mean, so how a rank's samples are cut into micro-batches
does not change the update; only speed and memory depend on it. The budget is therefore the
trainer's choice, for everyone: at least `micro_batch_size_per_gpu x max_length` tokens (the
worst case of a padded micro-batch of the user's keys, so whatever fits in verl fits here),
larger when the device's free memory, estimated from the model shape, holds more activations.
An explicit `data.max_token_len_per_gpu` is a cap that is always obeyed. With
`model.gradient_checkpointing_mode=auto` (the default) the same memory estimate also decides how
many decoder layers are recomputed in the backward: as few as fit, none when everything fits.
Every rank takes the smallest budget and the most recompute of the world, so the micro-batch
plans of all ranks stay identical.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import PretrainedConfig

from sft.config.schema import DTYPES
from sft.loop.flops import layer_attn_dims, matmul_params
from sft.models.families import moe_spec
from sft.models.recurrent.install import mixer_bytes_per_token
from sft.ops.fused_ce import DEFAULT_CHUNK, GRAD_W_ROWS
from sft.parallel.fsdp import layerwise_recompute

logger = logging.getLogger("sft")

GIB = 1024**3
# The estimate below is a model of memory, not a measurement: it is not extrapolated past this.
MAX_AUTO_TOKENS = 65536
# Multiplier on the per-token activation estimate. Measured peak memory per token stays below what the
# formulas here give, with and without checkpointing (docs/PERFORMANCE.md); the formulas keep that margin,
# and `reserve` below adds 15 % of the GPU + 2 GB, so no further factor.
SAFETY = 1.0
ROUND = 1024
# Matmul work of a micro-batch that hides the host's per-micro-batch work (kernel launches, FSDP hooks):
# smaller micro-batches leave the GPU waiting for the host, this much keeps it nearly always busy
# (docs/PERFORMANCE.md); it is 32k tokens of a 1.5B model (6 x 1.54e9 FLOP per token).
MIN_MICRO_BATCH_FLOP = 3e14
AUTO_MOE = "every layer recomputed: gradient_checkpointing_mode=auto does not model the routing buffers of MoE layers"
AUTO_NOT_LAYERWISE = (
    "every layer recomputed: this model's layers are not transformers' checkpointing layers, so recompute "
    "cannot be set layer by layer"
)
PADDED_COST = (
    "use_remove_padding=false: padded micro-batches of data.micro_batch_size_per_gpu samples compute on padding "
    "and wait for the GPU on every micro-batch: several times fewer tokens/s than use_remove_padding=true "
    "(docs/PERFORMANCE.md). The loss is the same either way"
)


@dataclass(frozen=True)
class TokenBudget:
    tokens: int
    reason: str
    # Decoder layers recomputed in the backward (activation checkpointing); None: as configured.
    recompute: int | None = None


def layer_bytes_per_token(hf_config: PretrainedConfig, liger: bool, mixer: float = 0.0) -> float:
    """Activation bytes one decoder layer keeps per token for its backward when it is not recomputed.

    The model's own layers keep about 32h + 8kv + 8i bytes (fp32 norm upcasts, q/k/v, rotary,
    attention and MLP outputs). With Liger's RMSNorm and SwiGLU the norms keep only their bf16 input
    and output and the MLP its gate, up and product: about 12h + 4kv + 6i. Measured peaks stay below
    this estimate, so it errs on the safe side. Hybrid models add `mixer`, the activations of their largest
    recurrent mixer (sft/models/recurrent/install.py), to every layer, whichever kind it is.
    """
    h = hf_config.hidden_size
    kv = max(kv_heads * head_dim for _, kv_heads, head_dim in layer_attn_dims(hf_config))  # the widest layer
    inter = getattr(hf_config, "intermediate_size", None) or 4 * h
    return mixer + (12 * h + 4 * kv + 6 * inter if liger else 32 * h + 8 * kv + 8 * inter)


def activation_bytes_per_token(
    hf_config: PretrainedConfig, recompute: int, liger: bool = False, mixer: float = 0.0
) -> float:
    """Peak activation bytes per token of a packed row when the first `recompute` decoder layers are
    checkpointed (each keeps only its input, 2h bytes) and the others keep everything.

    The backward of one layer adds one layer's worth at the peak. A recomputed layer adds another while it
    is replayed, but the first layers are replayed last, when the later layers' activations are freed:
    that only sets the peak when every layer is recomputed.
    """
    h = hf_config.hidden_size
    layers = hf_config.num_hidden_layers
    one_layer = layer_bytes_per_token(hf_config, liger, mixer)
    tail = 16 * h  # final norm, hidden state and its gradient before the loss
    kept = recompute * 2 * h + (layers - recompute) * one_layer
    replay = recompute * 2 * h + 2 * one_layer if recompute else 0.0
    return SAFETY * (max(kept + one_layer, replay) + tail)


def vision_bytes_per_token(hf_config: PretrainedConfig, recomputed: bool) -> float:
    """Activation bytes of the vision tower per image token of a packed row (vision-language SFT), charged to every
    token so a row of large images fits: merge^2 patches per token (Qwen), or the tower's patches per image over the
    tokens an image becomes (Gemma 3: 64^2 / 256; Gemma 4: 3^2), each keeping what one decoder layer of the tower's widths keeps
    (`layer_bytes_per_token`'s formula), or only its input when the tower is checkpointed."""
    v = getattr(hf_config, "vision_config", None)
    h = getattr(v, "hidden_size", None) or getattr(v, "embed_dim", None)
    if v is None or h is None:
        return 0.0
    depth = getattr(v, "depth", None) or getattr(v, "num_hidden_layers", 1)
    inter = getattr(v, "intermediate_size", None) or 4 * h
    one = 32 * h + 8 * h + 8 * inter
    patches = getattr(v, "spatial_merge_size", 1) ** 2
    tokens = getattr(hf_config, "mm_tokens_per_image", None)
    if not hasattr(v, "spatial_merge_size") and tokens and getattr(v, "image_size", None):
        patches = (v.image_size // v.patch_size) ** 2 / tokens
    elif getattr(v, "pooling_kernel_size", None):  # Gemma 4: a token pools k x k patches
        patches = v.pooling_kernel_size**2
    kept = depth * 2 * h + one if recomputed else (depth + 1) * one
    return SAFETY * patches * kept


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
    # fp32 head gradient; one chunk's fp32 logits and as much again of slack; the held bf16 dL/dlogits (sft/ops/fused_ce.py)
    loss = 4 * vocab * h + 2 * DEFAULT_CHUNK * vocab * 4 + GRAD_W_ROWS * vocab * 2
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


def recompute_plan(
    floor: int,
    cap: int | None,
    avail_bytes: float | None,
    per_token: Callable[[int], float],
    layers: int,
    min_tokens: int,
) -> TokenBudget:
    """`model.gradient_checkpointing_mode=auto`, as a pure function: the token budget and how many
    decoder layers to recompute.

    Recomputing a layer costs a third of its forward + backward again; a micro-batch smaller than
    `min_tokens` leaves the GPU waiting on the host. So: the budget full checkpointing would choose,
    lowered to `min_tokens` (never below the floor); then the fewest recomputed layers whose
    activations fit; with none recomputed, the budget grows into what is left.
    """
    full = auto_tokens(floor, cap, avail_bytes, per_token(layers))
    if avail_bytes is None:
        return TokenBudget(full.tokens, f"{full.reason}; every layer recomputed", layers)
    tokens = min(full.tokens, max(floor, min_tokens))
    recompute = next((r for r in range(layers + 1) if tokens * per_token(r) <= avail_bytes), None)
    if recompute is None or recompute == layers:  # all recomputed anyway: full checkpointing's larger budget
        return TokenBudget(full.tokens, f"{full.reason}; every layer recomputed (memory)", layers)
    if recompute == 0:
        grown = auto_tokens(tokens, cap, avail_bytes, per_token(0))
        return TokenBudget(grown.tokens, f"{grown.reason}; no layer recomputed", 0)
    return TokenBudget(
        tokens,
        f"{recompute} of {layers} layers recomputed so that {tokens} tokens fit "
        f"{avail_bytes / GIB:.1f} GiB (a micro-batch of at least {min_tokens} tokens keeps the GPU busy)",
        recompute,
    )


def min_busy_tokens(hf_config: PretrainedConfig) -> int:
    """Tokens whose matmuls take about MIN_MICRO_BATCH_FLOP: below this the host's per-micro-batch work
    (kernel launches, FSDP hooks) is no longer hidden behind the GPU's."""
    tokens = MIN_MICRO_BATCH_FLOP / (6 * matmul_params(hf_config))
    return int(-(-tokens // ROUND) * ROUND)


def choose_token_budget(
    cfg, hf_config: PretrainedConfig, model: torch.nn.Module, device: torch.device, group: dist.ProcessGroup
) -> TokenBudget | None:
    """The budget for this run (None in padded mode); call after the model is sharded and loaded.

    With `model.gradient_checkpointing_mode=auto` it also says how many decoder layers to recompute
    (`TokenBudget.recompute`); `apply_recompute` sets it on the model.
    """
    if not cfg.use_remove_padding:
        logger.info(PADDED_COST)
        return None
    m = cfg.model
    # Vision-language SFT: every token may be an image token, which adds the tower's activations.
    vision = (
        vision_bytes_per_token(hf_config, m.enable_gradient_checkpointing) if getattr(model, "vision", None) else 0.0
    )
    hf_config = hf_config.get_text_config()  # the text model's widths (sft/models/multimodal.py)
    floor = cfg.data.micro_batch_size_per_gpu * cfg.data.max_length
    layers = hf_config.num_hidden_layers
    liger = getattr(model, "liger_layers", False)
    mixer = mixer_bytes_per_token(model.lm)  # hybrid models' recurrent mixers (0 for attention-only models)

    def per_token(recompute: int) -> float:
        return activation_bytes_per_token(hf_config, recompute, liger, mixer) + vision

    avail = None
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        n_params = sum(p.numel() for p in model.parameters())
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        param_bytes = DTYPES[m.fsdp_config.model_dtype].itemsize
        world = dist.get_world_size(group)
        reserve = 0.15 * total + 2 * GIB  # allocator fragmentation, NCCL and cuBLAS workspaces
        avail = free - fixed_bytes_to_come(hf_config, n_params, n_trainable, world, param_bytes) - reserve
    cap = cfg.data.max_token_len_per_gpu
    if not m.enable_gradient_checkpointing:
        budget = auto_tokens(floor, cap, avail, per_token(0))
    elif m.gradient_checkpointing_mode != "auto":
        budget = auto_tokens(floor, cap, avail, per_token(layers))
    elif (spec := moe_spec(hf_config)) is not None or not layerwise_recompute(model):
        why = AUTO_MOE if spec is not None else AUTO_NOT_LAYERWISE
        budget = auto_tokens(floor, cap, avail, per_token(layers))
        budget = TokenBudget(budget.tokens, f"{budget.reason}; {why}", layers)
    else:
        budget = recompute_plan(
            floor,
            cap,
            avail,
            per_token,
            layers,
            min_busy_tokens(hf_config),
        )
    # Identical plans on every rank: the smallest choice of the world (tokens and recompute alike).
    t = torch.tensor([budget.tokens, -(budget.recompute or 0)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    tokens, recompute = int(t[0]), -int(t[1])
    if tokens != budget.tokens or recompute != (budget.recompute or 0):
        budget = TokenBudget(
            tokens,
            f"the smallest choice over the ranks (this rank: {budget.tokens}, {budget.reason})",
            recompute if budget.recompute is not None else None,
        )
    return budget
