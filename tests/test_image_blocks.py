"""Image blocks in packed attention (sft/models/attention/image_blocks.py): Gemma 3's image tokens see each other.

The blocks of a packed row are found per sample (a run of image tokens never spans two samples), and the exact
reference attends as transformers' Gemma 3 masks do: OR(causal, same block), and with a sliding window
AND(window, OR(causal, same block)). The expectation is a dense float64 softmax over a mask written out here
element by element. The CUDA path (one extra non-causal varlen call) is checked against it in tests/test_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

from sft.models.attention.image_blocks import ImageBlocks
from sft.models.attention.reference import AttnFeatures
from sft.models.attention.varlen import varlen_attention

# Three samples; image runs at a sample's start, in its middle, two in one sample, and one running into the next
# sample (two blocks, one per sample).
LENGTHS = [14, 11, 9]
IMAGE = [(0, 3), (6, 9), (12, 14), (14, 16), (20, 22)]


def _row() -> tuple[torch.Tensor, list[int]]:
    is_image = torch.zeros(sum(LENGTHS), dtype=torch.bool)
    for a, b in IMAGE:
        is_image[a:b] = True
    bounds = [0]
    for n in LENGTHS:
        bounds.append(bounds[-1] + n)
    return is_image, bounds


def test_blocks_are_found_per_sample():
    is_image, bounds = _row()
    blocks = ImageBlocks.find(is_image, bounds)
    assert blocks.spans == ((0, 0, 3), (0, 6, 9), (0, 12, 14), (14, 14, 16), (14, 20, 22))
    assert blocks.rows.tolist() == [0, 1, 2, 6, 7, 8, 12, 13, 14, 15, 20, 21]
    assert blocks.keys.tolist() == [0, 1, 2, *range(9), *range(14), 14, 15, *range(14, 22)]
    assert blocks.cu_q.tolist() == [0, 3, 6, 8, 10, 12] and blocks.cu_k.tolist() == [0, 3, 12, 26, 28, 36]
    assert (blocks.max_q, blocks.max_k) == (3, 14)
    assert ImageBlocks.find(torch.zeros(5, dtype=torch.bool), [0, 5]) is None


def _expected(q, k, v, bounds, blocks_of, window, scale):
    """Dense float64 attention per sample with the mask written out element by element."""
    q, k, v = (t.double() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = torch.zeros_like(q)
    for s, e in zip(bounds[:-1], bounds[1:]):
        n = e - s
        allowed = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            for j in range(n):
                same = blocks_of[s + i] >= 0 and blocks_of[s + i] == blocks_of[s + j]
                in_window = window is None or j > i - window
                allowed[i, j] = (j <= i or same) and in_window
        scores = torch.einsum("ihd,jhd->hij", q[s:e], k[s:e]) * scale
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        out[s:e] = torch.einsum("hij,jhd->ihd", probs, v[s:e])
    return out


@pytest.mark.parametrize("window", [None, 4])
def test_reference_attends_blocks_both_ways(window):
    is_image, bounds = _row()
    blocks = ImageBlocks.find(is_image, bounds)
    blocks_of = [-1] * len(is_image)
    for idx, (_, a, b) in enumerate(blocks.spans):
        blocks_of[a:b] = [idx] * (b - a)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(len(is_image), h, 8, generator=g) for h in (4, 2, 2))
    cu = torch.tensor(bounds, dtype=torch.int32)
    scale = 8**-0.5
    got = varlen_attention(q, k, v, cu, cu, max(LENGTHS), max(LENGTHS), scale, AttnFeatures(window, blocks=blocks))
    want = _expected(q, k, v, bounds, blocks_of, window, scale)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # The blocks matter: plain causal attention differs on the image rows.
    causal = varlen_attention(q, k, v, cu, cu, max(LENGTHS), max(LENGTHS), scale, AttnFeatures(window))
    assert (causal - got).abs().max() > 1e-2
