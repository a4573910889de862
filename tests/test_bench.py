"""`python -m sft.bench` on CPU: the JSON contract, packed vs padded accounting, the synthetic
length distribution, and the optional TRL baseline's missing-package path."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest

from sft.bench import driver as bench
from sft.bench.assets import LENGTH_TARGETS, TRL_CHAT_TEMPLATE, synthetic_conversations
from sft.demo.assets import build_tokenizer

KEYS = {
    "shape", "device", "world_size", "steps", "tokens_per_s_per_gpu", "trained_tokens_per_s_per_gpu", "model_mfu",
    "useful_mfu", "peak_mem_gb", "padding_frac", "time_to_first_step_s", "step_time_s_median", "overrides",
}  # fmt: skip


@pytest.fixture
def fresh_world(monkeypatch):
    # A world of one on a free port, whatever launcher variables the test process inherited.
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)


def run_bench(args: list[str], capsys) -> dict:
    assert bench.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1])


def check_run(out: dict, mode: str) -> None:
    assert out["mode"] == mode and out["timed_steps"] == 3
    assert out["tokens_per_s_per_gpu"] > 0 and out["trained_tokens_per_s_per_gpu"] > 0
    assert out["trained_tokens_per_s_per_gpu"] < out["tokens_per_s_per_gpu"]
    assert out["model_mfu"] is None and out["useful_mfu"] is None and out["peak_mem_gb"] is None  # no CPU peak
    assert out["time_to_first_step_s"] > 0 and out["step_time_s_median"] > 0
    assert out["sample_lengths_match"]  # the recomputed step layout agrees with the trainer's token counts
    if mode == "packed":
        assert out["padding_frac"] == pytest.approx(0.0, abs=1e-9)
        # The benchmark sets no budget: the trainer chose it, as for any user (CPU: mb x max_length).
        assert not any(o.startswith("data.max_token_len_per_gpu") for o in out["overrides"])
        assert out["token_budget"] == 8 * 1024
    else:
        assert out["padding_frac"] > 0.2
        assert "use_remove_padding=false" in out["overrides"]
        assert "data.max_token_len_per_gpu=null" in out["overrides"]


def test_tiny_bench_packed_and_padded(tmp_path, capsys, fresh_world):
    # One process: packed (the default) first, then the padded baseline on the same data and global batch.
    args = ["--shape", "tiny", "--steps", "3", "--warmup", "0", "--baseline", "padded", "--workdir", str(tmp_path)]
    out = run_bench(args + ["--profile", str(tmp_path / "prof")], capsys)
    assert KEYS <= out.keys()
    assert out["shape"] == "tiny" and out["device"] == "cpu" and out["world_size"] == 1 and out["steps"] == 3
    assert out["timed_steps"] == 3  # the profiled 4th step is not one of the timed ones
    assert "aten::mm" in (tmp_path / "prof" / "ops.txt").read_text()
    assert (tmp_path / "prof" / "trace_step4.json").stat().st_size > 0
    check_run(out, "packed")
    (padded,) = out["baseline_runs"]
    assert KEYS - {"shape", "device", "world_size", "steps"} <= padded.keys()
    check_run(padded, "padded")
    assert padded["tokens_per_step"] == out["tokens_per_step"]  # same data, same global batch
    assert out["speedup_vs_baseline"] == pytest.approx(out["tokens_per_s_per_gpu"] / padded["tokens_per_s_per_gpu"])


def test_synthetic_lengths_follow_targets():
    tokenizer = build_tokenizer()
    rows, lengths = synthetic_conversations(1200, 0, tokenizer, max_length=8192)
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    n = np.array([len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]])
    assert (n == lengths).all()  # the generator hits its target lengths exactly
    for q, key in ((0.5, "median"), (0.9, "p90"), (0.99, "p99")):
        assert np.quantile(n, q) == pytest.approx(LENGTH_TARGETS[key], rel=0.15), key
    turns = [sum(m["role"] == "assistant" for m in r["messages"]) for r in rows]
    assert set(turns) == {1, 2, 3}
    words = lambda role: sum(len(m["content"].split()) for r in rows for m in r["messages"] if m["role"] == role)  # noqa: E731
    assert words("assistant") > 2 * words("user")  # assistant-heavy
    again, _ = synthetic_conversations(50, 0, tokenizer, max_length=8192)
    assert again == rows[:50]  # deterministic by seed
    capped, capped_len = synthetic_conversations(200, 0, tokenizer, max_length=1024)
    assert capped_len.max() == 1024


def test_trl_template_renders_like_the_demo():
    tokenizer = build_tokenizer()
    trl_tok = copy.deepcopy(tokenizer)
    trl_tok.chat_template = TRL_CHAT_TEMPLATE
    rows, _ = synthetic_conversations(20, 1, tokenizer, max_length=1024)
    for row in rows:
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        assert trl_tok.apply_chat_template(row["messages"], tokenize=False) == text
        enc = trl_tok.apply_chat_template(
            row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        replies = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert sum(enc["assistant_masks"]) == sum(len(r.split()) + 1 for r in replies)  # words + <|im_end|>


def test_trl_baseline_without_trl(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bench, "_trl_available", lambda: False)
    assert bench.main(["--shape", "tiny", "--baseline", "trl", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == bench.TRL_MISSING and "pip install trl datasets" in err
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_bench_owned_keys_are_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--shape", "tiny", "trainer.total_training_steps=7"])
    assert exc.value.code == 2
    assert "set by the benchmark" in capsys.readouterr().err


def test_user_micro_batch_keys_are_not_replaced():
    """`--shape qwen2.5-1.5b data.micro_batch_size_per_gpu=2` is timed with the user's keys and no budget of ours."""
    from pathlib import Path

    ov = bench.bench_overrides("qwen2.5-1.5b", ["data.micro_batch_size_per_gpu=2"], 5, 1, Path("/w"), Path("/p"))
    probe = bench.compose(ov)
    ov = bench.bench_overrides("qwen2.5-1.5b", ["data.micro_batch_size_per_gpu=2"], 5, 1, Path("/w"), Path("/p"), probe)
    assert "data.micro_batch_size_per_gpu=2" in ov
    assert not any(o.startswith("data.max_token_len_per_gpu") for o in ov)


