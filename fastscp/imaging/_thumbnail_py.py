"""Pure-Python (numpy) thumbnail renderer: the twin of ``fastscp/imaging/_thumbnail_cext.pyx``.

This module is the reference implementation and holds what both twins share:
the :class:`PixelInfo` type, the output size, the window (from the header, a
caller's override, or an automatic one from percentiles) and the area weights.
The compiled module only re-implements :func:`render`, the pass over the
pixels; it calls :func:`plan` here, so both twins always agree on the
parameters and differ only by float rounding (at most 1 grey level).

One pass from stored values to display values (PS3.3 C.11.2.1.2.1, linear
VOI LUT function)::

    modality value   m = stored * RescaleSlope + RescaleIntercept
    display value    d = clip((m - lo) * 255 / (hi - lo), 0, 255)
                     lo, hi = c - 0.5 -+ (w - 1) / 2  from Window Center/Width

folded into ``d = clip(stored * A + B, 0, 255)``.  Display values are then
area-averaged (each output pixel is the mean of the source area it covers,
with fractional weights at the box edges) and rounded.  Windowing before
averaging is what a viewer shows scaled down; averaging stored values first
would blur clipped edges into grey.  Colour (RGB, YBR_FULL) is scaled from
Bits Stored to 8 bits, averaged per sample, and YBR_FULL is converted to RGB
after averaging: the conversion is affine, so the order only matters for
out-of-gamut pixels, and converting 3 values per output pixel instead of per
source pixel is 16x less work at 512 -> 128.
"""

from __future__ import annotations

from typing import Final

import msgspec
import numpy as np

__all__ = [
    "DEFAULT_SIZE",
    "PixelInfo",
    "Plan",
    "ThumbnailError",
    "plan",
    "render",
    "thumbnail",
]

#: Long side of a thumbnail, pixels.
DEFAULT_SIZE: Final = 128

# Output colour handling (the ``mode`` of a Plan); fastscp/imaging/_thumbnail_cext.pyx repeats
# these numbers and checks them at import.
MODE_MONO: Final = 0
MODE_MONO_INVERTED: Final = 1  # MONOCHROME1: minimum is white
MODE_RGB: Final = 2
MODE_YBR_FULL: Final = 3

# Automatic window when the header has none: these percentiles of the
# modality values of a subsample map to black and white.
AUTO_PERCENTILES: Final = (0.5, 99.5)
# About this many pixels are sampled (a strided grid) for the percentiles.
AUTO_SAMPLES: Final = 16384

_MONOCHROME: Final = {"MONOCHROME1": MODE_MONO_INVERTED, "MONOCHROME2": MODE_MONO}
_COLOUR: Final = {"RGB": MODE_RGB, "YBR_FULL": MODE_YBR_FULL}


class ThumbnailError(ValueError):
    """The pixels cannot be rendered; the message says why (the caller logs it)."""


class PixelInfo(msgspec.Struct, frozen=True, kw_only=True):
    """How to read the values of one decoded frame: Image Pixel and VOI attributes.

    The array layout is given by the array itself (``(rows, columns)`` or,
    for 3 samples, ``(rows, columns, 3)``; ``(3, rows, columns)`` when
    ``planar_configuration`` is 1).  Numbers are None when the element is
    absent.
    """

    photometric_interpretation: str = "MONOCHROME2"
    samples_per_pixel: int = 1
    planar_configuration: int = 0
    #: Bits Stored: bits above it are ignored (they may hold overlays), and
    #: colour samples are scaled from it to 8 bits.  None: the dtype's size.
    bits_stored: int | None = None
    rescale_slope: float | None = None
    rescale_intercept: float | None = None
    window_center: float | None = None
    window_width: float | None = None

    @classmethod
    def from_header(cls, header: object) -> PixelInfo:
        """Build from :class:`fastscp.dicom.header.HeaderFields` (or anything with its names)."""
        return cls(
            photometric_interpretation=getattr(header, "photometric_interpretation", "") or "MONOCHROME2",
            samples_per_pixel=getattr(header, "samples_per_pixel", None) or 1,
            planar_configuration=getattr(header, "planar_configuration", None) or 0,
            bits_stored=getattr(header, "bits_stored", None),
            rescale_slope=getattr(header, "rescale_slope", None),
            rescale_intercept=getattr(header, "rescale_intercept", None),
            window_center=getattr(header, "window_center", None),
            window_width=getattr(header, "window_width", None),
        )


class Plan(msgspec.Struct, frozen=True):
    """Everything :func:`render` needs: the pass itself has no decisions left."""

    pixels: np.ndarray  # C-contiguous, native byte order; 2-D, or (3, rows, columns) when planar
    rows: int
    columns: int
    samples: int  # 1 or 3
    planar: bool
    out_rows: int
    out_columns: int
    scale: float  # A of d = clip(stored * A + B, 0, 255)
    offset: float  # B
    shift: int  # stored = (value << shift) >> shift in the dtype: drops bits above Bits Stored
    mode: int  # MODE_*


