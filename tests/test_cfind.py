"""C-FIND over the network with dcmtk findscu: Patient Root and Study Root, every
level, DICOM matching, answered from the index while stores go on."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from fastscp.indexclient import QueryClient
from fastscp.synthetic import write_series
from tests.conftest import dcmtk

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
    dcmtk(*argv, "127.0.0.1", str(server.port))
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
