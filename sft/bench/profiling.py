"""One optimizer step under torch.profiler, and the per-step probe of `python -m sft.bench --command`.

`StepProfiler` records one step (from when the step before it is logged to when it is logged):
rank 0 writes `summary.json` (kernel launches, host synchronisations, GPU busy fraction over the
step's wall time) and, unless `trace=False`, a Chrome trace and `ops.txt` (the ops that took
the most device time). `StepProbe` is a trainer step callback (sft/loop/callbacks.py) that the
benchmark loads into the user's unchanged command through `SFT_CALLBACKS=sft.bench.profiling:step_probe`,
with the folder in `SFT_STEP_PROBE`: rank 0 appends one line per logged step to `steps.jsonl` there
and every rank joins the profile of the last step.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

logger = logging.getLogger("sft")

PROBE_ENV = "SFT_STEP_PROBE"
PROBE_FACTORY = "sft.bench.profiling:step_probe"  # an SFT_CALLBACKS entry
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")
END_MARK = "sft_profile_end"
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
# Device time by kind, from kernel names (the first rule whose words occur in the lower-cased name wins):
# where a step's GPU time goes, before reading a whole trace.
KINDS = (
    ("comm", ("nccl",)),
    ("copy", ("memcpy", "memset")),
    ("attention", ("flash", "fmha", "attention")),  # before gemm: flash kernels' names carry "cutlass"
    # BLAS kernels; "gemv": the matrix-vector ones (the bias gradients of sft/ops/qkv_proj.py), "other" before.
    ("gemm", ("gemm", "gemv", "nvjet", "xmma", "cutlass", "cublas", "s16816")),
    ("optimizer", ("multi_tensor_apply", "adam")),
    ("sft", ("_sft_",)),  # sft's own Triton kernels (sft/ops/rms_norm.py, sft/ops/swiglu.py), named _sft_*
    # Liger's Triton kernels carry their Python names, without "triton" (liger-kernel 0.8.5), so they would
    # otherwise land in "other". Its norm kernels by their full names: PyTorch's fused RMSNorm forward runs
    # `vectorized_layer_norm_kernel`, which a bare "_layer_norm_" would put under Liger.
    (
        "liger",
        ("_rms_norm_forward", "_rms_norm_backward", "_layer_norm_forward", "_layer_norm_backward")
        + ("_swiglu_", "_triton_rope", "_geglu_", "liger"),
    ),
    ("norm", ("layer_norm",)),  # PyTorch's own norm kernels (its RMSNorm shares the layer-norm kernels)
    ("triton", ("triton",)),
)


def _union_ns(intervals: list[tuple[int, int]]) -> int:
    """Total length covered by [start, end) intervals."""
    total, end_so_far = 0, None
    for start, end in sorted(intervals):
        if end_so_far is None or start > end_so_far:
            total += end - start
            end_so_far = end
        elif end > end_so_far:
            total += end - end_so_far
            end_so_far = end
    return total


def _largest_gaps(intervals: list[tuple[int, int]], start: int, end: int, k: int = 5) -> list[list[float]]:
    """The k longest stretches of [start, end) that no interval covers: [offset from start, length] in ms."""
    gaps, covered_to = [], start
    for s, e in sorted(intervals):
        if s > covered_to:
            gaps.append((s - covered_to, covered_to))
        covered_to = max(covered_to, e)
    if end > covered_to:
        gaps.append((end - covered_to, covered_to))
    return [[round((at - start) / 1e6, 6), round(length / 1e6, 6)] for length, at in sorted(gaps, reverse=True)[:k]]


def _host_ops_during(events: list[tuple[str, bool, int, int]], start: int, end: int, k: int = 8) -> list[list]:
    """The host-side events that overlap [start, end), longest overlap first: [name, overlap ms]. Named ranges
    (optimizer step, FSDP hooks, data loader) say what the host was doing while the GPU waited."""
    spans = []
    for name, dev, s, d in events:
        overlap = min(s + d, end) - max(s, start)
        if not dev and overlap > 0:
            spans.append((overlap, name))
    return [[name, round(overlap / 1e6, 6)] for overlap, name in sorted(spans, reverse=True)[:k]]


def _annotation_flag(e) -> bool | None:
    """Whether a device event is a user annotation, where this torch says (None where it cannot)."""
    if hasattr(e, "is_user_annotation"):
        return bool(e.is_user_annotation())
    if hasattr(e, "activity_type"):
        return "user_annotation" in e.activity_type()
    return None


def event_rows(kineto_events) -> list[tuple[str, bool, int, int]]:
    """(name, on_device, start_ns, duration_ns) of each profiler event, without the device-side mirrors
    of host ranges: a record_function (the profiler's own ProfilerStep#, FSDP's hooks) shows on the device
    as a `gpu_user_annotation` spanning the kernels it launched, which is not device work and would hide
    the gaps between them. (Matching host range names instead would also drop inductor's kernels, whose
    launches are host ranges of the same name.) Where the event cannot say its kind (torch 2.11's kineto
    events have neither `is_user_annotation` nor `activity_type`, and ProfilerStep# would count as device
    work), a device event that spans another device event of the same stream is taken as an annotation:
    one stream runs its kernels one after another, never nested."""
    rows, unknown = [], []
    for e in kineto_events:
        on_device = e.device_type() != torch.autograd.DeviceType.CPU
        flag = _annotation_flag(e) if on_device else False
        if flag:
            continue
        row = (e.name(), on_device, e.start_ns(), e.duration_ns())
        if flag is None:
            stream = e.device_resource_id() if hasattr(e, "device_resource_id") else 0
            unknown.append((row, stream))
        rows.append(row)
    nested = _spanning(unknown)
    return [r for r in rows if r not in nested]


def _spanning(events: list[tuple[tuple[str, bool, int, int], int]]) -> set:
    """The events that contain another event of the same stream (start to end), by a sweep over starts."""
    out = set()
    by_stream: dict[int, list] = {}
    for row, stream in events:
        by_stream.setdefault(stream, []).append(row)
    for rows in by_stream.values():
        rows.sort(key=lambda r: (r[2], -r[3]))  # by start; the longer first where two start together
        open_rows: list = []  # enclosing candidates, still running at the current start
        for r in rows:
            start, end = r[2], r[2] + r[3]
            open_rows = [o for o in open_rows if o[2] + o[3] > start]
            for o in open_rows:
                if o[2] + o[3] >= end:
                    out.add(o)
            open_rows.append(r)
    return out


def kernel_kind(name: str) -> str:
    """The KINDS entry a device event's name falls in; "other" (eager pointwise and reductions) when none."""
    low = name.lower()
    return next((kind for kind, words in KINDS if any(w in low for w in words)), "other")


