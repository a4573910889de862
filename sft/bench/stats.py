"""What a benchmark step did and how fast: the accounting behind `python -m sft.bench`.

`step_layout` recomputes a step's sample lengths and micro-batch rows from the trainer's own
sampler (for both MFUs), `summarize` turns per-step records into medians of rates and MFUs,
`peak_mem_gb` is the largest peak over the ranks. Shared by our runs and the TRL baseline.
"""

from __future__ import annotations

import copy
import statistics
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from sft.loop.flops import mfu

if TYPE_CHECKING:
    from sft.trainer import FSDPSFTTrainer


def step_layout(trainer: FSDPSFTTrainer, step: int) -> tuple[list[int], list[tuple[int, int]]]:
    """(sample lengths, [(rows, row length)] of every micro-batch on every dp rank) of global step `step`.

    The same computation as the trainer's: the sampler's epoch order and its micro-batch plan,
    asked for each dp rank in turn (a shallow copy with another dp_rank), without touching it.
    """
    sampler, lengths, sp = trainer.sampler, trainer.train_ds.lengths, trainer.ctx.sp_size
    epoch, k = divmod(step - 1, trainer.plan.steps_per_epoch)
    b = sampler.global_batch
    batch = sampler.epoch_order(epoch)[k * b : (k + 1) * b].tolist()
    rows: list[tuple[int, int]] = []
    for r in range(sampler.dp_size):
        view = copy.copy(sampler)
        view.dp_rank = r
        for mb in view.micro_batches(batch):
            ls = [int(lengths[i]) for i in mb]
            if trainer.cfg.use_remove_padding:
                rows.append((1, -(-max(sum(ls), 1) // sp) * sp))  # one packed row, padded to a multiple of sp
            elif ls:
                rows.append((len(ls), max(ls)))  # padded to the longest sample of the micro-batch
    return [int(lengths[i]) for i in batch], rows


def median(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def peak_mem_gb(ctx_device: torch.device, group=None) -> float | None:
    if ctx_device.type != "cuda":
        return None
    t = torch.tensor([torch.cuda.max_memory_allocated(ctx_device)], dtype=torch.float64, device=ctx_device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t) / 1024**3


def summarize(per_step: list[dict], warmup: int, t_start: float, world: int, peak: float | None) -> dict:
    """Medians over the timed steps (those after `warmup`) of per-step rates and MFUs."""
    timed = [s for s in per_step if s["step"] > warmup] or per_step[-1:]
    rate = lambda key: [s[key] / s["dt"] / world for s in timed]  # noqa: E731
    tokens, slots = sum(s["tokens"] for s in timed), sum(s["slots"] for s in timed)
    return {
        "tokens_per_s_per_gpu": median(rate("tokens")),
        "trained_tokens_per_s_per_gpu": median(rate("trained")),
        "model_mfu": median([mfu(s["model_flops"], s["dt"], peak, world) for s in timed]),
        "useful_mfu": median([mfu(s["useful_flops"], s["dt"], peak, world) for s in timed]),
        "padding_frac": 1.0 - tokens / slots if slots else None,
        "time_to_first_step_s": per_step[0]["t"] - t_start,
        "step_time_s_median": median([s["dt"] for s in timed]),
        "tokens_per_step": tokens / len(timed),
        "timed_steps": len(timed),
    }
