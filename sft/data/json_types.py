"""Arrow columns of JSON records: each column's type decided once for the whole file.

`ColumnTypes` learns the type pyarrow would infer from a whole column while seeing it a chunk
of rows at a time, so a JSON-lines file read in batches gives every batch the same types as
reading the file at once (a batch's values never depend on which rows share it). `table_of`
builds a batch's table with those types; a column with no common type is JSON text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

# Integers beyond this magnitude have no exact double: pyarrow refuses to put them in a double column.
EXACT_IN_DOUBLE = 2**53
CONVERT_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError)

Place = tuple[str | None, ...]  # a place inside a nested type: struct field names, None for a list item


class ColumnTypes:
    """The Arrow type of each named column over all rows added; None: no common type (JSON text).

    Chunk types are merged as inference merges values (null widens to anything, int64 to double,
    struct fields are united in order of first appearance, anything else conflicts). One thing
    inference refuses that merging types would allow: an integer beyond 2**53 where the merged
    type holds doubles; the places of such integers are kept and checked by `result`.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.types: dict[str, pa.DataType | None] = {name: pa.null() for name in names}
        self.big_ints: dict[str, set[Place]] = {name: set() for name in names}

    def add(self, records: Sequence[Mapping[str, Any]]) -> None:
        if not records:
            return
        for name, known in self.types.items():
            if known is None:
                continue  # already text: no type to learn
            try:
                arr = pa.array([r.get(name) for r in records])
                self.types[name] = _merge(known, arr.type)
            except CONVERT_ERRORS:
                self.types[name] = None
                continue
            self.big_ints[name].update(_big_int_places(arr, ()))

    def result(self) -> dict[str, pa.DataType | None]:
        out: dict[str, pa.DataType | None] = {}
        for name, t in self.types.items():
            inexact = t is not None and any(pa.types.is_floating(_at(t, p)) for p in self.big_ints[name])
            out[name] = None if inexact else t
        return out


def table_of(records: Sequence[Mapping[str, Any]], types: Mapping[str, pa.DataType | None]) -> pa.Table:
    """The columns `types` names, of `records` (a missing key is null)."""
    return pa.table({name: column([r.get(name) for r in records], t) for name, t in types.items()})


def column(values: list[Any], t: pa.DataType | None) -> pa.Array:
    if t is None:
        # No common type: JSON text, which the scan checks row by row.
        return pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values], pa.string())
    return pa.array(values, type=t)


def _merge(a: pa.DataType, b: pa.DataType) -> pa.DataType:
    if a == b:
        return a
    schemas = [pa.schema([pa.field("x", a)]), pa.schema([pa.field("x", b)])]
    return pa.unify_schemas(schemas, promote_options="permissive").field("x").type


def _big_int_places(arr: pa.Array, place: Place) -> Iterator[Place]:
    t = arr.type
    if pa.types.is_integer(t):
        bounds = pc.min_max(arr).as_py()
        if bounds["min"] is not None and max(-bounds["min"], bounds["max"]) > EXACT_IN_DOUBLE:
            yield place
    elif pa.types.is_list(t):
        yield from _big_int_places(arr.flatten(), (*place, None))
    elif pa.types.is_struct(t):
        for field, child in zip(t, arr.flatten()):
            yield from _big_int_places(child, (*place, field.name))


def _at(t: pa.DataType, place: Place) -> pa.DataType:
    for step in place:
        t = t.value_type if step is None else t.field(step).type
    return t
