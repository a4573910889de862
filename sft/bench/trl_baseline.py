"""TRL's SFTTrainer as the optional `--baseline trl` of `python -m sft.bench`.

Same model files, same parquet and the same tokens per step as our run: bfd packing,
padding-free rows, assistant-only loss, gradient checkpointing as asked, bf16, and the
faster of `sdpa` and `flex_attention`. trl/datasets are optional extras, imported only here
and only when this baseline is asked for; the trainer never imports them.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import gc
import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sft.bench.assets import TRL_CHAT_TEMPLATE
from sft.bench.stats import peak_mem_gb, summarize
from sft.loop.flops import model_flops_per_token, peak_flops_per_gpu, useful_flops
from sft.parallel.distributed import DistContext

logger = logging.getLogger("sft")
# While TRL trains, every thread's Python stack goes to stderr this often: a TRL run can hang in its first
# micro-batch for minutes with a log that says nothing of where it is.
STACKS_EVERY_S = 120


def trl_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("trl", "datasets"))


def run_trl(
    cfg,
    ctx: DistContext,
    model_dir: Path,
    parquet: Path,
    warmup: int,
    tokens_per_step: float,
    impls: tuple[str, ...] = ("sdpa", "flex_attention"),
    liger: bool = False,
) -> list[dict]:
    """TRL's SFTTrainer on the same files: bfd packing, padding-free, assistant-only loss; each
    attention of `impls`; `liger` is TRL's own `use_liger_kernel=True`."""
    runs = []
    for impl in impls:
        try:
            runs.append(_trl_once(impl, cfg, ctx, model_dir, parquet, warmup, tokens_per_step, liger))
        except Exception as exc:  # one attention backend failing must not hide the other's result
            logger.error("bench: TRL with %s failed: %s: %s", impl, type(exc).__name__, exc)
            runs.append({"name": f"trl-{impl}", "error": f"{type(exc).__name__}: {exc}"})
        gc.collect()
    return runs


def _trl_once(impl, cfg, ctx, model_dir, parquet, warmup, tokens_per_step, liger=False) -> dict:
    import datasets
    import trl
    from transformers import AutoConfig, AutoTokenizer, TrainerCallback

    cuda = ctx.device.type == "cuda"
    hf_config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = TRL_CHAT_TEMPLATE
    max_len = cfg.data.max_length
    # Same tokens per micro-batch and per optimizer step as our run (TRL's batch unit is a packed row).
    mb_tokens = cfg.data.max_token_len_per_gpu or cfg.data.micro_batch_size_per_gpu * max_len
    per_device = max(1, mb_tokens // max_len)
    accum = max(1, round(tokens_per_step / (per_device * max_len * ctx.world_size)))
    fields = {f.name for f in dataclasses.fields(trl.SFTConfig)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    gc_on = cfg.model.enable_gradient_checkpointing
    kwargs: dict[str, Any] = dict(
        output_dir=str(model_dir.parent / f"trl-{impl}"),
        max_steps=cfg.trainer.total_training_steps,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accum,
        max_length=max_len,
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        assistant_only_loss=True,
        bf16=cuda,
        use_cpu=not cuda,
        learning_rate=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.betas[0],
        adam_beta2=cfg.optim.betas[1],
        max_grad_norm=cfg.optim.clip_grad,
        lr_scheduler_type="cosine",
        logging_steps=cfg.trainer.total_training_steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=cfg.trainer.seed,
        model_init_kwargs={"attn_implementation": impl},  # fp32 master weights (TRL's default), like ours
    )
    if liger:
        kwargs["use_liger_kernel"] = True
    if ctx.world_size > 1:  # FSDP2 through accelerate, with FSDP's own activation checkpointing
        kwargs.update(fsdp="full_shard auto_wrap", **{ckpt: False})
        kwargs["fsdp_config"] = {"version": 2, "reshard_after_forward": True, "activation_checkpointing": gc_on}
    else:
        kwargs.update({ckpt: gc_on, f"{ckpt}_kwargs": {"use_reentrant": False}})
    # Batches are kept as they come and counted after the step's clock is read, so counting
    # neither syncs the GPU mid-step nor lands inside a timed interval.
    pending: list[dict] = []
    steps: list[list[float]] = []  # per step: [tokens, trained tokens, model FLOPs, useful FLOPs]
    ends: list[float] = []  # clock at each step's end (GPU synchronized)
    resumes: list[float] = []  # clock when the bookkeeping after it was done (the next interval starts)

    def count(batch: dict) -> list[float]:
        ids, labels, mask = batch["input_ids"], batch["labels"], batch.get("attention_mask")
        rows, row = ids.shape[0], ids.shape[-1]
        if "position_ids" in batch:  # padding-free: positions restart at 0 at each sample
            pos = batch["position_ids"].flatten().tolist()
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            samples = [b - a for a, b in zip(starts, starts[1:])]
        else:
            samples = mask.sum(-1).tolist() if mask is not None else [row] * rows
        return [
            float(mask.sum()) if mask is not None else float(ids.numel()),
            float((labels[..., 1:] != -100).sum()),
            rows * row * model_flops_per_token(hf_config, row),
            useful_flops(hf_config, samples),
        ]

    class Counting(trl.SFTTrainer):
        def training_step(self, model, inputs, *args, **kw):
            pending.append(
                {k: inputs[k] for k in ("input_ids", "labels", "position_ids", "attention_mask") if k in inputs}
            )
            # Progress with shapes: a cold flex_attention compile (minutes, once per new row length
            # until it turns dynamic) then shows in the log instead of as silence.
            logger.info(
                "bench: TRL micro-batch %d of step %d, input %s, %.1f s after start",
                len(pending),
                len(steps) + 1,
                tuple(inputs["input_ids"].shape),
                time.perf_counter() - t_start,
            )
            return super().training_step(model, inputs, *args, **kw)

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not resumes:  # the first step starts here (after model load and data preparation)
                if cuda:
                    torch.cuda.synchronize(ctx.device)
                resumes.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize(ctx.device)
            ends.append(time.perf_counter())
            steps.append([sum(col) for col in zip(*map(count, pending))] if pending else [0.0] * 4)
            pending.clear()
            resumes.append(time.perf_counter())

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)
    t_start = time.perf_counter()
    trainer = Counting(
        model=str(model_dir),
        args=trl.SFTConfig(**kwargs),
        train_dataset=datasets.Dataset.from_parquet(str(parquet)),
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    faulthandler.dump_traceback_later(STACKS_EVERY_S, repeat=True)
    try:
        trainer.train()
    finally:
        faulthandler.cancel_dump_traceback_later()
    totals = torch.tensor(steps, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(totals, group=ctx.world_group)  # every rank counted its own micro-batches
    per_step = [
        {"step": i + 1, "t": t, "dt": t - resumes[i], "tokens": s[0], "trained": s[1], "slots": s[0],
         "model_flops": s[2], "useful_flops": s[3]}
        for i, (t, s) in enumerate(zip(ends, totals.tolist()))
    ]  # fmt: skip
    out = {"name": f"trl-{impl}{'+liger' if liger else ''}", "mode": "trl bfd packing, padding-free"}
    out.update(summarize(per_step, warmup, t_start, ctx.world_size, peak_flops_per_gpu(ctx.device)))
    out.update(peak_mem_gb=peak_mem_gb(ctx.device, ctx.world_group), per_device_batch=per_device, grad_accum=accum)
    del trainer
    return out
