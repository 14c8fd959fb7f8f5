"""The DuckDB index: schema, migrations and batched writes.

This module and :mod:`fastscp.query.engine` (which reads) are the only code that
talks to DuckDB.  The index holds one row per stored file in ``instances``
and one row per study and series in ``studies`` and ``series`` (the
attributes of the newest instance win), plus the ``duplicate_conflicts``
log. Each study row carries its own patient attributes (name, birth date,
sex as stored with that study): a Patient ID stored under two names, or
patients without a Patient ID, never overwrite each other; ``patients`` is
a view over the studies (:func:`patient_key`).  Study, series and patient
counts and sizes are derived from ``instances`` (the ``*_counts`` views, and the query builder's
own restricted aggregates), so a write never has to update them.  Column
names are the DICOM keywords in snake_case, as in
:class:`~fastscp.dicom.header.HeaderFields`.

Writes come in batches through Arrow, one INSERT per table and batch, never
row by row (~1k rows/s row by row against 100k+ rows/s from Arrow here).

The index is a DuckDB file (one node, the default), or a shared DuckLake
(:class:`Lake`: catalog in PostgreSQL, data as Parquet on a path every node
sees) that several nodes write at once. There each row of ``instances``,
``thumbnails`` and ``duplicate_conflicts`` names its ``node`` (its ``path`` is
relative to that node's storage root); a node writes, replaces and reconciles
only its own rows and reads everyone's. DuckLake has no PRIMARY KEY or UNIQUE
constraints: a resent instance replaces its node's row by path (DELETE, then
INSERT), and studies and series are appended (:data:`_LAKE_PARENTS`). Each
node also appends where the others fetch its files (:class:`NodeAddress`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

import duckdb
import pyarrow as pa

from fastscp.dicom.fields import HeaderFields
from fastscp.index.batchtable import InstanceBatch, distinct_rows, last_per_path, timestamps, value_type
from fastscp.index.records import DuplicateConflict, InstanceRecord, ThumbnailMade

log = logging.getLogger("fastscp.index")

SCHEMA_VERSION = 5

# -- columns -----------------------------------------------------------------------

_SQL_OF = {str: "VARCHAR", int: "BIGINT", float: "DOUBLE"}


_HEADER_TYPES: dict[str, type] = {
    name: value_type(annotation) for name, annotation in typing.get_type_hints(HeaderFields).items()
}

#: The patient attributes, kept per study (as stored with that study).
PATIENT_FIELDS: tuple[str, ...] = ("patient_id", "patient_name", "patient_birth_date", "patient_sex")
#: Header fields kept per study and series; the first is the key, the second
#: the key of the parent.
STUDY_FIELDS: tuple[str, ...] = (
    "study_instance_uid", "patient_id", "study_date", "study_time", "study_id", "accession_number",
    "study_description", "referring_physician_name", "requesting_physician",
    "patient_name", "patient_birth_date", "patient_sex",
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
    "content_hash": "VARCHAR",  # the data set's (dicom.part10.dataset_content_hash), "" if not computed
    "transfer_syntax_uid": "VARCHAR",
    "calling_ae_title": "VARCHAR",
    "called_ae_title": "VARCHAR",
    "peer_address": "VARCHAR",
    "received_at": "TIMESTAMP",  # UTC
}
#: Added in schema version 4, after the header columns: the C-STORE's Affected
#: SOP Instance UID (the File Meta's) where it differs from the data set's,
#: else "". An instance is found by either UID.
AFFECTED_COLUMNS: dict[str, str] = {"affected_sop_instance_uid": "VARCHAR"}
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
    "studies": _header_columns(STUDY_FIELDS),
    "series": _header_columns(SERIES_FIELDS),
    # ``attributes`` is the instance's attribute map over the base map
    # ``attributes_base`` (an id of ``attribute_maps``): see records.split_maps
    # and the ``instance_attributes`` view, which puts them together.
    "instances": {**FILE_COLUMNS, **_header_columns(INSTANCE_HEADER_FIELDS), **AFFECTED_COLUMNS,
                  "attributes_base": "BIGINT"},
    "duplicate_conflicts": CONFLICT_COLUMNS,
    # Thumbnails made by the post-store stage (both paths relative to the
    # storage root). Their own table: a thumbnail may be reported before its
    # instance's batch is committed, and instance inserts stay narrow.
    "thumbnails": {"path": "VARCHAR", "thumbnail_path": "VARCHAR"},
    # The base attribute maps (JSON object text), shared by the instances
    # of a series; the id is a hash of the text (records.map_id).
    "attribute_maps": {"id": "BIGINT", "attributes": "VARCHAR"},
}
_PRIMARY_KEY = {"studies": "study_instance_uid", "series": "series_instance_uid",
                "instances": "path", "thumbnails": "path", "attribute_maps": "id"}
#: In a lake: the tables whose rows name their node (the last column, ``node``).
_NODE_TABLES = ("instances", "thumbnails", "duplicate_conflicts")
#: In a lake, studies and series are written to these tables and never
#: updated: nodes that store parts of one study at once would otherwise
#: both insert its row (no key refuses the second), or conflict replacing
#: it. The views ``studies`` and ``series`` read the latest row of each key.
_LAKE_PARENTS = {"studies": "studies_rows", "series": "series_rows"}


def quote(name: str) -> str:
    """A column name as a SQL identifier ("rows" and "columns" are keywords)."""
    return f'"{name}"'


def _stored_table(table: str, *, lake: bool) -> tuple[str, dict[str, str]]:
    """The name and columns of the table that stores ``table``'s rows.

    In a lake, with the node of each row (:data:`_NODE_TABLES`), and studies
    and series appended to ``*_rows`` tables (:data:`_LAKE_PARENTS`), each
    row with the time it was written.
    """
    columns = dict(TABLES[table])
    if lake and table in _NODE_TABLES:
        columns["node"] = "VARCHAR"
    if lake and table in _LAKE_PARENTS:
        return _LAKE_PARENTS[table], {**columns, "written_at": "TIMESTAMP"}
    return table, columns


def _create_table(table: str, *, lake: bool = False) -> str:
    """A table's CREATE statement; in a lake without keys (DuckLake has none): see :func:`_stored_table`."""
    key = None if lake else _PRIMARY_KEY.get(table)
    name, columns = _stored_table(table, lake=lake)
    listed = ", ".join(f"{quote(column)} {sql}{' PRIMARY KEY' if column == key else ''}"
                       for column, sql in columns.items())
    return f"CREATE TABLE {name} ({listed})"


