"""Rotary embeddings that switch frequency sets by length (transformers' `longrope`: Phi-3/3.5 128k, Phi-4-mini),
chosen per sample.

transformers gives every position of a forward the long set once the longest sequence of the batch passes
`original_max_position_embeddings` (S), and the short set otherwise: a short sample padded or packed beside a long
one would train at other frequencies than it has alone. sft gives each token the set its own sample picks alone
(long when the sample has more than S tokens), from the micro-batch's sample lengths: the attention mask of padded
rows, or `cu_seq_lens` of a packed row (global under Ulysses SP, with this rank's slice cut out). No host sync.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def longrope_switch(rope: dict, text_config: PretrainedConfig) -> int | None:
    """S of one longrope parameter set: its own `original_max_position_embeddings`, else the config's."""
    return rope.get("original_max_position_embeddings") or getattr(
        text_config, "original_max_position_embeddings", None
    )


def switch_length(text_config: PretrainedConfig) -> int | None:
    """S of a model-wide longrope (None: another rotary, or one keyed by layer type, which sft does not patch)."""
    params = getattr(text_config, "rope_parameters", None) or {}
    return longrope_switch(params, text_config) if params.get("rope_type") == "longrope" else None


def long_tokens(
    switch: int,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cu_seq_lens: torch.Tensor | None,
    sp_group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """[b, s] bool: the token's sample has more than `switch` tokens."""
    rows, width = input_ids.shape
    if cu_seq_lens is None:  # padded rows: one sample per row, its length in the mask
        return (attention_mask.sum(-1) > switch)[:, None].expand(rows, width)
    lengths = (cu_seq_lens[1:] - cu_seq_lens[:-1]).long()
    rank, size = (dist.get_rank(sp_group), dist.get_world_size(sp_group)) if sp_group is not None else (0, 1)
    # output_size is known (the whole row), so the expansion reads nothing back from the device.
    flags = torch.repeat_interleave(lengths > switch, lengths, output_size=width * size)
    return flags[rank * width : (rank + 1) * width][None]


class PerSampleLongRope:
    """Replaces a longrope rotary module's forward; `tokens` ([b, s] bool) is set for each forward by the caller."""

    def __init__(self, rotary: nn.Module, switch: int) -> None:
        self.rotary, self.switch = rotary, switch
        self.tokens: torch.Tensor | None = None
        self._sets: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        rotary.forward = self.forward

    def _inv_freq(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # transformers' two sets: for a sequence of at most S tokens (what the module is built with) and for a longer
        # one. Computed from the config where they are used, since the module was built on the meta device (and
        # older transformers keep the short set as a plain attribute that no weight load restores).
        if device not in self._sets:
            init = ROPE_INIT_FUNCTIONS["longrope"]
            short, long = (init(self.rotary.config, device, seq_len=n)[0].float() for n in (None, self.switch + 1))
            self._sets[device] = short, long
        return self._sets[device]

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.tokens is not None, "PerSampleLongRope: the caller sets the tokens' sets before the forward"
        short, long = self._inv_freq(x.device)
        inv = torch.where(self.tokens[..., None], long, short)  # [b, s, d/2]
        freqs = position_ids[..., None].float() * inv  # the product transformers computes, per token
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = self.rotary.attention_scaling
        return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)


def install_per_sample_longrope(decoder: nn.Module, switch: int) -> PerSampleLongRope | None:
    """Patch the decoder's rotary module, a model-wide longrope switching at `switch`; None where there is none."""
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", None) != "longrope":
        return None
    return PerSampleLongRope(rotary, switch)
