"""fastscp.dicom.header: both twins against pydicom and against each other.

Every test that parses runs twice, ``[cext]`` (the compiled module) and
``[py]`` (the pure-Python twin).  The cext case fails when the module is not
built, unless ``FASTSCP_NO_EXTENSIONS=1`` says to run without it.
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
import subprocess
import sys
import warnings
import zlib
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import msgspec
import pydicom
import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue

from fastscp.dicom import _header_py, header
from fastscp.dicom.header import HeaderError, HeaderFields, IncompleteHeader
from tests.dicomfiles import (
    DEFLATED_LE,
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    Encoder,
    corpus_files,
    corpus_id,
    dataset_bytes,
    pad,
)
from tests.twins import compiled_twin

Parse = Callable[..., HeaderFields]

# HeaderFields attribute -> pydicom keyword of the element it holds.
KEYWORDS = {
    "specific_character_set": "SpecificCharacterSet",
    "patient_id": "PatientID",
    "patient_name": "PatientName",
    "patient_birth_date": "PatientBirthDate",
    "patient_sex": "PatientSex",
    "study_instance_uid": "StudyInstanceUID",
    "study_date": "StudyDate",
    "study_time": "StudyTime",
    "study_id": "StudyID",
    "accession_number": "AccessionNumber",
    "study_description": "StudyDescription",
    "referring_physician_name": "ReferringPhysicianName",
    "requesting_physician": "RequestingPhysician",
    "series_instance_uid": "SeriesInstanceUID",
    "series_number": "SeriesNumber",
    "modality": "Modality",
    "series_description": "SeriesDescription",
    "body_part_examined": "BodyPartExamined",
    "sop_class_uid": "SOPClassUID",
    "sop_instance_uid": "SOPInstanceUID",
    "instance_number": "InstanceNumber",
    "echo_number": "EchoNumbers",
    "rows": "Rows",
    "columns": "Columns",
    "bits_allocated": "BitsAllocated",
    "bits_stored": "BitsStored",
    "pixel_representation": "PixelRepresentation",
    "samples_per_pixel": "SamplesPerPixel",
    "planar_configuration": "PlanarConfiguration",
    "number_of_frames": "NumberOfFrames",
    "window_center": "WindowCenter",
    "window_width": "WindowWidth",
    "rescale_slope": "RescaleSlope",
    "rescale_intercept": "RescaleIntercept",
    "photometric_interpretation": "PhotometricInterpretation",
    "image_type": "ImageType",
}
#: Fields that hold every value of a multi-valued number, and their number field.
ALL_VALUES_OF = {values: name for name, values in _header_py.ALL_VALUES.items()}
KIND = {name: kind for _tag, name, kind in _header_py.FIELDS}
PIXEL_DATA_TAG = {False: b"\xe0\x7f\x10\x00", True: b"\x7f\xe0\x00\x10"}  # LE, BE


# -- backends -------------------------------------------------------------------------


def _backend(name: str) -> Parse:
    if name == "py":
        return header.parse_header_py
    return compiled_twin(header.parse_header_cext, "fastscp.dicom._header_cext")


@pytest.fixture(params=["cext", "py"])
def parse(request: pytest.FixtureRequest) -> Parse:
    return _backend(request.param)


@pytest.fixture
def both() -> tuple[Parse, Parse]:
    """(cext, py), for comparing the twins directly."""
    return _backend("cext"), _backend("py")


def outcome(parse: Parse, data: bytes, ts: str, complete: bool = True) -> object:
    """HeaderFields, or (exception type, message) for HeaderError only."""
    try:
        return parse(data, ts, complete=complete)
    except HeaderError as exc:
        return type(exc), str(exc)


# -- the pydicom reference ---------------------------------------------------------------


def _first(value: object) -> object:
    return value[0] if isinstance(value, MultiValue | list) else value


def pydicom_fields(ds: pydicom.Dataset) -> dict[str, object]:
    """What HeaderFields should hold, from pydicom's reading of the same bytes."""
    expected: dict[str, object] = {}
    for name, keyword in KEYWORDS.items():
        tag = tag_for_keyword(keyword)
        kind = KIND[name]
        if tag not in ds:
            continue
        value = ds[tag].value
        if kind in (_header_py.KIND_STR, _header_py.KIND_TEXT, _header_py.KIND_PN):
            if value is None:
                value = ""
            elif isinstance(value, MultiValue | list):
                value = "\\".join(str(v) for v in value)
            expected[name] = str(value)
            continue
        if name in _header_py.ALL_VALUES and isinstance(value, MultiValue | list) and len(value) > 1:
            expected[_header_py.ALL_VALUES[name]] = "\\".join(str(v).strip() for v in value)
        value = _first(value)
        if value is None or value == "":
            expected[name] = None
        elif kind == _header_py.KIND_US:
            expected[name] = int(value)
        elif kind == _header_py.KIND_IS:
            # pydicom leaves a string it cannot convert ("1A") as str, and
            # makes a float of "1.5": neither is an integer.
            if isinstance(value, str):
                expected[name] = None
            elif isinstance(value, float):
                expected[name] = int(value) if value.is_integer() else None
            else:
                expected[name] = int(value)
        else:
            number = float(value) if not isinstance(value, str) else math.nan
            expected[name] = number if math.isfinite(number) else None
    return expected


_FIELD_TAGS = {tag for tag, _name, _kind in _header_py.FIELDS}
_BINARY_NUMBERS = ("US", "SS", "UL", "SL", "UV", "SV", "FL", "FD")


