"""Put the packed forwards into a model, refuse SP sizes a mixer cannot be split by, and size their memory.

`install_packed_mixers` gives every recurrent mixer of the model (found by the class-name suffix of its
family row, sft/models/families.py `RecurrentSpec`) the packed forward of its kind (sft/models/recurrent/
mixers.py). The row's boundaries reach the mixers from the decoder's own call (a forward pre-hook keeps its
`cu_seq_lens_q`, `cu_seq_lens_cpu` and `sp_group`; some transformers versions pass no keyword arguments down
to a mixer, LFM2's in 5.17); a call without them (padded rows, generation) runs the module's own forward.
`sp_reason` says, from the config alone, why an SP size cannot split the mixer's heads. `mixer_bytes_per_token`
is what the token budget (sft/loop/budget.py) adds per layer for these mixers' activations.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sft.models.families import RecurrentSpec
from sft.models.recurrent.mixers import FORWARDS, sp_group
from sft.models.recurrent.packed import PackedRow

_MARK = "_sft_packed_kind"
_ROW_KEYS = ("cu_seq_lens_q", "cu_seq_lens_cpu", "sp_group")
_CACHE_KEYS = ("cache", "cache_params", "past_key_values")


@dataclass
class _DecoderCall:
    """The packed-row keywords of the decoder's latest call: what its mixers (and their recompute under activation
    checkpointing, which comes before the next call) run on. Empty for a padded call."""

    kwargs: dict = field(default_factory=dict)

    def remember(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.kwargs = {k: kwargs[k] for k in _ROW_KEYS if kwargs.get(k) is not None}


def _packed_call(module: nn.Module, original, packed, call: _DecoderCall, *args, **kwargs) -> torch.Tensor:
    if "cu_seq_lens_q" not in call.kwargs:
        return original(*args, **kwargs)
    if any(kwargs.get(k) is not None for k in _CACHE_KEYS):
        raise ValueError("sft runs packed rows without a cache: pass use_cache=False with cu_seq_lens")
    if torch.is_tensor(kwargs.get("attention_mask")):
        raise ValueError("a packed row is delimited by cu_seq_lens only; its recurrent layers got a 2-D mask too")
    hidden = args[0] if args else kwargs["hidden_states"]
    assert hidden.shape[0] == 1, f"a packed row is one row, got batch {hidden.shape[0]}"
    group = sp_group(call.kwargs)
    sp = 1 if group is None else torch.distributed.get_world_size(group)
    return packed(module, hidden, PackedRow.from_kwargs(call.kwargs, hidden.shape[1] * sp), group)


def install_packed_mixers(lm: nn.Module, spec: RecurrentSpec) -> int:
    """Give each mixer module of `lm` its kind's packed forward; returns how many (0 for a config whose layers are all
    attention). Parameters are untouched."""
    packed, call = FORWARDS[spec.kind], _DecoderCall()
    n = 0
    for module in lm.modules():
        if type(module).__name__.lower().endswith(spec.module_suffix) and not hasattr(module, _MARK):
            module.forward = functools.partial(_packed_call, module, module.forward, packed, call)
            setattr(module, _MARK, spec.kind)
            n += 1
    if n == 0 and _attention_only(lm.config):
        return 0  # e.g. LFM2's default layer list: no recurrent layer, nothing to install
    if n == 0:
        raise ValueError(
            f"{type(lm).__name__}: no recurrent modules (class name ending in {spec.module_suffix!r}) found; this "
            "transformers version lays the model out differently than sft expects"
        )
    lm.get_decoder().register_forward_pre_hook(call.remember, with_kwargs=True)
    return n


# Per-layer kinds that mix no state across tokens outside attention (hybrid configs list a kind per layer).
_ATTENTION_KINDS = frozenset({"full_attention", "sliding_attention", "attention", "mlp", "moe"})


def _attention_only(config: Any) -> bool:
    """Whether the config's per-layer list (`layer_types`, `layers_block_type`) names attention and MLP layers only."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    kinds = getattr(config, "layer_types", None) or getattr(config, "layers_block_type", None)
    return bool(kinds) and set(kinds) <= _ATTENTION_KINDS


def _valid_sizes(heads: int, groups: int | None) -> list[int]:
    return [s for s in range(1, heads + 1) if heads % s == 0 and (groups is None or groups % s == 0 or s % groups == 0)]


def sp_reason(config: dict[str, Any], spec: RecurrentSpec, sp: int) -> str | None:
    """Why `ulysses_sequence_parallel_size=sp` cannot split this model's recurrent layers exactly (None: it can).

    Each rank takes 1/sp of the mixer's heads (key heads for Gated DeltaNet, channels for the short
    convolution); Mamba-2's B/C groups are split as well or, when fewer than the ranks, replicated.
    """
    heads = config.get(spec.heads_key)
    groups = config.get(spec.groups_key) if spec.groups_key else None
    if sp <= 1 or not isinstance(heads, int):
        return None
    if heads % sp == 0 and (groups is None or groups % sp == 0 or sp % groups == 0):
        return None
    what = f"{spec.heads_key}={heads}" + (f", {spec.groups_key}={groups}" if groups is not None else "")
    return (
        f"ulysses_sequence_parallel_size={sp} cannot split the {spec.kind} layers of model_type="
        f"{config.get('model_type')!r} exactly ({what}: sp must divide {spec.heads_key}"
        + (f" and divide {spec.groups_key} or be a multiple of it" if groups is not None else "")
        + f"); set ulysses_sequence_parallel_size to one of {_valid_sizes(heads, groups)}"
    )


def _bytes(m: nn.Module, kind: str) -> float:
    """Activation bytes per token one mixer keeps for its backward (bf16 tensors, fp32 where the math is);
    errs high: projections, convolution input and output, kernel inputs and chunk tables, norm and output."""
    if kind == "gated_delta":
        hv, dk = m.num_v_heads, m.head_k_dim
        proj = 2 * (2 * m.key_dim + 2 * m.value_dim + 2 * hv)
        kernel = 2 * 2 * 2 * hv * dk + 2 * m.value_dim + 8 * hv + 4 * 64 * hv + 2 * hv * (dk + m.head_v_dim)
        return proj + 6 * m.conv_dim + kernel + 12 * m.value_dim
    if kind == "mamba2":
        inner, h, gn = m.intermediate_size, m.num_heads, m.n_groups * m.ssm_state_size
        proj = 2 * (2 * inner + 2 * gn + h)
        kernel = 2 * 2 * h * m.ssm_state_size + 2 * inner + 4 * h + 4 * 64 * h + 2 * h * (m.ssm_state_size + m.head_dim)
        return proj + 6 * m.conv_dim + kernel + 14 * inner
    h = m.conv.in_channels  # short convolution
    return 2 * 3 * h + 2 * h + 6 * h + 2 * 2 * h


def mixer_bytes_per_token(lm: nn.Module) -> float:
    """The largest activation estimate over this model's installed mixers (0 for a model without any)."""
    return max((_bytes(m, getattr(m, _MARK)) for m in lm.modules() if hasattr(m, _MARK)), default=0.0)