def patient_key(alias: str) -> str:
    """SQL: the patient a study row (``alias``) belongs to.

    Its Patient ID; a study without one (empty or absent) is a patient of
    its own, keyed by a backslash and its Study Instance UID (a Patient ID
    is LO, VM 1: it never holds a backslash), so such patients are never
    merged.
    """
    return (f"CASE WHEN coalesce({alias}.patient_id, '') = '' THEN '\\' || {alias}.study_instance_uid "
            f"ELSE {alias}.patient_id END")


def latest_study_first(alias: str) -> str:
    """SQL ORDER BY terms that put a patient's latest study first (by Study Date and Time).

    Its name, birth date and sex are the patient's at PATIENT level: by
    date, so the answer does not depend on the order the studies arrived in.
    """
    return (f"{alias}.study_date DESC NULLS LAST, {alias}.study_time DESC NULLS LAST, "
            f"{alias}.study_instance_uid DESC")


# The patients (one row each, its latest study's attributes) and derived
# counts, for people reading the index with SQL and for the stats; the query
# builder computes the same restricted to the rows it returns.
_PATIENT_VIEWS = (
    f"""CREATE VIEW patients AS
       SELECT DISTINCT ON (patient_key) {patient_key('st')} AS patient_key,
              {', '.join(f'st.{name}' for name in PATIENT_FIELDS)}
       FROM studies st ORDER BY patient_key, {latest_study_first('st')}""",
    f"""CREATE VIEW patient_counts AS
       SELECT {patient_key('st')} AS patient_key,
              count(DISTINCT i.study_instance_uid) AS number_of_patient_related_studies,
              count(DISTINCT i.series_instance_uid) AS number_of_patient_related_series,
              count(*) AS number_of_patient_related_instances, sum(i.size) AS patient_size
       FROM instances i JOIN studies st ON st.study_instance_uid = i.study_instance_uid
       GROUP BY 1""",
)
#: Each instance's whole attribute map (NULL for instances indexed before schema 5).
_MAP_VIEW = """CREATE VIEW instance_attributes AS
       SELECT i.path, CASE WHEN am.attributes IS NULL THEN CAST(i.attributes AS JSON)
                           ELSE json_merge_patch(am.attributes, i.attributes) END AS attributes
       FROM instances i LEFT JOIN attribute_maps am ON am.id = i.attributes_base"""
_VIEWS = _PATIENT_VIEWS + (_MAP_VIEW,) + (
    """CREATE VIEW series_counts AS
       SELECT series_instance_uid, count(*) AS number_of_series_related_instances, sum(size) AS series_size
       FROM instances GROUP BY series_instance_uid""",
    """CREATE VIEW study_counts AS
       SELECT study_instance_uid, count(DISTINCT series_instance_uid) AS number_of_study_related_series,
              count(*) AS number_of_study_related_instances, sum(size) AS study_size
       FROM instances GROUP BY study_instance_uid""",
)


def _views(lake: bool) -> tuple[str, ...]:
    """The views; a lake's map view names each row's node, and reads a base map once.

    Nodes may add the same base map at once (the same id and text; no key
    refuses the second row).
    """
    if not lake:
        return _VIEWS
    view = _MAP_VIEW.replace("SELECT i.path,", "SELECT i.node, i.path,").replace(
        "LEFT JOIN attribute_maps am", "LEFT JOIN (SELECT DISTINCT id, attributes FROM attribute_maps) am")
    parents = tuple(
        f"CREATE VIEW {table} AS SELECT DISTINCT ON ({quote(_PRIMARY_KEY[table])}) {_column_list(table)} "
        f"FROM {rows} ORDER BY {quote(_PRIMARY_KEY[table])}, written_at DESC"
        for table, rows in _LAKE_PARENTS.items()
    )
    # The parents' views first: the others read them.
    return parents + tuple(view if text == _MAP_VIEW else text for text in _VIEWS)


# -- the shared index (DuckLake) --------------------------------------------------------


class Lake(NamedTuple):
    """A shared index: DuckLake, its catalog in PostgreSQL, its data as Parquet (config ``database.catalog``)."""

    #: libpq connection string of the catalog database ("dbname=fastscp host=db1 user=fastscp").
    catalog: str
    #: The folder of the Parquet files; the same for every node (a shared file system).
    data_path: str
    #: This node's name, in each row it writes (config ``server.node``, else the host name).
    node: str

    def __str__(self) -> str:
        # Never the catalog string: it may hold a password.
        return f"the DuckLake index in {self.data_path}"


class NodeAddress(NamedTuple):
    """Where a node of a shared index answers C-GET for the files on its disk, and where they are.

    Each node appends its own at start (:meth:`Index.register_node`); the
    others read the latest of each (:data:`NODE_ADDRESSES_SQL`) to fetch the
    files of its rows (:mod:`fastscp.net.fetch`).
    """

    node: str
    host: str
    port: int
    ae_title: str
    #: Its DICOM port speaks TLS (its tls.enabled).
    tls: bool
    #: Its storage root (real path), which its rows' paths are relative to.
    storage_directory: str
    #: Every node mounts that root at that path (storage.shared): read the files there.
    shared_storage: bool


#: In a lake: each node's :class:`NodeAddress`, appended at each start (DuckLake has no keys, and a node never
#: touches another's rows); made by the first node that registers, so a lake made by an older fastscp gets it.
_NODE_ADDRESSES = ("CREATE TABLE IF NOT EXISTS node_addresses (node VARCHAR, host VARCHAR, port BIGINT, "
                   "ae_title VARCHAR, tls BOOLEAN, storage_directory VARCHAR, shared_storage BOOLEAN, "
                   "registered_at TIMESTAMP)")
#: The latest :class:`NodeAddress` of each node, in its field order (a SELECT: any process may ask it).
NODE_ADDRESSES_SQL = ("SELECT DISTINCT ON (node) node, host, port, ae_title, tls, storage_directory, shared_storage "
                      "FROM node_addresses ORDER BY node, registered_at DESC")


#: The PyPI wheels that carry DuckDB's extensions for offline use, by the
#: file name DuckDB must load each under (its init function's name).
_LAKE_EXTENSIONS = (("duckdb_extension_postgres", "postgres", "postgres_scanner"),
                    ("duckdb_extension_ducklake", "ducklake", "ducklake"))


