"""The chunked linear cross-entropy equals the plain one (logits materialised), values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sft.loss import chunked_linear_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_chunked_equals_plain_cross_entropy(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=g, dtype=torch.float32, requires_grad=True)
    weight = torch.randn(37, 16, generator=g, dtype=torch.float32, requires_grad=True)
    labels = torch.randint(0, 37, (50,), generator=g)
    labels[::3] = -100  # untrained positions
    got = chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=chunk)
    got.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = F.cross_entropy(hidden @ weight.t(), labels, reduction="sum", ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(got, ref)  # CE runs in fp32 by design: compare at fp32 tolerance
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], weight.grad)


def test_no_target_gives_zero_but_keeps_the_graph():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(5, 8, requires_grad=True)
    loss = chunked_linear_cross_entropy(hidden, weight, torch.full((4,), -100))
    loss.backward()
    assert float(loss) == 0.0
    assert weight.grad is not None and float(weight.grad.abs().sum()) == 0.0  # FSDP sees a (zero) gradient
