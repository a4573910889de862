"""Planted architectures for the packing probe (sft/models/probe.py), registered with the Auto classes on import,
as `model.external_lib=probe_models` does. Each is Llama with one change:

- `sft_token_shift`: every layer adds half of the previous token's hidden state (a short convolution that ignores
  sample boundaries): packed samples leak into each other; right-padded rows do not.
- `sft_own_attention`: the attention module runs SDPA itself over the whole row, bypassing transformers'
  attention interface (so sft's varlen attention is never called).
- `sft_segment_mix`: every layer adds the running mean of its own sample (restarting where `position_ids` is 0):
  exact when packed on one rank, but it mixes tokens outside attention, which an SP rank holding a slice of the
  row cannot compute.
- `sft_head_bias`: an LM head with a bias, which sft's loss (hidden @ lm_head.weight.T) would leave out.
- `sft_train_shift`: `sft_token_shift`'s leak in training mode only (as a training-only branch or random draw
  would be): a probe run in eval mode passes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer, apply_rotary_pos_emb


class _ShiftLayer(LlamaDecoderLayer):
    def forward(self, hidden_states, *args, **kwargs):
        prev = F.pad(hidden_states, (0, 0, 1, 0))[:, :-1]  # [b, s, h]: token t-1's state at t, across samples
        return super().forward(hidden_states + 0.5 * prev, *args, **kwargs)


class _TrainShiftLayer(LlamaDecoderLayer):
    def forward(self, hidden_states, *args, **kwargs):
        if self.training:
            hidden_states = hidden_states + 0.5 * F.pad(hidden_states, (0, 0, 1, 0))[:, :-1]
        return super().forward(hidden_states, *args, **kwargs)


class _OwnAttention(LlamaAttention):
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q, k, v = (p(hidden_states).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        rep = q.shape[1] // k.shape[1]
        out = F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True, scale=self.scaling
        )
        return self.o_proj(out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)), None


class _SegmentMixLayer(LlamaDecoderLayer):
    def forward(self, hidden_states, *args, position_ids=None, **kwargs):
        segment = (position_ids == 0).long().cumsum(-1)  # [b, s] sample number along the row
        same = segment[:, :, None] == segment[:, None, :]
        causal = torch.ones(same.shape[-2:], dtype=torch.bool, device=same.device).tril()
        weights = (same & causal).to(hidden_states.dtype)
        mean = (weights @ hidden_states) / weights.sum(-1, keepdim=True)  # running mean within each sample
        return super().forward(hidden_states + 0.5 * mean, *args, position_ids=position_ids, **kwargs)


def _planted(
    model_type: str, layer: type | None = None, attention: type | None = None, head_bias: bool = False
) -> None:
    config_cls = type(f"{model_type}Config", (LlamaConfig,), {"model_type": model_type})

    def __init__(self, config):
        LlamaForCausalLM.__init__(self, config)
        if head_bias:
            self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        for block in self.model.layers:
            if layer is not None:
                block.__class__ = layer
            if attention is not None:
                block.self_attn.__class__ = attention

    model_cls = type(
        f"{model_type}ForCausalLM", (LlamaForCausalLM,), {"config_class": config_cls, "__init__": __init__}
    )
    AutoConfig.register(model_type, config_cls, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


_planted("sft_token_shift", layer=_ShiftLayer)
_planted("sft_own_attention", attention=_OwnAttention)
_planted("sft_segment_mix", layer=_SegmentMixLayer)
_planted("sft_head_bias", head_bias=True)
_planted("sft_train_shift", layer=_TrainShiftLayer)
