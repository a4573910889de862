"""Tokenization split over ranks gives exactly the single-process dataset (also when bad rows
are skipped: every rank keeps the same rows), and a data error found by one rank stops every
rank with the same message (no rank is left waiting)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from conftest import base_overrides
from distributed_helper import run_ranks
from workers import build_sharded

from sft.cli import compose
from sft.data.build import build_dataset
from sft.models.loading import load_tokenizer


def test_sharded_tokenization(demo_dir, tmp_path):
    table = pq.read_table(demo_dir / "train.parquet")
    pq.write_table(pa.concat_tables([table, table, table]), tmp_path / "train.parquet")  # 3 batches of rows
    base = base_overrides(demo_dir, tmp_path) + [f"data.train_files={tmp_path}/train.parquet"]
    good = base + ["data.max_length=64"]  # truncation and drops happen
    bad = base + ["data.truncation=error", "data.max_length=40"]
    # data.on_bad_sample=skip: rows refused by the scan (every rank) and while tokenizing (one rank each).
    rows = pa.concat_tables([table, table, table]).to_pylist()
    long = [{"role": "user", "content": "apple " * 300}, {"role": "assistant", "content": "pear"}]
    for r in (5, 300):  # over-long: in batch 0 (rank 0) and batch 1 (rank 1)
        rows[r] = {"messages": long, "tools": None}
    for r in (7, 700):  # unknown role
        rows[r]["messages"][0]["role"] = "robot"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), tmp_path / "skip.parquet")
    skip = base + [f"data.train_files={tmp_path}/skip.parquet", "data.truncation=error", "data.on_bad_sample=skip"]
    run_ranks(build_sharded, 2, [good, bad, skip], str(tmp_path / "out.pt"))
    good_results, bad_results, skip_results = torch.load(tmp_path / "out.pt", weights_only=False)

    for results, overrides in ((good_results, good), (skip_results, skip)):
        cfg = compose(overrides)
        ref = build_dataset(cfg.data.train_files, load_tokenizer(cfg), cfg.data, -1, False)
        assert len(ref) > 512  # three batches of 256 rows: both ranks really had work
        for got in results:  # both ranks hold the whole dataset, as one process builds it
            for key in ("input_ids", "loss_mask", "lengths", "rows"):
                np.testing.assert_array_equal(got[key], getattr(ref, key), err_msg=key)
            assert got["num_dropped"] == ref.num_dropped
    assert {5, 7, 300, 700} <= set(ref.bad_rows.samples) and not {5, 7, 300, 700} & set(ref.rows.tolist())

    assert all("error" in r for r in bad_results)
    assert bad_results[0]["error"] == bad_results[1]["error"]
    assert "train.parquet" in bad_results[0]["error"] and "row" in bad_results[0]["error"]
