"""Items, truncation and dropping: what the trainer gets from a dataset."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from sft.config.schema import DataConfig
from sft.data.batch import padded_micro_batch
from sft.data.build import build_dataset

WORDS = "apple river stone cloud green tiger lemon piano moon bread".split()


def chat_cfg(max_length: int = 1024, truncation: str = "error") -> DataConfig:
    cfg = DataConfig(train_files="unused", max_length=max_length, truncation=truncation)
    cfg.multiturn.enable = True
    return cfg


def conversation(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def build(path, tok, cfg, pad=False):
    return build_dataset(path, tok, cfg, max_samples=-1, pad_to_max_length=pad)


@pytest.fixture
def chats(write_parquet):
    return write_parquet(
        [
            conversation("Repeat: " + " ".join(WORDS * 3), " ".join(WORDS)),
            conversation("Sort: 3 1 2", "1 2 3"),
            conversation("Reverse: a b", "b a"),
        ]
    )


@pytest.fixture
def sft_log(caplog):
    # Attach to the "sft" logger itself (the CLIs may have turned its propagation off), and
    # stop propagation meanwhile so that no record reaches caplog twice.
    log = logging.getLogger("sft")
    propagate, level = log.propagate, log.level
    log.addHandler(caplog.handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    yield caplog
    log.removeHandler(caplog.handler)
    log.propagate = propagate
    log.setLevel(level)


def test_storage_is_compact_numpy(demo_tokenizer, chats):
    ds = build(chats, demo_tokenizer, chat_cfg())
    assert ds.input_ids.dtype == np.int32 and ds.loss_mask.dtype == np.uint8 and ds.offsets.dtype == np.int64
    assert ds.lengths.tolist() == [len(ds[i]["input_ids"]) for i in range(len(ds))]
    assert ds.offsets[-1] == len(ds.input_ids) == ds.lengths.sum()


@pytest.mark.parametrize("side", ["left", "right"])
def test_truncation_keeps_one_side(demo_tokenizer, chats, side):
    full = build(chats, demo_tokenizer, chat_cfg())
    ids, mask = full.token_ids(0)
    keep = len(ids) - 9
    ds = build(chats, demo_tokenizer, chat_cfg(keep, side))
    got_ids, got_mask = ds.token_ids(0)
    window = slice(-keep, None) if side == "left" else slice(0, keep)
    assert got_ids.tolist() == ids[window].tolist()
    assert got_mask.tolist() == mask[window].tolist()
    assert ds.num_truncated == 1 and ds.lengths.tolist() == [keep, *full.lengths[1:].tolist()]


def test_truncation_error_names_row_length_and_keys(demo_tokenizer, chats):
    n = build(chats, demo_tokenizer, chat_cfg()).lengths[0]
    with pytest.raises(
        ValueError,
        match=rf"data\.parquet row 0: {n} tokens > data.max_length=40; raise data.max_length or set data.truncation",
    ):
        build(chats, demo_tokenizer, chat_cfg(40, "error"))


def test_left_truncation_never_trains_the_first_token(demo_tokenizer, chats):
    full = build(chats, demo_tokenizer, chat_cfg())
    _, mask = full.token_ids(0)
    ds = build(chats, demo_tokenizer, chat_cfg(8, "left"))
    assert mask[-8] == 1  # the window starts inside the answer
    assert ds.token_ids(0)[1].tolist() == [0, *mask[-7:].tolist()]


def test_rows_with_nothing_trained_are_dropped_and_counted(demo_tokenizer, chats, sft_log):
    full = build(chats, demo_tokenizer, chat_cfg())
    first_trained = int(full.token_ids(0)[1].argmax())
    assert first_trained > full.lengths[1:].max()  # the short rows still fit whole
    ds = build(chats, demo_tokenizer, chat_cfg(first_trained, "right"))
    assert ds.num_dropped == 1 and len(ds) == 2
    assert ds.lengths.tolist() == full.lengths[1:].tolist()
    assert ds.origin(0)[1] == 1  # sample 0 is now source row 1
    warnings = [r.getMessage() for r in sft_log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("1 of 3 rows")
    assert all(ds[i]["loss_mask"].sum() > 0 for i in range(len(ds)))


def test_nothing_left_to_train_is_an_error(demo_tokenizer, chats):
    with pytest.raises(ValueError, match=r"no sample to train on \(3 rows read, 3 dropped"):
        build(chats, demo_tokenizer, chat_cfg(5, "right"))


def test_padded_and_unpadded_items_agree(demo_tokenizer, chats):
    cfg = chat_cfg(200)
    unpadded = build(chats, demo_tokenizer, cfg, pad=False)
    padded = build(chats, demo_tokenizer, cfg, pad=True)
    pad_id = demo_tokenizer.pad_token_id
    for i in range(len(unpadded)):
        u, p = unpadded[i], padded[i]
        n = len(u["input_ids"])
        assert set(u) == set(p) == {"input_ids", "attention_mask", "position_ids", "loss_mask"}
        assert all(t.dtype == torch.long and t.dim() == 1 for t in [*u.values(), *p.values()])
        assert all(len(t) == 200 for t in p.values())
        for key in u:
            assert torch.equal(p[key][:n], u[key])
        assert torch.equal(u["position_ids"], torch.arange(n)) and bool(u["attention_mask"].all())
        assert (p["input_ids"][n:] == pad_id).all()
        for key in ("attention_mask", "position_ids", "loss_mask"):
            assert not p[key][n:].any()
    # The padded micro-batch: stacked, cut to the longest real row, next-token labels where the next token is trained.
    mb = padded_micro_batch([padded[i] for i in range(len(padded))])
    batch, lengths = mb.inputs, [len(unpadded[i]["input_ids"]) for i in range(len(unpadded))]
    width = max(lengths)
    assert mb.sample_lens == lengths and torch.equal(mb.real_mask, batch["attention_mask"])
    assert width < 200 and batch["input_ids"].shape == batch["labels"].shape == (3, width)
    for i in range(len(unpadded)):
        u, n = unpadded[i], len(unpadded[i]["input_ids"])
        assert torch.equal(batch["input_ids"][i, :n], u["input_ids"]) and not batch["attention_mask"][i, n:].any()
        want = torch.where(u["loss_mask"][1:].bool(), u["input_ids"][1:], -100)
        assert torch.equal(batch["labels"][i, : n - 1], want) and (batch["labels"][i, n - 1 :] == -100).all()
        assert int((want != -100).sum()) == int(u["loss_mask"][1:].sum()) > 0


def test_negative_and_out_of_range_index(demo_tokenizer, chats):
    ds = build(chats, demo_tokenizer, chat_cfg())
    assert torch.equal(ds[-1]["input_ids"], ds[2]["input_ids"])
    with pytest.raises(IndexError):
        ds[3]
