"""The DuckDB index: schema, migrations and batched writes.

This module and :mod:`fastscp.query` (which reads) are the only code that
talks to DuckDB.  The index holds one row per stored file in ``instances``
and one row per patient, study and series in ``patients``, ``studies`` and
``series`` (the attributes of the newest instance win), plus the
``duplicate_conflicts`` log.  Study, series and patient counts and sizes are
derived from ``instances`` (the ``*_counts`` views, and the query builder's
own restricted aggregates), so a write never has to update them.  Column
names are the DICOM keywords in snake_case, as in
:class:`~fastscp.header.HeaderFields`.

Writes come in batches through Arrow, one INSERT per table and batch, never
row by row (~1k rows/s row by row against 100k+ rows/s from Arrow here).
"""

from __future__ import annotations

import gc
import logging
import threading
import types
import typing
from collections.abc import Iterable, Sequence

import duckdb
import msgspec
import pyarrow as pa
import pyarrow.compute as pc

from fastscp.header import HeaderFields
from fastscp.records import DuplicateConflict, InstanceRecord, ThumbnailMade

log = logging.getLogger("fastscp.index")

SCHEMA_VERSION = 2

# -- columns -----------------------------------------------------------------------

_SQL_OF = {str: "VARCHAR", int: "BIGINT", float: "DOUBLE"}
_ARROW_OF = {str: pa.string(), int: pa.int64(), float: pa.float64()}


def _python_type(annotation: object) -> type:
    if isinstance(annotation, types.UnionType):
        (base,) = set(typing.get_args(annotation)) - {type(None)}
        return base  # type: ignore[no-any-return]
    return annotation  # type: ignore[return-value]


_HEADER_TYPES: dict[str, type] = {
    name: _python_type(annotation) for name, annotation in typing.get_type_hints(HeaderFields).items()
}

#: Header fields kept per patient, study and series; the first is the key,
#: the second (studies, series) the key of the parent.
PATIENT_FIELDS: tuple[str, ...] = ("patient_id", "patient_name", "patient_birth_date", "patient_sex")
STUDY_FIELDS: tuple[str, ...] = (
    "study_instance_uid", "patient_id", "study_date", "study_time", "study_id", "accession_number",
    "study_description", "referring_physician_name", "requesting_physician",
)
SERIES_FIELDS: tuple[str, ...] = (
    "series_instance_uid", "study_instance_uid", "series_number", "modality", "series_description",
    "body_part_examined",
)
#: Header fields kept per instance: the rest, plus where it belongs (its own
#: header is the truth about that) and, for simple SQL and stats without a
#: join, its Patient ID and Modality.
_INSTANCE_KEYS = ("sop_instance_uid", "series_instance_uid", "study_instance_uid", "patient_id", "modality")
INSTANCE_HEADER_FIELDS: tuple[str, ...] = _INSTANCE_KEYS + tuple(
    name for name in _HEADER_TYPES if name not in {*PATIENT_FIELDS, *STUDY_FIELDS, *SERIES_FIELDS, *_INSTANCE_KEYS}
)
#: Facts about the received file (not in its header), per instance.
FILE_COLUMNS: dict[str, str] = {
    "path": "VARCHAR",  # relative to the storage root; the key: keep-both may store a UID twice
    "size": "BIGINT",  # bytes of the whole Part 10 file
    "content_hash": "VARCHAR",  # SHA-256 (hex) of the data set, "" if not computed
    "transfer_syntax_uid": "VARCHAR",
    "calling_ae_title": "VARCHAR",
    "called_ae_title": "VARCHAR",
    "peer_address": "VARCHAR",
    "received_at": "TIMESTAMP",  # UTC
}
CONFLICT_COLUMNS: dict[str, str] = {
    "sop_instance_uid": "VARCHAR",
    "path": "VARCHAR",
    "existing_hash": "VARCHAR",
    "new_hash": "VARCHAR",
    "policy": "VARCHAR",
    "outcome": "VARCHAR",
    "new_path": "VARCHAR",
    "calling_ae_title": "VARCHAR",
    "received_at": "TIMESTAMP",  # UTC
}


def _header_columns(fields: Sequence[str]) -> dict[str, str]:
    return {name: _SQL_OF[_HEADER_TYPES[name]] for name in fields}


