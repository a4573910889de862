"""Bad rows: a fast pyarrow scan of the data before anything is tokenized, and their record.

`scan_source` checks column types, roles, contents, assistant turns and UTF-8 over Arrow columns,
a batch of rows at a time (no tokenizer, no per-row Python for list-of-struct messages), and
returns the bad rows with a reason for the first few. `BadRows` counts the rows refused (by the scan or
while tokenizing) and keeps a sample of them; `write_bad_samples` writes that sample.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sft.data.messages import ROLES, clean_messages

logger = logging.getLogger("sft")

SAMPLE = 20  # bad rows kept with their reason (logged / written to bad_samples.jsonl)
BAD_SAMPLES_FILE = "bad_samples.jsonl"
# Rows per scanned batch: vectorised enough, small enough to bound memory (~40 MB of Arrow at 5 KB a row).
SCAN_ROWS = 2048


@dataclass
class BadRows:
    """How many rows were refused, and the reasons of the first `SAMPLE` (global row -> reason)."""

    count: int = 0
    samples: dict[int, str] = field(default_factory=dict)

    def add(self, row: int, reason: str) -> None:
        self.count += 1
        self.samples[row] = reason
        self._trim()

    def merge(self, other: BadRows) -> None:
        self.count += other.count
        self.samples.update(other.samples)
        self._trim()

    def first(self) -> tuple[int, str]:
        row = min(self.samples)
        return row, self.samples[row]

    def _trim(self) -> None:
        if len(self.samples) > SAMPLE:
            self.samples = {r: self.samples[r] for r in sorted(self.samples)[:SAMPLE]}


class _Checks:
    """Row mask of one table's bad rows, with the reason of the first ones of each check."""

    def __init__(self, n: int) -> None:
        self.bad = np.zeros(n, dtype=bool)
        self.reasons: dict[int, str] = {}

    def add(self, mask: np.ndarray, reason: Callable[[int], str]) -> None:
        new = mask & ~self.bad  # a row keeps the reason of the first check it failed
        self.bad |= mask
        for r in np.flatnonzero(new)[:SAMPLE]:
            self.reasons[int(r)] = reason(int(r))


def scan_source(source: Any, check: Callable[[pa.Table, str, _Checks], None]) -> tuple[np.ndarray, BadRows]:
    """Global mask of the bad rows of a `ParquetSource` and their record; `check(table, path,
    checks)` adds the dataset's own checks after the unreadable lines and invalid UTF-8.

    Each file is walked in batches of `SCAN_ROWS` rows (parquet decoded from disk one batch at a
    time), so memory is bounded by a batch. A file's column types are checked first on its empty
    schema (a wrong type raises before any row is read). Every check is row-local, so the mask
    and the record equal a whole-file scan's.
    """
    bad = np.zeros(source.num_rows, dtype=bool)
    record = BadRows()
    for k, rows_k in enumerate(source.files):
        check(rows_k.empty(), source.paths[k], _Checks(0))
        first, end = int(source.starts[k]), int(source.starts[k + 1])
        problems = {r - first: why for r, why in source.problems.items() if first <= r < end}
        noted = np.array(sorted(problems), dtype=np.int64)  # file rows with a problem, for slicing per batch
        for start, table in rows_k.batches(SCAN_ROWS):
            checks = _Checks(table.num_rows)
            lo, hi = np.searchsorted(noted, [start, start + table.num_rows])
            here = {int(r) - start: problems[int(r)] for r in noted[lo:hi]}
            if here:
                mask = np.zeros(table.num_rows, dtype=bool)
                mask[list(here)] = True
                checks.add(mask, here.__getitem__)
            for name in table.column_names:
                _check_utf8(table.column(name).combine_chunks(), name, checks)
            check(table, source.paths[k], checks)
            at = first + start
            bad[at : at + table.num_rows] = checks.bad
            record.count += int(checks.bad.sum())
            record.samples.update({at + r: why for r, why in checks.reasons.items()})
            record._trim()
    return bad, record


