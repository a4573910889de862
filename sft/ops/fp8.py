"""FP8 training of the decoder's linear layers (`model.fp8`), through torchao's float8 training.

`convert_to_fp8` swaps, on the meta model and before sharding, every `nn.Linear` inside a decoder layer for
torchao's `Float8Linear`, whose three GEMMs (output, input gradient, weight gradient) take FP8 operands with
scales computed on the device. Left in the model dtype: the LM head, embeddings, norms, MoE routers (the family
table's `MoESpec.router_suffix`), grouped-GEMM experts (3-D parameters, not `nn.Linear`) and any linear whose
widths are not multiples of 16 (e.g. a shared expert's 1-wide gate). Master weights, optimizer state, checkpoints
and the HF export stay in the model dtype: only GEMM inputs are cast, call by call.

Recipes: `tensorwise` (one scale per tensor; FSDP2 all-gathers the weights already in FP8, their scales computed for
all layers at once after each optimizer update by `refresh_fp8_scales`) and `rowwise` (a scale per row, power-of-two
scales; more accurate, slower kernels, weights gathered in bf16). `model.fp8=true` is `TRUE_RECIPE`.
FP8 GEMMs need every dimension a multiple of 16, the token count included: `TOKEN_MULTIPLE` pads micro-batches.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from typing import Any

import torch
from torch import nn

from sft.config.schema import FP8_RECIPES
from sft.parallel.fsdp import decoder_layers

# What `model.fp8=true` runs: tensorwise scaling with FP8 all-gather (torchao's fastest recipe for dense models;
# torchtitan's Llama-3.1-8B figures use it). The one place this choice is made.
TRUE_RECIPE = "tensorwise"
# torch._scaled_mm wants every dimension a multiple of 16; the weight-gradient GEMM's inner one is the token count.
TOKEN_MULTIPLE = 16
# FP8 GEMMs on NVIDIA GPUs: Ada (8.9) and Hopper (9.0) or newer.
MIN_CAPABILITY = (8, 9)
_CAP = f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ada, Hopper)"
INSTALL = "pip install 'sft[fp8]' (torchao >= 0.18)"
# Eager, torchao's scaling and casts are several memory-bound kernels per GEMM operand (abs, max, scale, clamp,
# cast): on LLM shapes they cost more than the FP8 GEMMs save (torchao issue 685, torchtitan's float8 docs).
FP8_UNFUSED = (
    "torchao's FP8 scaling and casts run unfused, as several memory-bound kernels per GEMM operand, and usually cost "
    "more than the FP8 GEMMs save; add model.compile=true (it fuses them into the layer's kernels)"
)
# HF config keys holding widths of the decoder's linear layers (per head widths are multiplied by their head counts).
WIDTH_KEYS = ("hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size")


def fp8_recipe(setting: bool | str) -> str | None:
    """`model.fp8` -> the torchao recipe name, or None when FP8 is off (values checked before loading)."""
    if setting is False:
        return None
    return TRUE_RECIPE if setting is True else str(setting)


def token_multiple(setting: bool | str) -> int:
    """What each micro-batch's token count (per sequence-parallel rank) must be a multiple of."""
    return TOKEN_MULTIPLE if fp8_recipe(setting) else 1


def torchao_reason() -> str | None:
    """Why torchao's float8 training cannot be imported (None when it can)."""
    try:
        importlib.import_module("torchao.float8")
    except ImportError as exc:
        return f"torchao's float8 training does not import ({exc}); {INSTALL}"
    return None


def device_reason(device_type: str, local_rank: int = 0) -> str | None:
    """Why this rank's device has no FP8 GEMMs (None when it has)."""
    if device_type != "cuda":
        return f"FP8 GEMMs need an NVIDIA GPU of compute capability {_CAP} or newer (this run uses {device_type})"
    index = local_rank % max(torch.cuda.device_count(), 1)
    capability = torch.cuda.get_device_capability(index)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(index)
        return f"{name} (compute capability {capability[0]}.{capability[1]}) has no FP8 GEMMs; they need {_CAP}+"
    return None