def test_profile_summary_counts():
    from sft.bench.profiling import summarize_events

    ev = [
        ("cudaLaunchKernel", False, 0, 5),
        ("cudaLaunchKernel", False, 10, 5),
        ("cudaStreamSynchronize", False, 20, 30),
        ("gemm", True, 5, 20),
        ("gemm", True, 15, 20),  # overlaps the first: counted once
        ("cudaDeviceSynchronize", False, 90, 5),  # the profiler's own closing sync
    ]
    s = summarize_events(ev, wall_ns=100, end_ns=90)
    assert s["kernel_launches"] == 2 and s["host_syncs"] == 1
    assert s["gpu_busy_frac"] == pytest.approx(0.30)
    # Device busy 5..35 in the window 0..90: idle 35..90 (55 ns) and 0..5 (5 ns), longest first, in ms.
    assert s["gpu_idle_gaps_ms"] == [[35e-6, 55e-6], [0.0, 5e-6]]
    # During the longest gap (35..90) the host ran the synchronising call 20..50 (15 ns of it) and the
    # profiler's closing sync 90..95 (none of it): only the first is listed.
    assert s["longest_gap_host_ops"] == [["cudaStreamSynchronize", 15e-6]]
    assert list(s["device_s_by_kind"]) == ["gemm"]


def _kineto_event(name, device, start, dur, **attrs):
    """A stand-in for torch's kineto event: each attribute a method, as torch has them."""
    from types import SimpleNamespace

    import torch

    dt = torch.autograd.DeviceType.CUDA if device else torch.autograd.DeviceType.CPU
    fields = dict(name=name, device_type=dt, start_ns=start, duration_ns=dur, **attrs)
    return SimpleNamespace(**{k: (lambda v=v: v) for k, v in fields.items()})


def test_event_rows_drop_device_mirrors_of_host_ranges():
    """A record_function's device-side annotation is not device work; an inductor kernel whose launch is a
    host range of the same name is."""
    from sft.bench.profiling import event_rows

    def ev(name, device, kind, start, dur):
        return _kineto_event(name, device, start, dur, activity_type=kind)

    rows = event_rows(
        [
            ev("ProfilerStep#1", False, "user_annotation", 0, 90),
            ev("ProfilerStep#1", True, "gpu_user_annotation", 5, 85),
            ev("triton_red_fused_logsumexp_0", False, "user_annotation", 10, 2),
            ev("triton_red_fused_logsumexp_0", True, "kernel", 12, 20),
        ]
    )
    assert rows == [
        ("ProfilerStep#1", False, 0, 90),
        ("triton_red_fused_logsumexp_0", False, 10, 2),
        ("triton_red_fused_logsumexp_0", True, 12, 20),
    ]


