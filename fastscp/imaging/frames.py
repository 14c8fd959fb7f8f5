"""Pixels in and out: one frame of a DICOM file as an array, 8-bit images as JPEG.

Decoding reads one frame, not the whole object.  Uncompressed pixel data
(Implicit/Explicit VR Little Endian, Explicit VR Big Endian) in the layouts
the thumbnail pass knows is read straight from the file: the header comes
from fastscp's own scan (:func:`fastscp.dicom.header.parse_header`), the frame is
one ``read()`` at its offset.  Everything else (JPEG, JPEG-LS, JPEG 2000,
RLE, deflate, 1-bit, palette colour, YBR_FULL_422) goes through pydicom's
pixel decoders with the plugins installed from PyPI (pylibjpeg with its
libjpeg, openjpeg and RLE plugins, and pydicom's own RLE decoder).  A frame
that cannot be decoded raises :class:`DecodeError` with the reason; callers
log it and go on.

JPEG encoding uses Pillow, or Pillow-SIMD where it is installed in its
place: :data:`PILLOW_FLAVOUR` says which.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import struct
import warnings
from typing import Final, NamedTuple

import numpy as np
import PIL
from PIL import Image

from fastscp.dicom.header import HeaderError, HeaderFields, read_header_from
from fastscp.imaging._thumbnail_py import PixelInfo, ThumbnailError
from fastscp.storage.files import RECYCLE_MIN_BYTES, give_back_pages

__all__ = [
    "PILLOW_FLAVOUR",
    "PILLOW_VERSION",
    "DecodeError",
    "Frame",
    "NoPixelData",
    "decode_frame",
    "encode_jpeg",
    "read_header",
]


def _pillow_flavour() -> str:
    """"pillow-simd" when the installed PIL is Pillow-SIMD's, else "pillow".

    Both distributions install the same ``PIL`` package and the last one
    installed wins, so the metadata of Pillow-SIMD alone is not proof: its
    version must also be the one PIL reports.
    """
    try:
        simd = importlib.metadata.version("Pillow-SIMD")
    except importlib.metadata.PackageNotFoundError:
        return "pillow"
    return "pillow-simd" if simd == PIL.__version__ else "pillow"


# PIL imports its JPEG and PNG plugins on the first save; do it now, so the
# processes forked from the supervisor (post-store, workers) have them.
Image.preinit()

#: "pillow-simd" or "pillow": which PIL encodes JPEG (and resizes, where used).
PILLOW_FLAVOUR: Final[str] = _pillow_flavour()
#: The installed PIL's version, e.g. "12.1.1.post0" for Pillow-SIMD.
PILLOW_VERSION: Final[str] = PIL.__version__

#: JPEG quality of thumbnails and exports (Pillow's scale, 1-95).
DEFAULT_QUALITY: Final = 90


class DecodeError(ThumbnailError):
    """A frame of the file cannot be read or decoded; the message says why."""


class NoPixelData(DecodeError):
    """The object has no Pixel Data (an SR, a presentation state, ...)."""


class Frame(NamedTuple):
    """One decoded frame and how to read its values."""

    pixels: np.ndarray  # (rows, columns), (rows, columns, 3) or, planar, (3, rows, columns)
    info: PixelInfo  # describes `pixels` as decoded (e.g. RGB after a YBR JPEG)
    index: int  # 0-based frame number
    number_of_frames: int
    header: HeaderFields


# -- reading the file ---------------------------------------------------------------

_NATIVE: Final = {
    "1.2.840.10008.1.2": "<",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1": "<",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2": ">",  # Explicit VR Big Endian (retired, still sent)
}
_FAST_PHOTOMETRIC: Final = frozenset({"MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL"})
_PIXEL_DATA_LE: Final = b"\xe0\x7f\x10\x00"
_PIXEL_DATA_BE: Final = b"\x7f\xe0\x00\x10"
_UNDEFINED_LENGTH: Final = 0xFFFFFFFF


def read_header(path: str | os.PathLike[str]) -> tuple[HeaderFields, str, int]:
    """The indexed attributes of a Part 10 file, without reading its pixel data
    (:func:`fastscp.dicom.header.read_header_from`).

    Returns
    -------
    tuple
        (HeaderFields, Transfer Syntax UID, offset of the dataset in the
        file); ``HeaderFields.pixel_data_offset`` is relative to that offset.

    Raises
    ------
    DecodeError
        Not a Part 10 file, or a header fastscp cannot parse.
    """
    with open(path, "rb") as f:
        try:
            header = read_header_from(f)
        except HeaderError as exc:
            raise DecodeError(f"header: {exc}") from None
        except ValueError as exc:  # not Part 10
            raise DecodeError(str(exc)) from None
    return header.fields, header.transfer_syntax_uid, header.dataset_offset


def _native_dtype(fields: HeaderFields, byte_order: str) -> np.dtype | None:
    kinds = {8: "1", 16: "2", 32: "4"}
    if fields.bits_allocated not in kinds:
        return None  # 1-bit (packed) and others: pydicom unpacks them
    sign = "i" if fields.pixel_representation == 1 else "u"
    return np.dtype(f"{byte_order}{sign}{kinds[fields.bits_allocated]}")


def _read_native(path: str | os.PathLike[str], fields: HeaderFields, transfer_syntax: str,
                 start: int, index: int | None) -> Frame | None:
    """The frame read straight from the file, or None to let pydicom do it."""
    byte_order = _NATIVE.get(transfer_syntax)
    photometric = fields.photometric_interpretation.strip().upper()
    samples = fields.samples_per_pixel or 1
    if (byte_order is None or fields.pixel_data_offset is None or photometric not in _FAST_PHOTOMETRIC
            or samples != (1 if photometric.startswith("MONOCHROME") else 3)
            or not fields.rows or not fields.columns):
        return None
    dtype = _native_dtype(fields, byte_order)
    if dtype is None or (byte_order == ">" and dtype.itemsize == 1):
        # 8-bit data in Big Endian is usually OW: its bytes are swapped in
        # pairs (PS3.5 A.3); pydicom knows the cases.
        return None
    frames = max(1, fields.number_of_frames or 1)
    index = frames // 2 if index is None else index
    if not 0 <= index < frames:
        raise DecodeError(f"frame {index} requested; the object has {frames}")
    frame_bytes = fields.rows * fields.columns * samples * dtype.itemsize
    with open(path, "rb") as f:
        f.seek(start + fields.pixel_data_offset)
        head = f.read(12)
        if head[:4] != (_PIXEL_DATA_BE if byte_order == ">" else _PIXEL_DATA_LE):
            return None  # Float / Double Float Pixel Data
        if head[4:6] in (b"OB", b"OW", b"UN"):  # explicit VR: 2 reserved bytes, 32-bit length
            (length,) = struct.unpack_from(byte_order + "I", head, 8)
            value = start + fields.pixel_data_offset + 12
        else:
            (length,) = struct.unpack_from(byte_order + "I", head, 4)
            value = start + fields.pixel_data_offset + 8
        if length == _UNDEFINED_LENGTH:
            return None  # encapsulated data in a native syntax: let pydicom judge
        if length < frame_bytes * (index + 1):
            raise DecodeError(f"Pixel Data holds {length} bytes, frame {index} needs {frame_bytes * (index + 1)}")
        f.seek(value + frame_bytes * index)
        data = f.read(frame_bytes)
        if value + length >= RECYCLE_MIN_BYTES:
            # PERF: a stored image is read once (its thumbnail); its pages are the next read's.
            give_back_pages(f.fileno())
    if len(data) < frame_bytes:
        raise DecodeError(f"file truncated: frame {index} has {len(data)} of {frame_bytes} bytes")
    pixels = np.frombuffer(data, dtype=dtype)
    if samples == 1:
        pixels = pixels.reshape(fields.rows, fields.columns)
    elif fields.planar_configuration == 1:
        pixels = pixels.reshape(3, fields.rows, fields.columns)
    else:
        pixels = pixels.reshape(fields.rows, fields.columns, 3)
    return Frame(pixels, PixelInfo.from_header(fields), index, frames, fields)


def _read_pydicom(path: str | os.PathLike[str], fields: HeaderFields, index: int | None) -> Frame:
    """One frame through pydicom's decoders (compressed, 1-bit, palette, YBR_FULL_422, ...)."""
    import pydicom
    from pydicom.pixels import apply_color_lut, get_decoder

    # pydicom warns about many small deviations (bad VRs, odd lengths) that
    # do not stop it decoding; the thumbnail is wanted all the same.  It
    # raises plain exceptions from its plugins: each becomes a DecodeError.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception as exc:  # pydicom raises many types for broken files
            raise DecodeError(f"pydicom cannot read the file: {exc}") from None
        if "PixelData" not in ds:
            if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
                raise DecodeError("Float Pixel Data is not rendered")
            raise NoPixelData("no Pixel Data (7FE0,0010)")
        syntax = ds.file_meta.get("TransferSyntaxUID")
        if syntax is None:
            raise DecodeError("no Transfer Syntax UID")
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            raise DecodeError(f"no pixel decoder for {syntax.name}") from None
        if not decoder.is_available:
            missing = "; ".join(f"{name}: {', '.join(deps)}" for name, deps in decoder.missing_dependencies)
            raise DecodeError(f"no decoder plugin installed for {syntax.name} ({missing})")
        try:
            frames = int(ds.get("NumberOfFrames") or 1)
        except (TypeError, ValueError):
            frames = 1
        frames = max(1, frames)
        index = frames // 2 if index is None else index
        if not 0 <= index < frames:
            raise DecodeError(f"frame {index} requested; the object has {frames}")
        try:
            pixels, meta = decoder.as_array(ds, index=index)
            photometric = str(meta.get("photometric_interpretation", fields.photometric_interpretation))
            bits_stored = int(meta.get("bits_stored", fields.bits_stored or 0)) or None
            if photometric == "PALETTE COLOR":
                pixels = apply_color_lut(pixels, ds)
                photometric, bits_stored = "RGB", pixels.dtype.itemsize * 8
        except Exception as exc:  # plugin errors have no common type
            raise DecodeError(f"{syntax.name}: {type(exc).__name__}: {exc}") from None
    info = PixelInfo(
        photometric_interpretation=photometric,
        samples_per_pixel=3 if pixels.ndim == 3 else 1,
        planar_configuration=0,  # pydicom always returns (rows, columns, samples)
        bits_stored=bits_stored,
        rescale_slope=fields.rescale_slope,
        rescale_intercept=fields.rescale_intercept,
        window_center=fields.window_center,
        window_width=fields.window_width,
    )
    return Frame(pixels, info, index, frames, fields)


