"""C-MOVE and C-GET SCP: real servers, dcmtk getscu/movescu/storescp and pynetdicom.

The server stores synthetic studies sent by storescu; they are retrieved
with getscu (C-GET, same association) and movescu (C-MOVE to a storescp
started here as the move destination) and compared byte for byte with what
was sent: the data set after the File Meta (storescp and getscu write their
own File Meta). pynetdicom checks the statuses and counts.
"""

from __future__ import annotations

import socket
import time
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pynetdicom import AE, build_role
from pynetdicom.sop_class import (
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from fastscp.dicom.synthetic import write_series
from fastscp.query.client import QueryClient
from fastscp.query.messages import Condition, QueryRequest
from tests.conftest import dcmtk, wait_until
from tests.dicomfiles import EXPLICIT_LE, PYDICOM_DATA, dataset_bytes
from tests.e2e.test_access import pki  # noqa: F401  (pki: the test CA fixture)
from tests.e2e.test_forward import Receiver
from tests.unit.query.test_find import identifier

pytestmark = pytest.mark.dcmtk

DEST = "MOVEDEST"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


class MoveDestination(Receiver):
    """dcmtk storescp as the move destination, bit-preserving (+B); stopped by PID (Receiver.stop)."""

    def start(self, *options: str) -> MoveDestination:
        self._run(lambda: ["storescp", "-aet", self.ae_title, "+B", "-od", str(self.folder), *options,
                           str(self.port)], 15)
        return self

    def _ready(self) -> bool:
        # Listening is enough (a C-ECHO would need the destination's TLS options).
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stored(self) -> list[Path]:
        return sorted(self.files())


@pytest.fixture
def storescp(tmp_path: Path):  # type: ignore[no-untyped-def]
    started: list[MoveDestination] = []

    def start(*options: str) -> MoveDestination:
        scp = MoveDestination(tmp_path / f"dest{len(started)}", 0, DEST)  # port: chosen at its start
        started.append(scp)
        return scp.start(*options)

    yield start
    for scp in started:
        scp.stop()


def config_with_destination(tmp_path: Path, port: int) -> Path:
    config = tmp_path / "fastscp.yaml"
    config.write_text(f"retrieve:\n  move_destinations:\n    {DEST}: {{host: 127.0.0.1, port: {port}}}\n")
    return config


def indexed(server, count: int, **keys: str) -> None:  # type: ignore[no-untyped-def]
    """Wait until the index holds ``count`` instances matching ``keys``."""
    client = QueryClient(str(server.index))
    request = QueryRequest(level="IMAGE", conditions=[Condition(k, v) for k, v in keys.items()],
                           keys=["SOPInstanceUID"])

    def enough() -> bool:
        with client.query(request) as result:
            return len(list(result)) >= count

    wait_until(enough, 30, f"{count} instances in the index")


def send(server, files: list[str]) -> None:  # type: ignore[no-untyped-def]
    dcmtk("storescu", "-aec", server.ae_title, "127.0.0.1", str(server.port), *files)


def stored_study(server, folder: Path, count: int, patient_id: str, size: int = 16) -> tuple[list[str], str]:  # type: ignore[no-untyped-def]
    """A synthetic study sent to ``server`` and indexed: (its files, its Study Instance UID)."""
    files = write_series(str(folder), count, rows=size, columns=size, patient_id=patient_id)
    send(server, files)
    study = uid_of(files[0], "StudyInstanceUID")
    indexed(server, count, StudyInstanceUID=study)
    return files, study


def uid_of(path: str | Path, keyword: str) -> str:
    return str(getattr(pydicom.dcmread(path, stop_before_pixels=True), keyword))


def by_sop_instance(paths: list[str] | list[Path]) -> dict[str, bytes]:
    """SOP Instance UID -> the data set bytes (after the File Meta)."""
    return {uid_of(p, "SOPInstanceUID"): dataset_bytes(p)[0] for p in paths}


def pynetdicom_move(server, model: str, ds: Dataset, destination: str = DEST,  # type: ignore[no-untyped-def]
                    cancel_after: int = 0, relational: bool = False) -> list[Dataset]:
    """A C-MOVE through pynetdicom: every response's status Dataset (identifier in .identifier).

    ``relational``: ask for relational retrieval (SOP Class Extended Negotiation, PS3.4 C.5.1.1.1).
    """
    from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation

    ae = AE(ae_title="MOVESCU")
    ae.add_requested_context(model)
    ext_neg = []
    if relational:
        item = SOPClassExtendedNegotiation()
        item.sop_class_uid, item.service_class_application_information = model, b"\x01"
        ext_neg.append(item)
    assoc = ae.associate("127.0.0.1", server.port, ae_title=server.ae_title, ext_neg=ext_neg)
    assert assoc.is_established
    out = []
    try:
        for status, found in assoc.send_c_move(ds, destination, model, msg_id=7):
            assert "Status" in status, "no response (association aborted or timeout)"
            status.identifier = found
            out.append(status)
            if cancel_after and len(out) == cancel_after:
                context = next(cx for cx in assoc.accepted_contexts if cx.abstract_syntax == model)
                assoc.send_c_cancel(7, context.context_id)
    finally:
        assoc.release()
    return out


def pynetdicom_get(server, model: str, ds: Dataset, storage: list[tuple[str, list[str]]],  # type: ignore[no-untyped-def]
                   received: dict[str, tuple[str, bytes]], cancel_after: int = 0) -> list[Dataset]:
    """A C-GET through pynetdicom, the SCP role taken for ``storage`` (SOP class, transfer syntaxes).

    ``cancel_after``: send C-CANCEL-RQ before answering that many C-STORE-RQs.
    """
    from pynetdicom import evt

    def on_store(event) -> int:  # type: ignore[no-untyped-def]
        ds = event.dataset
        received[str(ds.SOPInstanceUID)] = (str(event.context.transfer_syntax), bytes(event.request.DataSet.getvalue()))
        if cancel_after and len(received) == cancel_after:
            context = next(cx for cx in event.assoc.accepted_contexts if cx.abstract_syntax == model)
            event.assoc.send_c_cancel(9, context.context_id)
        return 0

    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(model)
    for sop_class, syntaxes in storage:
        ae.add_requested_context(sop_class, syntaxes)
    roles = [build_role(sop_class, scp_role=True) for sop_class in dict.fromkeys(c for c, _ in storage)]
    assoc = ae.associate("127.0.0.1", server.port, ae_title=server.ae_title, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    out = []
    try:
        for status, found in assoc.send_c_get(ds, model, msg_id=9):
            assert "Status" in status, "no response (association aborted or timeout)"
            status.identifier = found
            out.append(status)
    finally:
        assoc.release()
    return out


def counts(status: Dataset) -> tuple[int, int, int, int | None]:
    return (int(status.NumberOfCompletedSuboperations), int(status.NumberOfFailedSuboperations),
            int(status.NumberOfWarningSuboperations), status.get("NumberOfRemainingSuboperations"))


# -- C-GET ------------------------------------------------------------------------------------


def test_getscu_study_level_is_byte_identical(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = start_server(workers=1)
    files = write_series(str(tmp_path / "a"), 4, rows=32, columns=32, patient_id="GETA")
    other = write_series(str(tmp_path / "b"), 2, rows=32, columns=32, patient_id="GETA", seed=1)
    send(server, files + other)
    study = uid_of(files[0], "StudyInstanceUID")
    indexed(server, 4, StudyInstanceUID=study)
    out = tmp_path / "got"
    out.mkdir()
    dcmtk("getscu", "-S", "-aec", server.ae_title, "+B", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
          "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(server.port))
    assert by_sop_instance(sorted(out.iterdir())) == by_sop_instance(files)  # the other study stays out
    assert server.stop() == 0


def test_pynetdicom_get_series_and_image_levels_with_counts(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = start_server(workers=1)
    files, study = stored_study(server, tmp_path / "a", 3, "GETB")
    series = uid_of(files[0], "SeriesInstanceUID")
    expected = by_sop_instance(files)
    storage = [(CTImageStorage, [EXPLICIT_LE])]

    received: dict[str, tuple[str, bytes]] = {}
    statuses = pynetdicom_get(server, StudyRootQueryRetrieveInformationModelGet,
                              identifier("SERIES", StudyInstanceUID=study, SeriesInstanceUID=series),
                              storage, received)
    assert [s.Status for s in statuses] == [0xFF00, 0xFF00, 0x0000]
    assert [s.NumberOfRemainingSuboperations for s in statuses[:2]] == [2, 1]
    assert counts(statuses[-1]) == (3, 0, 0, None)
    assert {uid: data for uid, (_ts, data) in received.items()} == expected

    one = uid_of(files[1], "SOPInstanceUID")
    received.clear()
    statuses = pynetdicom_get(server, StudyRootQueryRetrieveInformationModelGet,
                              identifier("IMAGE", StudyInstanceUID=study, SeriesInstanceUID=series,
                                         SOPInstanceUID=one), storage, received)
    assert [s.Status for s in statuses] == [0x0000] and counts(statuses[0]) == (1, 0, 0, None)
    assert received == {one: (EXPLICIT_LE, expected[one])}
    assert server.stop() == 0


def test_get_missing_file_counts_as_failed(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = start_server(workers=1)
    files, study = stored_study(server, tmp_path / "a", 3, "GETC")
    gone = uid_of(files[1], "SOPInstanceUID")
    (stored,) = [p for p in server.stored_files() if uid_of(p, "SOPInstanceUID") == gone]
    stored.unlink()
    received: dict[str, tuple[str, bytes]] = {}
    statuses = pynetdicom_get(server, StudyRootQueryRetrieveInformationModelGet,
                              identifier("STUDY", StudyInstanceUID=study), [(CTImageStorage, [EXPLICIT_LE])],
                              received)
    final = statuses[-1]
    assert final.Status == 0xB000 and counts(final) == (2, 1, 0, None)
    assert final.identifier.FailedSOPInstanceUIDList == gone
    assert sorted(received) == sorted(uid_of(p, "SOPInstanceUID") for p in files if uid_of(p, "SOPInstanceUID") != gone)
    assert server.stop() == 0


def test_c_cancel_during_a_c_get_sub_operation_stops_it(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = start_server(workers=1)
    total = 20
    files, study = stored_study(server, tmp_path / "a", total, "GETD")
    received: dict[str, tuple[str, bytes]] = {}
    # The C-CANCEL-RQ arrives while the SCP waits for the second C-STORE-RSP.
    statuses = pynetdicom_get(server, StudyRootQueryRetrieveInformationModelGet,
                              identifier("STUDY", StudyInstanceUID=study), [(CTImageStorage, [EXPLICIT_LE])],
                              received, cancel_after=2)
    final = statuses[-1]
    assert final.Status == 0xFE00, [hex(s.Status) for s in statuses]
    assert counts(final) == (2, 0, 0, total - 2) and len(received) == 2
    assert server.stop() == 0


def test_get_sends_compressed_files_as_stored_and_converts_only_when_nothing_else_is_accepted(
        start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fastscp.net.scu import send as scu_send

    jpeg = PYDICOM_DATA / "test_files" / "SC_rgb_jpeg_dcmtk.dcm"
    assert str(pydicom.dcmread(jpeg).file_meta.TransferSyntaxUID) == JPEG_BASELINE
    server = start_server(workers=1)
    summary = scu_send("127.0.0.1", server.port, [str(jpeg)], aec=server.ae_title, out=None)
    assert summary.stored == 1, summary
    uid = uid_of(jpeg, "SOPInstanceUID")
    indexed(server, 1, SOPInstanceUID=uid)
    ds = identifier("IMAGE", PatientID=uid_of(jpeg, "PatientID"), StudyInstanceUID=uid_of(jpeg, "StudyInstanceUID"),
                    SeriesInstanceUID=uid_of(jpeg, "SeriesInstanceUID"), SOPInstanceUID=uid)

    received: dict[str, tuple[str, bytes]] = {}
    pynetdicom_get(server, PatientRootQueryRetrieveInformationModelGet, ds,
                   [(SecondaryCaptureImageStorage, [JPEG_BASELINE]), (SecondaryCaptureImageStorage, [EXPLICIT_LE])],
                   received)
    assert received == {uid: (JPEG_BASELINE, dataset_bytes(jpeg)[0])}  # as stored, though uncompressed was offered

    received.clear()
    statuses = pynetdicom_get(server, PatientRootQueryRetrieveInformationModelGet, ds,
                              [(SecondaryCaptureImageStorage, [EXPLICIT_LE])], received)
    assert statuses[-1].Status == 0x0000
    ((syntax, data),) = received.values()
    assert syntax == EXPLICIT_LE
    original = pydicom.dcmread(jpeg)
    converted = read_dataset(BytesIO(data), is_implicit_VR=False, is_little_endian=True)
    converted.file_meta = FileMetaDataset()
    converted.file_meta.TransferSyntaxUID = EXPLICIT_LE
    assert converted.SOPInstanceUID == uid  # the same instance, not a new UID
    assert (converted.pixel_array == original.pixel_array).all()
    assert server.stop() == 0


# -- C-MOVE -----------------------------------------------------------------------------------


def test_move_converts_only_for_a_destination_that_accepts_nothing_else(start_server, storescp, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fastscp.net.scu import send as scu_send

    plain, everything = storescp(), storescp("+xa")  # uncompressed only (storescp's default) / every syntax
    config = tmp_path / "fastscp.yaml"
    config.write_text(f"retrieve:\n  move_destinations:\n    {DEST}: {{host: 127.0.0.1, port: {plain.port}}}\n"
                      f"    ALLSYNTAXES: {{host: 127.0.0.1, port: {everything.port}}}\n")
    server = start_server(workers=1, config=config)
    jpeg = PYDICOM_DATA / "test_files" / "SC_rgb_jpeg_dcmtk.dcm"
    assert scu_send("127.0.0.1", server.port, [str(jpeg)], aec=server.ae_title, out=None).stored == 1
    study = uid_of(jpeg, "StudyInstanceUID")
    indexed(server, 1, StudyInstanceUID=study)
    for destination in (DEST, "ALLSYNTAXES"):
        statuses = pynetdicom_move(server, StudyRootQueryRetrieveInformationModelMove,
                                   identifier("STUDY", StudyInstanceUID=study), destination=destination)
        assert statuses[-1].Status == 0x0000 and counts(statuses[-1]) == (1, 0, 0, None)
    ((as_stored,),) = [everything.stored()]
    assert dataset_bytes(as_stored) == dataset_bytes(jpeg)  # JPEG Baseline, byte for byte
    ((converted,),) = [plain.stored()]
    received, original = pydicom.dcmread(converted), pydicom.dcmread(jpeg)
    assert received.file_meta.TransferSyntaxUID in (EXPLICIT_LE, "1.2.840.10008.1.2")
    assert received.SOPInstanceUID == original.SOPInstanceUID
    assert (received.pixel_array == original.pixel_array).all()
    assert server.stop() == 0


def test_movescu_to_storescp_at_study_series_and_image_levels(start_server, storescp, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dest = storescp()
    server = start_server(workers=1, config=config_with_destination(tmp_path, dest.port))
    files, study = stored_study(server, tmp_path / "a", 4, "MOVEA", size=32)
    series = uid_of(files[0], "SeriesInstanceUID")
    expected = by_sop_instance(files)

    def movescu(*keys: str) -> None:
        dcmtk("movescu", "-S", "-aet", "MOVESCU", "-aec", server.ae_title, "-aem", DEST,
              *(a for k in keys for a in ("-k", k)), "127.0.0.1", str(server.port))

    movescu("QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}")
    assert by_sop_instance(dest.stored()) == expected
    for path in dest.stored():
        path.unlink()
    movescu("QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study}", f"SeriesInstanceUID={series}")
    assert by_sop_instance(dest.stored()) == expected
    for path in dest.stored():
        path.unlink()
    one = uid_of(files[2], "SOPInstanceUID")
    movescu("QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study}", f"SeriesInstanceUID={series}",
            f"SOPInstanceUID={one}")
    assert by_sop_instance(dest.stored()) == {one: expected[one]}
    assert server.stop() == 0


def test_patient_root_patient_level_move_and_get(start_server, storescp, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dest = storescp()
    server = start_server(workers=1, config=config_with_destination(tmp_path, dest.port))
    first = write_series(str(tmp_path / "a"), 2, rows=16, columns=16, patient_id="PATX")
    second = write_series(str(tmp_path / "b"), 3, rows=16, columns=16, patient_id="PATX", seed=2)
    stranger = write_series(str(tmp_path / "c"), 1, rows=16, columns=16, patient_id="PATY")
    send(server, first + second + stranger)
    indexed(server, 5, PatientID="PATX")
    indexed(server, 1, PatientID="PATY")
    statuses = pynetdicom_move(server, PatientRootQueryRetrieveInformationModelMove,
                               identifier("PATIENT", PatientID="PATX"))
    assert statuses[-1].Status == 0x0000 and counts(statuses[-1]) == (5, 0, 0, None)
    assert by_sop_instance(dest.stored()) == by_sop_instance(first + second)

    out = tmp_path / "got"
    out.mkdir()
    dcmtk("getscu", "-P", "-aec", server.ae_title, "-od", str(out), "-k", "QueryRetrieveLevel=PATIENT",
          "-k", "PatientID=PATX", "127.0.0.1", str(server.port))
    assert by_sop_instance(sorted(out.iterdir())) == by_sop_instance(first + second)
    assert server.stop() == 0


def test_move_to_an_unknown_destination_is_refused(start_server, storescp, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dest = storescp()
    server = start_server(workers=1, config=config_with_destination(tmp_path, dest.port))
    files, study = stored_study(server, tmp_path / "a", 1, "MOVEB")
    statuses = pynetdicom_move(server, StudyRootQueryRetrieveInformationModelMove,
                               identifier("STUDY", StudyInstanceUID=study), destination="NOBODY")
    assert [s.Status for s in statuses] == [0xA801]
    assert dest.stored() == []
    result = dcmtk("movescu", "-S", "-aec", server.ae_title, "-aem", "NOBODY", "-k", "QueryRetrieveLevel=STUDY",
                   "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(server.port), check=False)
    assert result.returncode != 0 and "MoveDestinationUnknown" in result.stdout + result.stderr
    assert server.stop() == 0


def test_move_missing_file_counts_as_failed_and_the_rest_arrive(start_server, storescp, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dest = storescp()
    server = start_server(workers=1, config=config_with_destination(tmp_path, dest.port))
    files, study = stored_study(server, tmp_path / "a", 3, "MOVEC")
    gone = uid_of(files[0], "SOPInstanceUID")
    (stored,) = [p for p in server.stored_files() if uid_of(p, "SOPInstanceUID") == gone]
    stored.unlink()
    statuses = pynetdicom_move(server, StudyRootQueryRetrieveInformationModelMove,
                               identifier("STUDY", StudyInstanceUID=study))
    final = statuses[-1]
    assert final.Status == 0xB000 and counts(final) == (2, 1, 0, None)
    assert final.identifier.FailedSOPInstanceUIDList == gone
    expected = by_sop_instance(files)
    del expected[gone]
    assert by_sop_instance(dest.stored()) == expected
    assert server.stop() == 0


def test_c_cancel_stops_a_long_move(start_server, storescp, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dest = storescp()
    server = start_server(workers=1, config=config_with_destination(tmp_path, dest.port))
    total = 80
    files, study = stored_study(server, tmp_path / "a", total, "MOVED", size=64)
    started = time.monotonic()
    statuses = pynetdicom_move(server, StudyRootQueryRetrieveInformationModelMove,
                               identifier("STUDY", StudyInstanceUID=study), cancel_after=1)
    final = statuses[-1]
    assert final.Status == 0xFE00, [hex(s.Status) for s in statuses]
    completed, failed, _warning, remaining = counts(final)
    assert failed == 0 and remaining and completed + remaining == total and completed < total
    assert len(dest.stored()) == completed
    assert time.monotonic() - started < 60
    assert server.stop() == 0


def test_move_with_an_unreachable_destination_fails_every_sub_operation(start_server, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                        closed_port: int) -> None:
    server = start_server(workers=1, config=config_with_destination(tmp_path, closed_port))
    files, study = stored_study(server, tmp_path / "a", 2, "MOVEE")
    statuses = pynetdicom_move(server, StudyRootQueryRetrieveInformationModelMove,
                               identifier("STUDY", StudyInstanceUID=study))
    assert [s.Status for s in statuses] == [0xA702] and counts(statuses[0]) == (0, 2, 0, None)
    assert sorted(statuses[0].identifier.FailedSOPInstanceUIDList) == sorted(by_sop_instance(files))
    assert server.stop() == 0


def test_retrieve_identifier_errors(start_server, storescp, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dest = storescp()
    server = start_server(workers=1, config=config_with_destination(tmp_path, dest.port))
    study_root, patient_root = StudyRootQueryRetrieveInformationModelMove, PatientRootQueryRetrieveInformationModelMove
    cases = [
        (study_root, identifier("STUDY")),  # no Study Instance UID
        (study_root, identifier("SERIES", SeriesInstanceUID="1.2.3")),  # hierarchical: Study Instance UID missing
        (patient_root, identifier("PATIENT", PatientID="MOVE*")),  # no wildcards in a retrieve
        (study_root, identifier("PATIENT", PatientID="MOVEA")),  # no PATIENT level in Study Root
        (study_root, identifier("WARD", StudyInstanceUID="1.2.3")),
    ]
    for model, ds in cases:
        statuses = pynetdicom_move(server, model, ds)
        assert [s.Status for s in statuses] == [0xA900], ds
    # Nothing matches: Success with no sub-operations.
    statuses = pynetdicom_move(server, StudyRootQueryRetrieveInformationModelMove,
                               identifier("STUDY", StudyInstanceUID="1.2.3.4"))
    assert [s.Status for s in statuses] == [0x0000] and counts(statuses[0]) == (0, 0, 0, None)
    assert server.stop() == 0


def test_relational_retrieve_when_negotiated(start_server, storescp, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dest = storescp()
    server = start_server(workers=1, config=config_with_destination(tmp_path, dest.port))
    files, _study = stored_study(server, tmp_path / "a", 2, "MOVEF")
    series = identifier("SERIES", SeriesInstanceUID=uid_of(files[0], "SeriesInstanceUID"))  # no Study Instance UID
    statuses = pynetdicom_move(server, StudyRootQueryRetrieveInformationModelMove, series)
    assert [s.Status for s in statuses] == [0xA900]  # hierarchical by default
    statuses = pynetdicom_move(server, StudyRootQueryRetrieveInformationModelMove, series, relational=True)
    assert statuses[-1].Status == 0x0000 and counts(statuses[-1]) == (2, 0, 0, None)
    assert by_sop_instance(dest.stored()) == by_sop_instance(files)
    assert server.stop() == 0


def test_move_to_a_tls_destination(start_server, storescp, tmp_path: Path, pki: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    dest = storescp("+tls", str(pki / "server.key"), str(pki / "server.pem"), "+cf", str(pki / "ca.pem"))
    config = tmp_path / "fastscp.yaml"
    # Not a TLS listener itself: the tls.* files are its client certificate and the CAs it trusts.
    config.write_text(f"tls:\n  certificate: {pki / 'client.pem'}\n  private_key: {pki / 'client.key'}\n"
                      f"  ca_bundle: {pki / 'ca.pem'}\n"
                      f"retrieve:\n  move_destinations:\n"
                      f"    {DEST}: {{host: 127.0.0.1, port: {dest.port}, tls: true}}\n")
    server = start_server(workers=1, config=config)
    files, study = stored_study(server, tmp_path / "a", 2, "MOVEG")
    statuses = pynetdicom_move(server, StudyRootQueryRetrieveInformationModelMove,
                               identifier("STUDY", StudyInstanceUID=study))
    assert statuses[-1].Status == 0x0000 and counts(statuses[-1]) == (2, 0, 0, None)
    assert by_sop_instance(dest.stored()) == by_sop_instance(files)
    assert server.stop() == 0


def test_move_contexts_stay_within_128_and_cover_each_class() -> None:
    from fastscp.net.movescp import plan_contexts
    from fastscp.net.retrievescp import UNCOMPRESSED, choose_transfer_syntax
    from fastscp.query.retrieve import Instance

    found = [Instance(f"1.2.3.{n}", f"1.2.840.99.{n % 70}", EXPLICIT_LE if n % 2 else JPEG_BASELINE, "")
             for n in range(200)]
    contexts, classes = plan_contexts(found)
    assert len(contexts) <= 128 and len(set(contexts)) == len(contexts)
    # 64 classes of 2 contexts each (its syntax and the uncompressed one) fit; the 65th opens the next association.
    assert classes == {f"1.2.840.99.{n}" for n in range(64)}
    assert all((c, UNCOMPRESSED) in contexts for c in classes)
    # A class met again with another syntax when the budget is spent: sent converted, not a 129th context.
    again = Instance("1.2.3.999", found[0].sop_class_uid, EXPLICIT_LE, "")  # found[0] is JPEG Baseline
    later, later_classes = plan_contexts([found[0], *[Instance("1", f"1.2.840.98.{n}", EXPLICIT_LE, "")
                                                      for n in range(63)], again])
    assert len(later) == 128 and again.sop_class_uid in later_classes
    assert (again.sop_class_uid, (EXPLICIT_LE,)) not in later
    # As stored when accepted; the first uncompressed one accepted otherwise; else nothing.
    assert choose_transfer_syntax(JPEG_BASELINE, {JPEG_BASELINE, EXPLICIT_LE}) == (JPEG_BASELINE, False)
    assert choose_transfer_syntax(JPEG_BASELINE, {"1.2.840.10008.1.2", EXPLICIT_LE}) == (EXPLICIT_LE, True)
    assert choose_transfer_syntax(EXPLICIT_LE, {"1.2.840.10008.1.2"}) == ("1.2.840.10008.1.2", True)
    assert choose_transfer_syntax(EXPLICIT_LE, {JPEG_BASELINE}) is None


@pytest.mark.parametrize("peer", ["silent", "data-set-instead-of-response"])
def test_a_c_get_requester_that_does_not_answer_its_c_store_is_aborted(start_server, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                       peer: str) -> None:
    from fastscp.net import dimse
    from fastscp.net.findscp import encode_identifier
    from tests.rawscu import RawSCU, associate_rq, command_set, p_data

    config = tmp_path / "fastscp.yaml"
    config.write_text("server:\n  dimse_timeout: 2\n")
    server = start_server(workers=1, config=config)
    _files, study = stored_study(server, tmp_path / "a", 2, "GETH")
    scu = RawSCU.__new__(RawSCU)  # two contexts and a role selection: the association request by hand
    scu.sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    scu.sock.sendall(associate_rq([(StudyRootQueryRetrieveInformationModelGet, [EXPLICIT_LE]),
                                   (CTImageStorage, [EXPLICIT_LE])], roles={CTImageStorage: (False, True)}))
    assert scu.read_pdu()[0] == 0x02  # A-ASSOCIATE-AC
    scu.sock.sendall(p_data(1, command_set(dimse.C_GET_RQ, sop_class=StudyRootQueryRetrieveInformationModelGet,
                                           message_id=5, data_set=True), command=True, last=True)
                     + p_data(1, encode_identifier(identifier("STUDY", StudyInstanceUID=study), EXPLICIT_LE),
                              command=False, last=True))
    command, data_set = scu.read_message()
    assert command["CommandField"] == dimse.C_STORE_RQ and data_set  # the first sub-operation
    started = time.monotonic()
    if peer != "silent":
        scu.sock.sendall(p_data(3, b"\x00" * 8, command=False, last=True))
    try:
        assert scu.ended_by_server(30) == 0x07  # A-ABORT
    finally:
        scu.close()
    assert time.monotonic() - started < (15 if peer == "silent" else 5)
    expected = "timed out, aborted" if peer == "silent" else "protocol error, aborted"
    server.wait_for_log("RAWSCU (127.0.0.1:", expected)
    assert server.stop() == 0
