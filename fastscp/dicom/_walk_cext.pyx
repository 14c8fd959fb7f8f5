# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled structural walk of an encoded data set: the twin of ``fastscp/dicom/_walk_py.py``.

The loop runs on a ``const unsigned char*`` over the caller's buffer (an mmap
of the received temp file) and reads only element headers: a skipped value
costs a few integer operations and its pages are never touched. Errors are
built by the same Python helper the twin uses, so both give the same text.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport int64_t, uint32_t

from .bufread cimport load_u16, load_u32
from .vr cimport is_long_vr, is_vr

from fastscp.dicom import _header_py as _hp
from fastscp.dicom import _walk_py as _py

# Constants of fastscp.dicom._header_py / _walk_py, repeated for C; checked at import below.
cdef enum:
    ERR_HEADER = 1
    ERR_VALUE = 2
    ERR_ITEM = 3
    ERR_UNCLOSED = 4
    ERR_NOT_ITEM = 6
    ERR_DELIMITER = 7
    ERR_DEPTH = 8
    ERR_TAG = 9
    ERR_VR = 10
    MAX_DEPTH = 64
    DATASET = 0
    SEQUENCE = 1
    FRAGMENTS = 2

cdef uint32_t ITEM = 0xFFFEE000u
cdef uint32_t ITEM_DELIMITATION = 0xFFFEE00Du
cdef uint32_t SEQUENCE_DELIMITATION = 0xFFFEE0DDu
cdef uint32_t UNDEFINED_LENGTH = 0xFFFFFFFFu
cdef uint32_t PIXEL_DATA = 0x7FE00010u
cdef int64_t OPEN = -1

for _name, _value in (("ERR_HEADER", ERR_HEADER), ("ERR_VALUE", ERR_VALUE), ("ERR_ITEM", ERR_ITEM),
                      ("ERR_UNCLOSED", ERR_UNCLOSED), ("ERR_NOT_ITEM", ERR_NOT_ITEM),
                      ("ERR_DELIMITER", ERR_DELIMITER), ("ERR_DEPTH", ERR_DEPTH), ("ERR_TAG", ERR_TAG),
                      ("MAX_DEPTH", MAX_DEPTH)):
    assert getattr(_hp, _name) == _value, _name
for _name, _value in (("DATASET", DATASET), ("SEQUENCE", SEQUENCE), ("FRAGMENTS", FRAGMENTS),
                      ("PIXEL_DATA", PIXEL_DATA), ("OPEN", OPEN), ("ERR_VR", ERR_VR)):
    assert getattr(_py, _name) == _value, _name
assert _hp.LONG_VRS == frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                                  b"UR", b"UT", b"UV"})


# _KNOWN[(b0 - 'A') * 26 + (b1 - 'A')]: the two letters are a VR (from the twin's table).
cdef bint _KNOWN[26 * 26]
for _i in range(26 * 26):
    _KNOWN[_i] = False
for _vr in _py.KNOWN_VRS:
    _KNOWN[(_vr[0] - 0x41) * 26 + (_vr[1] - 0x41)] = True


ctypedef struct Level:
    int kind
    bint explicit
    bint big
    int64_t end     # where a defined-length level closes, else OPEN
    int64_t start
    int64_t bound   # the nearest enclosing defined end, else OPEN


