"""Structural walk of an encoded data set, pure Python (twin of ``fastscp/dicom/_walk_cext.pyx``).

Before a C-STORE gets its success status, the data set is walked to its
end: every data element's header is read and its value skipped, never
decoded; sequences and items are followed to their ends or delimiters,
encapsulated Pixel Data fragment by fragment. A value longer than what is
left, a sequence that never closes, or an item where an element belongs
fails the walk, with the same messages as the header scan
(:func:`fastscp.dicom._header_py.make_error`).

The walker is fed the data in pieces (``feed`` returns how many bytes it
took; the caller passes the rest again, with more, next time), so a
deflated data set is walked while it is inflated, in bounded memory.
No I/O here: bytes in, a verdict out.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, Final

from fastscp.dicom._header_py import (
    ERR_DELIMITER,
    ERR_DEPTH,
    ERR_HEADER,
    ERR_ITEM,
    ERR_NOT_ITEM,
    ERR_TAG,
    ERR_UNCLOSED,
    ERR_VALUE,
    ITEM,
    ITEM_DELIMITATION,
    LONG_VRS,
    MAX_DEPTH,
    SEQUENCE_DELIMITATION,
    UNDEFINED_LENGTH,
    HeaderError,
    make_error,
    vr_switch,
)

# Level kinds: a data set (top level or an item) holds data elements; a
# sequence holds items; encapsulated pixel data holds items of raw bytes.
DATASET: Final = 0
SEQUENCE: Final = 1
FRAGMENTS: Final = 2
#: Pixel Data: with undefined length its value is encapsulated fragments.
PIXEL_DATA: Final = 0x7FE00010
#: No defined end (an undefined-length sequence or item, or the top level).
OPEN: Final = -1
#: Error code of an explicit VR that is letters but no VR (beside _header_py's ERR_*).
ERR_VR: Final = 10
#: The VRs of PS3.5 table 6.2-1: with any other two letters the length field's
#: size, and so the rest of the data set, can't be known.
KNOWN_VRS: Final = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)

_TAG = {False: struct.Struct("<HH").unpack_from, True: struct.Struct(">HH").unpack_from}
_U16 = {False: struct.Struct("<H").unpack_from, True: struct.Struct(">H").unpack_from}
_U32 = {False: struct.Struct("<I").unpack_from, True: struct.Struct(">I").unpack_from}


def walk_error(code: int, pos: int, tag: int, length: int, start: int, size: int) -> HeaderError:
    """The exception for a failed walk (shared by both twins); ``length`` carries the VR for ERR_VR."""
    if code == ERR_VR:
        vr = bytes((length >> 8, length & 0xFF)).decode("ascii")
        return HeaderError(f"unknown VR {vr!r} of ({tag >> 16:04X},{tag & 0xFFFF:04X}) at byte offset {pos}")
    return make_error(code, pos, tag, length, start, size, True)


class Walker:
    """Walks one data set fed in pieces; :meth:`finish` gives the verdict.

    Parameters
    ----------
    explicit, big : bool
        The data set's encoding (Explicit VR; Big Endian). The first element
        may switch explicit/implicit as the header scan does.
    """

    def __init__(self, explicit: bool, big: bool) -> None:
        # Each level: [kind, explicit, big, end, start, bound]: end is where a
        # defined-length level closes (else OPEN); bound is the nearest
        # enclosing defined end, which nothing inside may cross.
        self._stack: list[list] = [[DATASET, explicit, big, OPEN, 0, OPEN]]
        #: Bytes taken so far (the offset of the next byte to feed).
        self.position = 0
        #: Bytes of the last value still to skip.
        self._skip = 0
        # The element whose value is being skipped, for the error message.
        self._last = (0, 0, 0)
        #: Bytes the last feed left (an element header cut by the piece's end).
        self._left = 0

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Walk as far as ``data`` goes; returns the bytes taken.

        The caller feeds the untaken rest (at most 11 bytes: a cut element
        header) again at the start of the next piece.

        Raises
        ------
        HeaderError
            The data set is malformed; the message names the offset.
        """
        buf = memoryview(data)
        if buf.ndim != 1 or buf.itemsize != 1:
            buf = buf.cast("B")
        n = len(buf)
        base = self.position
        p = min(self._skip, n)
        self._skip -= p
        self._left = n  # until the walk ends: errors give the data's size as base + n
        stack = self._stack
        try:
            while not self._skip:
                here = base + p
                level = stack[-1]
                # Defined-length items and sequences close where they end.
                while level[3] == here and len(stack) > 1:
                    stack.pop()
                    level = stack[-1]
                if p == n:
                    break
                kind, explicit, big, end, start, bound = level
                if n - p < 8:
                    break
                group, element = _TAG[big](buf, p)
                tag = group << 16 | element
                if kind != DATASET:
                    (length,) = _U32[big](buf, p + 4)
                    if tag == SEQUENCE_DELIMITATION and end == OPEN:
                        stack.pop()
                        p += 8
                    elif tag != ITEM:
                        raise self._error(ERR_NOT_ITEM, here, tag)
                    elif length == UNDEFINED_LENGTH:
                        if kind == FRAGMENTS:
                            raise self._error(ERR_ITEM, here, tag, length)
                        self._push(DATASET, explicit, big, OPEN, here + 8)
                        p += 8
                    else:
                        if bound != OPEN and length > bound - here - 8:
                            raise self._error(ERR_ITEM, here, tag, length)
                        p += 8
                        if kind == FRAGMENTS:
                            p = self._skip_value(buf, p, here, tag, length)
                        else:
                            self._push(DATASET, explicit, big, here + 8 + length, here + 8)
                    continue
                if group == 0xFFFE:
                    if tag == ITEM_DELIMITATION and end == OPEN and len(stack) > 1:
                        stack.pop()
                        p += 8
                        continue
                    raise self._error(ERR_DELIMITER, here, tag)
                vr0, vr1 = buf[p + 4], buf[p + 5]
                elem_explicit, level[1] = vr_switch(explicit, vr0, vr1, here == start, here == 0)
                vr = bytes((vr0, vr1)) if elem_explicit else b""
                if elem_explicit and vr not in KNOWN_VRS:
                    raise self._error(ERR_VR, here, tag, vr0 << 8 | vr1)
                if elem_explicit and vr in LONG_VRS:
                    if n - p < 12:
                        break
                    (length,) = _U32[big](buf, p + 8)
                    header = 12
                elif elem_explicit:
                    (length,) = _U16[big](buf, p + 6)
                    header = 8
                else:
                    (length,) = _U32[big](buf, p + 4)
                    header = 8
                if length == UNDEFINED_LENGTH:
                    if vr == b"UN":
                        # PS3.5 6.2.2: UN of undefined length is a sequence
                        # encoded in Implicit VR Little Endian.
                        self._push(SEQUENCE, False, False, OPEN, here)
                    elif vr == b"SQ" or (not vr and tag != PIXEL_DATA):
                        self._push(SEQUENCE, elem_explicit, big, OPEN, here)
                    else:
                        self._push(FRAGMENTS, elem_explicit, big, OPEN, here)
                    p += header
                    continue
                if bound != OPEN and length > bound - here - header:
                    raise self._error(ERR_VALUE, here, tag, length)
                p += header
                if vr == b"SQ":
                    # Its items are walked too: a defined length says where
                    # they must end.
                    self._push(SEQUENCE, elem_explicit, big, here + header + length, here)
                else:
                    p = self._skip_value(buf, p, here, tag, length)
        finally:
            self.position = base + p
            self._left = n - p
        return p

    @property
    def pending_skip(self) -> int:
        """Bytes of a value still to skip: the walk needs no data for them."""
        return self._skip

    def advance(self, count: int) -> None:
        """Skip ``count`` bytes of the value being skipped without seeing them."""
        if not 0 <= count <= self._skip or self._left:
            raise ValueError("advance() only moves through a value being skipped")
        self._skip -= count
        self.position += count

    def _skip_value(self, buf: memoryview, p: int, here: int, tag: int, length: int) -> int:
        take = min(length, len(buf) - p)
        self._skip = length - take
        self._last = (here, tag, length)
        return p + take

    def _push(self, kind: int, explicit: bool, big: bool, end: int, start: int) -> None:
        if len(self._stack) >= MAX_DEPTH:
            raise self._error(ERR_DEPTH, start, 0)
        bound = self._stack[-1][5] if end == OPEN else end
        self._stack.append([kind, explicit, big, end, start, bound])

    def _error(self, code: int, pos: int, tag: int, length: int = 0, start: int = 0) -> HeaderError:
        return walk_error(code, pos, tag, length, start, self.position + self._left)

    def finish(self) -> None:
        """The data ended: raise if it ended inside anything.

        Raises
        ------
        HeaderError
            A value, an element header, an item or a sequence runs past the end.
        """
        size = self.position + self._left
        if self._skip:
            here, tag, length = self._last
            raise make_error(ERR_VALUE, here, tag, length, 0, size, True)
        if self._left:
            code = ERR_TAG if self._left < 4 else ERR_HEADER
            raise make_error(code, self.position, 0, 0, 0, size, True)
        for kind, _explicit, _big, end, start, _bound in reversed(self._stack[1:]):
            if end == OPEN:
                raise make_error(ERR_UNCLOSED, self.position, 0, 0, start, size, True)
            raise make_error(ERR_ITEM if kind == DATASET else ERR_VALUE, start, 0, end - start, 0, size, True)


