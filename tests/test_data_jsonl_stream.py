"""JSON-lines files are streamed: same result as parsing the whole file, memory bounded by a batch.

The expectation is a whole-file reader written here (split the bytes into lines, parse each,
let pyarrow infer each column from all its rows at once), so it does not depend on how
`JsonLinesRows` indexes lines or decides column types.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from sft.config.schema import DataConfig
from sft.data import files, json_rows, scan, store_build
from sft.data.build import build_dataset
from sft.data.file_rows import TableRows
from sft.data.files import ParquetSource
from sft.data.json_types import ColumnTypes
from sft.data.scan import write_bad_samples

COLS = {"messages": "data.multiturn.messages_key"}
OPTIONAL = ["tools", "enable_thinking"]


def chat_cfg(max_length: int = 256) -> DataConfig:
    cfg = DataConfig(train_files="unused", max_length=max_length, truncation="right", on_bad_sample="skip")
    cfg.multiturn.enable = True
    return cfg


def whole_file(path: str, required, optional):
    """Reference: the file read at once, each column inferred by pyarrow from all its rows."""
    records, lines, problems = [], [], {}
    for number, raw in enumerate(Path(path).read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        why = None
        try:
            item = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            item, why = None, f"not valid UTF-8 ({e.reason} at byte {e.start}); re-encode the file as UTF-8"
        except json.JSONDecodeError as e:
            item, why = None, f"not valid JSON ({e.msg} at column {e.colno}); fix the line"
        if why is None and not isinstance(item, dict):
            why = f"a JSON {type(item).__name__}, not an object with the columns as keys"
        if why is not None:
            problems[len(records)] = why
        records.append(item if isinstance(item, dict) else {})
        lines.append(number)
    keys = {k for r in records for k in r}
    columns = {}
    for name in [*required, *(n for n in optional if n in keys)]:
        values = [r.get(name) for r in records]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            columns[name] = pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values])
    return TableRows(pa.table(columns)), np.asarray(lines, dtype=np.int64), problems


def tool(default: float) -> dict:
    param = {"type": "number", "default": default}
    return {"type": "function", "function": {"name": "scale", "parameters": {"properties": {"x": param}}}}


def chat(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Sort: {i % 7} {i}"}, {"role": "assistant", "content": f"{i} {i % 7}"}]


def line(record: object) -> bytes:
    return json.dumps(record).encode()


@pytest.fixture
def messy(tmp_path: Path) -> str:
    """40 lines; every kind of unreadable line; `messages` mixes a list and an empty list early with
    a number content late (JSON text for the whole file), `tools` an integer default early with a
    float one late (double for the whole file); blank lines and one \\r\\n break shift the line numbers."""
    out = []
    for i in range(40):
        if i == 3:
            out.append(b"")
        rec: dict = {"messages": chat(i)}
        if i % 5 == 1:
            rec["tools"] = [tool(1)]
        if i == 2:
            rec["messages"] = []  # whole-file text: "got list"; a typed batch would say "got an empty list"
        if i == 33:
            rec["messages"][1]["content"] = 7
        if i == 36:
            rec["tools"] = [tool(2.5)]
        if i == 30:
            rec["enable_thinking"] = False
        raw = line(rec)
        if i == 5:
            raw = raw.replace(b"Sort", b"S\xffrt")  # not UTF-8
        elif i == 9:
            raw = raw[:-1]  # not JSON
        elif i == 12:
            raw = b"[1, 2]"  # not an object
        elif i == 20:
            raw = line({"other": 1})  # no messages column
        elif i == 25:
            raw += b"\r"  # a \r\n break
        out.append(raw)
        if i == 17:
            out.append(b"   ")
    path = tmp_path / "messy.jsonl"
    path.write_bytes(b"\n".join(out) + b"\n")
    return str(path)


def test_streamed_build_is_identical_to_a_whole_file_build(messy, tmp_path, demo_tokenizer, monkeypatch):
    monkeypatch.setattr(json_rows, "TYPE_CHUNK_ROWS", 3)  # the first pass learns the types in pieces
    monkeypatch.setattr(scan, "SCAN_ROWS", 3, raising=False)  # batches that split the mixed types apart
    monkeypatch.setattr(store_build, "BATCH_ROWS", 4)
    streamed = build_dataset(messy, demo_tokenizer, chat_cfg(), pad_to_max_length=False)
    with monkeypatch.context() as m:
        m.setattr(files, "open_json", whole_file)
        reference = build_dataset(messy, demo_tokenizer, chat_cfg(), pad_to_max_length=False)
    assert reference.bad_rows.count == streamed.bad_rows.count == 6
    assert reference.bad_rows.samples == streamed.bad_rows.samples
    for name in ("input_ids", "loss_mask", "lengths", "rows"):
        assert np.array_equal(getattr(reference, name), getattr(streamed, name)), name
    assert len(streamed) == 34
    assert [streamed.where(i) for i in range(len(streamed))] == [reference.where(i) for i in range(len(reference))]
    reports = []
    for name, ds in (("streamed", streamed), ("reference", reference)):
        written = write_bad_samples(tmp_path / name, {"train": ds}, rank=0)
        reports.append(written.read_text())
    assert reports[0] == reports[1]
    # Independent of the reference: the reasons and where they are, by line.
    by_where = {streamed.source.where(r): why for r, why in streamed.bad_rows.samples.items()}
    assert by_where[f"{messy} line 3"].endswith("must be a non-empty list of messages, got list")
    assert by_where[f"{messy} line 7"].startswith("not valid UTF-8 (invalid start byte at byte")
    assert by_where[f"{messy} line 11"].startswith("not valid JSON")
    assert by_where[f"{messy} line 14"].startswith("a JSON list, not an object")
    assert by_where[f"{messy} line 23"].endswith("got NoneType")  # the row with no messages
    assert by_where[f"{messy} line 36"] == "messages[1] content is a int; give a string"
    assert f"{messy} line 28" in [streamed.where(i) for i in range(len(streamed))]  # after the \r\n line
    # The tools default is a double in every row, as whole-file inference makes it.
    texts = [demo_tokenizer.decode(streamed.input_ids[o : o + n]) for o, n in zip(streamed.offsets, streamed.lengths)]
    with_tools = [t for t in texts if '"default"' in t]
    assert len(with_tools) == 8 and all('"default": 1.0' in t or '"default": 2.5' in t for t in with_tools)


@pytest.mark.parametrize("max_samples", [-1, 12])
def test_two_ranks_read_disjoint_batches_covering_all_rows(messy, tmp_path, max_samples, monkeypatch):
    second = tmp_path / "second.jsonl"
    second.write_bytes(b"".join(line({"messages": chat(i), "tools": [tool(i / 2)]}) + b"\n\n" for i in range(9)))
    paths = [messy, str(second)]
    monkeypatch.setattr(json_rows, "TYPE_CHUNK_ROWS", 3)
    src = ParquetSource(paths, COLS, OPTIONAL, max_samples=max_samples)
    with monkeypatch.context() as m:
        m.setattr(files, "open_json", whole_file)
        ref = ParquetSource(paths, COLS, OPTIONAL, max_samples=max_samples)
    n = ref.num_rows
    assert src.num_rows == n == (12 if max_samples == 12 else 49)
    assert src.problems == ref.problems and len(src.problems) == (2 if max_samples == 12 else 3)
    assert [src.where(r) for r in range(n)] == [ref.where(r) for r in range(n)]
    expected = {}
    for _, rows, columns in ref.iter_batches(n):
        expected.update({r: {k: v[j] for k, v in columns.items()} for j, r in enumerate(rows)})
    seen: dict[int, list[int]] = {}
    for rank in (0, 1):
        for index, rows, columns in src.iter_batches(5, rank, 2):
            assert index % 2 == rank and index not in seen
            seen[index] = rows
            assert [{k: v[j] for k, v in columns.items()} for j in range(len(rows))] == [expected[r] for r in rows]
    all_rows = [r for i in sorted(seen) for r in seen[i]]
    assert all_rows == list(range(n))  # disjoint, and together every row once
    if max_samples == -1:
        assert seen[8] == [40, 41, 42, 43, 44]  # the second file's batches start at its first row


def test_a_line_changed_after_the_first_pass_is_named(messy):
    src = ParquetSource(messy, COLS, OPTIONAL)
    data = Path(messy).read_bytes()
    Path(messy).write_bytes(data.replace(b'"Sort: 3 38"', b'"Sort: 3 38 '))  # row 38, line 41, same length
    with pytest.raises(
        ValueError, match=rf"{messy} line 41: the file changed after it was first read \(not valid JSON"
    ):
        list(src.iter_batches(8))


@pytest.mark.parametrize(
    "chunks",
    [
        [[1], [1.5]],
        [[1.5], [2**60]],  # a double and an integer it cannot hold exactly: text
        [[2**53], [1.5]],  # exactly representable: double
        [[{"a": 1}], [{"b": "x", "a": None}]],
        [[[{"x": 2**60}]], [[{"x": 0.5}]]],
        [[True], [1]],
        [[1], ["a"]],
        [[None], [[]], [[{"x": [1]}]]],
        [[2**64], [1]],
    ],
)
def test_column_types_equal_whole_column_inference(chunks):
    whole = [v for chunk in chunks for v in chunk]
    try:
        expected = pa.array(whole).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        expected = None
    types = ColumnTypes(["c"])
    for chunk in chunks:
        types.add([{"c": v} for v in chunk])
    assert types.result()["c"] == expected


def test_memory_stays_far_below_the_file(tmp_path, demo_tokenizer, monkeypatch):
    """A 27 MB file of 8,000 conversations, 31 scan batches of 256 rows; most rows lack an
    assistant turn, so the scan refuses them cheaply and only a few are tokenised."""
    monkeypatch.setattr(scan, "SCAN_ROWS", 256, raising=False)  # the file holds many batches
    rng = np.random.default_rng(0)
    words = np.array([f"w{i}" for i in range(3000)])
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        for i in range(8000):
            convo = [{"role": "user", "content": " ".join(rng.choice(words, 600))}]
            if i % 500 == 0:
                convo.append({"role": "assistant", "content": "ok"})
            f.write(line({"messages": convo}) + b"\n")
    size = path.stat().st_size
    assert size > 20e6
    tracemalloc.start()
    try:
        Path(path).read_bytes()  # what the tracer reports for a whole read: the file's size
        whole_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        ds = build_dataset(str(path), demo_tokenizer, chat_cfg(4096), pad_to_max_length=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(ds) == 16 and ds.bad_rows.count == 8000 - 16
    assert whole_peak >= size
    # Measured: ~2.5 MB streamed; reading the file whole peaks above its size (27 MB).
    assert peak < size / 6, (peak, size)