cdef class Walker:
    """Walks one data set fed in pieces; see :class:`fastscp.dicom._walk_py.Walker`."""

    cdef Level stack[MAX_DEPTH]
    cdef int depth
    cdef readonly int64_t position
    cdef int64_t skip
    cdef int64_t last_pos, last_length
    cdef uint32_t last_tag
    cdef int64_t left
    # Set by _walk on failure.
    cdef int err, err_depth_start
    cdef int64_t err_pos, err_length
    cdef uint32_t err_tag

    def __cinit__(self, bint explicit, bint big):
        self.depth = 1
        self.stack[0] = Level(DATASET, explicit, big, OPEN, 0, OPEN)

    cdef inline bint _push(self, int kind, bint explicit, bint big, int64_t end, int64_t start) noexcept nogil:
        if self.depth >= MAX_DEPTH:
            self.err, self.err_pos, self.err_tag = ERR_DEPTH, start, 0
            return False
        cdef int64_t bound = self.stack[self.depth - 1].bound if end == OPEN else end
        self.stack[self.depth] = Level(kind, explicit, big, end, start, bound)
        self.depth += 1
        return True

    cdef inline Py_ssize_t _skip_value(self, Py_ssize_t n, Py_ssize_t p, int64_t here, uint32_t tag,
                                       int64_t length) noexcept nogil:
        cdef int64_t take = length if length < n - p else n - p
        self.skip = length - take
        self.last_pos, self.last_tag, self.last_length = here, tag, length
        return p + <Py_ssize_t>take

    cdef Py_ssize_t _walk(self, const unsigned char* buf, Py_ssize_t n) noexcept nogil:
        """Walk buf[:n]; returns the bytes taken, or -1 with self.err set."""
        cdef int64_t base = self.position
        cdef Py_ssize_t p = <Py_ssize_t>(self.skip if self.skip < n else n)
        cdef Level* level
        cdef int64_t here, length, header
        cdef uint32_t tag
        cdef unsigned short group
        cdef unsigned char vr0, vr1
        cdef bint elem_explicit, is_un, is_sq
        self.skip -= p
        self.err = 0
        while not self.skip:
            here = base + p
            level = &self.stack[self.depth - 1]
            # Defined-length items and sequences close where they end.
            while level.end == here and self.depth > 1:
                self.depth -= 1
                level = &self.stack[self.depth - 1]
            if p == n or n - p < 8:
                break
            group = load_u16(buf + p, level.big)
            tag = (<uint32_t>group << 16) | load_u16(buf + p + 2, level.big)
            if level.kind != DATASET:
                length = load_u32(buf + p + 4, level.big)
                if tag == SEQUENCE_DELIMITATION and level.end == OPEN:
                    self.depth -= 1
                    p += 8
                elif tag != ITEM:
                    self.err, self.err_pos, self.err_tag = ERR_NOT_ITEM, here, tag
                    return -1
                elif length == UNDEFINED_LENGTH:
                    if level.kind == FRAGMENTS:
                        self.err, self.err_pos, self.err_tag, self.err_length = ERR_ITEM, here, tag, length
                        return -1
                    if not self._push(DATASET, level.explicit, level.big, OPEN, here + 8):
                        return -1
                    p += 8
                else:
                    if level.bound != OPEN and length > level.bound - here - 8:
                        self.err, self.err_pos, self.err_tag, self.err_length = ERR_ITEM, here, tag, length
                        return -1
                    p += 8
                    if level.kind == FRAGMENTS:
                        p = self._skip_value(n, p, here, tag, length)
                    elif not self._push(DATASET, level.explicit, level.big, here + 8 + length, here + 8):
                        return -1
                continue
            if group == 0xFFFE:
                if tag == ITEM_DELIMITATION and level.end == OPEN and self.depth > 1:
                    self.depth -= 1
                    p += 8
                    continue
                self.err, self.err_pos, self.err_tag = ERR_DELIMITER, here, tag
                return -1
            vr0 = buf[p + 4]
            vr1 = buf[p + 5]
            elem_explicit = level.explicit
            if level.explicit:
                # Like pydicom: bytes that are no VR make this element implicit,
                # and the whole data set if it is its first element.
                if not is_vr(vr0, vr1):
                    elem_explicit = False
                    if here == level.start:
                        level.explicit = False
            elif here == 0 and is_vr(vr0, vr1):
                elem_explicit = True
                level.explicit = True
            if elem_explicit and not _KNOWN[(vr0 - 0x41) * 26 + (vr1 - 0x41)]:
                self.err, self.err_pos, self.err_tag, self.err_length = ERR_VR, here, tag, (vr0 << 8) | vr1
                return -1
            is_un = elem_explicit and vr0 == 0x55 and vr1 == 0x4E
            is_sq = elem_explicit and vr0 == 0x53 and vr1 == 0x51
            if elem_explicit and is_long_vr(vr0, vr1):
                if n - p < 12:
                    break
                length = load_u32(buf + p + 8, level.big)
                header = 12
            elif elem_explicit:
                length = load_u16(buf + p + 6, level.big)
                header = 8
            else:
                length = load_u32(buf + p + 4, level.big)
                header = 8
            if length == UNDEFINED_LENGTH:
                if is_un:
                    # PS3.5 6.2.2: Implicit VR Little Endian inside.
                    if not self._push(SEQUENCE, False, False, OPEN, here):
                        return -1
                elif is_sq or (not elem_explicit and tag != PIXEL_DATA):
                    if not self._push(SEQUENCE, elem_explicit, level.big, OPEN, here):
                        return -1
                elif not self._push(FRAGMENTS, elem_explicit, level.big, OPEN, here):
                    return -1
                p += header
                continue
            if level.bound != OPEN and length > level.bound - here - header:
                self.err, self.err_pos, self.err_tag, self.err_length = ERR_VALUE, here, tag, length
                return -1
            p += header
            if is_sq:
                if not self._push(SEQUENCE, True, level.big, here + header + length, here):
                    return -1
            else:
                p = self._skip_value(n, p, here, tag, length)
        return p

    def feed(self, data):
        """Walk as far as ``data`` goes; returns the bytes taken (see the twin)."""
        cdef Py_buffer buffer
        cdef Py_ssize_t taken
        PyObject_GetBuffer(data, &buffer, PyBUF_SIMPLE)
        try:
            with nogil:
                taken = self._walk(<const unsigned char*>buffer.buf, buffer.len)
            if taken < 0:
                self.left = 0
                raise _py.walk_error(self.err, self.err_pos, self.err_tag, self.err_length, 0,
                                     self.position + buffer.len)
            self.position += taken
            self.left = buffer.len - taken
            return taken
        finally:
            PyBuffer_Release(&buffer)

    @property
    def pending_skip(self):
        """Bytes of a value still to skip (see the twin)."""
        return self.skip

    def advance(self, int64_t count):
        """Skip ``count`` bytes of the value being skipped without seeing them (see the twin)."""
        if not 0 <= count <= self.skip or self.left:
            raise ValueError("advance() only moves through a value being skipped")
        self.skip -= count
        self.position += count

    def finish(self):
        """The data ended: raise if it ended inside anything (see the twin)."""
        cdef int64_t size = self.position + self.left
        cdef int i
        if self.skip:
            raise _hp.make_error(ERR_VALUE, self.last_pos, self.last_tag, self.last_length, 0, size, True)
        if self.left:
            raise _hp.make_error(ERR_TAG if self.left < 4 else ERR_HEADER, self.position, 0, 0, 0, size, True)
        for i in range(self.depth - 1, 0, -1):
            if self.stack[i].end == OPEN:
                raise _hp.make_error(ERR_UNCLOSED, self.position, 0, 0, self.stack[i].start, size, True)
            raise _hp.make_error(ERR_ITEM if self.stack[i].kind == DATASET else ERR_VALUE, self.stack[i].start,
                                 0, self.stack[i].end - self.stack[i].start, 0, size, True)
