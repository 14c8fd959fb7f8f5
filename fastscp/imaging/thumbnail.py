"""Thumbnails: one frame's stored values in, a small 8-bit image out.

The pass runs in the compiled module ``fastscp.imaging._thumbnail_cext`` (built from
``fastscp/imaging/_thumbnail_cext.pyx``) unless the environment sets
``FASTSCP_NO_EXTENSIONS=1`` or the module is not built; then the numpy twin
``fastscp.imaging._thumbnail_py`` runs, with the same results to within one grey
level.  :data:`BACKEND` tells which one :func:`thumbnail` uses.

Example
-------
>>> image = make_thumbnail("CT000001.dcm")  # doctest: +SKIP
>>> write_thumbnail("CT000001.dcm", "CT000001.jpg", size=128)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Final

import numpy as np

from fastscp.dicom.backend import NO_EXTENSIONS, compiled
from fastscp.imaging._thumbnail_py import DEFAULT_SIZE, PixelInfo, ThumbnailError
from fastscp.imaging._thumbnail_py import thumbnail as thumbnail_py
from fastscp.imaging.frames import DEFAULT_QUALITY, DecodeError, NoPixelData, decode_frame, encode_jpeg
from fastscp.storage.files import BROWSABLE, FileModes, write_atomic
from fastscp.storage.reserved import THUMBNAILS

__all__ = [
    "NO_EXTENSIONS",
    "BACKEND",
    "DEFAULT_SIZE",
    "DecodeError",
    "NoPixelData",
    "PixelInfo",
    "ThumbnailError",
    "make_thumbnail",
    "thumbnail",
    "thumbnail_cext",
    "thumbnail_path",
    "thumbnail_py",
    "try_write_thumbnail",
    "write_thumbnail",
]

log = logging.getLogger("fastscp.thumbnail")

Thumbnail = Callable[..., np.ndarray]

#: The compiled pass; None if not built or if FASTSCP_NO_EXTENSIONS=1 (then
#: it is not even imported).
thumbnail_cext: Thumbnail | None = compiled("fastscp.imaging._thumbnail_cext", "thumbnail")

#: "cext" or "py": the implementation behind :func:`thumbnail`.
BACKEND: Final = "cext" if thumbnail_cext is not None else "py"

_thumbnail: Thumbnail = thumbnail_cext or thumbnail_py

def thumbnail(
    pixels: np.ndarray,
    info: PixelInfo,
    size: int | None = DEFAULT_SIZE,
    window: tuple[float, float] | None = None,
) -> np.ndarray:
    """Render one decoded frame as an 8-bit image, scaled down by area averaging.

    Parameters
    ----------
    pixels : numpy.ndarray
        Stored values of one frame (8/16/32-bit integers, signed or not, or
        floats), as decoded: ``(rows, columns)`` for MONOCHROME1/2,
        ``(rows, columns, 3)`` for RGB and YBR_FULL, or ``(3, rows,
        columns)`` when ``info.planar_configuration`` is 1.  Any byte order.
    info : PixelInfo
        Photometric Interpretation, Bits Stored, Rescale Slope/Intercept and
        Window Center/Width of the frame (:meth:`PixelInfo.from_header`).
    size : int or None, optional
        Long side of the result in pixels (default 128); the aspect ratio is
        kept and an image is never enlarged.  None: full size.
    window : (center, width), optional
        Overrides the header's window (modality units, PS3.3 C.11.2.1.2).

    Returns
    -------
    numpy.ndarray
        uint8, ``(rows, columns)`` for monochrome or ``(rows, columns, 3)``
        RGB for colour.

    Raises
    ------
    ThumbnailError
        Unknown photometric interpretation, or an array shape or type that
        does not match it.

    Notes
    -----
    Monochrome: stored values (bits above Bits Stored dropped) are rescaled
    to modality values and windowed with the linear VOI LUT function: the
    header's first Window Center/Width, else the 0.5th and 99.5th
    percentiles of a subsample.  MONOCHROME1 is inverted.  Colour is scaled
    from Bits Stored to 8 bits; YBR_FULL becomes RGB.  Each output pixel is
    the mean of the display values of the source area it covers.
    """
    return _thumbnail(pixels, info, size, window)


def make_thumbnail(
    path: str | os.PathLike[str],
    size: int | None = DEFAULT_SIZE,
    *,
    frame: int | None = None,
    window: tuple[float, float] | None = None,
) -> np.ndarray:
    """Thumbnail of a DICOM file: its middle frame (or `frame`), rendered.

    Parameters
    ----------
    path : str or PathLike
        A DICOM Part 10 file, in any transfer syntax pydicom's installed
        plugins can decode.
    size, window
        As for :func:`thumbnail`.
    frame : int, optional
        0-based frame number; default the middle one.

    Returns
    -------
    numpy.ndarray
        uint8 ``(rows, columns)`` or ``(rows, columns, 3)``.

    Raises
    ------
    ThumbnailError
        Including :class:`DecodeError` and :class:`NoPixelData`: the
        message says why there is no image.
    """
    decoded = decode_frame(path, frame)
    return thumbnail(decoded.pixels, decoded.info, size, window)


def write_thumbnail(
    dicom_path: str | os.PathLike[str],
    jpeg_path: str | os.PathLike[str],
    size: int | None = DEFAULT_SIZE,
    *,
    quality: int = DEFAULT_QUALITY,
    modes: FileModes = BROWSABLE,
) -> str:
    """Write a JPEG thumbnail of a DICOM file, atomically (temp file + rename), with `modes`.

    Returns `jpeg_path`.  Raises :class:`ThumbnailError` as
    :func:`make_thumbnail` does (no file is written then).
    """
    write_atomic(jpeg_path, encode_jpeg(make_thumbnail(dicom_path, size), quality), modes=modes)
    return os.fspath(jpeg_path)


def try_write_thumbnail(
    dicom_path: str | os.PathLike[str],
    jpeg_path: str | os.PathLike[str],
    size: int | None = DEFAULT_SIZE,
    modes: FileModes = BROWSABLE,
) -> str | None:
    """:func:`write_thumbnail` for a post-store stage: logs the reason and returns None on failure.

    An image that cannot be rendered is normal (SR, unsupported
    compression) and logged at INFO; a failure to write the JPEG is a
    WARNING.  Never raises for either.
    """
    try:
        return write_thumbnail(dicom_path, jpeg_path, size, modes=modes)
    except ThumbnailError as exc:
        log.info("no thumbnail for %s: %s", dicom_path, exc)
    except OSError as exc:
        log.warning("thumbnail of %s not written to %s: %s", dicom_path, jpeg_path, exc)
    return None


def thumbnail_path(storage_root: str | os.PathLike[str], relative_path: str) -> str:
    """Where the thumbnail of a stored file goes: ``<root>/thumbnails/<relative path>.jpg``.

    The thumbnail tree mirrors the storage layout (:func:`mirror_jpeg_path`).

    Raises
    ------
    ValueError
        `relative_path` is absolute or leaves the storage root.
    """
    return mirror_jpeg_path(os.path.join(os.fspath(storage_root), THUMBNAILS), relative_path)


def mirror_jpeg_path(folder: str | os.PathLike[str], relative_path: str) -> str:
    """``<folder>/<relative path>`` with ``.dcm`` replaced by ``.jpg`` (other names get ``.jpg`` appended).

    Raises
    ------
    ValueError
        `relative_path` is absolute or leaves `folder`.
    """
    parts = relative_path.replace("\\", "/").split("/")
    if os.path.isabs(relative_path) or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"not a relative path inside the storage root: {relative_path!r}")
    name = parts[-1]
    parts[-1] = (name[:-4] if name.lower().endswith(".dcm") else name) + ".jpg"
    return os.path.join(os.fspath(folder), *parts)
