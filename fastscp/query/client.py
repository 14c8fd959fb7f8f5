"""Asking a running server's indexer from other processes: queries (C-FIND, the CLI) and "where is this instance?".

* :class:`QueryClient` talks to the query servers of a running server's
  indexer (:mod:`fastscp.query.server`).
* :class:`Locator` is a worker's "where is this instance stored?" before it
  answers a C-STORE.
* :class:`LocalQueryClient` reads an index file no server has open.
* :func:`open_query_client` picks the running server, or the index file
  read-only when no server has it open.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
from pydicom.dataset import Dataset

from fastscp.index.client import indexer_address
from fastscp.index.database import NODE_ADDRESSES_SQL, Index, IndexUnavailable, Lake, NodeAddress
from fastscp.index.uidfilter import UidFilter
from fastscp.query.cfind import FindResponses, find
from fastscp.query.engine import run_query, run_stats
from fastscp.query.messages import (
    Columns,
    Done,
    Failed,
    IndexQueries,
    Located,
    LocateRequest,
    QueryError,
    QueryRequest,
    QueryResult,
    Rows,
    ServerUnavailable,
    SqlRequest,
    StateRequest,
    Stats,
    StatsRequest,
    locate_address,
    query_address,
    recv_message,
    send_message,
)
from fastscp.query.retrieve import Instance, Lookup, Selector, instances, stored
from fastscp.status import IndexerState

log = logging.getLogger("fastscp.indexclient")

#: Seconds a C-STORE waits for the indexer to say where its instance is stored.
LOCATE_TIMEOUT = 2.0


class LocalQueryClient:
    """Queries on an index file that no server has open (DuckDB read-only).

    Thread-safe: each call runs on its own DuckDB cursor.

    Raises
    ------
    fastscp.index.database.IndexUnavailable
        The file is missing, locked by a server, or of another schema version.
    """

    def __init__(self, index_path: str, lake: tuple[str, str, str] | None = None) -> None:
        if lake:  # the shared index (config database.catalog): any number of readers
            self.index = Index(index_path, read_only=True, lake=Lake(*lake))
            return
        if not os.path.exists(index_path):
            raise IndexUnavailable(f"{index_path}: no such index file (no server has stored anything there yet)")
        self.index = Index(index_path, read_only=True)

    def query(self, request: QueryRequest | SqlRequest) -> QueryResult:
        """Run a query; raises :class:`QueryError` for a bad request."""
        return run_query(self.index.cursor(), request)

    def stats(self, request: StatsRequest | None = None) -> Stats:
        return run_stats(self.index.cursor(), request or StatsRequest())

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> LocalQueryClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class QueryClient:
    """Runs queries through a running server's indexer.

    Thread-safe and stateless between calls: each query opens its own
    connection to the indexer's query socket (a local Unix socket, tens of
    microseconds), so the association threads of a worker can share one
    client.

    Parameters
    ----------
    index_path : str, optional
        The index file the server was started with.
    address : str, optional
        The query socket itself (instead of ``index_path``).
    timeout : float
        Seconds to wait for each message of an answer.
    """

    def __init__(self, index_path: str | None = None, *, address: str | None = None, timeout: float = 60.0) -> None:
        if address is None:
            if index_path is None:
                raise ValueError("QueryClient needs index_path or address")
            address = query_address(index_path)
        self.address = address
        self.timeout = timeout

    def _open(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.address)
        except OSError as exc:
            sock.close()
            raise ServerUnavailable(f"no fastscp server answers queries for this index ({exc.strerror})") from None
        return sock

    def available(self) -> bool:
        """True when a running server answers on the query socket."""
        try:
            self._open().close()
        except ServerUnavailable:
            return False
        return True

    def query(self, request: QueryRequest | SqlRequest) -> QueryResult:
        """Run a query in the server; rows stream in as they are read.

        Raises
        ------
        ServerUnavailable
            No server answers.
        QueryError
            The server refused the request (the message says why).
        """
        sock = self._open()
        try:
            send_message(sock, request)
            first = recv_message(sock)
        except BaseException:
            sock.close()
            raise
        if isinstance(first, Failed):
            sock.close()
            raise QueryError(first.message)
        if not isinstance(first, Columns):
            sock.close()
            raise ConnectionError(f"unexpected answer {type(first).__name__}")
        return QueryResult(first.names, self._rows(sock), sock.close)

    @staticmethod
    def _rows(sock: socket.socket) -> Iterator[list[Any]]:
        with sock:
            while True:
                message = recv_message(sock)
                if isinstance(message, Rows):
                    yield from message.rows
                elif isinstance(message, Done):
                    return
                elif isinstance(message, Failed):
                    raise QueryError(message.message)
                else:
                    raise ConnectionError(f"unexpected answer {type(message).__name__}")

    def stats(self, request: StatsRequest | None = None) -> Stats:
        """Totals and breakdowns of the index, with the indexer's own state."""
        with self._open() as sock:
            send_message(sock, request or StatsRequest())
            answer = recv_message(sock)
        if isinstance(answer, Failed):
            raise QueryError(answer.message)
        if not isinstance(answer, Stats):
            raise ConnectionError(f"unexpected answer {type(answer).__name__}")
        return answer

    def state(self) -> IndexerState:
        """The indexer's own state (pending and committed records, reconcile): no query, cheap."""
        with self._open() as sock:
            send_message(sock, StateRequest())
            answer = recv_message(sock)
        if not isinstance(answer, IndexerState):
            raise ConnectionError(f"unexpected answer {type(answer).__name__}")
        return answer

    def close(self) -> None:
        """Nothing to release (no connection is kept); for symmetry with LocalQueryClient."""

    def __enter__(self) -> QueryClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class Locator:
    """A worker's "where is this instance stored?" (a :class:`~fastscp.query.messages.LocateRequest`): duplicates.

    Keeps its connections to the indexer's locate socket open and reuses
    them (one per association thread that is asking at the same moment,
    taken from and given back to a small pool): the hot path of every
    C-STORE pays a send and a receive, not a connect and an accept.

    Never raises: while the indexer can't answer (restarting, overloaded
    past ``timeout``) the store goes on with what the file at its own path
    tells, and a warning says so once per outage. A kept connection that
    the indexer closed (it restarted, or dropped the connection as idle) is
    replaced by a new one within the same call.

    PERF: 5,000 locates of new UIDs through the real QueryServer (2 shared,
    busy cores; each pair the medians of 5-7 interleaved runs, the before
    and after code in one process): a connection per locate (connect,
    accept, a pool thread in the indexer) against kept connections, from
    one thread 132 -> 34, 148 -> 94, 374 -> 253 us per locate; from 4
    threads 121 -> 38, 322 -> 96, 250 -> 92 us (the machine's load varied
    between the sessions, not within a pair). End to end, 1,000 64x64 MR
    images by 4 storescu associations into one worker (6 interleaved
    pairs, CPU from /proc): the indexer 0.60 -> 0.51 ms per image; the
    worker's CPU (0.99 -> 0.97 ms) and the wall time stay within the noise:
    what is left is the round trip's wait for the indexer's answer.

    With ``shared`` (the supervisor's :class:`~fastscp.index.uidfilter.UidFilter`)
    :meth:`may_hold` says which UIDs the index may hold; the caller
    (:meth:`fastscp.storage.area.Storage.store`) asks only about those: a new
    instance, nearly every store, costs no question at all.
    """

    #: Connections kept open when no thread is asking (more are closed after use).
    KEEP = 16

    def __init__(self, index_path: str, shared: UidFilter | None = None, timeout: float = LOCATE_TIMEOUT) -> None:
        #: Opens the connections (a ServerUnavailable, a ConnectionError, when none can be made).
        self.client = QueryClient(address=locate_address(index_path), timeout=timeout)
        #: The indexer's filter of the UIDs it may hold: a UID it can't hold needs no question.
        self.shared = shared
        self._failing = False
        self._lock = threading.Lock()
        self._idle: list[socket.socket] = []
        #: The process the kept connections belong to (the supervisor makes the Locator, workers fork).
        self._pid = os.getpid()

    def _take(self) -> socket.socket | None:
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's connections are not ours to use
                for sock in self._idle:
                    sock.close()
                self._idle, self._pid = [], os.getpid()
            return self._idle.pop() if self._idle else None

    def _give_back(self, sock: socket.socket) -> None:
        with self._lock:
            if len(self._idle) < self.KEEP and self._pid == os.getpid():
                self._idle.append(sock)
                return
        sock.close()

    def _ask(self, uids: tuple[str, ...]) -> list[str]:
        sock = self._take()
        while True:
            kept = sock is not None
            if sock is None:
                sock = self.client._open()
            try:
                send_message(sock, LocateRequest(list(uids)))
                answer = recv_message(sock)
            except (OSError, ConnectionError, msgspec.DecodeError) as exc:
                sock.close()
                if kept and not isinstance(exc, TimeoutError):
                    sock = None  # closed by the indexer since its last use: once more on a new connection
                    continue
                raise
            if not isinstance(answer, Located):
                sock.close()
                raise ConnectionError(f"unexpected answer {type(answer).__name__}")
            self._give_back(sock)
            return answer.paths

    def map_in(self) -> None:
        """In a worker, at its start: the shared filter's pages into this process (UidFilter.map_in)."""
        if self.shared is not None:
            self.shared.map_in()

    def may_hold(self, uids: tuple[str, ...]) -> bool:
        """False when the shared filter says the index holds none of ``uids`` (nearly every store)."""
        return self.shared is None or self.shared.may_hold(uids)

    def __call__(self, uids: tuple[str, ...]) -> tuple[str, ...]:
        """The paths the index has for ``uids`` (asked: the caller has checked :meth:`may_hold`)."""
        try:
            paths = tuple(self._ask(uids))
        except (OSError, ConnectionError, msgspec.DecodeError) as exc:
            if not self._failing:
                self._failing = True
                log.warning("the index can't say where SOP instances are stored (%s): duplicates stored under "
                            "another path are not detected until it answers again", exc)
            return ()
        if self._failing:
            self._failing = False
            log.info("the index answers where SOP instances are stored again")
        return paths

    def close(self) -> None:
        """Close the kept connections."""
        with self._lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()


