"""SwiGLU's gate, silu(a) x b, as flat elementwise Triton kernels on CUDA, with the backward in place.

Why kernels of our own: Liger's (0.8.5, on Hopper) runs one program per row with a block of
next_power_of_2(width) lanes. At widths just above a power of two (8,960 in a block of 16,384) nearly
half the lanes are masked off, and its backward runs well below the memory bandwidth its traffic
needs (docs/PERFORMANCE.md). These kernels walk the tensor as one flat array in fixed blocks, so
every lane loads, and the loads are 16 bytes wide.

    c  = silu(a) * b,                  silu(a) = a * sigmoid(a)
    da = dc * b * s * (1 + a * (1 - s)),  s = sigmoid(a)
    db = dc * silu(a)

All in fp32, rounded once to the input dtype. The backward recomputes silu(a) from the saved a and b
(nothing else is kept) and writes da and db over a and b, whose only use was this op: no new
buffers at the MLP's widest point. Without Triton, or off CUDA, the same math runs as fp32 torch ops.
"""

from __future__ import annotations

import torch

from sft.ops.triton_support import on_triton, tl, triton

# Elements per program: 16 per thread at 8 warps, i.e. two 16-byte loads of bf16 per operand.
BLOCK = 4096

if triton is not None:
    # n, the element count, is specialised by Triton only on its divisibility by 16 (which lets the masked
    # loads stay 16 bytes wide), so packed micro-batches of any length share one compiled kernel.
    @triton.jit
    def _sft_swiglu_forward(A, B, C, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(C + offs, (a * tl.sigmoid(a) * b).to(C.dtype.element_ty), mask=mask)

    @triton.jit
    def _sft_swiglu_backward(DC, A, B, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dc = tl.load(DC + offs, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(a)
        tl.store(A + offs, (dc * b * s * (1.0 + a * (1.0 - s))).to(A.dtype.element_ty), mask=mask)  # da
        tl.store(B + offs, (dc * a * s).to(B.dtype.element_ty), mask=mask)  # db


def triton_runs(a: torch.Tensor) -> bool:
    """Whether `silu_mul` on `a` runs the Triton kernels (CUDA, or the Triton interpreter)."""
    return on_triton(a) and a.numel() > 0


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.contiguous(), b.contiguous()
        if a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr():
            b = b.clone()  # the backward writes da and db over a and b: they must not share memory
        if triton_runs(a):
            c = torch.empty_like(a)
            _sft_swiglu_forward[_grid(a.numel())](a, b, c, a.numel(), BLOCK=BLOCK, num_warps=8)
        else:
            af = a.float()
            c = (af * torch.sigmoid(af) * b.float()).to(a.dtype)
        ctx.save_for_backward(a, b)
        return c

    @staticmethod
    def backward(ctx, dc: torch.Tensor):
        a, b = ctx.saved_tensors
        dc = dc.contiguous()
        if triton_runs(a):
            _sft_swiglu_backward[_grid(a.numel())](dc, a, b, a.numel(), BLOCK=BLOCK, num_warps=8)
            return a, b  # now holding da and db
        af, bf, dcf = a.float(), b.float(), dc.float()
        s = torch.sigmoid(af)
        return (dcf * bf * s * (1 + af * (1 - s))).to(a.dtype), (dcf * af * s).to(b.dtype)


def silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b elementwise, computed in fp32 and rounded once; a and b of one shape and dtype.

    The backward overwrites the saved a and b with their gradients: pass tensors that nothing else
    reads afterwards (an MLP's gate and up projections)."""
    return _SiluMul.apply(a, b)
