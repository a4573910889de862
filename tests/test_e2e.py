"""End to end through the real command line: torchrun, 2 gloo processes, the demo data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import base_overrides
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft.cli import compose
from sft.data.batch import labels_from_loss_mask
from sft.data.build import build_dataset

ROOT = Path(__file__).resolve().parents[1]


def torchrun(nproc: int, overrides: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "sft.fsdp_sft_trainer", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_two_process_run_learns_and_exports(demo_dir, tmp_path):
    out = tmp_path / "run"
    overrides = base_overrides(demo_dir, out) + [
        f"data.val_files={demo_dir}/val.parquet",
        "data.train_batch_size=16",
        "data.micro_batch_size_per_gpu=4",
        "optim.lr=3e-3",
        "optim.lr_warmup_steps=2",
        "trainer.total_training_steps=24",
        "trainer.total_epochs=2",
        "trainer.test_freq=12",
        "trainer.save_freq=12",
        'trainer.logger=["console","file"]',
        'trainer.checkpoint.save_contents=["model","optimizer","extra","hf_model"]',
        "trainer.checkpoint.hf_dtype=fp32",
    ]
    r = torchrun(2, overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train/loss"] for m in records if "train/loss" in m]
    vals = [m["val/loss"] for m in records if "val/loss" in m]
    assert len(losses) == 24 and len(vals) == 2
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:2]) / 2, losses
    assert vals[1] < vals[0]
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "24"
    # The export loads with plain transformers and predicts like the trained model did: its token-mean
    # loss over the validation set equals the trainer's own final val/loss.
    hf = out / "global_step_24" / "huggingface"
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(hf)
    cfg = compose(overrides)
    val = build_dataset(f"{demo_dir}/val.parquet", tok, cfg.data, -1, pad_to_max_length=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(val)):
            item = val[i]
            labels = labels_from_loss_mask(item["input_ids"][None], item["loss_mask"][None])
            logits = model(item["input_ids"][None]).logits.float()
            total += float(F.cross_entropy(logits[0], labels[0], reduction="sum", ignore_index=-100))
            count += int((labels != -100).sum())
    assert total / count == pytest.approx(vals[1], rel=1e-5)


def test_verl_production_command_runs_on_two_cpu_processes(demo_dir, tmp_path, monkeypatch):
    """The foundation issue's production command (sp=2, remove-padding, bf16, wandb), one step."""
    import os

    from test_config import verl_production

    out = tmp_path / "prod"
    paths = [f"data.train_files={demo_dir}/train.parquet", f"model.partial_pretrain={demo_dir}/model"]
    drop = ("trainer.default_local_dir", "data.val_files")
    overrides = [o for o in verl_production(paths) if not o.startswith(drop)]
    overrides += [
        f"data.val_files={demo_dir}/val.parquet",
        f"trainer.default_local_dir={out}",
        "trainer.total_training_steps=1",
        "data.train_batch_size=32",
    ]
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    r = torchrun(2, overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dp=1 sp=2" in r.stderr
    hf = out / "global_step_1" / "huggingface"
    assert (hf / "model.safetensors").exists() and (out / "global_step_1" / "COMPLETE").exists()
    config = json.loads((hf / "config.json").read_text())
    assert "sft_varlen" not in json.dumps(config)  # the export loads with stock attention
    assert any(os.scandir(out / "wandb"))