def open_query_client(index_path: str, lake: tuple[str, str, str] | None = None) -> IndexQueries:
    """Queries on ``index_path``: through its running server, else on the file read-only.

    ``lake`` (config ``Config.lake``): with no server running here, the
    shared index read-only instead of the file.

    Raises
    ------
    fastscp.index.database.IndexUnavailable
        No server answers and the file can't be opened (missing, locked by
        a server that is starting or stopping, another schema version).
    """
    client = QueryClient(index_path)
    if client.available():
        return client
    return LocalQueryClient(index_path, lake=lake)


def server_running(index_path: str) -> bool:
    """True if a running fastscp server owns ``index_path`` (its indexer answers)."""
    for address, kind in ((indexer_address(index_path), socket.SOCK_SEQPACKET),
                          (query_address(index_path), socket.SOCK_STREAM)):
        with socket.socket(socket.AF_UNIX, kind) as sock:
            try:
                sock.connect(address)
                return True
            except OSError:
                continue
    return False


def finder(index_path: str, *, retrieve_ae_title: str = "") -> Callable[[str, Dataset, bool], FindResponses]:
    """The ``find(model, identifier, relational)`` callable of :data:`fastscp.net.findscp.Finder` for an index.

    It asks the running server's indexer (one :class:`~fastscp.query.client.QueryClient`,
    thread-safe, no open connection) and works in every worker process.
    """
    client = QueryClient(index_path)

    def find_in_index(model: str, identifier: Dataset, relational: bool = False) -> FindResponses:
        return find(model, identifier, client, retrieve_ae_title=retrieve_ae_title, relational=relational)

    return find_in_index




