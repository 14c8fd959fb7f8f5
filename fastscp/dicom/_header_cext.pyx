# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled DICOM header scanner: the twin of ``fastscp/dicom/_header_py.py``.

The scan loop runs on a ``const unsigned char*`` over the caller's buffer with
no Python objects; skipped elements cost a few integer operations.  Only the
kept elements become Python values, and the rare cases (character sets other
than ASCII, odd numeric strings, errors, deflate) are handed to the same Python
helpers the pure-Python twin uses, so both give identical results.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_Clear, PyErr_Occurred
from cpython.ref cimport PyObject
from cpython.unicode cimport PyUnicode_DecodeLatin1, PyUnicode_DecodeUTF8


cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object text, Py_ssize_t* size) except NULL
from libc.math cimport isfinite
from libc.stdint cimport int16_t, int32_t, int64_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memchr, memcpy

from .bufread cimport ByteView, has_bytes, load_u16, load_u32, read_tag, read_u32
from .vr cimport is_long_vr, is_vr

from fastscp.dicom import _header_py as _py


cdef extern from "Python.h":
    # Declared here without Cython's "except? -1.0": _fast_ds() clears the
    # error itself and falls back to the Python twin's conversion.
    double PyOS_string_to_double(const char* s, char** endptr,
                                 PyObject* overflow_exception) noexcept

# Constants of fastscp.dicom._header_py, repeated for C; checked at import below.
cdef enum:
    KIND_STR = 0
    KIND_TEXT = 1
    KIND_PN = 2
    KIND_US = 3
    KIND_IS = 4
    KIND_DS = 5

    ENC_IMPLICIT_LE = 0
    ENC_EXPLICIT_LE = 1
    ENC_EXPLICIT_BE = 2
    ENC_DEFLATED = 3

    ERR_HEADER = 1
    ERR_VALUE = 2
    ERR_ITEM = 3
    ERR_UNCLOSED = 4
    ERR_END = 5
    ERR_NOT_ITEM = 6
    ERR_DELIMITER = 7
    ERR_DEPTH = 8
    ERR_TAG = 9

    MAX_DEPTH = 64
    MAX_FIELDS = 64

    LEVEL_DATASET = 0
    LEVEL_SEQUENCE = 1

    MAP_STRIP = 0
    MAP_TEXT = 1
    MAP_PN = 2
    MAP_LONG_TEXT = 3
    MAP_UR = 4
    MAP_US = 5
    MAP_SS = 6
    MAP_UL = 7
    MAP_SL = 8
    MAP_UV = 9
    MAP_SV = 10
    MAP_FL = 11
    MAP_FD = 12
    MAP_MAX_VALUE = 4096
    MAP_MAX_ELEMENTS = 512
    MAP_MAX_CHARS = 65536
    MAP_STACK = 8192  # bytes of the map built on the stack; a longer one moves to the heap

cdef uint32_t ITEM = 0xFFFEE000u
cdef uint32_t ITEM_DELIMITATION = 0xFFFEE00Du
cdef uint32_t SEQUENCE_DELIMITATION = 0xFFFEE0DDu
cdef uint32_t UNDEFINED_LENGTH = 0xFFFFFFFFu


cdef struct Level:
    int kind
    bint explicit
    bint big
    Py_ssize_t start  # offset of the level's first element or item


cdef struct MapEntry:
    uint32_t tag
    int kind
    Py_ssize_t offset
    Py_ssize_t length


cdef struct ScanResult:
    Py_ssize_t pixel_data_offset  # -1: no pixel data
    # make_error() arguments when the scan fails
    int err
    Py_ssize_t err_pos
    uint32_t err_tag
    Py_ssize_t err_length
    Py_ssize_t err_start