# ----- UTF-8 -----
def _string_leaves(arr: pa.Array, rows: np.ndarray):
    """(string array, top-level row of each element) for every string inside `arr`."""
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        yield arr, rows
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        parents = pc.list_parent_indices(arr).to_numpy()
        yield from _string_leaves(arr.flatten(), rows[parents])
    elif pa.types.is_struct(t):
        for child in arr.flatten():
            yield from _string_leaves(child, rows)


def _check_utf8(arr: pa.Array, name: str, checks: _Checks) -> None:
    for leaf, rows in _string_leaves(arr, np.arange(len(arr))):
        try:
            leaf.validate(full=True)  # fast path: the whole leaf at once, in C++
            continue
        except pa.ArrowInvalid:
            pass
        mask = np.zeros(len(checks.bad), dtype=bool)
        where: dict[int, int] = {}
        for i, raw in enumerate(leaf.cast(pa.binary()).to_pylist()):
            if raw is None:
                continue
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                mask[rows[i]] = True
                where.setdefault(int(rows[i]), e.start)
        checks.add(
            mask,
            lambda r, where=where: f"column {name!r} is not valid UTF-8 text (byte {where[r]}); re-encode it as UTF-8",
        )


# ----- column types -----
def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


def _type_error(path: str, name: str, t: pa.DataType, expected: str) -> ValueError:
    if _is_list(t) and _is_list(t.value_type):
        return ValueError(
            f"{path}: column {name!r} is a list of lists ({t}); each row must hold {expected}: "
            "flatten the extra level when writing the file"
        )
    return ValueError(f"{path}: column {name!r} has type {t}; it must be {expected}; rewrite the column")


def _nulls(arr: pa.Array) -> np.ndarray:
    return pc.is_null(arr).to_numpy(zero_copy_only=False)


# ----- multi-turn -----
MESSAGES = "a list of messages {role, content} (or a JSON string of one)"


def scan_messages(table: pa.Table, path: str, checks: _Checks, key: str, need_assistant: bool = True) -> None:
    """Roles, contents and an assistant turn in column `key`; a wrong column type raises."""
    col = table.column(key).combine_chunks()
    t = col.type
    if pa.types.is_null(t):
        checks.add(np.ones(len(col), dtype=bool), lambda r: f"column {key!r} is null; give a list of messages")
    elif _is_text(t):
        _scan_json_messages(col, checks, key, need_assistant)
    elif _is_list(t) and pa.types.is_struct(t.value_type):
        fields = [f.name for f in t.value_type]
        for name in ("role", "content"):
            if name not in fields:
                raise ValueError(
                    f"{path}: column {key!r}: messages have no {name!r} field (fields: {fields}); "
                    "each message needs role and content"
                )
        content_type = t.value_type.field("content").type
        if not _is_text(content_type):
            raise ValueError(
                f"{path}: column {key!r}: message content has type {content_type}; it must be a string "
                "(content parts and other types are not supported); rewrite the column"
            )
        _scan_message_list(col, checks, key, need_assistant)
    else:
        raise _type_error(path, key, t, MESSAGES)


