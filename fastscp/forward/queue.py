"""The forwarding queue: a SQLite file of its own beside the index.

Why SQLite and not the index: DuckDB lets one process open a file for
writing and then no other may open it at all, and the indexer owns the
index; the forwarder and ``fastscp forward status|retry|purge`` (while the
server runs) must both read and change the queue. SQLite in WAL mode lets
several processes do that, each change one transaction, and a transaction
survives ``kill -9`` of any of them (``synchronous=NORMAL``: a power cut
may undo the last commits, which the start's reconcile finds again, or a
"sent" mark, which means one more send: at least once either way). Why not
an append-only journal: retries, purges and per-destination figures would
each need a replay and a compaction of our own.

Tables: ``items`` (one row per instance and destination: queued, sent or
failed, with its attempts and last error), ``seen`` (every stored instance
the forwarder has taken in, matched or not, for a recent window: the
start's reconcile skips these), ``destinations`` (figures that outlive the
rows: sent, resent after an interruption, last error) and ``meta``
(``high_water``: the newest ``received_at`` taken in; ``since``: when
forwarding began).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from fastscp.index.records import InstanceRecord
from fastscp.status import DestinationState

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    destination TEXT NOT NULL,
    path TEXT NOT NULL,               -- relative to the storage root, as the index has it
    sop_class_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    size INTEGER NOT NULL,
    content_hash TEXT NOT NULL,
    received_at REAL NOT NULL,
    queued_at REAL NOT NULL,          -- also the version of the row: a newer copy of the file re-queues it
    state TEXT NOT NULL,              -- queued | sent | failed
    in_flight INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    done_at REAL,
    status INTEGER,                   -- the destination's last C-STORE status, if any
    last_error TEXT NOT NULL DEFAULT '',
    UNIQUE (destination, path)
);
CREATE INDEX IF NOT EXISTS items_due ON items (destination, state, next_try);
-- The figures (states) read the queued and failed rows only, never the sent ones.
CREATE INDEX IF NOT EXISTS items_state ON items (state, destination, in_flight);
CREATE TABLE IF NOT EXISTS seen (
    path TEXT PRIMARY KEY,
    received_at REAL NOT NULL,
    content_hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS seen_time ON seen (received_at);
CREATE TABLE IF NOT EXISTS destinations (
    name TEXT PRIMARY KEY,
    sent INTEGER NOT NULL DEFAULT 0,
    resent INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    last_error_at REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value REAL NOT NULL);
"""

#: Queue an instance for a destination; a newer copy of a file queued or sent before is queued again.
_QUEUE_SQL = (
    "INSERT INTO items (destination, path, sop_class_uid, sop_instance_uid, transfer_syntax_uid, size, content_hash, "
    "received_at, queued_at, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued') ON CONFLICT (destination, path) "
    "DO UPDATE SET sop_class_uid = excluded.sop_class_uid, sop_instance_uid = excluded.sop_instance_uid, "
    "transfer_syntax_uid = excluded.transfer_syntax_uid, size = excluded.size, content_hash = excluded.content_hash, "
    "received_at = excluded.received_at, queued_at = excluded.queued_at, state = 'queued', attempts = 0, "
    "next_try = 0, done_at = NULL, status = NULL, last_error = ''"
)
#: Seconds within which two records of one path are one receipt, when a hash can't tell.
SAME_RECEIPT = 1.0
#: Sent rows are kept this long (``destinations.sent`` counts them for good).
KEEP_SENT = 86400.0
#: ``seen`` rows are kept this far behind the high-water mark (twice the start's reconcile window,
#: fastscp.forward.process.START_WINDOW): one row per stored instance, ~200 bytes.
KEEP_SEEN = 1200.0


@dataclass(frozen=True)
class Item:
    id: int
    destination: str
    path: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    size: int
    queued_at: float
    attempts: int