# The kept elements, copied from _py.FIELDS (the single source of truth).
cdef uint32_t _TAGS[MAX_FIELDS]
cdef int _KINDS[MAX_FIELDS]
cdef int _NFIELDS = 0
cdef tuple _NAMES
# The attribute map's kind of each explicit VR ("AA".."ZZ", -1: left out) and,
# for implicit VR, of each tag of the data dictionary (sorted).
cdef signed char _MAP_KIND_OF_VR[26 * 26]
cdef uint32_t* _IMPLICIT_TAGS = NULL
cdef signed char* _IMPLICIT_KINDS = NULL
cdef int _NIMPLICIT = 0


def _load_fields():
    global _NFIELDS, _NAMES
    fields = _py.FIELDS
    if len(fields) > MAX_FIELDS:
        raise ImportError("fastscp.dicom._header_cext: too many FIELDS; raise MAX_FIELDS")
    for slot, (tag, _name, kind) in enumerate(fields):
        _TAGS[slot] = tag
        _KINDS[slot] = kind
        if slot and _TAGS[slot - 1] >= tag:
            raise ImportError("fastscp.dicom._header_cext: FIELDS must be sorted by tag")
    _NFIELDS = len(fields)
    _NAMES = tuple(name for _tag, name, _kind in fields)
    _load_map_kinds()
    # The C constants above must match the Python twin's.
    expected = {
        "KIND_STR": KIND_STR, "KIND_TEXT": KIND_TEXT, "KIND_PN": KIND_PN,
        "KIND_US": KIND_US, "KIND_IS": KIND_IS, "KIND_DS": KIND_DS,
        "ENC_IMPLICIT_LE": ENC_IMPLICIT_LE, "ENC_EXPLICIT_LE": ENC_EXPLICIT_LE,
        "ENC_EXPLICIT_BE": ENC_EXPLICIT_BE, "ENC_DEFLATED": ENC_DEFLATED,
        "ERR_HEADER": ERR_HEADER, "ERR_VALUE": ERR_VALUE, "ERR_ITEM": ERR_ITEM,
        "ERR_UNCLOSED": ERR_UNCLOSED, "ERR_END": ERR_END, "ERR_NOT_ITEM": ERR_NOT_ITEM,
        "ERR_DELIMITER": ERR_DELIMITER, "ERR_DEPTH": ERR_DEPTH, "ERR_TAG": ERR_TAG,
        "MAX_DEPTH": MAX_DEPTH,
        "MAP_STRIP": MAP_STRIP, "MAP_TEXT": MAP_TEXT, "MAP_PN": MAP_PN, "MAP_LONG_TEXT": MAP_LONG_TEXT,
        "MAP_UR": MAP_UR, "MAP_US": MAP_US, "MAP_SS": MAP_SS, "MAP_UL": MAP_UL, "MAP_SL": MAP_SL,
        "MAP_UV": MAP_UV, "MAP_SV": MAP_SV, "MAP_FL": MAP_FL, "MAP_FD": MAP_FD,
        "MAP_MAX_VALUE": MAP_MAX_VALUE, "MAP_MAX_ELEMENTS": MAP_MAX_ELEMENTS, "MAP_MAX_CHARS": MAP_MAX_CHARS,
        "ITEM": ITEM, "ITEM_DELIMITATION": ITEM_DELIMITATION,
        "SEQUENCE_DELIMITATION": SEQUENCE_DELIMITATION, "UNDEFINED_LENGTH": UNDEFINED_LENGTH,
    }
    for name, value in expected.items():
        if getattr(_py, name) != value:
            raise ImportError(f"fastscp.dicom._header_cext: {name} differs from fastscp.dicom._header_py")


def _load_map_kinds():
    global _IMPLICIT_TAGS, _IMPLICIT_KINDS, _NIMPLICIT
    cdef int n
    for n in range(26 * 26):
        _MAP_KIND_OF_VR[n] = -1
    for vr, kind in _py.MAP_KINDS.items():
        _MAP_KIND_OF_VR[(vr[0] - 0x41) * 26 + vr[1] - 0x41] = kind
    implicit = _py.IMPLICIT_MAP_KINDS  # sorted by tag
    _IMPLICIT_TAGS = <uint32_t*>malloc(len(implicit) * sizeof(uint32_t) + 1)
    _IMPLICIT_KINDS = <signed char*>malloc(len(implicit) + 1)
    if _IMPLICIT_TAGS == NULL or _IMPLICIT_KINDS == NULL:
        raise MemoryError()
    for n, (tag, kind) in enumerate(implicit.items()):
        _IMPLICIT_TAGS[n] = tag
        _IMPLICIT_KINDS[n] = kind
    _NIMPLICIT = len(implicit)