def _scan_message_list(col: pa.Array, checks: _Checks, key: str, need_assistant: bool) -> None:
    n = len(col)
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False)
    nulls = _nulls(col)
    checks.add(
        lengths == 0,
        lambda r: f"column {key!r} must be a non-empty list of messages, got {'null' if nulls[r] else 'an empty list'}",
    )
    msgs = col.flatten()  # every message of every row, in row order: [total messages]
    parents = pc.list_parent_indices(col).to_numpy()
    firsts = np.searchsorted(parents, np.arange(n))  # index of each row's first message
    role = pc.struct_field(msgs, "role")
    if not _is_text(role.type):
        role = pc.cast(role, pa.string())
    content = pc.struct_field(msgs, "content")
    assistant = pc.fill_null(pc.equal(role, "assistant"), False).to_numpy(zero_copy_only=False)

    def per_row(bad_msg: np.ndarray, say: Callable[[int, int], str]) -> None:
        mask = np.zeros(n, dtype=bool)
        mask[parents[bad_msg]] = True

        def reason(r: int) -> str:
            e = firsts[r] + int(np.argmax(bad_msg[firsts[r] : firsts[r] + lengths[r]]))
            return say(int(e - firsts[r]), e)

        checks.add(mask, reason)

    known = pc.fill_null(pc.is_in(role, value_set=pa.array(ROLES)), False).to_numpy(zero_copy_only=False)
    per_row(~known, lambda j, e: f"{key}[{j}] has role {role[e].as_py()!r}; use one of {', '.join(ROLES)}")
    calls = np.zeros(len(msgs), dtype=bool)
    if "tool_calls" in [f.name for f in msgs.type]:
        tool_calls = pc.struct_field(msgs, "tool_calls")
        has = pc.list_value_length(tool_calls) if _is_list(tool_calls.type) else pc.is_valid(tool_calls)
        calls = pc.fill_null(pc.cast(has, pa.bool_()), False).to_numpy(zero_copy_only=False)
    no_content = _nulls(content) & ~(assistant & calls)
    per_row(
        no_content,
        lambda j, e: (
            f"{key}[{j}] ({role[e].as_py()}) has no content; give a string (None only for an assistant tool call)"
        ),
    )
    if need_assistant:
        turns = np.bincount(parents[assistant], minlength=n)
        checks.add(
            (turns == 0) & (lengths > 0),
            lambda r: f"column {key!r} has no assistant message, so nothing to train on; remove the row",
        )


def _scan_json_messages(col: pa.Array, checks: _Checks, key: str, need_assistant: bool) -> None:
    """Messages stored as JSON text: parsed and checked row by row (still no tokenizer)."""
    mask = np.zeros(len(col), dtype=bool)
    reasons: dict[int, str] = {}
    marker = "\0row"
    for r in np.flatnonzero(~checks.bad):  # rows with invalid UTF-8 cannot be converted
        try:
            clean_messages(col[int(r)].as_py(), marker, key, need_assistant)
        except ValueError as e:
            mask[r] = True
            reasons[int(r)] = str(e).removeprefix(f"{marker}: ")
    checks.add(mask, reasons.__getitem__)


# ----- single-turn -----
def scan_single_turn(
    table: pa.Table, path: str, checks: _Checks, columns: Mapping[str, tuple[list[str] | None, str, bool]]
) -> None:
    """`columns`: name -> (dict keys to descend, their config key, whether chat messages are allowed)."""
    for name, (keys, option, chat_ok) in columns.items():
        col = table.column(name).combine_chunks()
        for key in keys or []:
            if not pa.types.is_struct(col.type) or key not in [f.name for f in col.type]:
                found = [f.name for f in col.type] if pa.types.is_struct(col.type) else str(col.type)
                raise ValueError(f"{path}: column {name!r} has no key {key!r} (found {found}); fix {option}")
            col = pc.struct_field(col, key)
        t = col.type
        chat = chat_ok and _is_list(t) and pa.types.is_struct(t.value_type)
        if not (_is_text(t) or chat):
            expected = "a string or a list of messages {role, content}" if chat_ok else "a string"
            raise _type_error(path, name, t, expected + (f" (after {option})" if keys else ""))
        if chat:
            scan_messages(pa.table({name: col}), path, checks, name, need_assistant=False)
        at = f" at {'.'.join(keys)}" if keys else ""
        checks.add(_nulls(col), lambda r, name=name, at=at: f"column {name!r} has no value{at} (null); give a string")


# ----- the record -----
def write_bad_samples(out_dir: str | Path, datasets: Mapping[str, Any], rank: int) -> Path | None:
    """Rank 0 writes the sample of refused rows of every split to `out_dir/bad_samples.jsonl`
    (replaced atomically; nothing is written when no row was refused)."""
    records = []
    for split, ds in datasets.items():
        bad = getattr(ds, "bad_rows", None)
        for row, reason in sorted(bad.samples.items()) if bad else []:
            path, local = ds.source.origin(row)
            records.append(
                {"split": split, "file": path, "row": local, "where": ds.source.where(row), "reason": reason}
            )
    if rank != 0 or not records:
        return None
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    target = out / BAD_SAMPLES_FILE
    tmp = out / f".{BAD_SAMPLES_FILE}.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, target)
    logger.warning("a sample of the skipped rows (%d) is in %s", len(records), target)
    return target
