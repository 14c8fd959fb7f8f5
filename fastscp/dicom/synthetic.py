"""Synthetic DICOM objects for tests and benchmarks (nothing is downloaded)."""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def _image(rows: int, columns: int, modality: str, sop_class: str, study: str, series: str,
           number: int, patient_id: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientName = "Synthetic^Patient"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC0001"
    ds.StudyDescription = "Synthetic study"
    ds.SeriesInstanceUID = series
    ds.SeriesNumber = 1
    ds.Modality = modality
    ds.InstanceNumber = number
    ds.Rows = rows
    ds.Columns = columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1024
    return ds


def write_series(folder: str, count: int, *, rows: int = 512, columns: int = 512,
                 modality: str = "CT", sop_class: str = CTImageStorage,
                 patient_id: str = "SYN0001", seed: int = 0,
                 image_positions: Sequence[Sequence[float]] | None = None,
                 image_orientation: Sequence[float] | None = None,
                 pixel_spacing: Sequence[float] | None = None,
                 slice_thickness: float | None = None) -> list[str]:
    """Write ``count`` single-frame 16-bit images of one new study and series.

    The geometry (Image Plane Module, PS3.3 C.7.6.2) is written only when
    given: ``image_positions`` has one Image Position (Patient) per image,
    in Instance Number order (any slice order); without it the files are
    what they always were (other tests compare them).
    """
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    study, series = generate_uid(), generate_uid()
    if image_positions is not None and len(image_positions) != count:
        raise ValueError(f"{len(image_positions)} image positions for {count} images")
    paths = []
    for number in range(1, count + 1):
        ds = _image(rows, columns, modality, sop_class, study, series, number, patient_id)
        if image_positions is not None:
            ds.ImagePositionPatient = [float(v) for v in image_positions[number - 1]]
        if image_orientation is not None:
            ds.ImageOrientationPatient = [float(v) for v in image_orientation]
        if pixel_spacing is not None:
            ds.PixelSpacing = [float(v) for v in pixel_spacing]
        if slice_thickness is not None:
            ds.SliceThickness = float(slice_thickness)
        ds.PixelData = rng.integers(0, 4096, (rows, columns), dtype=np.uint16).tobytes()
        path = os.path.join(folder, f"{modality}{number:05d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_large_multiframe(path: str, size_bytes: int, *, rows: int = 1024, columns: int = 1024) -> str:
    """A multi-frame 16-bit CT of at least ``size_bytes``, written in chunks.

    The header comes from pydicom; Pixel Data is appended by hand so the
    object is never held in memory.
    """
    frame = rows * columns * 2
    frames = -(-size_bytes // frame)
    ds = _image(rows, columns, "CT", CTImageStorage, generate_uid(), generate_uid(), 1, "SYNBIG")
    ds.NumberOfFrames = frames
    ds.save_as(path, enforce_file_format=True)
    chunk = np.arange(frame // 2, dtype=np.uint16).tobytes()
    with open(path, "ab") as f:
        # (7FE0,0010) OW with a 4-byte length, explicit VR little endian.
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, frame * frames))
        for _ in range(frames):
            f.write(chunk)
    return path
