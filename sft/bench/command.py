"""`python -m sft.bench --command "torchrun ... -m sft.fsdp_sft_trainer key=value ..."`: time what a user types.

The command runs as given, in its own process, with two environment variables added:
`SFT_CALLBACKS` loads the step probe of sft/bench/profiling.py into the trainer as a step callback,
and `SFT_STEP_PROBE` names the folder where its rank 0 writes a line per logged step (wall clock,
token counts) and a profile of the last step (kernel launches, host synchronisations, GPU busy
fraction). No key of the command is changed. A step's time is the wall time between
two logged steps; the first `warmup` steps and the profiled last step are not timed.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from sft.bench.profiling import PROBE_ENV, PROBE_FACTORY
from sft.loop.callbacks import CALLBACKS_ENV

TRAINER_MODULE = "sft.fsdp_sft_trainer"
# verl's two command-line layouts: both entry points run the same trainer (README 'Launch').
TRAINER_MODULES = (TRAINER_MODULE, "sft.sft_trainer")


def check_command(command: str) -> list[str]:
    argv = shlex.split(command)
    if not any(m in argv for m in TRAINER_MODULES):
        raise ValueError(f"--command must run the trainer (`-m {' or -m '.join(TRAINER_MODULES)}`), got: {command}")
    return argv


def probe_callbacks(user: str | None) -> str:
    """`SFT_CALLBACKS` for the command: the user's own callbacks, if any, then the step probe."""
    return ",".join(x for x in (user, PROBE_FACTORY) if x)


def timed_steps(steps: list[dict], warmup: int, profiled: int | None) -> list[dict]:
    """Per-step records with `dt` (wall time since the previous logged step), warm-up and profiled step left out."""
    out = []
    for prev, cur in zip(steps, steps[1:]):
        if cur["step"] > warmup and cur["step"] != profiled:
            out.append(dict(cur, dt=cur["t"] - prev["t"]))
    return out


def summarize_command(steps: list[dict], profile: dict | None, warmup: int, t_launch: float) -> dict:
    if not steps:
        raise ValueError("the command logged no training step (see its output above)")
    profiled = profile["step"] if profile else None
    timed = timed_steps(steps, warmup, profiled)
    if not timed:
        raise ValueError(
            f"the command ran {len(steps)} steps: too few to time after {warmup} warm-up steps and the profiled last "
            "step; raise trainer.total_training_steps"
        )
    world = steps[0]["world_size"]
    med = lambda xs: statistics.median(xs)  # noqa: E731
    out = {
        "timed_steps": len(timed),
        "tokens_per_s_per_gpu": med([s["total_tokens"] / s["dt"] / world for s in timed]),
        "trained_tokens_per_s_per_gpu": med([s["trained_tokens"] / s["dt"] / world for s in timed]),
        "step_time_s_median": med([s["dt"] for s in timed]),
        "tokens_per_step": med([s["total_tokens"] for s in timed]),
        "peak_mem_gb": max((s.get("peak_mem_gb") or 0.0) for s in steps) or None,
        "time_to_first_step_s": steps[0]["t"] - t_launch,
        "losses": [s["loss"] for s in steps],
        "world_size": world,
    }
    if profile:
        out.update(
            profiled_step=profile["step"],
            gpu_busy_frac=profile["gpu_busy_frac"],
            host_syncs_per_step=profile["host_syncs"],
            kernel_launches_per_step=profile["kernel_launches"],
            profiled_step_s=profile["wall_s"],
            gpu_busy_s=profile.get("gpu_busy_s"),
            gpu_idle_gaps_ms=profile.get("gpu_idle_gaps_ms"),
            longest_gap_host_ops=profile.get("longest_gap_host_ops"),
            device_s_by_kind=profile.get("device_s_by_kind"),
            top_kernels=profile.get("top_kernels"),
            top_other_kernels=profile.get("top_other_kernels"),
        )
    return out


def _run_to_the_end(argv: list[str], env: dict, stdout, stderr) -> int:
    """Run the command and wait for it. Stopped by SIGTERM or Ctrl-C (a time limit, say), we stop the
    command too: a training run left behind on the GPU would slow whatever is timed next."""
    child = subprocess.Popen(argv, env=env, stdout=stdout, stderr=stderr)

    def stop(signum, frame):
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
    previous = signal.signal(signal.SIGTERM, stop) if main else None
    try:
        return child.wait()
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        if child.poll() is None:
            child.terminate()  # torchrun passes it on to its workers
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def run_command(command: str, warmup: int, log: Path | None = None) -> dict:
    """Run the user's command line with the step probe on; its summary (exit status included)."""
    argv = check_command(command)
    probe = Path(tempfile.mkdtemp(prefix="sft-probe-"))
    env = {**os.environ, PROBE_ENV: str(probe), CALLBACKS_ENV: probe_callbacks(os.environ.get(CALLBACKS_ENV))}
    t_launch = time.time()
    if log is None:  # the command's output goes where ours goes (stderr: the last line of stdout is the JSON)
        rc = _run_to_the_end(argv, env, sys.stderr, None)
    else:
        with open(log, "w") as sink:
            rc = _run_to_the_end(argv, env, sink, subprocess.STDOUT)
    steps_file, profile_file = probe / "steps.jsonl", probe / "summary.json"
    steps = [json.loads(x) for x in steps_file.read_text().splitlines()] if steps_file.exists() else []
    profile = json.loads(profile_file.read_text()) if profile_file.exists() else None
    result = {"command": command, "exit_status": rc}
    try:
        result.update(summarize_command(steps, profile, warmup, t_launch))
    except ValueError as exc:
        result["error"] = str(exc)
    return result


def print_command_result(r: dict) -> None:
    if "error" in r:
        print(f"command failed (exit {r['exit_status']}): {r['error']}")
        return
    rows = [
        ("tokens/s per GPU", f"{r['tokens_per_s_per_gpu']:.0f}"),
        ("trained tokens/s per GPU", f"{r['trained_tokens_per_s_per_gpu']:.0f}"),
        ("step s (median)", f"{r['step_time_s_median']:.3f}"),
        ("peak mem GB", "-" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.1f}"),
        ("GPU busy (profiled step)", "-" if r.get("gpu_busy_frac") is None else f"{r['gpu_busy_frac']:.1%}"),
        ("host syncs per step", str(r.get("host_syncs_per_step", "-"))),
        ("kernel launches per step", str(r.get("kernel_launches_per_step", "-"))),
    ]
    for name, value in rows:
        print(f"{name:<28}{value:>12}")