TABLES: dict[str, dict[str, str]] = {
    "patients": _header_columns(PATIENT_FIELDS),
    "studies": _header_columns(STUDY_FIELDS),
    "series": _header_columns(SERIES_FIELDS),
    "instances": {**FILE_COLUMNS, **_header_columns(INSTANCE_HEADER_FIELDS)},
    "duplicate_conflicts": CONFLICT_COLUMNS,
    # Thumbnails made by the post-store stage (both paths relative to the
    # storage root). Their own table: a thumbnail may be reported before its
    # instance's batch is committed, and instance inserts stay narrow.
    "thumbnails": {"path": "VARCHAR", "thumbnail_path": "VARCHAR"},
}
_PRIMARY_KEY = {"patients": "patient_id", "studies": "study_instance_uid", "series": "series_instance_uid",
                "instances": "path", "thumbnails": "path"}


def quote(name: str) -> str:
    """A column name as a SQL identifier ("rows" and "columns" are keywords)."""
    return f'"{name}"'


def _create_table(table: str) -> str:
    key = _PRIMARY_KEY.get(table)
    columns = ", ".join(
        f"{quote(name)} {sql}{' PRIMARY KEY' if name == key else ''}" for name, sql in TABLES[table].items()
    )
    return f"CREATE TABLE {table} ({columns})"


# Derived counts for people reading the index with SQL; the query builder
# computes the same numbers restricted to the rows it returns.
_VIEWS = (
    """CREATE VIEW series_counts AS
       SELECT series_instance_uid, count(*) AS number_of_series_related_instances, sum(size) AS series_size
       FROM instances GROUP BY series_instance_uid""",
    """CREATE VIEW study_counts AS
       SELECT study_instance_uid, count(DISTINCT series_instance_uid) AS number_of_study_related_series,
              count(*) AS number_of_study_related_instances, sum(size) AS study_size
       FROM instances GROUP BY study_instance_uid""",
    """CREATE VIEW patient_counts AS
       SELECT st.patient_id, count(DISTINCT i.study_instance_uid) AS number_of_patient_related_studies,
              count(DISTINCT i.series_instance_uid) AS number_of_patient_related_series,
              count(*) AS number_of_patient_related_instances, sum(i.size) AS patient_size
       FROM instances i JOIN studies st ON st.study_instance_uid = i.study_instance_uid
       GROUP BY st.patient_id""",
)

# -- Arrow batches -------------------------------------------------------------------


def _arrow_type(table: str, name: str) -> pa.DataType:
    sql = TABLES[table][name]
    return {"VARCHAR": pa.string(), "BIGINT": pa.int64(), "DOUBLE": pa.float64(),
            "TIMESTAMP": pa.timestamp("us")}[sql]


_SCHEMAS = {table: pa.schema([(name, _arrow_type(table, name)) for name in TABLES[table]]) for table in TABLES}
_RECORD_FIELDS = {name: n for n, name in enumerate(InstanceRecord.__struct_fields__)}
_HEADER_FIELDS = {name: n for n, name in enumerate(HeaderFields.__struct_fields__)}


def _timestamps(seconds: Sequence[float]) -> pa.Array:
    micros = pc.round(pc.multiply(pa.array(seconds, type=pa.float64()), 1_000_000.0))
    return pc.cast(micros, pa.int64()).cast(pa.timestamp("us"))


class _Columns(typing.NamedTuple):
    """A batch of records transposed: one tuple of values per field."""

    record: list[tuple[object, ...]]  # by InstanceRecord field
    header: dict[str, tuple[object, ...]]  # by HeaderFields field


def _columns(records: Sequence[InstanceRecord]) -> _Columns:
    # PERF: transposed at C speed (astuple + zip): ~30% faster than a getter
    # per column, ~10x faster than a dict per row (asdict + from_pylist); and
    # without the cyclic GC, which the ~2 tuples per row set off: 1.2 against
    # 1.6-4 us/row (bench/test_bench_index.py). Nothing here makes cycles.
    enabled = gc.isenabled()
    gc.disable()
    try:
        record = list(zip(*map(msgspec.structs.astuple, records), strict=True))
        header = zip(*map(msgspec.structs.astuple, record[_RECORD_FIELDS["header"]]), strict=True)
        return _Columns(record, dict(zip(HeaderFields.__struct_fields__, header, strict=True)))
    finally:
        if enabled:
            gc.enable()


