"""The locate socket of the indexer process (query.server, LocateRequest): framing on a kept connection."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from fastscp.index.database import Index
from fastscp.index.indexer import UidIndex
from fastscp.index.records import InstanceColumns
from fastscp.query.messages import (
    Located,
    LocateRequest,
    Message,
    locate_address,
    recv_message,
    send_message,
    split_frame,
)
from fastscp.query.server import LOCATE_MAX_MESSAGE, QueryServer
from fastscp.status import IndexerState
from tests.unit.index.test_batchtable import instance


def frame(message: Message) -> bytes:
    """The bytes send_message puts on the wire."""
    a, b = socket.socketpair()
    with a, b:
        send_message(a, message)
        return b.recv(1 << 16)


@pytest.fixture
def locate(tmp_path: Path) -> Iterator[str]:
    """A locate server over an empty index whose loop has received one instance; its address."""
    path = str(tmp_path / "index.duckdb")
    index = Index(path)
    uids = UidIndex()
    uids.load(index.con)
    uids.received(InstanceColumns.of([instance(1)]))
    server = QueryServer(index, locate_address(path), lambda: IndexerState(pid=0, pending=0, committed=0,
                                                                           reconcile="off"), uids)
    server.start()
    try:
        yield locate_address(path)
    finally:
        server.close()
        index.close()


def test_split_frame_waits_for_a_whole_message_and_keeps_what_follows() -> None:
    data = frame(LocateRequest(["1.2"])) + frame(LocateRequest(["3.4"]))
    first = len(frame(LocateRequest(["1.2"])))
    assert split_frame(data[:3]) is None and split_frame(data[:first - 1]) is None
    message, rest = split_frame(data)  # type: ignore[misc]
    assert message == LocateRequest(["1.2"]) and rest == data[first:]
    with pytest.raises(ConnectionError):
        split_frame(b"\x00\x01\x00\x00", max_size=100)
    with pytest.raises(msgspec.DecodeError):
        split_frame(b"\x00\x00\x00\x02\xc1\xc1")


def test_requests_in_pieces_or_together_are_each_answered_in_order(locate: str) -> None:
    known = instance(1)
    ask, other = frame(LocateRequest([known.header.sop_instance_uid])), frame(LocateRequest(["1.2.9"]))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(locate)
        sock.sendall(ask + other + ask[:5])  # two whole requests and the start of a third
        assert recv_message(sock) == Located([known.path])
        assert recv_message(sock) == Located([])
        sock.sendall(ask[5:])
        assert recv_message(sock) == Located([known.path])
        for byte in other:  # one byte at a time
            sock.send(bytes([byte]))
        assert recv_message(sock) == Located([])


def test_a_too_long_request_closes_the_connection(locate: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(locate)
        sock.sendall((LOCATE_MAX_MESSAGE + 1).to_bytes(4, "big"))
        assert sock.recv(100) == b""
