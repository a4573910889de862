"""Rotary position embedding of q and k as one Triton kernel of sft's own, forward and backward.

transformers' families compute, per head, with x = [x1, x2] split in halves of the head dimension:

    out = x * cos + rotate_half(x) * sin,  rotate_half(x) = [-x2, x1]
    i.e. out1 = x1 * cos1 - x2 * sin1,     out2 = x2 * cos2 + x1 * sin2
    and  dx1  = g1 * cos1 + g2 * sin2,     dx2  = g2 * cos2 - g1 * sin1   (cos and sin carry no gradient)

Why a kernel of our own: Liger's RoPE (0.8.5) took 29.4 ms of the 1.5B step on an H200 (168 calls,
0.175 ms each, 2026-12-03) for about 0.3 GB of traffic a call, twice what the memory allows. Here one
program rotates every q and k head of one token: it reads the token's cos and sin once, and q and k
in whatever strides the attention hands over. Math in fp32, rounded once to the input dtype
(transformers' eager ops round three times). The full cos and sin rows are read, so the kernel is
exact for any table, not only the usual one whose halves repeat.

`patch_rope(lm)` installs it as the model's `apply_rotary_pos_emb`, after checking on the CPU that the
family's own function is the math above; any call the kernel does not cover (no Triton or off CUDA,
partial rotary, cos or sin with a gradient) runs the family's own function.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch
import torch.nn as nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines: the family's own function
    triton = None

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
WARPS = 4

if triton is not None:

    @triton.jit
    def _rotate_heads(
        X,
        OUT,
        tok_x,
        tok_o,
        sh_x,
        sh_o,
        c1,
        c2,
        s1,
        s2,
        H,
        HP: tl.constexpr,
        HALF: tl.constexpr,
        BACKWARD: tl.constexpr,
    ):
        """Rotate the H heads [H, 2·HALF] of one token from X into OUT (forward, or its transpose)."""
        h = tl.arange(0, HP)[:, None]
        d = tl.arange(0, HALF)[None, :]
        mask = (h < H) & (d < HALF)
        x_at = X + tok_x + h * sh_x + d
        x1 = tl.load(x_at, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_at + HALF, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        o_at = OUT + tok_o + h * sh_o + d
        tl.store(o_at, o1.to(OUT.dtype.element_ty), mask=mask)
        tl.store(o_at + HALF, o2.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _sft_rope(
        Q, K, QO, KO, COS, SIN, S, Hq, Hk,
        q_sb, q_ss, q_sh, k_sb, k_ss, k_sh,
        qo_sb, qo_ss, qo_sh, ko_sb, ko_ss, ko_sh,
        c_sb, c_ss,
        HQP: tl.constexpr, HKP: tl.constexpr, HALF: tl.constexpr, BACKWARD: tl.constexpr,
    ):  # fmt: skip
        tok = tl.program_id(0).to(tl.int64)
        b, s = tok // S, tok % S
        d = tl.arange(0, HALF)[None, :]
        c_at = b * c_sb + s * c_ss + d
        c1 = tl.load(COS + c_at).to(tl.float32)
        c2 = tl.load(COS + c_at + HALF).to(tl.float32)
        s1 = tl.load(SIN + c_at).to(tl.float32)
        s2 = tl.load(SIN + c_at + HALF).to(tl.float32)
        _rotate_heads(
            Q, QO, b * q_sb + s * q_ss, b * qo_sb + s * qo_ss, q_sh, qo_sh, c1, c2, s1, s2, Hq, HQP, HALF, BACKWARD
        )
        _rotate_heads(
            K, KO, b * k_sb + s * k_ss, b * ko_sb + s * ko_ss, k_sh, ko_sh, c1, c2, s1, s2, Hk, HKP, HALF, BACKWARD
        )


def _launch(q, k, cos, sin, backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, Hq, S, D] and k [B, Hk, S, D] (any strides with a unit last one) into new tensors
    of the same layout; cos and sin [B or 1, S, D]."""
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    bsz, hq, seq, dim = q.shape
    c_sb = 0 if cos.shape[0] == 1 else cos.stride(0)
    _sft_rope[(bsz * seq,)](
        q, k, qo, ko, cos, sin, seq, hq, k.shape[1],
        q.stride(0), q.stride(2), q.stride(1), k.stride(0), k.stride(2), k.stride(1),
        qo.stride(0), qo.stride(2), qo.stride(1), ko.stride(0), ko.stride(2), ko.stride(1),
        c_sb, cos.stride(1),
        HQP=triton.next_power_of_2(hq), HKP=triton.next_power_of_2(k.shape[1]), HALF=dim // 2, BACKWARD=backward,
        num_warps=WARPS,
    )  # fmt: skip
    return qo, ko


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        return (*_launch(dq, dk, cos, sin, backward=True), None, None)


