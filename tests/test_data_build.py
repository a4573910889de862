"""build_dataset: class choice, the user's class, and config errors caught up front."""

from __future__ import annotations

import copy

import pytest

from sft.config.schema import DataConfig
from sft.data.build import build_dataset
from sft.data.multiturn import MultiTurnSFTDataset
from sft.data.single_turn import SFTDataset

CUSTOM = """
from torch.utils.data import Dataset


class RecordingDataset(Dataset):
    def __init__(self, parquet_files, tokenizer, config, max_samples=-1, pad_to_max_length=True):
        self.args = (parquet_files, tokenizer, config, max_samples, pad_to_max_length)

    def __len__(self):
        return 0
"""


@pytest.fixture
def single(write_parquet):
    return write_parquet([{"prompt": "Sort: 2 1", "response": "1 2"}] * 5)


def test_picks_single_or_multi_turn(demo_tokenizer, single, write_parquet):
    cfg = DataConfig(train_files="unused")
    ds = build_dataset(single, demo_tokenizer, cfg, max_samples=3, pad_to_max_length=True)
    assert type(ds) is SFTDataset and len(ds) == 3 and len(ds[0]["input_ids"]) == cfg.max_length
    chat = write_parquet([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}], "c")
    cfg.multiturn.enable = True
    assert type(build_dataset(chat, demo_tokenizer, cfg, -1, False)) is MultiTurnSFTDataset


def test_custom_class_gets_the_same_arguments(demo_tokenizer, tmp_path, single):
    (tmp_path / "my_data.py").write_text(CUSTOM)
    cfg = DataConfig(train_files="unused")
    cfg.custom_cls.path, cfg.custom_cls.name = str(tmp_path / "my_data.py"), "RecordingDataset"
    ds = build_dataset(single, demo_tokenizer, cfg, max_samples=7, pad_to_max_length=False)
    assert type(ds).__name__ == "RecordingDataset"
    assert ds.args == (single, demo_tokenizer, cfg, 7, False)


@pytest.mark.parametrize(
    ("path", "name", "pattern"),
    [
        ("my_data.py", None, "set both"),
        ("other.py", "RecordingDataset", "not an existing .py file"),
        ("my_data.py", "Missing", "no torch Dataset class named 'Missing'"),
    ],
)
def test_custom_class_errors_name_both_keys(demo_tokenizer, tmp_path, single, path, name, pattern):
    (tmp_path / "my_data.py").write_text(CUSTOM)
    cfg = DataConfig(train_files="unused")
    cfg.custom_cls.path, cfg.custom_cls.name = str(tmp_path / path), name
    with pytest.raises(ValueError, match=rf"data.custom_cls.path=.*data.custom_cls.name=.*{pattern}"):
        build_dataset(single, demo_tokenizer, cfg, -1, True)


def test_reserved_template_kwargs_and_bad_truncation(demo_tokenizer, single):
    cfg = DataConfig(train_files="unused", apply_chat_template_kwargs={"tokenize": True})
    with pytest.raises(ValueError, match=r"data.apply_chat_template_kwargs.tokenize=True: set by the dataset"):
        build_dataset(single, demo_tokenizer, cfg, -1, True)
    with pytest.raises(ValueError, match=r"data.truncation='middle'"):
        build_dataset(single, demo_tokenizer, DataConfig(train_files="unused", truncation="middle"), -1, True)


def test_tokenizer_without_chat_template(demo_tokenizer, single):
    tok = copy.deepcopy(demo_tokenizer)
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat template; set data.chat_template"):
        build_dataset(single, tok, DataConfig(train_files="unused"), -1, True)