def _load_lake_extensions(con: duckdb.DuckDBPyConnection) -> None:
    """LOAD the postgres and ducklake extensions from their wheels; never from the network.

    The postgres wheel ships ``postgres.duckdb_extension``, which DuckDB
    loads only under the name ``postgres_scanner``: a link of that name in a
    private folder, removed once loaded.
    """
    con.execute("SET autoinstall_known_extensions = false")
    folder = tempfile.mkdtemp(prefix="fastscp-ext-")
    try:
        for module_name, shipped, name in _LAKE_EXTENSIONS:
            try:
                module = __import__(module_name)
            except ImportError:
                raise IndexUnavailable(
                    f"database.catalog: a DuckLake index needs the {module_name.replace('_', '-')} package; "
                    "install fastscp[ducklake] (it pins duckdb to the version the extension wheels are built for)"
                ) from None
            source = os.path.join(os.path.dirname(module.__file__ or ""), "extensions", f"v{duckdb.__version__}",
                                  f"{shipped}.duckdb_extension")
            if not os.path.exists(source):
                raise IndexUnavailable(
                    f"database.catalog: {module_name.replace('_', '-')} has no extension for duckdb "
                    f"{duckdb.__version__} ({source} is missing); install fastscp[ducklake], which pins both")
            link = os.path.join(folder, f"{name}.duckdb_extension")
            os.symlink(source, link)
            con.execute(f"LOAD '{link}'")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _attach_lake(con: duckdb.DuckDBPyConnection, lake: Lake, *, read_only: bool) -> None:
    _load_lake_extensions(con)
    options = f"DATA_PATH {_sql_text(os.path.join(lake.data_path, ''))}" + (", READ_ONLY" if read_only else "")
    for attempt in range(1, LAKE_WRITE_ATTEMPTS + 1):
        try:
            con.execute(f"ATTACH {_sql_text('ducklake:postgres:' + lake.catalog)} AS lake ({options})")
            break
        except duckdb.Error as exc:
            # Never the connection string (it may hold a password).
            reason = str(exc).splitlines()[0].replace(lake.catalog, "<database.catalog>")
            if attempt == LAKE_WRITE_ATTEMPTS:
                raise IndexUnavailable(f"database.catalog: cannot open {lake}: {reason}") from None
            # Nodes that start together on a new catalog race to make
            # DuckLake's own tables: the losers' ATTACH fails, and the next
            # one finds them made.
            log.info("%s: attempt %d to open it failed: %s", lake, attempt, reason)
            time.sleep(0.2 * attempt)
    con.execute("USE lake")


#: The PostgreSQL database of a lake's catalog, as DuckLake attaches it for
#: the lake named ``lake`` (``__ducklake_metadata_`` and the lake's name).
LAKE_CATALOG = "__ducklake_metadata_lake"


