"""Instance records gathered for one index commit, as one Arrow table.

Workers send instances column by column, run-length coded
(:class:`~fastscp.index.records.InstanceColumns`). The indexer keeps the runs as
they come and expands them once per commit, in C (``numpy.repeat`` and an
Arrow ``take``): the values the instances of a series share (patient,
study, series, AE titles, image geometry) cost nothing per instance.
Per-instance Python work was what capped the indexer's insert rate
(bench/test_bench_index.py::test_indexer_sustained_rate).
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fastscp.dicom.fields import HeaderFields
from fastscp.index.records import INSTANCE_COLUMNS, InstanceColumns, InstanceRecord, transpose

_ARROW_OF = {str: pa.string(), int: pa.int64(), float: pa.float64()}


def value_type(annotation: object) -> type:
    """The type of a field's values: ``int`` for ``int | None`` (None is SQL's NULL)."""
    (base,) = set(typing.get_args(annotation) or (annotation,)) - {type(None)}
    return base  # type: ignore[no-any-return]


_HINTS = {**typing.get_type_hints(InstanceRecord), **typing.get_type_hints(HeaderFields), "attributes_base": int}
#: Columns of :meth:`InstanceBatch.table`: every instance column; received_at as a UTC timestamp.
SCHEMA = pa.schema([
    (name, pa.timestamp("us") if name == "received_at" else _ARROW_OF[value_type(_HINTS[name])])
    for name in INSTANCE_COLUMNS
])


def timestamps(seconds: pa.Array) -> pa.Array:
    """Seconds since the epoch (float64) as timestamp[us] (DuckDB's TIMESTAMP, UTC)."""
    micros = pc.round(pc.multiply(seconds, 1_000_000.0))
    return pc.cast(micros, pa.int64()).cast(pa.timestamp("us"))


class InstanceBatch:
    """Instance records by column, as runs of equal values, until :meth:`table` expands them."""

    def __init__(self) -> None:
        self.count = 0
        self._values: list[list[Any]] = [[] for _ in INSTANCE_COLUMNS]
        self._run_lengths: list[list[int]] = [[] for _ in INSTANCE_COLUMNS]
        #: The base attribute maps of the instances, by id (for the ``attribute_maps`` table).
        self.maps: dict[int, str] = {}

    @classmethod
    def of(cls, records: Sequence[InstanceRecord]) -> InstanceBatch:
        batch = cls()
        columns, maps = transpose(records)
        batch.add(InstanceColumns(len(records), [list(column) for column in columns],
                                  [None] * len(INSTANCE_COLUMNS), maps))
        return batch

    def add(self, columns: InstanceColumns) -> None:
        self.maps.update(columns.maps)
        ones = [1] * columns.count
        for values, run_lengths, new_values, new_lengths in zip(
            self._values, self._run_lengths, columns.values, columns.run_lengths, strict=True
        ):
            values += new_values
            run_lengths += ones if new_lengths is None else new_lengths
        self.count += columns.count

    def table(self) -> pa.Table:
        """One row per instance, in the order they were added (:data:`SCHEMA`)."""
        arrays = []
        for field, values, run_lengths in zip(SCHEMA, self._values, self._run_lengths, strict=True):
            array = pa.array(values, type=pa.float64() if field.name == "received_at" else field.type)
            if len(values) != self.count:
                array = array.take(np.repeat(np.arange(len(values)), run_lengths))
            arrays.append(timestamps(array) if field.name == "received_at" else array)
        return pa.Table.from_arrays(arrays, schema=SCHEMA)


def last_per_path(table: pa.Table) -> pa.Table:
    """The table with one row per path, the last one (a resend may come twice in one batch)."""
    if pc.count_distinct(table["path"]).as_py() == table.num_rows:
        return table
    last = {path: n for n, path in enumerate(table["path"].to_pylist())}
    return table.take(sorted(last.values()))


def distinct_rows(table: pa.Table, fields: Sequence[str]) -> dict[object, tuple[object, ...]]:
    """The values of ``fields`` by the first field (a key), the last row of each key winning.

    Only the first row of each run of equal rows is turned into Python
    objects: a batch holds a few hundred series, not 10k.
    """
    if table.num_rows == 0:
        return {}
    columns = [table[name].combine_chunks() for name in fields]
    # Row n starts a run when any field differs from row n - 1. null != null
    # is null, counted as a difference: an extra row is harmless.
    differs = [pc.fill_null(pc.not_equal(column[1:], column[:-1]), True) for column in columns]
    changed = functools.reduce(pc.or_, differs)
    after_first = pc.add(pc.indices_nonzero(changed), pa.scalar(1, pa.uint64()))
    starts = pa.concat_arrays([pa.array([0], type=pa.uint64()), after_first])
    rows = zip(*(column.take(starts).to_pylist() for column in columns), strict=True)
    return {row[0]: row for row in rows}
