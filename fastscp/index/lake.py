"""The shared index's upkeep: DuckLake's maintenance on a schedule, one node at a time.

Each commit of a node's indexer writes a small Parquet file per table it
touches (DuckLake keeps commits of up to 10 rows in its catalog instead), so a
node under load adds a few files a second, and every query reads them all.
Every ``database.maintenance_interval`` seconds each node's indexer process
runs :func:`maintain` unless another node is at it, on a connection of its
own: the indexer's writer goes on committing meanwhile (DuckLake commits
optimistically; a merge that conflicts with a node's write is tried again
at the next interval). One node at a time through a PostgreSQL advisory
lock in the catalog database (:func:`fastscp.index.database.catalog_lock`):
two nodes could merge at once, but DuckLake would refuse one's commit after
both had read and rewritten the same files. A node that finds the lock
taken skips that round; PostgreSQL drops the lock of a node that dies.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import NamedTuple

import duckdb

from fastscp.index.database import LAKE_KEEP_SNAPSHOTS, Index, catalog_lock

log = logging.getLogger("fastscp.index")

#: The lock of :func:`maintain` (:func:`fastscp.index.database.lock_key`).
MAINTENANCE_LOCK = "maintenance"


class Maintained(NamedTuple):
    """What one :func:`maintain` did."""

    #: Parquet data files of the lake's tables before and after.
    files_before: int
    files_after: int
    #: Inlined rows written out to Parquet (commits of up to 10 rows wait in the catalog).
    flushed_rows: int
    #: Files merged (or rewritten without their deleted rows), and the files they became.
    merged: int
    merged_into: int
    #: Snapshots forgotten, and files deleted that only they used (or no snapshot knows).
    expired_snapshots: int
    deleted_files: int
    seconds: float

    def __str__(self) -> str:
        return (f"{self.files_before} -> {self.files_after} data files (merged {self.merged} into "
                f"{self.merged_into}, {self.flushed_rows} inlined rows written out); {self.expired_snapshots} "
                f"snapshots expired, {self.deleted_files} unused files deleted; {self.seconds:.1f} s")


def data_files(con: duckdb.DuckDBPyConnection) -> int:
    """The Parquet data files the lake's tables read now."""
    tables = [row[0] for row in con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_catalog = 'lake' AND table_schema = 'main' "
        "AND table_type = 'BASE TABLE'").fetchall()]
    return sum(int(con.execute("SELECT count(*) FROM ducklake_list_files('lake', ?)", [table]).fetchall()[0][0])
               for table in tables)


def maintain(con: duckdb.DuckDBPyConnection, keep: str = LAKE_KEEP_SNAPSHOTS) -> Maintained:
    """DuckLake's maintenance of the lake attached to ``con``, step by step (each its own commit).

    What its CHECKPOINT does, with counts: inlined rows written out; small
    files merged (``ducklake_merge_adjacent_files``; the snapshots keep
    reading their parts of the merged file), and files mostly deleted
    rewritten; snapshots older than ``keep`` expired; then the files no
    snapshot reads (and files no snapshot ever knew, left by a failed
    commit) deleted once older than ``keep``: a query that started before
    the merge may still read them.
    """
    started = time.monotonic()
    before = data_files(con)
    older = f"older_than => now() - INTERVAL '{keep}'"

    def counts(sql: str) -> tuple[int, ...]:
        # Counted in SQL: the functions' timestamp columns would need pytz in Python.
        return tuple(int(value) for value in con.execute(sql).fetchall()[0])

    (flushed,) = counts("SELECT coalesce(sum(rows_flushed), 0) FROM ducklake_flush_inlined_data('lake')")
    merged, merged_into = counts("SELECT coalesce(sum(files_processed), 0), coalesce(sum(files_created), 0) "
                                 "FROM ducklake_merge_adjacent_files('lake')")
    rewritten, rewritten_into = counts("SELECT coalesce(sum(files_processed), 0), coalesce(sum(files_created), 0) "
                                       "FROM ducklake_rewrite_data_files('lake')")
    (expired,) = counts(f"SELECT count(*) FROM ducklake_expire_snapshots('lake', {older})")
    (deleted,) = counts(f"SELECT count(*) FROM ducklake_cleanup_old_files('lake', {older})")
    (orphans,) = counts(f"SELECT count(*) FROM ducklake_delete_orphaned_files('lake', {older})")
    return Maintained(before, data_files(con), flushed, merged + rewritten, merged_into + rewritten_into, expired,
                      deleted + orphans, time.monotonic() - started)


class LakeMaintenance:
    """A service of a lake node's indexer process (:class:`fastscp.index.indexer.Service`): :func:`maintain`
    every ``interval`` seconds, unless another node holds the lock.

    The first run comes after a random part of the interval, so nodes that
    start together spread out.
    """

    def __init__(self, index: Index, interval: float) -> None:
        assert index.lake is not None
        self.index = index
        self.interval = interval
        self._stop = threading.Event()
        self._con: duckdb.DuckDBPyConnection | None = None
        self._thread = threading.Thread(target=self._run, name="fastscp-lake-maintenance", daemon=True)

    def start(self) -> None:
        self._con = self.index.cursor()
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._con is not None:
            self._con.interrupt()  # a merge in progress: its files are left for the next one
            self._thread.join(30)
            if not self._thread.is_alive():
                self._con.close()

    def _run(self) -> None:
        delay = self.interval * random.uniform(0.1, 1.0)
        while not self._stop.wait(delay):
            delay = self.interval
            try:
                self.run_once()
            except Exception as exc:  # a conflict, the catalog unreachable: next time
                if self._stop.is_set():
                    return
                log.warning("%s: maintenance failed, tried again in %.0f s: %s", self.index.path, self.interval,
                            str(exc).splitlines()[0])

    def run_once(self) -> Maintained | None:
        """:func:`maintain` under the lock; None if another node holds it."""
        assert self._con is not None and self.index.lake is not None
        with catalog_lock(self._con, MAINTENANCE_LOCK) as held:
            if not held:
                log.debug("%s: another node is maintaining it", self.index.path)
                return None
            done = maintain(self._con)
        log.info("%s: maintenance by node %s: %s", self.index.path, self.index.lake.node, done)
        return done
