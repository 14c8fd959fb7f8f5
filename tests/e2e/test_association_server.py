"""An association's data phase on a real server, through what a peer and a user
see (raw PDUs from tests.rawscu, files on disk, the log): written against the
server's behaviour, not its classes, so they hold while fastscp/net/association.py
is split up. Each one kills a mutant of association.py that the other tests let
live (tests/README.md)."""

from __future__ import annotations

import io
import re
import signal
import socket
import struct
import time
from pathlib import Path

import pydicom
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import decode

from fastscp.dicom.part10 import dataset_offset
from fastscp.dicom.sopclasses import STUDY_ROOT_FIND
from fastscp.net.findscp import encode_identifier
from fastscp.query.client import QueryClient
from fastscp.storage.reserved import BACKLOGS
from tests.conftest import wait_until
from tests.e2e.test_hostile import dataset
from tests.rawscu import RawSCU, associate_rq, command_set, p_data

CT, EXPLICIT, IMPLICIT = str(CTImageStorage), str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)
VERIFICATION = "1.2.840.10008.1.1"


def _store_begun(start_server, tmp_path: Path, config: str, uid: str, pixels: int):  # type: ignore[no-untyped-def]
    """A one-worker server with ``config``, and a raw SCU that has sent the C-STORE-RQ of ``uid``:
    (server, scu, the data set to send)."""
    (tmp_path / "fastscp.yaml").write_text(config)
    server = start_server(workers=1, config=tmp_path / "fastscp.yaml")
    scu = RawSCU(server.port, CT, EXPLICIT)
    scu.begin_store(uid)
    return server, scu, dataset(uid, bytes(pixels))


