"""Conversions between DICOM and JPEG: ``fastscp convert dcm2jpg`` and ``jpg2dcm``.

:func:`dcm_to_jpg` renders a frame with the same pass as the thumbnails
(rescale, window, MONOCHROME1, colour) at full size or scaled down.
:func:`jpg_to_dcm` wraps a JPEG in a Secondary Capture Image object (PS3.3
A.8.1): a JPEG Baseline file is encapsulated as it is, byte for byte, in
the JPEG Baseline (Process 1) transfer syntax; anything else (progressive,
12-bit, CMYK, or when asked) is decoded and stored uncompressed.
"""

from __future__ import annotations

import datetime
import io
import os
import struct
import warnings
from typing import Final, NamedTuple

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGBaseline8Bit, SecondaryCaptureImageStorage, generate_uid

from fastscp import __version__
from fastscp.dicom.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from fastscp.imaging.frames import DEFAULT_QUALITY, encode_jpeg
from fastscp.imaging.thumbnail import DEFAULT_SIZE, make_thumbnail
from fastscp.storage.files import BROWSABLE, FileModes, write_atomic

__all__ = [
    "ConversionError",
    "JpegInfo",
    "dcm_to_jpg",
    "dcm_to_tn",
    "jpeg_info",
    "jpg_to_dcm",
]


class ConversionError(ValueError):
    """The input cannot be converted as asked; the message says why."""


# -- DICOM -> JPEG ------------------------------------------------------------------


def dcm_to_jpg(
    dicom_path: str | os.PathLike[str],
    jpeg_path: str | os.PathLike[str],
    *,
    frame: int | None = None,
    size: int | None = None,
    window: tuple[float, float] | None = None,
    quality: int = DEFAULT_QUALITY,
    modes: FileModes = BROWSABLE,
) -> str:
    """Export one frame of a DICOM file as a JPEG (written atomically).

    Parameters
    ----------
    dicom_path, jpeg_path : str or PathLike
        Input DICOM file and output JPEG file.
    frame : int, optional
        0-based frame number; default the middle frame.
    size : int, optional
        Long side in pixels (area-averaged, never enlarged); default full size.
    window : (center, width), optional
        Window Center/Width in modality units; default the header's, else
        automatic.
    quality : int
        JPEG quality (1-95).
    modes : FileModes
        Permissions of the file and of the folders made for it (the server
        passes storage.file_mode/dir_mode: the image shows patient data).

    Returns
    -------
    str
        `jpeg_path`.

    Raises
    ------
    fastscp.imaging.thumbnail.ThumbnailError
        No pixel data, or the frame cannot be decoded or rendered.
    """
    image = make_thumbnail(dicom_path, size, frame=frame, window=window)
    write_atomic(jpeg_path, encode_jpeg(image, quality), modes=modes)
    return os.fspath(jpeg_path)


def dcm_to_tn(dicom_path: str | os.PathLike[str], jpeg_path: str | os.PathLike[str],
              size: int = DEFAULT_SIZE) -> str:
    """The thumbnail JPEG of a DICOM file (``dcm2jpg --thumbnail``); returns `jpeg_path`."""
    return dcm_to_jpg(dicom_path, jpeg_path, size=size)


# -- JPEG -> DICOM ------------------------------------------------------------------

# Start Of Frame markers (ITU T.81 table B.1) -> process, for messages.
_SOF: Final = {
    0xC0: "baseline", 0xC1: "extended sequential", 0xC2: "progressive", 0xC3: "lossless",
    0xC5: "differential sequential", 0xC6: "differential progressive", 0xC7: "differential lossless",
    0xC9: "extended sequential, arithmetic", 0xCA: "progressive, arithmetic", 0xCB: "lossless, arithmetic",
    0xCD: "differential sequential, arithmetic", 0xCE: "differential progressive, arithmetic",
    0xCF: "differential lossless, arithmetic",
}


class JpegInfo(NamedTuple):
    """What the JPEG's own markers say (ITU T.81 B.2, JFIF, Adobe APP14)."""

    process: str  # "baseline", "progressive", ... (see _SOF)
    precision: int  # bits per sample
    rows: int
    columns: int
    components: int
    subsampled: bool  # chroma sampled at less than full resolution
    component_ids: bytes
    adobe_transform: int | None  # APP14 "Adobe" transform flag: 0 none (RGB/CMYK), 1 YCbCr, 2 YCCK


