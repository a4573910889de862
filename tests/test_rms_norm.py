"""sft/ops/rms_norm.py: PyTorch's fused forward with a one-pass backward, checked against the math in fp64.

The Triton kernel runs here under Triton's interpreter (tests/triton_interp.py: in a subprocess, with triton
from the environment or the side folder scripts/test.sh fills; the interpreter is chosen when the kernel is
defined); tests/test_gpu.py runs it compiled on CUDA."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import triton_interp
from triton_interp import needs_triton

from sft.ops.rms_norm import rms_norm

EPS = 1e-6


def _case(rows: int, cols: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, cols, generator=g) * 3).to(dtype)
    w = (torch.rand(cols, generator=g) * 2 + 0.25).to(dtype)
    dy = torch.randn(rows, cols, generator=g).to(dtype)
    return x, w, dy


def _fp64(x, w, dy):
    """y, dx, dw of weight * x / rms(x) by autograd in fp64: independent of the code under test."""
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y = w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
    (y * dy.double()).sum().backward()
    return y.detach(), x64.grad, w64.grad


def _ours(x, w, dy):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = rms_norm(x, w, EPS)
    (y * dy).sum().backward()
    return y.detach(), x.grad, w.grad


def _check(got, want, dtype):
    y, dx, dw = got
    y64, dx64, dw64 = want
    assert y.dtype == dx.dtype == dw.dtype == dtype
    tol = {"rtol": 2**-7, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(y.double(), y64, **tol)
    torch.testing.assert_close(dx.double(), dx64, **tol)
    torch.testing.assert_close(dw.double(), dw64, rtol=tol["rtol"], atol=tol["atol"] * 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_math_in_fp64(dtype):
    x, w, dy = _case(37, 100, dtype)
    _check(_ours(x, w, dy), _fp64(x, w, dy), dtype)


_INTERPRETED = """
import json, sys, torch
from sft.ops import rms_norm as m
assert m.triton_backward_runs(torch.zeros(1, 8)), "Triton backward not selected"
rows, cols, dtype = int(sys.argv[1]), int(sys.argv[2]), getattr(torch, sys.argv[3])
g = torch.Generator().manual_seed(0)
x = (torch.randn(rows, cols, generator=g) * 3).to(dtype).requires_grad_()
w = (torch.rand(cols, generator=g) * 2 + 0.25).to(dtype).requires_grad_()
dy = torch.randn(rows, cols, generator=g).to(dtype)
(m.rms_norm(x, w, 1e-6) * dy).sum().backward()
print(json.dumps({"dx": x.grad.float().tolist(), "dw": w.grad.float().tolist()}))
"""


@needs_triton
@pytest.mark.parametrize(
    "rows,cols,dtype", [(37, 100, "float32"), (50, 64, "bfloat16"), (9, 1536, "float32"), (70, 48, "bfloat16")]
)
def test_triton_backward_matches_the_math_in_fp64(rows, cols, dtype):
    """Row counts that are not a multiple of the row block, widths that are not a power of two."""
    env = triton_interp.env()
    out = subprocess.run(
        [sys.executable, "-c", _INTERPRETED, str(rows), str(cols), dtype],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    x, w, dy = _case(rows, cols, getattr(torch, dtype))
    _, dx64, dw64 = _fp64(x, w, dy)
    tol = 2**-7 if dtype == "bfloat16" else 1e-5
    torch.testing.assert_close(torch.tensor(got["dx"]).double(), dx64, rtol=tol, atol=tol * 2)
    torch.testing.assert_close(torch.tensor(got["dw"]).double(), dw64, rtol=tol, atol=tol * 16)


def test_a_frozen_weight_gets_no_gradient():
    """LoRA freezes the norms: the input still gets its gradient, the weight none."""
    x, w, dy = _case(5, 32, torch.float32)
    x.requires_grad_()
    (rms_norm(x, w, EPS) * dy).sum().backward()
    _, dx64, _ = _fp64(x.detach(), w, dy)
    assert w.grad is None
    torch.testing.assert_close(x.grad.double(), dx64, rtol=1e-5, atol=1e-5)
