"""DIMSE and association paths a real server must get right, over raw PDUs:
the command's SOP class against its context (0x0122), unsupported commands
(0x0211), the ACSE timeout, the shutdown timeout, and C-CANCEL of a C-FIND."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage

from fastscp.dicom.part10 import dataset_offset
from fastscp.dicom.sopclasses import STUDY_ROOT_FIND
from fastscp.dicom.synthetic import write_series
from fastscp.net import dimse
from fastscp.net.findscp import CANCEL, PENDING, encode_identifier
from fastscp.query.client import QueryClient
from tests.conftest import dcmtk, wait_until
from tests.e2e.test_lifecycle import incoming
from tests.rawscu import RawSCU, command_set, p_data

pytestmark = pytest.mark.dcmtk

C_GET_RQ = 0x0010


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fastscp.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def ct(tmp_path: Path) -> tuple[str, bytes]:
    """A small CT: its SOP Instance UID and data set bytes."""
    (path,) = write_series(str(tmp_path / "ct"), 1, rows=32, columns=32)
    raw = Path(path).read_bytes()
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID), raw[dataset_offset(raw):]


def test_store_whose_affected_sop_class_differs_from_its_context_gets_0122(server, ct) -> None:  # type: ignore[no-untyped-def]
    uid, data = ct
    scu = RawSCU(server.port, CTImageStorage, ExplicitVRLittleEndian)
    assert scu.accepted
    # On the CT context, a command that says MR Image Storage (PS3.7 9.1.1.1.2).
    scu.send_command(command_set(dimse.C_STORE_RQ, sop_class=MRImageStorage, message_id=7, data_set=True,
                                 sop_instance=uid))
    scu.send_data(data, last=True)
    response, _ = scu.read_message()
    assert (response["CommandField"], response["MessageIDBeingRespondedTo"], response["Status"]) == (0x8001, 7, 0x0122)
    assert server.stored_files() == [] and incoming(server) == []
    # The association carries on: the same data set with the right command is stored.
    assert scu.store(uid, data) == 0
    scu.release()
    (stored,) = server.stored_files()
    assert stored.read_bytes()[dataset_offset(stored.read_bytes()):] == data


def test_unsupported_commands_get_0211_and_the_association_carries_on(server, ct) -> None:  # type: ignore[no-untyped-def]
    uid, data = ct
    scu = RawSCU(server.port, CTImageStorage, ExplicitVRLittleEndian)
    # C-GET-RQ without a data set: answered at once.
    scu.send_command(command_set(C_GET_RQ, sop_class=CTImageStorage, message_id=3))
    response, data_set = scu.read_message()
    assert (response["CommandField"], response["MessageIDBeingRespondedTo"], response["Status"]) == (0x8010, 3, 0x0211)
    assert data_set is None
    # With a data set: drained, then answered.
    scu.send_command(command_set(C_GET_RQ, sop_class=CTImageStorage, message_id=4, data_set=True))
    scu.send_data(data, last=True)
    response, _ = scu.read_message()
    assert (response["CommandField"], response["MessageIDBeingRespondedTo"], response["Status"]) == (0x8010, 4, 0x0211)
    assert server.stored_files() == []
    assert scu.store(uid, data) == 0
    scu.release()
    assert len(server.stored_files()) == 1


def test_a_peer_that_never_associates_is_dropped_after_the_acse_timeout(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = start_server(config=config(tmp_path, "server:\n  acse_timeout: 1\n"))
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        started = time.monotonic()
        received = b""
        while chunk := sock.recv(100):  # bounded: the socket's own 20 s timeout fails the test
            received += chunk
        elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 10, elapsed
    assert received in (b"", bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 2, 0))), received  # closed, or an A-ABORT first


def test_shutdown_timeout_aborts_an_association_that_does_not_finish(start_server, tmp_path: Path, ct) -> None:  # type: ignore[no-untyped-def]
    uid, data = ct
    server = start_server(config=config(tmp_path, "server:\n  shutdown_timeout: 2\n"))
    scu = RawSCU(server.port, CTImageStorage, ExplicitVRLittleEndian)
    scu.begin_store(uid)
    scu.send_data(data[: len(data) // 2], last=False)
    wait_until(lambda: incoming(server), what="the temp file")
    started = time.monotonic()
    server.signal(signal.SIGTERM)  # once: the server waits shutdown_timeout for the association, then aborts it
    wait_until(lambda: "stopping:" in server.log_text(), what="graceful stop to begin")
    time.sleep(1)
    assert server.process.poll() is None, "stopped before shutdown_timeout"
    assert server.process.wait(20) == 0
    # The worker aborted it at shutdown_timeout; the supervisor's backstop
    # (shutdown_timeout + 10 s, "stopping now") was not needed.
    assert 2 <= time.monotonic() - started < 10
    assert "stopping now" not in server.log_text()
    assert server.stored_files() == [] and incoming(server) == []
    with pytest.raises(OSError):  # ConnectionError included
        scu.send_data(data[len(data) // 2 :], last=True)
        scu.read_status()
    scu.close()


def test_c_cancel_stops_a_c_find(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = start_server()
    files = write_series(str(tmp_path / "s"), 12, rows=16, columns=16, patient_id="CANCEL1")
    dcmtk("storescu", "-aec", server.ae_title, "-xe", "127.0.0.1", str(server.port), *files)
    wait_until(lambda: QueryClient(str(server.index)).stats().instances == 12,  # type: ignore[attr-defined]
               timeout=30, what="the index")
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    query.SOPInstanceUID = ""
    identifier = encode_identifier(query, ImplicitVRLittleEndian)
    scu = RawSCU(server.port, STUDY_ROOT_FIND, ImplicitVRLittleEndian)
    assert scu.accepted

    def find(message_id: int, cancel: bool) -> list[int]:
        scu.send_command(command_set(dimse.C_FIND_RQ, sop_class=STUDY_ROOT_FIND, message_id=message_id,
                                     data_set=True))
        if cancel:  # in the identifier's segment, so it is there before the first match goes out (not racing it)
            scu.sock.sendall(p_data(1, identifier, command=False, last=True)
                             + p_data(1, command_set(dimse.C_CANCEL_RQ, responding_to=message_id), command=True,
                                      last=True))
        else:
            scu.send_data(identifier, last=True)
        statuses = []
        while not statuses or statuses[-1] == PENDING:
            response, _ = scu.read_message()
            assert response["MessageIDBeingRespondedTo"] == message_id
            statuses.append(int(response["Status"]))
        return statuses

    assert find(1, cancel=False) == [PENDING] * 12 + [0x0000]
    cancelled = find(2, cancel=True)
    assert cancelled[-1] == CANCEL and len(cancelled) < 13, cancelled
    # The association is still usable after the cancel.
    assert find(3, cancel=False) == [PENDING] * 12 + [0x0000]
    scu.release()
