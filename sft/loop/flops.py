"""FLOP accounting for throughput reports: matmul parameters, FLOPs per token, the GPU peak and MFU.

Two conventions: model FLOPs (torchtitan's `6*N + 12*L*H*d*s` per token, s = row length) and useful
FLOPs (`6*N*T + 6*L*H*d*sum(s_i^2)` over the real sample lengths: causal attention halved, padding
not counted). N counts the parameters a token goes through in a matmul (MoE: the active ones).
Pure functions of a model config; the trainer and the benchmarks share them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def _text_config(hf_config: Any) -> Any:
    # Multimodal configs nest the decoder's fields; plain ones return themselves.
    getter = getattr(hf_config, "get_text_config", None)
    return getter() if getter is not None else hf_config


def layer_attn_dims(cfg: Any) -> list[tuple[int, int, int]]:
    """(heads, kv_heads, head_dim) of each decoder layer of a text config. Heterogeneous configs (Gemma 4's
    global layers are wider, with other KV heads) refuse a global read of these keys: read per layer."""
    layers = cfg.per_layer_config if getattr(cfg, "is_heterogeneous", False) else [cfg] * cfg.num_hidden_layers
    dims = []
    for c in layers:
        heads = c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        # Some configs carry head_dim=None; others decouple it from hidden / heads (Qwen3).
        dims.append((heads, kv_heads, getattr(c, "head_dim", None) or c.hidden_size // heads))
    return dims


def _attn_dims(cfg: Any) -> tuple[int, int, float, float]:
    """(layers, heads, kv_heads, head_dim) of a text config. Where layers differ in width (same query heads),
    head_dim and kv_heads are averages chosen so that layers * heads * head_dim and layers * kv_heads * head_dim
    are the sums over layers that the formulas below need."""
    dims = layer_attn_dims(cfg)
    if len(set(dims)) == 1:
        return (len(dims), *dims[0])
    layers, heads = len(dims), dims[0][0]
    head_dim = sum(h * d for h, _, d in dims) / (heads * layers)
    kv_heads = sum(kv * d for _, kv, d in dims) / (head_dim * layers)
    return layers, heads, kv_heads, head_dim


def matmul_params(hf_config: Any) -> int:
    """Parameters that take part in a matmul per token: N in the FLOP formulas.

    Per layer: q and o (hidden x heads*d each), k and v (hidden x kv_heads*d each, GQA),
    the MLP's matrices (gate/up/down: 3 x hidden x intermediate; 2 for a family whose row in
    sft/models/families.py has a plain up/down MLP). Plus the LM head (vocab x hidden), which is
    a matmul even when tied; the embedding lookup is a gather and is not counted. Biases
    and norms are negligible and left out. For a mixture-of-experts family (sft/models/families.py)
    an MoE layer counts the parameters a token is routed through: the router (hidden x experts),
    top-k experts, and a shared expert with its gate where the family has one, not all experts,
    so MFU is on active parameters.
    """
    from sft.models.families import mlp_matrices, moe_spec, num_experts, sparse_layer

    cfg = _text_config(hf_config)
    layers, heads, kv_heads, head_dim = _attn_dims(cfg)
    hidden = cfg.hidden_size
    attn = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    mlp = mlp_matrices(cfg) * hidden * cfg.intermediate_size
    spec = moe_spec(cfg)
    if spec is None:
        return layers * (attn + mlp) + cfg.vocab_size * hidden
    width = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    routed = int(getattr(cfg, spec.top_k_key)) * 3 * hidden * width + hidden * num_experts(cfg, spec)
    if spec.shared_expert_key is not None and getattr(cfg, spec.shared_expert_key, None):
        routed += 3 * hidden * int(getattr(cfg, spec.shared_expert_key)) + hidden  # shared expert + its gate
    # GLM-4.5 / DeepSeek-V3 style: always-on experts of the routed experts' width, no gate (the count's key differs).
    shared = next((getattr(cfg, k) for k in _SHARED_EXPERTS_KEYS if getattr(cfg, k, None)), 0)
    routed += 3 * hidden * width * int(shared)
    sparse = sum(sparse_layer(cfg, i) for i in range(layers))
    return layers * attn + sparse * routed + (layers - sparse) * mlp + cfg.vocab_size * hidden


# Config keys of the number of always-on shared experts (DeepSeek/GLM/dots, EXAONE/AFMoE/Hy3, ERNIE 4.5).
_SHARED_EXPERTS_KEYS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")


def flops_reason(hf_config: Any) -> str | None:
    """Why the formulas here do not count this model's FLOPs (None: they do), so that no MFU is reported rather
    than a wrong one: recurrent mixers (hybrids) and multi-head latent attention have matmuls of other shapes, and a
    model type outside the family table (sft/models/probe.py) may have any."""
    from sft.models.families import FAMILIES, no_mfu_reason, recurrent_spec

    cfg = _text_config(hf_config)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in FAMILIES:
        return f"model_type={model_type!r} has no row in sft's family table"
    if recurrent_spec(model_type) is not None:
        return f"{model_type}'s recurrent layers"
    if getattr(cfg, "kv_lora_rank", None):
        return f"{model_type}'s multi-head latent attention"
    return no_mfu_reason(model_type)


def _attn_flops_unit(hf_config: Any) -> int:
    # L * H * d: both attention FLOP formulas are multiples of it.
    layers, heads, _, head_dim = _attn_dims(_text_config(hf_config))
    return layers * heads * head_dim


def model_flops_per_token(hf_config: Any, seq_len: int) -> float:
    """Training FLOPs per token, torchtitan's convention: `6*N + 12*L*H*d*s`.

    6*N: forward (2) + backward (4) FLOPs per matmul parameter. 12*L*H*d*s: the two
    attention matmuls (scores and weighted values) over a row of length s, without the
    causal halving. Model MFU = this * tokens / (time * peak).
    """
    return 6.0 * matmul_params(hf_config) + 12.0 * _attn_flops_unit(hf_config) * seq_len


def useful_flops(hf_config: Any, seq_lens: Sequence[int]) -> float:
    """FLOPs of one step counting only real tokens: `6*N*T + 6*L*H*d*sum(s_i^2)`.

    `seq_lens` are the real (non-padding) lengths of the samples the step trained on and
    T = sum(seq_lens). Each sample attends only to itself and causally (half the score
    matrix), so its attention costs 6*L*H*d*s_i^2 instead of the model convention's
    12*L*H*d*s^2 per padded row. Useful MFU = this / (time * peak * n_gpus).
    """
    n_tokens = sum(int(s) for s in seq_lens)
    sum_sq = sum(int(s) ** 2 for s in seq_lens)
    return 6.0 * matmul_params(hf_config) * n_tokens + 6.0 * _attn_flops_unit(hf_config) * sum_sq


# Dense bf16 peak of one SXM GPU, the vendor's figure: real matmuls reach less (docs/PERFORMANCE.md).
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}


def peak_flops_per_gpu(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of `device`, or None where unknown (then MFU is not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in _PEAK_FLOPS.items():
        if key in name:
            return peak
    return None


def mfu(flops: float, seconds: float, peak: float | None, n_gpus: int = 1) -> float | None:
    """Model FLOPs utilisation as a fraction: flops / (seconds * peak * n_gpus)."""
    if peak is None or seconds <= 0:
        return None
    return flops / (seconds * peak * n_gpus)
