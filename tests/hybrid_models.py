"""Tiny random-weight hybrid models (sft/models/recurrent/) written as HF model folders for the tests.

Each uses the demo tokenizer, hidden 32, 4 query / 2 KV heads, attention layers between recurrent ones,
a 3- or 4-wide convolution and a Mamba-2 chunk of 16 (demo samples run to 96 tokens, past the Gated
DeltaNet chunk of 64 too). The recurrences are re-initialised to decay slowly, so a state carried across
a sample boundary changes the numbers (with the released inits most heads forget within a few tokens).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from family_models import COMMON
from transformers import AutoConfig, AutoModelForCausalLM

GDN = dict(
    num_hidden_layers=3,
    layer_types=["linear_attention", "full_attention", "linear_attention"],
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_conv_kernel_dim=4,
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, router_aux_loss_coef=0.5)
MAMBA = dict(mamba_n_heads=4, mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=16, mamba_d_conv=4)
HYBRIDS: dict[str, dict] = {
    "qwen3_5_text": GDN,
    "qwen3_5_moe_text": dict(GDN, **MOE, shared_expert_intermediate_size=16),
    # OLMo Hybrid: separate projections, beta scaled to [0, 2]; its forward needs as many key as value heads.
    "olmo_hybrid": dict(GDN, linear_num_key_heads=4, linear_num_value_heads=4, linear_allow_neg_eigval=True),
    "qwen3_next": dict(GDN, **MOE, shared_expert_intermediate_size=16, decoder_sparse_step=1, mlp_only_layers=[]),
    "lfm2": dict(num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"], conv_L_cache=3, conv_bias=True),
    # LFM2 with a dense first layer, then sigmoid routers whose choice adds a per-expert bias (randomised below).
    "lfm2_moe": dict(
        MOE,
        num_hidden_layers=3,
        layer_types=["conv", "full_attention", "conv"],
        conv_L_cache=3,
        conv_bias=True,
        num_dense_layers=1,
        use_expert_bias=True,
    ),
    # Mamba-2 with 2 B/C groups split over SP ranks; an MoE block with a sigmoid router; NoPE attention.
    "nemotron_h": dict(
        num_hidden_layers=4,
        layers_block_type=["linear_attention", "full_attention", "moe", "linear_attention"],
        mamba_num_heads=4,
        mamba_head_dim=8,
        n_groups=2,
        ssm_state_size=8,
        chunk_size=16,
        conv_kernel=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=16,
        n_group=1,
        topk_group=1,
    ),
    # One B/C group, replicated to both SP ranks; MoE with a shared MLP; muP-style multipliers; scaled logits.
    "granitemoehybrid": dict(
        MAMBA,
        num_hidden_layers=3,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        mamba_d_head=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        shared_intermediate_size=32,
        router_aux_loss_coef=0.5,
        logits_scaling=4.0,
        residual_multiplier=0.7,
        embedding_multiplier=2.0,
        attention_multiplier=0.3,
        position_embedding_type="rope",
    ),
    # Mamba-2 layers with attention at one index, a plain gated MLP in every layer.
    "bamba": dict(MAMBA, num_hidden_layers=3, attn_layer_indices=[1], mamba_d_head=16),
    # Mamba-2 beside attention in every layer, gated group norm, muP multipliers on the projections.
    "falcon_h1": dict(
        MAMBA,
        num_hidden_layers=2,
        mamba_d_head=8,
        mamba_d_ssm=32,
        mamba_rms_norm=True,
        mamba_norm_before_gate=False,
        lm_head_multiplier=0.5,
        ssm_multipliers=[1.0, 0.5, 1.5, 0.8, 1.2],
        ssm_in_multiplier=0.9,
        key_multiplier=1.3,
    ),
}
HYBRID_TYPES = list(HYBRIDS)


@torch.no_grad()
def slow_decays(model: torch.nn.Module) -> None:
    """Decays near 1 (state kept over tens of tokens), so a leak across a boundary shows in the numbers."""
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.empty(p.shape).uniform_(0.02, 0.2, generator=gen).log())
        elif name.endswith("dt_bias"):
            p.fill_(math.log(math.expm1(0.3)))  # softplus -> 0.3


def write_hybrid_model(demo_model: Path, out: Path, model_type: str, **overrides) -> Path:
    """A folder with the demo tokenizer and a random `model_type` hybrid (seeded, so reproducible)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in demo_model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            shutil.copy(f, out / f.name)
    demo = AutoConfig.from_pretrained(demo_model)
    kw = {**COMMON, **HYBRIDS[model_type], **overrides}  # later ones win
    kw.update(vocab_size=demo.vocab_size, bos_token_id=demo.bos_token_id, eos_token_id=demo.eos_token_id)
    kw.setdefault("pad_token_id", None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw), dtype=torch.float32)
    slow_decays(model)
    for name, buf in model.named_buffers():
        if name.endswith("expert_bias"):  # zero at init: make it change which experts are chosen
            buf.copy_(torch.randn(buf.shape) * 0.3)
    model.save_pretrained(out)
    return out