_load_fields()


cdef inline int _search(const uint32_t* tags, int count, uint32_t tag) noexcept nogil:
    """Index of `tag` in the sorted `tags`, -1 if absent (binary search)."""
    cdef int lo = 0, hi = count - 1, mid
    if count == 0 or tag < tags[0] or tag > tags[hi]:
        return -1
    while lo <= hi:
        mid = (lo + hi) >> 1
        if tags[mid] < tag:
            lo = mid + 1
        elif tags[mid] > tag:
            hi = mid - 1
        else:
            return mid
    return -1


cdef inline int _implicit_kind(uint32_t tag) noexcept nogil:
    """The map kind of `tag` read in implicit VR, -1 if left out (~3500 tags)."""
    cdef int at = _search(_IMPLICIT_TAGS, _NIMPLICIT, tag)
    return -1 if at < 0 else _IMPLICIT_KINDS[at]


cdef inline int _map_kind(uint32_t tag, bint explicit, unsigned char vr0, unsigned char vr1) noexcept nogil:
    """The map kind of a top-level element that is no FIELDS one, -1 if the map leaves it out."""
    cdef uint32_t group = tag >> 16
    # _py.map_eligible(): not private, not File Meta, not a group length, no item tag
    if (group & 1) or group <= 0x0002 or group >= 0xFFFE or (tag & 0xFFFF) == 0:
        return -1
    if not explicit:
        return _implicit_kind(tag)
    if not is_vr(vr0, vr1):
        return -1
    return _MAP_KIND_OF_VR[(vr0 - 0x41) * 26 + vr1 - 0x41]


cdef inline int _slot_for(uint32_t tag) noexcept nogil:
    """Index into FIELDS of `tag`, -1 if not kept (~35 tags)."""
    return _search(_TAGS, _NFIELDS, tag)


cdef inline int _fail(ScanResult* res, int err, Py_ssize_t pos, uint32_t tag,
                      Py_ssize_t length, Py_ssize_t start) noexcept nogil:
    res.err = err
    res.err_pos = pos
    res.err_tag = tag
    res.err_length = length
    res.err_start = start
    return err


