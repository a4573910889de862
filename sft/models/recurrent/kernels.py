"""Which code computes the recurrences of a packed row: flash-linear-attention's varlen kernels or the reference.

On CUDA, in bf16/fp16, with flash-linear-attention installed (`pip install flash-linear-attention`, Triton
only), the gated delta rule runs `chunk_gated_delta_rule` and Mamba-2's SSD runs `chunk_simple_gla` (the SSD
is a linear attention with a scalar decay per head: q = C, k = B, v = dt x, g = dt A), both given the row's
`cu_seqlens`, so every sample starts from a zero state inside the kernel: no per-sample loop, no host read
of ours (fla >= 0.5 takes the host copy of the lengths, `cu_seqlens_cpu`, and reads none of its own).
Elsewhere (CPU, fp32, no fla, or an fla that cannot run its backward here) the exact per-sample reference of
sft/models/recurrent/reference.py, and the start-up log says why.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from collections.abc import Callable

import torch

from sft.models.recurrent.packed import PackedRow
from sft.models.recurrent.reference import gated_delta_reference, ssd_reference

logger = logging.getLogger("sft")

FLA_INSTALL = "pip install flash-linear-attention"
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def _fla() -> tuple[Callable, Callable] | None:
    """fla's two varlen entry points, or None when it is not installed (or does not import)."""
    if importlib.util.find_spec("fla") is None:
        return None
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as exc:  # a broken install is "not installed", said once
        logger.info("flash-linear-attention does not import: %s: %s", type(exc).__name__, exc)
        return None
    return chunk_gated_delta_rule, chunk_simple_gla


def _fla_blocker() -> str | None:
    """Why fla's gated backward cannot run on this machine (None: it can). fla refuses, at the first backward, the
    Triton versions whose gated `chunk_bwd_dqkwg` gives wrong results on Hopper unless its TileLang backend is
    usable (fla issue 640); sft says so before training instead of failing after the model loaded."""
    try:
        from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    except ImportError:  # an fla without these flags predates the check: nothing to refuse
        return None
    if not (IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1):
        return None
    try:
        from fla.ops.common.backends.tilelang import TileLangBackend

        if TileLangBackend.is_available() and TileLangBackend.is_enabled():
            return None
    except ImportError:
        pass
    import triton

    return (
        f"flash-linear-attention's gated backward is wrong on Hopper with Triton {triton.__version__} and fla "
        "refuses it (fla issue 640): install Triton >= 3.7.1 or `pip install tilelang` for the fast kernels"
    )


@functools.cache
def _takes_host_lengths(fn: Callable) -> bool:
    """fla >= 0.5 takes `cu_seqlens_cpu`, and then builds its chunk table without reading the device."""
    return "cu_seqlens_cpu" in inspect.signature(fn).parameters


def _lengths(fn: Callable, row: PackedRow) -> dict:
    host = row.cu_cpu is not None and _takes_host_lengths(fn)
    return {"cu_seqlens": row.cu, **({"cu_seqlens_cpu": row.cu_cpu} if host else {})}


@functools.cache
def _usable_fla() -> tuple[Callable, Callable] | None:
    return None if _fla() is None or _fla_blocker() is not None else _fla()


def use_kernels(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in _KERNEL_DTYPES and _usable_fla() is not None


def backend_for(device: torch.device) -> str:
    """What the start-up log says about the recurrent layers on `device`."""
    if device.type != "cuda":
        return "exact per-sample torch reference (CPU)"
    slow = "correct, but slow: one loop over the samples of a row in every layer"
    if _fla() is None:
        return f"exact per-sample torch reference: flash-linear-attention is not installed ({FLA_INSTALL}); {slow}"
    if (why := _fla_blocker()) is not None:
        return f"exact per-sample torch reference: {why}; {slow}"
    return "flash-linear-attention varlen kernels (chunk_gated_delta_rule, chunk_simple_gla)"


def gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, row: PackedRow
) -> torch.Tensor:
    """q, k `[T, Hk, dk]`, v `[T, H, dv]`, g (fp32 log decay), beta `[T, H]` -> `[T, H, dv]`, restarting per sample.

    q and k are L2-normalised inside, q scaled by dk^-1/2 (Qwen3.5 / Qwen3-Next's `use_qk_l2norm_in_kernel`).
    """
    if not use_kernels(v):
        return gated_delta_reference(q, k, v, g, beta, row.bounds())
    chunk_gated_delta_rule, _ = _fla()
    rep = v.shape[1] // k.shape[1]
    if rep > 1:  # value head i reads key head i // rep; the kernel wants one q/k head per value head
        q, k = q.repeat_interleave(rep, dim=1), k.repeat_interleave(rep, dim=1)
    # [T, H, d] -> [1, T, H, d]
    out, _ = chunk_gated_delta_rule(
        q[None],
        k[None],
        v[None],
        g[None],
        beta.to(v.dtype)[None],
        use_qk_l2norm_in_kernel=True,
        **_lengths(chunk_gated_delta_rule, row),
    )
    return out[0]


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    d: torch.Tensor,
    row: PackedRow,
    chunk: int,
) -> torch.Tensor:
    """Mamba-2's scan: x `[T, H, P]`, dt `[T, H]` (processed), A, D `[H]`, B, C `[T, G, N]` -> y `[T, H, P]` (fp32)."""
    if not use_kernels(x):
        return ssd_reference(x, dt, a, b, c, d, row.bounds(), chunk)
    _, chunk_simple_gla = _fla()
    rep = x.shape[1] // b.shape[1]
    b, c = b.repeat_interleave(rep, dim=1), c.repeat_interleave(rep, dim=1)  # group i // rep -> head i
    dt32 = dt.float()
    out, _ = chunk_simple_gla(
        q=c[None].to(x.dtype),
        k=b[None].to(x.dtype),
        v=(x * dt32[..., None]).to(x.dtype)[None],
        g=(dt32 * a.float())[None],
        scale=1.0,
        **_lengths(chunk_simple_gla, row),
    )
    return out[0].float() + d.float()[:, None] * x.float()
