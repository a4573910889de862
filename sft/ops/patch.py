"""What swaps fused kernels into a decoder: Liger's rotary embedding, sft's RMSNorm and SwiGLU.

`model.use_liger=true` swaps the decoder's rotary embedding for Liger's Triton kernel, its RMSNorm
for sft/ops/rms_norm.py and its SwiGLU for sft/ops/swiglu.py, both faster than Liger's (CUDA only, the model
types Liger supports). The family table says where Liger's own kernels stay (sft/models/families.py:
Gemma's offset norms, `Family.rms_norm`; Phi-3's and Gemma's MLPs, `Family.mlp`) and that MoE
families keep their experts.
(The fused
loss is sft's own, sft/ops/fused_ce.py: Liger's reads a count back from the GPU on every call.)
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
from collections.abc import Callable

import torch
from torch import nn

from sft.models.families import fused_rms_norm, liger_covers, mlp_kernel
from sft.ops.rms_norm import rms_norm
from sft.ops.swiglu import silu_mul

logger = logging.getLogger("sft")

LIGER_MISSING = "model.use_liger=true needs the liger-kernel package: pip install liger-kernel (CUDA machines only)"


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def check_liger(device_type: str) -> None:
    """Before anything loads: Liger's kernels are Triton code for CUDA GPUs."""
    if device_type != "cuda":
        raise ValueError(
            f"model.use_liger=true: Liger's kernels run on CUDA GPUs only (this run uses {device_type}); "
            "set model.use_liger=false"
        )
    if not liger_installed():
        raise ValueError(LIGER_MISSING)


def liger_wanted(setting: bool | str, device_type: str, model_type: str, compiled: bool = False) -> bool:
    """`model.use_liger`: true always (checked before loading), false never, auto when it can run.

    Never together with `model.compile=true`: torch.compile cannot trace Liger's autograd functions
    (torch 2.11, liger-kernel 0.8.5: an assertion inside LigerRMSNormFunction), and compiling fuses
    the norms and activations itself; `true` with compile is refused before loading."""
    if setting != "auto":
        return bool(setting)
    if device_type != "cuda" or not liger_installed():
        return False
    if compiled:
        logger.info("model.use_liger=auto: not used with model.compile=true (compile fuses the norms and SwiGLU)")
        return False
    if not liger_covers(model_type):  # sft/models/families.py: Liger's layers do not fit this family
        logger.info("model.use_liger=auto: not used for model type %s (README 'Supported model families')", model_type)
        return False
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        logger.info("model.use_liger=auto: Liger has no kernels for model type %s; using the model's own", model_type)
        return False
    return True


# Liger >= 0.8.5 dispatches each op to one of several implementations and prefers its CuTe DSL ones on
# Hopper when the CUTLASS DSL is importable (flash-attn-4 brings it). Its CuTe DSL RoPE compiles per input
# shape, and packed micro-batches change shape every time, so each call stalls the host on a compile and
# the step runs much slower. So the ops sft uses run Liger's Triton kernels, the ones we measured
# (docs/PERFORMANCE.md); a user's own LIGER_KERNEL_IMPL* setting is kept.
LIGER_TRITON_OPS = ("rope", "rms_norm", "swiglu")


def pin_liger_triton() -> None:
    """Ask Liger's dispatcher for its Triton kernels of `LIGER_TRITON_OPS`, unless the user chose."""
    if os.environ.get("LIGER_KERNEL_IMPL") or os.environ.get("LIGER_KERNEL_BACKEND"):
        return
    for op in LIGER_TRITON_OPS:
        os.environ.setdefault(f"LIGER_KERNEL_IMPL_{op.upper()}", "nvidia-triton")


def apply_liger(lm: nn.Module, required: bool = True) -> None:
    """Patch RMSNorm, SwiGLU and RoPE of the (meta-device) model in place, before sharding.

    `required` (`model.use_liger=true`) refuses a model whose MLP the family row promised as SiLU-gated
    but is not; with `auto` that MLP stays the model's own, said in the log.

    The patched modules keep their parameter names, so checkpoints and the HF export are
    unchanged. Liger's own loss patch is not used: the loss runs in `CausalLMWithLoss`.
    Liger also replaces the RoPE function and the norm/MLP classes of the transformers module
    (process-wide): later models of that type built in the same process get its kernels too.
    """
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = lm.config.model_type
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type) if liger_covers(model_type) else None
    if apply is None:
        supported = ", ".join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))
        raise ValueError(
            f"model.use_liger=true: Liger has no kernels for model type {model_type!r} (supported: {supported}); "
            "set model.use_liger=false"
        )
    pin_liger_triton()
    own_norm, mlp = fused_rms_norm(model_type), mlp_kernel(model_type)
    wanted = {"rope": True, "rms_norm": not own_norm, "swiglu": mlp == "liger", "cross_entropy": False}
    wanted["fused_linear_cross_entropy"] = False
    accepted = inspect.signature(apply).parameters
    apply(model=lm, **{k: v for k, v in wanted.items() if k in accepted})
    logger.info(
        "Liger kernels applied to %s: %s", model_type, sorted(k for k, on in wanted.items() if on and k in accepted)
    )
    if own_norm:
        n = use_fused_rms_norm(lm)
        logger.info(
            "RMSNorm: PyTorch's fused forward and sft's one-pass backward in %d modules (sft/ops/rms_norm.py)", n
        )
    if mlp == "sft":
        n = use_fused_swiglu(lm)
        if n == 0 and required:  # the family row promised a gated MLP: a transformers change must not go unnoticed
            raise ValueError(
                f"model.use_liger=true: no down(silu(gate(x)) * up(x)) MLP found in {model_type} for sft/ops/swiglu.py; "
                "set model.use_liger=false (or auto) and report it"
            )
        if n == 0:
            logger.info("SwiGLU: no SiLU-gated MLP in this %s model; its MLPs run the model's own code", model_type)
        else:
            logger.info("SwiGLU: sft's flat kernels in %d MLPs (sft/ops/swiglu.py)", n)