def misaligned_widths(config: dict[str, Any]) -> dict[str, int]:
    """Widths of the decoder's linear layers (from config.json) that are not multiples of 16, by name."""
    widths = {k: config[k] for k in WIDTH_KEYS if isinstance(config.get(k), int)}
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    if isinstance(heads, int) and heads > 0:
        head_dim = config.get("head_dim") or (hidden // heads if isinstance(hidden, int) else None)
        if isinstance(head_dim, int):
            widths["num_attention_heads x head_dim"] = heads * head_dim
            kv = config.get("num_key_value_heads") or heads
            if isinstance(kv, int):
                widths["num_key_value_heads x head_dim"] = kv * head_dim
    return {k: v for k, v in widths.items() if v % TOKEN_MULTIPLE}


def _float8_config(recipe: str, emulate: bool):
    from torchao.float8 import Float8LinearConfig

    assert recipe in FP8_RECIPES, recipe
    # Tensorwise: FSDP2 gathers the FP8 bytes and scale instead of bf16 weights (half the traffic, no cast per GEMM).
    return dataclasses.replace(
        Float8LinearConfig.from_recipe_name(recipe),
        enable_fsdp_float8_all_gather=recipe == "tensorwise",
        emulate=emulate,
    )


def _fp8_ready(m: nn.Module) -> bool:
    """A plain linear layer whose two widths FP8 GEMMs accept."""
    return isinstance(m, nn.Linear) and all(n % TOKEN_MULTIPLE == 0 for n in m.weight.shape)


def convert_to_fp8(lm: nn.Module, recipe: str, router_suffix: str | None, emulate: bool) -> tuple[int, int]:
    """Swap the decoder layers' linear layers of `lm` for torchao's Float8Linear, in place, before sharding.

    `router_suffix`: class-name suffix (lower case) of the MoE routers, whose linears stay in the model dtype.
    `emulate`: compute the FP8 GEMMs in fp32 from the FP8 values (no FP8 hardware: the CPU tests).
    Returns (converted, linear layers left in the model dtype).
    """
    from torchao.float8 import convert_to_float8_training

    config = _float8_config(recipe, emulate)
    converted, kept = 0, 0
    for layer in decoder_layers(lm):
        routed = set()
        if router_suffix:
            for m in layer.modules():
                if type(m).__name__.lower().endswith(router_suffix):
                    routed.update(id(x) for x in m.modules())
        chosen = {id(m) for m in layer.modules() if _fp8_ready(m) and id(m) not in routed}
        kept += sum(isinstance(m, nn.Linear) and id(m) not in chosen for m in layer.modules())
        convert_to_float8_training(layer, config=config, module_filter_fn=lambda m, fqn, c=chosen: id(m) in c)
        converted += len(chosen)
    return converted, kept


def _wrapped_weight_class() -> type | None:
    """torchao's FP8-all-gather weight subclass, if torchao's float8 is loaded (no import otherwise)."""
    if "torchao.float8.fsdp_utils" not in sys.modules:
        return None
    return sys.modules["torchao.float8.fsdp_utils"].WeightWithDynamicFloat8CastTensor


def fp8_gathers(model: nn.Module) -> bool:
    """Whether `model` has weights that FSDP2 all-gathers in FP8 (tensorwise), whose scales need refreshing."""
    wrapped = _wrapped_weight_class()
    return wrapped is not None and any(isinstance(getattr(p, "_local_tensor", p), wrapped) for p in model.parameters())


@torch.no_grad()
def refresh_fp8_scales(model: nn.Module) -> None:
    """After an update of the weights (optimizer step, checkpoint load): each FP8-gathered weight's scale for the
    next all-gathers, for all layers at once (one fused max-norm, one all-reduce; no host sync)."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)


def plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t`, or for an FP8-gathered weight the plain tensor it wraps (same storage, same DTensor layout).

    torchao's weight subclass would be pickled into checkpoints (loadable only with torchao imported) and is not a
    tensor safetensors can write; the plain tensor is the model-dtype master weight."""
    wrapped = _wrapped_weight_class()
    if wrapped is None:
        return t
    from torch.distributed.tensor import DTensor

    local = t._local_tensor if isinstance(t, DTensor) else t
    if not isinstance(local, wrapped):
        return t
    if not isinstance(t, DTensor):
        return local._tensor
    return DTensor.from_local(
        local._tensor, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
    )


def plain_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """A model state dict with `plain_tensor` values: a checkpoint reads the same with or without `model.fp8`, and
    loading into these views writes the parameters."""
    return {key: plain_tensor(value) for key, value in state.items()}
