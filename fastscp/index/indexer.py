"""The indexer process's record loop: owns the DuckDB file, commits records in batches.

DuckDB lets one process open the file, so this process also answers
queries: the indexer runs *services* beside its loop (started with it,
closed after its last commit), which the process is composed with
(:func:`fastscp.runtime.children.indexer_process`: the query and locate
servers of :mod:`fastscp.query.server`). This package never imports the
query package.

* **Records.** Workers (and the post-store stage) connect to a Unix
  SOCK_SEQPACKET socket (:func:`~fastscp.index.client.indexer_address`, abstract namespace, so a
  long storage path can't overflow ``sun_path``); each message is one msgpack
  :class:`~fastscp.index.records.RecordBatch`: instance records column by column
  (:class:`~fastscp.index.records.InstanceColumns`), which the loop keeps as they
  came in a :class:`~fastscp.index.batchtable.InstanceBatch`, plus any duplicate
  conflicts and thumbnails. A commit is due when it holds
  ``database.batch_size`` records or its oldest record is
  ``database.batch_interval`` seconds old. A writer thread commits it while
  the loop goes on receiving (DuckDB releases the GIL while it writes);
  records that arrive meanwhile join the next batch (up to
  :data:`MAX_BATCH_FACTOR` times the size, then the loop stops reading), so
  a busy indexer writes fewer, bigger batches.
* **Which UIDs are indexed.** :class:`UidIndex` holds the SOP Instance UIDs
  committed and on their way, for "where is this instance?" before a C-STORE
  is answered.
* **Kept records.** A worker keeps, in files, the records this process
  (at ``server.derived_priority``) had no room for while it lagged
  (:class:`~fastscp.index.client.IndexerClient`); the loop takes them,
  oldest first, once nothing waits, and all of them before it stops.
* **Reconcile on start.** When it knows the storage root, the indexer
  compares the files with the index in a background thread, indexes what is
  missing (records a killed indexer never committed) and drops rows whose
  file is gone, then logs what it fixed. The process says it is ready before
  that: a walk of a big archive must not hold up the server.

The files are the truth: a batch DuckDB keeps refusing (a full disk) is
dropped after :data:`WRITE_ATTEMPTS` tries, logged, and indexed from its files
at the next start, rather than stalling every C-STORE behind it.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import selectors
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fastscp.index.batchtable import InstanceBatch
from fastscp.index.client import kept_folder
from fastscp.index.database import Index
from fastscp.index.records import BATCH_DECODER, DuplicateConflict, InstanceColumns, InstanceRecord, ThumbnailMade
from fastscp.index.reindex import plan, read_records
from fastscp.index.uidfilter import UidFilter
from fastscp.process.ipc import accept_local, drain, listen
from fastscp.process.kept import KeptFiles
from fastscp.status import IndexerState

log = logging.getLogger("fastscp.indexer")

#: A batch may grow to this many times ``batch_size`` with records that are already waiting.
#: PERF: each commit has fixed costs (parent-table statements, the WAL
#: flush); 10 -> 30 took a flooded indexer from ~100k to ~135k rows/s
#: (bench/test_bench_index.py::test_indexer_sustained_rate, 1M records).
MAX_BATCH_FACTOR = 30
#: DuckDB's threads in the indexer process (its queries included: DuckDB's setting is per
#: database; a DuckLake index keeps DuckDB's default). PERF: with the default (one per core)
#: each statement of a batch wakes a worker thread of DuckDB's, and the calling thread spins
#: until that worker is done: the indexer took 0.77 -> 0.67 ms of CPU per image (5,000
#: records with locates and thumbnails at 400/s, two interleaved pairs), and at 300k
#: instances the queries of bench/test_bench_index.py took 3-24 ms with 2 threads and 3-16
#: ms with 1 on this 2-core machine (each query still runs in its own thread). A quarter of the
#: cores: on a large host one C-FIND over millions of rows keeps some of DuckDB's parallelism,
#: and the spinning costs cores the workers do not use.
INDEXER_THREADS = max(1, (os.cpu_count() or 1) // 4)

#: Seconds without records after which the indexer tidies the index (Index.tidy:
#: drops empty parents, checkpoints the WAL).
TIDY_IDLE = 1.0
#: Tries of a batch before it is left to the next reconcile.
WRITE_ATTEMPTS = 5
#: Files read per reconcile step (one transaction each).
RECONCILE_CHUNK = 1000


class Service(Protocol):
    """Something that runs in the indexer process beside its loop (a query server)."""

    def start(self) -> None: ...

    def close(self) -> None: ...


# -- the writer thread's work, in order: batches, reconcile steps, tidying --------------


@dataclass(frozen=True)
class CommitBatch:
    """What the loop received, committed as one transaction."""

    instances: InstanceBatch
    conflicts: list[DuplicateConflict]
    thumbnails: list[ThumbnailMade]
    #: Records from a kept file (older than some the sockets brought): a newer row stays (Index.add_table).
    keep_newer: bool = False


@dataclass(frozen=True)
class AddRecords:
    """Reconcile: records read from files the index lacks (or whose file changed)."""

    records: list[InstanceRecord]


@dataclass(frozen=True)
class RemoveGone:
    """Reconcile: rows whose file was gone at the walk."""

    paths: list[str]


@dataclass(frozen=True)
class Prune:
    """Reconcile: drop parents left without instances (by a killed indexer)."""


@dataclass(frozen=True)
class Tidy:
    """Idle: drop empty parents, checkpoint the WAL (Index.tidy)."""


@dataclass(frozen=True)
class ReconcileDone:
    summary: str


WriteWork = CommitBatch | AddRecords | RemoveGone | Prune | Tidy | ReconcileDone


#: UIDs of the stored instances whose columns a batch of instances holds.
_UID_COLUMNS = ("sop_instance_uid", "affected_sop_instance_uid")


class UidIndex:
    """Which SOP Instance UIDs the index holds: answers "where is this instance?" without reading DuckDB.

    Records received and not yet committed are held exactly (UID -> path).
    Committed UIDs are held as 64-bit hashes (Python's ``hash``, stable
    within this process), sorted in a numpy array (8 bytes an instance) plus
    a set of the latest; a hit is confirmed by a DuckDB query
    (:meth:`fastscp.index.database.Index.paths_of`), which is the rare case: a resend.
    Until :meth:`load` has read the committed rows, every lookup may match.
    Thread-safe: the loop, the writer and the query threads all use it.
    """

    #: Hashes kept in the set before they are merged into the sorted array.
    MERGE_AT = 100_000

    def __init__(self, shared: UidFilter | None = None) -> None:
        self._lock = threading.Lock()
        #: The workers' copy of "may be indexed" (set wherever this learns of a UID, under its lock).
        self._shared = shared
        self._received: dict[str, str] = {}
        self._sorted = np.empty(0, dtype=np.int64)
        self._recent: set[int] = set()
        self.loaded = False

    def load(self, con: duckdb.DuckDBPyConnection) -> None:
        """Read the UIDs of the committed rows (at start; records go on arriving meanwhile)."""
        relation = con.sql(f"SELECT {', '.join(_UID_COLUMNS)} FROM instances")
        # DuckDB 2 calls it to_arrow_reader(); older ones fetch_arrow_reader().
        reader = (getattr(relation, "to_arrow_reader", None) or relation.fetch_arrow_reader)(100_000)
        parts = []
        for batch in reader:
            for column in batch.columns:
                uids = [uid for uid in column.to_pylist() if uid]
                parts.append(np.fromiter(map(hash, uids), dtype=np.int64, count=len(uids)))
        hashes = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        with self._lock:
            self._merge(hashes)
            self.loaded = True
            if self._shared is not None:
                self._shared.add_hashes(hashes)
                self._shared.set_ready()

    def _merge(self, hashes: np.ndarray) -> None:
        recent = np.fromiter(self._recent, dtype=np.int64, count=len(self._recent))
        self._sorted = np.union1d(self._sorted, np.concatenate((hashes, recent)))
        self._recent = set()

    def received(self, instances: InstanceColumns) -> None:
        """Records the indexer has received (in the loop thread)."""
        paths = instances.column("path")
        with self._lock:
            for name in _UID_COLUMNS:
                self._received.update(zip(instances.column(name), paths, strict=True))
                if self._shared is not None:
                    self._shared.add(instances.column(name))
            self._received.pop("", None)  # no UID (affected_sop_instance_uid: most records)

    def committed(self, instances: pa.Table, *, found: bool = False) -> None:
        """Rows now in DuckDB (or given up on: their files are found by the next reconcile).
        ``found``: rows the reconcile found on disk, never :meth:`received`."""
        paths = instances.column("path").to_pylist()
        with self._lock:
            received = self._received
            for name in _UID_COLUMNS:
                column = instances.column(name)
                if name != "sop_instance_uid" and not pc.any(pc.not_equal(column, "")).as_py():
                    continue  # PERF: the command's UID is "" unless it differed from the data set's
                uids = column.to_pylist()
                self._recent.update(map(hash, uids))
                if found and self._shared is not None:
                    self._shared.add(uids)
                # A record received since, under the same UID, keeps its entry.
                for uid in [u for u, p in zip(uids, paths, strict=True) if received.get(u) == p]:
                    del received[uid]
            self._recent.discard(hash(""))
            if len(self._recent) >= self.MERGE_AT:
                self._merge(np.empty(0, dtype=np.int64))

    def lookup(self, uids: list[str]) -> tuple[list[str], bool]:
        """Paths of received records with these UIDs, and whether a committed row may have one."""
        with self._lock:
            paths = [self._received[uid] for uid in uids if uid in self._received]
            if not self.loaded:
                return paths, True
            for uid in uids:
                key = hash(uid)
                if key in self._recent:
                    return paths, True
                at = int(np.searchsorted(self._sorted, key))
                if at < len(self._sorted) and self._sorted[at] == key:
                    return paths, True
            return paths, False


class Indexer:
    """The record loop of the indexer process (see the module docstring).

    Two threads share the work: the loop receives records and forms batches;
    a writer thread commits them (and the reconcile's steps), one at a time.
    DuckDB releases the GIL while it writes, so receiving the next batch
    overlaps writing the last one.

    Parameters
    ----------
    index : Index
        The open index, read-write.
    address : str
        The record socket to bind (:func:`~fastscp.index.client.indexer_address`).
    batch_size, batch_interval
        ``database.batch_size`` and ``database.batch_interval``.
    storage_root : str, optional
        Reconcile the index with the files under it when :meth:`run` starts.
    sr_root : str
        ``storage.sr_directory``, reconciled too when it is outside the root.
    services : sequence of Service, optional
        Started with :meth:`run`, closed after the last commit (the query
        servers: :func:`fastscp.query.server.query_services`). Also settable
        as :attr:`services` once the indexer exists (they ask it for its
        :meth:`state` and :attr:`uids`).
    shared : UidFilter, optional
        The supervisor's filter of indexed UIDs, kept up to date for the workers.
    """

    def __init__(self, index: Index, address: str, batch_size: int, batch_interval: float, *,
                 storage_root: str | None = None, sr_root: str = "", services: Sequence[Service] = (),
                 shared: UidFilter | None = None) -> None:
        self.index = index
        if not index.lake:
            index.con.execute(f"SET threads = {INDEXER_THREADS}")
        self.batch_size = batch_size
        self.batch_interval = batch_interval
        self.storage_root = storage_root
        self.sr_root = sr_root
        self.listener = listen(address)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, "listen")
        # The writer wakes the loop when a batch is written.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        #: Instance records waiting (as the runs of values they came in).
        self.pending = InstanceBatch()
        self.pending_conflicts: list[DuplicateConflict] = []
        self.pending_thumbnails: list[ThumbnailMade] = []
        self.oldest = 0.0
        self.last_record = 0.0
        self.stopping = False
        #: Instances committed since the start (written by the writer thread); thumbnail and
        #: conflict records are not instances (the status page shows this as "committed").
        self.committed = 0
        self.reconcile_state = "running" if storage_root is not None else "off"
        # Work for the writer thread, in order: batches, reconcile steps, tidying.
        self._writes: queue.Queue[WriteWork | None] = queue.Queue()
        #: Records of the batch the writer holds (0: it holds none).
        self._in_flight = 0
        self._written = threading.Event()
        self._written.set()
        self._tidy_queued = False
        self._writer = threading.Thread(target=self._write_loop, name="fastscp-index-writer", daemon=True)
        self._reconciler: threading.Thread | None = None
        #: Records workers kept in files while this process lagged (none without a storage root).
        self.kept = None if storage_root is None else KeptFiles(
            kept_folder(storage_root), "indexer", "the next start's reconcile indexes their files")
        #: The SOP Instance UIDs indexed or on their way (for LocateRequest).
        self.uids = UidIndex(shared)
        self.services: list[Service] = list(services)

    def state(self) -> IndexerState:
        """What the indexer is doing (for stats; read from a query thread)."""
        return IndexerState(pid=os.getpid(), pending=self._waiting + self._in_flight, committed=self.committed,
                            reconcile=self.reconcile_state, kept_files=self.kept.count() if self.kept else 0)

    @property
    def _waiting(self) -> int:
        return self.pending.count + len(self.pending_conflicts) + len(self.pending_thumbnails)

    def run(self) -> None:
        self._writer.start()
        for service in self.services:
            service.start()
        if self.storage_root is not None:
            self._reconciler = threading.Thread(target=self._reconcile, name="fastscp-reconcile", daemon=True)
            self._reconciler.start()
        try:
            self._loop()
            self._written.wait()
            self._hand_over()
            if self.index.needs_prune or self.index.needs_checkpoint:
                self._writes.put(Tidy())
        finally:
            self._writes.put(None)
            self._writer.join()
            for service in self.services:
                service.close()
            if self._reconciler is not None:
                self._reconciler.join(5)
            self._close_sockets()
            self.index.close()

    def _close_sockets(self) -> None:
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.selector.close()
        self._wake_w.close()

    def _loop(self) -> None:
        while True:
            if self._waiting >= self.batch_size * MAX_BATCH_FACTOR:
                # Back-pressure: stop reading (workers' sends block in the
                # kernel) until the writer has taken the batch it holds.
                self._written.wait()
            # At most 1 s: SIGTERM only sets a flag (and select() resumes after a signal).
            timeout = min(max(self.oldest + self.batch_interval - time.monotonic(), 0.0), 1.0) if self._waiting else 1.0
            for key, _events in self.selector.select(timeout):
                if key.data == "listen":
                    self._accept()
                elif key.data == "wake":
                    self._drain_wake()
                else:
                    self._receive(key.fileobj)  # type: ignore[arg-type]
            now = time.monotonic()
            if self._waiting and (self._waiting >= self.batch_size or now - self.oldest >= self.batch_interval):
                if self._written.is_set():
                    self._hand_over()
            elif (not self._waiting and self._written.is_set() and not self._tidy_queued
                  and (self.index.needs_prune or self.index.needs_checkpoint)
                  and now - self.last_record >= TIDY_IDLE):
                self._tidy_queued = True
                self._writes.put(Tidy())
            elif not self._waiting and self._written.is_set():
                self._take_kept(now)
            if self.stopping:
                # A worker that connected just before the stop (or while this process was
                # stopped: a select() a signal interrupted past its timeout reports nothing).
                self._accept()
            clients = len(self.selector.get_map()) - 2
            if self.stopping and clients == 0:
                self._written.wait()
                self._hand_over()  # the sockets' records, then the files'
                while self._take_kept(now, at_stop=True):
                    pass
                return

    def stop(self) -> None:
        """Finish: commit what is pending once the workers have closed their connections, then return from run()."""
        self.stopping = True
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _accept(self) -> None:
        while (conn := accept_local(self.listener)) is not None:
            self.selector.register(conn, selectors.EVENT_READ, "records")

    def _receive(self, conn: socket.socket) -> None:
        now = time.monotonic()
        limit = self.batch_size * MAX_BATCH_FACTOR
        for data in drain(conn, self.selector, lambda: self._waiting < limit):
            self._add(data, now)

    def _add(self, data: bytes, now: float) -> None:
        """One message of records (from a socket or a kept file) joins what is pending."""
        try:
            batch = BATCH_DECODER.decode(data)
        except Exception as exc:  # a bad message must not stop indexing
            log.error("undecodable message from a worker dropped: %s", exc)
            return
        if not self._waiting:
            self.oldest = now
        self.last_record = now
        self.pending.add(batch.instances)
        self.uids.received(batch.instances)
        for record in batch.others:
            if isinstance(record, DuplicateConflict):
                self.pending_conflicts.append(record)
            elif isinstance(record, ThumbnailMade):
                self.pending_thumbnails.append(record)

    def _take_kept(self, now: float, at_stop: bool = False) -> bool:
        """Caught up (nothing pending), or stopping: hand the writer the oldest file of records a
        worker kept while this process lagged, if any, as a batch of its own; True if one was taken.

        Its records are older than some the sockets brought since, so a newer row of the same
        path stays. The file goes once they are handed over: if this process dies before they
        are committed, the reconcile on the next start indexes their files.
        """
        taken = self.kept.take_oldest(now, at_once=at_stop) if self.kept is not None else None
        if taken is None:
            return False
        for data in taken[1]:
            self._add(data, now)
        self._written.wait()
        self._hand_over(keep_newer=True)
        return True

    def _hand_over(self, keep_newer: bool = False) -> None:
        """Give what is pending to the writer as one batch."""
        if not self._waiting:
            return
        batch = CommitBatch(self.pending, self.pending_conflicts, self.pending_thumbnails, keep_newer)
        self._in_flight = self._waiting
        self.pending, self.pending_conflicts, self.pending_thumbnails = InstanceBatch(), [], []
        self._written.clear()
        self._writes.put(batch)

    # -- the writer thread: the only one that writes to DuckDB ----------------------------

    def _write_loop(self) -> None:
        while (work := self._writes.get()) is not None:
            if isinstance(work, CommitBatch):
                self._write_batch(work)
                continue
            try:
                if isinstance(work, AddRecords):
                    self.index.add(work.records, keep_newer=True)
                    self.uids.committed(InstanceBatch.of(work.records).table(), found=True)
                elif isinstance(work, RemoveGone):
                    assert self.storage_root is not None
                    # A file may have come back (a resend) since the walk.
                    root = self.storage_root
                    self.index.remove([p for p in work.paths if not os.path.exists(os.path.join(root, p))])
                elif isinstance(work, Prune):
                    self.index.prune()
                elif isinstance(work, Tidy):
                    self._tidy_queued = False
                    self.index.tidy()
                else:
                    self.reconcile_state = "done"
                    log.info("%s", work.summary)
            except Exception:
                if isinstance(work, Prune | Tidy):
                    log.exception("tidying the index (empty parents, checkpoint) failed; will retry")
                else:
                    log.exception("reconcile: could not apply a %s step; the next start tries again",
                                  type(work).__name__)
                    self.reconcile_state = "failed"

    def _write_batch(self, batch: CommitBatch) -> None:
        instances, conflicts, thumbnails = batch.instances, batch.conflicts, batch.thumbnails
        count = instances.count + len(conflicts) + len(thumbnails)
        table = instances.table()
        attempt = 0
        while True:
            try:
                self.index.add_table(table, conflicts, thumbnails, maps=instances.maps, keep_newer=batch.keep_newer)
                self.committed += instances.count
                break
            except Exception:
                attempt += 1
                log.exception("index commit of %d records failed (attempt %d of %d)", count, attempt,
                              WRITE_ATTEMPTS)
                if attempt >= WRITE_ATTEMPTS:
                    log.error("%d records not indexed; the files are stored: the next start's reconcile "
                              "(or fastscp reindex) indexes them", count)
                    break
                time.sleep(0.5)
        self.uids.committed(table)
        self._in_flight = 0
        self._written.set()
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    # -- reconcile on start ----------------------------------------------------------------

    def _reconcile(self) -> None:
        root = self.storage_root
        assert root is not None
        started = time.monotonic()
        try:
            cursor = self.index.cursor()
            try:
                indexed = self.index.file_states(cursor)
            finally:
                cursor.close()
            path = os.path.abspath(self.index.path)
            skip = frozenset({path, path + ".wal", path + ".reindex", path + ".reindex.wal"})
            todo = plan(root, indexed, sr_root=self.sr_root, skip=skip, stop=lambda: self.stopping)
            failed: list[tuple[str, str]] = []
            work = todo.missing + todo.changed
            for start in range(0, len(work), RECONCILE_CHUNK):
                if self.stopping:
                    return
                records = read_records(root, work[start:start + RECONCILE_CHUNK], failed=failed)
                if records:
                    self._writes.put(AddRecords(records))
            if todo.gone and not self.stopping:
                self._writes.put(RemoveGone(todo.gone))
            # A killed indexer may have left parents without instances.
            self._writes.put(Prune())
            for name, reason in failed[:10]:
                log.warning("reconcile: %s not indexed: %s", name, reason)
            seconds = time.monotonic() - started
            if todo.missing or todo.changed or todo.gone or failed:
                summary = (f"reconcile: {todo.files} files under {root}: indexed {len(todo.missing)} missing, "
                           f"re-indexed {len(todo.changed)} changed, dropped {len(todo.gone)} rows whose file is "
                           f"gone, {len(failed)} unreadable; {seconds:.1f} s")
            else:
                summary = f"reconcile: the index matches the {todo.files} files under {root} ({seconds:.1f} s)"
            self._writes.put(ReconcileDone(summary))
        except Exception:
            log.exception("reconcile of %s with the index failed", root)
            self.reconcile_state = "failed"


def tune_gc() -> None:
    """Fewer cyclic GC passes, and quicker GIL hand-overs, in the indexer process.

    PERF: every record is two tracked objects that refcounting frees (they
    make no cycles); with the default threshold (700) a busy indexer spends
    a third of its time in collections that find nothing
    (bench/test_bench_index.py::test_indexer_sustained_rate).
    """
    gc.freeze()  # what the process holds from its start: never garbage
    gc.set_threshold(50_000, 20, 100)
    # The receiving loop gives up the GIL at every recv and waits to get it
    # back from the writer thread (up to the 5 ms default): 52k -> 58k rows/s
    # (same benchmark).
    sys.setswitchinterval(0.0005)
