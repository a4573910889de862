"""One data row again, by its global index, after tokenizing: where a sample's images are read back from.

The token store keeps each sample's row, not its images, so a dataset of 100k images never holds them in memory.
The loader reads a micro-batch's rows back here: a parquet file one row group at a time (the last one decoded is
kept, so neighbouring rows cost nothing more), a JSON-lines file by the byte range of the row's line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from sft.data.files import JSON_SUFFIXES


class _ParquetFile:
    def __init__(self, path: str, columns: Sequence[str]) -> None:
        self.file = pq.ParquetFile(path)
        meta = self.file.metadata
        available = set(meta.schema.to_arrow_schema().names)
        self.columns = [c for c in columns if c in available]
        counts = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.group_starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.group: tuple[int, Any] | None = None  # the last decoded row group: (index, table)

    def row(self, local: int) -> dict[str, Any]:
        g = int(np.searchsorted(self.group_starts, local, side="right")) - 1
        if self.group is None or self.group[0] != g:
            self.group = (g, self.file.read_row_group(g, columns=self.columns))
        table = self.group[1].slice(local - int(self.group_starts[g]), 1)
        return {name: table.column(name)[0].as_py() for name in table.column_names}


class _JsonLinesFile:
    def __init__(self, path: str, lines: np.ndarray) -> None:
        self.path = path
        raw = np.fromfile(path, dtype=np.uint8)
        # starts[k]: byte offset of 1-based line k+1 (line numbers are what the token store keeps for JSON rows).
        self.starts = np.concatenate([[0], np.flatnonzero(raw == ord("\n")) + 1])
        self.lines = lines
        self.size = len(raw)

    def row(self, local: int) -> dict[str, Any]:
        line = int(self.lines[local]) - 1
        lo = int(self.starts[line])
        hi = int(self.starts[line + 1]) if line + 1 < len(self.starts) else self.size
        with open(self.path, "rb") as f:
            f.seek(lo)
            return json.loads(f.read(hi - lo))


class RowReader:
    """`row(i)`: the wanted columns of global row i of `paths` (rows numbered across the files by `starts`)."""

    def __init__(self, source: Any, columns: Sequence[str]) -> None:
        self.source = source  # ParquetSource or the cache's source: paths, starts, origin(row)
        self.columns = list(columns)
        self.files: dict[str, _ParquetFile | _JsonLinesFile] = {}

    def _file(self, path: str, k: int) -> _ParquetFile | _JsonLinesFile:
        if path not in self.files:
            if path.endswith(JSON_SUFFIXES):
                lines = self.source.lines[k]
                with open(path, "rb") as f:
                    array = f.read(1) == b"["  # a .json file holding one array: no line per row
                if lines is None or array:
                    raise ValueError(f"{path}: images are read back from JSON lines or parquet files; convert it")
                self.files[path] = _JsonLinesFile(path, lines)
            else:
                self.files[path] = _ParquetFile(path, self.columns)
        return self.files[path]

    def row(self, row: int) -> dict[str, Any]:
        path, local = self.source.origin(int(row))
        k = self.source.paths.index(path)
        record = self._file(path, k).row(local)
        return {c: record.get(c) for c in self.columns}

    @staticmethod
    def folder(path: str) -> Path:
        """Relative image paths are relative to the data file's folder."""
        return Path(path).resolve().parent
