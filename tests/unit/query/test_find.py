"""C-FIND matching (PS3.4 C.2.2.2) against a real index of real files.

The index is built from synthetic series and pydicom's test files (see
tests/unit/index/test_index.py: make_storage); the identifiers are pydicom Datasets as
fastscp.net.findscp decodes them from a C-FIND-RQ.
"""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from fastscp.index.database import Index
from fastscp.net.findscp import decode_identifier, encode_identifier
from fastscp.query.cfind import (
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
    PATIENT_ROOT_FIND,
    PENDING,
    PENDING_WARNING,
    STUDY_ROOT_FIND,
    IdentifierError,
    find,
)
from fastscp.query.client import LocalQueryClient, finder
from tests.conftest import dcmtk
from tests.unit.index.test_index import make_storage, records_of

CT_SMALL_STUDY = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
MR_SMALL_STUDY = "1.3.6.1.4.1.5962.1.2.4.20040826185059.5457"


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> LocalQueryClient:  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("find")
    storage = make_storage(folder / "storage")
    index = Index(str(folder / "index.duckdb"))
    index.add(records_of(storage))
    index.close()
    with LocalQueryClient(str(folder / "index.duckdb")) as opened:
        yield opened


def identifier(level: str, **keys: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def matches(client: LocalQueryClient, model: str, ds: Dataset) -> list[Dataset]:
    return list(find(model, ds, client))


def test_study_level_wildcard_on_person_name_is_case_insensitive(client) -> None:  # type: ignore[no-untyped-def]
    found = matches(client, STUDY_ROOT_FIND, identifier(
        "STUDY", PatientName="synth*", PatientID="", StudyInstanceUID="", NumberOfStudyRelatedInstances=""))
    assert sorted((m.PatientID, m.NumberOfStudyRelatedInstances) for m in found) == [("SYNA", 4), ("SYNB", 3)]
    for m in found:
        # Exactly the requested keys, plus the level.
        assert [e.keyword for e in m] == ["QueryRetrieveLevel", "PatientName", "PatientID", "StudyInstanceUID",
                                          "NumberOfStudyRelatedInstances"]
        assert m.QueryRetrieveLevel == "STUDY" and m.PatientName == "Synthetic^Patient"


def test_patient_level_with_derived_counts(client) -> None:  # type: ignore[no-untyped-def]
    found = matches(client, PATIENT_ROOT_FIND, identifier(
        "PATIENT", PatientID="SYN?", PatientName="", NumberOfPatientRelatedStudies="",
        NumberOfPatientRelatedSeries="", NumberOfPatientRelatedInstances=""))
    assert sorted((m.PatientID, m.NumberOfPatientRelatedStudies, m.NumberOfPatientRelatedSeries,
                   m.NumberOfPatientRelatedInstances) for m in found) == [("SYNA", 1, 1, 4), ("SYNB", 1, 1, 3)]


@pytest.mark.parametrize(("value", "expected"), [
    ("20040119", {"1CT1"}),
    ("20040101-20041231", {"1CT1", "4MR1", "8NM1"}),
    ("-20040201", {"1CT1"}),
    ("20040801-", {"4MR1", "8NM1", "SYNA", "SYNB"}),
    ("20040826-20040826", {"4MR1", "8NM1"}),
])
def test_study_date_single_value_and_range_matching(client, value, expected) -> None:  # type: ignore[no-untyped-def]
    found = matches(client, STUDY_ROOT_FIND, identifier("STUDY", StudyDate=value, PatientID=""))
    assert {m.PatientID for m in found} == expected


def test_study_time_range_includes_the_bound_it_prefixes(client) -> None:  # type: ignore[no-untyped-def]
    found = matches(client, STUDY_ROOT_FIND, identifier("STUDY", StudyTime="1159-1200", PatientID="SYN*"))
    assert {m.PatientID for m in found} == {"SYNA", "SYNB"}  # StudyTime 120000


def test_list_of_uid_matching(client) -> None:  # type: ignore[no-untyped-def]
    found = matches(client, STUDY_ROOT_FIND, identifier(
        "STUDY", StudyInstanceUID=[CT_SMALL_STUDY, MR_SMALL_STUDY, "9.9.9"], StudyDate=""))
    assert sorted((m.StudyInstanceUID, m.StudyDate) for m in found) == [
        (CT_SMALL_STUDY, "20040119"), (MR_SMALL_STUDY, "20040826")]


def test_wildcards_are_literal_on_uids_and_values_never_become_sql(client) -> None:  # type: ignore[no-untyped-def]
    literal = identifier("STUDY")
    literal.add_new(0x0020000D, "UI", "")
    literal["StudyInstanceUID"]._value = "1.3.6*"  # as decoded from the wire: pydicom would refuse to set it
    assert matches(client, STUDY_ROOT_FIND, literal) == []
    assert matches(client, STUDY_ROOT_FIND, identifier("STUDY", PatientName="O'Brien*' OR 1=1 --")) == []
    assert matches(client, STUDY_ROOT_FIND, identifier("STUDY", PatientID="%")) == []  # % is not a wildcard


def test_universal_matching_returns_the_attribute(client) -> None:  # type: ignore[no-untyped-def]
    found = matches(client, STUDY_ROOT_FIND, identifier("STUDY", PatientID="*", AccessionNumber=""))
    assert len(found) == len({m.StudyInstanceUID for m in found}) >= 7
    assert {m.AccessionNumber for m in found if m.PatientID == "SYNA"} == {"ACC0001"}


def test_modalities_in_study(client) -> None:  # type: ignore[no-untyped-def]
    found = matches(client, STUDY_ROOT_FIND, identifier("STUDY", ModalitiesInStudy="MR", PatientID=""))
    assert sorted(m.PatientID for m in found) == ["4MR1", "SYNB"]
    assert {m.ModalitiesInStudy for m in found} == {"MR"}
    either = matches(client, STUDY_ROOT_FIND, identifier("STUDY", ModalitiesInStudy=["CT", "NM"], PatientID=""))
    assert sorted(m.PatientID for m in either) == ["1CT1", "8NM1", "SYNA"]


def test_series_and_image_levels_are_hierarchical(client) -> None:  # type: ignore[no-untyped-def]
    (study,) = matches(client, STUDY_ROOT_FIND, identifier("STUDY", PatientID="SYNA", StudyInstanceUID=""))
    (series,) = matches(client, STUDY_ROOT_FIND, identifier(
        "SERIES", StudyInstanceUID=study.StudyInstanceUID, SeriesInstanceUID="", Modality="",
        NumberOfSeriesRelatedInstances=""))
    assert (series.Modality, series.NumberOfSeriesRelatedInstances) == ("CT", 4)
    images = matches(client, STUDY_ROOT_FIND, identifier(
        "IMAGE", StudyInstanceUID=study.StudyInstanceUID, SeriesInstanceUID=series.SeriesInstanceUID,
        InstanceNumber="", SOPClassUID=""))
    assert sorted(m.InstanceNumber for m in images) == [1, 2, 3, 4]
    assert all("SOPInstanceUID" in m for m in images), "the level's unique key is always returned"
    with pytest.raises(IdentifierError, match="needs StudyInstanceUID") as refused:
        find(STUDY_ROOT_FIND, identifier("SERIES", Modality="CT"), client)
    assert refused.value.status == IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    with pytest.raises(IdentifierError, match="needs PatientID"):
        find(PATIENT_ROOT_FIND, identifier("STUDY", StudyDate=""), client)
    with pytest.raises(ValueError, match="Query/Retrieve Level 'PATIENT'"):
        find(STUDY_ROOT_FIND, identifier("PATIENT", PatientID=""), client)
    # Patient Root, all the way down.
    (image,) = matches(client, PATIENT_ROOT_FIND, identifier(
        "IMAGE", PatientID="SYNA", StudyInstanceUID=study.StudyInstanceUID,
        SeriesInstanceUID=series.SeriesInstanceUID, InstanceNumber="3", Rows=None))
    assert (image.InstanceNumber, image.Rows) == (3, 16)


def test_unsupported_keys_and_sequences_come_back_empty(client) -> None:  # type: ignore[no-untyped-def]
    ds = identifier("STUDY", PatientID="1CT1", InstitutionName="", StudyInstanceUID="")
    ds.ReferencedStudySequence = Sequence([])
    ds.add_new(0x00091001, "LO", "private")
    ds.add_new(0x00281201, "OW", b"")  # Red Palette Color Lookup Table Data: binary, not in the attribute map
    responses = find(STUDY_ROOT_FIND, ds, client)
    assert responses.pending_status == PENDING_WARNING
    (match,) = list(responses)
    assert match.ReferencedStudySequence == []
    assert match[0x00091001].value in (None, "") and match[0x00281201].value in (None, b"")
    # Institution Name has no column: it comes from the attribute map (it was unsupported before).
    assert match.InstitutionName == "JFK IMAGING CENTER"
    plain = find(STUDY_ROOT_FIND, identifier("STUDY", PatientID="1CT1"), client)
    assert plain.pending_status == PENDING


def test_non_ascii_values_get_utf8_and_survive_encoding(client) -> None:  # type: ignore[no-untyped-def]
    ds = identifier("STUDY", PatientName="Wang*", PatientID="")
    (match,) = matches(client, STUDY_ROOT_FIND, ds)
    assert match.SpecificCharacterSet == "ISO_IR 192"
    assert str(match.PatientName) == "Wang^XiaoDong=王^小東"
    for syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"):
        decoded = decode_identifier(encode_identifier(match, syntax), syntax)
        assert str(decoded.PatientName) == "Wang^XiaoDong=王^小東"
    latin = matches(client, STUDY_ROOT_FIND, identifier("STUDY", PatientName="äneas*", PatientID=""))
    assert [str(m.PatientName) for m in latin] == ["Äneas^Rüdiger"]


@pytest.mark.dcmtk
def test_find_through_a_running_server(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fastscp.dicom.synthetic import write_series
    from fastscp.query.client import QueryClient

    server = start_server(workers=1)
    files = write_series(str(tmp_path / "send"), 3, rows=16, columns=16, patient_id="FINDME")
    dcmtk("storescu", "-aec", server.ae_title, "-xe", "127.0.0.1", str(server.port), *files)
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    find_in_index = finder(str(server.index), retrieve_ae_title=server.ae_title)
    query = identifier("STUDY", PatientID="FIND*", StudyInstanceUID="", NumberOfStudyRelatedInstances="",
                       RetrieveAETitle="")
    deadline = time.monotonic() + 20
    while True:
        found = list(find_in_index(STUDY_ROOT_FIND, query))
        if found and found[0].NumberOfStudyRelatedInstances == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    (match,) = found
    assert (match.StudyInstanceUID, match.RetrieveAETitle) == (study, server.ae_title)
    assert QueryClient(str(server.index)).stats().indexer is not None  # answered by the server's indexer
    assert server.stop() == 0


def test_values_of_the_attribute_map_take_their_vr_form() -> None:
    from fastscp.query.cfind import _value

    # A backslash separates values, except in the text VRs where it is text (PS3.5 6.2).
    assert _value("left\\right", "LT") == "left\\right" and _value("a\\b", "UT") == "a\\b"
    assert _value("-100\\-120.5\\5", "DS") == ["-100", "-120.5", "5"]
    assert _value("1\\2\\65535", "US") == [1, 2, 65535] and _value("+12", "IS") == 12
    assert _value("0.30000001192092896", "FL") == 0.30000001192092896 and _value("x", "FD") is None
