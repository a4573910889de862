"""Vision-language SFT, sft against TRL: `python -m sft.bench.vision [--layers N] [--steps S] [key=value ...]`.

On one GPU, in one command: writes a random-weight Qwen2.5-VL-3B-shaped model and image chats
(sft/bench/vision_assets.py; `--model DIR --data FILE` times your own files instead), then times, each in its
own process and on the same files:
- sft as a user types it: `torchrun ... -m sft.fsdp_sft_trainer` with verl's production keys (remove-padding,
  `data.micro_batch_size_per_gpu`, gradient checkpointing, `model.fsdp_config.model_dtype`), through the step probe
  of `python -m sft.bench --command` (sft/bench/command.py); `key=value` arguments are added to its command line;
- TRL 1.16's SFTTrainer (sft/bench/trl_vision.py): the same rows per optimizer step, learning-rate schedule, master
  weight dtype and checkpointing, padded batches (TRL supports no packing or padding-free for images), Liger's
  layer kernels when liger-kernel is installed (`--trl-liger auto`; retried without them if that run fails).
Both count real tokens (image tokens included, padding not) and trained tokens the same way; a step's time is
the wall time between two logged steps (GPU synchronized), medians over the steps after `--warmup`; time to
first step is from the process's launch. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sft.bench.command import run_command, summarize_command
from sft.bench.vision_assets import VISION_SHAPES, asset_paths

TRAINER = "-m sft.fsdp_sft_trainer"
REPORT_S = 20  # what `--time-limit` keeps back for stopping TRL and reporting
OWNED = ("data.train_files", "model.partial_pretrain", "trainer.total_training_steps", "trainer.total_epochs",
         "trainer.default_local_dir")  # fmt: skip


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m sft.bench.vision",
        usage="%(prog)s [--shape SHAPE] [--layers N] [--rows R] [--steps S] [--baseline trl|none] [key=value ...]",
        description=__doc__.split("\n\n")[0],
        epilog="key=value: added to sft's command line (sft/config/sft_trainer.yaml), e.g. model.attn_kernel=torch",
    )
    p.add_argument("--shape", choices=list(VISION_SHAPES), default="qwen2.5-vl-3b")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the generated model (default: all)")
    p.add_argument("--rows", type=int, default=2000, help="generated image chats")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", type=Path, default=None, help="time this model folder (with --data) instead")
    p.add_argument("--data", type=Path, default=None, help="time this verl-layout parquet (with --model) instead")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them")
    p.add_argument("--batch", type=int, default=32, help="rows per optimizer step (data.train_batch_size)")
    p.add_argument("--micro-batch", type=int, default=2, help="sft's data.micro_batch_size_per_gpu")
    p.add_argument("--max-length", type=int, default=8192, help="data.max_length (TRL's max_length)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="master weights, both runs")
    p.add_argument("--no-gc", dest="gc", action="store_false", help="gradient checkpointing off, both runs")
    p.add_argument("--baseline", choices=("trl", "none"), default="trl")
    p.add_argument("--trl-attn", default="sdpa", help="TRL's attn_implementation")
    p.add_argument("--trl-batch", type=int, default=4, help="TRL's rows per micro-batch (padded to its longest)")
    p.add_argument("--trl-liger", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--trl-workers", type=int, default=4, help="TRL's dataloader_num_workers")
    p.add_argument("--trl-timeout", type=float, default=None, help="stop TRL after this many seconds, keep its steps")
    p.add_argument(
        "--time-limit", type=float, default=None,
        help="seconds for the whole benchmark: TRL is stopped (its steps kept) in time to report within it",
    )  # fmt: skip
    p.add_argument("--workdir", type=Path, default=None, help="assets and outputs (default: a temp dir, removed)")
    p.add_argument("--log-dir", type=Path, default=None, help="each run's log (default: WORKDIR/logs)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if a.startswith("-") or "=" not in a]
    if bad:
        p.error(f"unrecognized arguments {bad}: trainer keys are key=value")
    owned = [a for a in rest if a.split("=", 1)[0].lstrip("+~") in OWNED]
    if owned:
        p.error(f"{owned}: set by the benchmark (its model, data, step count and output folder)")
    if (args.model is None) != (args.data is None):
        p.error("--model and --data go together")
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1 (a step's time is measured from the step before it)")
    if args.batch % args.trl_batch:
        p.error(f"--batch {args.batch} must be a multiple of --trl-batch {args.trl_batch}")
    return args, rest


def launcher() -> str:
    """How a user starts the trainer on one GPU."""
    run = "torchrun" if shutil.which("torchrun") else f"{shlex.quote(sys.executable)} -m torch.distributed.run"
    return f"{run} --standalone --nnodes=1 --nproc_per_node=1"


def sft_command(
    args: argparse.Namespace, model: Path, data: Path, workdir: Path, user: list[str], rows: int | None = None
) -> str:
    """The command line a user types, with verl's production keys; one more step than timed (the probe profiles
    the last one), and as many epochs as that takes over `rows` rows."""
    steps = args.warmup + args.steps + 1
    epochs = -(-steps // max(1, (rows or args.batch) // args.batch))
    keys = [
        f"data.train_files={data}",
        "data.multiturn.enable=true",
        f"data.max_length={args.max_length}",
        f"data.train_batch_size={args.batch}",
        f"data.micro_batch_size_per_gpu={args.micro_batch}",
        "use_remove_padding=true",
        f"model.partial_pretrain={model}",
        f"model.enable_gradient_checkpointing={str(args.gc).lower()}",
        f"model.fsdp_config.model_dtype={args.dtype}",
        f"trainer.total_training_steps={steps}",
        f"trainer.total_epochs={epochs}",
        "trainer.logger=[console]",
        "trainer.checkpoint.save_contents=[]",
        "trainer.resume_mode=disable",
        f"trainer.default_local_dir={workdir / 'ck-sft'}",
    ]
    user_keys = {u.split("=", 1)[0].lstrip("+~") for u in user}
    keys = [k for k in keys if k.split("=", 1)[0] not in user_keys] + user
    return f"{launcher()} {TRAINER} " + " ".join(shlex.quote(k) for k in keys)


def _run(argv: list[str], log: Path, timeout: float | None) -> tuple[int, bool]:
    """Run `argv` (output to `log`) until it ends or `timeout` passes; (exit status, stopped by the timeout).
    SIGTERM to us stops it too: a run left on the GPU would slow whatever is timed next."""
    with open(log, "w") as sink:
        child = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)

        def stop(signum, frame):
            raise KeyboardInterrupt

        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, stop) if main else None
        try:
            return child.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            return -signal.SIGTERM, True
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)  # its dataloader workers too
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(child.pid, signal.SIGKILL)
                    child.wait()


def run_trl_once(
    args: argparse.Namespace, model: Path, data: Path, out_dir: Path, log: Path, liger: bool, timeout: float | None
) -> dict[str, Any]:
    """One TRL run; its steps so far are summarized also when `timeout` or our own SIGTERM stops it."""
    argv = [
        sys.executable, "-m", "sft.bench.trl_vision", "--model", str(model), "--data", str(data),
        "--out-dir", str(out_dir), "--steps", str(args.warmup + args.steps), "--global-batch", str(args.batch),
        "--per-device", str(args.trl_batch), "--max-length", str(args.max_length), "--dtype", args.dtype,
        "--attn", args.trl_attn, "--workers", str(args.trl_workers),
    ] + (["--liger"] if liger else []) + ([] if args.gc else ["--no-gradient-checkpointing"])  # fmt: skip
    t_launch = time.time()
    try:
        rc, timed_out = _run(argv, log, timeout)
    except KeyboardInterrupt:  # SIGTERM to us (an outer time limit): keep what TRL did so far
        rc, timed_out = -signal.SIGTERM, True
    steps_file, info_file = out_dir / "steps.jsonl", out_dir / "info.json"
    steps = [json.loads(x) for x in steps_file.read_text().splitlines()] if steps_file.exists() else []
    name = f"trl-{args.trl_attn}{'+liger' if liger else ''}"
    result: dict[str, Any] = {"name": name, "command": shlex.join(argv), "exit_status": rc, "timed_out": timed_out}
    if info_file.exists():
        result.update(json.loads(info_file.read_text()))
    try:
        result.update(summarize_command(steps, None, args.warmup, t_launch))
        pads = sorted(s["padding_frac"] for s in steps[args.warmup :] if s.get("padding_frac") is not None)
        result["padding_frac"] = pads[len(pads) // 2] if pads else None
    except ValueError as exc:
        result["error"] = f"{exc}; see {log}"
    return result


def run_trl(args: argparse.Namespace, model: Path, data: Path, logs: Path) -> list[dict[str, Any]]:
    """TRL's run, with Liger's kernels where asked or installed; without them again if that run failed. Its steps
    go under `logs` as they end; `--trl-timeout` bounds the runs together."""
    from sft.bench.trl_vision import liger_available

    tries = {"on": [True], "off": [False], "auto": [True, False] if liger_available() else [False]}[args.trl_liger]
    ends = [time.monotonic() + args.trl_timeout] if args.trl_timeout is not None else []
    if args.time_limit is not None:
        ends.append(args.started + args.time_limit - REPORT_S)
    deadline = min(ends, default=None)
    runs: list[dict[str, Any]] = []
    for liger in tries:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left < 30:
            break
        tag = "trl-liger" if liger else "trl"
        runs.append(run_trl_once(args, model, data, logs / tag, logs / f"{tag}.log", liger, left))
        if "error" not in runs[-1] or runs[-1]["timed_out"]:
            break
    return runs


def data_stats(model: Path, data: Path) -> dict[str, Any]:
    """Rows, images per row and image tokens per row (the processor's count from each image's header)."""
    import pyarrow.parquet as pq
    from PIL import Image
    from transformers import AutoTokenizer

    from sft.data.processor import load_processor
    from sft.data.vision_dataset import image_token_count

    processor = load_processor(str(model), AutoTokenizer.from_pretrained(model))
    column = pq.read_table(data, columns=["images"]).column("images").to_pylist()
    per_row, per_image = [], []
    for images in column:
        counts = []
        for im in images or []:
            with Image.open(io.BytesIO(im["bytes"])) as f:  # header only
                width, height = f.size
            counts.append(image_token_count(processor, height, width))
        per_row.append(sum(counts))
        per_image += counts
    n = max(len(column), 1)
    return {
        "rows": len(column),
        "images_per_row": len(per_image) / n,
        "image_tokens_per_row": sum(per_row) / n,
        "image_tokens_min": min(per_image, default=0),
        "image_tokens_max": max(per_image, default=0),
    }


def device_name() -> str:
    """The GPU's name from nvidia-smi (this process never touches the GPU: the runs have it to themselves)."""
    if shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    return "cpu"