def test_a_slow_transfer_above_the_minimum_rate_is_stored(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # dimse_timeout of grace, plus a second per min_data_rate bytes that have arrived: 60 KB at ~15 KB/s
    # (1.5 times the minimum) take ~4 s, past the 2 s timeout, and are allowed 2 + 6 = 8 s.
    config = "server:\n  dimse_timeout: 2\nlimits:\n  min_data_rate: 10000\n"
    server, scu, data = _store_begun(start_server, tmp_path, config, "1.2.3.5", 60000)
    started = time.monotonic()
    for start in range(0, len(data), 6000):
        scu.send_data(data[start:start + 6000], last=start + 6000 >= len(data))
        time.sleep(0.4)
    assert time.monotonic() - started > 3.5
    assert scu.read_status() == 0x0000
    scu.release()
    (stored,) = server.stored_files()
    assert stored.read_bytes()[dataset_offset(stored.read_bytes()):] == data


def test_an_association_cut_at_shutdown_timeout_is_still_accounted_for(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # The worker cuts the connection under the association's blocking read, so the association ends
    # (its temp file removed, its summary logged) before the process exits.
    server, scu, data = _store_begun(start_server, tmp_path, "server:\n  shutdown_timeout: 1\n", "1.2.3.6", 20000)
    scu.send_data(data[:10000], last=False)
    wait_until(lambda: list((server.storage / ".incoming").iterdir()), what="the temp file")
    server.signal(signal.SIGTERM)
    assert server.process.wait(30) == 0
    summary = r"association RAWSCU \(127\.0\.0\.1:\d+\) -> FASTSCP: accepted, .*; 0 instances"
    assert re.search(summary, server.log_text())
    # Its temp file is gone. A folder of records kept for the next start may be there: the association's
    # report for its hooks, when the post-store stage stopped first (a loaded machine's timing).
    left = [p for p in (server.storage / ".incoming").iterdir() if p.name not in BACKLOGS]
    assert left == [] and server.stored_files() == []
    scu.close()


def test_each_message_is_answered_from_its_own_command_set(server) -> None:  # type: ignore[no-untyped-def]
    scu = RawSCU(server.port, CT, EXPLICIT)
    assert scu.store("1.2.3.7", dataset("1.2.3.7")) == 0x0000
    # A C-ECHO after a C-STORE on the same association: its response carries nothing of the store's.
    scu.send_command(command_set(0x0030, sop_class=VERIFICATION, message_id=8))
    response, data_set = scu.read_message()
    assert response == {"AffectedSOPClassUID": VERIFICATION, "CommandField": 0x8030, "MessageIDBeingRespondedTo": 8,
                        "CommandDataSetType": 0x0101, "Status": 0x0000}
    assert data_set is None
    scu.release()


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True if the server closes the connection (or aborts) within ``seconds``; what it sends first is read."""
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk or chunk[:1] == b"\x07":  # closed, or A-ABORT
                return True
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return False


def test_the_server_closes_the_connection_after_rejecting(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "only.yaml").write_text("access:\n  allowed_calling_aets: [MODALITY]\n")
    server = start_server(workers=1, config=tmp_path / "only.yaml")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(associate_rq([(CT, [EXPLICIT])], aet="STRANGER"))
        header = sock.recv(10)
        assert header[:1] == b"\x03" and header[7:10] == bytes([1, 1, 3])  # A-ASSOCIATE-RJ, AE not recognized
        # PS3.8 7.1.1.7 / 9.1.4: the acceptor that rejects releases the transport; it does not wait for more.
        assert _closed_within(sock, 10)


def test_without_a_minimum_rate_an_idle_association_ends_at_dimse_timeout(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "idle.yaml").write_text("server:\n  dimse_timeout: 1\nlimits:\n  min_data_rate: 0\n")
    server = start_server(workers=1, config=tmp_path / "idle.yaml")
    scu = RawSCU(server.port, CT, EXPLICIT)
    assert scu.accepted
    started = time.monotonic()
    assert _closed_within(scu.sock, 15)
    assert time.monotonic() - started < 10
    scu.close()


def test_a_port_probe_is_no_association(server) -> None:  # type: ignore[no-untyped-def]
    # Load balancers and monitoring connect and close without a byte: not worth a log line each.
    for _ in range(3):
        socket.create_connection(("127.0.0.1", server.port), timeout=10).close()
    scu = RawSCU(server.port, CT, EXPLICIT)
    scu.release()
    server.wait_for_log("association RAWSCU (127.0.0.1:")
    time.sleep(0.5)  # the probes, served first, have had time to be logged if they were
    (line,) = [line for line in server.log_text().splitlines() if "fastscp.association: association " in line]
    assert "association RAWSCU (127.0.0.1:" in line and ": accepted, released;" in line


def test_an_empty_last_fragment_ends_a_data_set(server) -> None:  # type: ignore[no-untyped-def]
    # A PDV item of just its header (length 2: no value), marked last, closes the data set sent before it.
    data = dataset("1.2.3.8")
    scu = RawSCU(server.port, CT, EXPLICIT)
    scu.begin_store("1.2.3.8")
    scu.send_data(data, last=False)
    scu.sock.sendall(p_data(1, b"", command=False, last=True))
    assert scu.read_status() == 0x0000
    scu.release()
    (stored,) = server.stored_files()
    assert stored.read_bytes()[dataset_offset(stored.read_bytes()):] == data


def test_c_find_matches_fragmented_to_a_small_maximum_length_arrive_whole(server) -> None:  # type: ignore[no-untyped-def]
    uids = [f"1.2.3.9.{i}" for i in range(2)]
    scu = RawSCU(server.port, CT, EXPLICIT)
    for uid in uids:
        assert scu.store(uid, dataset(uid)) == 0x0000
    scu.release()
    wait_until(lambda: QueryClient(str(server.index)).stats().instances == 2, what="the index")  # type: ignore[attr-defined]
    query = pydicom.Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID, query.SeriesInstanceUID = "IMAGE", "1.2.3.1", "1.2.3.2"
    query.SOPInstanceUID, query.PatientName = "", ""
    # 64-byte PDUs: each match's identifier goes out in several data set fragments, every one a data fragment.
    finder = RawSCU(server.port, STUDY_ROOT_FIND, IMPLICIT, max_length=64)
    finder.send_command(command_set(0x0020, sop_class=STUDY_ROOT_FIND, message_id=5, data_set=True))
    finder.send_data(encode_identifier(query, IMPLICIT), last=True)
    found = []
    while True:
        response, identifier = finder.read_message()
        if response["Status"] != 0xFF00:
            break
        assert identifier is not None and len(identifier) > 64
        ds = decode(io.BytesIO(identifier), True, True)  # Implicit VR Little Endian
        found.append((str(ds.SOPInstanceUID), str(ds.PatientName)))
    assert response["Status"] == 0x0000
    finder.release()
    assert sorted(found) == [(uid, "HOSTILE^PEER") for uid in uids]


def test_a_peer_abort_mid_store_is_logged_as_such_and_leaves_nothing(server) -> None:  # type: ignore[no-untyped-def]
    data = dataset("1.2.3.10", bytes(20000))
    scu = RawSCU(server.port, CT, EXPLICIT)
    scu.begin_store("1.2.3.10")
    scu.send_data(data[:10000], last=False)
    wait_until(lambda: list((server.storage / ".incoming").iterdir()), what="the temp file")
    scu.sock.sendall(bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0]))  # A-ABORT, source: service user
    log = server.wait_for_log("association RAWSCU (127.0.0.1:")
    (line,) = [line for line in log.splitlines() if "association RAWSCU (127.0.0.1:" in line]
    assert ": accepted, aborted by peer; 0 instances" in line, line
    scu.close()
    wait_until(lambda: not list((server.storage / ".incoming").iterdir()), what="the temp file removed")
    assert server.stored_files() == []


def test_a_command_set_of_max_command_set_bytes_is_served_one_more_refused(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "small.yaml").write_text("limits:\n  max_command_set: 1000\n")
    server = start_server(workers=1, config=tmp_path / "small.yaml")

    def echo_of(size: int) -> bytes:
        """A C-ECHO-RQ command set of ``size`` bytes: padded with an element no command uses, (0000,0005)."""
        command = command_set(0x0030, sop_class=VERIFICATION, message_id=1)
        return command + struct.pack("<HHI", 0, 0x0005, size - len(command) - 8) + bytes(size - len(command) - 8)

    scu = RawSCU(server.port, VERIFICATION, IMPLICIT)
    scu.send_command(echo_of(1000))  # one fragment
    response, _ = scu.read_message()
    assert (response["CommandField"], response["Status"]) == (0x8030, 0x0000)
    scu.send_command(echo_of(1001))
    assert scu.ended_by_server(10) in (0x07, 0)
    scu.close()
    assert "command set longer than limits.max_command_set (1000)" in server.wait_for_log("limit exceeded")


def test_a_command_and_its_data_set_in_one_pdu_are_read_item_by_item(server) -> None:  # type: ignore[no-untyped-def]
    # PS3.8 9.3.5: a P-DATA-TF may carry several PDV items; each is exactly its own length.
    data = dataset("1.2.3.11")
    command = command_set(0x0001, sop_class=CT, message_id=3, data_set=True, sop_instance="1.2.3.11")
    items = b"".join(struct.pack(">IBB", len(value) + 2, 1, control) + value
                     for value, control in ((command, 0x03), (data[:100], 0x00), (data[100:], 0x02)))
    scu = RawSCU(server.port, CT, EXPLICIT)
    scu.sock.sendall(struct.pack(">BxI", 0x04, len(items)) + items)
    assert scu.read_status() == 0x0000
    scu.release()
    (stored,) = server.stored_files()
    assert stored.read_bytes()[dataset_offset(stored.read_bytes()):] == data
