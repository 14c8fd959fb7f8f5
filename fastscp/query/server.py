"""The query half of the indexer process: answers queries and "where is this instance?" on local sockets.

The indexer process (composed by :func:`fastscp.runtime.children.indexer_process`)
owns the DuckDB file; these servers run in it, beside its record loop
(:class:`fastscp.index.indexer.Indexer`, which starts and closes them as its
services):

* **Queries.** A thread accepts on :func:`~fastscp.query.messages.query_address` (SOCK_STREAM) and
  answers each connection from a small thread pool, each query on its own
  DuckDB cursor (DuckDB's MVCC): batches go on being committed while a
  query runs. Framed by :func:`fastscp.query.messages.send_message`.
* **Where is this instance?** Before it answers a C-STORE, a worker asks
  (:class:`~fastscp.query.messages.LocateRequest`, on :func:`~fastscp.query.messages.locate_address`,
  with threads of its own, so a slow C-FIND never delays a store) where the
  instance's SOP Instance UIDs are stored, on a connection it keeps open
  (one thread here per connection, many requests each);
  :class:`~fastscp.index.indexer.UidIndex` answers from memory, and DuckDB
  is read only when a UID may be indexed (a resend).
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import duckdb
import msgspec

from fastscp.index.database import Index
from fastscp.index.indexer import Indexer, UidIndex
from fastscp.process.ipc import same_user
from fastscp.query.engine import run_stats, stream_query
from fastscp.query.messages import (
    Failed,
    Located,
    LocateRequest,
    QueryRequest,
    SqlRequest,
    StateRequest,
    StatsRequest,
    locate_address,
    query_address,
    recv_message,
    send_message,
    split_frame,
)
from fastscp.status import IndexerState

log = logging.getLogger("fastscp.indexer")

#: Queries answered at the same time; more wait for a thread.
QUERY_THREADS = 4
#: Open connections to the locate socket (one thread each): a worker keeps one
#: per association thread that stores at the same moment; more are refused.
LOCATE_CONNECTIONS = 256
#: A locate connection with no request for this long is closed (the worker opens a new one).
LOCATE_IDLE_TIMEOUT = 300.0
#: Seconds for the rest of a LocateRequest once it has begun, and for sending the answer.
LOCATE_IO_TIMEOUT = 5.0
#: The longest LocateRequest (a worker sends two UIDs, 64 characters each at most).
LOCATE_MAX_MESSAGE = 4096
#: A query client that neither sends nor reads for this long is dropped.
QUERY_IO_TIMEOUT = 30.0


class QueryServer:
    """Answers :class:`~fastscp.query.messages.QueryRequest`, :class:`~fastscp.query.messages.StatsRequest` and
    :class:`~fastscp.query.messages.LocateRequest` on a socket."""

    def __init__(self, index: Index, address: str, state: Callable[[], IndexerState],
                 uids: UidIndex | None = None, threads: int = QUERY_THREADS) -> None:
        """With ``uids``, the locate socket: each connection stays open for many LocateRequests in a
        thread of its own (at most :data:`LOCATE_CONNECTIONS`); else a query per connection from a pool
        of ``threads``."""
        self.index = index
        self.state = state
        #: Set: LocateRequests are answered (and only they: the locate socket).
        self.uids = uids
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.listener.bind(address)
            self.listener.listen(64)
        except OSError:
            self.listener.close()
            raise
        # accept() wakes up now and then to see whether we are closing.
        self.listener.settimeout(0.5)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fastscp-query")
        self._closing = threading.Event()
        #: The open locate connections (closed by :meth:`close`); whether the last one was refused (too many).
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._refusing = False
        self.thread = threading.Thread(target=self._accept_loop, name="fastscp-query-accept", daemon=True)

    def start(self) -> None:
        if self.uids is not None:
            threading.Thread(target=self._load_uids, name="fastscp-uids", daemon=True).start()
        self.thread.start()

    def _load_uids(self) -> None:
        assert self.uids is not None
        started = time.monotonic()
        cursor = self.index.cursor()
        try:
            self.uids.load(cursor)
        except Exception:
            log.exception("reading the indexed SOP Instance UIDs failed; duplicates are looked up in DuckDB")
            return
        finally:
            cursor.close()
        log.info("indexed SOP Instance UIDs read in %.2f s: the duplicate checks of new instances need no "
                 "question to the indexer from now on", time.monotonic() - started)

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closing.is_set():
                    return
                time.sleep(0.1)
                continue
            if not same_user(conn):
                conn.close()
                continue
            if self.uids is not None:
                self._keep_locating(conn)
                continue
            try:
                self.pool.submit(self._serve, conn)
            except RuntimeError:  # the pool is shutting down
                conn.close()
                return

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(QUERY_IO_TIMEOUT)
            try:
                request = recv_message(conn)
            except (OSError, ConnectionError, msgspec.DecodeError) as exc:
                log.debug("query connection dropped: %s", exc)
                return
            cursor = None
            try:
                cursor = self.index.cursor()
                if isinstance(request, QueryRequest | SqlRequest):
                    for message in stream_query(cursor, request):
                        send_message(conn, message)
                elif isinstance(request, StatsRequest):
                    send_message(conn, run_stats(cursor, request, self.state()))
                elif isinstance(request, StateRequest):
                    send_message(conn, self.state())
                else:
                    send_message(conn, Failed(f"not a request: {type(request).__name__}"))
            except (OSError, ConnectionError) as exc:
                log.debug("query client went away: %s", exc)
            except duckdb.Error as exc:
                log.error("query failed: %s", exc)
                try:
                    send_message(conn, Failed(str(exc)))
                except OSError:
                    pass
            finally:
                if cursor is not None:
                    cursor.close()

    def _keep_locating(self, conn: socket.socket) -> None:
        with self._connections_lock:
            if len(self._connections) >= LOCATE_CONNECTIONS or self._closing.is_set():
                conn.close()
                if not self._refusing and not self._closing.is_set():
                    log.warning("%d connections to the locate socket are open: more are refused until some close",
                                LOCATE_CONNECTIONS)
                self._refusing = True
                return
            self._connections.add(conn)
            self._refusing = False
        threading.Thread(target=self._serve_locates, args=(conn,), name="fastscp-locate", daemon=True).start()

    def _serve_locates(self, conn: socket.socket) -> None:
        """LocateRequests on one connection, answered in order until the worker closes it or is idle.

        The locate socket is on the hot path of every C-STORE: a worker
        keeps its connection (see :class:`fastscp.query.client.Locator`), and
        DuckDB is read (on a cursor of its own) only when a UID may be indexed.
        A request is bounded in size and, once begun, in time; a connection
        that sends anything else is closed.
        """
        poller = select.poll()
        poller.register(conn, select.POLLIN)
        # PERF: the kernel's timeouts (SO_RCVTIMEO, SO_SNDTIMEO: each recv and send, as settimeout()
        # bounded them) on a blocking socket: Python's own timeout polls before every recv and send.
        # With one recv for the whole request (usually), a locate costs the indexer a poll, a recv
        # and a send instead of four polls, two recvs and a send: 30 -> 21 us of the indexer's CPU
        # per locate (20,000 locates of new UIDs from 2 processes, 10 interleaved rounds, medians).
        io_timeout = struct.pack("ll", int(LOCATE_IO_TIMEOUT), int(LOCATE_IO_TIMEOUT % 1 * 1e6))
        conn.settimeout(None)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, io_timeout)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, io_timeout)
        received = b""  # what has come of the next request (a client may send it in pieces, or several at once)
        try:
            while not self._closing.is_set():
                if not received and not poller.poll(LOCATE_IDLE_TIMEOUT * 1000):
                    return
                while (framed := split_frame(received, LOCATE_MAX_MESSAGE)) is None:
                    chunk = conn.recv(LOCATE_MAX_MESSAGE + 4)
                    if not chunk:
                        raise ConnectionError("connection closed in the middle of a message" if received
                                              else "connection closed")
                    received += chunk
                request, received = framed
                if not isinstance(request, LocateRequest):
                    send_message(conn, Failed(f"not a LocateRequest: {type(request).__name__}"))
                    return
                try:
                    answer: Located | Failed = Located(self._locate(request.uids))
                except duckdb.Error as exc:
                    log.error("looking up where SOP instances are stored failed: %s", exc)
                    answer = Failed(str(exc))
                send_message(conn, answer)
        except (OSError, ConnectionError, msgspec.DecodeError) as exc:
            log.debug("locate connection closed: %s", exc)
        finally:
            with self._connections_lock:
                self._connections.discard(conn)
            conn.close()

    def _locate(self, uids: list[str]) -> list[str]:
        assert self.uids is not None
        uids = [uid for uid in uids[:8] if uid]
        paths, maybe = self.uids.lookup(uids)
        if maybe:
            cursor = self.index.cursor()
            try:
                paths += Index.paths_of(cursor, uids)
            finally:
                cursor.close()
        return list(dict.fromkeys(paths))

    def close(self) -> None:
        self._closing.set()
        if self.thread.is_alive():
            self.thread.join(2)
        self.listener.close()
        with self._connections_lock:
            for conn in self._connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)  # wakes its thread, which closes it
                except OSError:
                    pass
        self.pool.shutdown(wait=True, cancel_futures=True)


def query_services(indexer: Indexer, index_path: str) -> list[QueryServer]:
    """The query and locate servers of an indexer (bound now; the indexer starts them)."""
    queries = QueryServer(indexer.index, query_address(index_path), indexer.state)
    try:
        locates = QueryServer(indexer.index, locate_address(index_path), indexer.state, indexer.uids)
    except BaseException:
        queries.close()
        raise
    return [queries, locates]
