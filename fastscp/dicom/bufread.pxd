# Bounds-checked reads from a byte buffer, shared by the cext modules.
#
# Every read of encoded data in cext/ goes through these helpers: each checks
# that the bytes it loads lie inside the buffer and reports failure instead of
# reading past the end, so that garbage lengths in untrusted DICOM data can
# never turn into an out-of-bounds read.  They are inline and branch-light, so
# the check costs next to nothing in the hot loops.

from libc.stdint cimport uint16_t, uint32_t


ctypedef struct ByteView:
    const unsigned char* data
    Py_ssize_t size


cdef inline bint has_bytes(const ByteView* view, Py_ssize_t pos, Py_ssize_t count) noexcept nogil:
    """True if view.data[pos:pos + count] lies inside the buffer."""
    # Written as subtractions: pos + count could overflow for huge lengths.
    return 0 <= pos <= view.size and 0 <= count <= view.size - pos


cdef inline uint16_t load_u16(const unsigned char* p, bint big) noexcept nogil:
    """Unchecked 16-bit load; callers check bounds first (see read_u16)."""
    if big:
        return <uint16_t>((<uint16_t>p[0] << 8) | p[1])
    return <uint16_t>(p[0] | (<uint16_t>p[1] << 8))


cdef inline uint32_t load_u32(const unsigned char* p, bint big) noexcept nogil:
    """Unchecked 32-bit load; callers check bounds first (see read_u32)."""
    if big:
        return ((<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16)
                | (<uint32_t>p[2] << 8) | <uint32_t>p[3])
    return (<uint32_t>p[0] | (<uint32_t>p[1] << 8)
            | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24))


cdef inline bint read_u8(const ByteView* view, Py_ssize_t pos, unsigned char* out) noexcept nogil:
    if not has_bytes(view, pos, 1):
        return False
    out[0] = view.data[pos]
    return True


cdef inline bint read_u16(const ByteView* view, Py_ssize_t pos, bint big, uint16_t* out) noexcept nogil:
    if not has_bytes(view, pos, 2):
        return False
    out[0] = load_u16(view.data + pos, big)
    return True


cdef inline bint read_u32(const ByteView* view, Py_ssize_t pos, bint big, uint32_t* out) noexcept nogil:
    if not has_bytes(view, pos, 4):
        return False
    out[0] = load_u32(view.data + pos, big)
    return True


cdef inline bint read_tag(const ByteView* view, Py_ssize_t pos, bint big, uint32_t* out) noexcept nogil:
    """A DICOM tag: group then element, each 16 bits in the byte order."""
    if not has_bytes(view, pos, 4):
        return False
    out[0] = ((<uint32_t>load_u16(view.data + pos, big) << 16)
              | load_u16(view.data + pos + 2, big))
    return True