def device_time(events: list[tuple[str, bool, int, int]], end: int, top: int = 12) -> dict:
    """Device seconds by kind, and the `top` kernels by total time: [name (cut at 90), ms, calls]; the
    same for the kernels of kind "other" alone, the bucket no name rule explains."""
    by_kind: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for name, dev, s, d in events:
        if dev and s < end:
            kind = kernel_kind(name)
            by_kind[kind] = by_kind.get(kind, 0.0) + d / 1e9
            acc = by_name.setdefault(name, [0.0, 0])
            acc[0] += d / 1e6
            acc[1] += 1
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])

    def rows(items) -> list[list]:
        return [[name[:90], round(ms, 3), int(n)] for name, (ms, n) in items[:top]]

    return {
        "device_s_by_kind": {k: round(v, 6) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": rows(ranked),
        "top_other_kernels": rows([kv for kv in ranked if kernel_kind(kv[0]) == "other"]),
    }


def summarize_events(events: list[tuple[str, bool, int, int]], wall_ns: int, end_ns: int | None = None) -> dict:
    """(name, on_device, start_ns, duration_ns) events -> launches, syncs and the GPU busy fraction.

    A synchronising call is counted by its runtime name (a plain `cudaMemcpy` blocks the host too),
    except those from `end_ns` on (the profiler's own closing synchronisation); busy is the union
    of device activity (kernels, copies) over the profiled wall time. `gpu_idle_gaps_ms` lists the
    longest stretches without device activity, from the first recorded event to `end_ns`, as
    [offset, length] in ms: they say whether the idle time sits between steps or inside one;
    `longest_gap_host_ops` what the host was running during the longest of them.
    """
    end = end_ns if end_ns is not None else max((s + d for _, _, s, d in events), default=0) + 1
    launches = sum(1 for name, dev, _, _ in events if not dev and name in LAUNCHES)
    syncs = sum(1 for name, dev, s, _ in events if not dev and name in SYNCS and s < end)
    device = [(s, s + d) for _, dev, s, d in events if dev]
    busy = _union_ns(device)
    first = min((s for _, _, s, _ in events), default=0)
    gaps = _largest_gaps(device, first, end)
    gap_ns = [round(x * 1e6) for x in gaps[0]] if gaps else [0, 0]
    return {
        "kernel_launches": launches,
        "host_syncs": syncs,
        "gpu_busy_s": busy / 1e9,
        "wall_s": wall_ns / 1e9,
        "gpu_busy_frac": busy / wall_ns if wall_ns > 0 else None,
        "gpu_idle_gaps_ms": gaps,
        "longest_gap_host_ops": _host_ops_during(events, first + gap_ns[0], first + gap_ns[0] + gap_ns[1])
        if gaps
        else [],
        **device_time(events, end),
    }


class StepProfiler:
    """Record step `step` (from when step `step - 1` is logged to when `step` is logged) and write it.

    From step 3 on the profiler starts a step earlier, in torch.profiler's warm-up phase: starting the
    tracer costs the host hundreds of milliseconds, which would otherwise show as the GPU idling at the
    start of the recorded step."""

    def __init__(self, out_dir: Path, step: int, rank: int, trace: bool = True) -> None:
        self.out_dir, self.step, self.rank, self.trace = out_dir, step, rank, trace
        self.prof: profile | None = None
        self._t0 = 0

    def on_step_logged(self, step: int) -> None:
        warm = self.step >= 3
        if step == self.step - 1 - warm:
            activities = [ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(ProfilerActivity.CUDA)
            plan = schedule(wait=0, warmup=1, active=1, repeat=1) if warm else None
            self.prof = profile(activities=activities, record_shapes=False, schedule=plan)
            self.prof.__enter__()
            self._t0 = time.perf_counter_ns()
        elif step == self.step - 1 and self.prof is not None:
            self.prof.step()  # warm-up over: record from here
            self._t0 = time.perf_counter_ns()
        elif step == self.step and self.prof is not None:
            with torch.profiler.record_function(END_MARK):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
            wall = time.perf_counter_ns() - self._t0
            if warm:
                self.prof.step()  # stops the trace: the recorded step's events are collected
            self.prof.__exit__(None, None, None)
            if self.rank == 0:
                self._write(wall)
            self.prof = None

    def _write(self, wall_ns: int) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        events = event_rows(self.prof.profiler.kineto_results.events())
        end = min((s for name, _, s, _ in events if name == END_MARK), default=None)
        summary = {"step": self.step, **summarize_events(events, wall_ns, end)}
        (self.out_dir / "summary.json").write_text(json.dumps(summary) + "\n")
        if self.trace:
            self.prof.export_chrome_trace(str(self.out_dir / f"trace_step{self.step}.json"))
            sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            table = self.prof.key_averages().table(sort_by=sort, row_limit=40)
            (self.out_dir / "ops.txt").write_text(table)
        logger.info("profile of step %d written to %s: %s", self.step, self.out_dir, summary)


class StepProbe:
    """Rank 0's per-step record for an outside benchmark; every rank joins the profiled step."""

    def __init__(self, out_dir: Path, last_step: int, rank: int, world: int) -> None:
        self.out_dir, self.rank, self.world = out_dir, rank, world
        self.profiler = StepProfiler(out_dir, last_step, rank, trace=False) if last_step > 1 else None
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if self.rank == 0:
            line = {"step": step, "t": time.time(), "world_size": self.world}
            line.update({k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("train/")})
            with open(self.out_dir / "steps.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
        if self.profiler is not None:
            self.profiler.on_step_logged(step)


def step_probe(trainer) -> StepProbe:
    """The `SFT_CALLBACKS` factory: a probe writing to the folder named by `SFT_STEP_PROBE`."""
    folder = os.environ.get(PROBE_ENV)
    if not folder:
        raise ValueError(
            f"SFT_CALLBACKS names {PROBE_FACTORY}, which needs {PROBE_ENV} set to a folder; set it or drop the entry"
        )
    return StepProbe(Path(folder), trainer.plan.total_steps, trainer.ctx.rank, trainer.ctx.world_size)
