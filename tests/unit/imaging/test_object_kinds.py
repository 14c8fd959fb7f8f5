"""Object kinds the pydicom corpus lacks (deflated data sets, encapsulated PDF),
SR/RT/waveform classes from it, and the pure-Python backend end to end."""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from fastscp.imaging import frames as imaging
from fastscp.net.scu import send
from tests import corpus
from tests.e2e.test_server import assert_same_dataset

pytestmark = pytest.mark.dcmtk


def _document(path: Path, syntax: str) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = EncapsulatedPDFStorage
    ds.SOPClassUID = EncapsulatedPDFStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientName = "Doc^Patient"
    ds.PatientID = "DOC1"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DOC"
    ds.SeriesNumber = 1
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.DocumentTitle = "Report"
    ds.EncapsulatedDocument = b"%PDF-1.4\n" + os.urandom(3000) + b"\n%%EOF\n"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("backend", ["cext", "py"])
def test_deflate_pdf_sr_rt_and_waveform_are_stored_byte_exact(start_server, tmp_path: Path, backend: str) -> None:  # type: ignore[no-untyped-def]
    env = {"FASTSCP_NO_EXTENSIONS": "1"} if backend == "py" else {}
    server = start_server("--naming", "flat", env=env)
    files = [
        _document(tmp_path / "pdf-deflated.dcm", DeflatedExplicitVRLittleEndian),
        _document(tmp_path / "pdf.dcm", "1.2.840.10008.1.2.1"),
    ]
    # rtstruct.dcm is not Part 10 (no preamble), so RT is rtplan and rtdose.
    wanted = {"test-SR.dcm", "rtplan.dcm", "rtdose.dcm", "waveform_ecg.dcm", "reportsi.dcm"}
    files += [Path(f.path) for f in corpus.corpus_files() if f.name in wanted]
    assert len(files) == 2 + len(wanted)
    sent = send("127.0.0.1", server.port, [str(f) for f in files], aec=server.ae_title)
    assert (sent.stored, sent.failed, sent.refused) == (len(files), 0, 0), sent.error
    for source in files:
        meta = pydicom.filereader.read_file_meta_info(source)
        stored = server.storage / f"{meta.MediaStorageSOPInstanceUID}.dcm"
        assert_same_dataset(source, stored)
        assert pydicom.filereader.read_file_meta_info(stored).TransferSyntaxUID == meta.TransferSyntaxUID
    deflated = pydicom.dcmread(server.storage / f"{pydicom.dcmread(files[0]).SOPInstanceUID}.dcm")
    assert deflated.DocumentTitle == "Report" and deflated.PatientID == "DOC1"
    assert f"header scan backend: {backend}" in server.log_text()
    # Which PIL encodes thumbnails (Pillow-SIMD where it built, else Pillow) is in the start-up line.
    assert f"JPEG: {imaging.PILLOW_FLAVOUR} {imaging.PILLOW_VERSION};" in server.log_text()
    assert server.stop() == 0
    rows = duckdb.connect(str(server.index), read_only=True).execute(
        "SELECT patient_id, modality FROM instances WHERE transfer_syntax_uid = ?", [DeflatedExplicitVRLittleEndian]
    ).fetchall()
    assert rows == [("DOC1", "DOC")]


@pytest.mark.parametrize("backend", ["cext", "py"])
def test_a_header_longer_than_the_in_memory_prefix_is_read_back(start_server, tmp_path: Path, backend: str) -> None:  # type: ignore[no-untyped-def]
    # A 300 KB private element sits before Patient ID: the header scan must
    # read past the 64 KiB the worker keeps in memory, from the temp file.
    env = {"FASTSCP_NO_EXTENSIONS": "1"} if backend == "py" else {}
    server = start_server(env=env)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.private_block(0x0009, "FASTSCP TEST", create=True).add_new(0x00, "OB", os.urandom(300_000))
    ds.PatientID = "LONGHEADER"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyDate, ds.Modality, ds.SeriesNumber = "20240102", "CT", 7
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = os.urandom(16 * 16 * 2)
    source = tmp_path / "long-header.dcm"
    ds.save_as(source, enforce_file_format=True)
    assert send("127.0.0.1", server.port, [str(source)], aec=server.ae_title).stored == 1
    (stored,) = server.stored_files()
    assert_same_dataset(source, stored)
    relative = stored.relative_to(server.storage).parts
    assert relative[0] == "LONGHEADER" and relative[1].startswith("20240102_") and relative[2] == "7_CT"
    assert server.stop() == 0
    rows = duckdb.connect(str(server.index), read_only=True).execute(
        "SELECT patient_id, modality FROM instances"
    ).fetchall()
    assert rows == [("LONGHEADER", "CT")]
