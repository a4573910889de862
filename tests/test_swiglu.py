"""sft/ops/swiglu.py: silu(a) * b and its in-place backward, checked against autograd in fp64.

The Triton kernels run here under Triton's interpreter (tests/triton_interp.py: in a subprocess, with triton
from the environment or the side folder scripts/test.sh fills; the interpreter is chosen when the kernels are
defined); tests/test_gpu.py runs them compiled on CUDA."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import triton_interp
from triton_interp import needs_triton

from sft.ops.swiglu import silu_mul


def _case(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a, b, dc = ((torch.randn(*shape, generator=g) * 3).to(dtype) for _ in range(3))
    return a, b, dc


def _fp64(a, b, dc):
    """c, da, db of silu(a) * b by autograd in fp64: independent of the code under test."""
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    c = torch.nn.functional.silu(a64) * b64
    (c * dc.double()).sum().backward()
    return c.detach(), a64.grad, b64.grad


def _ours(a, b, dc):
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    c = silu_mul(a * 1, b * 1)  # non-leaf inputs, as the MLP's projections are: the backward overwrites them
    (c * dc).sum().backward()
    return c.detach(), a.grad, b.grad


def _close(got, want, dtype):
    tol = {"rtol": 2**-7, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    for x, x64 in zip(got, want):
        assert x.dtype == dtype
        torch.testing.assert_close(x.double(), x64, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_the_math_in_fp64(dtype):
    a, b, dc = _case((3, 37, 100), dtype)
    _close(_ours(a, b, dc), _fp64(a, b, dc), dtype)


def _shared_fp64(x, dc):
    x64 = x.double().requires_grad_()
    (torch.nn.functional.silu(x64) * x64 * dc.double()).sum().backward()
    return x64.grad


def test_one_tensor_as_both_inputs_gets_both_gradients():
    """silu(x) * x: the in-place backward must not write both gradients over one buffer."""
    x, _, dc = _case((5, 8), torch.float32)
    xs = x.clone().requires_grad_()
    y = xs * 1
    (silu_mul(y, y) * dc).sum().backward()
    torch.testing.assert_close(xs.grad.double(), _shared_fp64(x, dc), rtol=1e-5, atol=1e-5)


_INTERPRETED = """
import json, sys, torch
from sft.ops import swiglu as m
shape, dtype = [int(s) for s in sys.argv[1].split("x")], getattr(torch, sys.argv[2])
assert m.triton_runs(torch.zeros(shape)), "Triton kernels not selected"
g = torch.Generator().manual_seed(0)
a, b, dc = ((torch.randn(*shape, generator=g) * 3).to(dtype) for _ in range(3))
a, b = a.requires_grad_(), b.requires_grad_()
if len(sys.argv) > 3:  # one tensor as both inputs
    y = a * 1
    (m.silu_mul(y, y) * dc).sum().backward()
    print(json.dumps({"dx": a.grad.float().flatten().tolist()}))
    sys.exit()
c = m.silu_mul(a * 1, b * 1)
(c * dc).sum().backward()
print(json.dumps({k: t.float().flatten().tolist() for k, t in (("c", c), ("da", a.grad), ("db", b.grad))}))
"""


@needs_triton
@pytest.mark.parametrize("shape,dtype", [("37x100", "float32"), ("3x1500", "bfloat16"), ("4096x3", "float32")])
def test_triton_kernels_match_the_math_in_fp64(shape, dtype):
    """Element counts that are not a multiple of the block, and more than one block."""
    env = triton_interp.env()
    out = subprocess.run(
        [sys.executable, "-c", _INTERPRETED, shape, dtype], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    dims = tuple(int(s) for s in shape.split("x"))
    want = _fp64(*_case(dims, getattr(torch, dtype)))
    tol = 2**-7 if dtype == "bfloat16" else 1e-5
    for key, x64 in zip(("c", "da", "db"), want):
        torch.testing.assert_close(torch.tensor(got[key]).double().view(dims), x64, rtol=tol, atol=tol * 2, msg=key)


@needs_triton
def test_triton_one_tensor_as_both_inputs():
    env = triton_interp.env()
    out = subprocess.run(
        [sys.executable, "-c", _INTERPRETED, "5x8", "float32", "shared"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    x, _, dc = _case((5, 8), torch.float32)
    got = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1])["dx"]).double().view(5, 8)
    torch.testing.assert_close(got, _shared_fp64(x, dc), rtol=1e-5, atol=1e-5)