def pydicom_map(ds: pydicom.Dataset) -> dict[str, str]:
    """What the attribute map should hold, from pydicom's reading of the same bytes.

    Every top-level element that is no FIELDS one, not private, not a group
    length, of a kept VR (the VR in the data, or for implicit VR the
    dictionary's when it gives one kept VR), up to MAP_MAX_VALUE bytes, not
    empty: its values as pydicom shows them, backslash-separated.
    """
    expected = {}
    for tag in ds.keys():
        if tag in _FIELD_TAGS or not _header_py.map_eligible(tag.group, tag.element):
            continue
        raw = ds.get_item(tag)
        raw_vr = raw.VR if isinstance(raw, RawDataElement) else ds[tag].VR
        if raw_vr is None:  # implicit VR
            if tag not in _header_py.IMPLICIT_MAP_KINDS:
                continue
            vr = dictionary_VR(tag)
        elif raw_vr.encode() in _header_py.MAP_KINDS:
            vr = raw_vr
        else:
            continue
        if isinstance(raw, RawDataElement) and raw.value is not None and len(raw.value) > _header_py.MAP_MAX_VALUE:
            continue
        value = ds[tag].value
        values = list(value) if isinstance(value, MultiValue | list) else [value]
        if vr in _BINARY_NUMBERS:
            text = "\\".join(repr(v) for v in values if v is not None)
        else:
            texts = ["" if v is None else str(v) for v in values]
            # Padding: pydicom keeps some (leading spaces of a TM, trailing
            # ones of a PN's first value); the map has none, per value.
            if _header_py.MAP_KINDS[vr.encode()] == _header_py.MAP_STRIP:
                texts = [t.strip(" \0") for t in texts]
            else:
                texts = [t.rstrip(" \0") for t in texts]
            text = "\\".join(texts)
        if text:
            expected[f"{tag:08X}"] = text
    return expected


def assert_matches_pydicom(fields: HeaderFields, ds: pydicom.Dataset) -> None:
    expected = pydicom_fields(ds)
    defaults = HeaderFields()
    names = [*KEYWORDS, *ALL_VALUES_OF]
    got = {name: getattr(fields, name) for name in names}
    want = {name: expected.get(name, getattr(defaults, name)) for name in names}
    assert got == want
    assert json.loads(fields.attributes) == pydicom_map(ds)


def read_raw_dataset(data: bytes, ts: str) -> pydicom.Dataset:
    """pydicom's reading of dataset bytes (no File Meta), up to Pixel Data."""
    if ts == DEFLATED_LE:
        data = zlib.decompress(data, -zlib.MAX_WBITS)
    ds = read_dataset(
        BytesIO(data), ts == IMPLICIT_LE, ts != EXPLICIT_BE,
        stop_when=lambda tag, vr, length: tag in (0x7FE00008, 0x7FE00009, 0x7FE00010),
    )
    ds.set_original_encoding(ts == IMPLICIT_LE, ts != EXPLICIT_BE)
    return ds


# -- the contract ---------------------------------------------------------------------------


def test_fields_table_matches_the_dicom_dictionary() -> None:
    assert [tag for tag, _name, _kind in _header_py.FIELDS] == sorted(
        tag_for_keyword(KEYWORDS[name]) for _tag, name, _kind in _header_py.FIELDS
    )
    for tag, name, _kind in _header_py.FIELDS:
        assert tag == tag_for_keyword(KEYWORDS[name]), name
    assert _header_py.FIELDS[0][1] == "specific_character_set"
    extra = {"pixel_data_offset", "attributes"}
    assert set(HeaderFields.__struct_fields__) == set(KEYWORDS) | extra | set(ALL_VALUES_OF)


