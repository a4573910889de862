"""Shared fixtures: the demo assets are written once per test session (no network)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sft.demo.assets import write_demo


# ----- core fixtures (lead) -----
@pytest.fixture(autouse=True)
def _restore_sft_logger():
    """CLI entry points run in-process (bench, inspect_data) configure the `sft` logger for a real
    run (rank-0 handler, no propagation); undo that so later tests' caplog still sees records."""
    log = logging.getLogger("sft")
    handlers, propagate, level = list(log.handlers), log.propagate, log.level
    yield
    log.handlers[:] = handlers
    log.propagate, log.level = propagate, level


@pytest.fixture
def single_rank(monkeypatch):
    """`single_rank(device)` starts a one-process group in this process (torchrun's variables
    cleared), torn down after the test."""
    from sft.parallel.distributed import init_distributed, teardown

    started = []

    def start(device: str):
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            monkeypatch.delenv(key, raising=False)
        started.append(init_distributed(device, 1))
        return started[-1]

    yield start
    if started:
        teardown()


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model folder and train/val parquet files, as `python -m sft.demo` writes them."""
    return write_demo(tmp_path_factory.mktemp("demo"), n_train=256, n_val=40, seed=0)


def base_overrides(demo: Path, out: Path) -> list[str]:
    """A small, fast training configuration over the demo (the tests add what they vary)."""
    return [
        f"data.train_files={demo}/train.parquet",
        "data.multiturn.enable=true",
        "data.max_length=256",
        "data.truncation=right",
        # The padded path is the reference of the equivalence tests; packed (the default) is named where used.
        "use_remove_padding=false",
        f"model.partial_pretrain={demo}/model",
        "model.enable_gradient_checkpointing=false",
        "optim.lr=1e-3",
        "optim.weight_decay=0.1",
        "trainer.resume_mode=disable",
        "trainer.logger=[]",
        f"trainer.default_local_dir={out}",
        "trainer.checkpoint.save_contents=[]",
    ]


def two_steps(demo: Path, model: Path, out: Path, *extra: str, samples: int | None = None, batch: int = 4) -> list[str]:
    """Two steps of a tiny model over the demo, as the model tests (families, hybrids, multimodal) run it: rows of at
    most 96 tokens, micro-batches of batch/2, 4 validation samples, no clipping; `samples` caps the training rows."""
    return base_overrides(demo, out) + [
        f"model.partial_pretrain={model}",
        f"data.val_files={demo}/val.parquet",
        *([f"data.train_max_samples={samples}"] if samples else []),
        "data.val_max_samples=4",
        "data.max_length=96",
        f"data.train_batch_size={batch}",
        f"data.micro_batch_size_per_gpu={batch // 2}",
        "trainer.total_training_steps=2",
        "optim.clip_grad=1e9",
        *extra,
    ]


def export_val_loss(export: Path, demo: Path, out: Path) -> float:
    """The validation loss of an HF export as plain transformers computes it (the model's own layers, one sample at
    a time, no packing): what the trainer's val/loss over the same `two_steps` validation rows must equal."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.cli import compose
    from sft.data.batch import labels_from_loss_mask
    from sft.data.build import build_dataset

    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    cfg = compose(two_steps(demo, export, out))
    ds = build_dataset(
        f"{demo}/val.parquet", AutoTokenizer.from_pretrained(export), cfg.data, 4, pad_to_max_length=False
    )
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            labels = labels_from_loss_mask(item["input_ids"][None], item["loss_mask"][None])
            logits = model(item["input_ids"][None], use_cache=False).logits.float()
            total += float(F.cross_entropy(logits[0], labels[0], reduction="sum", ignore_index=-100))
            count += int((labels != -100).sum())
    return total / count


# ----- data fixtures (data package) -----
@pytest.fixture(scope="session")
def demo_tokenizer():
    """The demo's ChatML tokenizer; tests that change it work on `copy.deepcopy(demo_tokenizer)`."""
    from sft.demo.assets import build_tokenizer

    return build_tokenizer()


@pytest.fixture
def write_parquet(tmp_path: Path):
    """`write_parquet(rows, name="data")` writes dict rows to tmp_path/name.parquet, returns the path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(rows: list[dict], name: str = "data", schema=None) -> str:
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
        return str(path)

    return write
