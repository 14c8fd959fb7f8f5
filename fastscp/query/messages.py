"""The query sockets' messages: the request language, the answers, their framing, and reading an answer.

A query is a :class:`QueryRequest`: a level (PATIENT, STUDY, SERIES, IMAGE),
conditions (a DICOM keyword and a matching value, read with the rules of
PS3.4 C.2.2.2) and the keys to return. The indexer answers it over its query
socket (:func:`query_address`, :mod:`fastscp.query.server`), framed by
:func:`send_message` and :func:`recv_message`; :mod:`fastscp.query.engine`
turns it into SQL; :mod:`fastscp.query.client` asks. Whoever answers, the
rows come as a :class:`QueryResult`.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any, Literal, Protocol

import msgspec

from fastscp.process.ipc import local_address
from fastscp.status import IndexerState

Level = Literal["PATIENT", "STUDY", "SERIES", "IMAGE"]
LEVELS: tuple[str, ...] = ("PATIENT", "STUDY", "SERIES", "IMAGE")

# -- messages ------------------------------------------------------------------------


class Condition(msgspec.Struct, frozen=True, array_like=True):
    """Match ``keyword`` (a DICOM keyword of :data:`ATTRIBUTES`) against ``value``.

    The value follows PS3.4 C.2.2.2: ``*`` and ``?`` wildcards on text,
    ``A-B`` / ``A-`` / ``-B`` ranges on dates and times, backslash-separated
    lists of UIDs (and, leniently, of any value), ``""`` matches everything.
    """

    keyword: str
    value: str


class QueryRequest(msgspec.Struct, frozen=True, kw_only=True, tag="query"):
    """Find patients, studies, series or instances."""

    level: Level
    conditions: list[Condition] = msgspec.field(default_factory=list)
    #: Keywords of the columns to return; empty: :data:`DEFAULT_KEYS` of the level.
    keys: list[str] = msgspec.field(default_factory=list)
    #: At most this many rows; 0: no limit.
    limit: int = 0
    #: Sort for people (C-FIND leaves it off: DICOM responses have no order).
    ordered: bool = True


class SqlRequest(msgspec.Struct, frozen=True, kw_only=True, tag="sql"):
    """Run one SELECT statement on the index (``fastscp sql``); answered like a :class:`QueryRequest`."""

    sql: str


class StatsRequest(msgspec.Struct, frozen=True, kw_only=True, tag="stats_request"):
    """Ask for :class:`Stats`; days are counted in the asker's time zone (seconds east of UTC)."""

    utc_offset: int = 0


class StateRequest(msgspec.Struct, frozen=True, tag="state_request"):
    """Ask a running indexer for its :class:`IndexerState` (cheap: no query)."""


class LocateRequest(msgspec.Struct, frozen=True, tag="locate"):
    """Where is an instance stored? Asked by a worker before it answers a C-STORE (storage.duplicates)."""

    #: Its SOP Instance UIDs (the command's and the data set's).
    uids: list[str]


class Located(msgspec.Struct, frozen=True, tag="located"):
    """The paths (as the index records them) of instances with any of the asked UIDs, committed or not."""

    paths: list[str]


class Columns(msgspec.Struct, frozen=True, tag="columns"):
    names: list[str]


class Rows(msgspec.Struct, frozen=True, tag="rows"):
    rows: list[list[Any]]


class Done(msgspec.Struct, frozen=True, tag="done"):
    count: int


class Failed(msgspec.Struct, frozen=True, tag="failed"):
    message: str


class Count(msgspec.Struct, frozen=True, kw_only=True):
    """One line of a breakdown in :class:`Stats`."""

    name: str
    instances: int
    bytes: int
    studies: int


class Stats(msgspec.Struct, frozen=True, kw_only=True, tag="stats"):
    instances: int
    series: int
    studies: int
    patients: int
    bytes: int
    duplicate_conflicts: int
    by_modality: list[Count]
    by_calling_ae_title: list[Count]
    #: By the day the files were received, in the asker's time zone.
    by_day: list[Count]
    indexer: IndexerState | None = None