def test_backend_switch() -> None:
    if header.NO_EXTENSIONS:
        assert header.BACKEND == "py"
    else:
        _backend("cext")  # fails here when the module is not built
        assert header.BACKEND == "cext"
        assert header.parse_header_cext is not None and header._parse is header.parse_header_cext
    # The environment switch, in a fresh interpreter: the twin runs, the compiled module is not loaded.
    code = ("import sys; from fastscp.dicom import header; "
            "print(header.BACKEND, header._parse is header.parse_header_py, "
            "'fastscp.dicom._header_cext' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "FASTSCP_NO_EXTENSIONS": "1"})
    assert out.stdout.split() == ["py", "True", "False"]
    assert issubclass(IncompleteHeader, HeaderError)
    assert issubclass(HeaderError, ValueError)


# -- pydicom's test corpus ---------------------------------------------------------------------

CORPUS = list(corpus_files())

# Known exceptions, file by file.  pydicom reads these (it reads a value that
# runs past the end of the file as far as the file goes), but they are not whole
# datasets: the scanner refuses them.  Value: text expected in the HeaderError.
CORPUS_HEADER_ERRORS = {
    # rtplan.dcm cut short inside (300A,00B0) Beam Sequence
    "test_files/rtplan_truncated.dcm": "value of (300A,00B0) at byte offset 1110",
}


def test_corpus_is_there() -> None:
    names = {corpus_id(path) for path in CORPUS}
    assert len(CORPUS) > 150
    # every transfer syntax family and the character set examples are covered
    assert {"test_files/CT_small.dcm", "test_files/MR_small_bigendian.dcm",
            "test_files/MR_small_implicit.dcm", "test_files/image_dfl.dcm",
            "test_files/JPEG2000.dcm", "charset_files/chrH31.dcm"} <= names
    assert set(CORPUS_HEADER_ERRORS) <= names


def _read_reference(path: Path) -> tuple[pydicom.Dataset, pydicom.Dataset]:
    """pydicom's reading of `path`: header only, and lazily in full."""
    # Several corpus files are deliberately odd (bad VRs, invalid values,
    # misspelt character sets); pydicom warns about them, which is expected.
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        full = pydicom.dcmread(path, defer_size=64)
        pydicom_fields(ds)  # values convert lazily, and may warn: convert here
    return ds, full


@pytest.mark.parametrize("path", CORPUS, ids=corpus_id)
def test_corpus_file(parse: Parse, path: Path) -> None:
    data, ts = dataset_bytes(path)
    ds, full = _read_reference(path)
    known_error = CORPUS_HEADER_ERRORS.get(corpus_id(path))
    if known_error is not None:
        with pytest.raises(HeaderError, match=known_error.replace("(", r"\(").replace(")", r"\)")):
            parse(data, ts)
        with pytest.raises(IncompleteHeader):
            parse(data, ts, complete=False)
        return

    fields = parse(data, ts)
    with warnings.catch_warnings(record=True):  # pydicom's lazy conversions, as above
        warnings.simplefilter("always")
        assert_matches_pydicom(fields, ds)

    has_pixels = any(tag in full for tag in (0x7FE00008, 0x7FE00009, 0x7FE00010))
    if ts == DEFLATED_LE:
        assert fields.pixel_data_offset is None
    elif has_pixels:
        offset = fields.pixel_data_offset
        assert offset is not None
        assert data[offset : offset + 4] == PIXEL_DATA_TAG[ts == EXPLICIT_BE]
        # only the bytes up to the tag are needed, even when more may follow
        assert parse(data[: offset + 4], ts, complete=False) == fields
        with pytest.raises(IncompleteHeader):
            parse(data[: offset + 3], ts, complete=False)
    else:
        assert fields.pixel_data_offset is None
        with pytest.raises(IncompleteHeader):
            parse(data, ts, complete=False)


@pytest.mark.parametrize("path", CORPUS, ids=corpus_id)
def test_corpus_backends_agree(both: tuple[Parse, Parse], path: Path) -> None:
    data, ts = dataset_bytes(path)
    cext, py = both
    for complete in (True, False):
        assert outcome(cext, data, ts, complete) == outcome(py, data, ts, complete)
    # the same bytes as bytearray and as a memoryview slice of a larger buffer
    framed = memoryview(b"xx" + data + b"yy")[2:-2]
    assert outcome(cext, framed, ts) == outcome(py, bytearray(data), ts) == outcome(py, data, ts)


# -- generated datasets --------------------------------------------------------------------------

ENCODINGS = {
    "implicit": (IMPLICIT_LE, Encoder(explicit=False)),
    "explicit": (EXPLICIT_LE, Encoder()),
    "bigendian": (EXPLICIT_BE, Encoder(big=True)),
}


def small_dataset(enc: Encoder, pixel_data: bool = True) -> bytes:
    """A dataset with kept elements around nested sequences and private data.

    (0008,1140) and (0009,1001) are undefined-length sequences with
    undefined- and defined-length items, an empty item, nested sequences and
    private elements; (0029,1010) holds bytes that look like Pixel Data and
    delimiter tags, which must be skipped by length.
    """
    inner = enc.sequence(0x00091002, [enc.item(enc.element(0x00091003, "LO", pad("deep")))])
    private_items = [
        enc.item(enc.element(0x00090010, "LO", pad("ACME")) + inner),
        enc.item(b""),  # empty undefined-length item
        enc.item(enc.element(0x00091004, "OB", b"\xfe\xff\xdd\xe0" * 2), undefined=False),
        enc.item(enc.sequence(0x00091005, [], undefined=False), undefined=False),
    ]
    referenced = [
        enc.item(enc.element(0x00081150, "UI", pad("1.2.3", "UI"))
                 + enc.element(0x00100010, "PN", pad("Nested^Name"))),
        enc.item(enc.element(0x00081155, "UI", pad("1.2.3.4", "UI")), undefined=False),
    ]
    look_alike = PIXEL_DATA_TAG[enc.big] + b"\xfe\xff\x0d\xe0\xff\xff\xff\xff"
    parts = [
        enc.element(0x00080005, "CS", pad("ISO_IR 100")),
        enc.element(0x00080008, "CS", pad("ORIGINAL\\PRIMARY")),
        enc.element(0x00080016, "UI", pad("1.2.840.10008.5.1.4.1.1.4", "UI")),
        enc.element(0x00080018, "UI", pad("1.2.826.0.1.3680043.2.1125.1.42", "UI")),
        enc.element(0x00080060, "CS", pad("MR")),
        enc.sequence(0x00081140, referenced),
        enc.element(0x00090010, "LO", pad("ACME 1.1")),
        enc.sequence(0x00091001, private_items),
        enc.element(0x00100010, "PN", pad("Müller^Jürgen", encoding="latin-1")),
        enc.element(0x00100020, "LO", pad("ID42 ")),
        enc.element(0x00180086, "IS", pad("2\\3")),
        enc.element(0x00200011, "IS", pad(" 7 ")),
        enc.element(0x00200013, "IS", pad("+12")),
        enc.element(0x00280010, "US", 512),
        enc.element(0x00280011, "US", 256),
        enc.element(0x00280100, "US", 16),
        enc.element(0x00280103, "US", b"\x01\x00\x01\x00" if not enc.big else b"\x00\x01\x00\x01"),
        enc.element(0x00281050, "DS", pad("40\\400")),
        enc.element(0x00281051, "DS", pad(" 400.5")),
        enc.element(0x00281053, "DS", pad("1e0")),
        enc.element(0x00290010, "LO", pad("ACME 1.1")),
        enc.element(0x00291010, "OB", look_alike),
    ]
    if pixel_data:
        parts.append(enc.element(0x7FE00010, "OW", b"\x00\x01" * 8))
        # after Pixel Data: never read
        parts.append(enc.element(0xFFFCFFFC, "OB", b"\xff" * 6))
    return b"".join(parts)


SMALL_EXPECTED = {
    "specific_character_set": "ISO_IR 100",
    "sop_class_uid": "1.2.840.10008.5.1.4.1.1.4",
    "sop_instance_uid": "1.2.826.0.1.3680043.2.1125.1.42",
    "modality": "MR",
    "patient_name": "Müller^Jürgen",
    "patient_id": "ID42",
    "echo_number": 2,
    "series_number": 7,
    "instance_number": 12,
    "rows": 512,
    "columns": 256,
    "bits_allocated": 16,
    "pixel_representation": 1,
    "window_center": 40.0,
    "window_center_values": "40\\400",
    "window_width": 400.5,
    "image_type": "ORIGINAL\\PRIMARY",
    "rescale_slope": 1.0,
}


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_small_dataset(parse: Parse, encoding: str) -> None:
    ts, enc = ENCODINGS[encoding]
    data = small_dataset(enc)
    fields = parse(data, ts)
    offset = data.index(enc.element(0x7FE00010, "OW", b"\x00\x01" * 8))
    assert fields == HeaderFields(**SMALL_EXPECTED, pixel_data_offset=offset)
    assert_matches_pydicom(fields, read_raw_dataset(data, ts))


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_truncated_at_every_byte(both: tuple[Parse, Parse], encoding: str) -> None:
    ts, enc = ENCODINGS[encoding]
    data = small_dataset(enc)
    cext, py = both
    full = py(data, ts)
    assert full.pixel_data_offset is not None
    tag_end = full.pixel_data_offset + 4
    for cut in range(len(data) + 1):
        prefix = data[:cut]
        # complete=False: a prefix is never malformed, only short
        for backend in both:
            if cut < tag_end:
                with pytest.raises(IncompleteHeader):
                    backend(prefix, ts, complete=False)
            else:
                assert backend(prefix, ts, complete=False) == full
        # complete=True: HeaderError, or the fields of the elements before the cut
        result = outcome(py, prefix, ts)
        assert outcome(cext, prefix, ts) == result
        if isinstance(result, HeaderFields):
            if cut >= tag_end:
                assert result == full
            else:
                assert result.pixel_data_offset is None
                assert_matches_pydicom(result, read_raw_dataset(prefix, ts))
        else:
            assert result[0] is HeaderError, result


def test_empty_dataset(parse: Parse) -> None:
    for ts in (IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE, "1.2.840.10008.1.2.4.50"):
        assert parse(b"", ts) == HeaderFields()
        with pytest.raises(IncompleteHeader, match="data ends at byte offset 0, before Pixel Data"):
            parse(b"", ts, complete=False)


def test_dataset_without_pixel_data(parse: Parse) -> None:
    enc = Encoder()
    data = small_dataset(enc, pixel_data=False)
    assert parse(data, EXPLICIT_LE) == HeaderFields(**SMALL_EXPECTED)
    with pytest.raises(IncompleteHeader):
        parse(data, EXPLICIT_LE, complete=False)


@pytest.mark.parametrize("tag", [0x7FE00008, 0x7FE00009, 0x7FE00010])
def test_stops_at_any_pixel_data(parse: Parse, tag: int) -> None:
    enc = Encoder()
    head = enc.element(0x00280010, "US", 64)
    # garbage after the tag is never looked at
    data = head + enc.tag(tag) + b"\xff" * 3
    assert parse(data, EXPLICIT_LE) == HeaderFields(rows=64, pixel_data_offset=len(head))


def test_pixel_data_inside_a_sequence_is_skipped(parse: Parse) -> None:
    # an Icon Image Sequence has its own Pixel Data, encapsulated here
    enc = Encoder()
    fragments = enc.item(b"", undefined=False) + enc.item(b"\xff\xd8\xff\xd9", undefined=False)
    icon = enc.item(enc.element(0x00280010, "US", 8)
                    + enc.header(0x7FE00010, "OB", 0xFFFFFFFF) + fragments
                    + enc.tag(0xFFFEE0DD) + b"\0\0\0\0")
    data = (enc.sequence(0x00880200, [icon]) + enc.element(0x00280010, "US", 512)
            + enc.element(0x7FE00010, "OW", b""))
    assert parse(data, EXPLICIT_LE) == HeaderFields(rows=512, pixel_data_offset=len(data) - 12)


def test_odd_lengths_are_followed(parse: Parse) -> None:
    # DICOM requires even lengths, but pydicom (and dcmtk) read odd ones; a
    # storage SCP should index such images rather than reject them.
    for ts, enc in ENCODINGS.values():
        data = (enc.element(0x00100010, "PN", b"Doe^Jane")  # even
                + enc.element(0x00100020, "LO", b"odd")
                + enc.element(0x00191001, "OB", b"\x01\x02\x03")
                + enc.element(0x00200013, "IS", b"5")
                + enc.element(0x00280010, "US", b"\x02"))  # US of 1 byte: no value
        fields = parse(data, ts)
        assert fields == HeaderFields(patient_name="Doe^Jane", patient_id="odd", instance_number=5)
        ds = read_raw_dataset(data, ts)
        assert str(ds.PatientID) == "odd" and ds.InstanceNumber == 5


def test_length_past_the_end(parse: Parse) -> None:
    enc = Encoder()
    head = enc.element(0x00080060, "CS", pad("CT"))
    data = head + enc.element(0x00100010, "PN", b"Doe^Jane", length=1000)
    with pytest.raises(HeaderError, match=r"value of \(0010,0010\) at byte offset 10 "
                                          r"\(length 1000\) runs past the end of the data"):
        parse(data, EXPLICIT_LE)
    with pytest.raises(IncompleteHeader):
        parse(data, EXPLICIT_LE, complete=False)
    # a defined-length item past the end of the data
    data = head + enc.sequence(0x00081140, [enc.item(b"\0" * 8, undefined=False)])[:-12]
    with pytest.raises(HeaderError, match="item at byte offset 22"):
        parse(data[:-4], EXPLICIT_LE)
    # an undefined-length sequence never closed
    data = head + enc.header(0x00081140, "SQ", 0xFFFFFFFF)
    with pytest.raises(HeaderError, match="inside the undefined-length sequence or item "
                                          "opened at byte offset 10"):
        parse(data, EXPLICIT_LE)


def test_malformed_sequences(parse: Parse) -> None:
    enc = Encoder()
    # a data element where an item belongs
    data = enc.header(0x00081140, "SQ", 0xFFFFFFFF) + enc.element(0x00100010, "PN", b"AB")
    with pytest.raises(HeaderError, match=r"expected an item .* \(0010,0010\) at byte offset 12"):
        parse(data, EXPLICIT_LE)
    # delimiters at the top level
    for tag in (0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD):
        data = enc.element(0x00080060, "CS", b"CT") + enc.tag(tag) + b"\0\0\0\0"
        with pytest.raises(HeaderError, match="unexpected .* at byte offset 10"):
            parse(data, EXPLICIT_LE, complete=False)
    # nesting deeper than the scanner allows; one level less is fine
    for depth, ok in ((_header_py.MAX_DEPTH // 2 - 1, True), (_header_py.MAX_DEPTH, False)):
        nested = enc.element(0x00100010, "PN", b"AB")
        for _ in range(depth):
            nested = enc.sequence(0x00081140, [enc.item(nested)])
        if ok:
            assert parse(nested, EXPLICIT_LE) == HeaderFields()
        else:
            with pytest.raises(HeaderError, match="nested deeper than"):
                parse(nested, EXPLICIT_LE)


def test_un_sequence_is_implicit_inside_explicit(parse: Parse) -> None:
    # UN with undefined length: a sequence in Implicit VR LE (PS3.5 6.2.2),
    # here with a nested implicit sequence and an item whose length bytes
    # would read as a VR in explicit VR
    imp = Encoder(explicit=False)
    items = [imp.item(imp.element(0x00111002, "LO", b"AAAA")
                      + imp.sequence(0x00111003, [imp.item(imp.element(0x00100010, "PN", b"XX"))]))]
    for ts, enc in ((EXPLICIT_LE, Encoder()), (EXPLICIT_BE, Encoder(big=True))):
        data = (enc.element(0x00110010, "LO", pad("ACME"))
                + enc.header(0x00111001, "UN", 0xFFFFFFFF) + b"".join(items)
                + imp.tag(0xFFFEE0DD) + b"\0\0\0\0"
                + enc.element(0x00280010, "US", 300))
        assert parse(data, ts) == HeaderFields(rows=300)
        if ts == EXPLICIT_LE:  # pydicom reads the UN sequence of a BE dataset as BE
            assert read_raw_dataset(data, ts).Rows == 300


def test_implicit_data_sent_as_explicit_and_back(parse: Parse) -> None:
    # pydicom detects the real encoding from the first element; so do we
    implicit = small_dataset(Encoder(explicit=False))
    explicit = small_dataset(Encoder())
    for data, ts in ((implicit, EXPLICIT_LE), (explicit, IMPLICIT_LE)):
        fields = parse(data, ts)
        assert {name: getattr(fields, name) for name in SMALL_EXPECTED} == SMALL_EXPECTED
        with warnings.catch_warnings(record=True):  # pydicom warns about the switch
            warnings.simplefilter("always")
            ds = read_raw_dataset(data, ts)
        assert_matches_pydicom(fields, ds)


def test_implicit_element_inside_explicit_item(parse: Parse) -> None:
    # a sequence item written in implicit VR inside an explicit dataset
    enc, imp = Encoder(), Encoder(explicit=False)
    item = imp.item(imp.element(0x00081150, "UI", pad("1.2", "UI"))
                    + imp.element(0x00091001, "OB", b"QQ" * 10))
    data = enc.sequence(0x00081140, [item]) + enc.element(0x00200013, "IS", b"9 ")
    assert parse(data, EXPLICIT_LE) == HeaderFields(instance_number=9)


def test_deflated(parse: Parse) -> None:
    data = small_dataset(Encoder())
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = deflater.compress(data) + deflater.flush()
    expected = HeaderFields(**SMALL_EXPECTED)
    assert parse(deflated, DEFLATED_LE) == expected
    assert_matches_pydicom(expected, read_raw_dataset(deflated, DEFLATED_LE))
    # JPIP Referenced Deflate deflates its dataset too
    assert parse(deflated, "1.2.840.10008.1.2.4.95") == expected
    # a short deflate stream that reaches Pixel Data is enough
    assert parse(deflated[:-1], DEFLATED_LE) == expected
    # one that does not: more may follow, or the data is truncated
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = deflater.compress(small_dataset(Encoder(), pixel_data=False)) + deflater.flush()
    for cut in (0, 10, len(deflated) // 2, len(deflated) - 1):
        with pytest.raises(IncompleteHeader):
            parse(deflated[:cut], DEFLATED_LE, complete=False)
        with pytest.raises(HeaderError, match="deflated dataset is truncated"):
            parse(deflated[:cut], DEFLATED_LE)
    # the end of the deflate stream is the end of the dataset, whatever `complete` says
    assert parse(deflated, DEFLATED_LE) == HeaderFields(**SMALL_EXPECTED)
    assert parse(deflated, DEFLATED_LE, complete=False) == HeaderFields(**SMALL_EXPECTED)
    with pytest.raises(HeaderError, match="not valid deflate data"):
        parse(b"\xff" * 64, DEFLATED_LE)


def test_deflated_large_dataset_stops_at_pixel_data(parse: Parse) -> None:
    # the pixel data is larger than the first inflate chunk and is not needed
    enc = Encoder()
    data = (enc.element(0x00280010, "US", 512) + enc.element(0x00191010, "OB", bytes(200_000))
            + enc.element(0x7FE00010, "OW", os.urandom(1 << 20)))
    deflated = zlib.compress(data)[2:-4]  # strip the zlib header and checksum
    assert parse(deflated, DEFLATED_LE) == HeaderFields(rows=512)


def test_transfer_syntax_variants(parse: Parse) -> None:
    data = small_dataset(Encoder())
    expected = parse(data, EXPLICIT_LE)
    # encapsulated syntaxes have explicit VR LE datasets; padding is ignored
    for ts in ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.5", "1.2.3.4.private",
               EXPLICIT_LE + "\0", EXPLICIT_LE + " "):
        assert parse(data, ts) == expected
    assert parse(bytearray(data), EXPLICIT_LE) == expected
    assert parse(memoryview(data), EXPLICIT_LE) == expected


@pytest.mark.parametrize(
    ("value", "number"),
    [(b"12", 12), (b" +12 ", 12), (b"-7\\8", -7), (b"12.0", 12), (b"1e2", 100),
     (b"12.5", None), (b"1A", None), (b"", None), (b"  ", None), (b"\\5", None),
     (b"99999999999999999999", 99999999999999999999), (b"12\0", 12), (b"nan", None)],
)
def test_integer_strings(parse: Parse, value: bytes, number: int | None) -> None:
    data = Encoder().element(0x00200013, "IS", value)
    assert parse(data, EXPLICIT_LE).instance_number == number


@pytest.mark.parametrize(
    ("value", "number"),
    [(b"40", 40.0), (b" -1024 ", -1024.0), (b"1.5\\2.5", 1.5), (b"1e-3", 0.001),
     (b"nan", None), (b"inf", None), (b"abc", None), (b"", None), (b"\\3", None),
     (b"+.5", 0.5), (b"1.", 1.0), (b"1e999", None), (b"1.5e", None), (b"--1", None), (b".", None),
     (b"-0", -0.0), (b"1_0", 10.0), (b"0.1234567890123456789012345678901234567890", 0.12345678901234568)],
)
def test_decimal_strings(parse: Parse, value: bytes, number: float | None) -> None:
    data = Encoder().element(0x00281052, "DS", value)
    assert parse(data, EXPLICIT_LE).rescale_intercept == number


@pytest.mark.parametrize(
    ("charset", "name", "encoding"),
    [
        ("", "Doe^John", "ascii"),
        ("ISO_IR 100", "Gérard^Müller", "latin-1"),
        ("ISO_IR 192", "Wang^XiaoDong=王^小東", "utf-8"),
        ("ISO_IR 144", "Люкceмбypг", "iso8859_5"),
        ("\\ISO 2022 IR 87", "Yamada^Tarou=山田^太郎", "iso2022_jp"),
        ("ISO_IR 100", "A\\B ", "ascii"),
        ("ISO_IR 100", "Gérard\\Müller", "latin-1"),
        ("GB18030", "Wang^XiaoDong=王^小东", "GB18030"),
    ],
)
def test_character_sets(parse: Parse, charset: str, name: str, encoding: str) -> None:
    enc = Encoder()
    raw = pad(name, encoding=encoding)
    data = (enc.element(0x00080005, "CS", pad(charset))
            + enc.element(0x00081030, "LO", raw)
            + enc.element(0x00100010, "PN", raw))
    fields = parse(data, EXPLICIT_LE)
    assert_matches_pydicom(fields, read_raw_dataset(data, EXPLICIT_LE))
    assert fields.specific_character_set == charset
    assert fields.patient_name == name.rstrip()


def test_misspelt_character_set_warns_like_pydicom(parse: Parse) -> None:
    enc = Encoder()
    data = (enc.element(0x00080005, "CS", pad("ISO-IR 100"))
            + enc.element(0x00100010, "PN", pad("Gérard", encoding="latin-1")))
    with pytest.warns(UserWarning, match="ISO-IR 100"):
        fields = parse(data, EXPLICIT_LE)
    assert fields.patient_name == "Gérard"


def test_character_set_naming_a_python_codec(parse: Parse) -> None:
    # pydicom accepts a Python codec name as Specific Character Set; a usable
    # one is used, a hostile one ("rot13", "punycode": pydicom itself raises
    # on them) falls back to the default repertoire instead of crashing.
    enc = Encoder()
    for charset, expected in (("utf-8", "Gérard"), ("rot13", "GÃ©rard"), ("punycode", "GÃ©rard"),
                              ("utf_16", "GÃ©rard"), ("undefined", "GÃ©rard")):
        data = (enc.element(0x00080005, "CS", pad(charset))
                + enc.element(0x00100010, "PN", pad("Gérard", encoding="utf-8")))
        with warnings.catch_warnings(record=True):  # pydicom warns about the odd names
            warnings.simplefilter("always")
            assert parse(data, EXPLICIT_LE).patient_name == expected, charset


def test_character_set_garbage(both: tuple[Parse, Parse]) -> None:
    """Values of any bytes in any character set decode without raising."""
    cext, py = both
    rng = random.Random(7)
    alphabet = b"\x1b$B()-AJ\\^=\xff\x80\xa4\xe9abc \x00\r\n"
    enc = Encoder()
    charsets = ["", "ISO_IR 100", "ISO_IR 192", "GB18030", "ISO 2022 IR 87", "ISO 2022 IR 149",
                "\\ISO 2022 IR 87\\ISO 2022 IR 159", "ISO 2022 IR 13\\ISO 2022 IR 87",
                "\\ISO 2022 IR 58", "ISO_IR 192\\GB18030", "ISO_IR 100\\", "\\\\", "zlib", "x" * 70,
                "ISO_IR\0 100", "ISO_IR 100\\ISO\0IR"]
    for charset in charsets:
        for _ in range(100):
            raw = bytes(rng.choice(alphabet) for _ in range(rng.randrange(20)))
            data = (enc.element(0x00080005, "CS", pad(charset))
                    + enc.element(0x00100010, "PN", raw) + enc.element(0x00100020, "LO", raw))
            with warnings.catch_warnings(record=True):  # pydicom warns on undecodable bytes
                warnings.simplefilter("always")
                result = py(data, EXPLICIT_LE)
                assert cext(data, EXPLICIT_LE) == result


# -- garbage ---------------------------------------------------------------------------------


def test_random_bytes_and_mutations(both: tuple[Parse, Parse]) -> None:
    """Never a crash, a hang or another exception; both twins agree."""
    cext, py = both
    rng = random.Random(20240601)
    bases = [(small_dataset(enc), ts) for ts, enc in ENCODINGS.values()]
    cases: list[tuple[bytes, str]] = []
    syntaxes = [ts for ts, _enc in ENCODINGS.values()]
    for _ in range(300):
        cases.append((rng.randbytes(rng.randrange(0, 400)), rng.choice(syntaxes)))
    for _ in range(1500):
        data, ts = rng.choice(bases)
        mutated = bytearray(data)
        for _ in range(rng.randrange(1, 5)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        if rng.random() < 0.3:
            del mutated[rng.randrange(len(mutated)):]
        cases.append((bytes(mutated), ts))
    for data, ts in cases:
        for complete in (True, False):
            with warnings.catch_warnings(record=True):  # garbage charsets warn in pydicom
                warnings.simplefilter("always")
                result = outcome(py, data, ts, complete)
                assert outcome(cext, data, ts, complete) == result, (data, ts, complete)
            if isinstance(result, HeaderFields):
                offset = result.pixel_data_offset
                tag = PIXEL_DATA_TAG[ts == EXPLICIT_BE]
                assert offset is None or data[offset : offset + 4] == tag


def test_error_messages_name_the_offset(parse: Parse) -> None:
    data = small_dataset(Encoder())
    cut = data.index(pad("ID42 ")) + 2
    with pytest.raises(HeaderError) as info:
        parse(data[:cut], EXPLICIT_LE)
    assert "(0010,0020)" in str(info.value)
    assert f"byte offset {data.index(pad('ID42 ')) - 8}" in str(info.value)


# -- generated with pydicom ----------------------------------------------------------------------


def _ct_dataset() -> pydicom.Dataset:
    path = pydicom.data.get_testdata_file("CT_small.dcm")
    return pydicom.dcmread(path)


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_pydicom_written_ct(parse: Parse, encoding: str) -> None:
    ts, enc = ENCODINGS[encoding]
    ds = _ct_dataset()
    ds.WindowCenter = [40, 400]
    ds.WindowWidth = "350.5"
    ds.EchoNumbers = None
    ds.RequestingPhysician = "Who^Doctor"
    fp = DicomBytesIO()
    fp.is_little_endian = not enc.big
    fp.is_implicit_VR = not enc.explicit
    write_dataset(fp, ds)
    data = fp.getvalue()
    fields = parse(data, ts)
    # as read back: an implicit VR "US or SS" element has no VR in the data
    assert_matches_pydicom(fields, read_raw_dataset(data, ts))
    assert fields.window_center == 40.0 and fields.requesting_physician == "Who^Doctor"
    assert data[fields.pixel_data_offset : fields.pixel_data_offset + 4] == PIXEL_DATA_TAG[enc.big]
    assert msgspec.json.decode(msgspec.json.encode(fields), type=HeaderFields) == fields


# -- the attribute map ------------------------------------------------------------------------


def map_dataset(enc: Encoder) -> bytes:
    """Elements of every kept VR, values that need JSON escapes, and elements the map leaves out."""
    e = ">" if enc.big else "<"
    parts = [
        enc.element(0x00080005, "CS", pad("ISO_IR 100")),
        enc.element(0x00080012, "DA", pad("20240102")),  # DA
        enc.element(0x00080013, "TM", pad(" 101010.5")),  # TM, leading space stripped
        enc.element(0x00080014, "UI", pad("1.2.3", "UI")),  # UI, NUL padding
        enc.element(0x00080054, "AE", pad("AE1\\AE2 ")),  # AE, two values
        enc.element(0x00080070, "LO", pad('Maker "Q"\\back')),  # quotes, two values
        enc.element(0x00080080, "LO", pad("Hôpital Zürich", encoding="latin-1")),  # charset text
        enc.element(0x00081010, "SH", pad("")),  # empty: left out
        enc.element(0x00081048, "PN", pad("Phys^One \\Phys^Two")),  # PN, two values
        enc.element(0x00081080, "LO", pad("a\x01b\x1fc")),  # control characters
        enc.element(0x00090010, "LO", pad("PRIVATE")),  # private creator: left out
        enc.element(0x00091001, "LO", pad("private")),  # private: left out
        enc.element(0x00100000, "UL", struct.pack(e + "I", 8)),  # group length: left out
        enc.element(0x00101010, "AS", pad("042Y")),
        enc.element(0x0008002A, "DT", pad("20240102101010.5+0100")),
        enc.element(0x00186020, "SL", struct.pack(e + "i", -70000)),
        enc.element(0x00080119, "UC", pad("long code\\second")),
        enc.element(0x00720071, "UR", pad("http://x/a b ")),
        enc.element(0x00101030, "DS", pad(" 70.5\\80 ")),  # DS, two values, spaces
        enc.element(0x00104000, "LT", pad("line1\r\nline2 \\ not a separator")),  # LT: one value
        enc.element(0x00180060, "DS", pad("120")),
        enc.element(0x00181020, "UT", pad("x" * 5000)),  # longer than MAP_MAX_VALUE: left out
        enc.element(0x00181151, "IS", pad("-300")),
        enc.element(0x00189345, "FD", struct.pack(e + "d", 0.1)),  # FD
        enc.element(0x00189306, "FD", struct.pack(e + "2d", -1.5, 2.25)),  # FD, two values
        enc.element(0x00181160, "SH", pad("FILTER")),
        enc.element(0x00200032, "DS", pad("-125.5\\-130\\40")),
        enc.element(0x00209241, "FL", struct.pack(e + "f", 0.3)),  # FL: float32's repr
        enc.element(0x00280030, "DS", pad("0.5\\0.5")),
        enc.element(0x00280101, "US", 12),  # a FIELDS element: its own column, not in the map
        enc.element(0x00280102, "US", 11),  # US
        enc.element(0x00280106, "US", 7),  # "US or SS": kept in explicit VR only
        enc.element(0x00281041, "SS", struct.pack(e + "h", -2)),  # SS
        enc.element(0x00380010, "LO", pad("ADM1")),
        enc.element(0x00400244, "DA", pad("20240102")),
        enc.element(0x00400253, "SH", pad("PPS1")),
        enc.element(0x00540081, "US", struct.pack(e + "3H", 1, 2, 65535)),  # US, three values
        enc.element(0x00660031, "LO", pad("")),
        enc.element(0x00686210, "LO", pad("d")),
        enc.element(0x00720064, "IS", pad("5")),
        enc.element(0x00089123, "UI", pad("1.2", "UI")),
        enc.element(0x0040A30A, "DS", pad("1")),
        enc.element(0x00400009, "SH", pad("SPS")),
        enc.element(0x00080201, "SH", pad("+0100")),
        enc.element(0x00180015, "CS", pad("CHEST")),  # a FIELDS element
        enc.element(0x00189313, "FD", struct.pack(e + "3d", 1.0, 2.0, 3.0)),
        enc.element(0x00100218, "UT", pad("ut text ")),
        enc.element(0x00081030, "LO", pad("Study")),  # a FIELDS element
        enc.element(0x0008010D, "UI", pad("1.2.4", "UI")),
        enc.element(0x00720082, "SV", struct.pack(e + "q", -(1 << 63))),  # SV at its minimum
        enc.element(0x00720083, "UV", struct.pack(e + "Q", (1 << 64) - 1)),  # UV at its maximum
        enc.element(0x00420011, "OB", b"\x01\x02"),  # bytes: left out
        enc.element(0x0072FFF0, "UN", b"\x01\x02"),  # unknown VR: left out
        enc.element(0x00180050, "DS", pad("5.0")),
        enc.element(0x7FE00010, "OW", b"\x00\x01" * 4),
    ]
    # the scan reads the elements in the order they come; keep them sorted by tag as a dataset is
    heads = sorted(parts[:-1], key=lambda p: struct.unpack(e + "HH", p[:4]))
    return b"".join(heads) + parts[-1]


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_attribute_map(parse: Parse, encoding: str) -> None:
    ts, enc = ENCODINGS[encoding]
    data = map_dataset(enc)
    fields = parse(data, ts)
    got = json.loads(fields.attributes)
    assert got == pydicom_map(read_raw_dataset(data, ts))
    assert fields.attributes.startswith('{"00080012":"20240102",')  # tags in data order, 8 upper-case hex digits
    assert got["00080013"] == "101010.5" and got["00080014"] == "1.2.3" and got["00080054"] == "AE1\\AE2"
    assert got["00080070"] == 'Maker "Q"\\back' and got["00080080"] == "Hôpital Zürich"
    assert got["00081048"] == "Phys^One\\Phys^Two" and got["00081080"] == "a\x01b\x1fc"
    assert got["00101030"] == "70.5\\80" and got["00104000"] == "line1\r\nline2 \\ not a separator"
    assert got["00189306"] == "-1.5\\2.25" and got["00209241"] == repr(struct.unpack("f", struct.pack("f", 0.3))[0])
    assert got["00540081"] == "1\\2\\65535" and got["00281041"] == "-2"
    assert got["00720082"] == str(-(1 << 63)) and got["00720083"] == str((1 << 64) - 1)
    left_out = {"00081010", "00090010", "00091001", "00100000", "00181020", "00280101", "00180015", "00081030",
                "00420011", "0072FFF0", "00660031"}
    assert not left_out & set(got)
    # "US or SS" has no VR to go by in implicit VR
    assert ("00280106" in got) == enc.explicit


def test_attribute_map_is_bounded(both: tuple[Parse, Parse]) -> None:
    """A hostile header: at most MAP_MAX_ELEMENTS elements and MAP_MAX_CHARS characters, the twins alike."""
    enc = Encoder()
    many = b"".join(enc.element(0x00400000 + n * 2 + 2, "LO", pad(f"v{n}")) for n in range(700))
    long = b"".join(enc.element(0x00400000 + n * 2 + 2, "UT", pad("\\" * 4000)) for n in range(40))
    cext, py = both
    for data in (many, long):
        fields = py(data, EXPLICIT_LE)
        assert cext(data, EXPLICIT_LE) == fields
        assert len(fields.attributes) <= _header_py.MAP_MAX_CHARS
        assert len(json.loads(fields.attributes)) <= _header_py.MAP_MAX_ELEMENTS
    assert len(json.loads(py(many, EXPLICIT_LE).attributes)) == _header_py.MAP_MAX_ELEMENTS
    assert len(json.loads(py(long, EXPLICIT_LE).attributes)) == _header_py.MAP_MAX_CHARS // 8014