class QueueError(Exception):
    """The queue file can't be used; the message says which and why."""


class Queue:
    """One connection to the queue file (one per thread)."""

    def __init__(self, path: str, *, create: bool = True, timeout: float = 30.0) -> None:
        """``create``: make the file and its tables if missing (the forwarder); else it must exist.
        ``timeout``: seconds to wait for another process's write transaction."""
        self.path = path
        if not create and not os.path.exists(path):
            raise QueueError(f"{path}: no forwarding queue (forwarding.queue; the forwarder makes it on its start)")
        try:
            self.con = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
            self.con.execute("PRAGMA synchronous=NORMAL")
            if create:
                self.con.execute("PRAGMA journal_mode=WAL")  # kept in the file: set once, by its maker
                self.con.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise QueueError(f"{path}: cannot open the forwarding queue: {exc}") from None

    def close(self) -> None:
        self.con.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (taken at once: no other writer can slip in between its reads and writes)."""
        self.con.execute("BEGIN IMMEDIATE")
        try:
            yield self.con
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.con.execute("COMMIT")

    # -- taking records in ----------------------------------------------------------------

    def high_water(self) -> float | None:
        row = self.con.execute("SELECT value FROM meta WHERE key = 'high_water'").fetchone()
        return None if row is None else float(row[0])

    def known(self, since: float) -> dict[str, tuple[float, str]]:
        """path -> (received_at, content_hash) of the records taken in with ``received_at >= since``."""
        rows = self.con.execute("SELECT path, received_at, content_hash FROM seen WHERE received_at >= ?", (since,))
        return {path: (received, digest) for path, received, digest in rows}

    def take(self, records: Iterable[tuple[InstanceRecord, list[str]]], now: float | None = None) -> int:
        """Record each stored instance as seen, and queue it for its destinations; one transaction.

        A record of a path already taken in is the same receipt (skipped)
        when both have the same content hash, or, without hashes, when
        their ``received_at`` are within :data:`SAME_RECEIPT`; otherwise it
        is a new copy of the file and is queued again.

        Returns
        -------
        int
            (instance, destination) pairs queued.
        """
        now = time.time() if now is None else now
        queued = 0
        with self._transaction() as con:
            newest = None
            for record, destinations in records:
                row = con.execute("SELECT received_at, content_hash FROM seen WHERE path = ?",
                                  (record.path,)).fetchone()
                if row is not None and _same_receipt(row, record):
                    continue
                con.execute("INSERT INTO seen (path, received_at, content_hash) VALUES (?, ?, ?) ON CONFLICT (path) "
                            "DO UPDATE SET received_at = excluded.received_at, content_hash = excluded.content_hash",
                            (record.path, record.received_at, record.content_hash))
                newest = record.received_at if newest is None else max(newest, record.received_at)
                header = record.header
                for destination in destinations:
                    con.execute(_QUEUE_SQL, (destination, record.path, header.sop_class_uid or "",
                                             header.sop_instance_uid or "", record.transfer_syntax_uid, record.size,
                                             record.content_hash, record.received_at, now))
                    queued += 1
            if newest is not None:
                con.execute("INSERT INTO meta (key, value) VALUES ('high_water', ?) ON CONFLICT (key) "
                            "DO UPDATE SET value = max(value, excluded.value)", (newest,))
        return queued

    def start_mark(self, now: float) -> float:
        """When forwarding began (set at the first start): nothing received before it is forwarded, not the archive."""
        self.con.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('since', ?)", (now,))
        return float(self.con.execute("SELECT value FROM meta WHERE key = 'since'").fetchone()[0])

    # -- sending --------------------------------------------------------------------------

    def recover(self) -> dict[str, int]:
        """At the forwarder's start: rows left in flight by a dead forwarder go back to the queue.

        Each may have reached its destination before the forwarder died: it
        is sent again (at least once), and counted per destination as
        ``resent``. Returns those counts.
        """
        with self._transaction() as con:
            counts = dict(con.execute("SELECT destination, count(*) FROM items WHERE in_flight = 1 "
                                      "GROUP BY destination").fetchall())
            for name, count in counts.items():
                self._note(con, name, resent=count)
            con.execute("UPDATE items SET in_flight = 0 WHERE in_flight = 1")
        return counts

    @staticmethod
    def _note(con: sqlite3.Connection, name: str, *, error: str = "", sent: int = 0, resent: int = 0) -> None:
        """A destination's figures: counts added, the last error if any."""
        con.execute("INSERT OR IGNORE INTO destinations (name) VALUES (?)", (name,))
        if sent or resent:
            con.execute("UPDATE destinations SET sent = sent + ?, resent = resent + ? WHERE name = ?",
                        (sent, resent, name))
        if error:
            con.execute("UPDATE destinations SET last_error = ?, last_error_at = ? WHERE name = ?",
                        (error, time.time(), name))

    def claim(self, destination: str, limit: int, now: float | None = None) -> list[Item]:
        """Up to ``limit`` queued items of ``destination`` that are due, marked in flight."""
        now = time.time() if now is None else now
        with self._transaction() as con:
            rows = con.execute(
                "SELECT id, destination, path, sop_class_uid, sop_instance_uid, transfer_syntax_uid, size, queued_at, "
                "attempts FROM items WHERE destination = ? AND state = 'queued' AND in_flight = 0 AND next_try <= ? "
                "ORDER BY next_try, id LIMIT ?", (destination, now, limit)).fetchall()
            con.executemany("UPDATE items SET in_flight = 1 WHERE id = ?", [(row[0],) for row in rows])
        return [Item(*row) for row in rows]

    def next_due(self, destination: str) -> float | None:
        row = self.con.execute("SELECT min(next_try) FROM items WHERE destination = ? AND state = 'queued' "
                               "AND in_flight = 0", (destination,)).fetchone()
        return None if row[0] is None else float(row[0])

    def _finish(self, item: Item, sql: str, params: tuple, error: str = "", resent: bool = False) -> None:
        with self._transaction() as con:
            # queued_at is the row's version: a newer copy queued meanwhile stays queued.
            changed = con.execute(f"UPDATE items SET in_flight = 0, {sql} WHERE id = ? AND queued_at = ?",
                                  (*params, item.id, item.queued_at)).rowcount
            if not changed:
                con.execute("UPDATE items SET in_flight = 0 WHERE id = ?", (item.id,))
            self._note(con, item.destination, error=error, sent=int(bool(changed) and "'sent'" in sql),
                       resent=int(resent))

    def sent(self, item: Item, status: int) -> None:
        self._finish(item, "state = 'sent', done_at = ?, status = ?, attempts = attempts + 1",
                     (time.time(), status))

    def failed(self, item: Item, status: int | None, error: str) -> None:
        """A permanent refusal: kept as failed (``fastscp forward retry`` queues it again), never retried."""
        self._finish(item, "state = 'failed', done_at = ?, status = ?, last_error = ?, attempts = attempts + 1",
                     (time.time(), status, error), error)

    def later(self, item: Item, status: int | None, error: str, next_try: float, *, resent: bool = False) -> None:
        """A transient failure of this item: tried again at ``next_try``; ``resent``: it went without an
        answer, so the destination may hold it already (counted)."""
        self._finish(item, "status = ?, last_error = ?, attempts = attempts + 1, next_try = ?",
                     (status, error, next_try), error, resent)

    def release(self, items: Iterable[Item], error: str = "") -> None:
        """Items not tried (no association): back to the queue as they were."""
        items = list(items)
        with self._transaction() as con:
            con.executemany("UPDATE items SET in_flight = 0 WHERE id = ?", [(i.id,) for i in items])
            for name in {i.destination for i in items}:
                self._note(con, name, error=error)

    def tidy(self, now: float | None = None) -> None:
        """Drop sent rows older than :data:`KEEP_SENT` and ``seen`` rows far behind the high-water mark."""
        now = time.time() if now is None else now
        high = self.high_water() or now
        self.con.execute("DELETE FROM items WHERE state = 'sent' AND done_at < ?", (now - KEEP_SENT,))
        self.con.execute("DELETE FROM seen WHERE received_at < ?", (high - KEEP_SEEN,))

    # -- operators: status, retry, purge ---------------------------------------------------

    def states(self, names: Iterable[str] = (), now: float | None = None) -> list[DestinationState]:
        """The figures of each destination: those named (configured) and any the queue holds."""
        now = time.time() if now is None else now
        found: dict[str, DestinationState] = {name: DestinationState(name=name) for name in names}
        for name, sent, resent, error, error_at in self.con.execute(
                "SELECT name, sent, resent, last_error, last_error_at FROM destinations"):
            state = found.setdefault(name, DestinationState(name=name))
            state.sent, state.resent, state.last_error, state.last_error_at = sent, resent, error, error_at
        for name, state_, in_flight, count, oldest in self.con.execute(
                "SELECT destination, state, in_flight, count(*), min(queued_at) FROM items "
                "WHERE state IN ('queued', 'failed') GROUP BY destination, state, in_flight"):
            state = found.setdefault(name, DestinationState(name=name))
            if in_flight:
                state.in_flight += count
            elif state_ == "failed":
                state.failed += count
            elif state_ == "queued":
                state.queued += count
            if state_ == "queued" and oldest is not None:
                age = max(0.0, now - oldest)
                state.oldest_queued_seconds = max(state.oldest_queued_seconds, age)
        return sorted(found.values(), key=lambda s: s.name)

    def failures(self, destination: str | None = None, limit: int = 20) -> list[tuple[str, str, str]]:
        """(destination, path, last error) of failed items, newest first."""
        where, params = _only(destination)
        return self.con.execute(f"SELECT destination, path, last_error FROM items WHERE state = 'failed' {where} "
                                f"ORDER BY done_at DESC LIMIT ?", (*params, limit)).fetchall()

    def retry(self, destination: str | None = None) -> int:
        """Failed items (of one destination, or all) queued again, due now; returns how many."""
        where, params = _only(destination)
        with self._transaction() as con:
            count = con.execute(f"UPDATE items SET state = 'queued', attempts = 0, next_try = 0, done_at = NULL "
                                f"WHERE state = 'failed' {where}", params).rowcount
            # The forwarder sees this and stops waiting out its backoff.
            con.execute("INSERT INTO meta (key, value) VALUES ('retry_requested', ?) ON CONFLICT (key) "
                        "DO UPDATE SET value = excluded.value", (time.time(),))
        return count

    def retry_requested(self) -> float:
        row = self.con.execute("SELECT value FROM meta WHERE key = 'retry_requested'").fetchone()
        return 0.0 if row is None else float(row[0])

    def purge(self, states: tuple[str, ...], destination: str | None = None) -> int:
        """Delete the items in ``states`` (queued, failed, sent) of one destination or all; returns how many."""
        marks = ", ".join("?" for _ in states)
        where, params = _only(destination)
        return self.con.execute(f"DELETE FROM items WHERE state IN ({marks}) AND in_flight = 0 {where}",
                                (*states, *params)).rowcount


def _only(destination: str | None) -> tuple[str, tuple[str, ...]]:
    """SQL (and its parameter) that keeps one destination's items; none: every destination's."""
    return ("AND destination = ?", (destination,)) if destination else ("", ())


def _same_receipt(row: tuple[float, str], record: InstanceRecord) -> bool:
    received, digest = row
    if digest and record.content_hash:
        return bool(digest == record.content_hash)
    return abs(received - record.received_at) <= SAME_RECEIPT
