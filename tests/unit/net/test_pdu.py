"""fastscp.net.pdu on a real socket pair: the deadlines that bound a slow peer, the receive buffer
over a long stream, and the PDUs we write (checked against pynetdicom's encoding)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from pynetdicom.pdu import A_ABORT_RQ, A_RELEASE_RP

from fastscp.net.pdu import RELEASE_RP, DeadlineExceeded, PDUStream, ProtocolError, abort_pdu, p_data_tf


def pdu(body: bytes, pdu_type: int = 0x04) -> bytes:
    return struct.pack(">BxI", pdu_type, len(body)) + body


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(ours, the peer's): ours is read through a PDUStream."""
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def send_later(sock: socket.socket, parts: list[tuple[float, bytes]]) -> threading.Thread:
    """Send each (delay, bytes) in turn from a thread; stops when the other end is gone."""

    def run() -> None:
        for delay, data in parts:
            time.sleep(delay)
            try:
                sock.sendall(data)
            except OSError:
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_pdu_arriving_in_parts_within_the_deadline_is_read(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    ours.settimeout(None)  # no per-read timeout: the deadline alone bounds the read
    stream = PDUStream(ours, 16384)
    stream.deadline(1.5)
    message = pdu(b"\x01" * 500)
    sender = send_later(theirs, [(0, message[:3]), (0.3, message[3:200]), (0.3, message[200:])])
    assert stream.read() == (0x04, memoryview(message[6:]))
    sender.join(5)


@pytest.mark.parametrize("idle", [None, 10.0])
def test_a_silent_peer_is_cut_at_the_deadline_not_the_idle_timeout(pair: tuple[socket.socket, socket.socket],
                                                                   idle: float | None) -> None:
    ours, _theirs = pair
    ours.settimeout(idle)
    stream = PDUStream(ours, 16384)
    stream.deadline(0.3, why="too slow")
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="^too slow$"):
        stream.read()
    assert 0.25 <= time.monotonic() - started < 3


def test_a_deadline_already_past_when_the_read_starts(pair: tuple[socket.socket, socket.socket]) -> None:
    """The time was spent before the read (a slow TLS handshake against acse_timeout): the read fails
    at once, with the deadline's reason, though the bytes are there."""
    ours, theirs = pair
    ours.settimeout(5)
    stream = PDUStream(ours, 16384)
    stream.deadline(0.1, why="A-ASSOCIATE-RQ not complete within server.acse_timeout")
    theirs.sendall(pdu(b"too late"))
    time.sleep(0.2)
    with pytest.raises(DeadlineExceeded, match="^A-ASSOCIATE-RQ not complete within server.acse_timeout$"):
        stream.read()


def test_a_dripping_peer_is_cut_at_the_deadline(pair: tuple[socket.socket, socket.socket]) -> None:
    """One byte every 50 ms keeps each read alive (idle timeout 5 s), not the whole PDU."""
    ours, theirs = pair
    ours.settimeout(5)
    stream = PDUStream(ours, 16384)
    stream.deadline(0.5, why="A-ASSOCIATE-RQ not complete")
    message = pdu(bytes(100))
    send_later(theirs, [(0.05, message[i : i + 1]) for i in range(len(message))])
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="^A-ASSOCIATE-RQ not complete$"):
        stream.read()
    assert 0.45 <= time.monotonic() - started < 3


def test_a_peer_keeping_up_the_minimum_rate_gets_more_time(pair: tuple[socket.socket, socket.socket]) -> None:
    """1.5 KB/s against a minimum of 500 B/s: the 2 s message outlives the 1 s of grace."""
    ours, theirs = pair
    ours.settimeout(5)
    stream = PDUStream(ours, 16384)
    stream.deadline(1.0, min_rate=500)
    message = pdu(bytes(3000))
    sender = send_later(theirs, [(0 if i == 0 else 0.1, message[i : i + 150]) for i in range(0, len(message), 150)])
    started = time.monotonic()
    assert stream.read() == (0x04, memoryview(message[6:]))
    assert time.monotonic() - started > 1.5
    sender.join(5)


