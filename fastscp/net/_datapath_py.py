"""The data transfer phase's receive loop: the pure-Python twin of ``fastscp/net/_datapath_cext.pyx``.

A :class:`DataPath` reads P-DATA-TF PDUs (PS3.8 9.3.5) into its
:class:`~fastscp.net.pdu.PDUStream`'s buffer, parses the PDU and PDV headers,
reassembles command sets and streams a C-STORE data set straight into its
temp file (hashing it as it passes), and returns to the association only at
an event: a command set complete, a data set complete, a fragment of a data
set a Python message takes (C-FIND identifiers, drained refusals), a write
that failed, or a PDU that is not P-DATA-TF (the association reads that one
with :meth:`PDUStream.read`).

A PDV's value is streamed: it need not fit the buffer, and a fragment handed
to a Python message is the part of it that has arrived (several per PDV).
When the loop stops between two PDVs of one PDU, the stream's ``rest`` says
how much of that PDU is unread, so the association can read it as a PDU of
its own (PDVs are independent of the PDU that carries them, PS3.8 9.3.5.1).
"""

from __future__ import annotations

from typing import Any

from fastscp.dicom.part10 import content_hash_of, content_hasher
from fastscp.net.pdu import P_DATA_TF, PDU_HEADER, PDV_HEADER, LimitExceeded, PDUStream, ProtocolError
from fastscp.storage.files import write_all

# Events pump() returns (the same numbers in the compiled twin, checked there at import).
#: A command set is complete: :attr:`DataPath.command`, :attr:`DataPath.context_id`.
COMMAND = 1
#: A piece of a data set for a Python message: :attr:`DataPath.fragment`, :attr:`DataPath.last`.
FRAGMENT = 2
#: The data set sent to a file (:meth:`DataPath.to_file`) is complete:
#: :attr:`DataPath.length`, :attr:`DataPath.content_hash`; the next one goes to Python.
DATA_SET = 3
#: Writing the file failed (:attr:`DataPath.errno`): the rest of the data set is drained, not written.
WRITE_FAILED = 4
#: The next PDU is not P-DATA-TF: read it with :meth:`PDUStream.read`.
OTHER_PDU = 5
#: A data set going to a file: :attr:`DataPath.length` bytes of it so far, told before the loop
#: waits for the peer, so the association's counters are current while it waits.
PROGRESS = 6


def pdu_too_long(length: int, cap: int) -> ProtocolError:
    return ProtocolError(f"PDU of {length} bytes exceeds the maximum {cap}")


def truncated_pdv() -> ProtocolError:
    return ProtocolError("truncated PDV item")


def pdv_does_not_fit(item_length: int) -> ProtocolError:
    return ProtocolError(f"PDV item length {item_length} does not fit its PDU")


def command_too_long(limit: int) -> LimitExceeded:
    return LimitExceeded(f"command set longer than limits.max_command_set ({limit})")


def data_set_too_large(limit: int) -> LimitExceeded:
    return LimitExceeded(f"data set larger than limits.max_object_size ({limit})")


