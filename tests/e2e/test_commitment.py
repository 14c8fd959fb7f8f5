"""Storage Commitment Push Model SCP: a real server, pynetdicom as the requesting SCU.

The report (N-EVENT-REPORT) comes on the requester's association, or, when
it released the association before the report, on a new association to
its address in retrieve.move_destinations.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)

from fastscp.dicom.synthetic import write_series
from tests.e2e.test_retrieve import indexed, send, uid_of

pytestmark = pytest.mark.dcmtk

NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119


def action_information(references: list[tuple[str, str]]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = generate_uid()
    items = []
    for sop_class, uid in references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = uid
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


class Reports:
    """N-EVENT-REPORT-RQs received by the SCU: (Event Type ID, Event Information)."""

    def __init__(self) -> None:
        self.received: list[tuple[int, Dataset]] = []
        self.arrived = threading.Event()
        #: Our N-EVENT-REPORT-RSP has gone out (releasing before it would make the SCP report again).
        self.answered = threading.Event()

    def handler(self, event) -> tuple[int, None]:  # type: ignore[no-untyped-def]
        self.received.append((int(event.event_type), event.event_information))
        self.arrived.set()
        return 0x0000, None

    def on_sent(self, event) -> None:  # type: ignore[no-untyped-def]
        if type(event.message).__name__ == "N_EVENT_REPORT_RSP":
            self.answered.set()


def request_commitment(server, references: list[tuple[str, str]], reports: Reports, *,  # type: ignore[no-untyped-def]
                       release_at_once: bool = False) -> tuple[int, Dataset]:
    """N-ACTION through pynetdicom; the N-ACTION-RSP status and the Action Information sent."""
    ae = AE(ae_title="COMMITSCU")
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", server.port, ae_title=server.ae_title,
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler),
                                       (evt.EVT_DIMSE_SENT, reports.on_sent)])
    assert assoc.is_established
    info = action_information(references)
    try:
        status, _reply = assoc.send_n_action(info, 1, StorageCommitmentPushModel, StorageCommitmentPushModelInstance)
        if not release_at_once:
            assert reports.answered.wait(30), "no N-EVENT-REPORT on the association"
    finally:
        assoc.release()
    return int(status.Status), info


def sop_instances(files: list[str]) -> list[str]:
    return [uid_of(p, "SOPInstanceUID") for p in files]


def outcome(report: Dataset) -> tuple[list[str], dict[str, int]]:
    committed = [str(i.ReferencedSOPInstanceUID) for i in report.get("ReferencedSOPSequence", [])]
    failed = {str(i.ReferencedSOPInstanceUID): int(i.FailureReason) for i in report.get("FailedSOPSequence", [])}
    return committed, failed


def test_commitment_on_the_same_association(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = start_server("--fsync", "never", workers=1)
    files = write_series(str(tmp_path / "a"), 3, rows=16, columns=16, patient_id="COMMITA")
    send(server, files)
    stored = sop_instances(files)
    never_sent = generate_uid()
    # No wait for the index: the SCP waits for records not committed yet.
    reports = Reports()
    references = [(CTImageStorage, uid) for uid in stored[:2]] + [(MRImageStorage, stored[2]),
                                                                  (CTImageStorage, never_sent)]
    status, info = request_commitment(server, references, reports)
    assert status == 0x0000
    ((event_type, report),) = reports.received
    assert event_type == 2 and report.TransactionUID == info.TransactionUID
    assert outcome(report) == (stored[:2], {stored[2]: CLASS_INSTANCE_CONFLICT, never_sent: NO_SUCH_OBJECT_INSTANCE})

    reports = Reports()
    status, info = request_commitment(server, [(CTImageStorage, uid) for uid in stored], reports)
    ((event_type, report),) = reports.received
    assert event_type == 1 and outcome(report) == (stored, {})
    assert server.stop() == 0
    assert "not delivered" not in server.log_text()  # both reports answered on the association


def test_a_missing_file_is_not_committed(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = start_server(workers=1)
    files = write_series(str(tmp_path / "a"), 2, rows=16, columns=16, patient_id="COMMITB")
    send(server, files)
    stored = sop_instances(files)
    indexed(server, 2, PatientID="COMMITB")
    (gone,) = [p for p in server.stored_files() if uid_of(p, "SOPInstanceUID") == stored[0]]
    gone.unlink()
    reports = Reports()
    request_commitment(server, [(CTImageStorage, uid) for uid in stored], reports)
    ((event_type, report),) = reports.received
    assert event_type == 2 and outcome(report) == ([stored[1]], {stored[0]: NO_SUCH_OBJECT_INSTANCE})
    assert server.stop() == 0
    assert "not delivered" not in server.log_text()


def test_report_on_a_new_association_when_the_requester_released(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    listener_reports = Reports()
    scp = AE(ae_title="COMMITSCU")
    scp.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    listener = scp.start_server(("127.0.0.1", 0), block=False,
                                evt_handlers=[(evt.EVT_N_EVENT_REPORT, listener_reports.handler)])
    port = listener.server_address[1]
    try:
        config = tmp_path / "fastscp.yaml"
        config.write_text(f"retrieve:\n  move_destinations:\n    COMMITSCU: {{host: 127.0.0.1, port: {port}}}\n")
        server = start_server(workers=1, config=config)
        files = write_series(str(tmp_path / "a"), 1, rows=16, columns=16, patient_id="COMMITC")
        send(server, files)
        (stored,) = sop_instances(files)
        never_sent = generate_uid()
        # The unknown instance keeps the SCP waiting for the index, so the release comes first.
        reports = Reports()
        status, info = request_commitment(server, [(CTImageStorage, stored), (CTImageStorage, never_sent)],
                                          reports, release_at_once=True)
        assert status == 0x0000
        assert listener_reports.arrived.wait(30), "no N-EVENT-REPORT on a new association"
        ((event_type, report),) = listener_reports.received
        assert event_type == 2 and report.TransactionUID == info.TransactionUID
        assert outcome(report) == ([stored], {never_sent: NO_SUCH_OBJECT_INSTANCE})
        assert reports.received == []  # released before the report: it came only on the new association
        assert server.stop() == 0
        assert "report for 'COMMITSCU' delivered on a new association" in server.log_text()  # answered 0x0000
    finally:
        listener.shutdown()
