"""The data path's receive loop (fastscp.net.datapath): both twins, the same byte streams, the same results.

Each case writes a P-DATA-TF byte stream into one end of a socket pair and
pumps the other end through a :class:`~fastscp.net.pdu.PDUStream` whose buffer
is made small, so that over the range of buffer sizes every header and every
fragment is cut at every offset. The trace (command sets, data sets as
stored in a real file with their hash and prefix, Python fragments, other
PDUs, the error that ended it) must be the same for both twins, and equal to
what the stream was made from.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastscp.dicom.backend import NO_EXTENSIONS
from fastscp.dicom.part10 import content_hash, dataset_content_hash
from fastscp.net import datapath
from fastscp.net.datapath import COMMAND, DATA_SET, FRAGMENT, OTHER_PDU, PROGRESS, WRITE_FAILED, DataPathPy
from fastscp.net.pdu import DeadlineExceeded, PDUStream
from fastscp.storage.area import HEADER_PREFIX_BYTES
from tests.twins import compiled_twin

TWINS = ["cext", "py"]
PDU = struct.Struct(">BxI")
PDV = struct.Struct(">IBB")
MAX_PDU = 16384
RELEASE_RQ = PDU.pack(0x05, 4) + bytes(4)


def _compiled() -> Any:
    return compiled_twin(datapath.DataPathCext, "fastscp.net._datapath_cext")


@pytest.fixture(params=TWINS)
def twin(request: pytest.FixtureRequest) -> Any:
    return _compiled() if request.param == "cext" else DataPathPy


def test_backend_switch() -> None:
    assert datapath.BACKEND == ("py" if NO_EXTENSIONS else "cext")


# -- streams ----------------------------------------------------------------------------------

Message = tuple[int, bytes, bytes | None]  # (context ID, command set, data set or None)


def pdvs(message: Message, size: int) -> list[bytes]:
    """A message as PDV items of at most ``size`` value bytes, flags set (PS3.8 E.2)."""
    context_id, command, data = message
    out = []
    for payload, is_command in ((command, True), (data, False)):
        if payload is None:
            continue
        starts = range(0, max(len(payload), 1), size)
        for start in starts:
            chunk = payload[start : start + size]
            control = (1 if is_command else 0) | (2 if start == starts[-1] else 0)
            out.append(PDV.pack(len(chunk) + 2, context_id, control) + chunk)
    return out


def stream_of(messages: list[Message], pdv_size: int, per_pdu: int) -> bytes:
    """The messages' PDVs, ``per_pdu`` to a P-DATA-TF PDU (a PDU may end one message and start the next)."""
    items = [item for message in messages for item in pdvs(message, pdv_size)]
    out = bytearray()
    for start in range(0, len(items), per_pdu):
        body = b"".join(items[start : start + per_pdu])
        out += PDU.pack(0x04, len(body)) + body
    return bytes(out)


def expected(messages: list[Message], *, to_file: bool = True) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for context_id, command, data in messages:
        out.append(("command", context_id, command))
        if data is not None:
            if to_file:
                out.append(("file", len(data), content_hash(data), data, data[:HEADER_PREFIX_BYTES]))
            else:
                out.append(("data", data))
    return out


