"""Ranks of tests/test_templates.py (importable by spawned children): tokenisation shared over ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from sft.parallel.distributed import init_distributed, teardown


def build_shared(jobs: list[tuple[str, str]], out_file: str) -> None:
    """For each (tokenizer folder, parquet), every rank tokenises its share; rank 0 saves every rank's arrays."""
    from transformers import AutoTokenizer

    from sft.config.schema import DataConfig
    from sft.data.build import build_dataset
    from sft.data.storage import TokenizeShard

    ctx = init_distributed("cpu", 1)
    try:
        shard = TokenizeShard(ctx.rank, ctx.world_size, ctx.world_group)
        saved = []
        for folder, path in jobs:
            cfg = DataConfig(train_files=path, max_length=4096, truncation="error")
            cfg.multiturn.enable = True
            ds = build_dataset(path, AutoTokenizer.from_pretrained(folder), cfg, -1, False, shard=shard)
            result = {k: getattr(ds, k) for k in ("input_ids", "loss_mask", "lengths", "rows")}
            results: list = [None] * ctx.world_size
            dist.all_gather_object(results, result)
            saved.append(results)
        if ctx.rank == 0:
            torch.save(saved, out_file)
    finally:
        teardown()