def output_size(rows: int, columns: int, size: int | None) -> tuple[int, int]:
    """Rows and columns of the result: the long side `size`, never enlarged."""
    long_side = max(rows, columns)
    if size is None or long_side <= size:
        return rows, columns
    # round half up, never 0: a 1x1000 strip stays one pixel high
    return (max(1, (rows * size + long_side // 2) // long_side),
            max(1, (columns * size + long_side // 2) // long_side))


def _shift_for(dtype: np.dtype, bits_stored: int | None) -> int:
    if dtype.kind not in "iu" or not bits_stored:
        return 0
    bits = dtype.itemsize * 8
    return bits - bits_stored if 0 < bits_stored < bits else 0


def correct_stored(values: np.ndarray, shift: int) -> np.ndarray:
    """Stored values with the bits above Bits Stored dropped (sign-extended if signed).

    PS3.5 8.1.1: those bits are not part of the value; pydicom does the same.
    """
    if not shift:
        return values
    return np.right_shift(np.left_shift(values, shift), shift)


def _window_bounds(center: float, width: float) -> tuple[float, float]:
    """lo, hi of PS3.3 C.11.2.1.2.1 (linear): lo -> black, hi -> white."""
    lo = center - 0.5 - (width - 1) / 2
    hi = center - 0.5 + (width - 1) / 2
    # Width 1 is a step at c - 0.5; keep the slope finite.
    return lo, max(hi, lo + 1e-3)


def auto_window(frame: np.ndarray, shift: int, slope: float, intercept: float) -> tuple[float, float]:
    """lo, hi in modality units from percentiles of a strided subsample.

    The percentiles (:data:`AUTO_PERCENTILES`) ignore a few extreme pixels
    (air, metal, burnt-in text) that would otherwise grey out the image.
    """
    rows, columns = frame.shape[-2:]
    step = max(1, int((rows * columns / AUTO_SAMPLES) ** 0.5))
    sample = correct_stored(np.ascontiguousarray(frame[..., ::step, ::step]), shift)
    if sample.dtype.kind == "f":
        sample = sample[np.isfinite(sample)]
        if not sample.size:
            return 0.0, 1.0
    lo, hi = np.percentile(sample, AUTO_PERCENTILES)
    lo, hi = float(lo) * slope + intercept, float(hi) * slope + intercept
    if slope < 0:
        lo, hi = hi, lo
    if not hi > lo:  # a flat image (or NaNs): black
        hi = lo + 1.0
    return lo, hi


def _native(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype.byteorder not in "=|":  # big endian data (Explicit VR Big Endian)
        pixels = pixels.astype(pixels.dtype.newbyteorder("="))
    if pixels.dtype.kind not in "iuf" or pixels.dtype.itemsize > 8:
        raise ThumbnailError(f"pixel values of type {pixels.dtype} cannot be rendered")
    if pixels.dtype.kind == "f" and pixels.dtype.itemsize < 4:
        pixels = pixels.astype(np.float32)
    return np.ascontiguousarray(pixels)


def plan(
    pixels: np.ndarray,
    info: PixelInfo,
    size: int | None = DEFAULT_SIZE,
    window: tuple[float, float] | None = None,
) -> Plan:
    """Check the frame and work out the output size, window and colour handling.

    Parameters are those of :func:`thumbnail`.

    Raises
    ------
    ThumbnailError
        The photometric interpretation or the array's shape or type is not
        one this renderer knows.
    """
    photometric = info.photometric_interpretation.strip().upper()
    if photometric in _MONOCHROME:
        mode, samples = _MONOCHROME[photometric], 1
    elif photometric in _COLOUR:
        mode, samples = _COLOUR[photometric], 3
    else:
        raise ThumbnailError(f"Photometric Interpretation {photometric!r} is not rendered; decode it to RGB first")
    if size is not None and size < 1:
        raise ThumbnailError(f"size must be at least 1, not {size}")
    pixels = _native(np.asarray(pixels))
    planar = False
    if samples == 1:
        if pixels.ndim != 2:
            raise ThumbnailError(f"a {photometric} frame must be 2-D (rows, columns), not {pixels.shape}")
        rows, columns = pixels.shape
    elif info.planar_configuration == 1 and pixels.ndim == 3 and pixels.shape[0] == 3:
        planar = True
        _, rows, columns = pixels.shape
    elif pixels.ndim == 3 and pixels.shape[2] == 3:
        rows, columns = pixels.shape[:2]
        pixels = pixels.reshape(rows, columns * 3)  # a view: the pass walks samples as one row
    else:
        raise ThumbnailError(f"a {photometric} frame must be (rows, columns, 3) or, planar, (3, rows, columns), "
                             f"not {pixels.shape}")
    if rows < 1 or columns < 1:
        raise ThumbnailError(f"empty frame {pixels.shape}")
    out_rows, out_columns = output_size(rows, columns, size)
    shift = _shift_for(pixels.dtype, info.bits_stored)

    if samples == 3:
        # Colour: Bits Stored -> 8 bits, no window.
        if pixels.dtype.kind == "f":
            bits = 8
        else:
            bits = info.bits_stored if info.bits_stored and info.bits_stored <= pixels.dtype.itemsize * 8 else (
                pixels.dtype.itemsize * 8)
        scale, offset = 255.0 / (2.0**bits - 1.0), 0.0
    else:
        slope = info.rescale_slope if info.rescale_slope else 1.0  # 0 is invalid: ignore
        intercept = info.rescale_intercept or 0.0
        if window is None and info.window_center is not None and info.window_width is not None \
                and info.window_width >= 1:
            window = (info.window_center, info.window_width)
        if window is not None:
            lo, hi = _window_bounds(*window)
        else:
            lo, hi = auto_window(pixels, shift, slope, intercept)
        gain = 255.0 / (hi - lo)
        scale, offset = slope * gain, (intercept - lo) * gain
    return Plan(pixels, rows, columns, samples, planar, out_rows, out_columns, scale, offset, shift, mode)


def axis_weights(source: int, target: int) -> np.ndarray:
    """(target, source) area weights, scaled by `target` so they are integers.

    Output index t covers source coordinates [t * source / target, (t + 1) *
    source / target); a source pixel s weighs its overlap with that interval.
    Multiplied by `target`, every weight is an integer and each row sums to
    `source`, so rounding cannot differ between the twins.
    """
    t = np.arange(target, dtype=np.int64)[:, None]
    s = np.arange(source, dtype=np.int64)[None, :]
    overlap = np.minimum((s + 1) * target, (t + 1) * source) - np.maximum(s * target, t * source)
    return np.clip(overlap, 0, None).astype(np.float64)


def _finish(means: np.ndarray, mode: int) -> np.ndarray:
    """Means in [0, 255] (rows, columns, samples) -> uint8, colour converted."""
    if mode == MODE_YBR_FULL:  # PS3.3 C.7.6.3.1.2, the inverse of its YBR_FULL equations
        y, cb, cr = means[..., 0], means[..., 1] - 128.0, means[..., 2] - 128.0
        means = np.stack((y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb), axis=-1)
    means = np.clip(means, 0.0, 255.0)
    if mode == MODE_MONO_INVERTED:
        means = 255.0 - means
    out = np.floor(means + 0.5).astype(np.uint8)  # round half up, like the C twin
    return out[..., 0] if out.shape[-1] == 1 else out


def _display(stored: np.ndarray, scale: float, offset: float) -> np.ndarray:
    """clip(stored * A + B, 0, 255) in float64; NaN is black, as in the C twin."""
    display = stored.astype(np.float64) * scale + offset
    if stored.dtype.kind == "f":
        display = np.nan_to_num(display, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(display, 0.0, 255.0)


def render(p: Plan) -> np.ndarray:
    """Run a :class:`Plan`: windowed, area-averaged, 8-bit, (rows, columns[, 3])."""
    planes = [p.pixels[c] for c in range(3)] if p.planar else [p.pixels]
    per_plane = 1 if p.planar else p.samples
    means = np.empty((p.out_rows, p.out_columns, p.samples))
    if (p.out_rows, p.out_columns) == (p.rows, p.columns):  # full size: nothing to average
        for c, plane in enumerate(planes):
            display = _display(correct_stored(plane, p.shift), p.scale, p.offset)
            means[..., c : c + per_plane] = display.reshape(p.rows, p.columns, per_plane)
        return _finish(means, p.mode)
    wy = axis_weights(p.rows, p.out_rows)
    wx = axis_weights(p.columns, p.out_columns)
    area = float(p.rows) * float(p.columns)
    for c, plane in enumerate(planes):
        for r in range(p.out_rows):
            # Only the source rows this output row covers: bounded memory for huge frames.
            (ys,) = np.nonzero(wy[r])
            display = _display(correct_stored(plane[ys[0] : ys[-1] + 1], p.shift), p.scale, p.offset)
            summed = wy[r, ys] @ display  # (columns * per_plane,)
            summed = wx @ summed.reshape(p.columns, per_plane)  # (out_columns, per_plane)
            means[r, :, c : c + per_plane] = summed / area
    return _finish(means, p.mode)


def thumbnail(
    pixels: np.ndarray,
    info: PixelInfo,
    size: int | None = DEFAULT_SIZE,
    window: tuple[float, float] | None = None,
) -> np.ndarray:
    """Render one frame as an 8-bit image (pure-Python twin).

    See :func:`fastscp.imaging.thumbnail.thumbnail`, which documents the contract.
    """
    return render(plan(pixels, info, size, window))
