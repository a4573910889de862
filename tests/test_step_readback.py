"""The step's one read-back (sft/loop/readback.py): the counts vector built from the host, its entries
by name, and exactly one `.tolist()` per training step of the real trainer."""

from __future__ import annotations

import dataclasses
import traceback

import pytest
import torch
from conftest import base_overrides
from test_micro_batch import _items

from sft.data.loader import MicroBatchBuilder
from sft.loop.readback import StepReadback


def test_counts_by_name():
    build = MicroBatchBuilder(_items([3, 5, 2]), packed=True, pad_id=0, sp_rank=0, sp_size=1)
    mbs = [build([0, 1]), build([2]), build([])]
    counts = StepReadback.host_counts(mbs, preempt=True, useful_flops=7.0)
    assert counts.dtype == torch.float64 and counts.tolist() == [6.0 + 1.0 + 0.0, 10.0, 10.0 + 1.0, 1.0, 7.0]
    r = StepReadback.read(torch.tensor([3.5, 4.0], dtype=torch.float64), torch.tensor(0.25), counts)
    assert dataclasses.astuple(r) == (3.5, 4.0, 0.25, 7.0, 10.0, 11.0, 1.0, 7.0)
    assert (r.loss_sum, r.correct, r.grad_norm) == (3.5, 4.0, 0.25)
    assert (r.targets, r.real_tokens, r.slots, r.preempt, r.useful_flops) == (7.0, 10.0, 11.0, 1.0, 7.0)
    assert r.loss == pytest.approx(0.5)
    assert StepReadback.host_counts(mbs, preempt=False, useful_flops=0.0)[3] == 0.0


@pytest.mark.parametrize("packed", ["false", "true"])
def test_one_read_back_per_step(demo_dir, tmp_path, single_rank, monkeypatch, packed):
    """train_step reads the device back once, useful-FLOPs count included (on CPU it is off by default:
    a known peak turns it on here)."""
    from sft.config.schema import load_config
    from sft.trainer import FSDPSFTTrainer

    overrides = base_overrides(demo_dir, tmp_path) + [
        f"use_remove_padding={packed}",
        "data.train_batch_size=8",
        "data.micro_batch_size_per_gpu=2",
        "trainer.total_training_steps=1",
    ]
    trainer = FSDPSFTTrainer(load_config(overrides), single_rank("cpu"))
    trainer.peak_flops = 1e15
    batch = trainer.sampler.epoch_order(0)[:8].tolist()
    mbs = [trainer._builder(trainer.train_ds)(mb) for mb in trainer.sampler.micro_batches(batch)]
    assert len(mbs) > 1
    calls = []
    tolist = torch.Tensor.tolist

    def counted(t: torch.Tensor) -> list:
        # The CPU-only per-segment attention reference reads its bounds (CUDA runs the varlen kernels).
        if not any(f.name == "_reference_varlen" for f in traceback.extract_stack()):
            calls.append(t.shape)
        return tolist(t)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    metrics = trainer.train_step(mbs)
    monkeypatch.undo()
    assert calls == [torch.Size([8])]  # [loss sum, hits, grad norm, targets, tokens, slots, preempt, flops]
    lengths = [int(trainer.train_ds.lengths[i]) for i in batch]
    assert metrics["train/total_tokens"] == sum(lengths)
    assert metrics["train/trained_tokens"] == sum(mb.targets for mb in mbs)
    from sft.loop.flops import useful_flops

    assert metrics["train/useful_flops"] == pytest.approx(useful_flops(trainer.hf_config, lengths))
