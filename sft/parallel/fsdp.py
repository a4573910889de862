"""Sharding of the model with FSDP2 (`fully_shard`), compile and per-layer recompute, one function per technique.

`selective_checkpoint_context` is the policy of `model.gradient_checkpointing_mode=selective`.

Each decoder layer is its own FSDP unit (gathered just before it runs, freed after), and the
root holds the rest (embeddings, final norm, LM head, tied or not). On CUDA parameters are
gathered in bf16 and gradients reduced in fp32; master weights stay in
`model.fsdp_config.model_dtype`. On CPU (gloo) everything runs in the master dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from transformers.modeling_layers import GradientCheckpointingLayer

from sft.config.schema import SFTConfig
from sft.parallel.distributed import DistContext


def decoder_layers(lm: nn.Module) -> list[nn.Module]:
    """The repeated blocks of an HF decoder: the classes the model names in `_no_split_modules` (or, once
    sharded, the FSDP subclasses of them)."""
    names = set(getattr(lm, "_no_split_modules", None) or [])
    layers: list[nn.Module] = []
    inside: set[int] = set()  # modules within a block already taken
    for m in lm.modules():  # parents come before their children
        if id(m) in inside or not any(c.__name__ in names for c in type(m).__mro__):
            continue
        # Outermost only: some classes also name a module inside their block (Mamba's mixer in its block, MBart's
        # attention in its layer); sharding both would leave the inner one's DTensors inside the outer's plain
        # tensors at the first forward.
        layers.append(m)
        inside.update(id(x) for x in m.modules())
    if not layers:
        raise ValueError(
            f"model.partial_pretrain: {type(lm).__name__} declares no `_no_split_modules`, so sft cannot find "
            "its decoder layers to shard; this architecture is not supported"
        )
    return layers


def text_layers(lm: nn.Module) -> list[nn.Module]:
    """The decoder layers of the text model: a vision-language model's vision blocks are blocks too, but the token
    budget's recompute plan counts text layers (a vision tower, when checkpointed, recomputes all its blocks)."""
    inside = {id(m) for m in lm.get_decoder().modules()}
    return [layer for layer in decoder_layers(lm) if id(layer) in inside]


def layerwise_recompute(model: nn.Module) -> bool:
    """Whether recompute can be set layer by layer: only transformers' own checkpointing layers read the
    flag per layer (remote code may check it on the whole model)."""
    return all(isinstance(x, GradientCheckpointingLayer) for x in text_layers(model.lm))


def apply_recompute(model: nn.Module, recompute: int) -> None:
    """Recompute only the first `recompute` decoder layers in the backward (checkpointing must have been
    enabled on all of them): the others keep their activations. The first ones, because their backward
    comes last, when the later layers' activations are already freed: their replay adds nothing to
    the peak (sft/loop/budget.py)."""
    for i, layer in enumerate(text_layers(model.lm)):
        layer.gradient_checkpointing = i < recompute


def mixed_precision(ctx: DistContext) -> MixedPrecisionPolicy:
    if ctx.device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def offload_policy(cfg: SFTConfig, ctx: DistContext) -> OffloadPolicy:
    fc = cfg.model.fsdp_config
    if fc.cpu_offload or fc.offload_params:
        return CPUOffloadPolicy(pin_memory=ctx.device.type == "cuda")
    return OffloadPolicy()


def apply_compile(model: nn.Module) -> None:
    """Compile every decoder layer in place (`model.compile=true`), before sharding.

    Per layer rather than whole-model: the layers are identical, so one compiled graph is
    reused by all of them, and FSDP's per-layer gather/free hooks stay outside the graph.
    Packed rows change length every micro-batch: dynamic shapes avoid a recompile per length.
    """
    for layer in decoder_layers(model.lm):
        layer.compile(dynamic=True)


def apply_fsdp(model: nn.Module, cfg: SFTConfig, ctx: DistContext) -> nn.Module:
    """Shard every decoder layer, then the root, over the whole world."""
    kwargs = dict(
        mesh=ctx.fsdp_mesh,
        mp_policy=mixed_precision(ctx),
        offload_policy=offload_policy(cfg, ctx),
        reshard_after_forward=cfg.model.fsdp_config.reshard_after_forward,
    )
    for layer in decoder_layers(model.lm):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


# Ops whose outputs selective checkpointing keeps: the matmuls and attention, i.e. the expensive
# work. Everything else (norms, activations, rotary, casts) is recomputed in the backward.
# `_scaled_mm` is an FP8 GEMM (model.fp8) where the policy sees it below torchao's FP8 tensors.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_mm.default,
}


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    name = str(op)
    if op in _SAVE_OPS or "attention" in name or "attn" in name:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpoint_context() -> Callable:
    """`context_fn` for torch.utils.checkpoint: save matmul/attention outputs, recompute the rest."""
    return partial(create_selective_checkpoint_contexts, _policy)
