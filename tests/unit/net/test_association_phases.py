"""An association's life over a socket pair (the Peer of test_association.py): the clocks that
bound it (server.acse_timeout, server.dimse_timeout, limits.min_data_rate), admission, the
temp file made ahead, malformed PDV items and the A-ABORT each fault gets, port probes."""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from fastscp.dicom.part10 import file_meta
from fastscp.dicom.sopclasses import VERIFICATION_SOP_CLASS
from fastscp.net import dimse
from fastscp.net.pdu import abort_pdu
from fastscp.storage.area import Storage
from fastscp.storage.layout import LayoutOptions
from tests.rawscu import RawSCU, associate_rq, command_set, p_data
from tests.unit.net.test_association import CT, EXPLICIT, Peer, stored_path, temp_files
from tests.unit.net.test_storescp import data_set

MR = "1.2.840.10008.5.1.4.1.1.4"


def area(root: Path) -> Storage:
    storage = Storage(str(root), layout=LayoutOptions(naming="flat"))
    storage.prepare()
    return storage


def echo(scu: RawSCU, message_id: int = 1) -> int:
    scu.send_command(command_set(dimse.C_ECHO_RQ, sop_class=VERIFICATION_SOP_CLASS, message_id=message_id))
    response, _ = scu.read_message()
    return int(response["Status"])


def verification(peer: Peer) -> RawSCU:
    scu = RawSCU(0, VERIFICATION_SOP_CLASS, EXPLICIT, sock=peer.sock, timeout=10)
    assert scu.accepted
    return scu