def selector(index_path: str, storage_root: str, *, limit: int = 0, node: str = "") -> Selector:
    """The :data:`Selector` for a running server's index (one thread-safe :class:`QueryClient`);
    ``node``: this node's name in a shared index."""
    client = QueryClient(index_path)

    def select(model: str, identifier: Dataset, relational: bool = False) -> list[Instance]:
        return instances(model, identifier, client, storage_root, relational=relational, limit=limit, node=node)

    return select


def node_addresses(index_path: str, timeout: float) -> Callable[[], dict[str, NodeAddress]]:
    """Each node's registered address in a shared index, by name, read through the running server's indexer."""

    def read() -> dict[str, NodeAddress]:
        with QueryClient(index_path, timeout=timeout).query(SqlRequest(sql=NODE_ADDRESSES_SQL)) as result:
            return {str(row[0]): NodeAddress(*row) for row in result}

    return read


def lookup(index_path: str, storage_root: str) -> Lookup:
    """The :data:`Lookup` for a running server's index."""
    client = QueryClient(index_path)
    return lambda uids: stored(uids, client, storage_root)


__all__ = [
    "IndexQueries",
    "Locator",
    "finder",
    "lookup",
    "node_addresses",
    "selector",
    "QueryClient",
    "ServerUnavailable",
    "open_query_client",
    "server_running",
]
