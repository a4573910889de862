"""The tokenised cache: cold, warm and no cache give the same data and losses; every key input
forces a rebuild; a cache killed mid-write, truncated or edited is rebuilt; an unwritable folder
keeps the data in memory with one warning."""

from __future__ import annotations

import copy
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import base_overrides
from distributed_helper import run_ranks

from sft.config.schema import DataConfig
from sft.data.build import build_dataset
from sft.data.cache import PREFIX

ARRAYS = ("input_ids", "loss_mask", "lengths", "rows", "offsets")


def _cfg(**kw) -> DataConfig:
    cfg = DataConfig(train_files="unused", max_length=64, truncation="right", on_bad_sample="skip", **kw)
    cfg.multiturn.enable = True
    return cfg


@pytest.fixture(scope="module")
def data(demo_dir, tmp_path_factory) -> Path:
    """48 demo chats (two bad ones) with the messages also under a second column name."""
    rows = pq.read_table(demo_dir / "train.parquet").slice(0, 48).to_pylist()
    rows[3]["messages"][0]["role"] = "robot"  # refused by the scan
    rows[9]["messages"] = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y " * 400}]
    table = pa.Table.from_pylist(rows)
    table = table.append_column("chat", table.column("messages"))
    path = tmp_path_factory.mktemp("cache_data") / "train.parquet"
    pq.write_table(table, path)
    return path


def _build(path, tok, cfg, cache_dir, max_samples=-1):
    return build_dataset(str(path), tok, cfg, max_samples, False, cache_dir=cache_dir)


def _same(a, b) -> None:
    for key in ARRAYS:
        np.testing.assert_array_equal(np.asarray(getattr(a, key)), np.asarray(getattr(b, key)), err_msg=key)
    assert a._counters() == b._counters()
    assert (a.bad_rows.count, a.bad_rows.samples) == (b.bad_rows.count, b.bad_rows.samples)
    assert [a.where(i) for i in range(len(a))] == [b.where(i) for i in range(len(b))]
    assert all(torch.equal(a[i]["loss_mask"], b[i]["loss_mask"]) for i in range(len(a)))


def test_cold_warm_and_no_cache_are_identical(data, demo_tokenizer, tmp_path, caplog):
    ref = _build(data, demo_tokenizer, _cfg(), None)
    assert ref.num_truncated and ref.bad_rows.count == 1 and ref.num_dropped  # counts worth comparing
    caplog.set_level(logging.INFO, logger="sft")
    cold = _build(data, demo_tokenizer, _cfg(), tmp_path)
    assert "tokenised cache written" in caplog.text
    caplog.clear()
    warm = _build(data, demo_tokenizer, _cfg(), tmp_path)
    assert "tokenised cache reused" in caplog.text and isinstance(warm.input_ids, np.memmap)
    assert not hasattr(warm.source, "tables")  # the data files were not read
    for got in (cold, warm):
        _same(got, ref)
    assert len(list(tmp_path.glob(f"{PREFIX}*"))) == 1 and not list(tmp_path.glob(".tmp-*"))


def _change(name: str, path: Path, tok, tmp: Path):
    """(file, tokenizer, config, max_samples) with the input `name` changed."""
    cfg, max_samples = _cfg(), -1
    if name == "file":
        table = pq.read_table(path)
        rows = table.to_pylist()
        rows[0]["messages"][1]["content"] = "changed"
        path = tmp / "train.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    elif name == "vocab":
        tok = copy.deepcopy(tok)
        tok.add_tokens(["zebrafish"])
    elif name == "special_tokens":
        tok = copy.deepcopy(tok)
        tok.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    elif name == "chat_template":
        tok = copy.deepcopy(tok)
        tok.chat_template = tok.chat_template + "{# same rendering, other template #}"
    elif name == "max_length":
        cfg.max_length = 80
    elif name == "truncation":
        cfg.truncation = "left"
    elif name == "train_on":
        cfg.multiturn.train_on = "last"
    elif name == "messages_key":
        cfg.multiturn.messages_key = "chat"
    elif name == "on_bad_sample":
        cfg.on_bad_sample = "error"
        cfg.train_files = None
    elif name == "apply_chat_template_kwargs":
        cfg.apply_chat_template_kwargs = {"enable_thinking": False}
    elif name == "max_samples":
        max_samples = 40
    return path, tok, cfg, max_samples


INPUTS = [
    "file",
    "vocab",
    "special_tokens",
    "chat_template",
    "max_length",
    "truncation",
    "train_on",
    "messages_key",
    "on_bad_sample",
    "apply_chat_template_kwargs",
    "max_samples",
    "version",
]


