"""JSON data files as rows: JSON lines streamed from disk batch by batch, a JSON array parsed whole.

`JsonLinesRows` reads a JSON-lines file once at construction, a line at a time, and keeps only
the byte range and line number of each non-blank line, the top-level keys seen, why each line
that is not a JSON object could not be read, and each needed column's type (`ColumnTypes`);
`batches` then reads and parses only the byte ranges of the batches asked for, so host memory is
bounded by a batch, not by the file. A `.json` file holding one JSON array is parsed whole into
a `TableRows`: an array has no line boundaries to seek to.
"""

from __future__ import annotations

import json
import re
from array import array
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa

from sft.config.errors import one_line
from sft.data.file_rows import TableRows, Wanted, check_columns
from sft.data.json_types import ColumnTypes, table_of

# Records whose types are learnt together in the first pass, at most so many rows or bytes of lines:
# bounds its memory (conversations can be large) and amortises pyarrow's per-call cost.
TYPE_CHUNK_ROWS = 1024
TYPE_CHUNK_BYTES = 1 << 20
READ_BUFFER = 1 << 20
# Line breaks as bytes.splitlines sees them, so line numbers match what editors show.
BREAK = re.compile(rb"\r\n|\r|\n")

Types = dict[str, pa.DataType | None]  # column -> Arrow type; None: JSON text


def open_json(
    path: str, required: Mapping[str, str], optional: Sequence[str]
) -> tuple[JsonLinesRows | TableRows, np.ndarray, dict[int, str]]:
    """A .jsonl/.json file's rows, the 1-based line of each row, and why each unreadable row is (its columns null)."""
    if path.endswith(".json") and _first_byte(path) == b"[":
        return _read_array(path, required, optional)
    rows = JsonLinesRows(path, required, optional)
    return rows, rows.lines, rows.problems


