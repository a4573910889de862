"""python -m sft.inspect_data: the rows as the trainer sees them, trained spans marked."""

from __future__ import annotations

import copy
import json
import re
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from chat_templates import QWEN3

from sft.config.schema import load_config
from sft.data.build import build_dataset
from sft.inspect_data import main
from sft.models.loading import load_tokenizer


def overrides(demo_dir) -> list[str]:
    return [
        f"data.train_files={demo_dir}/train.parquet",
        f"model.partial_pretrain={demo_dir}/model",
        "data.multiturn.enable=true",
        "data.max_length=256",
        "data.truncation=right",
    ]


def expected_dataset(demo_dir):
    cfg = load_config(overrides(demo_dir))
    tok = load_tokenizer(cfg)
    return tok, build_dataset(cfg.data.train_files, tok, cfg.data, -1, True)


def test_text_marks_exactly_the_assistant_turns(demo_dir, capsys):
    assert main(["--rows", "4", *overrides(demo_dir)]) == 0
    out = capsys.readouterr().out
    tok, ds = expected_dataset(demo_dir)
    rows = pq.read_table(demo_dir / "train.parquet").slice(0, 4).to_pylist()
    blocks = re.split(r"^=== row \d+ .*===$\n", out, flags=re.M)[1:]
    headers = re.findall(r"^=== row (\d+) \((.*)\) \| length (\d+) \| trained (\d+) ===$", out, flags=re.M)
    assert len(blocks) == len(headers) == 4
    checked = 0
    for i, (block, header, row) in enumerate(zip(blocks, headers, rows)):
        ids, mask = ds.token_ids(i)
        assert header == (str(i), f"{demo_dir}/train.parquet row {i}", str(len(ids)), str(int(mask.sum())))
        assert block.replace("[[", "").replace("]]", "").rstrip("\n") == tok.decode(ids.tolist()).rstrip("\n")
        if not any(m.get("tool_calls") for m in row["messages"]):
            answers = [m["content"] + "<|im_end|>" for m in row["messages"] if m["role"] == "assistant"]
            assert re.findall(r"\[\[(.*?)\]\]", block, flags=re.S) == answers
            checked += 1
    assert checked > 0


def test_colour_on_a_terminal(demo_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["--rows", "1", *overrides(demo_dir)]) == 0
    out = capsys.readouterr().out
    assert "\x1b[1;32m" in out and "[[" not in out


def test_jsonl_is_unpadded_ids_and_mask(demo_dir, capsys):
    assert main(["--format", "jsonl", "--rows", "3", *overrides(demo_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    _, ds = expected_dataset(demo_dir)
    assert len(lines) == 3
    for i, line in enumerate(lines):
        obj = json.loads(line)
        ids, mask = ds.token_ids(i)
        assert obj == {"row": i, "input_ids": ids.tolist(), "loss_mask": mask.tolist()}


@pytest.mark.parametrize(
    ("extra", "code", "pattern"),
    [
        (["--split", "val"], 2, r"^sft: config error: data.val_files is not set"),
        (["data.no_such_key=1"], 2, r"^sft: config error: .*no_such_key"),
        (
            ["model.partial_pretrain=/no/such/dir"],
            2,
            r"^sft: config error: model.partial_pretrain=/no/such/dir: not a dir",
        ),
        (["data.multiturn.enable=false"], 3, r"^sft: data error: .*column 'prompt' \(data.prompt_key\) not found"),
    ],
)
def test_errors_are_one_line(demo_dir, capsys, extra, code, pattern):
    assert main([*overrides(demo_dir), *extra]) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.match(pattern, err)


def test_trained_format_shows_what_happens_to_reasoning(demo_tokenizer, tmp_path, capsys):
    # Qwen3-style template: reasoning kept only after the last user turn.
    tok = copy.deepcopy(demo_tokenizer)
    tok.add_tokens(["<think>", "</think>"])
    tok.chat_template = QWEN3
    tok.save_pretrained(tmp_path / "model")
    messages = [
        {"role": "user", "content": "Sort: 3 1 2"},
        {"role": "assistant", "content": "<think>\nsmall first\n</think>\n\n1 2 3"},
        {"role": "user", "content": "Reverse it."},
        {"role": "assistant", "content": "3 2 1", "reasoning_content": "backwards"},
    ]
    pq.write_table(pa.Table.from_pylist([{"messages": messages}]), tmp_path / "r.parquet")
    argv = [
        "--format",
        "trained",
        f"data.train_files={tmp_path}/r.parquet",
        f"model.partial_pretrain={tmp_path}/model",
        "data.multiturn.enable=true",
        "data.max_length=256",
    ]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.match(r"=== row 0 \(.*r\.parquet row 0\) \| length \d+ \| trained \d+ ===", lines[0])
    assert [json.loads(line[2:]) for line in lines[1:]] == [
        "1 2 3<|im_end|>",  # earlier reasoning: dropped by the template, so not trained
        "<think>\nbackwards\n</think>\n\n3 2 1<|im_end|>",
    ]