cdef int _scan(const ByteView* view, bint explicit, bint big, bint complete,
               Py_ssize_t* offsets, Py_ssize_t* lengths, MapEntry* entries, int* nentries,
               ScanResult* res) noexcept nogil:
    """Walk the dataset up to Pixel Data; mirrors _header_py.scan() line by line.

    Returns 0, or an ERR_* code with the details in `res`.
    """
    cdef Level stack[MAX_DEPTH]
    cdef int nlevels = 1
    cdef Level* level
    cdef Py_ssize_t n = view.size
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t header
    cdef uint32_t tag = 0, length = 0  # out-parameters of the read_* helpers
    cdef unsigned char vr0, vr1
    cdef bint elem_explicit
    cdef int slot, map_kind

    stack[0].kind = LEVEL_DATASET
    stack[0].explicit = explicit
    stack[0].big = big
    stack[0].start = 0
    res.pixel_data_offset = -1
    res.err = 0

    # Every pass consumes >= 8 bytes or returns: at most n / 8 passes.
    while True:
        level = &stack[nlevels - 1]
        if not read_tag(view, pos, level.big, &tag):
            if pos == n and nlevels == 1:
                if complete:
                    return 0
                return _fail(res, ERR_END, pos, 0, 0, 0)
            if pos == n:
                return _fail(res, ERR_UNCLOSED, pos, 0, 0, level.start)
            return _fail(res, ERR_TAG, pos, 0, 0, 0)

        if level.kind == LEVEL_SEQUENCE:
            if not read_u32(view, pos + 4, level.big, &length):
                return _fail(res, ERR_HEADER, pos, tag, 0, 0)
            if tag == ITEM:
                if length == UNDEFINED_LENGTH:
                    if nlevels >= MAX_DEPTH:
                        return _fail(res, ERR_DEPTH, pos, tag, 0, 0)
                    stack[nlevels].kind = LEVEL_DATASET
                    stack[nlevels].explicit = level.explicit
                    stack[nlevels].big = level.big
                    stack[nlevels].start = pos + 8
                    nlevels += 1
                    pos += 8
                elif length > n - pos - 8:
                    return _fail(res, ERR_ITEM, pos, tag, length, 0)
                else:
                    pos += 8 + <Py_ssize_t>length
            elif tag == SEQUENCE_DELIMITATION:
                nlevels -= 1
                pos += 8
            else:
                return _fail(res, ERR_NOT_ITEM, pos, tag, 0, 0)
            continue

        if (tag >> 16) == 0xFFFE:
            if tag == ITEM_DELIMITATION and nlevels > 1:
                if not has_bytes(view, pos, 8):
                    return _fail(res, ERR_HEADER, pos, tag, 0, 0)
                nlevels -= 1
                pos += 8
                continue
            return _fail(res, ERR_DELIMITER, pos, tag, 0, 0)
        if nlevels == 1 and (tag == 0x7FE00010u or tag == 0x7FE00008u or tag == 0x7FE00009u):
            res.pixel_data_offset = pos
            return 0
        if not has_bytes(view, pos, 8):
            return _fail(res, ERR_HEADER, pos, tag, 0, 0)
        # From here view.data[pos:pos + 8] is in bounds: tag, then VR and a
        # 16-bit length (explicit) or a 32-bit length (implicit).
        vr0 = view.data[pos + 4]
        vr1 = view.data[pos + 5]

        elem_explicit = level.explicit
        if level.explicit:
            # Like pydicom: bytes that are no VR mean this element is implicit,
            # and if it is the first of its dataset, the whole dataset is.
            if not is_vr(vr0, vr1):
                elem_explicit = False
                if pos == level.start:
                    level.explicit = False
        elif pos == 0 and is_vr(vr0, vr1):
            # An explicit dataset sent as implicit: pydicom switches, so do we.
            elem_explicit = True
            level.explicit = True

        if elem_explicit:
            if is_long_vr(vr0, vr1):
                if not read_u32(view, pos + 8, level.big, &length):
                    return _fail(res, ERR_HEADER, pos, tag, 0, 0)
                header = 12
            else:
                length = load_u16(view.data + pos + 6, level.big)
                header = 8
        else:
            length = load_u32(view.data + pos + 4, level.big)
            header = 8

        if length == UNDEFINED_LENGTH:
            # A sequence (or encapsulated data) whose end is found by walking
            # its items.  UN with undefined length is a sequence encoded in
            # Implicit VR Little Endian (PS3.5 6.2.2).
            if nlevels >= MAX_DEPTH:
                return _fail(res, ERR_DEPTH, pos, tag, 0, 0)
            stack[nlevels].kind = LEVEL_SEQUENCE
            stack[nlevels].start = pos
            if elem_explicit and vr0 == 0x55 and vr1 == 0x4E:  # 'UN'
                stack[nlevels].explicit = False
                stack[nlevels].big = False
            else:
                stack[nlevels].explicit = elem_explicit
                stack[nlevels].big = level.big
            nlevels += 1
            pos += header
            continue

        if length > n - pos - header:
            return _fail(res, ERR_VALUE, pos, tag, length, 0)
        if nlevels == 1:
            slot = _slot_for(tag)
            if slot >= 0:
                offsets[slot] = pos + header
                lengths[slot] = length
            elif length <= MAP_MAX_VALUE and nentries[0] < MAP_MAX_ELEMENTS:
                map_kind = _map_kind(tag, elem_explicit, vr0, vr1)
                if map_kind >= 0:
                    entries[nentries[0]].tag = tag
                    entries[nentries[0]].kind = map_kind
                    entries[nentries[0]].offset = pos + header
                    entries[nentries[0]].length = length
                    nentries[0] += 1
        pos += header + <Py_ssize_t>length


