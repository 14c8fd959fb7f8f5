"""Upper-layer PDUs (PS3.8 9.3): framing, the receive buffer, P-DATA-TF, A-RELEASE-RP, A-ABORT.

The wire side of an association: :class:`PDUStream` reads whole PDUs from a
socket into one reusable buffer, against per-read timeouts and whole-message
deadlines; :func:`p_data_tf` encodes messages. What the PDUs mean (A-ASSOCIATE,
DIMSE) is :mod:`fastscp.net.association`'s.
"""

from __future__ import annotations

import socket
import struct
import time

# PDU types (PS3.8 9.3.1).
A_ASSOCIATE_RQ = 0x01
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

#: PDU header (PS3.8 9.3.1): type, reserved, length (big endian).
PDU_HEADER = struct.Struct(">BxI")
#: PDV item header (PS3.8 9.3.5.1): item length, presentation context ID, Message Control Header.
PDV_HEADER = struct.Struct(">IBB")
#: A P-DATA-TF PDU's header and its one PDV's: a whole message in one PDU.
_COMMAND_PDU = struct.Struct(">BxIIBB")
#: Largest A-ASSOCIATE-RQ we read: far above any real one, bounds memory.
MAX_ASSOCIATE_RQ = 1024 * 1024
#: Read limit when our Maximum Length Received is 0 ("no limit").
UNLIMITED_PDU_CAP = 64 * 1024 * 1024

RELEASE_RP = PDU_HEADER.pack(A_RELEASE_RP, 4) + b"\x00" * 4


def abort_pdu(source: int = 2, reason: int = 0) -> bytes:
    """An A-ABORT PDU; source 2 is the service provider (PS3.8 9.3.8)."""
    return PDU_HEADER.pack(A_ABORT, 4) + bytes((0, 0, source, reason))


class PeerClosed(Exception):
    """The peer closed the connection (or aborted)."""


class ProtocolError(Exception):
    """The peer broke the upper layer protocol; we abort the association."""


class DeadlineExceeded(TimeoutError):
    """The peer took too long for a whole request or message (not one read)."""


class LimitExceeded(Exception):
    """The peer went past a configured limit (limits.*); we abort the association."""