def pump_all(twin: Any, data: bytes, tmp: Path, *, buffer_size: int = 0, to_file: bool = True,
             max_command_set: int = 4096, limit: int = 1 << 30, read_only: bool = False,
             read_rest: bool = False, head: bytes = b"") -> list[tuple[Any, ...]]:
    """Pump ``data`` (then the peer's close) through ``twin``; the trace, ending in the error that stopped it.
    ``head``: written before each data set (to_file's File Meta); the trace's files leave it out."""
    ours, theirs = socket.socketpair()
    sender = threading.Thread(target=lambda: (theirs.sendall(data), theirs.shutdown(socket.SHUT_WR)), daemon=True)
    sender.start()
    ours.settimeout(10)
    stream = PDUStream(ours, MAX_PDU, buffer_size=buffer_size)
    path = twin(stream, max_command_set)
    trace: list[tuple[Any, ...]] = []
    fragments = bytearray()
    fd, prefix, target = -1, bytearray(), tmp / "data-set"
    try:
        while True:
            try:
                event = path.pump()
            except Exception as exc:  # the end of every stream: PeerClosed, or the case's error
                trace.append(("error", type(exc).__name__, str(exc)))
                break
            if event == COMMAND:
                trace.append(("command", path.context_id, path.command))
                if to_file:
                    if fd >= 0:  # the last command had no data set
                        os.close(fd)
                    fd = os.open(target, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CREAT | os.O_TRUNC, 0o600)
                    prefix = bytearray()
                    path.to_file(fd, limit, prefix, HEADER_PREFIX_BYTES, True, head)
            elif event == FRAGMENT:
                fragments += path.fragment
                if path.last:
                    trace.append(("data", bytes(fragments)))
                    fragments.clear()
            elif event == PROGRESS:
                assert 0 < path.length
            elif event == WRITE_FAILED:
                trace.append(("write failed", errno.errorcode[path.errno]))
            elif event == DATA_SET:
                stored = target.read_bytes()
                if not read_only:
                    assert stored[: len(head)] == head
                    stored = stored[len(head) :]
                    assert path.content_hash == dataset_content_hash(fd, len(head))  # the one hash of fastscp
                trace.append(("file", path.length, path.content_hash, stored, bytes(prefix)))
                os.close(fd)
                fd = -1
                if read_rest and stream.rest:
                    pdu_type, body = stream.read()
                    trace.append(("rest", pdu_type, bytes(body)))
            else:
                assert event == OTHER_PDU
                pdu_type, body = stream.read()
                trace.append(("pdu", pdu_type, bytes(body)))
    finally:
        if fd >= 0:
            os.close(fd)
        ours.close()
        sender.join(10)
        theirs.close()
    return trace


CLOSED = ("error", "PeerClosed", "connection closed by peer")


def ct_like(size: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(size))


MESSAGES: list[Message] = [
    (1, b"C" * 90, ct_like(3000)),
    (3, b"D" * 17, None),  # a command without a data set (C-ECHO-RQ)
    (1, b"E" * 40, b""),  # an empty data set
    (5, b"F" * 33, ct_like(1001, 3)),
]


@pytest.mark.parametrize(("pdv_size", "per_pdu"), [(1 << 20, 1), (64, 1), (64, 5), (7, 50), (500, 3)])
def test_every_split_gives_the_messages(twin: Any, tmp_path: Path, pdv_size: int, per_pdu: int) -> None:
    data = stream_of(MESSAGES, pdv_size, per_pdu)
    want = expected(MESSAGES) + [CLOSED]
    for buffer_size in [*range(7, 80), 1000, 0]:
        assert pump_all(twin, data, tmp_path, buffer_size=buffer_size) == want, buffer_size


def test_the_file_meta_goes_before_each_data_set(twin: Any, tmp_path: Path) -> None:
    """to_file's head (the File Meta), written with the data set's first piece, an empty one's too;
    neither hashed nor in the prefix."""
    meta = b"M" * 128 + b"DICM" + ct_like(248, 9)
    for pdv_size, per_pdu in ((1 << 20, 1), (64, 5), (7, 50)):
        data = stream_of(MESSAGES, pdv_size, per_pdu)
        for buffer_size in (7, 13, 100, 0):
            trace = pump_all(twin, data, tmp_path, buffer_size=buffer_size, head=meta)
            assert trace == expected(MESSAGES) + [CLOSED], (pdv_size, per_pdu, buffer_size)


def test_fragments_for_python_messages(twin: Any, tmp_path: Path) -> None:
    """Without a file, data sets come back as fragments (cut where the buffer was), marked last at the end."""
    data = stream_of(MESSAGES, 100, 4)
    for buffer_size in (7, 13, 64, 0):
        assert pump_all(twin, data, tmp_path, buffer_size=buffer_size, to_file=False) == (
            expected(MESSAGES, to_file=False) + [CLOSED])


def test_a_large_data_set_streams_through_a_small_buffer(twin: Any, tmp_path: Path) -> None:
    """A PDV value far larger than the buffer, and than the prefix kept for the header scan."""
    messages: list[Message] = [(1, b"C" * 50, ct_like(300_000, 5))]
    data = stream_of(messages, MAX_PDU - 6, 1)
    for buffer_size in (4096, 65536, 0):
        assert pump_all(twin, data, tmp_path, buffer_size=buffer_size) == expected(messages) + [CLOSED]