class DataPath:
    """The receive loop of one association's data transfer phase (see the module)."""

    def __init__(self, stream: PDUStream, max_command_set: int) -> None:
        self.stream = stream
        self.max_command_set = max_command_set
        self._command = bytearray()
        self._last_command = b""
        self._pending = 0  # an event owed after WRITE_FAILED
        #: The presentation context of the last command set's last fragment.
        self.context_id = 0
        #: FRAGMENT: the piece (a view into the receive buffer, valid until the next pump()).
        self.fragment = memoryview(b"")
        #: FRAGMENT: the data set's last piece.
        self.last = False
        #: DATA_SET: the data set's length; during it, the bytes so far.
        self.length = 0
        #: DATA_SET: the data set's content hash (fastscp.dicom.part10.dataset_content_hash's value).
        self.content_hash = ""
        #: WRITE_FAILED: why.
        self.errno = 0
        self._pdu_left = 0  # unread bytes of the current P-DATA-TF PDU's body
        self._pdv_left = -1  # unread bytes of the current PDV's value; -1: between PDVs
        self._control = 0
        self._file = False
        self._fd = -1
        self._limit = 0
        self._prefix = bytearray()
        self._prefix_room = 0
        self._head = b""
        self._hash: Any = None
        self._reported = 0

    @property
    def command(self) -> bytes:
        """COMMAND: the command set's bytes."""
        return self._last_command

    def to_file(self, fd: int, limit: int, prefix: bytearray, prefix_room: int, hash: bool = True,
                head: bytes = b"") -> None:
        """The coming data set goes to the end of ``fd`` (written as it arrives; with ``hash``, its
        content hash taken as it passes), its first ``prefix_room`` bytes also to ``prefix`` (empty); more
        than ``limit`` bytes abort. ``head`` (the File Meta Information) is written before the data set,
        in the system call of its first piece (PERF: one write less per store); not hashed."""
        self._file = True
        self._fd = fd
        self._head = head
        self._limit = limit
        self._prefix = prefix
        self._prefix_room = len(prefix) + prefix_room
        self._hash = content_hasher() if hash else None
        self.length = 0
        self._reported = 0
        self.content_hash = ""

    def pump(self) -> int:
        """Receive until the next event (module constants); raises as PDUStream.read does, and
        ProtocolError / LimitExceeded for malformed PDVs and limits."""
        if self._pending:
            event, self._pending = self._pending, 0
            return event
        s = self.stream
        if s.rest:
            self._pdu_left, s.rest = s.rest, 0
        while True:
            if self._pdv_left < 0:
                # Between PDVs (or PDUs): the next header.
                if self._pdu_left == 0:
                    if s._end - s._start < 6 and self._refill(6):
                        return PROGRESS
                    pdu_type, length = PDU_HEADER.unpack_from(s._buf, s._start)
                    if pdu_type != P_DATA_TF:
                        return OTHER_PDU
                    if length > s.limit:
                        raise pdu_too_long(length, s.limit)
                    s._start += 6
                    self._pdu_left = length
                    continue
                if self._pdu_left < 6:
                    raise truncated_pdv()
                if s._end - s._start < 6 and self._refill(6):
                    return PROGRESS
                item_length, context_id, control = PDV_HEADER.unpack_from(s._buf, s._start)
                if item_length < 2 or 4 + item_length > self._pdu_left:
                    raise pdv_does_not_fit(item_length)
                s._start += 6
                self._pdu_left -= 6
                self._pdv_left = item_length - 2
                self._control = control
                if control & 1:
                    self.context_id = context_id
                if self._pdv_left:
                    continue
                n = 0  # an empty value is a (last) fragment too
            else:
                if s._start == s._end and self._refill(1):
                    return PROGRESS
                n = min(s._end - s._start, self._pdv_left)
            start = s._start
            s._start += n
            self._pdu_left -= n
            self._pdv_left -= n
            done = self._pdv_left == 0
            last = done and bool(self._control & 2)
            if done:
                self._pdv_left = -1
            piece = s._view[start : start + n]
            # Message Control Header (PS3.8 E.2): bit 0 command, bit 1 last fragment.
            if self._control & 1:
                if len(self._command) + n > self.max_command_set:
                    raise command_too_long(self.max_command_set)
                self._command += piece
                if last:
                    return self._stop(COMMAND)
                continue
            if not self._file:
                self.fragment, self.last = piece, last
                return self._stop(FRAGMENT) if last else FRAGMENT
            self.length += n
            if self.length > self._limit:
                raise data_set_too_large(self._limit)
            room = self._prefix_room - len(self._prefix)
            if room > 0:
                self._prefix += piece[:room]
            if self._fd >= 0 and self._hash is not None:
                self._hash.update(piece)
            if last:
                self.content_hash = content_hash_of(self._hash) if self._hash is not None else ""
                self._file = False
            if self._fd >= 0:
                try:
                    head, self._head = self._head, b""
                    write_all(self._fd, piece, head)
                except OSError as exc:
                    self._fd = -1
                    self.errno = exc.errno or 0
                    if last:  # the association learns of the failure first, then of the end
                        self._pending = self._stop(DATA_SET)
                    return WRITE_FAILED
            if last:
                return self._stop(DATA_SET)

    def _stop(self, event: int) -> int:
        """A message's end: hand the rest of this PDU back to the stream."""
        if event == COMMAND:
            self._last_command = bytes(self._command)
            self._command.clear()
        self.stream.rest, self._pdu_left = self._pdu_left, 0
        return event

    def _refill(self, needed: int) -> bool:
        """At least ``needed`` bytes (1 or 6) from the buffer's start: compact, then receive.
        True: PROGRESS is due first (then nothing has changed; the loop comes back here)."""
        s = self.stream
        while s._end - s._start < needed:
            if self._file and self.length > self._reported:
                # The twin cannot tell whether recv would wait: it tells before each.
                self._reported = self.length
                return True
            if s._start == s._end:
                s._start = s._end = 0
            elif s._start + needed > len(s._buf):
                tail = s._end - s._start
                s._buf[:tail] = s._view[s._start : s._end]
                s._start, s._end = 0, tail
            s.receive()
        return False
