"""One data file's rows, read batch by batch: a parquet file streamed from disk, a table in memory.

`ParquetRows` keeps only a parquet file's footer facts (schema, row count, rows per row group) and
decodes rows on demand, the row groups that hold the wanted batches and nothing else, so host
memory is bounded by a batch plus one page buffer per column, never by the file. `TableRows` serves
an Arrow table already in memory (a .json file holding one JSON array) through the same interface;
JSON lines are streamed by `sft.data.json_rows.JsonLinesRows`. All number their
batches from the file's first row, `size` rows each, so the numbering never depends on how the
file was written (row group sizes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sft.config.errors import one_line

# Parquet read buffer per column: pages are read through it instead of whole column chunks
# (a column chunk of a big row group can be gigabytes; pre-buffering would read it all at once).
READ_BUFFER = 1 << 20

Wanted = Callable[[int], bool] | None  # which batch numbers (within the file) to return; None: all


def check_columns(path: str, available: list[str], required: Mapping[str, str]) -> None:
    for name, option in required.items():
        if name not in available:
            # The commonest cause: chat data read by the single-turn dataset.
            hint = " or set data.multiturn.enable=true" if "messages" in available and "multiturn" not in option else ""
            raise ValueError(
                f"{path}: column {name!r} ({option}) not found; available columns: {available}; "
                f"set {option} to one of them{hint}"
            )


class TableRows:
    """A table in memory (a JSON array file), served in batches."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table
        self.num_rows = table.num_rows

    def truncate(self, rows: int) -> None:
        self.table = self.table.slice(0, min(rows, self.table.num_rows))
        self.num_rows = self.table.num_rows

    def empty(self) -> pa.Table:
        return self.table.schema.empty_table()

    def batches(self, size: int, wanted: Wanted = None) -> Iterator[tuple[int, pa.Table]]:
        """(first row within the file, rows) of each wanted batch of `size` rows, in order."""
        for b, start in enumerate(range(0, self.num_rows, size)):
            if wanted is None or wanted(b):
                yield start, self.table.slice(start, size)


class ParquetRows:
    """A parquet file's needed columns, read from disk batch by batch; only the footer is kept."""

    def __init__(
        self, path: str, required: Mapping[str, str], optional: Sequence[str], binary: Sequence[str] = ()
    ) -> None:
        self.path = path
        try:
            meta = pq.read_metadata(path)
            schema = meta.schema.to_arrow_schema()
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(
                f"{path}: not a readable parquet file ({one_line(e)}); replace it, or name it .jsonl if it is JSON lines"
            ) from e
        available = list(schema.names)
        check_columns(path, available, required)
        self.columns = list(dict.fromkeys([*required, *(n for n in optional if n in available)]))
        # Text written as bytes is read as text; `binary` columns (encoded images) stay bytes.
        self.schema = pa.schema(
            [
                pa.field(n, schema.field(n).type if n in binary else _string_type(schema.field(n).type))
                for n in self.columns
            ]
        )
        # group_starts[g] = first row of row group g; group_starts[-1] = the file's rows.
        counts = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.group_starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        self.num_rows = int(self.group_starts[-1])

    def truncate(self, rows: int) -> None:
        self.num_rows = min(rows, self.num_rows)  # max_samples: reading stops there

    def empty(self) -> pa.Table:
        """No rows, the batches' schema: the column type checks run on it before any data is read."""
        return self.schema.empty_table()

    def batches(self, size: int, wanted: Wanted = None) -> Iterator[tuple[int, pa.Table]]:
        """(first row within the file, rows) of each wanted batch of `size` rows, in order.

        What is decoded: only the row groups that hold at least one wanted batch, one record
        batch of `size` rows at a time; rows of those groups outside the wanted batches are
        decoded and dropped (a row group is the smallest unit parquet reads). With row groups
        much larger than `size` x ranks that is every row group, but never more than one batch
        of them in memory at once.
        """
        n = self.num_rows
        chosen = [b for b in range((n + size - 1) // size) if wanted is None or wanted(b)]
        if not chosen:
            return
        groups: set[int] = set()
        for b in chosen:
            first = np.searchsorted(self.group_starts, b * size, side="right") - 1
            last = np.searchsorted(self.group_starts, min((b + 1) * size, n) - 1, side="right") - 1
            groups.update(range(int(first), int(last) + 1))
        keep = set(chosen)
        for run in _runs(sorted(groups)):
            yield from self._read_run(run, size, keep)

    def _read_run(self, run: list[int], size: int, keep: set[int]) -> Iterator[tuple[int, pa.Table]]:
        """Batches of consecutive row groups `run`; a wanted batch never straddles two runs."""
        pos = int(self.group_starts[run[0]])
        parts: list[pa.RecordBatch] = []
        for rb in self._record_batches(run, size):
            while len(rb) and pos < self.num_rows:
                b = pos // size
                end = min((b + 1) * size, self.num_rows)
                take = min(end - pos, len(rb))
                if b in keep:
                    parts.append(rb.slice(0, take))
                pos += take
                rb = rb.slice(take)
                if pos == end and parts:
                    table = pa.Table.from_batches(parts)
                    parts = []
                    yield b * size, _text_not_bytes(table, self.schema)
            if pos >= self.num_rows:
                return  # max_samples: the rest of the file is not decoded

    def _record_batches(self, groups: list[int], size: int) -> Iterator[pa.RecordBatch]:
        """The record batches of `groups`, a read error turned into one line naming the file."""
        try:
            pf = pq.ParquetFile(self.path, pre_buffer=False, buffer_size=READ_BUFFER)
        except (pa.ArrowException, OSError) as e:
            raise _corrupt(self.path, e) from e
        with pf:
            it = pf.iter_batches(batch_size=size, row_groups=groups, columns=self.columns)
            while True:
                try:
                    rb = next(it)
                except StopIteration:
                    return
                except (pa.ArrowException, OSError) as e:
                    raise _corrupt(self.path, e) from e
                yield rb


def _corrupt(path: str, e: BaseException) -> ValueError:
    return ValueError(f"{path}: corrupt parquet file, its data cannot be read ({one_line(e)}); replace the file")


def _runs(groups: list[int]) -> list[list[int]]:
    """[0, 1, 2, 5, 6] -> [[0, 1, 2], [5, 6]]: each run is read by one sequential reader."""
    runs: list[list[int]] = []
    for g in groups:
        if runs and runs[-1][-1] == g - 1:
            runs[-1].append(g)
        else:
            runs.append([g])
    return runs


def _text_not_bytes(table: pa.Table, target: pa.Schema) -> pa.Table:
    """Binary columns (text written as bytes) as strings; invalid UTF-8 is found by the scan."""
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