def decode_frame(path: str | os.PathLike[str], index: int | None = None) -> Frame:
    """Read and decode one frame of a DICOM Part 10 file.

    Parameters
    ----------
    path : str or PathLike
        The file.
    index : int, optional
        0-based frame number; default the middle frame (``frames // 2``),
        the representative one for a thumbnail.

    Returns
    -------
    Frame
        The pixels (never modified: window and rescale are not applied) and
        the :class:`PixelInfo` that describes them.

    Raises
    ------
    NoPixelData
        The object has no pixel data.
    DecodeError
        The file is not DICOM, the frame does not exist, or it cannot be
        decoded (no plugin, corrupt data); the message says which.
    """
    try:
        fields, transfer_syntax, start = read_header(path)
    except OSError as exc:
        raise DecodeError(f"cannot read: {exc}") from None
    if fields.pixel_data_offset is None and transfer_syntax in _NATIVE:
        raise NoPixelData("no Pixel Data (7FE0,0010)")
    frame = _read_native(path, fields, transfer_syntax, start, index)
    return frame if frame is not None else _read_pydicom(path, fields, index)


# -- writing images -----------------------------------------------------------------


def encode_jpeg(image: np.ndarray, quality: int = DEFAULT_QUALITY) -> bytes:
    """JPEG bytes of an 8-bit image: (rows, columns) grey or (rows, columns, 3) RGB.

    Baseline JFIF; colour is stored as YCbCr 4:2:0 (Pillow's default).
    """
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"expected (rows, columns) or (rows, columns, 3), not {image.shape}")
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=quality)
    return out.getvalue()
