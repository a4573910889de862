"""Functions that run inside spawned ranks (importable by the children, unlike test modules)."""

from __future__ import annotations

import json
import os

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from sft.config.checks import validate_config
from sft.config.schema import load_config
from sft.parallel.distributed import WorldInfo, init_distributed, teardown
from sft.trainer import FSDPSFTTrainer


def train_and_dump(overrides: list[str], out_file: str) -> None:
    """Train with the real trainer, then rank 0 saves the full fp32 weights and per-step metrics."""
    cfg = load_config(overrides)
    validate_config(cfg, WorldInfo.from_env())
    ctx = init_distributed("cpu", cfg.ulysses_sequence_parallel_size)
    try:
        trainer = FSDPSFTTrainer(cfg, ctx)
        logged: list[dict] = []
        original = trainer.metrics.log

        def capture(metrics: dict, step: int) -> None:
            logged.append({"step": step, **metrics})
            original(metrics, step)

        trainer.metrics.log = capture
        trainer.fit()
        sd = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if ctx.rank == 0:
            torch.save({"weights": sd, "metrics": logged}, out_file)
    finally:
        teardown()


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def die_during_save(overrides: list[str], kill_step: int) -> None:
    """Train like the real command, but every rank dies abruptly in the middle of saving
    `kill_step` (after the sharded state is written, before the checkpoint is complete)."""
    import sft.checkpoint.manager as ck

    original = ck.FSDPCheckpointManager._export_hf

    def dying(self, out, *args, **kwargs):
        if out.parent.name == f"global_step_{kill_step}":
            os._exit(9)
        return original(self, out, *args, **kwargs)

    ck.FSDPCheckpointManager._export_hf = dying
    cfg = load_config(overrides)
    ctx = init_distributed("cpu", cfg.ulysses_sequence_parallel_size)
    FSDPSFTTrainer(cfg, ctx).fit()


def build_sharded(override_sets: list[list[str]], out_file: str) -> None:
    """For each config, every rank tokenizes its share of the batches; rank 0 saves what each rank
    ended with (the exchanged arrays, or the error message)."""
    import torch.distributed as dist

    from sft.data.build import build_dataset
    from sft.data.storage import TokenizeShard
    from sft.models.loading import load_tokenizer

    ctx = init_distributed("cpu", 1)
    try:
        shard = TokenizeShard(ctx.rank, ctx.world_size, ctx.world_group)
        saved = []
        for overrides in override_sets:
            cfg = load_config(overrides)
            try:
                ds = build_dataset(cfg.data.train_files, load_tokenizer(cfg), cfg.data, -1, False, shard=shard)
                result = {k: getattr(ds, k) for k in ("input_ids", "loss_mask", "lengths", "rows", "num_dropped")}
            except ValueError as e:
                result = {"error": str(e)}
            results = [None] * ctx.world_size
            dist.all_gather_object(results, result)
            saved.append(results)
        if ctx.rank == 0:
            torch.save(saved, out_file)
    finally:
        teardown()


def nan_at_step(overrides: list[str], bad_step: int, result_file: str) -> None:
    """The real CLI path, with the loss turned to NaN at `bad_step`; saves the exit code and stderr."""
    import contextlib
    import io

    import sft.trainer as trainer_module
    from sft.cli import run_cli

    original = trainer_module.FSDPSFTTrainer._forward
    calls = {"n": 0}

    def forward(self, mb):
        loss, n, correct = original(self, mb)
        if self.state.global_step + 1 == bad_step:
            loss = loss * float("nan")
        calls["n"] += 1
        return loss, n, correct

    step_fn, seen = trainer_module.FSDPSFTTrainer.train_step, {}

    def train_step(self, micro_batches):
        """At the bad step: are the weights and AdamW's state after it those before it (the update skipped)?"""
        if self.state.global_step + 1 != bad_step:
            return step_fn(self, micro_batches)

        def snapshot():
            params = [p.full_tensor().clone() for p in self.model.parameters()]
            state = [v.full_tensor().clone() if hasattr(v, "full_tensor") else v.clone()
                     for s in self.optimizer.state.values() for v in s.values()]  # fmt: skip
            return params + state

        before = snapshot()
        try:
            return step_fn(self, micro_batches)
        finally:
            seen["unchanged"] = len(before) > 0 and all(torch.equal(a, b) for a, b in zip(before, snapshot()))

    trainer_module.FSDPSFTTrainer._forward = forward
    trainer_module.FSDPSFTTrainer.train_step = train_step
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_cli(overrides, lambda cfg, ctx: trainer_module.FSDPSFTTrainer(cfg, ctx).fit())
    if int(os.environ["RANK"]) == 0:
        torch.save({"code": code, "stderr": err.getvalue(), "unchanged": seen.get("unchanged")}, result_file)


class RecordingCallback:
    """A step callback that keeps a copy of each step's metrics."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, dict]] = []

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        self.seen.append((step, dict(metrics)))


def recording_callback(trainer) -> RecordingCallback:
    """An `SFT_CALLBACKS` factory (tests/test_callbacks.py)."""
    assert isinstance(trainer, FSDPSFTTrainer)
    return RecordingCallback()


def no_callback(trainer) -> None:
    """An `SFT_CALLBACKS` factory with nothing to add on this run."""
    return None


def train_with_callbacks(overrides: list[str], out_prefix: str) -> None:
    """Train with a callback given to the constructor, one added after, and one named in SFT_CALLBACKS;
    every rank saves what each saw and what its metrics logger was given."""
    os.environ["SFT_CALLBACKS"] = "workers:recording_callback, workers:no_callback"
    cfg = load_config(overrides)
    ctx = init_distributed("cpu", cfg.ulysses_sequence_parallel_size)
    try:
        given, added = RecordingCallback(), RecordingCallback()
        trainer = FSDPSFTTrainer(cfg, ctx, callbacks=[given])
        trainer.add_callback(added)
        logged: list[tuple[int, dict]] = []
        original = trainer.metrics.log

        def capture(metrics: dict, step: int) -> None:
            logged.append((step, dict(metrics)))
            original(metrics, step)

        trainer.metrics.log = capture
        trainer.fit()
        seen = {name: cb.seen for name, cb in zip(("given", "from_env", "added"), trainer.callbacks, strict=True)}
        torch.save({"logged": logged, **seen}, f"{out_prefix}.rank{ctx.rank}.pt")
    finally:
        teardown()
