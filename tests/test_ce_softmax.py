"""sft/ops/ce_softmax.py: the fused cross-entropy's softmax kernel against log-softmax in fp64.

The kernel runs here under Triton's interpreter (tests/triton_interp.py: in a subprocess, with triton from the
environment or the side folder scripts/test.sh fills; the interpreter is chosen when the kernel is defined),
with a small block so that a row spans several blocks; tests/test_gpu.py runs it compiled on CUDA through the
fused loss."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import triton_interp
from triton_interp import needs_triton

_RUN = """
import json, sys, torch
from sft.ops import ce_softmax as m
m.BLOCK = int(sys.argv[1])
cap = None if sys.argv[2] == "none" else float(sys.argv[2])
logits, y = torch.load(sys.argv[3])
assert m.triton_runs(logits), "Triton kernel not selected"
dtype, into = getattr(torch, sys.argv[4]), sys.argv[5] == "into"
# "into": the gradient goes into rows 1..c of a larger buffer (the fused loss's held gradients); rows 0 and c+1 stay 7
buf = torch.full((logits.shape[0] + 2, logits.shape[1]), 7.0, dtype=dtype) if into else None
loss, grad, hit = m.softmax_pass(logits, y, cap, dtype, out=buf[1:-1] if into else None)
kept = bool((buf[0] == 7).all() and (buf[-1] == 7).all() and grad.data_ptr() == buf[1].data_ptr()) if into else True
print(json.dumps({"loss": float(loss), "hit": int(hit), "grad": grad.float().flatten().tolist(), "dtype": str(grad.dtype),
                  "kept": kept}))
"""


def _case(rows: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits with the hard parts: a large offset (the running max must rescale), a tie for the maximum
    across blocks (argmax takes the first), labels at the first and last column and at the maximum."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 4
    logits[0] += 80.0  # exp(80) overflows fp32 without the running max
    logits[1, 5] = logits[1, vocab - 3] = 50.0  # tie in different blocks: first index wins
    logits[2, vocab - 1] = 40.0  # the maximum in the last, partial block
    y = torch.randint(0, vocab, (rows,), generator=g)
    y[1], y[2], y[3], y[4] = 5, vocab - 1, 0, vocab - 1
    return logits, y


def _fp64(logits: torch.Tensor, y: torch.Tensor, cap: float | None):
    """(loss sum, dL/dlogits, hits) by autograd in fp64: independent of the kernel."""
    x = logits.double().requires_grad_()
    z = cap * torch.tanh(x / cap) if cap is not None else x
    loss = -torch.log_softmax(z, dim=-1).gather(1, y[:, None]).sum()
    loss.backward()
    # First index of the maximum, computed by hand (not torch.argmax, whose tie rule is the thing checked).
    first_max = torch.tensor([int((row == row.max()).nonzero()[0]) for row in logits])
    return float(loss), x.grad, int((first_max == y).sum())


@needs_triton
@pytest.mark.parametrize(
    "rows,vocab,block,cap,dtype,into",
    [
        (6, 300, 64, "none", "float32", "new"),  # 5 blocks, the last one partial
        (6, 256, 64, "none", "bfloat16", "into"),  # exact multiple of the block; bf16 gradient into a given buffer
        (5, 200, 64, "30.0", "float32", "new"),  # Gemma's soft-cap
        (5, 77, 128, "none", "float32", "new"),  # one block, mostly masked
    ],
)
def test_kernel_matches_log_softmax_in_fp64(tmp_path, rows, vocab, block, cap, dtype, into):
    logits, y = _case(rows, vocab)
    if block >= vocab:  # no cross-block tie possible: keep the tie inside the one block
        logits[1, vocab - 3] = 50.0
    path = tmp_path / "case.pt"
    torch.save((logits, y), path)
    out = subprocess.run(
        [sys.executable, "-c", _RUN, str(block), cap, str(path), dtype, into],
        env=triton_interp.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    want_loss, want_grad, want_hit = _fp64(logits, y, None if cap == "none" else float(cap))
    assert got["dtype"] == f"torch.{dtype}" and got["kept"]
    assert got["hit"] == want_hit
    assert got["loss"] == pytest.approx(want_loss, rel=1e-5)
    tol = {"rtol": 2**-8, "atol": 1e-3} if dtype == "bfloat16" else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(torch.tensor(got["grad"]).double().view(rows, vocab), want_grad, **tol)


def test_reference_math_matches_log_softmax_in_fp64():
    """The torch ops that run off CUDA (sft/ops/fused_ce.py) agree with the same fp64 reference."""
    from sft.ops.fused_ce import _softmax_grad

    logits, y = _case(6, 300)
    for cap in (None, 30.0):
        loss, grad, hit = _softmax_grad(logits, y, cap, torch.float32)
        want_loss, want_grad, want_hit = _fp64(logits, y, cap)
        assert float(loss) == pytest.approx(want_loss, rel=1e-5)
        assert int(hit) == want_hit
        torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6)
