"""Bad input data: every case stops with one line naming the file, the row and the fix (or,
with data.on_bad_sample=skip, the row is dropped, counted and written to bad_samples.jsonl);
schema, role and type problems are found by the pyarrow scan before anything is tokenized;
JSON lines, globs and folders as data files; data.multiturn.train_on."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import base_overrides

from sft.config.schema import DataConfig
from sft.data.build import build_dataset
from sft.data.files import expand_paths
from sft.data.multiturn import MultiTurnSFTDataset
from sft.data.scan import BAD_SAMPLES_FILE, write_bad_samples
from sft.demo.assets import PARQUET_SCHEMA

USER = {"role": "user", "content": "Sort: 3 1 2"}
ANSWER = {"role": "assistant", "content": "1 2 3"}
GOOD = [USER, ANSWER]


def chat_cfg(**kwargs) -> DataConfig:
    cfg = DataConfig(train_files="unused", max_length=256, truncation="error")
    cfg.multiturn.enable = True
    for key, value in kwargs.items():
        setattr(cfg, key, value)
    return cfg


def build(path, tokenizer, cfg: DataConfig | None = None):
    return build_dataset(path, tokenizer, cfg or chat_cfg(), max_samples=-1, pad_to_max_length=False)


@pytest.fixture
def no_tokenizing(monkeypatch):
    """Scan errors must come before any row is tokenized."""

    def fail(*args, **kwargs):
        raise AssertionError("tokenized before the scan reported the bad row")

    monkeypatch.setattr(MultiTurnSFTDataset, "_encode_batch", fail)


def write_table(path: Path, columns: dict) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def messages_of(*convs, content_type: pa.DataType | None = None) -> pa.Array:
    msg = pa.struct([("role", pa.string()), ("content", content_type or pa.string())])
    return pa.array(list(convs), type=pa.list_(msg))


# ----- files -----
def test_missing_file_glob_and_folder_are_named(tmp_path):
    with pytest.raises(ValueError, match=f"data.train_files: file not found: {tmp_path}/nope.parquet"):
        expand_paths([str(tmp_path / "nope.parquet")], "data.train_files")
    with pytest.raises(ValueError, match=rf"the pattern {tmp_path}/\*.parquet matches no file"):
        expand_paths(f"{tmp_path}/*.parquet", "data.train_files")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=f"the folder {tmp_path} holds no .parquet, .jsonl, .json file"):
        expand_paths(str(tmp_path), "data.val_files")


def test_corrupt_parquet_is_named(demo_tokenizer, tmp_path, write_parquet):
    good = Path(write_parquet([{"messages": GOOD}] * 50))
    data = good.read_bytes()
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{truncated}: not a readable parquet file"):
        build(str(truncated), demo_tokenizer)
    # Footer intact (the schema reads), data pages overwritten.
    damaged = tmp_path / "damaged.parquet"
    damaged.write_bytes(data[:4] + b"\xff" * 36 + data[40:])
    with pytest.raises(ValueError, match=f"{damaged}: corrupt parquet file, its data cannot be read") as info:
        build(str(damaged), demo_tokenizer)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_empty_dataset(demo_tokenizer, tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist([], schema=PARQUET_SCHEMA), path)
    else:
        path.write_text("\n")
    with pytest.raises(ValueError, match=rf"{path}: no sample to train on \(0 rows read"):
        build(str(path), demo_tokenizer)


def test_missing_column_in_json_lines_lists_available(demo_tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"conversation": GOOD, "id": 1}) + "\n")
    with pytest.raises(ValueError, match=r"'messages' \(data.multiturn.messages_key\) not found; available columns: "):
        build(str(path), demo_tokenizer)


# ----- the scan: one bad row among good ones, named before tokenizing -----
def invalid_utf8_strings() -> pa.Array:
    """Invalid bytes inside a string column, as a careless writer can produce them."""
    content = pa.array([b"Sort", b"1 2", b"Sort", b"\xff"], pa.binary()).view(pa.string())
    msgs = pa.StructArray.from_arrays([pa.array(["user", "assistant"] * 2), content], ["role", "content"])
    return pa.ListArray.from_arrays(pa.array([0, 2, 4], pa.int32()), msgs)


def bad_parquet_cases():
    return {
        "unknown role": (
            {"messages": messages_of(GOOD, [{"role": "bot", "content": "hi"}, ANSWER])},
            r"row 1: messages\[0\] has role 'bot'; use one of system, user, assistant, tool",
        ),
        "missing content": (
            {"messages": messages_of(GOOD, [{"role": "user", "content": None}, ANSWER])},
            r"row 1: messages\[0\] \(user\) has no content",
        ),
        "no assistant": (
            {"messages": messages_of(GOOD, [USER])},
            r"row 1: column 'messages' has no assistant message, so nothing to train on",
        ),
        "empty conversation": (
            {"messages": messages_of(GOOD, [])},
            r"row 1: column 'messages' must be a non-empty list of messages, got an empty list",
        ),
        "invalid utf-8": (
            {"messages": invalid_utf8_strings()},
            r"row 1: column 'messages' is not valid UTF-8 text \(byte 0\); re-encode it as UTF-8",
        ),
        "invalid utf-8 in a binary column": (
            {
                "messages": messages_of(
                    GOOD, [USER, {"role": "assistant", "content": b"\xff"}], content_type=pa.binary()
                )
            },
            r"row 1: column 'messages' is not valid UTF-8 text",
        ),
    }


@pytest.mark.parametrize("case", list(bad_parquet_cases()))
def test_bad_row_found_by_the_scan(demo_tokenizer, tmp_path, no_tokenizing, case):
    columns, pattern = bad_parquet_cases()[case]
    path = write_table(tmp_path / "d.parquet", columns)
    with pytest.raises(ValueError) as info:
        build(path, demo_tokenizer)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path} ") and re.search(pattern, message), message
    assert message.endswith("(1 of 2 rows have such problems; fix them, or set data.on_bad_sample=skip to drop them)")


@pytest.mark.parametrize(
    ("column", "pattern"),
    [
        (
            messages_of(GOOD, content_type=pa.string()).cast(
                pa.list_(pa.struct([("role", pa.string()), ("content", pa.large_string())]))
            ),
            None,  # large strings are fine
        ),
        (
            pa.array([[GOOD]], pa.list_(pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))),
            r"column 'messages' is a list of lists \(list<.*>\); each row must hold a list of messages",
        ),
        (
            pa.array(
                [[{"role": "user", "content": 1}]],
                pa.list_(pa.struct([("role", pa.string()), ("content", pa.int64())])),
            ),
            r"column 'messages': message content has type int64; it must be a string",
        ),
        (pa.array([3]), r"column 'messages' has type int64; it must be a list of messages"),
        (pa.array([[{"role": "user"}]]), r"column 'messages': messages have no 'content' field \(fields: \['role'\]\)"),
    ],
)
def test_wrong_column_types_stop_even_with_skip(demo_tokenizer, tmp_path, column, pattern):
    path = write_table(tmp_path / "d.parquet", {"messages": column})
    if pattern is None:
        assert len(build(path, demo_tokenizer)) == 1
        return
    with pytest.raises(ValueError, match=f"{path}: {pattern}"):
        build(path, demo_tokenizer, chat_cfg(on_bad_sample="skip"))


def test_json_lines_bad_lines_are_named_by_line(demo_tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [
        json.dumps({"messages": GOOD}).encode(),
        b"",  # blank lines are not rows
        json.dumps({"messages": [USER, {"role": "assistant", "content": 7}]}).encode(),  # content a number
        b'{"messages": [',
        json.dumps({"messages": GOOD}).encode().replace(b"1 2 3", b"\xff"),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(
        ValueError, match=rf"{path} line 3: messages\[1\] content is a int; give a string \(3 of 4 rows"
    ):
        build(str(path), demo_tokenizer)
    ds = build(str(path), demo_tokenizer, chat_cfg(on_bad_sample="skip"))
    assert len(ds) == 1 and ds.bad_rows.count == 3
    reasons = [ds.bad_rows.samples[r] for r in sorted(ds.bad_rows.samples)]
    assert reasons[1].startswith("not valid JSON (Expecting value at column 15)")
    assert reasons[2].startswith("not valid UTF-8 (invalid start byte at byte")


# ----- problems found while tokenizing: named, or dropped with skip -----
TOOL_CHECK = (
    "{%- set ns = namespace(call=false) -%}{%- for m in messages -%}"
    "{%- if m.role == 'assistant' and m.tool_calls -%}{%- set ns.call = true -%}"
    "{%- elif m.role == 'tool' and not ns.call -%}"
    "{{- raise_exception('a tool message needs an assistant tool call before it') -}}{%- endif -%}{%- endfor -%}"
)


def test_tool_message_without_call_where_the_template_needs_one(demo_tokenizer, tmp_path):
    tok = copy.deepcopy(demo_tokenizer)
    tok.chat_template = TOOL_CHECK + tok.chat_template
    orphan = [USER, {"role": "tool", "content": "42"}, ANSWER]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": GOOD}, {"messages": orphan}], schema=PARQUET_SCHEMA), path)
    with pytest.raises(
        ValueError,
        match=rf"{path} row 1: chat template failed: TemplateError: a tool message needs an assistant tool call "
        r"before it \(or set data.on_bad_sample=skip to drop such rows\)$",
    ):
        build(str(path), tok)
    ds = build(str(path), tok, chat_cfg(on_bad_sample="skip"))
    assert ds.rows.tolist() == [0] and ds.bad_rows.count == 1


def test_over_long_row_named_with_its_length(demo_tokenizer, write_parquet):
    long = [{"role": "user", "content": "apple " * 100}, ANSWER]
    path = write_parquet([{"messages": GOOD}, {"messages": long}, {"messages": GOOD}])
    with pytest.raises(ValueError, match=r"data.parquet row 1: \d+ tokens > data.max_length=64; raise data.max_length"):
        build(path, demo_tokenizer, chat_cfg(max_length=64))
    ds = build(path, demo_tokenizer, chat_cfg(max_length=64, on_bad_sample="skip"))
    assert ds.rows.tolist() == [0, 2]
    assert ds.bad_rows.count == 1 and re.fullmatch(
        r"\d+ tokens > data.max_length=64; raise data.max_length or set data.truncation=left or right",
        ds.bad_rows.samples[1],
    )


def test_skip_drops_counts_and_writes_a_sample(demo_tokenizer, tmp_path, write_parquet):
    long = [{"role": "user", "content": "apple " * 100}, ANSWER]
    rows = [GOOD, [{"role": "bot", "content": "x"}, ANSWER], GOOD, long, [USER], GOOD]
    path = write_parquet([{"messages": m} for m in rows])
    ds = build(path, demo_tokenizer, chat_cfg(max_length=64, on_bad_sample="skip"))
    ref = build(write_parquet([{"messages": GOOD}] * 3, "ref"), demo_tokenizer, chat_cfg(max_length=64))
    assert ds.rows.tolist() == [0, 2, 5]
    np.testing.assert_array_equal(ds.input_ids, ref.input_ids)
    assert ds.bad_rows.count == 3 and sorted(ds.bad_rows.samples) == [1, 3, 4]

    out = tmp_path / "run"
    (out / "global_step_2").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    assert write_bad_samples(out, {"train": ds, "val": None}, rank=1) is None  # rank 0 only
    assert not (out / BAD_SAMPLES_FILE).exists()
    write_bad_samples(out, {"train": ds, "val": None}, rank=0)
    records = [json.loads(x) for x in (out / BAD_SAMPLES_FILE).read_text().splitlines()]
    assert [(r["split"], r["file"], r["row"]) for r in records] == [
        ("train", path, 1),
        ("train", path, 3),
        ("train", path, 4),
    ]
    assert records[0]["reason"].startswith("messages[0] has role 'bot'")
    assert "tokens > data.max_length=64" in records[1]["reason"]
    assert records[2]["reason"].startswith("column 'messages' has no assistant message")
    assert sorted(p.name for p in out.iterdir()) == [BAD_SAMPLES_FILE, "global_step_2", "metrics.jsonl"]
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_single_turn_null_and_struct_columns(demo_tokenizer, tmp_path):
    cfg = DataConfig(train_files="unused", max_length=256)
    path = write_table(tmp_path / "s.parquet", {"prompt": ["a", "b"], "response": ["x", None]})
    with pytest.raises(ValueError, match=r"s.parquet row 1: column 'response' has no value \(null\); give a string"):
        build(path, demo_tokenizer, cfg)
    path = write_table(tmp_path / "n.parquet", {"prompt": pa.array([{"q": "a"}]), "response": ["x"]})
    with pytest.raises(ValueError, match=r"column 'prompt' has type struct<q: string>; it must be a string or a list"):
        build(path, demo_tokenizer, cfg)
    cfg.prompt_dict_keys = ["q"]
    assert len(build(path, demo_tokenizer, cfg)) == 1
    cfg.prompt_dict_keys = ["question"]
    with pytest.raises(
        ValueError, match=r"column 'prompt' has no key 'question' \(found \['q'\]\); fix data.prompt_dict_keys"
    ):
        build(path, demo_tokenizer, cfg)


# ----- data sources -----
def test_json_lines_globs_and_folders_give_the_parquet_dataset(demo_tokenizer, tmp_path):
    convs = [[USER, {"role": "assistant", "content": f"answer {i}"}] for i in range(6)]
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist([{"messages": m} for m in convs[:3]]), data / "a.parquet")
    (data / "b.jsonl").write_text(
        "".join(json.dumps({"messages": m, "id": i}) + "\n" for i, m in enumerate(convs[3:5]))
    )
    (data / "c.json").write_text(json.dumps([{"messages": convs[5]}]))
    (data / "README.md").write_text("not data")
    pq.write_table(pa.Table.from_pylist([{"messages": m} for m in convs]), tmp_path / "all.parquet")
    ref = build(str(tmp_path / "all.parquet"), demo_tokenizer)
    for files in (
        str(data),
        [f"{data}/*.parquet", f"{data}/*.json*"],
        [f"{data}/a.parquet", f"{data}/b.*", f"{data}/c.json"],
    ):
        ds = build(files, demo_tokenizer)
        np.testing.assert_array_equal(ds.input_ids, ref.input_ids)
        np.testing.assert_array_equal(ds.loss_mask, ref.loss_mask)
    assert ds.where(4) == f"{data}/b.jsonl line 2" and ds.where(5) == f"{data}/c.json line 1"


# ----- train_on -----
def test_train_on_last_trains_only_the_last_assistant_turn(demo_tokenizer, write_parquet):
    first = {"role": "assistant", "content": "apple pear"}
    convs = [
        [USER, first, USER, ANSWER],
        [USER, {**first, "loss_mask": 1}, USER, ANSWER],  # a per-message loss_mask still wins
        [USER, first, USER, {**ANSWER, "loss_mask": 0}],  # nothing left to train: dropped
    ]
    path = write_parquet([{"messages": m} for m in convs])

    def trained(ds, i):
        ids, mask = ds.token_ids(i)
        return demo_tokenizer.decode(ids[mask.astype(bool)].tolist())

    all_turns = build(path, demo_tokenizer)
    assert trained(all_turns, 0) == "apple pear<|im_end|>1 2 3<|im_end|>"
    cfg = chat_cfg()
    cfg.multiturn.train_on = "last"
    last = build(path, demo_tokenizer, cfg)
    assert last.rows.tolist() == [0, 1] and last.num_dropped == 1
    assert trained(last, 0) == "1 2 3<|im_end|>"
    assert trained(last, 1) == "apple pear<|im_end|>1 2 3<|im_end|>"
    np.testing.assert_array_equal(last.input_ids[: last.lengths[0]], all_turns.input_ids[: all_turns.lengths[0]])


# ----- the command line -----
def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_trainer_stops_with_one_line_before_the_model_and_keeps_the_checkpoint(demo_dir, tmp_path, capsys, monkeypatch):
    """In-process through the trainer's command line: exit 3, one line naming file and row,
    the model never loaded, and an existing output folder byte-for-byte unchanged."""
    from sft.cli import run_cli
    from sft.trainer import FSDPSFTTrainer

    def no_model(self):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(FSDPSFTTrainer, "_build_model", no_model)
    table = pq.read_table(demo_dir / "train.parquet").slice(0, 40).to_pylist()
    table[17]["messages"][0]["role"] = "human"
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(table, schema=PARQUET_SCHEMA), bad)
    out = tmp_path / "run"
    (out / "global_step_2" / "dcp").mkdir(parents=True)
    (out / "global_step_2" / "dcp" / "__0_0.distcp").write_bytes(np.random.default_rng(0).bytes(4096))
    (out / "global_step_2" / "COMPLETE").write_text("")
    (out / "latest_checkpointed_iteration.txt").write_text("2")
    before = snapshot(out)
    overrides = [
        *base_overrides(demo_dir, out),
        f"data.train_files={bad}",
        "trainer.resume_mode=auto",
        "trainer.checkpoint.load_contents=[model,optimizer,extra]",  # what a real resume loads
    ]
    rc = run_cli(overrides, lambda cfg, ctx: FSDPSFTTrainer(cfg, ctx).fit())
    err = capsys.readouterr().err
    assert rc == 3, err
    assert err.splitlines() == [
        f"sft: error: {bad} row 17: messages[0] has role 'human'; use one of system, user, assistant, tool "
        "(1 of 40 rows have such problems; fix them, or set data.on_bad_sample=skip to drop them)"
    ]
    assert snapshot(out) == before


def test_trainer_skips_bad_rows_and_writes_them_next_to_the_metrics(demo_dir, tmp_path, capsys):
    from sft.cli import run_cli
    from sft.trainer import FSDPSFTTrainer

    table = pq.read_table(demo_dir / "train.parquet").slice(0, 20).to_pylist()
    table[3]["messages"][0]["role"] = "human"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in table))
    out = tmp_path / "run"
    overrides = base_overrides(demo_dir, out) + [
        f"data.train_files={bad}",
        "data.on_bad_sample=skip",
        "data.train_batch_size=8",
        "data.micro_batch_size_per_gpu=8",
        "trainer.total_training_steps=1",
        'trainer.logger=["file"]',
    ]
    rc = run_cli(overrides, lambda cfg, ctx: FSDPSFTTrainer(cfg, ctx).fit())
    assert rc == 0, capsys.readouterr().err
    records = [json.loads(x) for x in (out / BAD_SAMPLES_FILE).read_text().splitlines()]
    assert [(r["file"], r["row"], r["where"]) for r in records] == [(str(bad), 3, f"{bad} line 4")]
    assert (out / "metrics.jsonl").exists()


def test_config_keys_are_validated(demo_dir, tmp_path):
    from sft.cli import compose
    from sft.config.checks import validate_config
    from sft.config.errors import ConfigError
    from sft.parallel.distributed import WorldInfo

    world = WorldInfo(rank=0, world_size=1, local_rank=0, local_world_size=1)
    ov = base_overrides(demo_dir, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"data.on_bad_sample='drop': choose error .* or skip"):
        validate_config(compose([*ov, "data.on_bad_sample=drop"]), world)
    with pytest.raises(ConfigError, match=r"data.multiturn.train_on='first': choose all .* or last"):
        validate_config(compose([*ov, "data.multiturn.train_on=first"]), world)
    with pytest.raises(ConfigError, match=rf"data.train_files: the pattern {tmp_path}/\*.jsonl matches no file"):
        validate_config(compose([*ov, f"data.train_files={tmp_path}/*.jsonl"]), world)
    validate_config(compose([*ov, f"data.train_files={demo_dir}/*.parquet", "data.on_bad_sample=skip"]), world)