def _instances_table(columns: _Columns) -> pa.Table:
    arrays = []
    for field in _SCHEMAS["instances"]:
        if field.name == "received_at":
            arrays.append(_timestamps(columns.record[_RECORD_FIELDS["received_at"]]))
        elif field.name in FILE_COLUMNS:
            arrays.append(pa.array(columns.record[_RECORD_FIELDS[field.name]], type=field.type))
        else:
            arrays.append(pa.array(columns.header[field.name], type=field.type))
    return pa.Table.from_arrays(arrays, schema=_SCHEMAS["instances"])


def _conflicts_table(conflicts: Sequence[DuplicateConflict]) -> pa.Table:
    arrays = []
    for name in CONFLICT_COLUMNS:
        values = [getattr(c, name) for c in conflicts]
        if name == "received_at":
            arrays.append(_timestamps(values))
        else:
            arrays.append(pa.array(values, type=_SCHEMAS["duplicate_conflicts"].field(name).type))
    return pa.Table.from_arrays(arrays, schema=_SCHEMAS["duplicate_conflicts"])


# -- the index ---------------------------------------------------------------------------


class IndexUnavailable(Exception):
    """The index file can't be used as asked; the message says why and what to do."""


#: Parent rows remembered as written, so that a batch of a known series
#: writes only its instances. Cleared when it grows past this.
_KNOWN_LIMIT = 100_000