def ensure_assets(args: argparse.Namespace, workdir: Path, log: Path) -> tuple[Path, Path]:
    """The generated model and rows, written by a process of their own (its weights are drawn on the GPU)."""
    if args.model is not None:
        return args.model, args.data
    argv = [sys.executable, "-m", "sft.bench.vision_assets", str(workdir), "--shape", args.shape,
            "--rows", str(args.rows), "--seed", str(args.seed)]  # fmt: skip
    if args.layers is not None:
        argv += ["--layers", str(args.layers)]
    rc, _ = _run(argv, log, None)
    if rc != 0:
        raise ValueError(f"writing the assets failed (exit {rc}): {log.read_text()[-2000:]}")
    return asset_paths(workdir, args.shape, args.layers, args.rows, args.seed)


COLUMNS = (  # (header, result key, format)
    ("tok/s/gpu", "tokens_per_s_per_gpu", "{:.0f}"),
    ("trained/s", "trained_tokens_per_s_per_gpu", "{:.0f}"),
    ("step s", "step_time_s_median", "{:.2f}"),
    ("tok/step", "tokens_per_step", "{:.0f}"),
    ("pad", "padding_frac", "{:.2f}"),
    ("mem GB", "peak_mem_gb", "{:.1f}"),
    ("ttfs s", "time_to_first_step_s", "{:.1f}"),
    ("busy", "gpu_busy_frac", "{:.0%}"),
)


