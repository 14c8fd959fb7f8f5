"""C-FIND over the network with dcmtk findscu: Patient Root and Study Root, every
level, DICOM matching, answered from the index while stores go on."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from fastscp.dicom.sopclasses import STUDY_ROOT_FIND
from fastscp.dicom.synthetic import write_series
from fastscp.query.client import QueryClient
from tests.conftest import dcmtk, wait_until

pytestmark = pytest.mark.dcmtk


@pytest.fixture
def archive(start_server, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A server holding two patients: SYN_A with two CT series (one study), SYN_B with one MR series."""
    server = start_server()
    files = write_series(str(tmp_path / "a1"), 3, rows=32, columns=32, patient_id="SYN_A", seed=1)
    files += write_series(str(tmp_path / "b1"), 2, rows=32, columns=32, patient_id="SYN_B", modality="MR",
                          sop_class="1.2.840.10008.5.1.4.1.1.4", seed=2)
    dcmtk("storescu", "-aec", server.ae_title, "-xe", "127.0.0.1", str(server.port), *files)
    deadline = time.monotonic() + 30
    client = QueryClient(str(server.index))
    while client.stats().instances < 5:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the index did not catch up"
        time.sleep(0.1)
    return server


def findscu(server, tmp_path: Path, model: str, *keys: str) -> list[pydicom.Dataset]:  # type: ignore[no-untyped-def]
    out = tmp_path / f"rsp-{time.monotonic_ns()}"
    out.mkdir()
    argv = ["findscu", model, "-aec", server.ae_title, "-X", "-od", str(out)]
    for key in keys:
        argv += ["-k", key]
    dcmtk(*argv, server.host, str(server.port))
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def test_patient_root_patient_level_with_wildcards(archive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    found = findscu(archive, tmp_path, "-P", "QueryRetrieveLevel=PATIENT", "PatientID=SYN_*", "PatientName",
                    "NumberOfPatientRelatedStudies")
    assert sorted(ds.PatientID for ds in found) == ["SYN_A", "SYN_B"]
    assert all(str(ds.PatientName) == "Synthetic^Patient" for ds in found)
    assert [int(ds.NumberOfPatientRelatedStudies) for ds in found] == [1, 1]
    assert findscu(archive, tmp_path, "-P", "QueryRetrieveLevel=PATIENT", "PatientID=NOBODY") == []


def test_study_root_study_level_date_range_and_counts(archive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    found = findscu(archive, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "StudyDate=20251201-20260131",
                    "PatientID=SYN_A", "StudyInstanceUID", "ModalitiesInStudy", "NumberOfStudyRelatedInstances")
    (study,) = found
    assert study.PatientID == "SYN_A" and int(study.NumberOfStudyRelatedInstances) == 3
    assert findscu(archive, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "StudyDate=-20251231",
                   "StudyInstanceUID") == []
    assert len(findscu(archive, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "StudyDate=20260101-",
                       "StudyInstanceUID")) == 2


def test_series_and_image_levels(archive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (study,) = findscu(archive, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "PatientID=SYN_B", "StudyInstanceUID")
    (series,) = findscu(archive, tmp_path, "-S", "QueryRetrieveLevel=SERIES",
                        f"StudyInstanceUID={study.StudyInstanceUID}", "SeriesInstanceUID", "Modality")
    assert series.Modality == "MR"
    images = findscu(archive, tmp_path, "-S", "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study.StudyInstanceUID}",
                     f"SeriesInstanceUID={series.SeriesInstanceUID}", "SOPInstanceUID", "InstanceNumber")
    assert sorted(int(ds.InstanceNumber) for ds in images) == [1, 2]
    # List of UID matching.
    uids = "\\".join(ds.SOPInstanceUID for ds in images)
    again = findscu(archive, tmp_path, "-S", "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study.StudyInstanceUID}",
                    f"SeriesInstanceUID={series.SeriesInstanceUID}", f"SOPInstanceUID={uids}")
    assert sorted(ds.SOPInstanceUID for ds in again) == sorted(ds.SOPInstanceUID for ds in images)


def test_find_while_stores_run(archive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    files = write_series(str(tmp_path / "more"), 30, rows=64, columns=64, patient_id="SYN_C", seed=3)
    store = subprocess.Popen(["storescu", "-aec", archive.ae_title, "-xe", "127.0.0.1", str(archive.port), *files],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for _ in range(5):
            found = findscu(archive, tmp_path, "-P", "QueryRetrieveLevel=PATIENT", "PatientID=SYN_A")
            assert [ds.PatientID for ds in found] == ["SYN_A"]
    finally:
        output, _ = store.communicate(timeout=120)
    assert store.returncode == 0, output
    assert len(archive.stored_files()) == 35


# -- per-study patient attributes, multi-valued attributes, relational queries (issue 17) --------------


def _instance(folder: Path, patient_id: str | None, name: str, study_date: str, seed: int, **extra: object) -> str:
    """One CT of a new study, made by pydicom; ``patient_id`` None: no Patient ID element."""
    (path,) = write_series(str(folder), 1, rows=8, columns=8, patient_id=patient_id or "X", seed=seed)
    ds = pydicom.dcmread(path)
    if patient_id is None:
        del ds.PatientID
    else:
        ds.PatientID = patient_id
    ds.PatientName = name
    ds.StudyDate = study_date
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def patients(start_server, tmp_path: Path):  # type: ignore[no-untyped-def]
    """P008 stored as Smith^Jane (2020) then Jones^Jane (2023); two patients without a Patient ID.

    The 2020 study arrives last, so a newest-wins patient row says Smith.
    """
    server = start_server()
    files = [
        _instance(tmp_path / "jones", "P008", "Jones^Jane", "20230101", 1),
        _instance(tmp_path / "absent", None, "Absent^Id", "20210101", 2),
        _instance(tmp_path / "empty", "", "Empty^Id", "20220101", 3, ImageType=["ORIGINAL", "PRIMARY", "AXIAL"],
                  WindowCenter=["40", "400"], WindowWidth=["350", "1500.5"]),
        _instance(tmp_path / "smith", "P008", "Smith^Jane", "20200101", 4),
    ]
    for path in files:  # one association each: the arrival order is the list's
        dcmtk("storescu", "-aec", server.ae_title, "-xe", "127.0.0.1", str(server.port), path)
    wait_until(lambda: QueryClient(str(server.index)).stats().instances == 4,  # type: ignore[attr-defined]
               what="the stores to be indexed")
    return server


def test_study_root_matches_and_returns_each_studys_own_patient_name(patients, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for name in ("Smith^Jane", "Jones^Jane"):
        found = findscu(patients, tmp_path, "-S", "QueryRetrieveLevel=STUDY", f"PatientName={name}", "PatientID",
                        "StudyDate")
        assert [(str(ds.PatientName), ds.PatientID) for ds in found] == [(name, "P008")]
    found = findscu(patients, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "PatientID=P008", "PatientName",
                    "StudyDate")
    assert sorted((ds.StudyDate, str(ds.PatientName)) for ds in found) == [
        ("20200101", "Smith^Jane"), ("20230101", "Jones^Jane")]


def test_patients_without_a_patient_id_are_never_merged(patients, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    found = findscu(patients, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "PatientName=*Id", "PatientID", "StudyDate")
    assert sorted((str(ds.PatientName), ds.PatientID) for ds in found) == [("Absent^Id", ""), ("Empty^Id", "")]
    found = findscu(patients, tmp_path, "-P", "QueryRetrieveLevel=PATIENT", "PatientName", "PatientID",
                    "NumberOfPatientRelatedStudies")
    assert sorted((str(ds.PatientName), ds.PatientID, int(ds.NumberOfPatientRelatedStudies)) for ds in found) == [
        ("Absent^Id", "", 1), ("Empty^Id", "", 1), ("Jones^Jane", "P008", 2)]


def test_patient_root_keeps_every_name_matchable(patients, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # One patient per Patient ID; each name it was stored under finds it, and
    # the answer shows the name that matched (else the latest study's).
    for name in ("Smith^Jane", "Jones^Jane", "smith*"):
        found = findscu(patients, tmp_path, "-P", "QueryRetrieveLevel=PATIENT", f"PatientName={name}", "PatientID",
                        "NumberOfPatientRelatedStudies")
        assert [(ds.PatientID, int(ds.NumberOfPatientRelatedStudies)) for ds in found] == [("P008", 2)], name
        assert str(found[0].PatientName).lower().startswith(name.rstrip("*").lower()[:5])
    (p008,) = findscu(patients, tmp_path, "-P", "QueryRetrieveLevel=PATIENT", "PatientID=P008", "PatientName")
    assert str(p008.PatientName) == "Jones^Jane"  # the latest study (by Study Date), though it arrived first
    studies = findscu(patients, tmp_path, "-P", "QueryRetrieveLevel=STUDY", "PatientID=P008", "PatientName",
                      "StudyDate")
    assert sorted((ds.StudyDate, str(ds.PatientName)) for ds in studies) == [
        ("20200101", "Smith^Jane"), ("20230101", "Jones^Jane")]


def test_multi_valued_attributes_come_back_with_every_value(patients, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (study,) = findscu(patients, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "StudyDate=20220101",
                       "StudyInstanceUID")
    (series,) = findscu(patients, tmp_path, "-S", "QueryRetrieveLevel=SERIES",
                        f"StudyInstanceUID={study.StudyInstanceUID}", "SeriesInstanceUID")
    keys = ("-S", "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study.StudyInstanceUID}",
            f"SeriesInstanceUID={series.SeriesInstanceUID}")
    (image,) = findscu(patients, tmp_path, *keys, "WindowCenter", "WindowWidth", "ImageType", "SOPInstanceUID")
    assert image["WindowCenter"].VM == 2 and [str(v) for v in image.WindowCenter] == ["40", "400"]
    assert [float(v) for v in image.WindowWidth] == [350.0, 1500.5]
    assert list(image.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    # A single value matches a multi-valued attribute when any of its values does.
    for key in ("WindowCenter=400", "WindowWidth=1500.5", "ImageType=AXIAL", "ImageType=PRIM*"):
        assert len(findscu(patients, tmp_path, *keys, key)) == 1, key
    for key in ("WindowCenter=41", "ImageType=DERIVED"):
        assert findscu(patients, tmp_path, *keys, key) == [], key


def _pynetdicom_find(server, level: str, relational: bool,  # type: ignore[no-untyped-def]
                     **keys: str) -> tuple[list[pydicom.Dataset], set[int], bytes]:
    """A Study Root C-FIND through pynetdicom: (matches, statuses, the relational-queries byte the SCP answered)."""
    from pynetdicom import AE
    from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation

    from fastscp.net.scu import associate

    ae = AE(ae_title="FINDSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(STUDY_ROOT_FIND)
    extended = []
    if relational:
        item = SOPClassExtendedNegotiation()
        item.sop_class_uid = STUDY_ROOT_FIND
        item.service_class_application_information = b"\x01\x00"
        extended.append(item)
    assoc = associate(ae, "127.0.0.1", server.port, ae_title=server.ae_title, ext_neg=extended)
    assert assoc.is_established
    try:
        answered = {str(i.sop_class_uid): bytes(i.service_class_application_information)
                    for i in assoc.acceptor.user_information if isinstance(i, SOPClassExtendedNegotiation)}
        query = pydicom.Dataset()
        query.QueryRetrieveLevel = level
        for keyword, value in keys.items():
            setattr(query, keyword, value)
        found, statuses = [], set()
        for status, identifier in assoc.send_c_find(query, STUDY_ROOT_FIND):
            statuses.add(int(status.Status))
            if identifier is not None:
                found.append(identifier)
    finally:
        assoc.release()
    return found, statuses, answered.get(STUDY_ROOT_FIND, b"")


def test_relational_queries_when_negotiated(patients) -> None:  # type: ignore[no-untyped-def]
    # Without the negotiation a SERIES query needs the Study Instance UID (hierarchical: 0xA900).
    found, statuses, answered = _pynetdicom_find(patients, "SERIES", False, PatientName="Smith^Jane",
                                                 SeriesInstanceUID="", Modality="")
    assert (found, statuses, answered) == ([], {0xA900}, b"")
    found, statuses, answered = _pynetdicom_find(patients, "SERIES", True, PatientName="Smith^Jane",
                                                 SeriesInstanceUID="", Modality="")
    assert answered == b"\x01\x00"
    assert statuses == {0xFF00, 0x0000} and [(ds.Modality, str(ds.PatientName)) for ds in found] == [
        ("CT", "Smith^Jane")]
    # An IMAGE query with only the Study Instance UID (and a key of the level above the series).
    (study,) = _pynetdicom_find(patients, "STUDY", False, StudyDate="20220101", StudyInstanceUID="")[0]
    found, statuses, _ = _pynetdicom_find(patients, "IMAGE", True, StudyInstanceUID=study.StudyInstanceUID,
                                          SOPInstanceUID="", WindowCenter="")
    assert statuses == {0xFF00, 0x0000} and [list(map(str, ds.WindowCenter)) for ds in found] == [["40", "400"]]


def test_query_and_stats_use_the_same_per_study_semantics(patients, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    from fastscp.cli import index as cli_index

    def query(*argv: str) -> list[dict[str, object]]:
        assert cli_index.main(["query", *argv, "--index-db", str(patients.index), "--json"]) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    assert [row["StudyDate"] for row in query("studies", "--patient-name", "Smith^Jane")] == ["20200101"]
    assert sorted((row["PatientName"], row["StudyDate"]) for row in query("studies", "--patient-id", "P008")) == [
        ("Jones^Jane", "20230101"), ("Smith^Jane", "20200101")]
    assert sorted((row["PatientName"], row["NumberOfPatientRelatedStudies"]) for row in query("patients")) == [
        ("Absent^Id", 1), ("Empty^Id", 1), ("Jones^Jane", 2)]
    assert [row["PatientName"] for row in query("patients", "--patient-name", "smith*")] == ["Smith^Jane"]
    assert cli_index.main(["stats", "--index-db", str(patients.index), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["patients"], stats["studies"], stats["instances"]) == (3, 4, 4)


def test_sql_is_read_only_with_every_output_format(patients, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import csv
    import io
    import json

    import pyarrow.parquet as pq

    from fastscp.cli import index as cli_index

    def sql(statement: str, *options: str) -> tuple[int, str, str]:
        status = cli_index.main(["sql", statement, "--index-db", str(patients.index), *options])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    names = "SELECT patient_name, study_date FROM studies WHERE patient_id = 'P008' ORDER BY study_date"
    for running in (True, False):  # through the server's indexer, then on the stopped server's file
        status, out, _ = sql(names, "--format", "csv")
        assert status == 0 and list(csv.reader(io.StringIO(out))) == [
            ["patient_name", "study_date"], ["Smith^Jane", "20200101"], ["Jones^Jane", "20230101"]], running
        status, out, _ = sql("SELECT count(*) AS n, max(window_center_values) AS wc FROM instances", "--format", "json")
        assert status == 0 and json.loads(out) == {"n": 4, "wc": "40\\400"}
        status, out, _ = sql("SELECT patient_name FROM patients ORDER BY 1")
        assert status == 0 and out.split() == ["patient_name", "Absent^Id", "Empty^Id", "Jones^Jane"]
        target = tmp_path / f"rows-{running}.parquet"
        assert sql(names, "--format", "parquet", "--output", str(target))[0] == 0
        assert pq.read_table(target).to_pydict() == {"patient_name": ["Smith^Jane", "Jones^Jane"],
                                                     "study_date": ["20200101", "20230101"]}
        for statement in ("DELETE FROM instances", "SELECT 1; DROP TABLE studies",
                          "COPY instances TO '/tmp/x.csv'", "ATTACH 'x.db'", "not sql"):
            status, out, err = sql(statement)
            assert status == 2 and out == "" and "fastscp sql:" in err, statement
        assert sql("SELECT count(*) FROM studies", "--format", "csv")[1].split() == ["count_star()", "4"]
        if running:
            assert patients.stop() == 0


# -- every attribute: keys that are no column of their own, from the attribute map (issue 17 item 4) --------


@pytest.fixture
def scanned(start_server, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Two studies whose attributes are in no column of the index, only in the instances' attribute map.

    ATTR1 (Explicit VR): General Hospital, CHEST ROUTINE, slices of 1.25, 5
    and 5 mm at 120, 120 and 100 kVp, acquired 2024-01-05, a private
    element. ATTR2 (Implicit VR: the scan takes the VRs from the data
    dictionary; ISO_IR 100): HEAD, 2.5 mm at 100 kVp, acquired 2023-03-01,
    its second instance (stored last) from another institution.
    """
    server = start_server()
    first = write_series(str(tmp_path / "attr1"), 3, rows=8, columns=8, patient_id="ATTR1", seed=11)
    for path, thickness, kvp in zip(first, ("1.25", "5", "5"), ("120", "120", "100"), strict=True):
        ds = pydicom.dcmread(path)
        ds.InstitutionName = "General Hospital"
        ds.ProtocolName = "CHEST ROUTINE"
        ds.StationName = "CT01"
        ds.PatientAge = "042Y"
        ds.SliceThickness = thickness
        ds.KVP = kvp
        ds.AcquisitionDate = "20240105"
        ds.ImagePositionPatient = ["-100", "-120.5", thickness]
        ds.private_block(0x0019, "ACME", create=True).add_new(0x01, "LO", "secret")
        ds.save_as(path, enforce_file_format=True)
    second = write_series(str(tmp_path / "attr2"), 2, rows=8, columns=8, patient_id="ATTR2", seed=12)
    for path, institution in zip(second, ("Klinik Nörd", "Klinik Nörd Annex"), strict=True):
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.InstitutionName = institution
        ds.ProtocolName = "HEAD"
        ds.SliceThickness = "2.5"
        ds.KVP = "100"
        ds.AcquisitionDate = "20230301"
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
    dcmtk("storescu", "-aec", server.ae_title, "-xe", "127.0.0.1", str(server.port), *first)
    for path in second:  # one association each: the second is the newest
        dcmtk("storescu", "-aec", server.ae_title, "-xi", "127.0.0.1", str(server.port), path)
    wait_until(lambda: QueryClient(str(server.index)).stats().instances == 5,  # type: ignore[attr-defined]
               what="the stores to be indexed")
    return server


def _series_of(server, tmp_path: Path, patient_id: str) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    (study,) = findscu(server, tmp_path, "-S", "QueryRetrieveLevel=STUDY", f"PatientID={patient_id}",
                       "StudyInstanceUID")
    (series,) = findscu(server, tmp_path, "-S", "QueryRetrieveLevel=SERIES",
                        f"StudyInstanceUID={study.StudyInstanceUID}", "SeriesInstanceUID")
    return study.StudyInstanceUID, series.SeriesInstanceUID


def test_any_attribute_at_image_level(scanned, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    study, series = _series_of(scanned, tmp_path, "ATTR1")
    keys = ("-S", "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study}", f"SeriesInstanceUID={series}",
            "SOPInstanceUID", "KVP", "SliceThickness", "ImagePositionPatient")
    found = findscu(scanned, tmp_path, *keys[:-2], "SliceThickness=5", "ImagePositionPatient")
    assert sorted((str(ds.SliceThickness), str(ds.KVP)) for ds in found) == [("5", "100"), ("5", "120")]
    assert all([str(v) for v in ds.ImagePositionPatient] == ["-100", "-120.5", "5"] for ds in found)
    # Numbers match as numbers; a single value matches a multi-valued attribute when any value does.
    assert len(findscu(scanned, tmp_path, *keys, "SliceThickness=5.0")) == 2
    assert len(findscu(scanned, tmp_path, *keys, "ImagePositionPatient=-120.5")) == 3
    assert [str(ds.SliceThickness) for ds in findscu(scanned, tmp_path, *keys, "KVP=100")] == ["5"]
    assert findscu(scanned, tmp_path, *keys, "SliceThickness=3") == []
    # The Implicit VR study: the scan read its VRs from the data dictionary.
    study, series = _series_of(scanned, tmp_path, "ATTR2")
    found = findscu(scanned, tmp_path, "-S", "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study}",
                    f"SeriesInstanceUID={series}", "KVP=100", "SliceThickness", "InstitutionName")
    assert sorted((str(ds.SliceThickness), ds.InstitutionName) for ds in found) == [
        ("2.5", "Klinik Nörd"), ("2.5", "Klinik Nörd Annex")]


def test_any_attribute_at_series_and_study_level(scanned, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    study, _series = _series_of(scanned, tmp_path, "ATTR1")
    (series,) = findscu(scanned, tmp_path, "-S", "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study}",
                        "ProtocolName=CHEST*", "StationName", "SeriesInstanceUID")
    assert (series.ProtocolName, series.StationName) == ("CHEST ROUTINE", "CT01")
    assert findscu(scanned, tmp_path, "-S", "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study}",
                   "ProtocolName=HEAD") == []
    (found,) = findscu(scanned, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "InstitutionName=General Hospital",
                       "PatientID", "ProtocolName")
    assert (found.PatientID, found.ProtocolName) == ("ATTR1", "CHEST ROUTINE")
    # Matched on any instance of the study, returned from its newest instance (stored last).
    (found,) = findscu(scanned, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "SpecificCharacterSet=ISO_IR 192",
                       "InstitutionName=Klinik Nörd", "PatientID")
    assert (found.PatientID, found.InstitutionName) == ("ATTR2", "Klinik Nörd Annex")
    # Ranges on dates, wildcards and lists on text.
    assert [ds.PatientID for ds in findscu(scanned, tmp_path, "-S", "QueryRetrieveLevel=STUDY",
                                           "AcquisitionDate=20240101-", "PatientID")] == ["ATTR1"]
    assert [ds.PatientID for ds in findscu(scanned, tmp_path, "-S", "QueryRetrieveLevel=STUDY",
                                           "AcquisitionDate=-20231231", "PatientID")] == ["ATTR2"]
    assert sorted(ds.PatientID for ds in findscu(scanned, tmp_path, "-S", "QueryRetrieveLevel=STUDY",
                                                 "InstitutionName=*Hosp*\\Klinik*", "PatientID")) == ["ATTR1", "ATTR2"]
    (patient,) = findscu(scanned, tmp_path, "-P", "QueryRetrieveLevel=PATIENT", "PatientID=ATTR1", "PatientAge")
    assert patient.PatientAge == "042Y"


def test_any_attribute_in_a_relational_query(scanned) -> None:  # type: ignore[no-untyped-def]
    found, statuses, _ = _pynetdicom_find(scanned, "IMAGE", True, KVP="100", SOPInstanceUID="", SliceThickness="",
                                          PatientID="")
    assert statuses == {0xFF00, 0x0000}
    assert sorted((ds.PatientID, str(ds.SliceThickness)) for ds in found) == [
        ("ATTR1", "5"), ("ATTR2", "2.5"), ("ATTR2", "2.5")]


def test_map_keys_are_supported_and_the_rest_still_warn(scanned) -> None:  # type: ignore[no-untyped-def]
    found, statuses, _ = _pynetdicom_find(scanned, "STUDY", False, InstitutionName="General*", PatientID="",
                                          KVP="")
    assert statuses == {0xFF00, 0x0000}  # every key supported: no 0xFF01
    assert [(ds.PatientID, ds.InstitutionName, str(ds.KVP)) for ds in found] == [("ATTR1", "General Hospital", "100")]
    # A binary attribute and a sequence item: returned empty, not matched, 0xFF01 as before.
    found, statuses, _ = _pynetdicom_find(scanned, "STUDY", False, PatientID="ATTR1",
                                          RedPaletteColorLookupTableData=b"")  # type: ignore[arg-type]
    assert statuses == {0xFF01, 0x0000} and [ds.PatientID for ds in found] == ["ATTR1"]
    assert "RedPaletteColorLookupTableData" in found[0] and not found[0].RedPaletteColorLookupTableData
    found, statuses, _ = _pynetdicom_find(scanned, "STUDY", False, PatientID="ATTR1",
                                          ReferencedImageSequence=[pydicom.Dataset()])  # type: ignore[arg-type]
    assert statuses == {0xFF01, 0x0000} and [ds.PatientID for ds in found] == ["ATTR1"]


def test_sql_reads_the_attribute_map(scanned, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    from fastscp.cli import index as cli_index

    statement = ("SELECT attributes->>'$.\"00180050\"' AS slice_thickness, count(*) AS n FROM instance_attributes "
                 "GROUP BY 1 ORDER BY 1")
    for running in (True, False):  # through the server's indexer, then on the stopped server's file
        assert cli_index.main(["sql", statement, "--index-db", str(scanned.index), "--format", "json"]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert rows == [{"slice_thickness": "1.25", "n": 1}, {"slice_thickness": "2.5", "n": 2},
                        {"slice_thickness": "5", "n": 2}], running
        # fastscp query takes any attribute of the map as a key too
        assert cli_index.main(["query", "studies", "--index-db", str(scanned.index), "--json",
                               "--keys", "PatientID,InstitutionName,ProtocolName"]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert sorted((row["PatientID"], row["InstitutionName"], row["ProtocolName"]) for row in rows) == [
            ("ATTR1", "General Hospital", "CHEST ROUTINE"), ("ATTR2", "Klinik Nörd Annex", "HEAD")], running
        if running:
            assert scanned.stop() == 0