class Index:
    """An open index database.

    Parameters
    ----------
    path : str
        The DuckDB file; created (with the current schema) if missing.
    wal_mode : bool
        True: DuckDB's write-ahead log with its automatic checkpoints. False:
        a checkpoint after every batch (the data file is always complete;
        slower writes).
    read_only : bool
        Open for queries only: no migration, and any number of read-only
        processes may open it, but only while no process has it read-write
        (DuckDB's rule: a running server holds it).

    Raises
    ------
    IndexUnavailable
        The file is locked by another process, or its schema is newer than
        this fastscp, or (read-only) older and needs a migration.
    """

    def __init__(self, path: str, *, wal_mode: bool = True, read_only: bool = False) -> None:
        self.path = path
        self.wal_mode = wal_mode
        self.read_only = read_only
        try:
            self.con = duckdb.connect(path, read_only=read_only)
        except duckdb.IOException as exc:
            text = str(exc)
            if "lock" in text.lower():
                raise IndexUnavailable(
                    f"{path}: the index is open in another process (a running fastscp server, or a "
                    f"reindex); ask the server, or stop it first ({text.splitlines()[0]})"
                ) from None
            raise IndexUnavailable(f"{path}: cannot open the index: {text.splitlines()[0]}") from None
        self._cursor_source = self.con.cursor()
        self._cursor_lock = threading.Lock()
        self._known: dict[str, dict[str, tuple[object, ...]]] = {"patients": {}, "studies": {}, "series": {}}
        #: Some patient, study or series may have no instances left: see :meth:`prune`.
        self.needs_prune = False
        try:
            self.version = self._version()
            if read_only:
                self._check_readable()
            else:
                self._migrate()
        except BaseException:
            self._cursor_source.close()
            self.con.close()
            raise

    # -- schema ----------------------------------------------------------------------

    def _version(self) -> int:
        tables = {row[0] for row in self.con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'").fetchall()}
        if "schema_version" not in tables:
            return 0
        (version,) = self.con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchall()[0]
        return int(version)

    def _check_readable(self) -> None:
        if self.version == SCHEMA_VERSION:
            return
        if self.version == 0:
            raise IndexUnavailable(f"{self.path}: not a fastscp index (no schema_version table)")
        raise IndexUnavailable(
            f"{self.path}: index schema version {self.version}, this fastscp reads {SCHEMA_VERSION}; "
            + ("start the server once (it migrates the index) or run 'fastscp reindex'"
               if self.version < SCHEMA_VERSION else "upgrade fastscp")
        )

    def _migrate(self) -> None:
        if self.version > SCHEMA_VERSION:
            raise IndexUnavailable(
                f"{self.path}: index schema version {self.version} is newer than this fastscp "
                f"supports ({SCHEMA_VERSION}); upgrade fastscp or rebuild the index with 'fastscp reindex'"
            )
        if self.version == SCHEMA_VERSION:
            return
        self.con.execute("BEGIN")
        try:
            self.con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            if self.version == 1:
                # v1: one flat "instances" table (file facts + every header field).
                self.con.execute("ALTER TABLE instances RENAME TO instances_v1")
            for table in TABLES:
                self.con.execute(_create_table(table))
            for view in _VIEWS:
                self.con.execute(view)
            if self.version == 1:
                self._copy_v1()
                self.con.execute("DROP TABLE instances_v1")
            self.con.execute("INSERT INTO schema_version VALUES (?)", [SCHEMA_VERSION])
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        if self.version:
            log.info("index %s migrated from schema version %d to %d", self.path, self.version, SCHEMA_VERSION)
        self.version = SCHEMA_VERSION
        self.con.execute("CHECKPOINT")

    def _copy_v1(self) -> None:
        present = {row[0] for row in self.con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'instances_v1'").fetchall()}

        def select(table: str) -> str:
            return ", ".join(
                quote(name) if name in present else f"CAST(NULL AS {sql}) AS {quote(name)}"
                for name, sql in TABLES[table].items()
            )

        self.con.execute(
            f"INSERT INTO instances SELECT {select('instances')} FROM instances_v1"
        )
        self.con.execute("UPDATE instances SET content_hash = '' WHERE content_hash IS NULL")
        for table in ("patients", "studies", "series"):
            key = quote(_PRIMARY_KEY[table])
            # The newest instance's attributes win, as for records.
            self.con.execute(
                f"INSERT INTO {table} SELECT DISTINCT ON ({key}) {select(table)} FROM instances_v1 "
                f"ORDER BY {key}, received_at DESC"
            )

    # -- writes ------------------------------------------------------------------------

    def add(self, instances: Iterable[InstanceRecord], conflicts: Iterable[DuplicateConflict] = (),
            thumbnails: Iterable[ThumbnailMade] = (), *, keep_newer: bool = False) -> int:
        """Write a batch of records in one transaction (thumbnails in a second one).

        Parameters
        ----------
        instances : iterable of InstanceRecord
            A record whose path is indexed already replaces that row (a resend).
        conflicts : iterable of DuplicateConflict
            Appended to ``duplicate_conflicts``.
        thumbnails : iterable of ThumbnailMade
            A thumbnail replaces the one its instance had.
        keep_newer : bool
            For rows made from files (reconcile): an indexed row whose
            ``received_at`` is not older is kept, so a record that a worker
            sent while the files were read wins.

        Returns
        -------
        int
            The number of distinct instance paths in the batch.
        """
        latest: dict[str, InstanceRecord] = {}
        for record in instances:
            # One batch may hold a resent instance twice: the last one wins.
            latest[record.path] = record
        conflict_list = list(conflicts)
        self._add_thumbnails({t.path: t.thumbnail_path for t in thumbnails})
        if not latest and not conflict_list:
            return 0
        records = list(latest.values())
        columns = _columns(records) if records else _Columns([], {name: () for name in _HEADER_FIELDS})
        parents = self._changed_parents(columns)
        con = self.con
        con.execute("BEGIN")
        try:
            replaced = False
            if records:
                batch = _instances_table(columns)
                con.register("batch_instances", batch)
                if keep_newer:
                    con.execute(
                        "DELETE FROM instances WHERE path IN (SELECT b.path FROM batch_instances b "
                        "JOIN instances i ON i.path = b.path WHERE i.received_at < b.received_at)"
                    )
                    con.execute(
                        "INSERT INTO instances SELECT * FROM batch_instances b "
                        "WHERE NOT EXISTS (SELECT 1 FROM instances i WHERE i.path = b.path)"
                    )
                    replaced = True
                else:
                    try:
                        # The common case, all paths new: one plain INSERT. INSERT OR
                        # REPLACE costs ~6 ms more per batch whatever its size.
                        con.execute("INSERT INTO instances SELECT * FROM batch_instances")
                    except duckdb.ConstraintException:
                        # A resend: a path that is indexed already. DuckDB has no
                        # savepoints, so start over with delete + insert.
                        con.execute("ROLLBACK")
                        con.execute("BEGIN")
                        con.register("batch_instances", batch)  # a rollback drops the registration
                        con.execute("DELETE FROM instances WHERE path IN (SELECT path FROM batch_instances)")
                        con.execute("INSERT INTO instances SELECT * FROM batch_instances")
                        replaced = True
                if replaced:
                    # A replaced row may move an instance to another series or
                    # study: rewrite every parent, and drop those left empty below.
                    parents = self._changed_parents(columns, all_rows=True)
                for table, rows in parents.items():
                    self._upsert(table, rows)
            if conflict_list:
                con.register("batch_conflicts", _conflicts_table(conflict_list))
                con.execute("INSERT INTO duplicate_conflicts SELECT * FROM batch_conflicts")
            con.execute("COMMIT")
        except BaseException:
            self._known = {table: {} for table in self._known}
            try:
                con.execute("ROLLBACK")
            except duckdb.Error:
                pass
            raise
        finally:
            for name in ("batch_instances", "batch_conflicts"):
                try:
                    con.unregister(name)
                except (duckdb.Error, KeyError):
                    pass
        if replaced or parents["studies"] or parents["series"]:
            # A resend, or a study or series written again, may have moved an
            # instance, series or study to another parent (a correction) and
            # left the old one empty. Dropping empty parents scans the
            # instances (a few ms per 1M): the indexer does it when idle.
            self.needs_prune = True
        for table, rows in parents.items():
            known = self._known[table]
            if len(known) > _KNOWN_LIMIT:
                known.clear()
            for row in rows:
                known[row[0]] = row  # type: ignore[index]
        self._after_write()
        return len(records)

    def _add_thumbnails(self, latest: dict[str, str]) -> None:
        if not latest:
            return
        batch = pa.table({"path": pa.array(list(latest), type=pa.string()),
                          "thumbnail_path": pa.array(list(latest.values()), type=pa.string())})
        con = self.con
        con.register("batch_thumbnails", batch)
        try:
            try:
                con.execute("INSERT INTO thumbnails SELECT * FROM batch_thumbnails")
            except duckdb.ConstraintException:
                # A thumbnail made again (a resend): replace it.
                con.register("batch_thumbnails", batch)
                con.execute("BEGIN")
                try:
                    con.execute("DELETE FROM thumbnails WHERE path IN (SELECT path FROM batch_thumbnails)")
                    con.execute("INSERT INTO thumbnails SELECT * FROM batch_thumbnails")
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
        finally:
            con.unregister("batch_thumbnails")

    def _changed_parents(self, columns: _Columns, *, all_rows: bool = False) -> dict[str, list[tuple[object, ...]]]:
        """Patient, study and series rows of the batch that differ from what we last wrote."""
        changed: dict[str, list[tuple[object, ...]]] = {}
        for table, fields in (("patients", PATIENT_FIELDS), ("studies", STUDY_FIELDS), ("series", SERIES_FIELDS)):
            # key -> row, the last one of the batch winning; built at C speed.
            rows = zip(*(columns.header[f] for f in fields), strict=True)
            latest = dict(zip(columns.header[fields[0]], rows, strict=True))
            known = self._known[table]
            changed[table] = [row for key, row in latest.items() if all_rows or known.get(key) != row]
        return changed

    def _upsert(self, table: str, rows: list[tuple[object, ...]]) -> None:
        if not rows:
            return
        names = list(TABLES[table])
        columns = list(zip(*rows, strict=True))
        batch = pa.Table.from_arrays(
            [pa.array(list(values), type=_SCHEMAS[table].field(name).type) for name, values in zip(names, columns,
                                                                                                     strict=True)],
            schema=_SCHEMAS[table],
        )
        self.con.register("batch_parents", batch)
        try:
            updates = ", ".join(f"{quote(name)} = excluded.{quote(name)}" for name in names[1:])
            self.con.execute(f"INSERT INTO {table} SELECT * FROM batch_parents ON CONFLICT DO UPDATE SET {updates}")
        finally:
            self.con.unregister("batch_parents")

    def prune(self) -> None:
        """Drop series, studies and patients left without instances, in one transaction."""
        self.con.execute("BEGIN")
        try:
            self._prune()
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.needs_prune = False
        self._known = {table: {} for table in self._known}
        self._after_write()

    def _prune(self) -> None:
        self.con.execute(
            "DELETE FROM series WHERE NOT EXISTS "
            "(SELECT 1 FROM instances i WHERE i.series_instance_uid = series.series_instance_uid)"
        )
        self.con.execute(
            "DELETE FROM studies WHERE NOT EXISTS "
            "(SELECT 1 FROM instances i WHERE i.study_instance_uid = studies.study_instance_uid)"
        )
        self._prune_patients()

    def _prune_patients(self) -> None:
        self.con.execute(
            "DELETE FROM patients WHERE NOT EXISTS "
            "(SELECT 1 FROM studies st WHERE st.patient_id = patients.patient_id)"
        )

    def remove(self, paths: Iterable[str]) -> int:
        """Drop the rows of these paths (files that are gone); returns how many were dropped."""
        gone = list(dict.fromkeys(paths))
        if not gone:
            return 0
        con = self.con
        con.execute("BEGIN")
        try:
            con.register("gone_paths", pa.table({"path": pa.array(gone, type=pa.string())}))
            row = con.execute(
                "DELETE FROM instances WHERE path IN (SELECT path FROM gone_paths) RETURNING path"
            ).fetchall()
            con.execute("DELETE FROM thumbnails WHERE path IN (SELECT path FROM gone_paths)")
            self._prune()
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        finally:
            con.unregister("gone_paths")
        self._known = {table: {} for table in self._known}
        self._after_write()
        return len(row)

    def _after_write(self) -> None:
        if not self.wal_mode:
            self.checkpoint()

    def checkpoint(self) -> bool:
        """Write the WAL into the data file; False if DuckDB can't now (a query is open)."""
        try:
            self.con.execute("CHECKPOINT")
        except duckdb.Error as exc:
            # DuckDB refuses while another transaction is running; the next
            # batch tries again.
            log.debug("checkpoint deferred: %s", exc)
            return False
        return True

    # -- reads for the indexer itself ----------------------------------------------------

    def file_states(self, con: duckdb.DuckDBPyConnection | None = None) -> dict[str, tuple[int, int]]:
        """path -> (size, received_at in microseconds) of every indexed file, for reconcile."""
        relation = (con or self.con).sql("SELECT path, size, epoch_us(received_at) AS received_us FROM instances")
        # DuckDB 1.4+ calls it to_arrow_table(); older ones arrow().
        table = (getattr(relation, "to_arrow_table", None) or relation.arrow)()
        paths = table.column("path").to_pylist()
        sizes = table.column("size").to_pylist()
        times = table.column("received_us").to_pylist()
        return dict(zip(paths, zip(sizes, times, strict=True), strict=True))

    def study_instances(self, study_instance_uid: str) -> list[tuple[str, HeaderFields]]:
        """(path, header fields) of every indexed file of a study, by path.

        The header fields are put together from the instance, series, study
        and patient rows (a study's attributes are its newest instance's).
        """
        def alias(name: str) -> str:
            if name in INSTANCE_HEADER_FIELDS:
                return "i"
            return "se" if name in SERIES_FIELDS else "st" if name in STUDY_FIELDS else "p"

        names = list(HeaderFields.__struct_fields__)
        select = ", ".join(f"{alias(name)}.{quote(name)}" for name in names)
        rows = self.con.execute(
            f"SELECT i.path, {select} FROM instances i "
            "LEFT JOIN series se ON se.series_instance_uid = i.series_instance_uid "
            "LEFT JOIN studies st ON st.study_instance_uid = i.study_instance_uid "
            "LEFT JOIN patients p ON p.patient_id = st.patient_id "
            "WHERE i.study_instance_uid = ? ORDER BY i.path",
            [study_instance_uid],
        ).fetchall()
        return [
            (row[0], HeaderFields(**{name: value for name, value in zip(names, row[1:], strict=True)
                                     if value is not None}))
            for row in rows
        ]

    def count(self) -> int:
        """The number of indexed files."""
        # fetchall, not fetchone: DuckDB 2 keeps a half-read result open on the connection.
        return int(self.con.execute("SELECT count(*) FROM instances").fetchall()[0][0])

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A new connection to the same database, for another thread (DuckDB's rule).

        Thread-safe: cursors come from a connection of their own that runs
        no statements, so a writer using :attr:`con` meanwhile is not touched.
        """
        with self._cursor_lock:
            return self._cursor_source.cursor()

    def close(self) -> None:
        try:
            self._cursor_source.close()
            self.con.close()
        except duckdb.Error as exc:
            log.warning("closing the index %s: %s", self.path, exc)
