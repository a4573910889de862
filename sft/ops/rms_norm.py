"""RMSNorm (weight x x / rms(x)) with PyTorch's fused forward and a one-pass Triton backward on CUDA.

Why a backward of our own: a model calls RMSNorm twice per layer, and PyTorch's fused backward is two
kernels (dx, then a column reduction for dw), Liger's slower still, both about three times the time
that reading x and dy and writing dx once needs at memory bandwidth (docs/PERFORMANCE.md).
`_sft_rms_norm_backward` does dx and the dw partial sums in that one pass: each program takes
32 rows, a few at a time, and keeps its dw partial in registers; the partials (one fp32 row per
program) are summed afterwards. Without Triton, or off CUDA, the same math runs
as fp32 torch ops:

    y = w * x * r,  r = 1 / sqrt(mean(x^2) + eps)
    dx = r * (w * dy) - x * r^3 * mean(w * dy * x),  dw = sum over rows of dy * x * r   (all in fp32)
"""

from __future__ import annotations

import torch

from sft.ops.triton_support import on_triton, tl, triton

# Widest row the one-pass kernel keeps in registers (fp32 tiles of x and dy); wider rows use the torch ops.
MAX_TRITON_COLS = 16384
_FUSED_FORWARD = hasattr(torch.ops.aten, "_fused_rms_norm")  # PyTorch >= 2.8; it also returns the fp32 1/rms

if triton is not None:
    # n_rows changes with every packed micro-batch: not specialised on, so the kernel compiles once per width.
    @triton.jit(do_not_specialize=["n_rows"])
    def _sft_rms_norm_backward(
        DY, X, W, RSTD, DX, DW_PART, n_rows, n_cols,
        ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < n_cols
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for i in range(0, ROWS, BLOCK_M):  # this program's ROWS rows, BLOCK_M at a time
            rows = pid * ROWS + i + tl.arange(0, BLOCK_M)
            rmask = rows < n_rows
            mask = rmask[:, None] & cmask[None, :]
            offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            r = tl.load(RSTD + rows, mask=rmask, other=0.0)
            wdy = dy * w[None, :]
            c = tl.sum(wdy * x, axis=1) / n_cols
            dx = r[:, None] * wdy - x * (r * r * r * c)[:, None]
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            dw += tl.sum(dy * x * r[:, None], axis=0)
        tl.store(DW_PART + pid.to(tl.int64) * n_cols + cols, dw, mask=cmask)


# Rows per program: enough to keep the dw partials small (1/32 of dx's size in fp32), few enough that a
# micro-batch gives many programs per SM (41k rows: 1,282 programs on 132 SMs).
ROWS_PER_PROGRAM = 32


def triton_backward_runs(x: torch.Tensor) -> bool:
    """Whether `rms_norm`'s backward of `x` runs the Triton kernel (CUDA, or the Triton interpreter)."""
    return on_triton(x) and x.shape[-1] <= MAX_TRITON_COLS


def _triton_backward(
    dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    n_cols = x.shape[-1]
    x2, dy2 = x.reshape(-1, n_cols), dy.reshape(-1, n_cols).contiguous()
    n_rows = x2.shape[0]
    block_n = triton.next_power_of_2(n_cols)
    block_m = max(1, min(ROWS_PER_PROGRAM, 8192 // block_n))  # about 8k elements per tile
    programs = triton.cdiv(n_rows, ROWS_PER_PROGRAM)
    dx = torch.empty_like(x2)
    dw_part = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device)
    _sft_rms_norm_backward[(programs,)](
        dy2, x2, w, rstd.reshape(-1), dx, dw_part, n_rows, n_cols,
        ROWS=ROWS_PER_PROGRAM, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8 if block_m * block_n >= 4096 else 4,
    )  # fmt: skip
    return dx.view_as(x), dw_part.sum(0).to(w.dtype)


def _torch_backward(
    dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same math in fp32 torch ops (CPU, very wide rows, or no Triton)."""
    xf, dyf, wf = x.float(), dy.float(), w.float()
    wdy = dyf * wf
    c = (wdy * xf).mean(-1, keepdim=True)
    dx = rstd * wdy - xf * (rstd**3 * c)
    dw = (dyf * xf * rstd).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(w.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        x = x.contiguous()
        if _FUSED_FORWARD:
            y, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], w, eps)
        else:
            rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
            y = (x.float() * rstd * w.float()).to(x.dtype)
        ctx.save_for_backward(x, w, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, rstd = ctx.saved_tensors
        if triton_backward_runs(x):
            dx, dw = _triton_backward(dy, x, w, rstd)
        else:
            dx, dw = _torch_backward(dy, x, w, rstd)
        return dx, (dw if ctx.needs_input_grad[1] else None), None  # frozen norms (LoRA): no weight gradient


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dimension; x and weight of one dtype."""
    return _RMSNorm.apply(x, weight, eps)
