"""Reading data files (parquet or JSON lines) into pyarrow Tables, one per file.

`expand_paths` turns data.train_files/val_files entries (files, globs, folders) into a
sorted list of files. `ParquetSource` reads only the columns a dataset needs, keeps the
first `max_samples` rows across all files, notes the JSON lines it could not read, and maps
a global row index back to its file and row (or line) so every message names the input row.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

JSON_SUFFIXES = (".jsonl", ".json")
DATA_SUFFIXES = (".parquet", *JSON_SUFFIXES)
FILES_KEY = "data.train_files / data.val_files"


def normalize_paths(files: str | Sequence[str] | None, key: str = FILES_KEY) -> list[str]:
    """A path or a list of paths (`~` expanded) as a list of strings, not yet expanded."""
    if files is None:
        raise ValueError(f"no data file given: set {key} to a path or a list")
    paths = [files] if isinstance(files, (str, Path)) else list(files)
    if not paths:
        raise ValueError(f"empty list of data files: give at least one path in {key}")
    return [str(Path(p).expanduser()) for p in paths]


def expand_paths(files: str | Sequence[str] | None, key: str = FILES_KEY) -> list[str]:
    """Every entry as files: a glob's matches and a folder's .parquet/.jsonl/.json files, sorted.

    A missing file, or a glob or folder that gives no data file, raises one line naming it.
    """
    out: list[str] = []
    for entry in normalize_paths(files, key):
        path = Path(entry)
        if any(c in entry for c in "*?["):
            matches = sorted(p for p in glob.glob(entry, recursive=True) if Path(p).is_file())
            if not matches:
                raise ValueError(f"{key}: the pattern {entry} matches no file (check the path and the pattern)")
            out.extend(matches)
        elif path.is_dir():
            inside = sorted(str(p) for p in path.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)
            if not inside:
                raise ValueError(
                    f"{key}: the folder {entry} holds no {', '.join(DATA_SUFFIXES)} file; point at the data files"
                )
            out.extend(inside)
        elif path.is_file():
            out.append(entry)
        else:
            raise ValueError(f"{key}: file not found: {entry} (check the path)")
    return out


class ParquetSource:
    """The needed columns of several data files, kept as Arrow Tables (one per file).

    Rows are numbered globally in file order; `where(row)` names the file and its local row
    (its line for JSON lines). `required` maps each needed column to the config key naming it
    (for error messages); missing optional columns are simply absent from the batches.
    `problems[row]` says why a JSON line could not be read (its columns are null).
    """

    def __init__(
        self,
        files: str | Sequence[str],
        required: Mapping[str, str],
        optional: Sequence[str] = (),
        max_samples: int = -1,
    ) -> None:
        self.paths = expand_paths(files)
        self.tables: list[pa.Table] = []
        self.lines: list[np.ndarray | None] = []  # per file: the 1-based line of each row (JSON lines)
        self.problems: dict[int, str] = {}
        budget = max_samples if max_samples > 0 else None
        first = 0
        for path in self.paths:
            if budget == 0:
                break
            if path.endswith(JSON_SUFFIXES):
                table, lines, problems = _read_json_lines(path, required, optional)
            else:
                table, lines, problems = _read(path, required, optional), None, {}
            if budget is not None:
                # Keep the first N rows across the concatenation, like verl's max_samples.
                table = table.slice(0, min(budget, table.num_rows))
                budget -= table.num_rows
            self.tables.append(table)
            self.lines.append(lines)
            self.problems.update({first + r: why for r, why in problems.items() if r < table.num_rows})
            first += table.num_rows
        counts = [t.num_rows for t in self.tables]
        # starts[k] = global index of the first row of file k; starts[-1] = total rows.
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)

    @property
    def num_rows(self) -> int:
        return int(self.starts[-1])

    def _locate(self, row: int) -> tuple[int, int]:
        k = int(np.searchsorted(self.starts, row, side="right")) - 1
        return k, int(row - self.starts[k])

    def origin(self, row: int) -> tuple[str, int]:
        """(file path, row within that file) of a global row index."""
        k, local = self._locate(row)
        return self.paths[k], local

    def where(self, row: int) -> str:
        k, local = self._locate(row)
        lines = self.lines[k]
        return f"{self.paths[k]} line {int(lines[local])}" if lines is not None else f"{self.paths[k]} row {local}"

    def iter_batches(
        self, batch_rows: int, rank: int = 0, world: int = 1, skip: np.ndarray | None = None
    ) -> Iterator[tuple[int, list[int], dict[str, list[Any]]]]:
        """Yield (batch index, global rows, {column: Python values}) a few hundred rows at a
        time; with `world` > 1 only the batches with index % world == rank (the others are not
        converted at all). Rows where the global mask `skip` is True are left out.

        Converting slice by slice keeps peak memory at one batch of Python objects.
        """
        index = -1
        for k, table in enumerate(self.tables):
            for start in range(0, table.num_rows, batch_rows):
                index += 1  # counted before skipping, so every rank numbers the batches alike
                if index % world != rank:
                    continue
                part = table.slice(start, batch_rows)
                first = int(self.starts[k]) + start
                rows = np.arange(first, first + part.num_rows)
                if skip is not None:
                    keep = ~skip[first : first + part.num_rows]
                    part, rows = part.filter(pa.array(keep)), rows[keep]
                    if not len(rows):
                        continue
                columns = {name: part.column(name).to_pylist() for name in part.column_names}
                yield index, rows.tolist(), columns


def _check_columns(path: str, available: list[str], required: Mapping[str, str]) -> None:
    for name, option in required.items():
        if name not in available:
            # The commonest cause: chat data read by the single-turn dataset.
            hint = " or set data.multiturn.enable=true" if "messages" in available and "multiturn" not in option else ""
            raise ValueError(
                f"{path}: column {name!r} ({option}) not found; available columns: {available}; "
                f"set {option} to one of them{hint}"
            )


def _read(path: str, required: Mapping[str, str], optional: Sequence[str]) -> pa.Table:
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(
            f"{path}: not a readable parquet file ({_one_line(e)}); replace it, or name it .jsonl if it is JSON lines"
        ) from e
    available = list(schema.names)
    _check_columns(path, available, required)
    wanted = list(dict.fromkeys([*required, *(n for n in optional if n in available)]))
    try:
        # memory_map: the OS pages the file in lazily instead of copying it into the heap.
        table = pq.read_table(path, columns=wanted, memory_map=True)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(
            f"{path}: corrupt parquet file, its data cannot be read ({_one_line(e)}); replace the file"
        ) from e
    return _text_not_bytes(table)


def _text_not_bytes(table: pa.Table) -> pa.Table:
    """Binary columns (text written as bytes) as strings; invalid UTF-8 is found by the scan."""
    fields = [pa.field(f.name, _string_type(f.type)) for f in table.schema]
    target = pa.schema(fields)
    # safe=False: keep invalid UTF-8 for the scan to name its rows instead of failing here.
    return table if target == table.schema else table.cast(target, safe=False)


def _string_type(t: pa.DataType) -> pa.DataType:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return pa.string()
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pa.list_(_string_type(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _string_type(f.type)) for f in t])
    return t


def _read_json_lines(
    path: str, required: Mapping[str, str], optional: Sequence[str]
) -> tuple[pa.Table, np.ndarray, dict[int, str]]:
    """One JSON object per non-blank line (or a JSON array of objects in a .json file).

    A line that is not UTF-8, not JSON or not an object becomes a row of nulls with its
    problem noted; a column whose values have no common Arrow type (e.g. content a string in
    one row, a number in another) is kept as JSON text, which the scan checks row by row.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the file ({_one_line(e)}); fix its permissions or the path") from e
    records: list[dict[str, Any]] = []
    lines: list[int] = []
    problems: dict[int, str] = {}
    if path.endswith(".json") and data.lstrip()[:1] == b"[":
        items = _json_array(path, data)
        numbered = [(i + 1, item, None) for i, item in enumerate(items)]
    else:
        numbered = [(n, None, raw) for n, raw in enumerate(data.splitlines(), start=1) if raw.strip()]
    for n, item, raw in numbered:
        if raw is not None:
            try:
                item = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                problems[len(records)] = f"not valid UTF-8 ({e.reason} at byte {e.start}); re-encode the file as UTF-8"
            except json.JSONDecodeError as e:
                problems[len(records)] = f"not valid JSON ({e.msg} at column {e.colno}); fix the line"
        if not isinstance(item, dict) and len(records) not in problems:
            problems[len(records)] = f"a JSON {type(item).__name__}, not an object with the columns as keys"
        records.append(item if isinstance(item, dict) else {})
        lines.append(n)
    if not records:  # an empty file: no rows, not a missing column
        return pa.table({name: pa.nulls(0) for name in required}), np.zeros(0, np.int64), {}
    available = list(dict.fromkeys(k for r in records for k in r))
    _check_columns(path, available, required)
    wanted = list(dict.fromkeys([*required, *(n for n in optional if n in available)]))
    columns = {}
    for name in wanted:
        values = [r.get(name) for r in records]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            columns[name] = pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values])
    return pa.table(columns), np.asarray(lines, dtype=np.int64), problems


def _json_array(path: str, data: bytes) -> list[Any]:
    try:
        items = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{path}: not a valid JSON file ({_one_line(e)}); write one JSON object per line (JSON lines)"
        ) from e
    return items


def _one_line(exc: BaseException) -> str:
    # Arrow's messages can span lines; ours are one line.
    return " ".join(str(exc).split())
