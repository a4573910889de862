"""Fused linear cross-entropy without host synchronisation: gradients computed in the forward.

`fused_linear_cross_entropy(hidden, weight, labels)` returns the fp32 sum over rows of
CE(hidden @ weight.T, label) and the number of rows whose argmax logit is the label (token
accuracy, counted from the same logits). A final-logit soft-cap c (Gemma 2/3) replaces the
logits l by c·tanh(l/c) and scales their gradient by 1 - tanh²(l/c). The rows are the target
positions only (the caller selects them with an index built on the host), so every row counts and
the number of chunks is known from the shape: nothing is read back from the device. Each chunk's logits live only inside the
forward, which also computes d(loss)/d(hidden) and accumulates d(loss)/d(weight) in fp32; the
backward scales those by the incoming gradient (a device scalar, never inspected on the host).
On CUDA each chunk's logits come from a GEMM with an fp32 output, the softmax pass is one Triton
kernel of sft's own (sft/ops/ce_softmax.py: two reads of the logits), and the head gradient is summed in
the GEMM's epilogue (docs/PERFORMANCE.md has the timings). The head gradient takes one GEMM per
`GRAD_W_ROWS` rows, not per chunk: each such GEMM reads and writes the whole fp32 [V, d] sum (1.9 GB at
the 1.5B head), so fewer, longer ones move less memory, while the fp32 logits stay one chunk at a time.
"""

from __future__ import annotations

import torch

from sft.ops import ce_softmax

# Rows per chunk: a chunk holds about 2 fp32 [rows, vocab] buffers (1.2 GB each at 152k vocab).
DEFAULT_CHUNK = 2048
# Rows per head-gradient GEMM: the chunks' dL/dlogits (in the hidden dtype) are kept until this many rows are
# in, then summed into the fp32 head gradient at once (2.5 GB of bf16 at 152k vocab). Fewer, larger GEMMs make
# the whole loss measurably faster than one per chunk, while the chunks stay small enough that their fp32
# logits fit (benchmarks/ce_bench.py, docs/PERFORMANCE.md).
GRAD_W_ROWS = 8192


def _softmax_grad(
    logits: torch.Tensor, y: torch.Tensor, softcap: float | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss sum, dL/dlogits in `dtype`, correct count) from one chunk's fp32 logits [c, V] and labels [c].

    The reference math: it runs off CUDA; on CUDA sft/ops/ce_softmax.py's kernel computes the same."""
    correct = (logits.argmax(-1) == y).sum()  # tanh keeps the order: the same argmax with a cap
    dcap = None
    if softcap is not None:
        t = torch.tanh(logits / softcap)
        dcap = 1.0 - t * t  # d(c·tanh(l/c))/dl
        logits = t * softcap
    lse = torch.logsumexp(logits, dim=-1)  # [c]
    loss = (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
    hit = torch.arange(logits.shape[1], device=logits.device)[None, :] == y[:, None]
    grad = torch.exp(logits - lse[:, None]) - hit.to(logits.dtype)  # softmax - one_hot
    if dcap is not None:
        grad = grad * dcap
    return loss, grad.to(dtype), correct


def _logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits [c, V]: on CUDA straight from the bf16 GEMM's fp32 accumulator (no bf16 round trip)."""
    if h.is_cuda and h.dtype != torch.float32:
        return torch.mm(h, weight.t(), out_dtype=torch.float32)
    return (h @ weight.t()).float()


def _chunk_grads(
    h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, softcap: float | None, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss sum, dL/dlogits in h's dtype, correct count) of one chunk: h [c, d], weight [V, d], y [c].
    The gradient is written into `out` when given."""
    return _softmax_pass(_logits(h, weight), y, softcap, h.dtype, out)


def _softmax_pass(
    logits: torch.Tensor, y: torch.Tensor, softcap: float | None, dtype: torch.dtype, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sft's Triton kernel on CUDA (sft/ops/ce_softmax.py), the torch ops elsewhere."""
    if ce_softmax.triton_runs(logits):
        return ce_softmax.softmax_pass(logits, y, softcap, dtype, out)
    loss, grad, correct = _softmax_grad(logits, y, softcap, dtype)
    return loss, (grad if out is None else out.copy_(grad)), correct


def compile_ahead(device: torch.device, vocab: int, dtype: torch.dtype, softcap: float | None) -> None:
    """Compile the softmax kernel for this vocabulary, hidden dtype and soft-cap before training starts,
    so that Triton's first compile (most of a second) does not land inside the first step and its timing.
    One row is enough: the kernel is specialised on the vocabulary and the dtypes, not on the row count."""
    if device.type != "cuda":
        return
    logits = torch.zeros(1, vocab, dtype=torch.float32, device=device)
    _softmax_pass(logits, torch.zeros(1, dtype=torch.int64, device=device), softcap, dtype)


def _accumulate_grad_w(grad_w: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """grad_w [V, d] fp32 += g.T @ h: on CUDA the sum happens in the GEMM's epilogue, in fp32."""
    if g.is_cuda and g.dtype != torch.float32:
        torch.addmm(grad_w, g.t(), h, out_dtype=torch.float32, out=grad_w)
    else:
        grad_w += (g.t() @ h).float()


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int, softcap: float | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
        grad_h = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight.requires_grad else None
        # Whole chunks per head-gradient GEMM; their dL/dlogits wait in `held` until it runs.
        group = max(chunk, GRAD_W_ROWS // chunk * chunk) if grad_w is not None else chunk
        held = torch.empty((min(group, n), weight.shape[0]), dtype=hidden.dtype, device=hidden.device)
        for first in range(0, n, group):
            last = min(first + group, n)
            for start in range(first, last, chunk):
                end = min(start + chunk, last)
                g = held[start - first : end - first]
                loss, _, right = _chunk_grads(hidden[start:end], weight, labels[start:end], softcap, out=g)
                total += loss
                correct += right
                if grad_h is not None:
                    torch.mm(g, weight, out=grad_h[start:end])  # [c, V] @ [V, d] -> [c, d]
            if grad_w is not None:  # [V, rows] @ [rows, d] -> [V, d], summed in fp32
                _accumulate_grad_w(grad_w, held[: last - first], hidden[first:last])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(correct)
        return total, correct

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, _grad_correct: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk: int = DEFAULT_CHUNK,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of CE(hidden @ weight.T, labels), number of argmax hits) over all rows (every row a
    target). hidden [n, d], weight [V, d], labels [n] int64 in [0, V). Differentiable in hidden and
    weight; no sync."""
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            loss, _, right = _chunk_grads(hidden[start : start + chunk], weight, labels[start : start + chunk], softcap)
            total += loss
            correct += right
        return total, correct
    return _FusedLinearCE.apply(hidden, weight, labels, chunk, softcap)
