"""SFTDataset: the prompt is untrained, exactly the response tokens and the EOS are trained."""

from __future__ import annotations

import pytest

from sft.config.schema import DataConfig
from sft.data.build import build_dataset
from sft.data.single_turn import SFTDataset


def cfg(**kwargs) -> DataConfig:
    c = DataConfig(train_files="unused", max_length=256, truncation="error")
    for key, value in kwargs.items():
        setattr(c, key, value)
    return c


def build(path, tok, config=None) -> SFTDataset:
    ds = build_dataset(path, tok, config or cfg(), max_samples=-1, pad_to_max_length=False)
    assert type(ds) is SFTDataset
    return ds


def expected(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    p = tok(text, add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"]
    return p + r + [tok.eos_token_id], [0] * len(p) + [1] * (len(r) + 1)


def test_response_and_eos_trained_prompt_not(demo_tokenizer, write_parquet):
    rows = [{"prompt": "Sort: 3 1 2", "response": "1 2 3"}, {"prompt": "Repeat: moon", "response": "moon"}]
    ds = build(write_parquet(rows), demo_tokenizer)
    for i, row in enumerate(rows):
        ids, mask = ds.token_ids(i)
        exp_ids, exp_mask = expected(demo_tokenizer, row["prompt"], row["response"])
        assert ids.tolist() == exp_ids and mask.tolist() == exp_mask
        trained = demo_tokenizer.decode(ids[mask.astype(bool)].tolist())
        assert trained == row["response"] + "<|im_end|>"
        assert demo_tokenizer.decode(ids[: mask.argmax()].tolist()).endswith("<|im_start|>assistant\n")


def test_dict_keys_descend_in_order(demo_tokenizer, write_parquet):
    rows = [{"extra": {"q": {"text": "Sort: 2 1"}, "a": "1 2"}}]
    config = cfg(prompt_key="extra", response_key="extra", prompt_dict_keys=["q", "text"], response_dict_keys=["a"])
    ds = build(write_parquet(rows), demo_tokenizer, config)
    ids, mask = ds.token_ids(0)
    assert (ids.tolist(), mask.tolist()) == expected(demo_tokenizer, "Sort: 2 1", "1 2")


def test_missing_dict_key_names_row_and_option(demo_tokenizer, write_parquet):
    rows = [{"extra": {"q": "a", "a": "b"}}, {"extra": {"question": "a", "a": "b"}}]
    config = cfg(prompt_key="extra", response_key="extra", prompt_dict_keys=["q"], response_dict_keys=["a"])
    with pytest.raises(
        ValueError,
        match=r"row 1: column 'extra' has no key 'q' \(found \['a', 'question'\]\); fix data.prompt_dict_keys",
    ):
        build(write_parquet(rows), demo_tokenizer, config)


def test_prompt_as_chat_messages(demo_tokenizer, write_parquet):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort: 2 1"}]
    ds = build(write_parquet([{"prompt": prompt, "response": "1 2"}]), demo_tokenizer)
    ids, mask = ds.token_ids(0)
    text = demo_tokenizer.decode(ids.tolist())
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert demo_tokenizer.decode(ids[mask.astype(bool)].tolist()) == "1 2<|im_end|>"


def test_non_string_response(demo_tokenizer, write_parquet):
    # Found by the scan before tokenizing: the whole column has the wrong type.
    with pytest.raises(ValueError, match=r"data.parquet: column 'response' has type int64; it must be a string"):
        build(write_parquet([{"prompt": "x", "response": 3}]), demo_tokenizer)
