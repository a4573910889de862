"""Which CUDA kernel computes packed (varlen) causal attention: the key `model.attn_kernel`.

One declarative row per kernel (what must import, how it is called, which GPUs it runs on, whether it computes
attention-logit soft-capping, whether torch.compile can trace it). `choose_attn_kernel` turns the key
into one kernel before anything loads, and refuses in one line a named kernel that is not installed,
cannot run on this GPU or cannot be compiled; `run_kernel` calls it. Attention sinks (gpt-oss), and
soft-capping where the kernel lacks it, run on the exact per-segment path of sft/models/attention/reference.py.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger("sft")


def _fa4(q, k, v, cu_q, cu_k, max_q, max_k, scale, window, softcap):
    from flash_attn.cute import flash_attn_varlen_func

    # FA4 spells plain causal as no window at all; (-1, 0) would turn into a local window of -1. No bound on
    # either side is None there.
    causal = window[1] == 0
    left = None if window[0] < 0 else window[0]
    right = None if left is None or not causal else 0
    out = flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=max_q,
        max_seqlen_k=max_k,
        softmax_scale=scale,
        causal=causal,
        window_size=(left, right),
        softcap=softcap or 0.0,
    )
    return out[0] if isinstance(out, tuple) else out  # (out, lse)


def _flash_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale, window, softcap):
    from flash_attn import flash_attn_varlen_func

    causal = window[1] == 0  # (left, -1): no bound to the right, not causal
    return flash_attn_varlen_func(
        q,
        k,
        v,
        cu_q,
        cu_k,
        max_q,
        max_k,
        softmax_scale=scale,
        causal=causal,
        window_size=window,
        softcap=softcap or 0.0,
    )


@functools.cache
def _varlen_takes_gqa_flag() -> bool:
    from torch.nn.attention.varlen import varlen_attn

    return "enable_gqa" in inspect.signature(varlen_attn).parameters


def _torch(q, k, v, cu_q, cu_k, max_q, max_k, scale, window, softcap):
    from torch.nn.attention.varlen import varlen_attn

    # torch 2.11 takes fewer KV heads without a flag; later versions ask for `enable_gqa=True`.
    gqa = q.shape[1] != k.shape[1] and _varlen_takes_gqa_flag()
    # window_size=(-1, 0) is how this kernel spells "causal"; (W-1, 0) is a causal window of W; a right side of -1
    # is unbounded (not causal).
    return varlen_attn(
        q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window, **({"enable_gqa": True} if gqa else {})
    )


@dataclass(frozen=True)
class Kernel:
    title: str
    function: str  # "module:name" of its Python entry point; the kernel counts as installed when it imports
    install: str  # how a user gets it
    call: Callable[..., torch.Tensor]  # (q, k, v, cu_q, cu_k, max_q, max_k, scale, window, softcap) -> out
    majors: tuple[int, ...] | None = None  # CUDA compute-capability majors it runs on (None: any the build has)
    softcap: bool = False  # computes attention-logit soft-capping itself
    # torch.compile can trace a call to it (a torch custom op); FA4's CuTe DSL call is plain Python that
    # compiles its own kernels, which `model.compile=true` would try to trace.
    traceable: bool = True
    # Environment defaults set when the kernel is chosen (a user's own value is kept).
    env: tuple[tuple[str, str], ...] = ()


KERNELS: dict[str, Kernel] = {
    "fa4": Kernel(
        title="FlashAttention-4 (flash-attn-4, CuTe DSL)",
        function="flash_attn.cute:flash_attn_varlen_func",
        install="pip install flash-attn-4",
        call=_fa4,
        majors=(9, 10),
        softcap=True,
        traceable=False,
        # FA4 compiles its kernels on first use (seconds per head shape); its disk cache lets a
        # relaunch after preemption, and every rank after the first, load them instead.
        env=(("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1"),),
    ),
    "flash_attn": Kernel(
        title="FlashAttention-2 (flash-attn)",
        function="flash_attn:flash_attn_varlen_func",
        install="pip install flash-attn",
        call=_flash_attn,
        softcap=True,
    ),
    "torch": Kernel(
        title="PyTorch's varlen_attn (FlashAttention-2 built into torch)",
        function="torch.nn.attention.varlen:varlen_attn",
        install="torch >= 2.10",
        call=_torch,
    ),
}
# `auto` takes the first that is installed and runs on this GPU: fastest first (docs/PERFORMANCE.md).
AUTO_ORDER = ("fa4", "flash_attn", "torch")
CHOICES = ("auto", *KERNELS)


@functools.cache
def installed(name: str) -> bool:
    """Whether the kernel's entry point imports. An import, not a package lookup: flash-attn 2 and FA4
    share the `flash_attn` namespace, and FA4 needs the CUTLASS DSL (`cutlass.cute`) besides its own files."""
    module, function = KERNELS[name].function.split(":")
    try:
        if importlib.util.find_spec(module) is None:
            return False
    except ModuleNotFoundError:
        return False
    _set_env(name)  # before the import: FA4 reads its cache switch when its module loads
    try:
        getattr(importlib.import_module(module), function)
    except Exception as exc:  # a broken install (a missing CUDA library, say) is "not installed", said once
        logger.info("attention kernel %s does not import: %s: %s", name, type(exc).__name__, exc)
        return False
    return True


def why_not(name: str, major: int) -> str | None:
    """Why kernel `name` cannot run on a GPU of compute capability `major`.x; None when it can."""
    kernel = KERNELS[name]
    if not installed(name):
        return f"{kernel.title} is not installed ({kernel.install})"
    if kernel.majors is not None and major not in kernel.majors:
        return f"{kernel.title} runs on compute capability {'/'.join(f'{m}.x' for m in kernel.majors)}, this GPU is {major}.x"
    return None


def choose_attn_kernel(setting: str, device: torch.device, compiled: bool = False) -> str | None:
    """The kernel for `model.attn_kernel=setting` on `device`; None off CUDA (the exact path runs there).
    With `compiled` (model.compile=true) only kernels torch.compile can trace."""
    if setting not in CHOICES:
        raise ValueError(f"model.attn_kernel={setting!r}: choose one of {', '.join(CHOICES)}")
    if device.type != "cuda":
        if setting != "auto":
            raise ValueError(
                f"model.attn_kernel={setting}: attention kernels run on CUDA GPUs; this run uses {device.type}"
            )
        return None
    major = torch.cuda.get_device_capability(device)[0]
    if setting != "auto":
        reason = why_not(setting, major)
        if reason is None and compiled and not KERNELS[setting].traceable:
            reason = f"torch.compile cannot trace {KERNELS[setting].title} (model.compile=true)"
        if reason is not None:
            raise ValueError(f"model.attn_kernel={setting}: {reason}; or set model.attn_kernel=auto")
        return _chosen(setting)
    for name in AUTO_ORDER:
        if (KERNELS[name].traceable or not compiled) and why_not(name, major) is None:
            return _chosen(name)
    raise ValueError(
        f"use_remove_padding=true on CUDA needs a varlen attention kernel: {KERNELS['torch'].install}, "
        f"{KERNELS['flash_attn'].install} or {KERNELS['fa4'].install}"
    )


def _set_env(name: str) -> None:
    for key, value in KERNELS[name].env:
        os.environ.setdefault(key, value)


def _chosen(name: str) -> str:
    _set_env(name)
    return name


def run_kernel(name, q, k, v, cu_q, cu_k, max_q, max_k, scale, window, softcap) -> torch.Tensor:
    """q `[T, h, d]`, k/v `[T, h_kv, d]` (bf16/fp16, CUDA), int32 `cu_*`; window as flash-attn's (left, right):
    right 0 is causal, -1 unbounded (queries aligned to the end of their keys, as flash-attn aligns them)."""
    return KERNELS[name].call(q, k, v, cu_q, cu_k, max_q, max_k, scale, window, softcap)