def kernel_runs(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int) -> bool:
    """Whether `_Rope` covers this call: [B, H, S, D] q and k of one dtype, full rotary, the head dim a power
    of two and unit-strided, cos and sin [B or 1, S, D] without gradients, on CUDA (or Triton's interpreter)."""
    if triton is None or not (q.is_cuda or _INTERPRETED) or unsqueeze_dim != 1 or q.dim() != 4 or k.dim() != 4:
        return False
    dim = q.shape[-1]
    return (
        k.shape[-1] == dim
        and k.shape[0] == q.shape[0]
        and k.shape[2] == q.shape[2]
        and q.dtype == k.dtype
        and dim >= 2
        and dim & (dim - 1) == 0
        and q.stride(-1) == 1
        and k.stride(-1) == 1
        and cos.shape == sin.shape
        and cos.dim() == 3
        and cos.shape[0] in (1, q.shape[0])
        and tuple(cos.shape[1:]) == (q.shape[2], dim)
        and cos.stride(-1) == 1
        and sin.stride() == cos.stride()
        and not (cos.requires_grad or sin.requires_grad)
        and q.numel() > 0
    )


def reference_rope(q, k, cos, sin, unsqueeze_dim: int = 1):
    """The rotation written from its definition (the module docstring), for checking a family's function."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

    def rotate(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin


def _is_standard(fn: Callable) -> bool:
    """Whether a family's `apply_rotary_pos_emb` computes `reference_rope` (on small fp64 CPU tensors)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64), torch.randn(2, 1, 5, 8, generator=g).double()
    cos, sin = torch.randn(2, 5, 8, generator=g).double(), torch.randn(2, 5, 8, generator=g).double()
    try:
        got = fn(q, k, cos, sin)
    except Exception:  # a different signature or shape contract: not the standard function
        return False
    want = reference_rope(q, k, cos, sin)
    return all(torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(got, want))


def _with_kernel(original: Callable) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze_dim = kwargs.get("unsqueeze_dim", args[-1] if args else 1)
        if len(args) > 1 or set(kwargs) - {"unsqueeze_dim"} or not kernel_runs(q, k, cos, sin, unsqueeze_dim):
            return original(q, k, cos, sin, *args, **kwargs)
        return _Rope.apply(q, k, cos, sin)

    apply_rotary_pos_emb.sft_original = original
    return apply_rotary_pos_emb


def patch_rope(lm: nn.Module) -> bool:
    """Make the model's modeling module call sft's kernel for `apply_rotary_pos_emb` (process-wide, as
    Liger's patch is). False, with the module left alone, when its function is not the standard math."""
    module = sys.modules[type(lm).__module__]
    current = getattr(module, "apply_rotary_pos_emb", None)
    if current is None:
        return False
    if hasattr(current, "sft_original"):
        return True
    if not _is_standard(current):
        return False
    module.apply_rotary_pos_emb = _with_kernel(current)
    return True
