"""The fused cross-entropy's softmax pass as one Triton kernel: two reads of the fp32 logits, one write.

For each row of a chunk's fp32 logits l [c, V] and its label y, with an optional final-logit soft-cap
k (Gemma 2/3: l <- k * tanh(l / k)):

    lse  = log(sum_j exp(l_j))           loss = lse - l_y
    grad = exp(l - lse) - onehot(y)      (times 1 - tanh^2(l / k) with a cap), rounded once to bf16
    hit  = argmax_j l_j == y             (the first index of the maximum, as torch.argmax)

Why a kernel of our own: inductor compiles the same math into a looped reduction that reads the
logits three times (max, sum of exponentials, gradient), a memory-bound pass that weighs on the step at
large vocabularies (figures: docs/PERFORMANCE.md). Here the first read keeps a running maximum and
rescales the running sum (online logsumexp), and tracks the argmax on the way; the second read writes
the gradient: about a quarter less memory traffic. All math in fp32. One program per row; the per-row losses and hits
are summed afterwards in a fixed order, so the result is the same bits run to run.
"""

from __future__ import annotations

import torch

from sft.ops.triton_support import on_triton, tl, triton

# Logits per loop iteration of a program, and its warps: 16 fp32 a thread, four 16-byte loads.
BLOCK = 4096
WARPS = 8

if triton is not None:

    @triton.jit
    def _capped(x, cap, HAS_CAP: tl.constexpr):
        """(logits after the soft-cap, tanh(l / cap)); tanh as 2·sigmoid(2z) − 1 (no tanh in tl)."""
        if HAS_CAP:
            t = 2.0 * tl.sigmoid(2.0 * x / cap) - 1.0
            return cap * t, t
        return x, x

    @triton.jit
    def _sft_ce_softmax(
        LOGITS, Y, GRAD, LOSS, HIT, stride_l, stride_g, cap, V: tl.constexpr, HAS_CAP: tl.constexpr, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        src = LOGITS + row * stride_l
        y = tl.load(Y + row)
        cols = tl.arange(0, BLOCK)
        # Read 1: running max m, sum of exp(l - m) rescaled when m grows, and the argmax.
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        arg = tl.zeros((), tl.int64)
        for start in range(0, V, BLOCK):
            offs = start + cols
            mask = offs < V
            x, _ = _capped(tl.load(src + offs, mask=mask, other=0.0), cap, HAS_CAP)
            x = tl.where(mask, x, float("-inf"))
            bmax, barg = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
            # Strictly greater: a later block's equal maximum keeps the first index, as torch.argmax.
            arg = tl.where(bmax > m, start + barg.to(tl.int64), arg)
            m_new = tl.maximum(m, bmax)
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        ly, _ = _capped(tl.load(src + y), cap, HAS_CAP)
        tl.store(LOSS + row, lse - ly)
        tl.store(HIT + row, (arg == y).to(tl.int32))
        # Read 2: the gradient softmax - onehot (times the cap's derivative), rounded once.
        dst = GRAD + row * stride_g
        for start in range(0, V, BLOCK):
            offs = start + cols
            mask = offs < V
            x, t = _capped(tl.load(src + offs, mask=mask, other=0.0), cap, HAS_CAP)
            g = tl.exp(x - lse) - (offs == y).to(tl.float32)
            if HAS_CAP:
                g = g * (1.0 - t * t)
            tl.store(dst + offs, g.to(GRAD.dtype.element_ty), mask=mask)


def triton_runs(logits: torch.Tensor) -> bool:
    """Whether `softmax_pass` runs the Triton kernel for these logits (CUDA, or the Triton interpreter)."""
    return on_triton(logits) and logits.numel() > 0


def softmax_pass(
    logits: torch.Tensor, y: torch.Tensor, softcap: float | None, dtype: torch.dtype, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss sum fp32, dL/dlogits [c, V] in `dtype`, argmax hits int64) of fp32 logits [c, V] and labels y [c].

    The gradient goes into `out` when given ([c, V] of `dtype`, rows contiguous). Only where
    `triton_runs(logits)`: the caller keeps the torch ops for the rest."""
    assert logits.dtype == torch.float32 and logits.stride(1) == 1, "fp32 logits with contiguous rows"
    c, v = logits.shape
    y = y.contiguous()
    grad = torch.empty((c, v), dtype=dtype, device=logits.device) if out is None else out
    assert grad.shape == (c, v) and grad.dtype == dtype and grad.stride(1) == 1, "out: [c, V] of dtype, rows contiguous"
    loss = torch.empty(c, dtype=torch.float32, device=logits.device)
    hit = torch.empty(c, dtype=torch.int32, device=logits.device)
    _sft_ce_softmax[(c,)](
        logits,
        y,
        grad,
        loss,
        hit,
        logits.stride(0),
        grad.stride(0),
        float(softcap or 1.0),
        V=v,
        HAS_CAP=softcap is not None,
        BLOCK=BLOCK,
        num_warps=WARPS,
    )
    return loss.sum(), grad, hit.sum(dtype=torch.int64)
