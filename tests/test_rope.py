"""sft/rope.py: the rotary kernel against the rotation in fp64, and the check that decides where it is installed.

The Triton kernel runs here under Triton's interpreter when triton is installed (in a subprocess: the
interpreter is chosen when the kernel is defined); tests/test_gpu.py runs it compiled on CUDA."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from sft.families import FAMILIES, rope_kernel
from sft.rope import _is_standard, kernel_runs, patch_rope

_RUN = """
import json, sys, torch
from sft import rope as m
q, k, cos, sin, dq, dk = torch.load(sys.argv[1])
q, k = q.requires_grad_(), k.requires_grad_()
assert m.kernel_runs(q, k, cos, sin, 1), "kernel not selected"
qo, ko = m._Rope.apply(q, k, cos, sin)
((qo * dq).sum() + (ko * dk).sum()).backward()
out = {n: t.float().flatten().tolist() for n, t in (("q", qo), ("k", ko), ("dq", q.grad), ("dk", k.grad))}
out["layout"] = [list(qo.stride()), list(q.stride())]
print(json.dumps(out))
"""


def _half_rotation_fp64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x·cos + [-x2, x1]·sin, per head, written out element by element: independent of the code under test."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None], sin[:, None]
    return torch.cat((x1 * c[..., :half] - x2 * s[..., :half], x2 * c[..., half:] + x1 * s[..., half:]), dim=-1)


def _case(bsz: int, hq: int, hk: int, seq: int, dim: int, cos_batch: int, dtype: torch.dtype):
    """q and k as transformers hands them over: [B, S, H, D] projections viewed as [B, H, S, D]."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(bsz, seq, hq, dim, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(bsz, seq, hk, dim, generator=g).to(dtype).transpose(1, 2)
    # A table whose halves differ: the kernel must read the full rows, not assume they repeat.
    cos = torch.randn(cos_batch, seq, dim, generator=g).to(dtype)
    sin = torch.randn(cos_batch, seq, dim, generator=g).to(dtype)
    dq, dk = torch.randn(q.shape, generator=g).to(dtype), torch.randn(k.shape, generator=g).to(dtype)
    return q, k, cos, sin, dq, dk


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (CUDA hosts have it)")
@pytest.mark.parametrize(
    "bsz,hq,hk,seq,dim,cos_batch,dtype",
    [
        (1, 3, 1, 7, 16, 1, "float32"),  # packed rows: batch 1; 3 query heads (a masked lane)
        (2, 4, 2, 5, 8, 2, "float32"),  # padded batch with per-row positions
        (2, 6, 2, 4, 32, 1, "bfloat16"),  # one table for the whole batch; bf16
    ],
)
def test_kernel_matches_the_rotation_in_fp64(tmp_path, bsz, hq, hk, seq, dim, cos_batch, dtype):
    q, k, cos, sin, dq, dk = _case(bsz, hq, hk, seq, dim, cos_batch, getattr(torch, dtype))
    path = tmp_path / "case.pt"
    torch.save((q, k, cos, sin, dq, dk), path)
    out = subprocess.run(
        [sys.executable, "-c", _RUN, str(path)],
        env=dict(os.environ, TRITON_INTERPRET="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["layout"][0] == got["layout"][1]  # the output keeps the input's memory layout
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    c64 = cos.double().expand(bsz, -1, -1)
    s64 = sin.double().expand(bsz, -1, -1)
    qo, ko = _half_rotation_fp64(q64, c64, s64), _half_rotation_fp64(k64, c64, s64)
    ((qo * dq.double()).sum() + (ko * dk.double()).sum()).backward()
    tol = {"rtol": 2**-7, "atol": 2e-2} if dtype == "bfloat16" else {"rtol": 1e-5, "atol": 1e-5}
    for name, want in (("q", qo), ("k", ko), ("dq", q64.grad), ("dk", k64.grad)):
        torch.testing.assert_close(torch.tensor(got[name]).double().view(want.shape), want.detach(), **tol, msg=name)


def test_the_kernel_leaves_uncovered_calls_to_the_family():
    """Off CUDA, partial rotary, a head dim that is not a power of two, a table with a gradient: not the kernel's."""
    q, k, cos, sin, _, _ = _case(1, 2, 1, 4, 16, 1, torch.float32)
    assert not kernel_runs(q, k, cos, sin, 1)  # CPU without the interpreter
    if importlib.util.find_spec("triton") is None:
        return
    import sft.rope as rope

    saved = rope._INTERPRETED
    try:
        rope._INTERPRETED = True  # as on CUDA: the shape rules alone decide
        assert kernel_runs(q, k, cos, sin, 1)
        assert not kernel_runs(q, k, cos[..., :8], sin[..., :8], 1)  # partial rotary (Phi-4-mini)
        q12, k12, c12, s12, _, _ = _case(1, 2, 1, 4, 12, 1, torch.float32)
        assert not kernel_runs(q12, k12, c12, s12, 1)
        assert not kernel_runs(q, k, cos.requires_grad_(), sin, 1)
        assert not kernel_runs(q, k, cos.detach(), sin, 2)
    finally:
        rope._INTERPRETED = saved


def _modeling(model_type: str):
    name = "gemma3" if model_type == "gemma3_text" else model_type
    return importlib.import_module(f"transformers.models.{name}.modeling_{name}")


_SFT_ROPE = sorted(t for t in FAMILIES if rope_kernel(t) == "sft")


@pytest.mark.parametrize("model_type", _SFT_ROPE)
def test_each_sft_rope_family_has_the_standard_rotation(model_type):
    """Every family the table sends to sft/rope.py computes the rotation the kernel implements (else
    `apply_liger` would refuse it with use_liger=true): checked on the family's own function."""
    assert _is_standard(_modeling(model_type).apply_rotary_pos_emb)


def test_an_interleaved_rotation_is_not_taken_for_the_standard_one():
    """Cohere rotates interleaved pairs (x0, x1), (x2, x3)...: the check must tell it apart."""
    assert not _is_standard(_modeling("cohere").apply_rotary_pos_emb)
    assert not _is_standard(lambda q, k, cos, sin, unsqueeze_dim=1: (q * cos[:, None], k * cos[:, None]))


def test_patch_rope_installs_once_and_keeps_the_family_math_on_cpu(monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    modeling = _modeling("qwen2")
    original = modeling.apply_rotary_pos_emb
    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", original)  # restored afterwards
    cfg = AutoConfig.for_model(
        "qwen2", vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    ids = torch.randint(0, 97, (2, 9))
    before = lm(input_ids=ids).logits
    assert patch_rope(lm) and patch_rope(lm)
    assert modeling.apply_rotary_pos_emb.sft_original is original  # wrapped once, not twice
    torch.testing.assert_close(lm(input_ids=ids).logits, before, rtol=0, atol=0)