def last_pdu(sock: socket.socket, timeout: float = 10) -> bytes:
    """The last whole PDU the association sent before it closed the connection."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass  # it closed with bytes of ours unread (a drip still going): what it sent before is read
    pos, last = 0, b""
    while pos + 6 <= len(data):
        length = struct.unpack_from(">I", data, pos + 2)[0]
        last, pos = data[pos : pos + 6 + length], pos + 6 + length
    return last


def drip(sock: socket.socket, data: bytes, every: float) -> threading.Thread:
    """Send ``data`` a byte at a time, one every ``every`` seconds, until done or the connection is gone."""

    def run() -> None:
        for i in range(len(data)):
            time.sleep(every)
            try:
                sock.sendall(data[i : i + 1])
            except OSError:
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_the_temp_file_for_the_next_store_is_made_ahead(tmp_path: Path) -> None:
    """Creating a file costs ~0.7 ms: the one for the next C-STORE exists before the request arrives."""
    storage = area(tmp_path / "root")
    peer = Peer(storage)
    try:
        scu = peer.scu()
        # The response goes out before the next temp file is made: a C-ECHO after it orders the two.
        scu.send_command(command_set(dimse.C_ECHO_RQ, sop_class=CT, message_id=1))
        scu.read_message()
        (spare,) = temp_files(storage)
        assert scu.store("1.2.3.4", data_set("1.2.3.4")) == dimse.SUCCESS
        scu.send_command(command_set(dimse.C_ECHO_RQ, sop_class=CT, message_id=2))
        scu.read_message()
        (next_spare,) = temp_files(storage)
        assert next_spare != spare
        scu.release()
        peer.ended()
    finally:
        peer.close()
    assert temp_files(storage) == []


def test_each_message_is_read_from_its_own_command_set(tmp_path: Path) -> None:
    """The command set is reassembled in one buffer, emptied after each message: a C-ECHO after a
    C-STORE carries none of the store's elements, and an association takes any number of messages
    (their command sets together far past limits.max_command_set)."""
    peer = Peer(area(tmp_path / "root"), max_command_set=1000)
    try:
        scu = peer.scu()
        assert scu.store("1.2.3.4", data_set("1.2.3.4")) == dimse.SUCCESS
        for message_id in range(2, 40):
            scu.send_command(command_set(dimse.C_ECHO_RQ, sop_class=CT, message_id=message_id))
            response, _ = scu.read_message()
            assert (response["CommandField"], response["MessageIDBeingRespondedTo"], response["Status"]) == (
                dimse.C_ECHO_RSP, message_id, dimse.SUCCESS)
            assert "AffectedSOPInstanceUID" not in response
        scu.release()
        assert peer.ended().outcome == "released"
    finally:
        peer.close()


def test_an_idle_association_is_aborted_at_dimse_timeout(tmp_path: Path) -> None:
    peer = Peer(area(tmp_path / "root"), dimse_timeout=0.3)
    try:
        verification(peer)
        started = time.monotonic()
        assert last_pdu(peer.sock) == abort_pdu()
        assert time.monotonic() - started < 3
        assert peer.ended().outcome == "timed out, aborted"
    finally:
        peer.close()


def test_an_association_may_last_longer_than_acse_timeout(tmp_path: Path) -> None:
    """server.acse_timeout bounds the A-ASSOCIATE-RQ, not the association."""
    peer = Peer(area(tmp_path / "root"), acse_timeout=0.3)
    try:
        scu = verification(peer)
        time.sleep(0.8)
        assert echo(scu) == dimse.SUCCESS
        scu.release()
        assert peer.ended().outcome == "released"
    finally:
        peer.close()


def test_a_dripped_associate_request_is_aborted_at_acse_timeout(tmp_path: Path) -> None:
    """A byte every 50 ms keeps each read alive; the whole request still has acse_timeout."""
    peer = Peer(area(tmp_path / "root"), acse_timeout=0.5)
    try:
        drip(peer.sock, associate_rq([(CT, [EXPLICIT])]), 0.05)
        started = time.monotonic()
        assert last_pdu(peer.sock) == abort_pdu()
        assert time.monotonic() - started < 3
        stats = peer.ended()
        assert stats.outcome == "timed out, aborted: A-ASSOCIATE-RQ not complete within server.acse_timeout"
        assert not stats.accepted
    finally:
        peer.close()


def test_without_a_minimum_rate_a_slow_message_is_not_cut(tmp_path: Path) -> None:
    """limits.min_data_rate 0: only each read has dimse_timeout, so a message may take longer whole."""
    peer = Peer(area(tmp_path / "root"), dimse_timeout=0.5)
    try:
        scu = verification(peer)
        message = p_data(1, command_set(dimse.C_ECHO_RQ, sop_class=VERIFICATION_SOP_CLASS, message_id=1),
                         command=True, last=True)
        for start in range(0, len(message), len(message) // 6 + 1):
            scu.sock.sendall(message[start : start + len(message) // 6 + 1])
            time.sleep(0.25)
        response, _ = scu.read_message()
        assert response["Status"] == dimse.SUCCESS
        scu.release()
    finally:
        peer.close()


def test_a_message_below_the_minimum_rate_is_aborted(tmp_path: Path) -> None:
    """dimse_timeout of grace plus a second per min_data_rate bytes: a data set dripped at ~20 B/s
    against 1000 B/s is cut well before its end, and its temp file removed."""
    storage = area(tmp_path / "root")
    peer = Peer(storage, dimse_timeout=0.4, min_data_rate=1000)
    try:
        scu = peer.scu()
        scu.begin_store("1.2.3.4")
        drip(scu.sock, p_data(1, bytes(200), command=False, last=True), 0.05)
        started = time.monotonic()
        assert last_pdu(scu.sock) == abort_pdu()
        assert time.monotonic() - started < 3
        assert peer.ended().outcome == (
            "timed out, aborted: message slower than limits.min_data_rate after server.dimse_timeout")
    finally:
        peer.close()
    assert temp_files(storage) == []


def test_each_answer_starts_the_next_messages_clock(tmp_path: Path) -> None:
    """With limits.min_data_rate, a peer that sends a message every 1.2 s (within dimse_timeout 2 s of
    the last answer) is served as long as it likes."""
    peer = Peer(area(tmp_path / "root"), dimse_timeout=2.0, min_data_rate=1000)
    try:
        scu = verification(peer)
        for message_id in range(1, 4):
            time.sleep(1.2)
            assert echo(scu, message_id) == dimse.SUCCESS
        scu.release()
        assert peer.ended().outcome == "released"
    finally:
        peer.close()


def test_shutdown_ends_a_waiting_association_at_once(tmp_path: Path) -> None:
    """The second SIGTERM: the association's blocking read fails now, not at dimse_timeout (5 s)."""
    peer = Peer(area(tmp_path / "root"))
    try:
        verification(peer)
        started = time.monotonic()
        peer.association.shutdown()
        assert peer.ended(timeout=3).outcome == "connection closed by peer"
        assert time.monotonic() - started < 3
    finally:
        peer.close()