def print_table(runs: list[dict[str, Any]]) -> None:
    print(f"{'run':<16}" + "".join(f"{h:>11}" for h, _, _ in COLUMNS))
    for r in runs:
        if "error" in r:
            print(f"{r['name']:<16}error: {r['error']}")
            continue
        cells = ("-" if r.get(k) is None else fmt.format(r[k]) for _, k, fmt in COLUMNS)
        print(f"{r['name']:<16}" + "".join(f"{c:>11}" for c in cells))


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "trl", "datasets", "liger-kernel"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def run_all(args: argparse.Namespace, user: list[str], workdir: Path) -> dict[str, Any]:
    """Assets, sft's run, TRL's; with `--out`, the result so far is written after each run (a time limit that
    stops the command keeps what was measured)."""
    logs = args.log_dir or workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, data = ensure_assets(args, workdir, logs / "assets.log")
    setup_s = time.perf_counter() - t0
    stats = data_stats(model, data)
    command = sft_command(args, model, data, workdir, user, stats["rows"])
    result: dict[str, Any] = {
        "shape": args.shape if args.model is None else None,
        "layers": args.layers,
        "model": str(model),
        "data": str(data),
        "device": device_name(),
        "versions": versions(),
        "steps": args.steps,
        "warmup": args.warmup,
        "global_batch": args.batch,
        "dtype": args.dtype,
        "gradient_checkpointing": args.gc,
        "data_stats": stats,
        "setup_s": setup_s,
    }
    ours = run_command(command, args.warmup, logs / "sft.log")
    result.update(ours, run="sft", baseline_runs=[], best_baseline=None, speedup_vs_baseline=None)
    if args.out:
        args.out.write_text(json.dumps(result) + "\n")
    if args.baseline == "trl":
        result["baseline_runs"] = run_trl(args, model, data, logs)
    done = [b for b in result["baseline_runs"] if b.get("tokens_per_s_per_gpu")]
    if done and "error" not in ours:
        best = max(done, key=lambda b: b["tokens_per_s_per_gpu"])
        result.update(
            best_baseline=best["name"], speedup_vs_baseline=ours["tokens_per_s_per_gpu"] / best["tokens_per_s_per_gpu"]
        )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args, user = parse_args(sys.argv[1:] if argv is None else argv)
    args.started = time.monotonic()
    if args.baseline == "trl":
        from sft.bench.trl_vision import TRL_MISSING, trl_available

        if not trl_available():
            print(TRL_MISSING, file=sys.stderr)
            return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sft-bench-vision-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = run_all(args, user, workdir)
    except ValueError as exc:
        print(f"sft.bench.vision: error: {exc}", file=sys.stderr)
        return 3
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)  # a temp dir of ours (the 3B model is 7.5 GB)
    print_table([{"name": "sft", **result}, *result["baseline_runs"]])
    d = result["data_stats"]
    print(
        f"data: {d['rows']} rows, {d['images_per_row']:.2f} images and {d['image_tokens_per_row']:.0f} image tokens "
        f"per row ({d['image_tokens_min']}-{d['image_tokens_max']} per image)"
    )
    if result["speedup_vs_baseline"]:
        print(f"speedup vs {result['best_baseline']}: {result['speedup_vs_baseline']:.2f}x (tokens/s per GPU)")
    line = json.dumps(result)
    if args.out:
        args.out.write_text(line + "\n")
    print(line, flush=True)
    return 0 if "error" not in result else 3


if __name__ == "__main__":
    sys.exit(main())
