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
# Routed experts over `n_routed_experts` in 2 groups (1 kept), a shared expert and a dense first layer (DeepSeek style).
GROUPED = dict(MOE, n_routed_experts=4, n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1)
# Multi-head latent attention: q/k heads 4 + 8 wide, value heads 6 wide, as many KV heads as query heads.
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=4, qk_rope_head_dim=8, v_head_dim=6)
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
    # Gemma 4 with every text feature on: windowed and global layers, global layers 16 wide with 1 KV head and
    # K = V, the last layer reusing layer 1's KV (shared KV, double-wide MLP), per-layer embeddings, an MoE block
    # beside the MLP, final soft-capping.
    "gemma4_text": dict(
        num_hidden_layers=3,
        layer_types=["sliding_attention", "full_attention", "full_attention"],
        sliding_window=WINDOW,
        final_logit_softcapping=0.5,
        global_head_dim=16,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        num_kv_shared_layers=1,
        use_double_wide_mlp=True,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=64,  # write_family_model sets it to the vocabulary, as in the released models
        enable_moe_block=True,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=16,
    ),
    # Sigmoid routers with a score-correction bias (randomised in write_family_model), group-limited choice,
    # a shared expert and a dense first layer; partial RoPE, q/k norms, attention biases.
    "glm4_moe": dict(GROUPED, use_qk_norm=True, attention_bias=True),
    "minimax_m2": dict(MOE, num_local_experts=4, rotary_dim=4),  # q/k norms over all heads, partial RoPE
    # MLA: q/k heads 4 + 8 wide, value heads 6 wide; low-rank q and kv, interleaved RoPE; aux loss from aux_loss_alpha.
    "deepseek_v3": dict(GROUPED, **MLA, q_lora_rank=16, aux_loss_alpha=0.5),
    # MLA under softmax routers, group-limited choice (2 groups, 1 kept), shared experts, a dense first layer.
    "deepseek_v2": dict(GROUPED, **MLA, topk_method="group_limited_greedy", q_lora_rank=16, aux_loss_alpha=0.5),
    # GLM-4.7-Flash: MLA (no q low-rank) under GLM-4.5's sigmoid routers with a score-correction bias.
    "glm4_moe_lite": dict(GROUPED, **MLA, q_lora_rank=None),
    "dots1": GROUPED,
    "olmoe": dict(MOE, num_experts=4),  # q/k norms over all heads
    # A dense first layer, then softmax routers whose choice adds a per-expert bias (randomised below), shared expert.
    "ernie4_5_moe": dict(
        moe_num_experts=4,
        moe_k=2,
        moe_intermediate_size=32,
        moe_num_shared_experts=1,
        moe_layer_start_index=1,
        router_aux_loss_coef=0.5,
    ),
    # Biased sigmoid routers over `num_experts` after dense first layers, shared experts; windowed and global layers.
    "exaone_moe": dict(
        MOE,
        num_experts=4,
        num_shared_experts=1,
        mlp_layer_types=["dense", "sparse"],
        layer_types=LAYERS2,
        sliding_window=WINDOW,
        n_group=2,
        topk_group=1,
    ),
    "afmoe": dict(
        MOE, num_experts=4, num_shared_experts=1, num_dense_layers=1, layer_types=LAYERS2, sliding_window=WINDOW
    ),
    "hy_v3": dict(MOE, num_experts=4, num_shared_experts=1, mlp_layer_types=["dense", "sparse"]),
    "solar_open": dict(MOE, n_routed_experts=4, n_shared_experts=1, n_group=2, topk_group=1),
    "sarvam_moe": GROUPED,
    "sarvam_mla": dict(GROUPED, **MLA, q_lora_rank=None),
    "param2moe": GROUPED,
    "flex_olmo": dict(MOE, num_experts=4),
    "granitemoe": dict(MOE, num_local_experts=4, logits_scaling=4.0, attention_multiplier=0.3),
    # Not in the table: trained because sft's packing probe (sft/models/probe.py) measures it exact; windows, qk-norm.
    "exaone4": dict(layer_types=LAYERS2, sliding_window=WINDOW),
}
FAMILY_TYPES = list(EXTRA)
PROBED_TYPES = ("exaone4",)


def write_family_model(demo_model: Path, out: Path, model_type: str, **overrides) -> Path:
    """A folder with the demo tokenizer and a random `model_type` model (seeded, so reproducible)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in demo_model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            shutil.copy(f, out / f.name)
    demo_cfg = AutoConfig.from_pretrained(demo_model)
    kw = {**COMMON, **EXTRA.get(model_type, {}), **overrides}  # later ones win
    kw.update(
        vocab_size=demo_cfg.vocab_size,
        bos_token_id=demo_cfg.bos_token_id,
        eos_token_id=demo_cfg.eos_token_id,
        pad_token_id=None,
    )
    if "vocab_size_per_layer_input" in kw:  # Gemma 4's per-layer embeddings: one row per token
        kw["vocab_size_per_layer_input"] = demo_cfg.vocab_size
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Zero at init: make it change which experts are chosen (a buffer, or ERNIE 4.5's frozen parameter), and give
    # AFMoE's zero-initialised router weights values, so that tokens route differently.
    for name, buf in [*model.named_buffers(), *model.named_parameters()]:
        if name.endswith(("e_score_correction_bias", "expert_bias", "router.gate.weight")):
            with torch.no_grad():
                buf.copy_(torch.randn(buf.shape) * 0.3)
    model.save_pretrained(out)
    return out


def rotated_part(w: torch.Tensor, head_dim: int, rotated: int) -> torch.Tensor:
    """The entries of a key bias `w` on the rotated dims of each head. With partial RoPE the bias on the other dims
    adds one constant to all scores of a query, which softmax ignores: its true gradient is 0, and Adam turns float
    noise into ~lr-sized steps that differ between layouts (and change nothing)."""
    return w.view(-1, head_dim)[:, :rotated]