class JsonLinesRows:
    """A JSON-lines file's needed columns, parsed from disk batch by batch; only line offsets are kept.

    One JSON object per non-blank line. A line that is not UTF-8, not JSON or not an object is
    a row of nulls with its problem noted in `problems` (row -> why). Column types are those of
    the whole file, whichever batch is read (a column with no common type is JSON text).
    """

    def __init__(self, path: str, required: Mapping[str, str], optional: Sequence[str]) -> None:
        self.path = path
        starts, ends, lines = array("q"), array("q"), array("q")  # 8 bytes a row, unlike lists of ints
        keys: dict[str, None] = {}  # top-level keys, in order of first appearance
        self.problems: dict[int, str] = {}
        types = ColumnTypes(list(dict.fromkeys([*required, *optional])))
        chunk: list[dict[str, Any]] = []
        chunk_bytes = 0
        try:
            with open(path, "rb", buffering=READ_BUFFER) as f:
                for offset, number, raw in _lines(f):
                    if not raw.strip():
                        continue  # blank lines are not rows
                    record, problem = parse_line(raw)
                    if problem is not None:
                        self.problems[len(starts)] = problem
                    starts.append(offset)
                    ends.append(offset + len(raw))
                    lines.append(number)
                    keys.update(dict.fromkeys(record))
                    chunk.append(record)
                    chunk_bytes += len(raw)
                    if len(chunk) == TYPE_CHUNK_ROWS or chunk_bytes >= TYPE_CHUNK_BYTES:
                        types.add(chunk)
                        chunk, chunk_bytes = [], 0
        except OSError as e:
            raise _unreadable(path, e) from e
        types.add(chunk)
        self.starts, self.ends, self.lines = (np.frombuffer(a, dtype=np.int64).copy() for a in (starts, ends, lines))
        self.num_rows = len(self.starts)
        self.types = _columns(path, self.num_rows, list(keys), types.result(), required, optional)
        self.schema = table_of([], self.types).schema

    def truncate(self, rows: int) -> None:
        self.num_rows = min(rows, self.num_rows)  # max_samples: reading stops there

    def empty(self) -> pa.Table:
        """No rows, the batches' schema: the column type checks run on it before any data is read."""
        return self.schema.empty_table()

    def batches(self, size: int, wanted: Wanted = None) -> Iterator[tuple[int, pa.Table]]:
        """(first row within the file, rows) of each wanted batch of `size` rows, in order; only
        the bytes of those rows' lines are read."""
        chosen = [b for b in range((self.num_rows + size - 1) // size) if wanted is None or wanted(b)]
        if not chosen:
            return
        try:
            f = open(self.path, "rb")
        except OSError as e:
            raise _unreadable(self.path, e) from e
        with f:
            for b in chosen:
                first, end = b * size, min((b + 1) * size, self.num_rows)
                yield first, table_of(self._records(f, first, end), self.types)

    def _records(self, f: BinaryIO, first: int, end: int) -> list[dict[str, Any]]:
        base = int(self.starts[first])
        try:
            f.seek(base)
            data = f.read(int(self.ends[end - 1]) - base)
        except OSError as e:
            raise _unreadable(self.path, e) from e
        records: list[dict[str, Any]] = []
        bounds = zip((self.starts[first:end] - base).tolist(), (self.ends[first:end] - base).tolist())
        for row, (lo, hi) in enumerate(bounds, start=first):
            if row in self.problems:
                records.append({})  # already noted by the first pass
                continue
            record, problem = parse_line(data[lo:hi])
            if problem is not None:
                raise ValueError(
                    f"{self.path} line {int(self.lines[row])}: the file changed after it was first read "
                    f"({problem}); do not modify data files during a run"
                )
            records.append(record)
        return records


def parse_line(raw: bytes) -> tuple[dict[str, Any], str | None]:
    """A line's object, or {} and why it is none (not UTF-8, not JSON, not an object)."""
    try:
        item = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return {}, f"not valid UTF-8 ({e.reason} at byte {e.start}); re-encode the file as UTF-8"
    except json.JSONDecodeError as e:
        return {}, f"not valid JSON ({e.msg} at column {e.colno}); fix the line"
    return _as_record(item)


def _as_record(item: Any) -> tuple[dict[str, Any], str | None]:
    if isinstance(item, dict):
        return item, None
    return {}, f"a JSON {type(item).__name__}, not an object with the columns as keys"


def _lines(f: BinaryIO) -> Iterator[tuple[int, int, bytes]]:
    """(byte offset, 1-based line number, bytes without the break) of each line of `f`."""
    offset = number = 0
    for piece in f:  # up to and including each b"\n", read through the file's buffer
        pos = 0
        # A lone \r ends a line too; \r\n cannot straddle two pieces, which end at \n.
        for m in BREAK.finditer(piece) if b"\r" in piece else ():
            number += 1
            yield offset + pos, number, piece[pos : m.start()]
            pos = m.end()
        if pos < len(piece):
            number += 1
            yield offset + pos, number, piece[pos:].removesuffix(b"\n")
        offset += len(piece)


def _columns(
    path: str, num_rows: int, keys: list[str], types: Types, required: Mapping[str, str], optional: Sequence[str]
) -> Types:
    """The columns served: the required ones and the optional ones present, with their types."""
    if not num_rows:  # an empty file: no rows, not a missing column
        return {name: pa.null() for name in required}
    check_columns(path, keys, required)
    return {name: types[name] for name in dict.fromkeys([*required, *(n for n in optional if n in keys)])}


def _read_array(
    path: str, required: Mapping[str, str], optional: Sequence[str]
) -> tuple[TableRows, np.ndarray, dict[int, str]]:
    """A .json file holding one JSON array of objects, parsed whole; item i is named "line i+1"."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise _unreadable(path, e) from e
    try:
        items = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{path}: not a valid JSON file ({one_line(e)}); write one JSON object per line (JSON lines)"
        ) from e
    records: list[dict[str, Any]] = []
    problems: dict[int, str] = {}
    for i, item in enumerate(items):
        record, problem = _as_record(item)
        if problem is not None:
            problems[i] = problem
        records.append(record)
    types = ColumnTypes(list(dict.fromkeys([*required, *optional])))
    types.add(records)
    keys = list(dict.fromkeys(k for r in records for k in r))
    table = table_of(records, _columns(path, len(records), keys, types.result(), required, optional))
    return TableRows(table), np.arange(1, len(records) + 1, dtype=np.int64), problems


def _first_byte(path: str) -> bytes:
    """The file's first byte that is not whitespace (b"" for none), without reading it all."""
    try:
        with open(path, "rb") as f:
            while block := f.read(READ_BUFFER):
                if text := block.lstrip():
                    return text[:1]
    except OSError as e:
        raise _unreadable(path, e) from e
    return b""


def _unreadable(path: str, e: OSError) -> ValueError:
    return ValueError(f"{path}: cannot read the file ({one_line(e)}); fix its permissions or the path")