@pytest.mark.parametrize("name", INPUTS)
def test_each_key_input_forces_a_rebuild(name, data, demo_tokenizer, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _build(data, demo_tokenizer, _cfg(), cache)
    if name == "version":
        monkeypatch.setattr("sft.data.cache.CACHE_VERSION", "test-bumped")
        path, tok, cfg, max_samples = data, demo_tokenizer, _cfg(), -1
    else:
        path, tok, cfg, max_samples = _change(name, data, demo_tokenizer, tmp_path)
    if name == "on_bad_sample":  # the bad rows now stop the build: the old cache must not answer
        with pytest.raises(ValueError, match="robot"):
            _build(path, tok, cfg, cache, max_samples)
        return
    got = _build(path, tok, cfg, cache, max_samples)
    assert len(list(cache.glob(f"{PREFIX}*"))) == 2, "a changed input must give a new cache"
    _same(got, _build(path, tok, cfg, None, max_samples))


def test_same_inputs_reuse_after_touching_nothing(data, demo_tokenizer, tmp_path):
    a = _build(data, demo_tokenizer, _cfg(), tmp_path)
    b = _build(data, demo_tokenizer, _cfg(micro_batch_size_per_gpu=2, train_batch_size=8), tmp_path)
    assert isinstance(a.input_ids, np.memmap) and len(list(tmp_path.glob(f"{PREFIX}*"))) == 1
    _same(a, b)


KILL = """
import os, sys
import sft.data.cache_write as w
w._fsync = lambda path: os._exit(9)  # dies after the arrays are written, before the manifest
from sft.demo.assets import build_tokenizer
sys.path.insert(0, {tests!r})
from test_data_cache import _build, _cfg
_build({data!r}, build_tokenizer(), _cfg(), {cache!r})
"""


def test_killed_truncated_or_edited_cache_is_rebuilt(data, demo_tokenizer, tmp_path, caplog):
    cache = tmp_path / "cache"
    code = KILL.format(tests=str(Path(__file__).parent), data=str(data), cache=str(cache))
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    assert list(cache.glob(".tmp-*")) and not list(cache.glob(f"{PREFIX}*"))  # killed mid-write
    ref = _build(data, demo_tokenizer, _cfg(), None)
    caplog.set_level(logging.INFO, logger="sft")
    _same(_build(data, demo_tokenizer, _cfg(), cache), ref)
    assert "tokenised cache written" in caplog.text
    (folder,) = cache.glob(f"{PREFIX}*")
    damages = [
        lambda: (folder / "input_ids.bin").write_bytes((folder / "input_ids.bin").read_bytes()[:-4]),  # truncated
        lambda: (folder / "loss_mask.bin").write_bytes(bytes(len((folder / "loss_mask.bin").read_bytes()))),
        lambda: (folder / "manifest.json").write_text("{"),
        lambda: (folder / "offsets.bin").unlink(),
    ]
    for damage in damages:
        damage()
        caplog.clear()
        _same(_build(data, demo_tokenizer, _cfg(), cache), ref)
        assert "tokenised cache written" in caplog.text, "a damaged cache was read as data"


def test_unwritable_folder_keeps_data_in_memory_with_one_warning(data, demo_tokenizer, tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    got = _build(data, demo_tokenizer, _cfg(), blocker / "cache")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "tokenised cache" in r.getMessage()]
    assert len(warnings) == 1 and "cannot be written" in warnings[0].getMessage()
    assert not isinstance(got.input_ids, np.memmap)
    _same(got, _build(data, demo_tokenizer, _cfg(), None))


def train_three_ways(overrides: list[str], out_file: str) -> None:
    """In one process group: train 2 steps with no cache, a cold cache and a warm cache."""
    from sft.config.schema import load_config
    from sft.parallel.distributed import init_distributed, teardown
    from sft.trainer import FSDPSFTTrainer

    ctx = init_distributed("cpu", 1)
    results = {}
    try:
        for name, extra in (("none", ["data.cache=false"]), ("cold", []), ("warm", [])):
            trainer = FSDPSFTTrainer(load_config(overrides + extra), ctx)
            losses = []
            original = trainer.metrics.log
            trainer.metrics.log = lambda m, step, losses=losses, original=original: (
                losses.append(m.get("train/loss")),
                original(m, step),
            )
            trainer.fit()
            ds = trainer.train_ds
            results[name] = {
                "losses": [x for x in losses if x is not None],
                "mapped": isinstance(ds.input_ids, np.memmap),
                **{k: np.array(getattr(ds, k)) for k in ARRAYS},
            }
        if ctx.rank == 0:
            torch.save(results, out_file)
    finally:
        teardown()


def test_trainer_losses_same_cold_warm_no_cache_on_1_and_2_processes(demo_dir, tmp_path):
    got = {}
    for world in (1, 2):
        out = tmp_path / f"w{world}"
        overrides = base_overrides(demo_dir, out) + [
            "data.train_batch_size=8",
            "data.micro_batch_size_per_gpu=2",
            "trainer.total_training_steps=2",
        ]
        run_ranks(train_three_ways, world, overrides, str(tmp_path / f"{world}.pt"))
        got[world] = torch.load(tmp_path / f"{world}.pt", weights_only=False)
        assert (out / "data_cache").is_dir()
    for world, res in got.items():
        assert [res[k]["mapped"] for k in ("none", "cold", "warm")] == [False, True, True]
        assert len(res["none"]["losses"]) == 2
        for name in ("cold", "warm"):
            assert res[name]["losses"] == res["none"]["losses"], (world, name)  # bit for bit
            for key in ARRAYS:
                np.testing.assert_array_equal(res[name][key], got[1]["none"][key], err_msg=f"{world} {name} {key}")
    np.testing.assert_allclose(got[2]["none"]["losses"], got[1]["none"]["losses"], rtol=1e-5)
