"""Whether sft's Triton kernels can run on a tensor, shared by sft/ops/rms_norm.py, sft/ops/swiglu.py, sft/ops/ce_softmax.py.

`triton` and `tl` are None on machines without Triton (CPU installs): the kernel modules then define no
kernels and use their torch-op paths. The kernels run on CUDA tensors, or on CPU tensors under Triton's
interpreter (TRITON_INTERPRET=1, read once: Triton itself decides at import, which is how the tests run
them on CPU).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines: the kernel modules' torch ops
    triton = tl = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def on_triton(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can take `t`: Triton is importable and `t` is on CUDA (or interpreted)."""
    return triton is not None and (t.is_cuda or INTERPRETED)
