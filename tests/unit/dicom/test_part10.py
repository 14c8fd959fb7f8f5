"""Part 10 files read back: one File Meta reader, one header reader, one data-set hash, for every user.

Each file is read by every part of fastscp that reads stored files (the
storage area, the reindex, the thumbnail/scan-sheet reader) and checked
against an independent split of the file (tests/dicomfiles.py) and pydicom.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import blake3
import pydicom
import pytest

from fastscp.dicom.header import read_header_from
from fastscp.dicom.part10 import dataset_hash, dataset_offset, file_meta, read_file_meta
from fastscp.dicom.synthetic import write_series
from fastscp.imaging.frames import read_header
from fastscp.index.reindex import FileState, read_record
from fastscp.storage.area import stored_uid
from tests.dicomfiles import LONG_VRS, dataset_bytes

#: Explicit VRs with a 2-byte length (PS3.5 Table 7.1-2) that File Meta may hold.
SHORT_VRS = ("AE", "CS", "LO", "SH", "UI", "AS", "DA", "DS", "IS", "LT", "ST", "UL", "US")


def _one_image(folder: Path) -> Path:
    (path,) = write_series(str(folder), 1, rows=8, columns=8, patient_id="P10")
    return Path(path)


def _with_meta_element(source: Path, target: Path, vr: str, value: bytes) -> Path:
    """``source`` with one more File Meta element (0002,0200) of ``vr``, Group Length corrected."""
    data = source.read_bytes()
    end = dataset_offset(data)
    if vr in LONG_VRS:
        element = struct.pack("<HH2s2xI", 0x0002, 0x0200, vr.encode(), len(value)) + value
    else:
        element = struct.pack("<HH2sH", 0x0002, 0x0200, vr.encode(), len(value)) + value
    (group_length,) = struct.unpack_from("<I", data, 140)
    patched = data[:140] + struct.pack("<I", group_length + len(element)) + data[144:end] + element + data[end:]
    target.write_bytes(patched)
    return target


def _check_every_reader(path: Path, source: Path) -> None:
    """Every reader of stored files finds ``path``'s data set: ``source``'s (split independently), at its end."""
    dataset, transfer_syntax = dataset_bytes(source)
    raw = path.read_bytes()
    assert raw.endswith(dataset)
    offset = len(raw) - len(dataset)
    uid = str(pydicom.dcmread(path, force=True).SOPInstanceUID)

    meta, at = read_file_meta(raw[:65536])
    assert (at, meta[0x0010], meta[0x0003]) == (offset, transfer_syntax, uid)
    assert dataset_offset(raw) == offset
    with open(path, "rb") as f:
        header = read_header_from(f)
    assert (header.dataset_offset, header.transfer_syntax_uid) == (offset, transfer_syntax)
    assert header.fields.sop_instance_uid == uid and header.fields.rows == 8
    fields, syntax, start = read_header(path)
    assert (fields.sop_instance_uid, syntax, start) == (uid, transfer_syntax, offset)
    record = read_record(str(path.parent), FileState(path.name, len(raw), 0))
    assert record.header.sop_instance_uid == uid and record.transfer_syntax_uid == transfer_syntax
    # The content hash: BLAKE3 of the data set bytes, marked as such (bare hex is an older SHA-256).
    assert record.content_hash == dataset_hash(str(path)) == "blake3:" + blake3.blake3(dataset).hexdigest()
    assert stored_uid(str(path)) == uid


@pytest.mark.parametrize("vr", sorted(LONG_VRS) + list(SHORT_VRS))
def test_a_file_meta_element_of_any_vr_is_stepped_over_by_every_reader(tmp_path: Path, vr: str) -> None:
    # 300 bytes: more than a 2-byte length read from the reserved bytes (0)
    # of a long VR could skip; the readers once had three VR lists, and each
    # missed some of PS3.5 Table 7.1-1's long VRs.
    value = b"" if vr in ("UL", "US") else b"1" * 300
    if vr == "UL":
        value = struct.pack("<I", 7)
    elif vr == "US":
        value = struct.pack("<H", 7)
    source = _one_image(tmp_path / "src")
    _check_every_reader(_with_meta_element(source, tmp_path / f"meta-{vr}.dcm", vr, value), source)


def test_a_file_without_preamble_is_read_by_every_reader(tmp_path: Path) -> None:
    source = _one_image(tmp_path / "src")
    path = tmp_path / "bare.dcm"
    path.write_bytes(source.read_bytes()[132:])  # as pydicom reads it: File Meta at byte 0
    _check_every_reader(path, source)


def test_a_file_without_group_length_is_read_by_every_reader(tmp_path: Path) -> None:
    source = _one_image(tmp_path / "src")
    data = source.read_bytes()
    path = tmp_path / "no-group-length.dcm"
    path.write_bytes(data[:132] + data[144:])  # (0002,0000) is Type 1, but some writers leave it out
    _check_every_reader(path, source)


def test_a_header_longer_than_the_first_reads_is_read_whole(tmp_path: Path) -> None:
    source = _one_image(tmp_path / "src")
    ds = pydicom.dcmread(source)
    ds.add_new(0x00090010, "LO", "FASTSCP TEST")
    ds.add_new(0x00091010, "OB", b"x" * 300_000)  # longer than 64 KiB, doubled twice, and than 256 KiB
    path = tmp_path / "long.dcm"
    ds.save_as(path, enforce_file_format=True)
    _check_every_reader(path, path)
    with open(path, "rb") as f:
        assert read_header_from(f).fields.pixel_data_offset > 300_000


@pytest.mark.parametrize("garbage", [b"", b"\0" * 200, b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\x00"],
                         ids=["empty", "no-prefix", "meta-past-the-end"])
def test_a_file_that_is_not_part10_is_refused_by_every_reader(tmp_path: Path, garbage: bytes) -> None:
    path = tmp_path / "x.dcm"
    path.write_bytes(garbage)
    with pytest.raises(ValueError):
        read_file_meta(garbage)
    with open(path, "rb") as f, pytest.raises(ValueError):
        read_header_from(f)
    with pytest.raises(ValueError):
        read_record(str(tmp_path), FileState("x.dcm", len(garbage), 0))
    assert stored_uid(str(path)) is None


def test_file_meta_holds_each_stores_own_values_and_its_group_length() -> None:
    """The elements around the instance UID are made once per SOP class, transfer syntax and AE title:
    each store's own values still come out, with the group length of its own meta."""
    mr, ct = "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.2"
    explicit, implicit = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
    for sop_class, instance, syntax, ae in ((mr, "1.2.3", explicit, "MODALITY"), (mr, "1.2.34", explicit, "MODALITY"),
                                           (ct, "1.2.3", implicit, ""), (mr, "1.2.345", explicit, "ODD")):
        meta = file_meta(sop_class, instance, syntax, ae)
        parsed = pydicom.dcmread(io.BytesIO(meta), force=True).file_meta
        assert (parsed.MediaStorageSOPClassUID, parsed.MediaStorageSOPInstanceUID, parsed.TransferSyntaxUID) == (
            sop_class, instance, syntax)
        assert parsed.get("SourceApplicationEntityTitle", "") == ae
        assert parsed.FileMetaInformationGroupLength == len(meta) - 132 - 12
        assert read_file_meta(meta + b"\x08\x00\x05\x00CS\x00\x00")[1] == len(meta)
