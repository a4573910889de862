"""Tiny random-weight models of every family in sft/models/families.py, written as HF model folders.

Each uses the demo tokenizer, 2-3 layers, hidden 32, 4 query / 2 KV heads, and a sliding window
of 8 tokens (demo samples are far longer, and an SP slice boundary falls inside windows). Soft-caps
are small and the init large enough that caps, windows and sinks change the numbers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

WINDOW = 8
COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=512,
    initializer_range=0.2,
    attention_dropout=0.0,
    tie_word_embeddings=False,
)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32, router_aux_loss_coef=0.5)
LAYERS3 = ["sliding_attention", "full_attention", "sliding_attention"]
LAYERS2 = ["sliding_attention", "full_attention"]
EXTRA: dict[str, dict] = {
    "qwen2": {},
    "llama": {},
    "qwen3": {},
    "phi3": {},
    "olmo2": {},
    "gemma": {},
    "granite": dict(logits_scaling=4.0, attention_multiplier=0.3),
    "qwen3_moe": dict(MOE, num_experts=4, num_local_experts=4, decoder_sparse_step=1, mlp_only_layers=[]),
    "mixtral": dict(MOE, num_local_experts=4),
    "gemma2": dict(
        num_hidden_layers=3,
        layer_types=LAYERS3,
        sliding_window=WINDOW,
        attn_logit_softcapping=1.0,
        final_logit_softcapping=0.5,
        query_pre_attn_scalar=8,
    ),
    "gemma3_text": dict(
        num_hidden_layers=3,
        layer_types=LAYERS3,
        sliding_window=WINDOW,
        final_logit_softcapping=0.5,
        query_pre_attn_scalar=8,
    ),
    "gpt_oss": dict(MOE, num_hidden_layers=3, layer_types=LAYERS3, sliding_window=WINDOW, num_local_experts=4),
    "mistral": dict(sliding_window=WINDOW),
    "glm4": {},  # partial rotary (half of head_dim), q/k/v bias, post-attention and post-MLP norms
    "cohere": dict(logit_scale=0.25, use_qk_norm=True),  # parallel attention + MLP block, LayerNorm, scaled logits
    # RoPE on the sliding layers only; tied LM head (as the released models) scaled by logit_scale
    "cohere2": dict(layer_types=LAYERS2, sliding_window=WINDOW, logit_scale=0.25, tie_word_embeddings=True),
    "smollm3": dict(no_rope_layers=[1, 0], use_sliding_window=True, sliding_window=WINDOW),  # layer 1: NoPE, windowed
    "olmo3": dict(layer_types=LAYERS2, sliding_window=WINDOW),
    "ministral": dict(layer_types=LAYERS2, sliding_window=WINDOW),
    "starcoder2": dict(sliding_window=WINDOW),  # plain (non-gated) MLP, LayerNorm and linear biases
    "qwen2_moe": dict(
        MOE, num_experts=4, shared_expert_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[]
    ),
}
FAMILY_TYPES = list(EXTRA)


def write_family_model(demo_model: Path, out: Path, model_type: str, **overrides) -> Path:
    """A folder with the demo tokenizer and a random `model_type` model (seeded, so reproducible)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in demo_model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            shutil.copy(f, out / f.name)
    demo_cfg = AutoConfig.from_pretrained(demo_model)
    kw = dict(COMMON, **EXTRA.get(model_type, {}), **overrides)
    kw.update(
        vocab_size=demo_cfg.vocab_size,
        bos_token_id=demo_cfg.bos_token_id,
        eos_token_id=demo_cfg.eos_token_id,
        pad_token_id=None,
    )
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out)
    return out
