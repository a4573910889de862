"""Throughput benchmark of the real trainer: `python -m sft.bench --shape qwen2.5-1.5b [key=value ...]`.

Several GPUs: `torchrun --nproc_per_node=N -m sft.bench ...`. Local rank 0 of each node writes
a random-weight model of the shape and a synthetic multi-turn parquet (sft.bench_data), then
`FSDPSFTTrainer` trains `--warmup` + `--steps` optimizer steps; further `key=value` arguments
are trainer overrides. Per-step metrics come from wrapping `trainer.metrics.log`.

Measures (medians over the timed steps; DESIGN.md "Measuring speed honestly"):
- a step's time is the wall time between two logged steps: data loading included, the
  end-of-run checkpoint excluded; the trainer synchronizes the GPU before it logs;
- tokens_per_s_per_gpu counts all real tokens, trained_tokens_per_s_per_gpu the targets;
- model_mfu: (6N + 12LHd*s) FLOPs for every slot of every micro-batch row, s = row length
  (padded width, or packed row length); useful_mfu: 6N*T + 6LHd*sum(s_i^2) over the real
  sample lengths. Each step's samples and micro-batches are recomputed from
  `trainer.sampler` and `trainer.train_ds.lengths` (checked against the logged token count:
  `sample_lengths_match`); null without a known peak (CPU);
- time_to_first_step_s: from building the trainer (data, model, sharding) to the end of step 1.
Prints a table and, last, one JSON line.

`--baseline padded` trains again with `use_remove_padding=false` and no token budget (same data,
same global batch); `--baseline trl` runs TRL's SFTTrainer (optional `trl` + `datasets`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import importlib.util
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sft.bench_data import SHAPE_NAMES, TRL_CHAT_TEMPLATE, asset_paths, ensure_assets
from sft.cli import compose
from sft.distributed import DistContext, WorldInfo, init_distributed, resolve_device_type, setup_logging, teardown
from sft.fsdp_sft_trainer import FSDPSFTTrainer
from sft.metrics import mfu, model_flops_per_token, peak_flops_per_gpu, useful_flops
from sft.validate import ConfigError, validate_config

logger = logging.getLogger("sft")

TRL_MISSING = "sft.bench: --baseline trl needs the optional packages trl and datasets: pip install trl datasets"
# Keys the benchmark owns (they fix which data, which model and how many steps).
OWNED = ("data.train_files", "model.partial_pretrain", "trainer.total_training_steps", "trainer.total_epochs",
         "trainer.resume_mode", "trainer.default_local_dir")  # fmt: skip
# Per shape kind: samples per data-parallel rank per step (the global batch scales with dp, so the
# work per GPU stays the same), micro-batch size (padded mode), data.max_length, checkpointing,
# and the token budget per GPU of a packed micro-batch (data.max_token_len_per_gpu).
SHAPE_DEFAULTS = {
    # CPU-sized: the tiny model's CPU attention is a per-sample loop, so rows stay short.
    "tiny": {"batch_per_dp": 8, "micro_batch": 8, "max_length": 1024, "checkpointing": "false", "budget": 2048},
    "large": {"batch_per_dp": 32, "micro_batch": 4, "max_length": 4096, "checkpointing": "true", "budget": 16384},
}


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge(*groups: list[str]) -> list[str]:
    """Hydra overrides, later ones replacing earlier ones of the same key (order kept)."""
    out: dict[str, str] = {}
    for group in groups:
        for o in group:
            out[_key(o)] = o
    return list(out.values())


def bench_overrides(
    shape: str, user: list[str], steps: int, dp: int, workdir: Path, parquet: Path, probe=None
) -> list[str]:
    """Defaults for the shape, then the user's overrides, then the keys the benchmark owns.

    With `probe` (the config composed from a first pass) the defaults that depend on the user's
    choices are added: a micro-batch size that divides the per-rank batch, and a token budget
    when packed (remove-padding) mode is on.
    """
    d = SHAPE_DEFAULTS["tiny" if shape == "tiny" else "large"]
    base = [
        "use_remove_padding=true",
        "data.multiturn.enable=true",
        f"data.train_batch_size={d['batch_per_dp'] * dp}",
        f"data.micro_batch_size_per_gpu={d['micro_batch']}",
        f"data.max_length={d['max_length']}",
        f"model.enable_gradient_checkpointing={d['checkpointing']}",
        "trainer.logger=[]",
        "trainer.checkpoint.save_contents=[]",
    ]
    owned = [
        f"data.train_files={parquet}",
        f"model.partial_pretrain={workdir}/model-{shape}",
        f"trainer.total_training_steps={steps}",
        "trainer.total_epochs=1",
        "trainer.resume_mode=disable",
        f"trainer.default_local_dir={workdir}/ckpt-sft",
    ]
    merged = merge(base, user, owned)
    if probe is None:
        return merged
    keys = set(map(_key, user))
    if "data.micro_batch_size_per_gpu" not in keys:
        mbs = max(1, min(d["micro_batch"], probe.data.train_batch_size // dp))
        merged = merge(merged, [f"data.micro_batch_size_per_gpu={mbs}"])
    if probe.use_remove_padding and "data.max_token_len_per_gpu" not in keys:
        merged = merge(merged, [f"data.max_token_len_per_gpu={max(d['budget'], probe.data.max_length)}"])
    return merged


# ----------------------------------------------------------------- accounting


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


def _median(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _peak_mem_gb(ctx_device: torch.device, group=None) -> float | None:
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
        "tokens_per_s_per_gpu": _median(rate("tokens")),
        "trained_tokens_per_s_per_gpu": _median(rate("trained")),
        "model_mfu": _median([mfu(s["model_flops"], s["dt"], peak, world) for s in timed]),
        "useful_mfu": _median([mfu(s["useful_flops"], s["dt"], peak, world) for s in timed]),
        "padding_frac": 1.0 - tokens / slots if slots else None,
        "time_to_first_step_s": per_step[0]["t"] - t_start,
        "step_time_s_median": _median([s["dt"] for s in timed]),
        "tokens_per_step": tokens / len(timed),
        "timed_steps": len(timed),
    }


# ----------------------------------------------------------------- our trainer


def run_ours(name: str, overrides: list[str], ctx: DistContext, warmup: int) -> dict:
    cfg = compose(overrides)
    validate_config(cfg, WorldInfo.from_env())
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)
    t_start = time.perf_counter()
    trainer = FSDPSFTTrainer(cfg, ctx)
    logged: list[tuple[int, float, dict]] = []
    original = trainer.metrics.log

    def capture(metrics: dict, step: int) -> None:
        if "train/loss" in metrics:
            logged.append((step, time.perf_counter(), dict(metrics)))
        original(metrics, step)

    trainer.metrics.log = capture
    trainer.fit()
    per_step, prev_t, all_match = [], None, True
    for step, t, m in logged:
        lengths, rows = step_layout(trainer, step)
        tokens = float(m["train/total_tokens"])
        all_match &= sum(lengths) == int(tokens)
        per_step.append(
            {
                "step": step,
                "t": t,
                "dt": t - prev_t if prev_t is not None else m["train/step_time_s"],
                "tokens": tokens,
                "trained": float(m["train/trained_tokens"]),
                "slots": tokens / (1.0 - m["train/padding_frac"]),
                "model_flops": sum(n * s * model_flops_per_token(trainer.hf_config, s) for n, s in rows),
                "useful_flops": useful_flops(trainer.hf_config, lengths),
                "train_step_s": m["train/step_time_s"],
                "loss": m["train/loss"],
                "micro_batches": len(rows) / trainer.ctx.dp_size,
            }
        )
        prev_t = t
    peak = peak_flops_per_gpu(ctx.device)
    out = {"name": name, "mode": "packed" if cfg.use_remove_padding else "padded"}
    out.update(summarize(per_step, warmup, t_start, ctx.world_size, peak))
    out.update(
        train_step_s_median=_median([s["train_step_s"] for s in per_step if s["step"] > warmup]),
        peak_mem_gb=_peak_mem_gb(ctx.device, ctx.world_group),
        micro_batches_per_step=_median([s["micro_batches"] for s in per_step if s["step"] > warmup]),
        sample_lengths_match=all_match,
        final_loss=per_step[-1]["loss"],
        overrides=overrides,
    )
    if not all_match:
        logger.warning("bench: recomputed sample lengths differ from the trainer's token counts; MFU is suspect")
    del trainer
    gc.collect()
    return out


# ----------------------------------------------------------------- TRL (optional baseline)


def trl_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("trl", "datasets"))


def run_trl(cfg, ctx: DistContext, model_dir: Path, parquet: Path, warmup: int, tokens_per_step: float) -> list[dict]:
    """TRL's SFTTrainer on the same files: bfd packing, padding-free, assistant-only loss; sdpa and flex."""
    runs = []
    for impl in ("sdpa", "flex_attention"):
        try:
            runs.append(_trl_once(impl, cfg, ctx, model_dir, parquet, warmup, tokens_per_step))
        except Exception as exc:  # one attention backend failing must not hide the other's result
            logger.error("bench: TRL with %s failed: %s: %s", impl, type(exc).__name__, exc)
            runs.append({"name": f"trl-{impl}", "error": f"{type(exc).__name__}: {exc}"})
        gc.collect()
    return runs


