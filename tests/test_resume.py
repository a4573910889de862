"""Exact resume: a run interrupted by SIGTERM (preemption) and by SIGKILL, relaunched with the
same command, gives the same per-step losses and bitwise-identical final weights as an
uninterrupted run (CPU); a checkpoint written by 2 processes resumes on 1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import base_overrides
from distributed_helper import run_ranks
from safetensors.torch import load_file
from test_e2e import ROOT, torchrun
from workers import die_during_save

STEPS = 8


def overrides(demo: Path, out: Path) -> list[str]:
    return base_overrides(demo, out) + [
        "data.train_max_samples=40",  # 5 steps per epoch: the run crosses an epoch boundary
        "data.train_batch_size=8",
        "data.micro_batch_size_per_gpu=2",
        f"trainer.total_training_steps={STEPS}",
        "trainer.total_epochs=2",
        "trainer.save_freq=2",
        "trainer.resume_mode=auto",
        'trainer.logger=["file"]',
        'trainer.checkpoint.save_contents=["model","optimizer","extra","hf_model"]',
        "trainer.checkpoint.hf_dtype=fp32",
    ]


def losses(out: Path) -> dict[int, float]:
    """Last logged loss per step (a step re-run after a kill is logged twice)."""
    by_step = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/loss" in rec:
            by_step[rec["step"]] = rec["train/loss"]
    return by_step


def logged_steps(out: Path) -> int:
    f = out / "metrics.jsonl"
    return sum('"train/loss"' in x for x in f.read_text().splitlines()) if f.exists() else 0


def launch_and_signal(ov: list[str], out: Path, after_steps: int, sig: int) -> int:
    """Start a 2-process run and send `sig` to the whole launch once `after_steps` are logged."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.Popen(
        [*cmd, "-m", "sft.fsdp_sft_trainer", *ov],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while logged_steps(out) < after_steps and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank, at once
    else:
        proc.send_signal(sig)  # torchrun forwards it to the ranks
    return proc.wait(timeout=120)


@pytest.fixture(scope="module")
def uninterrupted(demo_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    r = torchrun(2, overrides(demo_dir, out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"global_step_{STEPS}" / "huggingface" / "model.safetensors"))


def test_sigterm_then_sigkill_resume_is_exact(uninterrupted, demo_dir, tmp_path):
    out = tmp_path / "run"
    ov = overrides(demo_dir, out)
    rc = launch_and_signal(ov, out, after_steps=3, sig=signal.SIGTERM)
    assert rc != 0
    # Preemption saved the step it was at, although 3 is not a multiple of save_freq.
    saved = int((out / "latest_checkpointed_iteration.txt").read_text())
    assert saved >= 3 and (out / f"global_step_{saved}" / "COMPLETE").exists()
    rc = launch_and_signal(ov, out, after_steps=6, sig=signal.SIGKILL)
    assert rc != 0
    r = torchrun(2, ov)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    ref, got = losses(uninterrupted), losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    # The logged loss is a float32 sum whose vectorised reduction order can follow buffer
    # alignment (last-bit differences); the training state itself is compared bitwise below.
    assert got == pytest.approx(ref, rel=1e-6)
    a, b = final_weights(uninterrupted), final_weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_reshard_2_to_1_to_2_with_sequence_parallelism(uninterrupted, demo_dir, tmp_path):
    """A 2-process checkpoint (step 4) resumes on 1 process; that run's checkpoint (step 6) resumes
    on 2 processes as dp=1 x sp=2 with packed rows. The position is (epoch, step) in global
    batches, which do not depend on the process count, so the run continues unchanged."""
    one, two = tmp_path / "one", tmp_path / "two"
    ov = overrides(demo_dir, one) + ["trainer.resume_mode=resume_path"]
    r = torchrun(1, ov + [f"trainer.resume_from_path={uninterrupted}/global_step_4"])
    assert r.returncode == 0, r.stderr[-3000:]
    ov = overrides(demo_dir, two) + ["trainer.resume_mode=resume_path", "use_remove_padding=true"]
    ov += ["ulysses_sequence_parallel_size=2", f"trainer.resume_from_path={one}/global_step_6"]
    r = torchrun(2, ov)
    assert r.returncode == 0, r.stderr[-3000:]
    ref, got_one, got_two = losses(uninterrupted), losses(one), losses(two)
    assert sorted(got_one) == list(range(5, STEPS + 1)) and sorted(got_two) == [7, 8]
    for step, value in [*got_one.items(), *got_two.items()]:
        assert value == pytest.approx(ref[step], rel=1e-5), step
    for out in (one, two):
        a, b = final_weights(uninterrupted), final_weights(out)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=5e-5)


def test_rank_death_during_a_save_leaves_the_previous_checkpoint(uninterrupted, demo_dir, tmp_path):
    """Every rank dies half way through saving step 6: the folder stays incomplete, the tracker
    keeps 4, and relaunching the same command resumes from 4 and ends bitwise equal."""
    out = tmp_path / "run"
    ov = overrides(demo_dir, out)
    with pytest.raises(Exception, match="exit"):
        run_ranks(die_during_save, 2, ov, 6)
    assert (out / "global_step_6" / "dcp").exists() and not (out / "global_step_6" / "COMPLETE").exists()
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "4"
    r = torchrun(2, ov)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {out}/global_step_4" in r.stderr
    assert losses(out) == pytest.approx(losses(uninterrupted), rel=1e-6)
    a, b = final_weights(uninterrupted), final_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_incomplete_checkpoint_is_ignored_and_retention_counts_disk(uninterrupted, demo_dir, tmp_path):
    """A folder without COMPLETE (a save killed half way) is never resumed from; retention counts
    the checkpoints of earlier launches and keeps the one resumed from."""
    import shutil

    out = tmp_path / "ret"
    shutil.copytree(uninterrupted, out)
    (out / "metrics.jsonl").unlink()
    for s in (6, 8):
        shutil.rmtree(out / f"global_step_{s}")
    (out / "global_step_6").mkdir()  # half-written: no COMPLETE marker
    (out / "latest_checkpointed_iteration.txt").write_text("4")
    ov = overrides(demo_dir, out) + ["trainer.max_ckpt_to_keep=2"]
    r = torchrun(2, ov)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {out}/global_step_4" in r.stderr
    assert sorted(losses(out)) == [5, 6, 7, 8]
    kept = sorted(p.name for p in out.glob("global_step_*"))
    assert kept == ["global_step_4", "global_step_6", "global_step_8"]  # 4: resumed from
    assert all((out / k / "COMPLETE").exists() for k in kept)
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "8"