#: Deflated input is inflated this many bytes at a time (bounded memory).
INFLATE_INPUT: Final = 1 << 16
INFLATE_OUTPUT: Final = 1 << 18


def walk_deflated(data: bytes | bytearray | memoryview, walker: Any, max_inflated: int) -> None:
    """Inflate a deflated data set piece by piece and walk it as it comes.

    Neither the compressed nor the inflated data is ever copied whole: at
    most ``INFLATE_INPUT`` + ``INFLATE_OUTPUT`` bytes are held at a time.
    ``walker`` is a fresh Explicit VR Little Endian walker of either twin.

    Raises
    ------
    HeaderError
        Not valid deflate data, truncated, inflating past ``max_inflated``
        bytes (a compression bomb), or a malformed inflated data set.
    """
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    tail = b""
    inflated = 0
    try:
        for start in range(0, len(view), INFLATE_INPUT):
            pending: bytes | memoryview = view[start : start + INFLATE_INPUT]
            while pending and not inflater.eof:
                try:
                    out = inflater.decompress(pending, INFLATE_OUTPUT)
                except zlib.error as exc:
                    raise HeaderError(f"deflated data set is not valid deflate data: {exc}") from None
                pending = inflater.unconsumed_tail
                inflated += len(out)
                if inflated > max_inflated:
                    raise HeaderError(f"deflated data set inflates past {max_inflated} bytes (limits.max_object_size)")
                buf = tail + out if tail else out
                tail = bytes(buf[walker.feed(buf) :])
            if inflater.eof:
                break
        if not inflater.eof:
            raise HeaderError("deflated data set is truncated: its deflate stream does not end")
        walker.finish()
    except HeaderError as exc:
        if str(exc).startswith("deflated data set"):
            raise
        raise HeaderError(f"inflated data: {exc}") from None