# -- building the values ---------------------------------------------------------

cdef inline Py_ssize_t _rstrip_padding(const unsigned char* p, Py_ssize_t length) noexcept nogil:
    """Length without trailing spaces and NULs (DICOM value padding)."""
    while length > 0 and (p[length - 1] == 0x20 or p[length - 1] == 0x00):
        length -= 1
    return length


cdef inline str _latin1(const unsigned char* p, Py_ssize_t length):
    # rstrip(" \0") on bytes equals rstrip on the latin-1 text: 1 byte, 1 char
    return PyUnicode_DecodeLatin1(<const char*>p, _rstrip_padding(p, length), NULL)


cdef inline bint _plain_ascii(const unsigned char* p, Py_ssize_t length,
                              bint allow_backslash) noexcept nogil:
    """No byte >= 0x80 and no ESC: ASCII in every supported character set."""
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(length):
        c = p[i]
        if c >= 0x80 or c == 0x1B or (c == 0x5C and not allow_backslash):
            return False
    return True


cdef inline bint _fast_is(const unsigned char* p, Py_ssize_t length, int64_t* out) noexcept nogil:
    """Parse the common IS form "[ ][+-]digits[ ]"; False: use _py.is_value."""
    cdef Py_ssize_t i = 0, end = _rstrip_padding(p, length), ndigits = 0
    cdef Py_ssize_t j
    cdef bint negative = False
    cdef int64_t value = 0
    for j in range(end):  # first value only
        if p[j] == 0x5C:
            end = j
            break
    while end > 0 and p[end - 1] == 0x20:
        end -= 1
    while i < end and p[i] == 0x20:
        i += 1
    if i < end and (p[i] == 0x2B or p[i] == 0x2D):
        negative = p[i] == 0x2D
        i += 1
    while i < end:
        if not (0x30 <= p[i] <= 0x39) or ndigits == 18:  # 18 digits fit in int64
            return False
        value = value * 10 + (p[i] - 0x30)
        ndigits += 1
        i += 1
    if ndigits == 0:
        return False
    out[0] = -value if negative else value
    return True


cdef inline bint _fast_ds(const unsigned char* p, Py_ssize_t length, double* out) noexcept:
    """Parse the common DS form "[ ]-1024.5e0[ ]"; False: use _py.ds_value.

    Only digits, sign, point and exponent reach PyOS_string_to_double, which
    is what float() calls for them; "nan", "inf" and the rest take the slow
    path, so the answers are float()'s.
    """
    cdef char text[40]
    cdef char* end = NULL
    cdef Py_ssize_t i = 0, j, stop = _rstrip_padding(p, length)
    cdef unsigned char c
    cdef double value
    for j in range(stop):  # first value only
        if p[j] == 0x5C:
            stop = j
            break
    while stop > 0 and p[stop - 1] == 0x20:
        stop -= 1
    while i < stop and p[i] == 0x20:
        i += 1
    if stop - i < 1 or stop - i >= 40:
        return False
    for j in range(i, stop):
        c = p[j]
        if not (0x30 <= c <= 0x39 or c == 0x2E or c == 0x2B or c == 0x2D
                or c == 0x45 or c == 0x65):
            return False
        text[j - i] = <char>c
    text[stop - i] = 0
    value = PyOS_string_to_double(text, &end, NULL)
    if value == -1.0 and PyErr_Occurred():
        PyErr_Clear()
        return False
    if end != text + (stop - i) or not isfinite(value):
        return False
    out[0] = value
    return True


# -- the attribute map (the twin of _py.build_map) ---------------------------------

cdef struct OutBuf:
    char* data
    Py_ssize_t size
    Py_ssize_t cap
    bint heap