def test_the_rate_counts_only_the_bytes_received_after_the_deadline_was_set(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """100 KB read before the deadline buy no time: a silent peer is cut after the grace alone."""
    ours, theirs = pair
    ours.settimeout(5)
    stream = PDUStream(ours, 1 << 20)
    earlier = pdu(bytes(100_000))
    send_later(theirs, [(0, earlier)])
    assert len(stream.read()[1]) == 100_000
    stream.deadline(0.3, min_rate=1000, why="below limits.min_data_rate")
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="min_data_rate"):
        stream.read()
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("how", ["socket timeout", "set_timeout"])
def test_an_idle_peer_is_reported_idle_not_slow(pair: tuple[socket.socket, socket.socket], how: str) -> None:
    """Without a deadline a read times out after the idle timeout, as a plain TimeoutError."""
    ours, _theirs = pair
    ours.settimeout(0.3 if how == "socket timeout" else 10)
    stream = PDUStream(ours, 16384)
    if how == "set_timeout":
        stream.set_timeout(0.3)
    started = time.monotonic()
    with pytest.raises(TimeoutError) as raised:
        stream.read()
    assert not isinstance(raised.value, DeadlineExceeded)
    assert time.monotonic() - started < 3


def test_without_a_deadline_the_idle_timeout_applies_again(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    ours.settimeout(1.0)
    stream = PDUStream(ours, 16384)
    stream.deadline(0.2)
    theirs.sendall(pdu(b"first"))
    assert bytes(stream.read()[1]) == b"first"
    stream.no_deadline()
    # 0.5 s of silence: past the old deadline, within the idle timeout.
    sender = send_later(theirs, [(0.5, pdu(b"second"))])
    assert bytes(stream.read()[1]) == b"second"
    sender.join(5)
    with pytest.raises(TimeoutError) as raised:
        stream.read()
    assert not isinstance(raised.value, DeadlineExceeded)


def test_a_rate_kept_up_gives_the_idle_timeout_back(pair: tuple[socket.socket, socket.socket]) -> None:
    """The deadline narrows the socket's timeout while it is the nearer bound; once the bytes received
    push it past the idle timeout, a pause up to the idle timeout is fine and a longer one is idleness."""
    ours, theirs = pair
    ours.settimeout(2.0)
    stream = PDUStream(ours, 16384)
    stream.deadline(0.3, min_rate=100)  # 2 KB received: 20 s more
    theirs.sendall(pdu(bytes(2000)))
    assert len(stream.read()[1]) == 2000
    sender = send_later(theirs, [(1.0, pdu(b"after a pause"))])
    assert bytes(stream.read()[1]) == b"after a pause"
    sender.join(5)
    started = time.monotonic()
    with pytest.raises(TimeoutError) as raised:
        stream.read()
    assert not isinstance(raised.value, DeadlineExceeded)
    assert 1.9 <= time.monotonic() - started < 5


def test_a_long_stream_goes_through_one_buffer(pair: tuple[socket.socket, socket.socket]) -> None:
    """300 KB of PDUs, cut anywhere, through a 64 KiB receive buffer: every PDU whole, in order, and
    what is left over after each read is what arrived beyond it."""
    ours, theirs = pair
    ours.settimeout(5)
    stream = PDUStream(ours, 16384)
    pdus = [pdu(bytes([n % 251]) * (1000 + n)) for n in range(300)]
    stream_bytes = b"".join(pdus)
    sender = send_later(theirs, [(0, stream_bytes[i : i + 4093]) for i in range(0, len(stream_bytes), 4093)])
    for expected in pdus:
        assert stream.read() == (0x04, memoryview(expected[6:]))
    sender.join(5)
    assert stream.buffered == 0
    two = pdu(b"one") + pdu(b"two")
    theirs.sendall(two)
    stream.read()
    # The second PDU came with the first: it waits in the buffer (C-CANCEL-RQ is looked for there).
    assert stream.buffered == len(pdu(b"two"))
    assert bytes(stream.read()[1]) == b"two" and stream.buffered == 0


def test_no_maximum_length_still_caps_a_pdu_at_64_mib(pair: tuple[socket.socket, socket.socket]) -> None:
    """Maximum Length Received 0 means "no limit" to the peer (PS3.8 D.1), but memory is bounded: a PDU
    over 64 MiB is refused from its header, before any byte of its body."""
    ours, theirs = pair
    ours.settimeout(5)
    stream = PDUStream(ours, 0)
    theirs.sendall(struct.pack(">BxI", 0x04, 64 * 1024 * 1024 + 1))
    with pytest.raises(ProtocolError, match="^PDU of 67108865 bytes exceeds the maximum 67108864$"):
        stream.read()


@pytest.mark.parametrize(("max_pdu", "buffered"), [(65536, 65542), (16384, 65536 - 16390)])
def test_one_receive_takes_a_whole_pdu_and_the_next(pair: tuple[socket.socket, socket.socket], max_pdu: int,
                                                    buffered: int) -> None:
    """The buffer has room for two PDUs of the Maximum Length (header included), and at least 64 KiB:
    one recv_into of a stream already queued fills it, and no byte more."""
    ours, theirs = pair
    ours.settimeout(5)
    stream = PDUStream(ours, max_pdu)
    pdus = [pdu(bytes([n]) * max_pdu) for n in range(5)]
    sender = send_later(theirs, [(0, b"".join(pdus))])
    queued = buffered + len(pdus[0]) + 1  # a byte more than the buffer takes (the rest: as it drains)
    deadline = time.monotonic() + 5
    while len(ours.recv(1 << 20, socket.MSG_PEEK)) < queued and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stream.read() == (0x04, memoryview(pdus[0][6:]))
    assert stream.buffered == buffered
    for expected in pdus[1:]:
        assert stream.read() == (0x04, memoryview(expected[6:]))
    sender.join(5)


def test_quick_ack_is_re_armed_after_every_receive() -> None:
    """Linux leaves quick-ACK mode once we answer soon after a receive (delayed ACKs, "pingpong"); a
    sender with Nagle on (dcmtk) would then wait ~40 ms per image for our ACK. Every read re-arms it."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    with ours, theirs:
        ours.settimeout(5)
        theirs.settimeout(5)
        stream = PDUStream(ours, 16384)
        quick = (socket.IPPROTO_TCP, socket.TCP_QUICKACK)
        after_answers = []
        for n in range(6):
            theirs.sendall(pdu(b"\x01" * (100 + n)))
            assert stream.read()[0] == 0x04
            assert ours.getsockopt(*quick) == 1, f"read {n}: quick-ACK mode left"
            ours.sendall(pdu(b"\x02" * 10))  # an answer right after the request: the kernel turns to delayed ACKs
            assert len(theirs.recv(100)) == 16
            after_answers.append(ours.getsockopt(*quick))
        assert 0 in after_answers[:-1]  # the kernel did leave quick-ACK mode before a read: the case was tested


def _pdvs(pdus: bytes) -> list[tuple[int, int, bytes]]:
    """(PDU length, Message Control Header, value) of each PDV, one PDV per PDU as p_data_tf writes them."""
    out, pos = [], 0
    while pos < len(pdus):
        pdu_type, length = struct.unpack_from(">BxI", pdus, pos)
        item_length, _context, control = struct.unpack_from(">IBB", pdus, pos + 6)
        assert pdu_type == 0x04 and item_length == length - 4
        out.append((length, control, pdus[pos + 12 : pos + 6 + length]))
        pos += 6 + length
    return out


def test_messages_are_cut_to_fill_the_peers_maximum_length() -> None:
    command, data_set = bytes(range(100)), bytes(range(200, 250)) * 3
    pdvs = _pdvs(p_data_tf(5, command, 40, data_set))
    # Every PDU but each part's last is exactly the Maximum Length Received (40): no more PDUs than needed.
    assert [length for length, _c, _v in pdvs] == [40, 40, 38, 40, 40, 40, 40, 20]
    assert [control for _l, control, _v in pdvs] == [1, 1, 3, 0, 0, 0, 0, 2]
    assert b"".join(v for _l, c, v in pdvs if c & 1) == command
    assert b"".join(v for _l, c, v in pdvs if not c & 1) == data_set


def test_an_empty_data_set_is_one_last_fragment() -> None:
    assert _pdvs(p_data_tf(1, b"command", 0, b"")) == [(13, 3, b"command"), (6, 2, b"")]


def test_abort_and_release_pdus_are_pynetdicoms() -> None:
    """A-ABORT from the service provider (source 2), with its reason (2: unexpected PDU); A-RELEASE-RP."""
    for reason in (0, 2):
        theirs = A_ABORT_RQ()
        theirs.source, theirs.reason_diagnostic = 2, reason
        assert abort_pdu(reason=reason) == theirs.encode()
    assert abort_pdu() == abort_pdu(2, 0)
    assert RELEASE_RP == A_RELEASE_RP().encode()


def test_a_response_that_fits_is_one_pdu_and_one_byte_more_is_two() -> None:
    command = bytes(range(90))
    one = [(96, 3, command)]
    assert _pdvs(p_data_tf(7, command, 0)) == one  # no limit
    assert _pdvs(p_data_tf(7, command, 96)) == one  # exactly the peer's Maximum Length Received
    assert _pdvs(p_data_tf(7, command, 95)) == [(95, 1, command[:89]), (7, 3, command[89:])]
    assert p_data_tf(7, command, 0)[10] == 7  # the presentation context
