"""Tokenization split over ranks gives exactly the single-process dataset, and a data error
found by one rank stops every rank with the same message (no rank is left waiting)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from conftest import base_overrides
from distributed_helper import run_ranks
from workers import build_sharded

from sft.cli import compose
from sft.data import build_dataset
from sft.model import load_tokenizer


def test_sharded_tokenization(demo_dir, tmp_path):
    table = pq.read_table(demo_dir / "train.parquet")
    pq.write_table(pa.concat_tables([table, table, table]), tmp_path / "train.parquet")  # 3 batches of rows
    base = base_overrides(demo_dir, tmp_path) + [f"data.train_files={tmp_path}/train.parquet"]
    good = base + ["data.max_length=64"]  # truncation and drops happen
    bad = base + ["data.truncation=error", "data.max_length=40"]
    run_ranks(build_sharded, 2, [good, bad], str(tmp_path / "out.pt"))
    good_results, bad_results = torch.load(tmp_path / "out.pt", weights_only=False)

    cfg = compose(good)
    ref = build_dataset(cfg.data.train_files, load_tokenizer(cfg), cfg.data, -1, False)
    assert len(ref) > 512  # three batches of 256 rows: both ranks really had work
    for got in good_results:  # both ranks hold the whole dataset, as one process builds it
        for key in ("input_ids", "loss_mask", "lengths", "rows"):
            np.testing.assert_array_equal(got[key], getattr(ref, key), err_msg=key)
        assert got["num_dropped"] == ref.num_dropped

    assert all("error" in r for r in bad_results)
    assert bad_results[0]["error"] == bad_results[1]["error"]
    assert "train.parquet" in bad_results[0]["error"] and "row" in bad_results[0]["error"]
