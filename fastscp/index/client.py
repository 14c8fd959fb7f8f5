"""Talking to the indexer from other processes: records from workers, queries from anyone.

* :class:`IndexerClient` (a worker) delivers records in batches and keeps
  them while the indexer is down (a restart after a crash), retrying in the
  background.
* :class:`QueryClient` asks a running server's indexer (C-FIND, the CLI).
* :func:`open_query_client` picks the running server, or the index file
  read-only when no server has it open.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import msgspec

from fastscp.index.indexer import indexer_address, locate_address, query_address, query_address_of
from fastscp.index.records import ENCODER, IndexRecord, InstanceRecord, RecordBatch
from fastscp.process.batcher import Batcher
from fastscp.query.engine import (
    Columns,
    Done,
    Failed,
    IndexerState,
    LocalQueryClient,
    Located,
    LocateRequest,
    QueryError,
    QueryRequest,
    QueryResult,
    Rows,
    SqlRequest,
    StateRequest,
    Stats,
    StatsRequest,
    recv_message,
    send_message,
)

log = logging.getLogger("fastscp.indexclient")

#: Seconds a record may wait in a worker to travel with others.
SEND_INTERVAL = 0.02
#: Records per message at most (a datagram must fit the socket's buffer).
BATCH_RECORDS = 32
#: Seconds between retries while records wait for the indexer.
RETRY_INTERVAL = 0.5
#: Seconds a C-STORE waits for the indexer to say where its instance is stored.
LOCATE_TIMEOUT = 2.0
#: Bytes per message at most: a Unix datagram longer than the socket's send
#: buffer (net.core.wmem_default, 208 KiB on Linux) is refused (EMSGSIZE),
#: and the attribute maps of 32 instances of 32 series can be longer.
MAX_MESSAGE_BYTES = 128 * 1024


def batch_messages(records: list[IndexRecord]) -> list[tuple[bytes, int]]:
    """The records as messages of :data:`MAX_MESSAGE_BYTES` at most: (message, records in it).

    A batch too long is halved until each part fits. A single instance
    record that is still too long (a hostile header: its attribute map is
    bounded by characters, not bytes) travels without its attribute map;
    the file keeps every attribute.
    """
    data = ENCODER.encode(RecordBatch.of(records))
    if len(data) <= MAX_MESSAGE_BYTES:
        return [(data, len(records))]
    if len(records) > 1:
        half = len(records) // 2
        return batch_messages(records[:half]) + batch_messages(records[half:])
    (record,) = records
    if isinstance(record, InstanceRecord):
        # The path comes from header values: the log formatters escape it (fastscp.process.logs.escape).
        log.warning("the attribute map of %s is too long for a message (%d bytes): indexed without it",
                    record.path, len(data))
        record = msgspec.structs.replace(record, header=msgspec.structs.replace(record.header, attributes="{}"))
        data = ENCODER.encode(RecordBatch.of([record]))
    return [(data, 1)]


class IndexerClient:
    """Sends records to the indexer in batches; keeps them while it is unreachable.

    Thread-safe (one lock): the associations of a worker share one client.
    A record waits at most :data:`SEND_INTERVAL` for others to travel with
    (:data:`BATCH_RECORDS` at most): one message per record made the
    indexer's receive loop its bottleneck (bench/test_bench_index.py). A
    background thread sends what waits, and while the indexer is down
    retries every :data:`RETRY_INTERVAL`, so kept records reach a restarted
    indexer even if no other image arrives. Nothing waiting here is lost for
    good if the process dies: the indexer's reconcile on start indexes the
    files whose records never arrived.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        #: Sealed messages not yet delivered, with their record counts.
        self._pending: list[tuple[bytes, int]] = []
        #: The indexer could not be reached at the last try.
        self._down = False
        #: Records not yet sealed into a message; its lock guards all of the above.
        self._batcher: Batcher[IndexRecord] = Batcher(
            self._deliver_locked, interval=SEND_INTERVAL, max_items=BATCH_RECORDS, retry_interval=RETRY_INTERVAL,
            name="fastscp-indexer-send")
        #: Hand a record to the indexer (soon; or keep it until the indexer is back).
        self.send: Callable[[IndexRecord], None] = self._batcher.add

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(self.address)
        except OSError:
            sock.close()
            raise
        return sock

    def flush(self) -> int:
        """Try to deliver everything now; returns how many records remain."""
        with self._batcher.lock:
            self._batcher.flush_locked()
            return self._waiting_locked()

    @property
    def pending(self) -> int:
        """Records not yet delivered to the indexer."""
        with self._batcher.lock:
            return self._waiting_locked()

    def _waiting_locked(self) -> int:
        return self._batcher.waiting + sum(count for _, count in self._pending)

    def _deliver_locked(self, records: list[IndexRecord]) -> bool:
        """Seal ``records`` into messages and send every message kept; False if some remain (the indexer is down)."""
        if records:
            self._pending += batch_messages(records)
        if not self._pending:
            return True
        try:
            if self._sock is None:
                self._sock = self._connect()
            while self._pending:
                self._sock.send(self._pending[0][0])
                self._pending.pop(0)
        except OSError as exc:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            if not self._down:
                self._down = True
                log.warning("indexer unreachable (%s); %d records kept for retry", exc, self._waiting_locked())
            return False
        if self._down:
            self._down = False
            log.info("indexer reachable again; kept records delivered")
        return True

    def close(self) -> None:
        self._batcher.close()
        with self._batcher.lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class ServerUnavailable(ConnectionError):
    """No running server answers queries for this index."""


