"""Optimizer and learning-rate schedule.

`build_optimizer` makes AdamW with two parameter groups (decay on matrices, none on norms
and biases); `lr_multiplier` is the schedule as a pure function of the step, and
`build_scheduler` wraps it in a `LambdaLR` whose state round-trips through checkpoints.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from sft.config.errors import either
from sft.config.schema import SCHEDULERS

logger = logging.getLogger("sft")


def build_optimizer(
    model: torch.nn.Module,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    device_type: str,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of `model`, in two groups.

    Weight decay applies to parameters with `ndim >= 2` (linear and embedding weights);
    vectors (norm weights, biases) get none, since shrinking them towards zero only hurts.
    `p.ndim` is the global ndim for FSDP2 DTensors, so sharding does not change the split.
    """
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError(
            "build_optimizer: the model has no parameter with requires_grad=True; "
            "nothing to train (check model.lora_rank / frozen modules)."
        )
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # An empty group is legal but pointless; dropping it keeps the state dict minimal.
    groups = [g for g in groups if g["params"]]
    logger.debug(
        "optimizer groups: %d params with weight_decay=%g, %d params without",
        len(decay),
        weight_decay,
        len(no_decay),
    )
    if any(p.dtype == torch.bfloat16 for g in groups for p in g["params"]):
        # A short run with bf16 master weights ends at a clearly higher loss than with fp32 (docs/PERFORMANCE.md).
        logger.warning(
            "model.fsdp_config.model_dtype=bf16: AdamW updates smaller than ~1/256 of a weight are lost in bf16 "
            "master weights, so training moves much less; model_dtype=fp32 (the default) keeps them"
        )
    # Fused AdamW: the fastest on CUDA, and it skips itself on a device flag (`found_inf`), so the trainer can queue
    # the update before the step's one read-back (sft/trainer.py::train_step). CPU runs it too, so the
    # tests take that same path.
    backend = {"fused": True} if device_type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **backend)


def resolve_warmup_steps(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    """Warmup length in optimizer steps.

    An explicit `warmup_steps >= 0` wins (verl's `optim.lr_warmup_steps`, where -1 means
    "use the ratio"); otherwise `int(warmup_ratio * total_steps)`.
    """
    if warmup_steps >= 0:
        return int(warmup_steps)
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(
            f"optim.lr_warmup_steps_ratio={warmup_ratio} must lie in [0, 1] "
            "(or set optim.lr_warmup_steps to a step count)."
        )
    return int(warmup_ratio * total_steps)


def _check_kind(kind: str) -> None:
    if kind not in SCHEDULERS:
        raise ValueError(f"optim.lr_scheduler={kind!r} is not supported; choose {either(SCHEDULERS)}.")


def lr_multiplier(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    kind: str,
    min_lr_ratio: float = 0.0,
    num_cycles: float = 0.5,
    wsd_decay_ratio: float = 0.1,
) -> float:
    """Factor applied to the base lr at the 0-based optimizer step `step`.

    Warmup is `(step + 1) / warmup_steps`, so the very first step already trains. After
    warmup, `progress = (step - warmup) / max(1, total - warmup)` clamped to [0, 1]:
    constant -> 1; cosine -> `m + (1 - m) * 0.5 * (1 + cos(2 pi num_cycles progress))`;
    wsd -> 1 until the last `D = ceil(wsd_decay_ratio * (total - warmup))` steps, then
    `1 - (1 - m) * (i + 1) / D` for the i-th of them, reaching m at step total - 1.
    """
    _check_kind(kind)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_span = total_steps - warmup_steps
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, decay_span)))
        cosine = 0.5 * (1.0 + math.cos(math.pi * 2.0 * num_cycles * progress))
        return min_lr_ratio + (1.0 - min_lr_ratio) * cosine
    # wsd: counted in whole steps rather than progress so the decay length is exact.
    # Rounding first keeps float noise (0.1 * 30 = 3.0000000000000004) from adding a step.
    decay_steps = math.ceil(round(wsd_decay_ratio * max(0, decay_span), 9))
    decay_start = total_steps - decay_steps
    if decay_steps <= 0 or step < decay_start:
        return 1.0
    # Steps past the end (an over-run of total_steps) stay at the floor.
    i = min(step - decay_start, decay_steps - 1)
    return 1.0 - (1.0 - min_lr_ratio) * (i + 1) / decay_steps


class _LambdaLR(LambdaLR):
    """LambdaLR whose `load_state_dict` also puts the resumed lr into the param groups.

    Plain LambdaLR restores only its counters, leaving the groups at the lr of step 0
    until the next `step()` unless the optimizer state is loaded too; resuming the
    scheduler alone must not train one step at the wrong lr.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        lrs = [base * fn(self.last_epoch) for base, fn in zip(self.base_lrs, self.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_steps: int,
    kind: str,
    min_lr_ratio: float,
    num_cycles: float,
    wsd_decay_ratio: float,
) -> LambdaLR:
    """`LambdaLR` driven by `lr_multiplier`; call `scheduler.step()` after each optimizer step.

    LambdaLR evaluates the factor for index 0 on construction, so `get_last_lr()` read
    before the k-th `optimizer.step()` is the lr that step uses. Its state dict holds
    `last_epoch` and `base_lrs` (the closure is not saved, and need not be), which is all a
    resumed run needs as long as it rebuilds the scheduler with the same arguments.
    """
    _check_kind(kind)
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"optim.min_lr_ratio={min_lr_ratio} must lie in [0, 1].")
    if not 0.0 <= wsd_decay_ratio <= 1.0:
        raise ValueError(f"optim.wsd_decay_ratio={wsd_decay_ratio} must lie in [0, 1].")

    def factor(step: int) -> float:
        return lr_multiplier(
            step,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            kind=kind,
            min_lr_ratio=min_lr_ratio,
            num_cycles=num_cycles,
            wsd_decay_ratio=wsd_decay_ratio,
        )

    return _LambdaLR(optimizer, factor)