cdef int _reserve(OutBuf* out, Py_ssize_t more) except -1:
    cdef Py_ssize_t cap
    cdef char* data
    if out.size + more <= out.cap:
        return 0
    cap = max(out.cap * 2, out.size + more)
    if out.heap:
        data = <char*>realloc(out.data, cap)
    else:
        data = <char*>malloc(cap)
        if data != NULL:
            memcpy(data, out.data, out.size)
    if data == NULL:
        raise MemoryError()
    out.data = data
    out.cap = cap
    out.heap = True
    return 0


cdef inline int _put(OutBuf* out, const char* text, Py_ssize_t n) except -1:
    _reserve(out, n)
    memcpy(out.data + out.size, text, n)
    out.size += n
    return 0


cdef const char* _HEX = b"0123456789abcdef"


cdef int _put_escaped(OutBuf* out, const unsigned char* p, Py_ssize_t n) except -1:
    """ASCII bytes as JSON string content (_py._JSON_ESCAPES)."""
    cdef Py_ssize_t i
    cdef unsigned char c
    cdef char* w
    _reserve(out, 6 * n)  # the longest escape: \u00XX
    w = out.data + out.size
    for i in range(n):
        c = p[i]
        if c == 0x22 or c == 0x5C:
            w[0] = 0x5C
            w[1] = <char>c
            w += 2
        elif c < 0x20:
            w[0] = 0x5C
            w[1] = 0x75  # u
            w[2] = 0x30
            w[3] = 0x30
            w[4] = _HEX[c >> 4]
            w[5] = _HEX[c & 15]
            w += 6
        else:
            w[0] = <char>c
            w += 1
    out.size = w - out.data
    return 0


cdef const char* _UPPER_HEX = b"0123456789ABCDEF"


cdef inline int _put_key(OutBuf* out, uint32_t tag) except -1:
    """'"GGGGEEEE":"' (snprintf costs ~0.1 us, as much as the rest of an entry)."""
    cdef char* w
    cdef int i
    _reserve(out, 12)
    w = out.data + out.size
    w[0] = 0x22
    for i in range(8):
        w[1 + i] = _UPPER_HEX[(tag >> (28 - 4 * i)) & 15]
    w[9] = 0x22
    w[10] = 0x3A
    w[11] = 0x22
    out.size += 12
    return 0


cdef inline int _put_u64(OutBuf* out, uint64_t value, bint negative) except -1:
    """A number in decimal (str(int)), "-" first if `negative`."""
    cdef char text[24]
    cdef int at = 24
    while True:
        at -= 1
        text[at] = <char>(0x30 + value % 10)
        value //= 10
        if value == 0:
            break
    if negative:
        at -= 1
        text[at] = 0x2D
    return _put(out, text + at, 24 - at)


cdef inline bint _is_pad(unsigned char c) noexcept nogil:
    return c == 0x20 or c == 0x00


cdef int _put_text(OutBuf* out, const unsigned char* p, Py_ssize_t n, int kind) except -1:
    """Plain ASCII text as _py.map_json() writes it."""
    cdef Py_ssize_t start = 0, end, stop
    if kind == MAP_LONG_TEXT or kind == MAP_UR:
        _put_escaped(out, p, _rstrip_padding(p, n))
        return 0
    while True:  # one pass per value
        stop = start
        while stop < n and p[stop] != 0x5C:
            stop += 1
        end = stop
        while end > start and _is_pad(p[end - 1]):
            end -= 1
        if kind == MAP_STRIP:
            while start < end and _is_pad(p[start]):
                start += 1
        _put_escaped(out, p + start, end - start)
        if stop == n:
            return 0
        _put(out, b"\\\\", 2)  # the separator, escaped
        start = stop + 1


