"""Non-causal varlen attention for vision towers: all the images of a micro-batch in one call.

Registered with transformers under `VISION_ATTN`. The name holds "flash" on purpose: transformers' vision towers
(Qwen2-VL, Qwen2.5-VL, Qwen3-VL) then pass the images' boundaries (`cu_seq_lens_q`) and attend to every image in
one call, where with other implementations they split the patches and loop over the images in Python. On CUDA
this is PyTorch's varlen FlashAttention kernel with no causal mask (window (-1, -1)); elsewhere (CPU, fp32) the
exact per-image reference.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

VISION_ATTN = "sft_flash_bidirectional"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float) -> torch.Tensor:
    """q/k/v [T, h, d] -> [T, h, d]: each segment attends to itself only."""
    bounds = cu.tolist()  # on the host already where this runs (CPU)
    out = [
        F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), scale=scale
        ).transpose(0, 1)
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(out)


def bidirectional_varlen_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """q/k/v `[1, h, T, d]` over the concatenated images, `cu_seq_lens_q` their boundaries -> (`[1, T, h, d]`, None)."""
    if dropout:
        raise ValueError(f"{VISION_ATTN}: attention dropout {dropout} is not supported; set it to 0.0")
    if attention_mask is not None or kwargs.get("cu_seq_lens_q") is None or query.shape[0] != 1:
        raise ValueError(f"{VISION_ATTN} attends packed images only (cu_seq_lens_q, no dense mask, batch 1)")
    cu = kwargs["cu_seq_lens_q"].to(torch.int32)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, h, d]
    if q.is_cuda and q.dtype in _KERNEL_DTYPES:
        from torch.nn.attention.varlen import varlen_attn

        max_len = kwargs.get("max_length_q")
        max_len = int((cu[1:] - cu[:-1]).max()) if max_len is None else int(max_len)
        out = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, window_size=(-1, -1))
    else:
        out = _reference(q, k, v, cu, scale)
    return out[None], None


def register_vision_attention() -> str:
    """Register `VISION_ATTN` with transformers (idempotent); returns the name."""
    AttentionInterface.register(VISION_ATTN, bidirectional_varlen_forward)
    return VISION_ATTN