def _trl_once(impl, cfg, ctx, model_dir, parquet, warmup, tokens_per_step) -> dict:
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
    trainer.train()
    totals = torch.tensor(steps, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(totals, group=ctx.world_group)  # every rank counted its own micro-batches
    per_step = [
        {"step": i + 1, "t": t, "dt": t - resumes[i], "tokens": s[0], "trained": s[1], "slots": s[0],
         "model_flops": s[2], "useful_flops": s[3]}
        for i, (t, s) in enumerate(zip(ends, totals.tolist()))
    ]  # fmt: skip
    out = {"name": f"trl-{impl}", "mode": "trl bfd packing, padding-free"}
    out.update(summarize(per_step, warmup, t_start, ctx.world_size, peak_flops_per_gpu(ctx.device)))
    out.update(peak_mem_gb=_peak_mem_gb(ctx.device, ctx.world_group), per_device_batch=per_device, grad_accum=accum)
    del trainer
    return out


# ----------------------------------------------------------------- CLI


COLUMNS = (  # (header, result key, format)
    ("tok/s/gpu", "tokens_per_s_per_gpu", "{:.0f}"),
    ("trained/s", "trained_tokens_per_s_per_gpu", "{:.0f}"),
    ("mfu", "model_mfu", "{:.1%}"),
    ("useful", "useful_mfu", "{:.1%}"),
    ("step s", "step_time_s_median", "{:.3f}"),
    ("pad", "padding_frac", "{:.2f}"),
    ("mem GB", "peak_mem_gb", "{:.1f}"),
    ("ttfs s", "time_to_first_step_s", "{:.1f}"),
)


def print_table(results: list[dict]) -> None:
    print(f"{'run':<18}" + "".join(f"{h:>11}" for h, _, _ in COLUMNS))
    for r in results:
        if "error" in r:
            print(f"{r['name']:<18}error: {r['error']}")
            continue
        cells = ("-" if r.get(k) is None else fmt.format(r[k]) for _, k, fmt in COLUMNS)
        print(f"{r['name']:<18}" + "".join(f"{c:>11}" for c in cells))


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m sft.bench",
        usage="%(prog)s [--shape SHAPE] [--steps N] [--warmup W] [--baseline B] [key=value ...]",
        description=__doc__.split("\n\n")[0],
        epilog="key=value: trainer overrides (sft/config/sft_trainer.yaml), e.g. model.enable_gradient_checkpointing=false",
    )
    p.add_argument("--shape", choices=SHAPE_NAMES, default="tiny")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them")
    p.add_argument("--workdir", type=Path, default=None, help="model, data and outputs (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and the synthetic data")
    p.add_argument("--baseline", choices=("none", "padded", "trl"), default="none")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if a.startswith("-") or "=" not in a]
    if bad:
        p.error(f"unrecognized arguments {bad}: trainer overrides are key=value")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    owned = [o for o in rest if _key(o) in OWNED]
    if owned:
        p.error(f"{owned}: set by the benchmark (its synthetic data, model and step count)")
    return args, rest