cdef int _put_numbers(OutBuf* out, const unsigned char* p, Py_ssize_t n, int kind, bint big) except -1:
    """Binary integers in decimal, backslash-separated; nothing if the length is no multiple of their size."""
    cdef int size = 2 if kind == MAP_US or kind == MAP_SS else 4 if kind == MAP_UL or kind == MAP_SL else 8
    cdef Py_ssize_t i
    cdef int64_t signed
    cdef uint64_t wide
    if n % size:
        return 0
    for i in range(0, n, size):
        if i:
            _put(out, b"\\\\", 2)
        if kind == MAP_US:
            _put_u64(out, load_u16(p + i, big), False)
        elif kind == MAP_SS:
            signed = <int16_t>load_u16(p + i, big)
            _put_u64(out, <uint64_t>(-signed if signed < 0 else signed), signed < 0)
        elif kind == MAP_UL:
            _put_u64(out, load_u32(p + i, big), False)
        elif kind == MAP_SL:
            signed = <int32_t>load_u32(p + i, big)
            _put_u64(out, <uint64_t>(-signed if signed < 0 else signed), signed < 0)
        else:
            if big:
                wide = (<uint64_t>load_u32(p + i, True) << 32) | load_u32(p + i + 4, True)
            else:
                wide = (<uint64_t>load_u32(p + i + 4, False) << 32) | load_u32(p + i, False)
            if kind == MAP_SV and <int64_t>wide < 0:
                _put_u64(out, (~wide) + 1, True)  # two's complement: INT64_MIN too
            else:
                _put_u64(out, wide, False)
    return 0


cdef str _build_map(const unsigned char* buf, MapEntry* entries, int nentries, bint big,
                    str specific_character_set):
    cdef char local[MAP_STACK]
    cdef OutBuf out
    cdef int n, kind
    cdef Py_ssize_t mark, value_start, length, extra = 0, piece_size
    cdef const unsigned char* p
    cdef const char* piece
    cdef bint first = True
    cdef str text
    out.data = local
    out.size = 0
    out.cap = MAP_STACK
    out.heap = False
    try:
        _put(&out, b"{", 1)
        for n in range(nentries):
            kind = entries[n].kind
            p = buf + entries[n].offset
            length = entries[n].length
            mark = out.size
            if not first:
                _put(&out, b",", 1)
            _put_key(&out, entries[n].tag)
            value_start = out.size
            if MAP_US <= kind <= MAP_SV:
                _put_numbers(&out, p, length, kind, big)
            elif kind < MAP_US and _plain_ascii(p, length, True):
                _put_text(&out, p, length, kind)
            else:  # FL, FD, text that is not plain ASCII: the Python twin's conversion
                text = _py.map_json(PyBytes_FromStringAndSize(<const char*>p, length), kind, big,
                                    specific_character_set)
                piece = PyUnicode_AsUTF8AndSize(text, &piece_size)
                _put(&out, piece, piece_size)
                extra += piece_size - len(text)  # UTF-8 bytes beyond the characters
            if out.size == value_start:  # an empty value: left out
                out.size = mark
                continue
            _put(&out, b"\"", 1)
            if out.size - extra + 1 > MAP_MAX_CHARS:  # + 1: the closing brace
                out.size = mark
                break
            first = False
        _put(&out, b"}", 1)
        return PyUnicode_DecodeUTF8(out.data, out.size, NULL)
    finally:
        if out.heap:
            free(out.data)


