"""Throughput benchmark of the real trainer: `python -m sft.bench --shape qwen2.5-1.5b [key=value ...]`.

Several GPUs: `torchrun --nproc_per_node=N -m sft.bench ...`. Local rank 0 of each node writes
a random-weight model of the shape and a synthetic multi-turn parquet (sft.bench.assets), then
`FSDPSFTTrainer` trains `--warmup` + `--steps` optimizer steps; further `key=value` arguments
are trainer overrides. Per-step metrics come from a step callback (sft/loop/callbacks.py).

Measures (medians over the timed steps, after warm-up, against baselines run on the same machine):
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
The user's keys are never replaced: the token budget is the trainer's own automatic choice
unless the user sets `data.max_token_len_per_gpu`.

`--command "torchrun ... -m sft.fsdp_sft_trainer key=value ..."` times a user's own command line
instead, unchanged, in its own process (sft.bench.command): tokens/s, GPU busy fraction, host
synchronisations and kernel launches per step.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sft.bench.assets import SHAPE_NAMES, asset_paths, ensure_assets
from sft.bench.overrides import OWNED, bench_overrides, merge, override_key
from sft.bench.profiling import StepProfiler
from sft.bench.stats import median, peak_mem_gb, step_layout, summarize
from sft.cli import compose
from sft.config.checks import validate_config
from sft.config.errors import ConfigError
from sft.loop.flops import model_flops_per_token, peak_flops_per_gpu, useful_flops
from sft.parallel.distributed import (
    DistContext,
    WorldInfo,
    init_distributed,
    resolve_device_type,
    setup_logging,
    teardown,
)
from sft.trainer import FSDPSFTTrainer

logger = logging.getLogger("sft")

TRL_MISSING = "sft.bench: --baseline trl needs the optional packages trl and datasets: pip install trl datasets"
# ----------------------------------------------------------------- our trainer


class _Recorder:
    """A step callback: each step's (step, wall clock, metrics), and the profiler's step hook."""

    def __init__(self, profiler: StepProfiler | None) -> None:
        self.profiler = profiler
        self.logged: list[tuple[int, float, dict]] = []

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        self.logged.append((step, time.perf_counter(), dict(metrics)))
        if self.profiler is not None:
            self.profiler.on_step_logged(step)


def run_ours(
    name: str, overrides: list[str], ctx: DistContext, warmup: int, until: int, profiler: StepProfiler | None = None
) -> dict:
    """Train with `overrides`; steps warmup+1..until are timed (a later one may be profiled)."""
    cfg = compose(overrides)
    validate_config(cfg, WorldInfo.from_env())
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)
    t_start = time.perf_counter()
    recorder = _Recorder(profiler)
    trainer = FSDPSFTTrainer(cfg, ctx, callbacks=[recorder])
    trainer.fit()
    logged = [entry for entry in recorder.logged if entry[0] <= until]  # a profiled extra step is not timed
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
    if trainer.budget is not None:
        out.update(
            token_budget=trainer.budget.tokens,
            token_budget_reason=trainer.budget.reason,
            recomputed_layers=trainer.budget.recompute,
        )
    out.update(summarize(per_step, warmup, t_start, ctx.world_size, peak))
    out.update(
        train_step_s_median=median([s["train_step_s"] for s in per_step if s["step"] > warmup]),
        peak_mem_gb=peak_mem_gb(ctx.device, ctx.world_group),
        micro_batches_per_step=median([s["micro_batches"] for s in per_step if s["step"] > warmup]),
        sample_lengths_match=all_match,
        final_loss=per_step[-1]["loss"],
        overrides=overrides,
    )
    if not all_match:
        logger.warning("bench: recomputed sample lengths differ from the trainer's token counts; MFU is suspect")
    del trainer
    gc.collect()
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


def _trl_available() -> bool:
    from sft.bench.trl_baseline import trl_available  # lazy: the optional baseline stays out of plain runs

    return trl_available()


def _run_trl(*args, **kwargs) -> list[dict]:
    from sft.bench.trl_baseline import run_trl

    return run_trl(*args, **kwargs)


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
    p.add_argument("--sample-length", type=int, default=None, help="every sample this many tokens (long context)")
    p.add_argument("--profile", type=Path, default=None, help="profile one extra step: trace + top ops here")
    p.add_argument("--command", default=None, help="time this trainer command line as given (quoted)")
    p.add_argument("--log", type=Path, default=None, help="with --command: write the command's output here")
    p.add_argument("--trl-attn", default="sdpa,flex_attention", help="TRL baseline: attention(s), comma-separated")
    p.add_argument("--trl-liger", action="store_true", help="TRL baseline with TRL's use_liger_kernel=True")
    p.add_argument(
        "--trl-only", type=float, default=None, metavar="TOKENS_PER_STEP",
        help="run only the TRL baseline (its own process: Liger patches transformers process-wide), "
        "sized to this many tokens per optimizer step",
    )  # fmt: skip
    args, rest = p.parse_known_args(argv)
    if args.command is not None:
        if rest:
            p.error(f"--command takes the whole command line in one quoted argument; also got {rest}")
        return args, rest
    bad = [a for a in rest if a.startswith("-") or "=" not in a]
    if bad:
        p.error(f"unrecognized arguments {bad}: trainer overrides are key=value")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    owned = [o for o in rest if override_key(o) in OWNED]
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
        "run": ours["name"],
        "setup_s": setup_s,
        "baseline": None if args.baseline == "none" else args.baseline,
        "baseline_runs": results[1:],
        "best_baseline": best["name"] if best else None,
        "speedup_vs_baseline": ours["tokens_per_s_per_gpu"] / best["tokens_per_s_per_gpu"] if best else None,
    }


def run_all(args: argparse.Namespace, user: list[str], probe, dp: int, ctx: DistContext) -> dict | None:
    """Assets, our run, the baseline; the report on rank 0 (None elsewhere)."""
    total = args.warmup + args.steps + (1 if args.profile else 0)
    workdir = _shared_workdir(args.workdir, ctx)
    t0 = time.perf_counter()
    spec = (
        workdir,
        args.shape,
        probe.data.train_batch_size * total,
        probe.data.max_length,
        args.seed,
        args.sample_length,
    )
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # each node writes its own copy (deterministic)
        ensure_assets(*spec)
    dist.barrier(group=ctx.world_group)
    model_dir, parquet = asset_paths(*spec)
    setup_s = time.perf_counter() - t0
    overrides = bench_overrides(args.shape, user, total, dp, workdir, parquet, probe)
    profiler = StepProfiler(args.profile, total, ctx.rank) if args.profile else None
    until = args.warmup + args.steps
    trl_args = (ctx, model_dir, parquet, args.warmup)
    trl_kw = {"impls": tuple(args.trl_attn.split(",")), "liger": args.trl_liger}
    if args.trl_only is not None:
        runs = _run_trl(compose(overrides), *trl_args, args.trl_only, **trl_kw)
        dist.barrier(group=ctx.world_group)
        return report(args, ctx, runs, setup_s) if ctx.rank == 0 else None
    results = [run_ours("sft", overrides, ctx, args.warmup, until, profiler)]
    if args.baseline == "padded":
        padded = merge(
            overrides,
            [
                "use_remove_padding=false",
                "data.max_token_len_per_gpu=null",
                f"trainer.default_local_dir={workdir}/ckpt-padded",
            ],
        )
        results.append(run_ours("sft-padded", padded, ctx, args.warmup, until))
    elif args.baseline == "trl":
        results += _run_trl(compose(overrides), *trl_args, results[0]["tokens_per_step"], **trl_kw)
    dist.barrier(group=ctx.world_group)
    if args.workdir is None and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        shutil.rmtree(workdir, ignore_errors=True)  # a temp dir of ours (a 7B model is 15 GB)
    return report(args, ctx, results, setup_s) if ctx.rank == 0 else None


def _main_command(args: argparse.Namespace) -> int:
    from sft.bench.command import print_command_result, run_command

    try:
        result = run_command(args.command, args.warmup, args.log)
    except ValueError as exc:
        print(f"sft.bench: error: {exc}", file=sys.stderr)
        return 2
    print_command_result(result)
    line = json.dumps(result)
    if args.out:
        args.out.write_text(line + "\n")
    print(line, flush=True)
    return 0 if "error" not in result else 3


def main(argv: list[str] | None = None) -> int:
    args, user = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is not None:
        return _main_command(args)
    if args.trl_only is not None and args.baseline != "trl":
        print("sft.bench: --trl-only needs --baseline trl", file=sys.stderr)
        return 2
    if args.baseline == "trl" and not _trl_available():
        print(TRL_MISSING, file=sys.stderr)
        return 2
    world = WorldInfo.from_env()
    total, pending = args.warmup + args.steps + (1 if args.profile else 0), Path("/pending")
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
        print_table([{"name": result["run"], **result}, *result["baseline_runs"]])
        if result["best_baseline"]:
            print(f"speedup vs {result['best_baseline']}: {result['speedup_vs_baseline']:.2f}x (tokens/s per GPU)")
        line = json.dumps(result)
        if args.out:
            args.out.write_text(line + "\n")
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