def _shared_workdir(requested: Path | None, ctx: DistContext) -> Path:
    """Rank 0's choice, for every rank (a temp dir name differs per process)."""
    box = [str(requested or tempfile.mkdtemp(prefix="sft-bench-")) if ctx.rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=ctx.world_group)
    return Path(box[0])


def report(args: argparse.Namespace, ctx: DistContext, results: list[dict], setup_s: float) -> dict:
    ours, others = results[0], [r for r in results[1:] if r.get("tokens_per_s_per_gpu")]
    best = max(others, key=lambda r: r["tokens_per_s_per_gpu"]) if others else None
    return {
        "shape": args.shape,
        "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
        "world_size": ctx.world_size,
        "steps": args.steps,
        "warmup": args.warmup,
        **{k: v for k, v in ours.items() if k != "name"},
        "setup_s": setup_s,
        "baseline": None if args.baseline == "none" else args.baseline,
        "baseline_runs": results[1:],
        "best_baseline": best["name"] if best else None,
        "speedup_vs_baseline": ours["tokens_per_s_per_gpu"] / best["tokens_per_s_per_gpu"] if best else None,
    }


def run_all(args: argparse.Namespace, user: list[str], probe, dp: int, ctx: DistContext) -> dict | None:
    """Assets, our run, the baseline; the report on rank 0 (None elsewhere)."""
    total = args.warmup + args.steps
    workdir = _shared_workdir(args.workdir, ctx)
    t0 = time.perf_counter()
    spec = (workdir, args.shape, probe.data.train_batch_size * total, probe.data.max_length, args.seed)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # each node writes its own copy (deterministic)
        ensure_assets(*spec)
    dist.barrier(group=ctx.world_group)
    model_dir, parquet = asset_paths(*spec)
    setup_s = time.perf_counter() - t0
    overrides = bench_overrides(args.shape, user, total, dp, workdir, parquet, probe)
    results = [run_ours("sft", overrides, ctx, args.warmup)]
    if args.baseline == "padded":
        padded = merge(
            overrides,
            [
                "use_remove_padding=false",
                "data.max_token_len_per_gpu=null",
                f"trainer.default_local_dir={workdir}/ckpt-padded",
            ],
        )
        results.append(run_ours("sft-padded", padded, ctx, args.warmup))
    elif args.baseline == "trl":
        results += run_trl(compose(overrides), ctx, model_dir, parquet, args.warmup, results[0]["tokens_per_step"])
    dist.barrier(group=ctx.world_group)
    if args.workdir is None and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        shutil.rmtree(workdir, ignore_errors=True)  # a temp dir of ours (a 7B model is 15 GB)
    return report(args, ctx, results, setup_s) if ctx.rank == 0 else None


