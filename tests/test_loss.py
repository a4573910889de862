"""The loss over target positions (chunked or fused) equals the plain one (logits materialised): values, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sft.models.loss import target_linear_cross_entropy


def targets(labels: torch.Tensor) -> torch.Tensor:
    """The flat positions whose label is a target (the batch's `target_index`)."""
    return (labels != -100).nonzero().squeeze(1)


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_chunked_equals_plain_cross_entropy(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=g, dtype=torch.float32, requires_grad=True)
    weight = torch.randn(37, 16, generator=g, dtype=torch.float32, requires_grad=True)
    labels = torch.randint(0, 37, (50,), generator=g)
    labels[::3] = -100  # untrained positions
    got, _ = target_linear_cross_entropy(hidden, weight, labels, targets(labels), chunk_size=chunk)
    got.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = F.cross_entropy(hidden @ weight.t(), labels, reduction="sum", ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(got, ref)  # CE runs in fp32 by design: compare at fp32 tolerance
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], weight.grad)


@pytest.mark.parametrize("fused", [False, True], ids=["chunked", "fused"])
def test_no_target_gives_zero_but_keeps_the_graph(fused):
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(5, 8, requires_grad=True)
    labels = torch.full((4,), -100)
    loss, hits = target_linear_cross_entropy(hidden, weight, labels, targets(labels), fused=fused)
    loss.backward()
    assert float(loss) == 0.0 and int(hits) == 0
    assert weight.grad is not None and float(weight.grad.abs().sum()) == 0.0  # FSDP sees a (zero) gradient


@pytest.mark.parametrize("fused", [False, True], ids=["chunked", "fused"])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
def test_loss_accuracy_and_softcap_match_full_logits(fused, softcap):
    """Both loss paths against a plain full-logits computation in float64: the CE sum, its
    gradients (through the final-logit soft-cap c·tanh(l/c) when set) and the argmax hit count."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(40, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(29, 16, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 29, (40,), generator=g)
    labels[::4] = -100
    index = (labels != -100).nonzero().squeeze(1)
    loss, hits = target_linear_cross_entropy(hidden, weight, labels, index, chunk_size=7, fused=fused, softcap=softcap)
    loss.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = hidden @ weight.t()
    capped = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    ref = F.cross_entropy(capped, labels, reduction="sum", ignore_index=-100)
    ref.backward()
    # The logits are taken to fp32 by design: compare at fp32 tolerance.
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-5, atol=1e-5)
    want = int((logits.argmax(-1) == labels)[labels != -100].sum())
    assert int(hits) == want and 0 < want < len(index)  # a count that could be wrong either way


@pytest.mark.parametrize("grad_w_rows", [1, 16, 8192], ids=["per_chunk", "two_chunks", "one_gemm"])
def test_fused_head_gradient_in_groups_of_chunks(monkeypatch, grad_w_rows):
    """The fused loss sums the head gradient once per GRAD_W_ROWS rows (whole chunks), not per chunk:
    with 30 rows in chunks of 7 that is per chunk, per two chunks (the last group one short chunk) and
    all at once. Each gives fp64 autograd's gradients; the hidden gradient and loss too."""
    from sft.ops import fused_ce

    monkeypatch.setattr(fused_ce, "GRAD_W_ROWS", grad_w_rows)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(30, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(29, 16, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 29, (30,), generator=g)
    loss, _ = fused_ce.fused_linear_cross_entropy(hidden, weight, labels, chunk=7)
    (loss * 0.5).backward()
    got = loss.detach(), hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = F.cross_entropy(hidden @ weight.t(), labels, reduction="sum")
    (ref * 0.5).backward()
    for a, b in zip(got, (ref.detach(), hidden.grad, weight.grad)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
