"""Exact per-segment attention with the family features: sliding window, logit soft-capping, sinks.

`AttnFeatures` carries what one layer's attention call asks for (from the kwargs transformers passes:
`sliding_window`, `softcap`, `s_aux`, and sft's `image_blocks`: image tokens that attend to each other both ways,
sft/models/attention/image_blocks.py). `segment_attention` computes it exactly in fp32 per packed
segment: the CPU reference, and the correct CUDA path for what the varlen kernels lack (sinks, and
soft-capping without flash-attn). `kernel_window` turns a window into a varlen kernel's
`window_size`. Window semantics are Hugging Face's: query i sees key j iff 0 <= i - j < window.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from sft.models.attention.image_blocks import ImageBlocks


@dataclass(frozen=True)
class AttnFeatures:
    """One attention call's extras. `sinks` is `[h]` for the heads this call computes."""

    window: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None
    blocks: ImageBlocks | None = None  # over the whole packed row

    def plain(self, max_len: int) -> bool:
        """Nothing beyond causal attention (a window covering every sample is plain causal)."""
        return (
            self.softcap is None
            and self.sinks is None
            and self.blocks is None
            and (self.window is None or self.window >= max_len)
        )

    def with_sinks(self, sinks: torch.Tensor | None) -> AttnFeatures:
        return replace(self, sinks=sinks)


def features_from_kwargs(kwargs: dict) -> AttnFeatures:
    """The extras transformers' attention modules pass by keyword (None or 0 means absent)."""
    window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap")
    blocks = kwargs.get("image_blocks")
    if blocks is not None and blocks.sliding_only and not window:
        blocks = None  # a full-attention layer of a family whose blocks act in sliding layers only
    return AttnFeatures(
        window=int(window) if window else None,
        softcap=float(softcap) if softcap else None,
        sinks=kwargs.get("s_aux"),
        blocks=blocks,
    )


def kernel_window(window: int | None, max_len: int) -> tuple[int, int]:
    """`window_size=(left, right)` of flash-attn / torch varlen: causal is (-1, 0); a window of W sees W-1 back."""
    if window is None or window >= max_len:
        return (-1, 0)
    return (window - 1, 0)


def _segment(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, f: AttnFeatures, block: torch.Tensor | None
) -> torch.Tensor:
    """q/k/v `[n, h, d]` (KV already repeated to h heads) -> `[n, h, d]`, softmax in fp32; `block` [n] the image
    block of each token (-1: none), whose members see each other both ways."""
    n = q.shape[0]
    # [n, h, d] -> [h, n, d]; scores [h, n, n]
    qh, kh, vh = (t.transpose(0, 1).float() for t in (q, k, v))
    scores = (qh @ kh.transpose(1, 2)) * scale
    if f.softcap is not None:
        scores = f.softcap * torch.tanh(scores / f.softcap)
    i = torch.arange(n, device=q.device)
    dist = i[:, None] - i[None, :]  # query index - key index
    allowed = dist >= 0
    if block is not None:
        allowed = allowed | ((block[:, None] == block[None, :]) & (block[:, None] >= 0))
    if f.window is not None:
        allowed = allowed & (dist < f.window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if f.sinks is not None:
        # The sink is one more logit per head that takes probability mass but has no value.
        sink = f.sinks.float().reshape(-1, 1, 1).expand(-1, n, 1)  # [h, n, 1]
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :n]
    else:
        probs = torch.softmax(scores, dim=-1)
    return (probs @ vh).transpose(0, 1).to(q.dtype)  # [h, n, d] -> [n, h, d]


def segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int], scale: float, f: AttnFeatures
) -> torch.Tensor:
    """Attention within each segment `[bounds[i], bounds[i+1])`: q `[T, h, d]`, k/v `[T, h_kv, d]` -> `[T, h, d]`."""
    rep = q.shape[1] // k.shape[1]
    # GQA: query head i reads KV head i // rep, which is what repeat_interleave lays out.
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    block = None if f.blocks is None else f.blocks.block_ids(q.shape[0]).to(q.device)
    outs = [
        _segment(q[a:b], k[a:b], v[a:b], scale, f, None if block is None else block[a:b])
        for a, b in zip(bounds[:-1], bounds[1:])
        if b > a
    ]
    return torch.cat(outs, dim=0)