def test_event_rows_find_annotations_where_events_cannot_say_their_kind():
    """torch 2.11's kineto events have no activity type: an event spanning another on its stream is an
    annotation; kernels one after another on a stream, or overlapping on two streams, are kept."""
    from sft.bench.profiling import event_rows

    def ev(name, device, start, dur, stream=7):
        return _kineto_event(name, device, start, dur, device_resource_id=stream)

    rows = event_rows(
        [
            ev("ProfilerStep#1", False, 0, 100),
            ev("ProfilerStep#1", True, 5, 90),  # spans the two kernels below: dropped
            ev("gemm", True, 10, 20),
            ev("FSDP::all_gather", True, 30, 10),  # spans the copy: dropped
            ev("copy", True, 30, 10),
            ev("nccl", True, 20, 60, stream=9),  # overlaps stream 7's kernels, contains none of its own: kept
        ]
    )
    assert rows == [
        ("ProfilerStep#1", False, 0, 100),
        ("gemm", True, 10, 20),
        ("copy", True, 30, 10),
        ("nccl", True, 20, 60),
    ]


def test_command_mode_times_the_real_trainer(demo_dir, tmp_path, capsys, fresh_world):
    from conftest import base_overrides

    keys = base_overrides(demo_dir, tmp_path / "ck") + [
        "use_remove_padding=true",
        "data.train_batch_size=8",
        "data.micro_batch_size_per_gpu=2",
        "trainer.total_training_steps=4",
    ]
    cmd = "python3 -m sft.fsdp_sft_trainer " + " ".join(keys)
    out = run_bench(["--command", cmd, "--warmup", "1", "--log", str(tmp_path / "log")], capsys)
    assert out["exit_status"] == 0 and out["command"] == cmd
    assert out["timed_steps"] == 2  # steps 2 and 3: step 1 warms up, step 4 is profiled
    assert out["tokens_per_s_per_gpu"] > out["trained_tokens_per_s_per_gpu"] > 0
    assert out["profiled_step"] == 4 and out["kernel_launches_per_step"] == 0  # CPU: no kernels
    assert len(out["losses"]) == 4
    assert "micro-batches packed up to 512 tokens per GPU" in (tmp_path / "log").read_text()


def test_command_mode_refuses_other_programs(capsys):
    assert bench.main(["--command", "python3 -m something_else"]) == 2
    assert "-m sft.fsdp_sft_trainer" in capsys.readouterr().err


def test_step_profiler_records_only_the_profiled_step(tmp_path):
    """From step 3 the profiler warms up during the step before: the summary covers the profiled step only."""
    import json

    import torch

    from sft.bench.profiling import StepProfiler

    prof = StepProfiler(tmp_path, step=4, rank=0, trace=False)
    for step in range(1, 6):
        with torch.profiler.record_function(f"work_{step}"):
            torch.ones(64, 64) @ torch.ones(64, 64)
        prof.on_step_logged(step)
        assert (prof.prof is not None) == (step in (2, 3))  # started a step early, in its warm-up phase
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 4
    host_ops = {name for name, _ in summary["longest_gap_host_ops"]}  # no device: the whole step is a gap
    assert "work_4" in host_ops and "work_3" not in host_ops and "work_5" not in host_ops