def jpeg_info(data: bytes) -> JpegInfo:
    """Read the frame header of a JPEG file.

    Raises
    ------
    ConversionError
        Not a JPEG file, or no frame header before the scan.
    """
    if data[:2] != b"\xff\xd8":
        raise ConversionError("not a JPEG file (no SOI marker)")
    pos, adobe = 2, None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ConversionError(f"JPEG marker expected at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # no length
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        segment = data[pos + 4 : pos + 2 + length]
        if marker == 0xEE and segment[:5] == b"Adobe" and len(segment) >= 12:
            adobe = segment[11]
        if marker in _SOF:
            if len(segment) < 6:
                raise ConversionError("truncated JPEG frame header")
            precision, rows, columns, count = struct.unpack_from(">BHHB", segment)
            comps = [segment[6 + 3 * i : 9 + 3 * i] for i in range(count)]
            if len(segment) < 6 + 3 * count:
                raise ConversionError("truncated JPEG frame header")
            factors = [(c[1] >> 4, c[1] & 0x0F) for c in comps]
            subsampled = len(set(factors)) > 1
            return JpegInfo(_SOF[marker], precision, rows, columns, count, subsampled,
                            bytes(c[0] for c in comps), adobe)
        if marker == 0xDA:
            break
        pos += 2 + length
    raise ConversionError("no JPEG frame header (SOF) found")


def _photometric(info: JpegInfo) -> str:
    """Photometric Interpretation of encapsulated JPEG data (PS3.5 8.2.1)."""
    if info.components == 1:
        return "MONOCHROME2"
    # No colour transform: Adobe's flag 0, or components named R, G, B.
    if info.adobe_transform == 0 or info.component_ids == b"RGB":
        return "RGB"
    return "YBR_FULL_422" if info.subsampled else "YBR_FULL"


def _decode_with_pillow(data: bytes) -> tuple[np.ndarray, str]:
    """(8-bit pixels, photometric) of any JPEG Pillow reads: grey or RGB."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("L" if image.mode in ("L", "I;16", "I", "1") else "RGB")
            pixels = np.asarray(image)
    except Exception as exc:  # Pillow raises several types for broken files
        raise ConversionError(f"cannot decode the JPEG: {exc}") from None
    return pixels, "MONOCHROME2" if pixels.ndim == 2 else "RGB"


def _ascii(text: str) -> bool:
    return all(ord(c) < 128 for c in text)


def _now() -> tuple[str, str]:
    now = datetime.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def jpg_to_dcm(
    jpeg_path: str | os.PathLike[str],
    dicom_path: str | os.PathLike[str],
    *,
    patient_name: str = "",
    patient_id: str = "",
    patient_birth_date: str = "",
    patient_sex: str = "",
    study_uid: str = "",
    series_uid: str = "",
    accession: str = "",
    study_id: str = "",
    study_date: str = "",
    study_time: str = "",
    study_description: str = "",
    series_description: str = "",
    referring_physician: str = "",
    modality: str = "OT",
    series_number: int = 1,
    instance_number: int = 1,
    uncompressed: bool = False,
) -> str:
    """Wrap a JPEG image in a DICOM Secondary Capture Image object (written atomically).

    Parameters
    ----------
    jpeg_path, dicom_path : str or PathLike
        Input JPEG file and output DICOM Part 10 file.
    patient_name, patient_id, patient_birth_date, patient_sex : str
        Patient Module (PN ``Family^Given``, LO, DA ``YYYYMMDD``, CS M/F/O).
    study_uid, series_uid : str
        Study / Series Instance UID; default a new UID (a new study or series).
        Give the UIDs of an existing study to add the image to it.
    accession, study_id, study_date, study_time, study_description, referring_physician : str
        General Study Module; Study Date/Time default to now for a new study.
    series_description, modality, series_number, instance_number
        General Series and General Image; Modality defaults to OT (other).
    uncompressed : bool
        Store decoded pixels (Explicit VR Little Endian) even for a JPEG
        Baseline file.

    Returns
    -------
    str
        The new SOP Instance UID.

    Raises
    ------
    ConversionError
        Not a JPEG, or a value that does not fit its VR (e.g. a Patient ID
        longer than 64 characters or a malformed UID).
    OSError
        The input cannot be read or the output written.

    Notes
    -----
    JPEG Baseline (8-bit, Huffman, sequential: SOF0) is encapsulated
    unchanged in the JPEG Baseline (Process 1) transfer syntax, with the
    Photometric Interpretation the standard asks for (PS3.5 8.2.1):
    MONOCHROME2 for grey, YBR_FULL_422 for subsampled colour (the usual
    JFIF 4:2:0 or 4:2:2), YBR_FULL for colour at full resolution, RGB when
    the JPEG has no colour transform.  Other JPEG processes are decoded with
    Pillow and stored as 8-bit MONOCHROME2 or RGB.  Either way the image is
    marked Lossy Image Compression "01" (ISO_10918_1): it went through JPEG.
    """
    if patient_sex not in ("", "M", "F", "O"):  # CS of PS3.3 C.7.1.1: pydicom checks only its length
        raise ConversionError(f"Patient's Sex must be M, F or O, not {patient_sex!r}")
    with open(jpeg_path, "rb") as f:
        data = f.read()
    info = jpeg_info(data)
    encapsulated = not uncompressed and info.process == "baseline" and info.precision == 8 \
        and info.components in (1, 3)
    if encapsulated:
        photometric, rows, columns, samples = _photometric(info), info.rows, info.columns, info.components
        pixels = None
    else:
        pixels, photometric = _decode_with_pillow(data)
        rows, columns = pixels.shape[:2]
        samples = 1 if pixels.ndim == 2 else 3
    if not rows or not columns:
        raise ConversionError("the JPEG has no rows or columns (DNL marker files are not supported)")

    today, time_now = _now()
    new_study = not study_uid
    ds = Dataset()
    # Values are checked as they are set: pydicom's warnings about them
    # (too long, malformed UIDs and dates) become ConversionErrors here.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            texts = (patient_name, patient_id, accession, study_id, study_description, series_description,
                     referring_physician)
            if not all(_ascii(t) for t in texts):
                ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8
            # SOP Common
            ds.SOPClassUID = SecondaryCaptureImageStorage
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceCreationDate, ds.InstanceCreationTime = today, time_now
            # Patient
            ds.PatientName = patient_name
            ds.PatientID = patient_id
            ds.PatientBirthDate = patient_birth_date
            ds.PatientSex = patient_sex
            # General Study
            ds.StudyInstanceUID = _uid(study_uid) if study_uid else generate_uid()
            ds.StudyDate = study_date or (today if new_study else "")
            ds.StudyTime = study_time or (time_now if new_study else "")
            ds.ReferringPhysicianName = referring_physician
            ds.StudyID = study_id
            ds.AccessionNumber = accession
            if study_description:
                ds.StudyDescription = study_description
            # General Series
            ds.Modality = modality
            ds.SeriesInstanceUID = _uid(series_uid) if series_uid else generate_uid()
            ds.SeriesNumber = series_number
            if series_description:
                ds.SeriesDescription = series_description
            # General Equipment (type 2: the equipment that made the original is unknown)
            ds.Manufacturer = ""
            # SC Equipment: converted on a workstation by fastscp
            ds.ConversionType = "WSD"
            ds.SecondaryCaptureDeviceManufacturer = "fastscp"
            ds.SecondaryCaptureDeviceManufacturerModelName = "fastscp jpg2dcm"
            ds.SecondaryCaptureDeviceSoftwareVersions = __version__
            # General Image
            ds.InstanceNumber = instance_number
            ds.PatientOrientation = ""
            ds.ContentDate, ds.ContentTime = today, time_now
            ds.ImageType = ["DERIVED", "SECONDARY"]
            ds.LossyImageCompression = "01"
            ds.LossyImageCompressionMethod = "ISO_10918_1"
            if encapsulated:
                ratio = rows * columns * samples / len(data)
                ds.LossyImageCompressionRatio = f"{ratio:.2f}"
            # SC Image
            ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = today, time_now
            # Image Pixel
            ds.SamplesPerPixel = samples
            ds.PhotometricInterpretation = photometric
            if samples == 3:
                ds.PlanarConfiguration = 0
            ds.Rows, ds.Columns = rows, columns
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
            ds.PixelRepresentation = 0
        except (UserWarning, ValueError, OverflowError) as exc:
            raise ConversionError(str(exc)) from None

    if encapsulated:
        fragment = data if len(data) % 2 == 0 else data + b"\x00"  # items have even length (PS3.5 A.4)
        ds.PixelData = encapsulate([fragment])
        ds["PixelData"].VR = "OB"
        transfer_syntax = JPEGBaseline8Bit
    else:
        assert pixels is not None
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds["PixelData"].VR = "OB"
        transfer_syntax = ExplicitVRLittleEndian

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME

    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    write_atomic(dicom_path, out.getvalue())
    return str(ds.SOPInstanceUID)


def _uid(value: str) -> UID:
    uid = UID(value.strip())
    if not uid.is_valid:
        raise ConversionError(f"not a valid UID: {value!r}")
    return uid