# Liger kernels only where they win. For RMSNorm, PyTorch's fused rms_norm is about twice as fast as Liger's
# forward + backward in bf16 at the shapes we train (benchmarks/norm_bench.py, docs/PERFORMANCE.md), and its
# two-kernel backward is still slower than needed: sft/ops/rms_norm.py keeps PyTorch's forward and does the
# backward in one pass. The fused forward
# rounds once, after the weight (Liger's "llama" casting and transformers' Llama-style norm round before
# it): at most one bf16 step apart, and closer to fp32.
_SWAPPED_CLASSES: dict[tuple[type, str], type] = {}


def _swap_forward(m: nn.Module, forward: Callable) -> None:
    """Make `m` an instance of a subclass of its own class whose forward is `forward`: the same
    parameters, names and isinstance checks (checkpoints and the HF export see no difference)."""
    cls = type(m)
    key = (cls, forward.__name__)
    if key not in _SWAPPED_CLASSES:
        _SWAPPED_CLASSES[key] = type(cls.__name__, (cls,), {"forward": forward})
    m.__class__ = _SWAPPED_CLASSES[key]


def _swap_all(lm: nn.Module, is_target: Callable[[nn.Module], bool], forward: Callable) -> int:
    """`_swap_forward` on every module of `lm` that `is_target` accepts; returns how many."""
    targets = [m for m in lm.modules() if is_target(m)]
    for m in targets:
        _swap_forward(m, forward)
    return len(targets)


def _fused_rms_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != self.weight.dtype:  # mixed dtypes: the model's own math and type promotion
        return super(type(self), self).forward(x)
    return rms_norm(x, self.weight, self.variance_epsilon)


def _is_model_rms_norm(m: nn.Module) -> bool:
    """transformers' own Llama-style RMSNorm module (not one Liger or sft already replaced)."""
    cls = type(m)
    return (
        cls.__name__.endswith("RMSNorm")
        and cls.__module__.startswith("transformers.")  # neither Liger's nor the subclasses made below
        and hasattr(m, "variance_epsilon")
        and isinstance(getattr(m, "weight", None), nn.Parameter)
        and m.weight.dim() == 1
    )


def use_fused_rms_norm(lm: nn.Module) -> int:
    """Run every Llama-style RMSNorm of `lm` on sft/ops/rms_norm.py; returns how many.

    Each module becomes a subclass of its own class (same parameters, names and isinstance checks)
    whose forward calls `rms_norm`. Only for families whose `Family.rms_norm` is "weight"."""
    return _swap_all(lm, _is_model_rms_norm, _fused_rms_norm_forward)


# SwiGLU off Liger: Liger's kernels run one program per row with next_power_of_2(width) lanes (45 % idle
# at width 8,960); sft/ops/swiglu.py walks the tensor flat. transformers' gated MLPs compute
# down(act(gate(x)) * up(x)); with act = SiLU the product is sft's silu_mul, in fp32 and rounded once.
_SILU = ("SiLU", "SiLUActivation")


def _fused_swiglu_forward(self, x: torch.Tensor) -> torch.Tensor:
    a, b = self.gate_proj(x), self.up_proj(x)
    if a.dtype != b.dtype:  # mixed dtypes: the model's own math and type promotion
        return self.down_proj(self.act_fn(a) * b)
    return self.down_proj(silu_mul(a, b))


def _is_model_swiglu_mlp(m: nn.Module) -> bool:
    """transformers' own gated MLP with a SiLU activation (not one Liger or sft already replaced)."""
    cls = type(m)
    return (
        cls.__name__.endswith("MLP")
        and cls.__module__.startswith("transformers.")
        and all(isinstance(getattr(m, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))
        and type(getattr(m, "act_fn", None)).__name__ in _SILU
    )


def use_fused_swiglu(lm: nn.Module) -> int:
    """Run every SiLU-gated MLP of `lm` on sft/ops/swiglu.py; returns how many. For `Family.mlp` "sft" rows."""
    return _swap_all(lm, _is_model_swiglu_mlp, _fused_swiglu_forward)
