"""Reading parquet files into pyarrow Tables, one per file, without expanding them to Python.

`ParquetSource` reads only the columns a dataset needs (required and optional ones), keeps
the first `max_samples` rows across all files, and maps a global row index back to its
file and row so that every error and log line can point at the exact input row.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def normalize_paths(files: str | Sequence[str] | None) -> list[str]:
    """A path or a list of paths (`~` expanded) as a list of strings."""
    if files is None:
        raise ValueError("no parquet file given: set data.train_files (and data.val_files) to a path or a list")
    paths = [files] if isinstance(files, (str, Path)) else list(files)
    if not paths:
        raise ValueError("empty list of parquet files: give at least one path in data.train_files/val_files")
    return [str(Path(p).expanduser()) for p in paths]


class ParquetSource:
    """The needed columns of several parquet files, kept as Arrow Tables (one per file).

    Rows are numbered globally in file order; `where(row)` names the file and its local row.
    `required` maps each needed column to the config key naming it (for error messages);
    missing optional columns are simply absent from the batches that `iter_batches` yields.
    """

    def __init__(
        self,
        files: str | Sequence[str],
        required: Mapping[str, str],
        optional: Sequence[str] = (),
        max_samples: int = -1,
    ) -> None:
        self.paths = normalize_paths(files)
        self.tables: list[pa.Table] = []
        budget = max_samples if max_samples > 0 else None
        for path in self.paths:
            if budget == 0:
                break
            table = _read(path, required, optional)
            if budget is not None:
                # Keep the first N rows across the concatenation, like verl's max_samples.
                table = table.slice(0, min(budget, table.num_rows))
                budget -= table.num_rows
            self.tables.append(table)
        counts = [t.num_rows for t in self.tables]
        # starts[k] = global index of the first row of file k; starts[-1] = total rows.
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)

    @property
    def num_rows(self) -> int:
        return int(self.starts[-1])

    def origin(self, row: int) -> tuple[str, int]:
        """(file path, row within that file) of a global row index."""
        k = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self.paths[k], int(row - self.starts[k])

    def where(self, row: int) -> str:
        path, local = self.origin(row)
        return f"{path} row {local}"

    def iter_batches(
        self, batch_rows: int, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[int, range, dict[str, list[Any]]]]:
        """Yield (batch index, global row range, {column: Python values}) a few hundred rows at a
        time; with `world` > 1 only the batches with index % world == rank (the others are not
        converted at all).

        Converting slice by slice keeps peak memory at one batch of Python objects.
        """
        index = -1
        for k, table in enumerate(self.tables):
            for start in range(0, table.num_rows, batch_rows):
                index += 1
                if index % world != rank:
                    continue
                part = table.slice(start, batch_rows)
                first = int(self.starts[k]) + start
                columns = {name: part.column(name).to_pylist() for name in part.column_names}
                yield index, range(first, first + part.num_rows), columns


def _read(path: str, required: Mapping[str, str], optional: Sequence[str]) -> pa.Table:
    if not Path(path).is_file():
        raise ValueError(f"parquet file not found: {path} (check data.train_files / data.val_files)")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from e
    available = list(schema.names)
    for name, option in required.items():
        if name not in available:
            # The commonest cause: chat data read by the single-turn dataset.
            hint = " or set data.multiturn.enable=true" if "messages" in available and "multiturn" not in option else ""
            raise ValueError(
                f"{path}: column {name!r} ({option}) not found; available columns: {available}; "
                f"set {option} to one of them{hint}"
            )
    wanted = list(dict.fromkeys([*required, *(n for n in optional if n in available)]))
    # memory_map: the OS pages the file in lazily instead of copying it into the heap.
    return pq.read_table(path, columns=wanted, memory_map=True)