cdef object _build(const unsigned char* buf, Py_ssize_t* offsets, Py_ssize_t* lengths,
                   bint big, Py_ssize_t pixel_data_offset, MapEntry* entries, int nentries):
    cdef dict values = {}
    cdef int slot, kind
    cdef Py_ssize_t offset, length
    cdef const unsigned char* p
    cdef int64_t number = 0
    cdef double decimal = 0.0
    cdef object encodings = None
    cdef object raw
    for slot in range(_NFIELDS):
        offset = offsets[slot]
        if offset < 0:
            continue
        length = lengths[slot]
        p = buf + offset
        kind = _KINDS[slot]
        name = _NAMES[slot]
        if kind == KIND_STR:
            values[name] = _latin1(p, length)
        elif kind == KIND_TEXT or kind == KIND_PN:
            # charset_info() only returns encodings that read plain ASCII as ASCII
            if _plain_ascii(p, length, kind == KIND_PN):
                values[name] = _latin1(p, length)
            else:
                if encodings is None:
                    encodings = _py.charset_info(values.get("specific_character_set", ""))
                raw = PyBytes_FromStringAndSize(<const char*>p, length)
                if kind == KIND_TEXT:
                    values[name] = _py.decode_text(raw, encodings)
                else:
                    values[name] = _py.decode_pn(raw, encodings)
        elif kind == KIND_US:
            # pydicom rejects a length that is not a multiple of 2
            if length >= 2 and length % 2 == 0:
                values[name] = load_u16(p, big)
        elif kind == KIND_IS:
            if _fast_is(p, length, &number):
                values[name] = number
            else:
                values[name] = _py.is_value(PyBytes_FromStringAndSize(<const char*>p, length))
        else:
            if _fast_ds(p, length, &decimal):
                # PERF: 4.3 -> 2.9 us per CT header (bench/test_bench_header.py)
                values[name] = decimal
            else:
                values[name] = _py.ds_value(PyBytes_FromStringAndSize(<const char*>p, length))
            if memchr(p, 92, length) != NULL and name in _ALL_VALUES:  # 92: a backslash
                values[_ALL_VALUES[name]] = _py.all_values(PyBytes_FromStringAndSize(<const char*>p, length))
    values["pixel_data_offset"] = None if pixel_data_offset < 0 else pixel_data_offset
    values["attributes"] = _build_map(buf, entries, nentries, big, values.get("specific_character_set", ""))
    return _HeaderFields(**values)


_HeaderFields = _py.HeaderFields
_ALL_VALUES = _py.ALL_VALUES
_IMPLICIT = _py.IMPLICIT_VR_LITTLE_ENDIAN
_EXPLICIT = _py.EXPLICIT_VR_LITTLE_ENDIAN
_BIG = _py.EXPLICIT_VR_BIG_ENDIAN


def _parse_plain(data, int encoding, bint complete):
    """Scan a dataset that is not deflated (``encoding`` is an ENC_* code)."""
    cdef Py_buffer buffer
    cdef ByteView view
    cdef ScanResult res
    cdef Py_ssize_t offsets[MAX_FIELDS]
    cdef Py_ssize_t lengths[MAX_FIELDS]
    cdef MapEntry entries[MAP_MAX_ELEMENTS]
    cdef int nentries = 0
    cdef int slot
    cdef bint big = encoding == ENC_EXPLICIT_BE
    PyObject_GetBuffer(data, &buffer, PyBUF_SIMPLE)
    try:
        view.data = <const unsigned char*>buffer.buf
        view.size = buffer.len
        for slot in range(_NFIELDS):
            offsets[slot] = -1
            lengths[slot] = -1
        if _scan(&view, encoding != ENC_IMPLICIT_LE, big, complete, offsets, lengths, entries, &nentries,
                 &res):
            raise _py.make_error(res.err, res.err_pos, res.err_tag, res.err_length,
                                 res.err_start, view.size, complete)
        return _build(view.data, offsets, lengths, big, res.pixel_data_offset, entries, nentries)
    finally:
        PyBuffer_Release(&buffer)


def parse_header(data, str transfer_syntax_uid, *, bint complete=True):
    """Extract the indexed attributes from an encoded dataset (compiled).

    See :func:`fastscp.dicom.header.parse_header`, which documents the contract.
    """
    cdef int encoding
    # The common syntaxes without a Python call; the rest (padding, deflate).
    if transfer_syntax_uid == _EXPLICIT:
        encoding = ENC_EXPLICIT_LE
    elif transfer_syntax_uid == _IMPLICIT:
        encoding = ENC_IMPLICIT_LE
    elif transfer_syntax_uid == _BIG:
        encoding = ENC_EXPLICIT_BE
    else:
        encoding = _py.encoding_for(transfer_syntax_uid)
    if encoding == ENC_DEFLATED:
        return _py.parse_deflated(data, complete, _parse_plain)
    return _parse_plain(data, encoding, complete)