def test_the_prefix_is_filled_to_its_last_byte(twin: Any, tmp_path: Path) -> None:
    """PDV values that leave exactly one byte of the prefix's room (5 x 13107 = 65535 bytes): the next
    piece gives it that byte (a piece never spans two PDVs, whatever the buffer)."""
    assert (HEADER_PREFIX_BYTES - 1) % 5 == 0
    messages: list[Message] = [(1, b"C" * 50, ct_like(100_000, 7))]
    data = stream_of(messages, (HEADER_PREFIX_BYTES - 1) // 5, 1)
    for buffer_size in (4096, 0):
        assert pump_all(twin, data, tmp_path, buffer_size=buffer_size) == expected(messages) + [CLOSED]


def test_other_pdus_are_left_to_the_stream(twin: Any, tmp_path: Path) -> None:
    data = stream_of(MESSAGES[:1], 100, 3) + RELEASE_RQ + stream_of(MESSAGES[1:2], 100, 3)
    want = [*expected(MESSAGES[:1]), ("pdu", 0x05, bytes(4)), *expected(MESSAGES[1:2]), CLOSED]
    for buffer_size in (7, 11, 0):
        assert pump_all(twin, data, tmp_path, buffer_size=buffer_size) == want


def test_the_rest_of_a_pdu_reads_as_a_pdu_of_its_own(twin: Any, tmp_path: Path) -> None:
    """A data set's last PDV and the next command share a PDU: after the data set, the stream
    returns the PDU's remaining PDVs (what a C-CANCEL check or a C-GET's wait reads)."""
    first, second = MESSAGES[0], MESSAGES[1]
    items = pdvs(first, 1000) + pdvs(second, 1000)
    last_pdu = b"".join(items[-2:])
    data = stream_of([first], 1000, 1)[: -len(items[-2]) - 6] + PDU.pack(0x04, len(last_pdu)) + last_pdu
    want = [*expected([first]), ("rest", 0x04, items[-1]), CLOSED]
    for buffer_size in (7, 9, 31, 0):
        assert pump_all(twin, data, tmp_path, buffer_size=buffer_size, read_rest=True) == want


def _malformed() -> Iterator[tuple[str, bytes, tuple[str, str]]]:
    good = stream_of(MESSAGES[:1], 1000, 2)
    yield ("pdu-too-long", good + PDU.pack(0x04, MAX_PDU + 1),
           ("ProtocolError", f"PDU of {MAX_PDU + 1} bytes exceeds the maximum {MAX_PDU}"))
    yield ("truncated-pdv", good + PDU.pack(0x04, 3) + b"abc", ("ProtocolError", "truncated PDV item"))
    yield ("pdv-length-1", good + PDU.pack(0x04, 7) + PDV.pack(1, 1, 3) + b"x",
           ("ProtocolError", "PDV item length 1 does not fit its PDU"))
    yield ("pdv-past-its-pdu", good + PDU.pack(0x04, 10) + PDV.pack(9, 1, 3) + b"abcd",
           ("ProtocolError", "PDV item length 9 does not fit its PDU"))
    # A PDV that fits its PDU, but the next one does not (after a message ended inside that PDU).
    body = pdvs((1, b"G" * 8, None), 100)[0] + PDV.pack(50, 1, 3)
    yield ("second-pdv-past-its-pdu", good + PDU.pack(0x04, len(body)) + body,
           ("ProtocolError", "PDV item length 50 does not fit its PDU"))


@pytest.mark.parametrize(("name", "data", "error"), list(_malformed()), ids=[c[0] for c in _malformed()])
def test_malformed_lengths(twin: Any, tmp_path: Path, name: str, data: bytes, error: tuple[str, str]) -> None:
    for buffer_size in (7, 8, 12, 17, 0):
        trace = pump_all(twin, data, tmp_path, buffer_size=buffer_size)
        want = expected(MESSAGES[:1]) + ([("command", 1, b"G" * 8)] if name.startswith("second") else [])
        assert trace == [*want, ("error", *error)], buffer_size


def test_limits(twin: Any, tmp_path: Path) -> None:
    data = stream_of(MESSAGES[:1], 64, 3)
    assert pump_all(twin, data, tmp_path, max_command_set=89)[-1] == (
        "error", "LimitExceeded", "command set longer than limits.max_command_set (89)")
    assert pump_all(twin, data, tmp_path, limit=2999) == [
        expected(MESSAGES[:1])[0], ("error", "LimitExceeded", "data set larger than limits.max_object_size (2999)")]
    assert pump_all(twin, data, tmp_path, max_command_set=90, limit=3000) == expected(MESSAGES[:1]) + [CLOSED]


def test_a_failed_write_is_told_once_and_the_rest_drained(twin: Any, tmp_path: Path) -> None:
    """A descriptor that cannot be written (EBADF here; ENOSPC in tests/unit/net): WRITE_FAILED at the
    first piece, then the data set is read to its end and the next message comes through."""
    data = stream_of(MESSAGES, 500, 2)
    for buffer_size in (7, 100, 0):
        trace = pump_all(twin, data, tmp_path, buffer_size=buffer_size, read_only=True)
        commands = [t for t in trace if t[0] == "command"]
        assert commands == [t for t in expected(MESSAGES) if t[0] == "command"]
        assert [t[0] for t in trace].count("write failed") == 2  # the empty data set writes nothing
        assert ("write failed", "EBADF") in trace and trace[-1] == CLOSED
        assert [t[1] for t in trace if t[0] == "file"] == [3000, 0, 1001]
        # With a head to write, the empty data set fails too.
        trace = pump_all(twin, data, tmp_path, buffer_size=buffer_size, read_only=True, head=b"META")
        assert [t[0] for t in trace].count("write failed") == 3 and trace[-1] == CLOSED
        assert [t[1] for t in trace if t[0] == "file"] == [3000, 0, 1001]


def test_a_failed_write_of_a_data_sets_last_piece_is_told_then_its_end(twin: Any, tmp_path: Path) -> None:
    """The write that fails is the data set's last piece (a one-byte data set: its only one):
    WRITE_FAILED first, the DATA_SET it owes at the next pump, then the next message."""
    messages: list[Message] = [(1, b"C" * 90, b"x"), MESSAGES[1]]
    data = stream_of(messages, 500, 1)
    for buffer_size in (7, 0):
        trace = pump_all(twin, data, tmp_path, buffer_size=buffer_size, read_only=True)
        assert [t[0] for t in trace] == ["command", "write failed", "file", "command", "error"], trace
        assert trace[1] == ("write failed", "EBADF") and trace[2][1] == 1
        assert trace[3] == ("command", 3, b"D" * 17) and trace[-1] == CLOSED


def test_the_twins_agree_with_a_stream_cut_by_tcp(tmp_path: Path) -> None:
    """The same long stream, with every kind of message, through both twins: the same trace."""
    messages: list[Message] = [(1 + 2 * (i % 3), bytes([65 + i]) * (10 + i), ct_like(i * 997, i) if i % 4 else None)
                               for i in range(24)]
    data = stream_of(messages, 333, 4)
    traces = [pump_all(t, data, tmp_path, buffer_size=size) for t in (_compiled(), DataPathPy) for size in (50, 0)]
    assert traces[0] == expected(messages) + [CLOSED]
    assert all(trace == traces[0] for trace in traces)


@pytest.mark.parametrize("kind", ["deadline", "idle"])
def test_a_silent_peer_runs_into_the_timeouts(twin: Any, kind: str) -> None:
    ours, theirs = socket.socketpair()
    try:
        ours.settimeout(0.3 if kind == "idle" else 30)
        stream = PDUStream(ours, MAX_PDU)
        if kind == "deadline":
            stream.deadline(0.3, 1_000_000, why="too slow")  # ~3 KB sent: 3 ms more
        path = twin(stream, 4096)
        theirs.sendall(stream_of(MESSAGES[:1], 100, 1)[:-10])
        with pytest.raises(DeadlineExceeded if kind == "deadline" else TimeoutError) as raised:
            while path.pump() != DATA_SET:
                pass
        if kind == "deadline":
            assert str(raised.value) == "too slow"
        else:
            assert not isinstance(raised.value, DeadlineExceeded)
    finally:
        ours.close()
        theirs.close()