class QueryClient:
    """Runs queries through a running server's indexer.

    Thread-safe and stateless between calls: each query opens its own
    connection to the indexer's query socket (a local Unix socket, tens of
    microseconds), so the association threads of a worker can share one
    client. A worker makes it with ``QueryClient.from_indexer_address(address)``
    from the indexer address it already has.

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

    @classmethod
    def from_indexer_address(cls, address: str, *, timeout: float = 60.0) -> QueryClient:
        """The client of the indexer whose record socket is ``address``."""
        return cls(address=query_address_of(address), timeout=timeout)

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

    def locate(self, uids: list[str]) -> list[str]:
        """Where the running server's index has instances with any of these SOP Instance UIDs
        (paths as the index records them; records not yet committed included)."""
        with self._open() as sock:
            send_message(sock, LocateRequest(uids))
            answer = recv_message(sock)
        if not isinstance(answer, Located):
            raise ConnectionError(f"unexpected answer {type(answer).__name__}")
        return answer.paths

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
    """A worker's "where is this instance stored?" (:meth:`QueryClient.locate`), for the duplicate check.

    Never raises: while the indexer can't answer (restarting, overloaded
    past ``timeout``) the store goes on with what the file at its own path
    tells, and a warning says so once per outage.
    """

    def __init__(self, index_path: str, timeout: float = LOCATE_TIMEOUT) -> None:
        self.client = QueryClient(address=locate_address(index_path), timeout=timeout)
        self._failing = False

    def __call__(self, uids: tuple[str, ...]) -> tuple[str, ...]:
        try:
            paths = tuple(self.client.locate(list(uids)))
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


class IndexQueries(Protocol):
    """What :func:`fastscp.query.cfind.find` and the CLI need: QueryClient or LocalQueryClient."""

    def query(self, request: QueryRequest | SqlRequest) -> QueryResult: ...

    def stats(self, request: StatsRequest | None = None) -> Stats: ...

    def close(self) -> None: ...


def open_query_client(index_path: str) -> IndexQueries:
    """Queries on ``index_path``: through its running server, else on the file read-only.

    Raises
    ------
    fastscp.index.database.IndexUnavailable
        No server answers and the file can't be opened (missing, locked by
        a server that is starting or stopping, another schema version).
    """
    client = QueryClient(index_path)
    if client.available():
        return client
    return LocalQueryClient(index_path)


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


__all__ = [
    "IndexQueries",
    "IndexerClient",
    "Locator",
    "QueryClient",
    "ServerUnavailable",
    "open_query_client",
    "server_running",
]
