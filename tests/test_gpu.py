"""CUDA checks (NCCL, bf16 mixed precision); skipped on machines without a GPU."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import base_overrides
from test_e2e import torchrun

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("model_dtype", ["fp32", "bf16"])
def test_bf16_fsdp2_training_on_cuda(demo_dir, tmp_path, model_dtype):
    out = tmp_path / model_dtype
    overrides = base_overrides(demo_dir, out) + [
        "trainer.device=cuda",
        f"model.fsdp_config.model_dtype={model_dtype}",
        "model.enable_gradient_checkpointing=true",
        "data.train_batch_size=16",
        "data.micro_batch_size_per_gpu=4",
        "optim.lr=3e-3",
        "trainer.total_training_steps=20",
        "trainer.total_epochs=2",
        'trainer.logger=["console","file"]',
    ]
    r = torchrun(torch.cuda.device_count(), overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train/loss"] for m in records if "train/loss" in m]
    assert len(losses) == 20 and all(map(lambda x: x == x, losses))
    assert sum(losses[-3:]) / 3 < 0.85 * losses[0], losses
    assert all(m["train/peak_mem_gb"] > 0 for m in records if "train/loss" in m)