Message = (QueryRequest | SqlRequest | StatsRequest | StateRequest | LocateRequest | Columns | Rows | Done | Failed
           | Stats | IndexerState | Located)
# A value msgpack has no type for (a DECIMAL, a UUID from SQL) travels as its text.
_ENCODER = msgspec.msgpack.Encoder(enc_hook=str)
_DECODER = msgspec.msgpack.Decoder(Message)


def query_address(index_path: str) -> str:
    """The abstract socket name on which the indexer of an index file answers queries."""
    return local_address("query", index_path)


def locate_address(index_path: str) -> str:
    """The abstract socket name on which the indexer of an index file answers LocateRequest."""
    return local_address("locate", index_path)


class ServerUnavailable(ConnectionError):
    """No running server answers queries for this index."""


class QueryError(ValueError):
    """A request that can't be answered; the message says why."""


# -- framing on a stream socket ----------------------------------------------------------

_LENGTH = struct.Struct(">I")
#: A frame longer than this is a protocol error, not a big answer (answers come in chunks).
MAX_FRAME = 64 * 1024 * 1024
#: Rows per :class:`Rows` message.
CHUNK_ROWS = 1000


def send_message(sock: socket.socket, message: Message) -> None:
    """Send one length-prefixed msgpack message."""
    data = _ENCODER.encode(message)
    sock.sendall(_LENGTH.pack(len(data)) + data)


def _frame_size(data: bytes, max_size: int) -> int:
    """The length a frame's header (the first bytes of ``data``) announces; ConnectionError past ``max_size``."""
    (size,) = _LENGTH.unpack_from(data)
    if size > max_size:
        raise ConnectionError(f"message of {size} bytes is longer than {max_size}")
    return int(size)


def split_frame(data: bytes, max_size: int = MAX_FRAME) -> tuple[Message, bytes] | None:
    """The first message in ``data`` (frames of :func:`send_message`) and the bytes after it; None while
    it is incomplete.

    Raises
    ------
    ConnectionError
        The frame is longer than ``max_size``.
    msgspec.DecodeError
        Not a message of this protocol.
    """
    if len(data) < _LENGTH.size:
        return None
    end = _LENGTH.size + _frame_size(data, max_size)
    if len(data) < end:
        return None
    return _DECODER.decode(memoryview(data)[_LENGTH.size:end]), data[end:]


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(min(size - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("connection closed in the middle of a message" if buf else "connection closed")
        buf += chunk
    return bytes(buf)


def recv_message(sock: socket.socket, max_size: int = MAX_FRAME) -> Message:
    """Receive one message sent by :func:`send_message`, at most ``max_size`` bytes.

    Raises
    ------
    ConnectionError
        The peer closed the connection.
    msgspec.DecodeError
        Not a message of this protocol.
    """
    return _DECODER.decode(_recv_exact(sock, _frame_size(_recv_exact(sock, _LENGTH.size), max_size)))


class QueryResult:
    """The rows of a query, read as they come: ``columns``, then iterate."""

    def __init__(self, columns: list[str], rows: Iterator[list[Any]],
                 on_close: Callable[[], None] | None = None) -> None:
        self.columns = columns
        self._rows = rows
        self._on_close = on_close

    def __iter__(self) -> Iterator[list[Any]]:
        return self._rows

    def close(self) -> None:
        """Stop reading (a half-read answer is dropped)."""
        close = getattr(self._rows, "close", None)
        if close is not None:
            close()
        if self._on_close is not None:
            self._on_close()

    def __enter__(self) -> QueryResult:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class IndexQueries(Protocol):
    """What :func:`fastscp.query.cfind.find` and the CLI need: QueryClient or LocalQueryClient."""

    def query(self, request: QueryRequest | SqlRequest) -> QueryResult: ...

    def stats(self, request: StatsRequest | None = None) -> Stats: ...

    def close(self) -> None: ...