def main(argv: list[str] | None = None) -> int:
    args, user = parse_args(sys.argv[1:] if argv is None else argv)
    if args.baseline == "trl" and not trl_available():
        print(TRL_MISSING, file=sys.stderr)
        return 2
    world = WorldInfo.from_env()
    total, pending = args.warmup + args.steps, Path("/pending")
    try:  # compose twice: the defaults that scale with dp need the sp size the user chose
        first = compose(bench_overrides(args.shape, user, total, 1, pending, pending))
        dp = world.world_size // first.ulysses_sequence_parallel_size
        probe = compose(bench_overrides(args.shape, user, total, dp, pending, pending))
        device_type = resolve_device_type(probe.trainer.device)
    except ValueError as exc:
        print(f"sft.bench: config error: {exc}", file=sys.stderr)
        return 2
    setup_logging(world.rank)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    ctx = init_distributed(device_type, probe.ulysses_sequence_parallel_size)
    try:
        result = run_all(args, user, probe, dp, ctx)
    except ValueError as exc:  # config found wrong once files exist, or the data/model: one line
        if world.rank == 0:
            print(f"sft.bench: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 3
    finally:
        teardown()
    if result is not None:
        print_table([{"name": "sft", **result}, *result["baseline_runs"]])
        if result["best_baseline"]:
            print(f"speedup vs {result['best_baseline']}: {result['speedup_vs_baseline']:.2f}x (tokens/s per GPU)")
        line = json.dumps(result)
        if args.out:
            args.out.write_text(line + "\n")
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
