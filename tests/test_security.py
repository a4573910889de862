"""A checkpoint folder runs no code when loaded: planted pickles (extra state, DCP metadata, DCP byte
entries) never execute on resume or in sft.merge; old-format `.pt` extra state resumes exactly or is
refused with the converter's command; the converter's output resumes exactly; RNG states are bitwise."""

from __future__ import annotations

import json
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import base_overrides
from safetensors.torch import load_file
from test_e2e import ROOT, torchrun
from torch.distributed.checkpoint.api import CheckpointException

from sft.checkpoint.manager import _refusal, extra_state
from sft.checkpoint.safe_dcp import UnsafeFileError, load_metadata, safe_load
from sft.merge import main as merge_main


class Planted:
    """Unpickling this creates `path` (standing in for any code an attacker would run)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant_pt(file: Path, marker: Path) -> None:
    torch.save({"train_state": {"global_step": 2}, "payload": Planted(marker)}, file)


def test_planted_pickles_would_run_if_unpickled(tmp_path):
    """Control: the planted files really execute under plain unpickling (so the tests below can fail)."""
    marker = tmp_path / "ran"
    plant_pt(tmp_path / "x.pt", marker)
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()


def test_rng_states_round_trip_bitwise(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # cached Gaussians are part of the state
    extra_state.write(tmp_path, 0, {"train_state": {"global_step": 7}, "world_size": 1})
    ref = (random.random(), random.gauss(0, 1), np.random.standard_normal(), np.random.rand(3), torch.rand(4))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    got = extra_state.read(tmp_path, 0)
    assert got["train_state"] == {"global_step": 7}
    extra_state.set_rng_state(got["rng"])
    now = (random.random(), random.gauss(0, 1), np.random.standard_normal(), np.random.rand(3), torch.rand(4))
    assert ref[:3] == now[:3] and np.array_equal(ref[3], now[3]) and torch.equal(ref[4], now[4])
    assert not list(tmp_path.glob("*.pt"))


def test_dcp_metadata_and_byte_entries_are_never_unpickled(tmp_path):
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "ran"
    state = {"w": torch.arange(4.0), "lr": 0.5}
    dcp.save(state, checkpoint_id=str(tmp_path / "ok"), no_dist=True)
    into = {"w": torch.zeros(4), "lr": 0.0}
    safe_load(into, tmp_path / "ok", no_dist=True)
    assert torch.equal(into["w"], state["w"]) and into["lr"] == 0.5
    shutil.copytree(tmp_path / "ok", tmp_path / "bad")
    (tmp_path / "bad" / ".metadata").write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(UnsafeFileError, match=r"\.metadata: refers to io\.open"):
        load_metadata(tmp_path / "bad" / ".metadata")
    # A byte entry (optimizer hyper-parameters are saved as such) replaced by a planted pickle.
    shutil.copytree(tmp_path / "ok", tmp_path / "bytes")
    meta = load_metadata(tmp_path / "ok" / ".metadata")
    info = next(v for k, v in meta.storage_data.items() if k.fqn == "lr")
    data = (tmp_path / "bytes" / info.relative_path).read_bytes()
    buf = __import__("io").BytesIO()
    torch.save(Planted(marker), buf)
    evil = buf.getvalue()
    (tmp_path / "bytes" / info.relative_path).write_bytes(
        data[: info.offset] + evil + data[info.offset + info.length :]
    )
    meta.storage_data[next(k for k in meta.storage_data if k.fqn == "lr")].length = len(evil)
    (tmp_path / "bytes" / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(CheckpointException) as refused:  # DCP wraps the planner's error (a BaseException)
        safe_load({"w": torch.zeros(4), "lr": 0.0}, tmp_path / "bytes", no_dist=True)
    assert (
        _refusal(refused.value) == "refused to load checkpoint: DCP entry lr: not plain data (pickle refers to io.open)"
    )
    assert not marker.exists()


# ----- the trainer and the tools on a real checkpoint -----
def overrides(demo: Path, out: Path) -> list[str]:
    return base_overrides(demo, out) + [
        "data.train_max_samples=16",
        "data.train_batch_size=8",
        "data.micro_batch_size_per_gpu=4",
        "trainer.total_training_steps=4",
        "trainer.total_epochs=2",
        "trainer.save_freq=2",
        "trainer.resume_mode=auto",
        'trainer.checkpoint.save_contents=["model","optimizer","extra","hf_model"]',
        "trainer.checkpoint.hf_dtype=fp32",
    ]


@pytest.fixture(scope="module")
def trained(demo_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sec") / "run"
    r = torchrun(1, overrides(demo_dir, out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def at_step_2(trained: Path, out: Path) -> Path:
    """A copy of the run as it was after step 2 (the step-4 checkpoint removed)."""
    shutil.copytree(trained, out)
    shutil.rmtree(out / "global_step_4")
    (out / "latest_checkpointed_iteration.txt").write_text("2")
    return out / "global_step_2"


def to_legacy(step_dir: Path) -> None:
    """Rewrite the extra state the way the previous version did: torch.save of a dict with live RNG states."""
    extra = extra_state.read_new(step_dir, 0)
    torch.save(extra, step_dir / "extra_state_rank_0.pt")
    (step_dir / extra_state.json_name(0)).unlink()
    (step_dir / extra_state.rng_name(0)).unlink()


def assert_final_equal(trained: Path, out: Path) -> None:
    a = load_file(str(trained / "global_step_4" / "huggingface" / "model.safetensors"))
    b = load_file(str(out / "global_step_4" / "huggingface" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_planted_pt_beside_the_json_is_ignored_and_resume_is_exact(trained, demo_dir, tmp_path):
    marker = tmp_path / "ran"
    step2 = at_step_2(trained, tmp_path / "run")
    plant_pt(step2 / "extra_state_rank_0.pt", marker)
    r = torchrun(1, overrides(demo_dir, tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"ignoring {step2}/extra_state_rank_0.pt" in r.stderr
    assert not marker.exists()
    assert_final_equal(trained, tmp_path / "run")


@pytest.mark.parametrize("mode", ["auto", "resume_path"])
def test_planted_old_format_extra_state_is_refused(trained, demo_dir, tmp_path, mode):
    marker = tmp_path / "ran"
    step2 = at_step_2(trained, tmp_path / "run")
    to_legacy(step2)
    plant_pt(step2 / "extra_state_rank_0.pt", marker)
    ov = overrides(demo_dir, tmp_path / "run") + [f"trainer.resume_mode={mode}", f"trainer.resume_from_path={step2}"]
    r = torchrun(1, ov)
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if x.startswith("sft: error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    assert f"refused to load checkpoint: {step2}/extra_state_rank_0.pt: old-format extra state" in lines[0]
    assert (
        "(pickle refers to io.open)" in lines[0]
        and f"python -m sft.convert_checkpoint {step2} --trust-pickle" in lines[0]
    )
    assert not marker.exists()
    assert (step2 / "COMPLETE").exists()  # a refusal is not damage: the folder is left as it was


def test_planted_dcp_metadata_is_refused_on_resume_and_in_merge(trained, demo_dir, tmp_path, capsys):
    marker = tmp_path / "ran"
    step2 = at_step_2(trained, tmp_path / "run")
    (step2 / "dcp" / ".metadata").write_bytes(pickle.dumps(Planted(marker)))
    r = torchrun(1, overrides(demo_dir, tmp_path / "run"))
    assert r.returncode != 0
    assert f"refused to load checkpoint: {step2}/dcp/.metadata: refers to io.open" in r.stderr, r.stderr[-3000:]
    assert merge_main([str(step2), str(tmp_path / "merged")]) == 2
    assert "sft.merge: error:" in capsys.readouterr().err
    assert not marker.exists() and (step2 / "COMPLETE").exists()


def test_old_format_resumes_exactly_and_converts(trained, demo_dir, tmp_path):
    old = at_step_2(trained, tmp_path / "old")
    to_legacy(old)
    r = torchrun(1, overrides(demo_dir, tmp_path / "old"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "old-format extra state, read with weights_only=True" in r.stderr
    assert_final_equal(trained, tmp_path / "old")

    conv = at_step_2(trained, tmp_path / "conv")
    to_legacy(conv)
    before = (conv / "extra_state_rank_0.pt").read_bytes()
    cmd = [sys.executable, "-m", "sft.convert_checkpoint", str(tmp_path / "conv")]
    c = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert c.returncode == 0, c.stderr
    assert f"converted {conv}/extra_state_rank_0.pt" in c.stdout
    assert (conv / "extra_state_rank_0.pt").read_bytes() == before  # the user's file is kept as it was
    assert json.loads((conv / "extra_state_rank_0.json").read_text())["train_state"]["global_step"] == 2
    r = torchrun(1, overrides(demo_dir, tmp_path / "conv"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "old-format" not in r.stderr
    assert_final_equal(trained, tmp_path / "conv")


def test_converter_refuses_a_planted_pickle_without_trust(tmp_path):
    marker = tmp_path / "ran"
    step = tmp_path / "global_step_2"
    step.mkdir()
    plant_pt(step / "extra_state_rank_0.pt", marker)
    cmd = [sys.executable, "-m", "sft.convert_checkpoint", str(step)]
    c = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert c.returncode == 2 and c.stderr.startswith("sft.convert_checkpoint: error:"), c.stderr
    assert "--trust-pickle" in c.stderr and not marker.exists()
    assert not (step / "extra_state_rank_0.json").exists()