def test_an_association_not_admitted_is_rejected_and_ends(tmp_path: Path) -> None:
    """The worker's admission check (limits per calling AE): A-ASSOCIATE-RJ rejected-transient, service
    provider (presentation), local limit exceeded; the association ends though the peer stays."""
    peer = Peer(area(tmp_path / "root"), admit=lambda calling: (False, f"2 associations from {calling}"))
    try:
        scu = RawSCU(0, CT, EXPLICIT, sock=peer.sock, timeout=10)
        assert scu.response_type == 0x03 and scu.response[1:4] == bytes((2, 3, 2))
        assert peer.sock.recv(1) == b""  # the connection closed after the A-ASSOCIATE-RJ
        stats = peer.ended(timeout=3)
        assert (stats.accepted, stats.outcome) == (False, "local limit exceeded: 2 associations from RAWSCU")
    finally:
        peer.close()


def test_refused_contexts_are_logged_by_name(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    peer = Peer(area(tmp_path / "root"))
    try:
        with caplog.at_level(logging.WARNING, logger="fastscp.association"):
            peer.sock.sendall(associate_rq([(CT, [EXPLICIT]), (MR, [EXPLICIT])]))
            scu = RawSCU.__new__(RawSCU)
            scu.sock = peer.sock
            assert scu.read_pdu()[0] == 0x02
            scu.release()
            assert peer.ended().contexts == 1
    finally:
        peer.close()
    assert f"1 of 2 presentation contexts refused: MR Image Storage ({MR}): " in caplog.text


@pytest.mark.parametrize("items, why", [
    (struct.pack(">IBB", 1, 1, 3), "PDV item length 1 does not fit its PDU"),
    (struct.pack(">IBB", 100, 1, 3) + bytes(10), "PDV item length 100 does not fit its PDU"),
    (bytes(5), "truncated PDV item"),
])
def test_malformed_pdv_items_abort_as_unexpected(tmp_path: Path, items: bytes, why: str) -> None:
    """A-ABORT from the service provider with reason 2 (PS3.8 9.3.8: unexpected PDU)."""
    storage = area(tmp_path / "root")
    peer = Peer(storage)
    try:
        scu = peer.scu()
        scu.sock.sendall(struct.pack(">BxI", 0x04, len(items)) + items)
        assert last_pdu(scu.sock) == abort_pdu(reason=2) == bytes((7, 0, 0, 0, 0, 4, 0, 0, 2, 2))
        assert peer.ended().outcome == f"protocol error, aborted: {why}"
    finally:
        peer.close()
    assert temp_files(storage) == []


def test_an_unknown_pdu_without_a_body_is_aborted_at_once(tmp_path: Path) -> None:
    """A PDU is its 6-byte header and its length's worth of body, nothing more: one of length 0 is
    whole, and a type the data transfer phase does not know ends it now, not at dimse_timeout."""
    peer = Peer(area(tmp_path / "root"))
    try:
        scu = peer.scu()
        started = time.monotonic()
        scu.sock.sendall(struct.pack(">BxI", 0x09, 0))
        assert last_pdu(scu.sock) == abort_pdu(reason=2)
        assert time.monotonic() - started < 3
        assert peer.ended().outcome == "protocol error, aborted: unexpected PDU type 0x09 during data transfer"
    finally:
        peer.close()


def test_an_associate_rq_longer_than_1_mib_is_refused_before_its_body(tmp_path: Path) -> None:
    """The A-ASSOCIATE-RQ's read is bounded (MAX_ASSOCIATE_RQ, 1 MiB: far above any real one): a
    header claiming more ends the association at once, with no byte of the body read or awaited."""
    peer = Peer(area(tmp_path / "root"))
    started = time.monotonic()
    peer.sock.sendall(struct.pack(">BxI", 0x01, 1024 * 1024 + 1))
    stats = peer.ended()
    assert time.monotonic() - started < 3
    assert "PDU of 1048577 bytes exceeds the maximum 1048576" in stats.outcome, stats.outcome
    peer.close()


def test_an_empty_last_fragment_ends_a_data_set(tmp_path: Path) -> None:
    """PS3.8 9.3.5.1: a PDV's value may be empty; the last fragment of a data set can be one."""
    storage = area(tmp_path / "root")
    data = data_set("1.2.3.4")
    peer = Peer(storage)
    try:
        scu = peer.scu()
        scu.begin_store("1.2.3.4")
        scu.sock.sendall(p_data(1, data, command=False, last=False) + p_data(1, b"", command=False, last=True))
        assert scu.read_status() == dimse.SUCCESS
        scu.release()
        peer.ended()
    finally:
        peer.close()
    assert stored_path(storage, "1.2.3.4").read_bytes() == file_meta(CT, "1.2.3.4", EXPLICIT, "RAWSCU") + data


def _echo_of(size: int) -> bytes:
    """A C-ECHO-RQ command set of ``size`` bytes: padded with an element no command uses, (0000,0005)."""
    command = command_set(dimse.C_ECHO_RQ, sop_class=VERIFICATION_SOP_CLASS, message_id=1)
    return command + struct.pack("<HHI", 0, 0x0005, size - len(command) - 8) + bytes(size - len(command) - 8)


def test_a_command_set_of_max_command_set_bytes_is_served_one_more_aborts(tmp_path: Path) -> None:
    peer = Peer(area(tmp_path / "root"), max_command_set=1000)
    try:
        scu = verification(peer)
        scu.send_command(_echo_of(1000))
        response, _ = scu.read_message()
        assert response["Status"] == dimse.SUCCESS
        scu.send_command(_echo_of(1001))
        assert last_pdu(scu.sock) == abort_pdu()
        assert peer.ended().outcome == "limit exceeded, aborted: command set longer than limits.max_command_set (1000)"
    finally:
        peer.close()


def test_a_command_without_a_data_set_we_do_not_serve_is_answered_0211(tmp_path: Path) -> None:
    peer = Peer(area(tmp_path / "root"))
    try:
        scu = peer.scu()
        scu.send_command(command_set(0x0110, sop_class=CT, message_id=4))  # N-GET-RQ
        response, _ = scu.read_message()
        assert (response["CommandField"], response["MessageIDBeingRespondedTo"], response["Status"]) == (
            0x8110, 4, dimse.UNRECOGNIZED_OPERATION)
        assert echo(scu) == dimse.SUCCESS
        scu.release()
        assert peer.ended().failures == 0
    finally:
        peer.close()


def test_an_unserved_data_set_of_exactly_max_object_size_is_drained(tmp_path: Path) -> None:
    peer = Peer(area(tmp_path / "root"), max_object_size=5000)
    try:
        scu = peer.scu()
        scu.send_command(command_set(0x0120, sop_class=CT, message_id=3, data_set=True))  # N-SET-RQ
        scu.send_data(bytes(5000), last=True, fragment=999)
        response, _ = scu.read_message()
        assert (response["CommandField"], response["Status"]) == (0x8120, dimse.UNRECOGNIZED_OPERATION)
        scu.release()
        assert peer.ended().outcome == "released"
    finally:
        peer.close()
