# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled thumbnail pass: the twin of ``fastscp/imaging/_thumbnail_py.py``.

The decisions (output size, window, colour handling) come from
``_py.plan()``, so both twins render with the same parameters; this module
only replaces ``_py.render()``: one pass over the stored values that windows
each one and adds it into a row accumulator, then a short pass per output row
over the accumulator.  The work runs without the GIL.

Per output row ``r``, every source row that the row's box covers is windowed
and added into ``acc`` (one float per source sample), weighted by the share
of the row inside the box; then each output pixel sums its columns of
``acc`` with the same kind of weights.  The inner loop (convert, multiply-add,
clamp, accumulate) has no branches and no indexing but ``x``, so the C
compiler vectorises it.
"""

from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.math cimport fabs, fabsf
from libc.stdlib cimport free, malloc
from libc.string cimport memset

from .pixelrow cimport (
    fastscp_row_i8,
    fastscp_row_i16,
    fastscp_row_i32,
    fastscp_row_u8,
    fastscp_row_u16,
    fastscp_row_u32,
)

import numpy as np

from fastscp.imaging import _thumbnail_py as _py

# Constants of fastscp.imaging._thumbnail_py, repeated for C; checked at import below.
cdef enum:
    MODE_MONO = 0
    MODE_MONO_INVERTED = 1
    MODE_RGB = 2
    MODE_YBR_FULL = 3


def _check_constants():
    expected = {"MODE_MONO": MODE_MONO, "MODE_MONO_INVERTED": MODE_MONO_INVERTED,
                "MODE_RGB": MODE_RGB, "MODE_YBR_FULL": MODE_YBR_FULL}
    for name, value in expected.items():
        if getattr(_py, name) != value:
            raise ImportError(f"fastscp.imaging._thumbnail_cext: {name} differs from fastscp.imaging._thumbnail_py")


_check_constants()


ctypedef fused pixel_t:
    uint8_t
    int8_t
    uint16_t
    int16_t
    uint32_t
    int32_t
    uint64_t
    int64_t
    float
    double


cdef struct Columns:
    # The box of output column j covers source columns first[j]..last[j]
    # (inclusive); the first and last of them only partly, by these weights
    # (share of the source column inside the box, 0..1]; the ones between
    # weigh 1.
    Py_ssize_t* first
    Py_ssize_t* last
    double* first_weight
    double* last_weight


cdef inline Py_ssize_t _min(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return a if a < b else b


cdef inline Py_ssize_t _max(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return a if a > b else b


cdef inline double _overlap(Py_ssize_t s, Py_ssize_t t, Py_ssize_t source, Py_ssize_t target) noexcept nogil:
    """Share of source pixel s inside the box of output pixel t (exact integers, then / target)."""
    return <double>(_min((s + 1) * target, (t + 1) * source) - _max(s * target, t * source)) / target


cdef void _plan_columns(Columns* cols, Py_ssize_t columns, Py_ssize_t out_columns) noexcept nogil:
    cdef Py_ssize_t j, first, last
    for j in range(out_columns):
        first = (j * columns) // out_columns
        last = ((j + 1) * columns + out_columns - 1) // out_columns - 1
        cols.first[j] = first
        cols.last[j] = last
        cols.first_weight[j] = _overlap(first, j, columns, out_columns)
        cols.last_weight[j] = _overlap(last, j, columns, out_columns)


cdef inline void _accumulate_row(const pixel_t* row, Py_ssize_t n, float scale, float offset,
                                 int shift, float weight, float* acc) noexcept nogil:
    """acc[x] += weight * (2 * clip(stored(row[x]) * scale + offset, 0, 255) - 255).

    The accumulator holds display values doubled and centred on 0.  The
    common types run the C loops of pixelrow.pxd.
    """
    cdef Py_ssize_t x
    cdef float v
    # PERF: 512x512 uint16 (12 bits stored) -> 128, whole call: the row loop
    # in Cython with two ternary clamps 124 us, with |v| - |v - 255| 98 us,
    # in C with a mask instead of shifts and an AVX2 clone 62 us (then 52 us
    # with the whole-box column sum below; bench/test_bench_thumbnail.py).
    if pixel_t is uint16_t:
        fastscp_row_u16(row, n, scale, offset, shift, weight, acc)
    elif pixel_t is int16_t:
        fastscp_row_i16(row, n, scale, offset, shift, weight, acc)
    elif pixel_t is uint8_t:
        fastscp_row_u8(row, n, scale, offset, shift, weight, acc)
    elif pixel_t is int8_t:
        fastscp_row_i8(row, n, scale, offset, shift, weight, acc)
    elif pixel_t is uint32_t:
        fastscp_row_u32(row, n, scale, offset, shift, weight, acc)
    elif pixel_t is int32_t:
        fastscp_row_i32(row, n, scale, offset, shift, weight, acc)
    elif pixel_t is float or pixel_t is double:
        # NaN must become black as in the twin (|NaN| would spread to the box).
        for x in range(n):
            v = <float>row[x] * scale + offset
            v = v if v > 0.0 else 0.0
            v = v if v < 255.0 else 255.0
            acc[x] += weight * (v + v - 255.0)
    else:  # 64-bit integers: rare enough for the plain loop
        for x in range(n):
            if shift:
                v = <float>(<pixel_t>(row[x] << shift) >> shift) * scale + offset
            else:
                v = <float>row[x] * scale + offset
            acc[x] += weight * (fabsf(v) - fabsf(v - 255.0))


cdef void _row_means(const pixel_t* data, Py_ssize_t r, Py_ssize_t rows, Py_ssize_t columns, int per_pixel,
                     float scale, float offset, int shift, Py_ssize_t out_rows, Py_ssize_t out_columns,
                     const Columns* cols, float* acc, double* out, int channels) noexcept nogil:
    """Means in [0, 255] of output row r of one plane (per_pixel interleaved samples).

    out[j * channels + c] receives sample c of output pixel j.
    """
    cdef Py_ssize_t n = columns * per_pixel
    cdef Py_ssize_t y, y_first, y_last, j, k, first, last, step
    cdef int c
    cdef double total
    cdef float middle
    # Weights are shares of a source pixel, so a box weighs rows/out_rows x
    # columns/out_columns; acc holds 2 d - 255 (see _accumulate_row).
    cdef double half_inv_area = 0.5 * (<double>out_rows * out_columns) / (<double>rows * columns)
    memset(acc, 0, n * sizeof(float))
    y_first = (r * rows) // out_rows
    y_last = ((r + 1) * rows + out_rows - 1) // out_rows - 1
    for y in range(y_first, y_last + 1):
        _accumulate_row(data + y * n, n, scale, offset, shift, <float>_overlap(y, r, rows, out_rows), acc)
    if out_columns == columns:  # full width: nothing to sum (dcm2jpg at full size)
        if per_pixel == channels:
            for k in range(n):
                out[k] = acc[k] * half_inv_area + 127.5
        else:
            for j in range(out_columns):
                out[j * channels] = acc[j] * half_inv_area + 127.5
        return
    if per_pixel == 1 and columns % out_columns == 0:
        # PERF: a whole number of columns per box (512 -> 128): no weights;
        # 62 -> 53 us for the whole 512x512 -> 128 call.
        step = columns // out_columns
        for j in range(out_columns):
            middle = 0.0
            for k in range(j * step, j * step + step):
                middle += acc[k]
            out[j * channels] = middle * half_inv_area + 127.5
        return
    if per_pixel == 1:  # grey, or one plane: no sample stride
        for j in range(out_columns):
            first = cols.first[j]
            last = cols.last[j]
            middle = 0.0
            for k in range(first + 1, last):
                middle += acc[k]
            total = acc[first] * cols.first_weight[j]
            if last != first:
                total += middle + acc[last] * cols.last_weight[j]
            out[j * channels] = total * half_inv_area + 127.5
        return
    for j in range(out_columns):
        first = cols.first[j]
        last = cols.last[j]
        for c in range(per_pixel):
            total = acc[first * per_pixel + c] * cols.first_weight[j]
            if last != first:
                for k in range(first + 1, last):
                    total += acc[k * per_pixel + c]
                total += acc[last * per_pixel + c] * cols.last_weight[j]
            out[j * channels + c] = total * half_inv_area + 127.5


cdef inline uint8_t _round_u8(double v) noexcept nogil:
    """Clamp to [0, 255] and round half up; v is never NaN (_accumulate_row sees to it)."""
    # PERF: compares here became branches that noisy images mispredict:
    # 512x512 at full size (size=None) took 1060 us, 198 us with fabs.
    return <uint8_t><int>(0.5 * (fabs(v) - fabs(v - 255.0) + 255.0) + 0.5)


cdef void _finish(const double* means, Py_ssize_t pixels, int channels, int mode, uint8_t* out) noexcept nogil:
    cdef Py_ssize_t i
    cdef double y, cb, cr
    if mode == MODE_YBR_FULL:
        # PS3.3 C.7.6.3.1.2: the inverse of the YBR_FULL equations.
        for i in range(pixels):
            y = means[3 * i]
            cb = means[3 * i + 1] - 128.0
            cr = means[3 * i + 2] - 128.0
            out[3 * i] = _round_u8(y + 1.402 * cr)
            out[3 * i + 1] = _round_u8(y - 0.344136 * cb - 0.714136 * cr)
            out[3 * i + 2] = _round_u8(y + 1.772 * cb)
    elif mode == MODE_MONO_INVERTED:
        for i in range(pixels):
            out[i] = _round_u8(255.0 - means[i])
    else:
        for i in range(pixels * channels):
            out[i] = _round_u8(means[i])


def _render(const pixel_t[:, ::1] pixels, Py_ssize_t rows, Py_ssize_t columns, int samples, bint planar,
            Py_ssize_t out_rows, Py_ssize_t out_columns, float scale, float offset, int shift, int mode):
    """The pass over one 2-D C-contiguous array: (rows, columns * samples), or the 3 planes stacked."""
    cdef int per_pixel = 1 if planar else samples
    cdef int channel
    cdef Py_ssize_t r
    cdef Columns cols
    cdef float* acc = NULL
    cdef double* means = NULL  # one output row: a whole-image buffer costs page faults
    cdef const pixel_t* base = &pixels[0, 0]
    cdef uint8_t[:, :, ::1] view
    out = np.empty((out_rows, out_columns, samples), dtype=np.uint8)
    view = out
    cols.first = <Py_ssize_t*>malloc(out_columns * sizeof(Py_ssize_t))
    cols.last = <Py_ssize_t*>malloc(out_columns * sizeof(Py_ssize_t))
    cols.first_weight = <double*>malloc(out_columns * sizeof(double))
    cols.last_weight = <double*>malloc(out_columns * sizeof(double))
    acc = <float*>malloc(columns * per_pixel * sizeof(float))
    means = <double*>malloc(out_columns * samples * sizeof(double))
    try:
        if (cols.first == NULL or cols.last == NULL or cols.first_weight == NULL
                or cols.last_weight == NULL or acc == NULL or means == NULL):
            raise MemoryError()
        with nogil:
            _plan_columns(&cols, columns, out_columns)
            for r in range(out_rows):
                if planar:  # the 3 planes of this output row, then YBR -> RGB can see all samples
                    for channel in range(samples):
                        _row_means(base + channel * rows * columns, r, rows, columns, 1, scale, offset, shift,
                                   out_rows, out_columns, &cols, acc, means + channel, samples)
                else:
                    _row_means(base, r, rows, columns, per_pixel, scale, offset, shift,
                               out_rows, out_columns, &cols, acc, means, samples)
                _finish(means, out_columns, samples, mode, &view[r, 0, 0])
    finally:
        free(cols.first)
        free(cols.last)
        free(cols.first_weight)
        free(cols.last_weight)
        free(acc)
        free(means)
    return out[:, :, 0] if samples == 1 else out


def render(p):
    """Run a ``_py.Plan`` (compiled); see ``fastscp.imaging._thumbnail_py.render``."""
    pixels = p.pixels
    if p.planar:
        pixels = pixels.reshape(p.samples * p.rows, p.columns)
    return _render(pixels, p.rows, p.columns, p.samples, p.planar, p.out_rows, p.out_columns,
                   p.scale, p.offset, p.shift, p.mode)


def thumbnail(pixels, info, size=_py.DEFAULT_SIZE, window=None):
    """Render one frame as an 8-bit image (compiled).

    See :func:`fastscp.imaging.thumbnail.thumbnail`, which documents the contract.
    """
    return render(_py.plan(pixels, info, size, window))