class PDUStream:
    """Reads whole PDUs from a socket into one reusable buffer.

    Besides the socket's per-read timeout, reads can run against a deadline
    (:meth:`deadline`): a whole A-ASSOCIATE-RQ, or a message that must keep
    up a minimum rate, so a peer dripping one byte at a time cannot stretch
    a request for ever.
    """

    def __init__(self, sock: socket.socket, max_pdu: int, buffer_size: int = 0) -> None:
        self.sock = sock
        self.limit = max_pdu or UNLIMITED_PDU_CAP
        # Room for two PDUs so one recv_into can take a whole PDU and the
        # start of the next one (``buffer_size``: tests that split the stream
        # at every offset ask for a small one; it grows for a longer PDU).
        self._buf = bytearray(buffer_size or max(2 * (min(self.limit, 4 * 1024 * 1024) + 6), 65536))
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        #: Bytes of a P-DATA-TF PDU's body still unread when the data path
        #: (fastscp.net.datapath) stopped between two of its PDVs: read() returns
        #: them as a P-DATA-TF PDU of their own.
        self.rest = 0
        self.bytes_read = 0
        # The deadline clock (see deadline()); off until armed.
        self._clock = False
        self._t0 = 0.0
        self._b0 = 0
        self._grace = 0.0
        self._rate = 0.0
        self._why = ""
        #: The per-read timeout the socket had, restored after a deadline narrowed it.
        self._idle_timeout = sock.gettimeout() if hasattr(sock, "gettimeout") else None
        self._narrowed = False
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            self._quickack = True
        except (OSError, AttributeError):
            self._quickack = False

    def set_timeout(self, seconds: float | None) -> None:
        """The per-read (idle) timeout."""
        self._idle_timeout = seconds
        self._narrowed = False
        self.sock.settimeout(seconds)

    def deadline(self, seconds: float, min_rate: float = 0.0, why: str = "") -> None:
        """From now, reads must be done within ``seconds`` plus one second per
        ``min_rate`` bytes received from now on (``min_rate`` 0: a fixed deadline)."""
        self._clock = True
        self._t0 = time.monotonic()
        self._b0 = self.bytes_read
        self._grace = seconds
        self._rate = float(min_rate)
        self._why = why

    def no_deadline(self) -> None:
        self._clock = False
        if self._narrowed:
            self.set_timeout(self._idle_timeout)

    def _arm(self) -> None:
        allowed = self._grace + ((self.bytes_read - self._b0) / self._rate if self._rate else 0.0)
        remaining = self._t0 + allowed - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(self._why or "deadline passed")
        idle = self._idle_timeout
        if idle is None or remaining < idle:
            self.sock.settimeout(remaining)
            self._narrowed = True
        elif self._narrowed:
            self.sock.settimeout(idle)
            self._narrowed = False

    def _fill(self, needed: int) -> None:
        if len(self._buf) < needed:
            # A new, larger buffer: the old one may still be exported (the
            # memoryview of the PDU the caller holds), so it can't be resized.
            tail = self._end - self._start
            buf = bytearray(needed + 65536)
            buf[:tail] = self._view[self._start : self._end]
            self._buf, self._view = buf, memoryview(buf)
            self._start, self._end = 0, tail
        elif self._start + needed > len(self._buf):
            # Compact: move the unread tail to the front.
            tail = self._end - self._start
            self._buf[:tail] = self._view[self._start : self._end]
            self._start, self._end = 0, tail
        while self._end - self._start < needed:
            self.receive()

    def receive(self) -> None:
        """One ``recv_into`` at the buffer's end (there must be room), against the deadline."""
        if self._clock:
            self._arm()
        try:
            n = self.sock.recv_into(self._view[self._end :])
        except TimeoutError:
            if self._narrowed:
                raise DeadlineExceeded(self._why or "deadline passed") from None
            raise
        if n == 0:
            raise PeerClosed("connection closed by peer")
        self._end += n
        self.bytes_read += n
        if self._quickack:
            # Linux leaves quick-ACK mode after a few segments; re-arm it
            # so a sender with Nagle on (dcmtk's default) never waits
            # ~40 ms for our delayed ACK.
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned by :meth:`read`."""
        return self._end - self._start

    def read(self, limit: int | None = None) -> tuple[int, memoryview]:
        """The next PDU's type and body (valid until the next call)."""
        if self.rest:
            length, self.rest = self.rest, 0
            self._fill(length)
            start = self._start
            self._start = start + length
            return P_DATA_TF, self._view[start : self._start]
        self._fill(6)
        pdu_type, length = PDU_HEADER.unpack_from(self._buf, self._start)
        cap = limit if limit is not None else self.limit
        if length > cap:
            raise ProtocolError(f"PDU of {length} bytes exceeds the maximum {cap}")
        self._fill(6 + length)
        start = self._start + 6
        self._start = start + length
        return pdu_type, self._view[start : self._start]


def p_data_tf(context_id: int, command: bytes, peer_max_pdu: int, data_set: bytes | None = None) -> bytes:
    """A command set (and its data set) as P-DATA-TF PDUs, one PDV each,
    fragmented to the peer's Maximum Length Received (0: no limit)."""
    if data_set is None and (not peer_max_pdu or len(command) <= peer_max_pdu - 6):
        # PERF: a response, the one PDU of one PDV (~3 us less per store than the loop below).
        return _COMMAND_PDU.pack(P_DATA_TF, len(command) + 6, len(command) + 2, context_id, 3) + command
    out = bytearray()
    for payload, is_command in ((command, True), (data_set, False)):
        if payload is None:
            continue
        room = max(peer_max_pdu - 6, 1) if peer_max_pdu else max(len(payload), 1)
        for start in range(0, max(len(payload), 1), room):
            chunk = payload[start : start + room]
            # Message Control Header: bit 0 command, bit 1 last fragment.
            control = (1 if is_command else 0) | (2 if start + room >= len(payload) else 0)
            out += PDU_HEADER.pack(P_DATA_TF, len(chunk) + 6)
            out += PDV_HEADER.pack(len(chunk) + 2, context_id, control)
            out += chunk
    return bytes(out)