def lock_key(name: str) -> int:
    """The 64-bit key of a PostgreSQL advisory lock of fastscp's, from its name (stable across versions)."""
    return int.from_bytes(hashlib.sha256(f"fastscp:{name}".encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def catalog_lock(source: duckdb.DuckDBPyConnection, name: str, *, wait: float = 0.0) -> Iterator[bool]:
    """A PostgreSQL advisory lock in a lake's catalog database, held for the block; yields whether it is held.

    Every node reaches the catalog, and PostgreSQL ends the lock with the
    session that holds it: a node that dies holding one never leaves it
    behind (no stale lock file, no lease to time out). It is
    ``pg_try_advisory_xact_lock`` in a transaction of a connection of its own
    (a cursor of ``source``, the connection with the lake attached): the
    transaction keeps one PostgreSQL session for the block, and its end
    releases the lock. ``wait``: seconds to keep trying (every 0.2 s); 0 tries once.
    """
    con = source.cursor()
    try:
        con.execute("BEGIN")
        deadline = time.monotonic() + wait
        while True:
            (held,) = con.execute(f"SELECT * FROM postgres_query('{LAKE_CATALOG}', "
                                  f"'SELECT pg_try_advisory_xact_lock({lock_key(name)})')").fetchall()[0]
            if held or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        yield bool(held)
    finally:
        try:
            con.execute("ROLLBACK")
        except duckdb.Error:
            pass  # the session is gone: so is its lock
        con.close()


def _sql_text(text: str) -> str:
    """A SQL string literal (ATTACH takes no parameters)."""
    return "'" + text.replace("'", "''") + "'"


# -- Arrow batches -------------------------------------------------------------------


def _arrow_type(table: str, name: str) -> pa.DataType:
    sql = TABLES[table][name]
    return {"VARCHAR": pa.string(), "BIGINT": pa.int64(), "DOUBLE": pa.float64(),
            "TIMESTAMP": pa.timestamp("us")}[sql]


_SCHEMAS = {table: pa.schema([(name, _arrow_type(table, name)) for name in TABLES[table]]) for table in TABLES}

def _column_list(table: str) -> str:
    """The table's columns, for INSERTs that name them (a migration appends columns at the end)."""
    return ", ".join(quote(name) for name in TABLES[table])


#: The instances table's columns of the batch table (batchtable.SCHEMA has more).
_INSTANCE_VALUES = f"({_column_list('instances')}) SELECT {_column_list('instances')} FROM batch_instances"


def _conflicts_table(conflicts: Sequence[DuplicateConflict]) -> pa.Table:
    arrays = []
    for name in CONFLICT_COLUMNS:
        values = [getattr(c, name) for c in conflicts]
        if name == "received_at":
            arrays.append(timestamps(pa.array(values, type=pa.float64())))
        else:
            arrays.append(pa.array(values, type=_SCHEMAS["duplicate_conflicts"].field(name).type))
    return pa.Table.from_arrays(arrays, schema=_SCHEMAS["duplicate_conflicts"])


# -- the index ---------------------------------------------------------------------------


class _Extras(NamedTuple):
    """What a batch writes beside its instances and parents (None: nothing of that kind)."""

    conflicts: pa.Table | None
    maps: pa.Table | None
    thumbnails: pa.Table | None


class IndexUnavailable(Exception):
    """The index file can't be used as asked; the message says why and what to do."""


#: Parent rows remembered as written, so that a batch of a known series
#: writes only its instances. Cleared when it grows past this.
_KNOWN_LIMIT = 100_000

#: DuckDB checkpoints by itself when its WAL reaches this size (its default,
#: 16 MiB, is ~30k instances). Each checkpoint rewrites the primary-key
#: indexes, so at 1M instances a commit that checkpoints takes 0.1-0.4 s; a
#: bigger WAL, checkpointed when the indexer is idle, made the sustained
#: insert rate ~1.4x (bench/test_bench_index.py). A crash replays at most
#: this much WAL at the next start.
CHECKPOINT_WAL_BYTES = 256 * 1024 * 1024

#: Attempts of a lake write that conflicts with another node's (both
#: deleted rows of one data file, say): the loser starts over.
LAKE_WRITE_ATTEMPTS = 5
#: A lake's maintenance (:mod:`fastscp.index.lake`, and DuckLake's own
#: CHECKPOINT) forgets snapshots older than this and deletes the files only
#: they used (the small files a merge replaced); a query on another node
#: reads one snapshot, and none runs for an hour.
LAKE_KEEP_SNAPSHOTS = "1 hour"
#: Seconds a node waits for another that is making or migrating a lake's
#: schema (a migration may rewrite every row of a table).
LAKE_MIGRATION_WAIT = 600.0


class Index:
    """An open index database.

    Parameters
    ----------
    path : str
        The DuckDB file; created (with the current schema) if missing.
    wal_mode : bool
        True: DuckDB's write-ahead log, written into the data file by
        :meth:`tidy` (the indexer calls it when idle) or automatically once
        it holds :data:`CHECKPOINT_WAL_BYTES`. False: a checkpoint after
        every batch (the data file is always complete; slower writes).
    read_only : bool
        Open for queries only: no migration, and any number of read-only
        processes may open it, but only while no process has it read-write
        (DuckDB's rule: a running server holds it).
    any_version : bool
        With ``read_only``: open an index of another schema version as it
        is (``fastscp reindex`` reads an old index's duplicate conflicts).
    lake : Lake, optional
        The shared index instead of the file at ``path`` (which then only
        names this node's sockets): any number of nodes open it read-write.

    Raises
    ------
    IndexUnavailable
        The file is locked by another process, or its schema is newer than
        this fastscp, or (read-only) older and needs a migration.
    """

    def __init__(self, path: str, *, wal_mode: bool = True, read_only: bool = False,
                 any_version: bool = False, lake: Lake | None = None) -> None:
        self.path = str(lake) if lake else path
        self.wal_mode = wal_mode
        self.read_only = read_only
        self.lake = lake
        #: The INSERT of the batch's instances (in a lake: with this node's name).
        self._instance_values = (f"({_column_list('instances')}, node) SELECT {_column_list('instances')}, "
                                 f"{_sql_text(lake.node)} FROM batch_instances" if lake else _INSTANCE_VALUES)
        try:
            if lake:
                self.con = duckdb.connect(":memory:")
                try:
                    _attach_lake(self.con, lake, read_only=read_only)
                except BaseException:
                    self.con.close()
                    raise
            else:
                self.con = duckdb.connect(path, read_only=read_only)
        except duckdb.IOException as exc:
            text = str(exc)
            if "lock" in text.lower():
                raise IndexUnavailable(
                    f"{path}: the index is open in another process (a running fastscp server, or a "
                    f"reindex); ask the server, or stop it first ({text.splitlines()[0]})"
                ) from None
            raise IndexUnavailable(f"{path}: cannot open the index: {text.splitlines()[0]}") from None
        if wal_mode and not read_only and not lake:
            self.con.execute(f"SET checkpoint_threshold = '{CHECKPOINT_WAL_BYTES}B'")
        #: Committed writes not yet checkpointed (WAL mode): see :meth:`tidy`.
        self.needs_checkpoint = False
        self._cursor_source = self.con.cursor()
        self._cursor_lock = threading.Lock()
        self._known: dict[str, dict[str, tuple[object, ...]]] = {"studies": {}, "series": {}}
        #: The columns of ``instances`` in the order the file stores them (read at the first insert).
        self._instance_order: list[str] | None = None
        #: Ids of the base attribute maps written (a file only: in a lake another node may prune one).
        self._known_maps: set[int] = set()
        #: Some patient, study or series may have no instances left: see :meth:`prune`.
        self.needs_prune = False
        try:
            self.version = self._version()
            if read_only:
                if not any_version:
                    self._check_readable()
            else:
                self._migrate_shared() if lake else self._migrate()
                self._import_arrow_scan()
        except BaseException:
            self._cursor_source.close()
            self.con.close()
            raise

    def _import_arrow_scan(self) -> None:
        """PERF: DuckDB imports pyarrow.dataset and more the first time it is given an Arrow table; a
        writer has that done as it opens, not in its first batch, which comes while the first stores still
        arrive (40 records in a new process: 77 against 42 ms of CPU)."""
        self.con.register("arrow_scan_import", pa.table({"x": pa.array([], pa.int8())}))
        self.con.unregister("arrow_scan_import")

    # -- schema ----------------------------------------------------------------------

    def _version(self) -> int:
        tables = {row[0] for row in self.con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' "
            "AND table_catalog = current_database()").fetchall()}
        if "schema_version" not in tables:
            return 0
        (version,) = self.con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchall()[0]
        return int(version)

    def _check_readable(self) -> None:
        if self.version == SCHEMA_VERSION:
            return
        if self.version == 0:
            raise IndexUnavailable(f"{self.path}: not a fastscp index (no schema_version table)")
        older = ("start a node of this fastscp once (it migrates the shared index)" if self.lake
                 else "start the server once (it migrates the index) or run 'fastscp reindex'")
        raise IndexUnavailable(
            f"{self.path}: index schema version {self.version}, this fastscp reads {SCHEMA_VERSION}; "
            + (older if self.version < SCHEMA_VERSION else "upgrade fastscp")
        )

    def _migrate(self) -> None:
        if self.version > SCHEMA_VERSION:
            raise IndexUnavailable(
                f"{self.path}: index schema version {self.version} is newer than this fastscp "
                f"supports ({SCHEMA_VERSION}); upgrade fastscp or rebuild the index with 'fastscp reindex'"
            )
        if self.version == SCHEMA_VERSION:
            return
        with self.transaction():
            if self.version in (2, 3, 4):
                self._add_columns()
                if self.version == 2:
                    self._migrate_v2()
                if self.version <= 3:
                    self._migrate_v3()
                self._migrate_v4()
            else:
                self._create(from_v1=self.version == 1)
            self.con.execute("INSERT INTO schema_version VALUES (?)", [SCHEMA_VERSION])
        if self.version:
            log.info("index %s migrated from schema version %d to %d", self.path, self.version, SCHEMA_VERSION)
        self.version = SCHEMA_VERSION
        self.con.execute("CHECKPOINT")

    def _migrate_shared(self) -> None:
        """A lake: made by the first node, migrated by the first node of a newer fastscp.

        Under the catalog's lock ``schema`` (:func:`catalog_lock`): one node
        makes or migrates it, in one transaction, while the others wait for
        it and then find it done. A write DuckLake refuses (nodes that
        attached a new catalog at once conflict making its own tables) is
        tried again.
        """
        assert self.lake is not None
        for _attempt in range(5):
            if self.version == SCHEMA_VERSION:
                return
            if self.version > SCHEMA_VERSION:
                raise IndexUnavailable(
                    f"{self.path}: index schema version {self.version} is newer than this fastscp supports "
                    f"({SCHEMA_VERSION}): another node runs a newer fastscp; upgrade fastscp on this node "
                    "(every node of a shared index runs the same version)")
            try:
                with catalog_lock(self.con, "schema", wait=LAKE_MIGRATION_WAIT) as held:
                    if not held:
                        raise IndexUnavailable(
                            f"{self.path}: another node has been making or migrating the index's schema for "
                            f"{LAKE_MIGRATION_WAIT:.0f} s; see that node's log, and start this one when it is done")
                    self.version = self._version()  # as the node before us left it
                    if self.version == 0:
                        with self.transaction():
                            self._create(from_v1=False)
                            self.con.execute("INSERT INTO schema_version VALUES (?)", [SCHEMA_VERSION])
                            for option in ("expire_older_than", "delete_older_than"):
                                self.con.execute(f"CALL lake.set_option('{option}', '{LAKE_KEEP_SNAPSHOTS}')")
                    elif self.version < SCHEMA_VERSION:
                        with self.transaction():
                            self._upgrade_lake()
                            self.con.execute("INSERT INTO schema_version VALUES (?)", [SCHEMA_VERSION])
                        log.warning("%s: migrated from schema version %d to %d by node %s; every node must run "
                                    "this fastscp now", self.path, self.version, SCHEMA_VERSION, self.lake.node)
            except (duckdb.TransactionException, duckdb.CatalogException) as exc:
                log.info("%s: making the schema conflicted with another node (%s)", self.path,
                         str(exc).splitlines()[0])
            self.version = self._version()
        raise IndexUnavailable(f"{self.path}: the schema could not be made (conflicts with other nodes)")

    def _upgrade_lake(self) -> None:
        """A lake of an older schema brought to this one: the tables, columns and views it lacks.

        A column added to a table is NULL in its rows, as in a migrated
        file (:meth:`_add_columns`); the views are made again, as they may
        read new columns.
        """
        con = self.con
        present: dict[str, set[str]] = {}
        for table, column in con.execute(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE table_catalog = current_database() AND table_schema = 'main'").fetchall():
            present.setdefault(table, set()).add(column)
        for table in TABLES:
            name, columns = _stored_table(table, lake=True)
            if name not in present:
                con.execute(_create_table(table, lake=True))
                continue
            for column, sql in columns.items():
                if column not in present[name]:
                    con.execute(f"ALTER TABLE {name} ADD COLUMN {quote(column)} {sql}")
        if self.version <= 3:
            self._migrate_v3()
        for view in _views(lake=True):
            con.execute(view.replace("CREATE VIEW", "CREATE OR REPLACE VIEW", 1))

    def _create(self, *, from_v1: bool) -> None:
        """The tables and views of a new index, or of one made from a v1 index's flat table."""
        self.con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        if from_v1:
            # v1: one flat "instances" table (file facts + every header field).
            self.con.execute("ALTER TABLE instances RENAME TO instances_v1")
        for table in TABLES:
            self.con.execute(_create_table(table, lake=self.lake is not None))
        for view in _views(self.lake is not None):
            self.con.execute(view)
        if from_v1:
            self._copy_v1()
            self.con.execute("DROP TABLE instances_v1")

    def _add_columns(self) -> None:
        """The columns a v2, v3 or v4 index lacks (NULL in its rows).

        v3 added the studies' patient attributes and header fields (Image
        Type, every value of a multi-valued Window Center/Width); v4 the
        command's Affected SOP Instance UID; v5 the instances' attribute map.
        """
        con = self.con
        for table in ("studies", "instances"):
            present = {row[0] for row in con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table]).fetchall()}
            for name, sql in TABLES[table].items():
                if name not in present:
                    con.execute(f"ALTER TABLE {table} ADD COLUMN {quote(name)} {sql}")

    def _migrate_v3(self) -> None:
        """v4 keeps the command's Affected SOP Instance UID where it differs from the data set's ("" elsewhere).

        Older rows don't know it: "" (the reconcile and ``fastscp reindex``
        read it from the File Meta).
        """
        for name in AFFECTED_COLUMNS:
            self.con.execute(f"UPDATE instances SET {quote(name)} = '' WHERE {quote(name)} IS NULL")

    def _migrate_v4(self) -> None:
        """v5 keeps every top-level attribute of an instance (the attribute map); v4 had none.

        The rows of an older index get none (SQL NULL): C-FIND on an attribute
        that is no column of its own does not find them until ``fastscp
        reindex`` reads the files again.
        """
        self.con.execute(_create_table("attribute_maps"))
        self.con.execute(_MAP_VIEW)
        log.warning("index %s: schemas before 5 kept no attribute map; run 'fastscp reindex' so that every "
                    "attribute of the files indexed so far can be queried", self.path)

    def _migrate_v2(self) -> None:
        """v2 kept one ``patients`` row per Patient ID; v3 keeps the patient attributes per study.

        v2 did not keep what each study had: every study gets its patient's
        row. ``fastscp reindex`` reads them again from the files.
        """
        con = self.con
        con.execute(
            "UPDATE studies SET patient_name = p.patient_name, patient_birth_date = p.patient_birth_date, "
            "patient_sex = p.patient_sex FROM patients p WHERE p.patient_id = studies.patient_id"
        )
        con.execute("DROP VIEW patient_counts")
        con.execute("DROP TABLE patients")
        for view in _PATIENT_VIEWS:
            con.execute(view)
        log.warning("index %s: schema v2 kept one name per Patient ID; run 'fastscp reindex' to read each "
                    "study's own patient attributes from its files again", self.path)

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
        for table in ("studies", "series"):
            key = quote(_PRIMARY_KEY[table])
            # The newest instance's attributes win, as for records.
            self.con.execute(
                f"INSERT INTO {table} SELECT DISTINCT ON ({key}) {select(table)} FROM instances_v1 "
                f"ORDER BY {key}, received_at DESC"
            )

    # -- writes ------------------------------------------------------------------------

    def add(self, instances: Iterable[InstanceRecord], conflicts: Iterable[DuplicateConflict] = (),
            thumbnails: Iterable[ThumbnailMade] = (), *, keep_newer: bool = False) -> int:
        """:meth:`add_table` for records."""
        batch = InstanceBatch.of(list(instances))
        return self.add_table(batch.table(), conflicts, thumbnails, keep_newer=keep_newer, maps=batch.maps)

    def add_table(self, instances: pa.Table, conflicts: Iterable[DuplicateConflict] = (),
                  thumbnails: Iterable[ThumbnailMade] = (), *, keep_newer: bool = False,
                  maps: dict[int, str] | None = None) -> int:
        """Write a batch of records in one transaction.

        Parameters
        ----------
        instances : pyarrow.Table
            Instance records (:data:`fastscp.index.batchtable.SCHEMA`, as an
            :class:`~fastscp.index.batchtable.InstanceBatch` gives them). A record
            whose path is indexed already replaces that row (a resend); of
            one path twice in the batch, the last one wins.
        conflicts : iterable of DuplicateConflict
            Appended to ``duplicate_conflicts``.
        thumbnails : iterable of ThumbnailMade
            A thumbnail replaces the one its instance had.
        keep_newer : bool
            For rows made from files (reconcile): an indexed row whose
            ``received_at`` is not older is kept, so a record that a worker
            sent while the files were read wins.
        maps : dict, optional
            The base attribute maps the instances refer to, by id
            (:attr:`~fastscp.index.batchtable.InstanceBatch.maps`).

        Returns
        -------
        int
            The number of distinct instance paths in the batch.
        """
        batch = last_per_path(instances)
        count = batch.num_rows
        conflict_list = list(conflicts)
        latest = {t.path: t.thumbnail_path for t in thumbnails}
        if not count and not conflict_list and not latest:
            return 0
        parents = self._changed_parents(batch)
        conflict_batch = _conflicts_table(conflict_list) if conflict_list else None
        # PERF: a base map is written once (the next batches of its series
        # skip the statement, ~5.5 ms of CPU each): see _known_maps.
        new_maps = {key: text for key, text in (maps or {}).items() if key not in self._known_maps}
        map_batch = pa.table({"id": pa.array(list(new_maps), type=pa.int64()),
                              "attributes": pa.array(list(new_maps.values()), type=pa.string())}) if new_maps else None
        thumbnail_batch = pa.table({"path": pa.array(list(latest), type=pa.string()),
                                    "thumbnail_path": pa.array(list(latest.values()), type=pa.string())}) \
            if latest else None
        extras = _Extras(conflict_batch, map_batch, thumbnail_batch)
        # A lake has no keys to refuse a resend: it always replaces.
        careful = keep_newer or self.lake is not None
        try:
            if not careful:
                try:
                    # The common case, every row new: plain INSERTs. An upsert
                    # (ON CONFLICT DO UPDATE) costs ~6 ms more per statement.
                    self._in_transaction(self._insert, batch, parents, extras)
                except duckdb.ConstraintException:
                    # A resend (its path is indexed, or a thumbnail made again),
                    # or a parent row that changed or that this process has not
                    # written yet. DuckDB has no savepoints: start over,
                    # replacing and upserting.
                    careful = True
            if careful:
                replaced = self._in_transaction(self._replace, batch, parents, extras, keep_newer)
                if replaced or parents["studies"] or parents["series"]:
                    # A replaced instance, or a study or series written again, may
                    # have moved to another parent (a correction) and left the old
                    # one empty. Dropping empty parents scans the instances (a few
                    # ms per 1M): the indexer does it when idle.
                    self.needs_prune = True
        except BaseException:
            self._forget()
            raise
        if not self.lake:
            if len(self._known_maps) > _KNOWN_LIMIT:
                self._known_maps.clear()
            self._known_maps.update(new_maps)
        for table, rows in parents.items():
            known = self._known[table]
            if len(known) > _KNOWN_LIMIT:
                known.clear()
            for row in rows:
                known[row[0]] = row  # type: ignore[index]
        self._after_write()
        return count

    @contextlib.contextmanager
    def transaction(self, *registered: str) -> Iterator[duckdb.DuckDBPyConnection]:
        """The block's writes in one transaction: BEGIN, then COMMIT, or ROLLBACK if the block raises.

        The block's own exception is the one that propagates (a failed
        ROLLBACK does not hide it). The Arrow tables registered under the
        names in ``registered`` are unregistered afterwards, committed or
        not (a rollback drops some registrations, not all).

        Example
        -------
        >>> with index.transaction("gone_paths") as con:  # doctest: +SKIP
        ...     con.register("gone_paths", table)
        ...     con.execute("DELETE FROM instances WHERE path IN (SELECT path FROM gone_paths)")
        """
        con = self.con
        con.execute("BEGIN")
        try:
            yield con
            con.execute("COMMIT")
        except BaseException:
            try:
                con.execute("ROLLBACK")
            except duckdb.Error:
                pass
            raise
        finally:
            for name in registered:
                try:
                    con.unregister(name)
                except (duckdb.Error, KeyError):
                    pass

    def _forget(self) -> None:
        """Forget which parents and base maps are written (after a failed write, or rows deleted)."""
        self._known = {table: {} for table in self._known}
        self._known_maps = set()

    def _in_transaction(self, write: Callable[..., bool | None], *args: object) -> bool:
        """``write(*args)`` in one :meth:`transaction`; its result.

        In a lake, a write that conflicts with another node's commit is
        rolled back and written again (its rows are replaced by key, so
        once is the same as twice).
        """
        for attempt in range(1, LAKE_WRITE_ATTEMPTS + 1):
            try:
                with self.transaction("batch_instances", "batch_parents", "batch_conflicts", "batch_maps",
                                      "batch_thumbnails"):
                    return bool(write(*args))
            except duckdb.TransactionException as exc:
                if not self.lake or attempt == LAKE_WRITE_ATTEMPTS:
                    raise
                log.info("%s: a write conflicted with another node's, attempt %d: %s", self.path, attempt,
                         str(exc).splitlines()[0])
                time.sleep(0.05 * attempt)
        raise AssertionError("unreachable")

    def node_addresses(self) -> dict[str, NodeAddress]:
        """Each node's latest :class:`NodeAddress` (a lake only), by name."""
        try:
            rows = self.con.execute(NODE_ADDRESSES_SQL).fetchall()
        except duckdb.CatalogException:
            return {}  # no node has registered yet
        return {str(row[0]): NodeAddress(*row) for row in rows}

    def register_node(self, address: NodeAddress) -> None:
        """Record where this node answers for its files (a lake only: the other nodes fetch them from there).

        Raises
        ------
        duckdb.Error
            The catalog refused it (after :data:`LAKE_WRITE_ATTEMPTS` tries).
        """
        for attempt in range(1, LAKE_WRITE_ATTEMPTS + 1):
            try:
                with self.transaction() as con:
                    con.execute(_NODE_ADDRESSES)
                    con.execute("INSERT INTO node_addresses VALUES (?, ?, ?, ?, ?, ?, ?, now())", list(address))
                return
            except (duckdb.TransactionException, duckdb.CatalogException) as exc:
                # Nodes that start together on a lake without the table race to make it.
                if attempt == LAKE_WRITE_ATTEMPTS:
                    raise
                log.info("%s: registering node %s conflicted with another node, attempt %d: %s", self.path,
                         address.node, attempt, str(exc).splitlines()[0])
                time.sleep(0.05 * attempt)

    def _own_rows(self, table: str, batch: str) -> bool:
        """Whether ``table`` holds a row of this node with a path of the registered ``batch``."""
        return bool(self.con.execute(
            f"SELECT count(*) FROM {table} WHERE path IN (SELECT path FROM {batch}){self._mine()}").fetchall()[0][0])

    def _mine(self, alias: str = "") -> str:
        """SQL: `` AND`` the row is this node's (in a lake; "" in a file, whose rows are all its own)."""
        return f" AND {alias}node = {_sql_text(self.lake.node)}" if self.lake else ""

    def _insert(self, batch: pa.Table, parents: dict[str, list[tuple[object, ...]]], extras: _Extras) -> None:
        self._insert_maps(extras.maps)
        if batch.num_rows:
            if self._instance_order is None:
                # The table's own column order (a migration appends columns at the end).
                self._instance_order = [row[0] for row in self.con.execute("DESCRIBE instances").fetchall()]
            # PERF: the relation's insert_into, not an INSERT from a registered view: 4.6 -> 3.2 ms
            # of CPU per batch of 80 (DuckDB makes and drops a view per registration).
            self.con.from_arrow(batch.select(self._instance_order)).insert_into("instances")
            for table, rows in parents.items():
                self._write_parents(table, rows, upsert=False)
        self._insert_conflicts(extras.conflicts)
        if extras.thumbnails is not None:
            # PERF: in the batch's transaction, not one of their own: one commit less per
            # batch (timed per call at 400 images/s: 6.0 ms of the writer's CPU per batch
            # in their own transaction, 2.5 ms in the batch's).
            self.con.from_arrow(extras.thumbnails).insert_into("thumbnails")

    def _replace(self, batch: pa.Table, parents: dict[str, list[tuple[object, ...]]], extras: _Extras,
                 keep_newer: bool) -> bool:
        """Instances and thumbnails replace the rows of their paths, parents are upserted; True if an
        instance's row was replaced.

        With ``keep_newer`` an indexed row whose ``received_at`` is not older
        is kept (reconcile must not undo what a worker sent meanwhile).
        """
        replaced = False
        self._insert_maps(extras.maps)
        if batch.num_rows:
            con = self.con
            con.register("batch_instances", batch)
            if keep_newer:
                con.execute(
                    "DELETE FROM instances WHERE path IN (SELECT b.path FROM batch_instances b "
                    f"JOIN instances i ON i.path = b.path{self._mine('i.')} WHERE i.received_at < b.received_at)"
                    + self._mine()
                )
                con.execute(f"INSERT INTO instances {self._instance_values} b "
                            f"WHERE NOT EXISTS (SELECT 1 FROM instances i WHERE i.path = b.path{self._mine('i.')})")
                replaced = True
            else:
                deleted = 0
                if not self.lake or self._own_rows("instances", "batch_instances"):
                    # (In a lake only when there is one: a DELETE conflicts with other nodes' deletes.)
                    (deleted,) = con.execute(
                        f"DELETE FROM instances WHERE path IN (SELECT path FROM batch_instances){self._mine()}"
                    ).fetchone()  # type: ignore[misc]
                con.execute(f"INSERT INTO instances {self._instance_values}")
                replaced = deleted > 0
            if replaced:
                # A replaced row may move an instance to another series or
                # study: rewrite every parent (empty ones are pruned later).
                parents.update(self._changed_parents(batch, all_rows=True))
            for table, rows in parents.items():
                self._write_parents(table, rows, upsert=True)
        self._insert_conflicts(extras.conflicts)
        if extras.thumbnails is not None:
            # A thumbnail made again (a resend) replaces the one its instance had.
            con = self.con
            con.register("batch_thumbnails", extras.thumbnails)
            if not self.lake or self._own_rows("thumbnails", "batch_thumbnails"):
                con.execute(f"DELETE FROM thumbnails WHERE path IN (SELECT path FROM batch_thumbnails){self._mine()}")
            node = f", {_sql_text(self.lake.node)}" if self.lake else ""
            con.execute(f"INSERT INTO thumbnails SELECT *{node} FROM batch_thumbnails")
        return replaced

    def _insert_maps(self, maps: pa.Table | None) -> None:
        if maps is not None:
            self.con.register("batch_maps", maps)
            # A base map seen before (the same text: the same id) is there already.
            if self.lake:
                self.con.execute("INSERT INTO attribute_maps SELECT id, attributes FROM batch_maps b "
                                 "WHERE NOT EXISTS (SELECT 1 FROM attribute_maps a WHERE a.id = b.id)")
            else:
                self.con.execute("INSERT OR IGNORE INTO attribute_maps SELECT id, attributes FROM batch_maps")

    def _insert_conflicts(self, conflicts: pa.Table | None) -> None:
        if conflicts is not None:
            self.con.register("batch_conflicts", conflicts)
            node = f", {_sql_text(self.lake.node)}" if self.lake else ""
            self.con.execute(f"INSERT INTO duplicate_conflicts SELECT *{node} FROM batch_conflicts")

    def _changed_parents(self, batch: pa.Table, *, all_rows: bool = False) -> dict[str, list[tuple[object, ...]]]:
        """Study and series rows of the batch that differ from what we last wrote."""
        changed: dict[str, list[tuple[object, ...]]] = {}
        for table, fields in (("studies", STUDY_FIELDS), ("series", SERIES_FIELDS)):
            latest = distinct_rows(batch, fields)
            known = self._known[table]
            changed[table] = [row for key, row in latest.items() if all_rows or known.get(key) != row]
        return changed

    def _write_parents(self, table: str, rows: list[tuple[object, ...]], *, upsert: bool) -> None:
        if not rows:
            return
        names = list(TABLES[table])
        columns = list(zip(*rows, strict=True))
        batch = pa.Table.from_arrays(
            [pa.array(list(values), type=_SCHEMAS[table].field(name).type) for name, values in zip(names, columns,
                                                                                                     strict=True)],
            schema=_SCHEMAS[table],
        )
        self.con.register("batch_parents", batch)  # replaces the last table's; unregistered by _in_transaction
        if self.lake:
            # Appended, never replaced: the view reads the latest (_LAKE_PARENTS).
            self.con.execute(f"INSERT INTO {_LAKE_PARENTS[table]} ({_column_list(table)}, written_at) "
                             "SELECT *, now() FROM batch_parents")
        elif upsert:
            updates = ", ".join(f"{quote(name)} = excluded.{quote(name)}" for name in names[1:])
            self.con.execute(f"INSERT INTO {table} ({_column_list(table)}) SELECT * FROM batch_parents "
                             f"ON CONFLICT DO UPDATE SET {updates}")
        else:
            self.con.execute(f"INSERT INTO {table} ({_column_list(table)}) SELECT * FROM batch_parents")

    def prune(self) -> None:
        """Drop series and studies left without instances, in one transaction."""
        with self.transaction():
            self._prune()
        self.needs_prune = False
        self._forget()
        self._after_write()

    def _prune(self) -> None:
        series, studies = (_LAKE_PARENTS["series"], _LAKE_PARENTS["studies"]) if self.lake else ("series", "studies")
        self.con.execute(
            f"DELETE FROM {series} WHERE NOT EXISTS "
            f"(SELECT 1 FROM instances i WHERE i.series_instance_uid = {series}.series_instance_uid)"
        )
        self.con.execute(
            f"DELETE FROM {studies} WHERE NOT EXISTS "
            f"(SELECT 1 FROM instances i WHERE i.study_instance_uid = {studies}.study_instance_uid)"
        )
        self.con.execute(
            "DELETE FROM attribute_maps WHERE NOT EXISTS "
            "(SELECT 1 FROM instances i WHERE i.attributes_base = attribute_maps.id)"
        )

    def remove(self, paths: Iterable[str]) -> int:
        """Drop the rows of these paths (files that are gone); returns how many were dropped."""
        gone = list(dict.fromkeys(paths))
        if not gone:
            return 0
        with self.transaction("gone_paths") as con:
            con.register("gone_paths", pa.table({"path": pa.array(gone, type=pa.string())}))
            # The count DELETE answers (DuckLake has no DELETE ... RETURNING).
            (dropped,) = con.execute(
                f"DELETE FROM instances WHERE path IN (SELECT path FROM gone_paths){self._mine()}"
            ).fetchall()[0]
            con.execute(f"DELETE FROM thumbnails WHERE path IN (SELECT path FROM gone_paths){self._mine()}")
            self._prune()
        self._forget()
        self._after_write()
        return int(dropped)

    def _after_write(self) -> None:
        if self.lake:
            return  # no WAL; its small files are merged on a schedule (fastscp.index.lake)
        if self.wal_mode:
            self.needs_checkpoint = True
        else:
            self.checkpoint()

    def tidy(self) -> None:
        """Work left for idle time: drop empty parents (:meth:`prune`), then checkpoint the WAL."""
        if self.needs_prune:
            self.prune()
        if self.needs_checkpoint and self.checkpoint():
            self.needs_checkpoint = False

    def checkpoint(self) -> bool:
        """Write the WAL into the data file; False if DuckDB can't now (a query is open).

        Not for a lake (there CHECKPOINT is all of DuckLake's maintenance,
        which :mod:`fastscp.index.lake` runs on a schedule, one node at a time).
        """
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
        relation = (con or self.con).sql("SELECT path, size, epoch_us(received_at) AS received_us FROM instances "
                                         f"WHERE true{self._mine()}")
        # DuckDB 1.4+ calls it to_arrow_table(); older ones arrow().
        table = (getattr(relation, "to_arrow_table", None) or relation.arrow)()
        paths = table.column("path").to_pylist()
        sizes = table.column("size").to_pylist()
        times = table.column("received_us").to_pylist()
        return dict(zip(paths, zip(sizes, times, strict=True), strict=True))

    def study_instances(self, study_instance_uid: str) -> list[tuple[str, HeaderFields]]:
        """(path, header fields) of every indexed file of a study, by path.

        The header fields are put together from the instance, series and
        study rows (a study's attributes are its newest instance's).
        """
        return [(path, header) for _node, path, _ae, _us, header in self.study_rows(study_instance_uid)]

    def study_rows(self, study_instance_uid: str, *,
                   every_node: bool = False) -> list[tuple[str, str, str, int, HeaderFields]]:
        """(node, path, calling AE title, received_at in microseconds, header fields) of a study's files: as
        :meth:`study_instances`, and in a lake with ``every_node`` those of every node (node "" in a file)."""
        def column(name: str) -> str:
            if name == "attributes":
                return "CAST(ia.attributes AS VARCHAR)"  # the whole map
            if name in INSTANCE_HEADER_FIELDS:
                return f"i.{quote(name)}"
            return f"{'se' if name in SERIES_FIELDS else 'st'}.{quote(name)}"

        names = list(HeaderFields.__struct_fields__)
        select = ", ".join(column(name) for name in names)
        node = "i.node" if self.lake else "''"
        rows = self.con.execute(
            f"SELECT {node}, i.path, i.calling_ae_title, epoch_us(i.received_at), {select} "
            "FROM instances i JOIN instance_attributes ia ON ia.path = i.path"
            f"{' AND ia.node = i.node' if self.lake else ''} "
            "LEFT JOIN series se ON se.series_instance_uid = i.series_instance_uid "
            "LEFT JOIN studies st ON st.study_instance_uid = i.study_instance_uid "
            f"WHERE i.study_instance_uid = ?{'' if every_node else self._mine('i.')} ORDER BY i.path",
            [study_instance_uid],
        ).fetchall()
        return [
            (row[0], row[1], row[2], row[3],
             HeaderFields(**{name: value for name, value in zip(names, row[4:], strict=True) if value is not None}))
            for row in rows
        ]

    @staticmethod
    def paths_of(con: duckdb.DuckDBPyConnection, uids: Sequence[str]) -> list[str]:
        """Paths of the instances whose data set's or command's SOP Instance UID is one of ``uids``.

        PERF: a scan of two columns (no index: it would slow every insert);
        asked only when :class:`fastscp.index.indexer.UidIndex` says one may match.
        """
        rows = con.execute(
            "SELECT path FROM instances WHERE sop_instance_uid IN (SELECT unnest($1)) "
            "OR affected_sop_instance_uid IN (SELECT unnest($1))", [list(uids)],
        ).fetchall()
        return [row[0] for row in rows]

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
            cursor = self._cursor_source.cursor()
        if self.lake:
            cursor.execute("USE lake")  # each cursor starts in the in-memory database
        return cursor

    def close(self) -> None:
        try:
            self._cursor_source.close()
            self.con.close()
        except duckdb.Error as exc:
            log.warning("closing the index %s: %s", self.path, exc)


def read_conflicts(con: duckdb.DuckDBPyConnection) -> list[DuplicateConflict]:
    """Every logged duplicate conflict, oldest first (none in a schema v1 index, which had no log)."""
    if not con.execute("SELECT 1 FROM information_schema.tables WHERE table_name = 'duplicate_conflicts'").fetchall():
        return []
    rows = con.execute(
        "SELECT sop_instance_uid, path, existing_hash, new_hash, policy, outcome, new_path, calling_ae_title, "
        "epoch_us(received_at) FROM duplicate_conflicts ORDER BY received_at"
    ).fetchall()
    return [
        DuplicateConflict(sop_instance_uid=r[0], path=r[1], existing_hash=r[2], new_hash=r[3], policy=r[4],
                          outcome=r[5], new_path=r[6], calling_ae_title=r[7], received_at=r[8] / 1e6)
        for r in rows
    ]
