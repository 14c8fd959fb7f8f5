# Value Representations as the scan loops see them (PS3.5 section 7.1.2), shared by the cext modules.
#
# The Python twins' tables (fastscp.dicom._header_py.LONG_VRS) say the same; each
# compiled module checks that at import.


cdef inline bint is_vr(unsigned char b0, unsigned char b1) noexcept nogil:
    """Two upper-case letters: where an explicit VR stands (whether it is a known one is the caller's check)."""
    return 0x41 <= b0 <= 0x5A and 0x41 <= b1 <= 0x5A


cdef inline bint is_long_vr(unsigned char b0, unsigned char b1) noexcept nogil:
    """OB OD OF OL OV OW SQ SV UC UN UR UT UV (PS3.5 table 7.1-1): 2 reserved bytes and a 32-bit length."""
    if b0 == 0x4F:  # O
        return b1 == 0x42 or b1 == 0x44 or b1 == 0x46 or b1 == 0x4C or b1 == 0x56 or b1 == 0x57
    if b0 == 0x53:  # S
        return b1 == 0x51 or b1 == 0x56
    if b0 == 0x55:  # U
        return b1 == 0x43 or b1 == 0x4E or b1 == 0x52 or b1 == 0x54 or b1 == 0x56
    return False
