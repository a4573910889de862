"""Data files (parquet or JSON lines) as one numbered sequence of rows, read in batches.

`expand_paths` turns data.train_files/val_files entries (files, globs, folders) into a
sorted list of files. `ParquetSource` reads only the columns a dataset needs (parquet and JSON
lines streamed from disk), keeps the first `max_samples` rows across all files,
notes the JSON lines it could not read, and maps a global row index back to its file and row
(or line) so every message names the input row.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from sft.data.file_rows import ParquetRows, TableRows
from sft.data.json_rows import JsonLinesRows, open_json

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
    """The needed columns of several data files, read batch by batch (`sft.data.file_rows`).

    Parquet files are streamed from disk: only their footers (schema, row counts) are kept, so
    host memory is bounded by a batch, not by the files; so are JSON-lines files, of which only
    each line's byte range is kept (`sft.data.json_rows`; a .json file holding one JSON array is
    parsed whole). Rows are numbered globally in file order; `where(row)` names the file
    and its local row (its line for JSON lines). `required` maps each needed column to the config
    key naming it (for error messages, raised here from the footer before any row is read);
    missing optional columns are simply absent from the batches. `problems[row]` says why a JSON
    line could not be read (its columns are null). Parquet columns in `binary` (encoded images) are kept as bytes.
    """

    def __init__(
        self,
        files: str | Sequence[str],
        required: Mapping[str, str],
        optional: Sequence[str] = (),
        max_samples: int = -1,
        binary: Sequence[str] = (),
    ) -> None:
        self.paths = expand_paths(files)
        self.files: list[ParquetRows | JsonLinesRows | TableRows] = []
        self.lines: list[np.ndarray | None] = []  # per file: the 1-based line of each row (JSON lines)
        self.problems: dict[int, str] = {}
        budget = max_samples if max_samples > 0 else None
        first = 0
        for path in self.paths:
            if budget == 0:
                break
            rows: ParquetRows | JsonLinesRows | TableRows
            lines: np.ndarray | None
            if path.endswith(JSON_SUFFIXES):
                rows, lines, problems = open_json(path, required, optional)
            else:
                rows, lines, problems = ParquetRows(path, required, optional, binary), None, {}
            if budget is not None:
                # Keep the first N rows across the concatenation, like verl's max_samples.
                rows.truncate(budget)
                budget -= rows.num_rows
            self.files.append(rows)
            self.lines.append(None if lines is None else lines[: rows.num_rows])
            self.problems.update({first + r: why for r, why in problems.items() if r < rows.num_rows})
            first += rows.num_rows
        counts = [f.num_rows for f in self.files]
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
        converted at all, and a parquet row group holding none of them is not even read).
        Rows where the global mask `skip` is True are left out.

        Batches are numbered per file from its first row, in file order, whatever the files' row
        groups, so every rank numbers them alike. Peak memory: one batch of Python objects plus
        the decoded batch (parquet: `ParquetRows.batches` says what a rank decodes).
        """
        base = 0  # index of file k's first batch
        for k, rows_k in enumerate(self.files):
            mine = (lambda b, base=base: (base + b) % world == rank) if world > 1 else None
            for start, part in rows_k.batches(batch_rows, mine):
                index = base + start // batch_rows
                first = int(self.starts[k]) + start
                rows = np.arange(first, first + part.num_rows)
                if skip is not None:
                    keep = ~skip[first : first + part.num_rows]
                    part, rows = part.filter(pa.array(keep)), rows[keep]
                    if not len(rows):
                        continue
                columns = {name: part.column(name).to_pylist() for name in part.column_names}
                yield index, rows.tolist(), columns
            base += (rows_k.num_rows + batch_rows - 1) // batch_rows