def test_device_time_by_kind():
    from sft.bench.profiling import device_time

    ev = [
        ("sm90_xmma_gemm_bf16bf16_bf16f32", True, 0, 3_000_000),
        ("nvjet_tst_128x256", True, 5, 1_000_000),
        (
            "void gemv2T_kernel_val<int, int, __nv_bfloat16, float>",
            True,
            6,
            500_000,
        ),  # bias gradients (sft/ops/qkv_proj.py)
        ("pytorch_flash::flash_fwd_kernel", True, 10, 2_000_000),
        ("triton_red_fused_logsumexp_0", True, 20, 500_000),
        ("void at::native::vectorized_elementwise_kernel", True, 30, 250_000),
        ("_swiglu_backward_kernel", True, 35, 200_000),  # Liger's names do not say "triton"
        ("_rms_norm_forward_kernel", True, 36, 100_000),
        ("_sft_rms_norm_backward", True, 37, 60_000),  # sft's own Triton kernel: not Liger's
        # PyTorch's fused RMSNorm forward: its own kind, not Liger's
        (
            "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float, true>",
            True,
            38,
            30_000,
        ),
        ("Memcpy HtoD (Pinned -> Device)", True, 40, 100_000),
        ("cudaLaunchKernel", False, 0, 9_000_000),  # host time is not device time
        ("late_gemm", True, 100, 7_000_000),  # after the end mark: not counted
    ]
    out = device_time(ev, end=50, top=2)
    assert out["device_s_by_kind"] == {
        "gemm": 0.0045,
        "attention": 0.002,
        "triton": 0.0005,
        "liger": 0.0003,
        "other": 0.00025,
        "sft": 0.00006,
        "norm": 0.00003,
        "copy": 0.0001,
    }
    assert out["top_kernels"] == [
        ["sm90_xmma_gemm_bf16bf16_bf16f32", 3.0, 1],
        ["pytorch_flash::flash_fwd_kernel", 2.0, 1],
    ]
    # The bucket no rule names, listed apart: its kernels rarely reach the overall top.
    assert out["top_other_kernels"] == [["void at::native::vectorized_elementwise_kernel", 0.25, 1]]


def test_a_stopped_benchmark_stops_the_command_it_runs(tmp_path):
    """A time limit's SIGTERM to `sft.bench --command` must not leave the training run on the GPU."""
    import os
    import signal
    import subprocess
    import sys
    import time

    marker = tmp_path / "child.pid"
    child = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    runner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, subprocess, sys; from sft.bench.command import _run_to_the_end; "
            f"_run_to_the_end([sys.executable, '-c', {child!r}], dict(os.environ), None, None)",
        ]
    )
    deadline = time.time() + 60
    while not (marker.exists() and marker.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    pid = int(marker.read_text())
    runner.send_signal(signal.SIGTERM)
    runner.wait(timeout=60)
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):  # terminated and reaped by the runner
        os.kill(pid, 0)


def test_command_mode_loads_the_probe_as_a_callback(monkeypatch, tmp_path):
    """The benchmark reaches the user's command through SFT_CALLBACKS only: the user's own entries stay first."""
    from sft.bench.command import probe_callbacks
    from sft.bench.profiling import PROBE_ENV, PROBE_FACTORY, StepProbe
    from sft.loop.callbacks import callback_factories, make_callbacks

    assert probe_callbacks(None) == PROBE_FACTORY
    assert probe_callbacks("mine:make") == f"mine:make,{PROBE_FACTORY}"
    trainer = SimpleNamespace(plan=SimpleNamespace(total_steps=1), ctx=SimpleNamespace(rank=0, world_size=1))
    monkeypatch.delenv(PROBE_ENV, raising=False)
    with pytest.raises(ValueError, match=PROBE_ENV):
        make_callbacks(callback_factories(PROBE_FACTORY), trainer)
    monkeypatch.setenv(PROBE_ENV, str(tmp_path / "probe"))
    (probe,) = make_callbacks(callback_factories(PROBE_FACTORY), trainer)
    assert isinstance(probe, StepProbe)
    probe.on_step_end(1, {"train/loss": 2.0, "val/loss": 3.0})
    line = json.loads((tmp_path / "probe" / "steps.jsonl").read_text())
    assert line["step"] == 1 and line["loss"] == 2.0 and "val/loss" not in line and line["world_size"] == 1


def test_command_accepts_both_entry_points():
    """verl's two layouts run the same trainer: `--command` times either entry point, and refuses anything else."""
    from sft.bench.command import check_command

    for module in ("sft.fsdp_sft_trainer", "sft.sft_trainer"):
        assert check_command(f"torchrun --nproc_per_node=1 -m {module} a=b")[-2:] == [module, "a=b"]
    with pytest.raises(ValueError, match="must run the trainer"):
        check_command("python train.py a=b")
