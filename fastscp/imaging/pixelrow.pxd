# The hot row loop of fastscp/imaging/_thumbnail_cext.pyx, in C for each integer sample type.
#
#   acc[x] += weight * (|v| - |v - 255|),   v = stored(row[x]) * scale + offset
#
# |v| - |v - 255| is 2 * clip(v, 0, 255) - 255 for finite v, without the
# compare-and-select that gcc makes of a clamp (no maxps without
# -ffinite-math-only).  stored() drops the bits above Bits Stored (PS3.5
# 8.1.1): a mask for unsigned types, a shift pair (sign extension) for
# signed ones.  On x86-64 with glibc, gcc also compiles an AVX2 clone of each
# loop and picks it at load time where the CPU has AVX2 (ifunc); elsewhere
# the plain -O3 (SSE2) build runs.  Integer inputs only: v is always finite.

from libc.stdint cimport int8_t, int16_t, int32_t, uint8_t, uint16_t, uint32_t


cdef extern from *:
    """
    #include <math.h>
    #include <stdint.h>
    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
    #  define FASTSCP_CLONES __attribute__((target_clones("avx2", "default")))
    #else
    #  define FASTSCP_CLONES
    #endif

    #define FASTSCP_ROW(NAME, T, STORED)                                          \\
    FASTSCP_CLONES static void NAME(const T* __restrict row, Py_ssize_t n,       \\
            float scale, float offset, int shift, float weight,                   \\
            float* __restrict acc) {                                              \\
        Py_ssize_t x;                                                             \\
        if (shift) {                                                              \\
            for (x = 0; x < n; x++) {                                             \\
                float v = (float)(STORED) * scale + offset;                       \\
                acc[x] += weight * (fabsf(v) - fabsf(v - 255.0f));                \\
            }                                                                     \\
        } else {                                                                  \\
            for (x = 0; x < n; x++) {                                             \\
                float v = (float)row[x] * scale + offset;                         \\
                acc[x] += weight * (fabsf(v) - fabsf(v - 255.0f));                \\
            }                                                                     \\
        }                                                                         \\
    }

    FASTSCP_ROW(fastscp_row_u8, uint8_t, (uint8_t)(row[x] & (0xFFu >> shift)))
    FASTSCP_ROW(fastscp_row_i8, int8_t, (int8_t)(uint8_t)((uint8_t)row[x] << shift) >> shift)
    FASTSCP_ROW(fastscp_row_u16, uint16_t, (uint16_t)(row[x] & (0xFFFFu >> shift)))
    FASTSCP_ROW(fastscp_row_i16, int16_t, (int16_t)(uint16_t)((uint16_t)row[x] << shift) >> shift)
    FASTSCP_ROW(fastscp_row_u32, uint32_t, row[x] & (0xFFFFFFFFu >> shift))
    FASTSCP_ROW(fastscp_row_i32, int32_t, (int32_t)((uint32_t)row[x] << shift) >> shift)
    """
    void fastscp_row_u8(const uint8_t* row, Py_ssize_t n, float scale, float offset, int shift,
                        float weight, float* acc) noexcept nogil
    void fastscp_row_i8(const int8_t* row, Py_ssize_t n, float scale, float offset, int shift,
                        float weight, float* acc) noexcept nogil
    void fastscp_row_u16(const uint16_t* row, Py_ssize_t n, float scale, float offset, int shift,
                         float weight, float* acc) noexcept nogil
    void fastscp_row_i16(const int16_t* row, Py_ssize_t n, float scale, float offset, int shift,
                         float weight, float* acc) noexcept nogil
    void fastscp_row_u32(const uint32_t* row, Py_ssize_t n, float scale, float offset, int shift,
                         float weight, float* acc) noexcept nogil
    void fastscp_row_i32(const int32_t* row, Py_ssize_t n, float scale, float offset, int shift,
                         float weight, float* acc) noexcept nogil
