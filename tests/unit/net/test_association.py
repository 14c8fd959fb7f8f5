"""The association driven over a socket pair: raw PDUs (tests/rawscu.py) on one end, an
:class:`~fastscp.net.association.Association` in a thread on the other, its storage area
on a real folder. No server process: each step of the upper layer and DIMSE is checked
where it happens, and the stored files byte for byte."""

from __future__ import annotations

import dataclasses
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fastscp.dicom.part10 import dataset_offset, file_meta, read_file_meta
from fastscp.dicom.sopclasses import VERIFICATION_SOP_CLASS
from fastscp.dicom.synthetic import write_series
from fastscp.index.records import DuplicateConflict, InstanceRecord
from fastscp.net import dimse
from fastscp.net.association import Association, ServiceSettings
from fastscp.net.negotiation import AcceptancePolicy
from fastscp.net.pdu import p_data_tf
from fastscp.net.stats import AssociationStats
from fastscp.status import LATENCY_BUCKETS
from fastscp.storage.area import Storage
from fastscp.storage.layout import LayoutOptions
from tests.conftest import wait_until
from tests.rawscu import RawSCU, command_set, p_data, store_command

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT = "1.2.840.10008.1.2.1"
A_ABORT = struct.pack(">BxI", 0x07, 4) + bytes(4)

Record = InstanceRecord | DuplicateConflict


class Peer:
    """An Association serving one end of a socket pair in a thread; the test holds the other end."""

    def __init__(self, storage: Storage, admit: Callable[[str], tuple[bool, str]] | None = None,
                 **overrides: Any) -> None:
        """``overrides``: ServiceSettings fields other than these defaults; ``admit``: the worker's admission check."""
        defaults = ServiceSettings(
            policy=AcceptancePolicy(ae_title="FASTSCP", storage_sop_classes=frozenset({CT}), max_pdu_size=16384),
            storage=storage, acse_timeout=5.0, dimse_timeout=5.0,
            max_object_size=64 << 20, max_command_set=4096, min_data_rate=0,
            action_log=False,
        )
        settings = dataclasses.replace(defaults, **overrides)
        ours, self.sock = socket.socketpair()
        self.records: list[Record] = []
        self.association = Association(ours, "127.0.0.1:11112", settings, self.records.append,
                                       **({} if admit is None else {"admit": admit}))
        self.stats: AssociationStats | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.stats = self.association.run()

    def ended(self, timeout: float = 10.0) -> AssociationStats:
        """The association's figures once its thread has returned."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the association did not end"
        assert self.stats is not None
        return self.stats

    def scu(self, contexts: tuple[str, ...] = (CT,)) -> RawSCU:
        scu = RawSCU(0, contexts[0], EXPLICIT, sock=self.sock, timeout=10)
        assert scu.accepted, f"A-ASSOCIATE-RJ {scu.rejection}"
        return scu

    def close(self) -> None:
        self.sock.close()
        self.thread.join(10)


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    storage = Storage(str(tmp_path / "root"), fsync=True, layout=LayoutOptions(naming="flat"))
    storage.prepare()
    return storage


@pytest.fixture
def peer(storage: Storage) -> Iterator[Peer]:
    peer = Peer(storage)
    yield peer
    peer.close()


@pytest.fixture(scope="module")
def ct_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
    """(SOP Instance UID, data set bytes) of a small synthetic CT (64x64, ~9 KB)."""
    (path,) = write_series(str(tmp_path_factory.mktemp("ct")), 1, rows=64, columns=64)
    raw = Path(path).read_bytes()
    meta, _offset = read_file_meta(raw)
    return str(meta[0x0003]), raw[dataset_offset(raw):]


def temp_files(storage: Storage) -> list[str]:
    return os.listdir(storage.incoming_dir)


def stored_path(storage: Storage, uid: str) -> Path:
    return Path(storage.root, f"{uid}.dcm")


def test_associate_echo_release(peer: Peer, storage: Storage) -> None:
    scu = RawSCU(0, VERIFICATION_SOP_CLASS, EXPLICIT, sock=peer.sock, timeout=10)
    assert scu.response_type == 0x02
    scu.send_command(command_set(dimse.C_ECHO_RQ, sop_class=VERIFICATION_SOP_CLASS, message_id=7))
    response, data_set = scu.read_message()
    assert (response["CommandField"], response["MessageIDBeingRespondedTo"], response["Status"]) == (
        dimse.C_ECHO_RSP, 7, dimse.SUCCESS)
    assert data_set is None
    scu.release()  # asserts the A-RELEASE-RP
    stats = peer.ended()
    assert (stats.accepted, stats.outcome, stats.calling_ae_title) == (True, "released", "RAWSCU")
    # The temp file made ahead for a C-STORE that never came is gone too.
    assert temp_files(storage) == []


def test_a_pdu_other_than_a_associate_rq_first_is_aborted(peer: Peer, storage: Storage) -> None:
    peer.sock.sendall(p_data(1, b"\x00" * 10, command=True, last=True))
    scu = RawSCU.__new__(RawSCU)
    scu.sock = peer.sock
    assert scu.ended_by_server(10) == 0x07
    stats = peer.ended()
    assert stats.outcome.startswith("protocol error, aborted: expected A-ASSOCIATE-RQ") and not stats.accepted
    assert temp_files(storage) == []


def test_c_store_stores_the_data_set_byte_for_byte(peer: Peer, storage: Storage, ct_image: tuple[str, bytes]) -> None:
    uid, data = ct_image
    scu = peer.scu()
    assert scu.store(uid, data) == dimse.SUCCESS
    # Before the response the file was linked in place and fsynced: it is complete now.
    assert stored_path(storage, uid).read_bytes() == file_meta(CT, uid, EXPLICIT, "RAWSCU") + data
    scu.release()
    stats = peer.ended()
    assert (stats.instances, stats.failures, stats.bytes) == (1, 0, len(data))
    (record,) = peer.records
    assert isinstance(record, InstanceRecord)
    assert (record.path, record.header.sop_instance_uid, record.size) == (
        f"{uid}.dcm", uid, len(file_meta(CT, uid, EXPLICIT, "RAWSCU")) + len(data))
    assert temp_files(storage) == []


@pytest.mark.parametrize("pdv_size", [1, 7, 4096])
def test_p_data_fragmented_across_pdvs_and_pdus(peer: Peer, storage: Storage, ct_image: tuple[str, bytes],
                                                pdv_size: int) -> None:
    """The command set and the data set split into many PDVs, several PDVs to a PDU and PDUs cut
    anywhere in the byte stream: the same bytes on disk."""
    uid, data = ct_image
    scu = peer.scu()
    command = store_command(CT, uid.encode())
    pdvs = [p_data(1, command[i : i + 5], command=True, last=i + 5 >= len(command))[6:]
            for i in range(0, len(command), 5)]
    chunks = [data[i : i + pdv_size] for i in range(0, len(data), pdv_size)]
    pdvs += [p_data(1, chunk, command=False, last=n == len(chunks) - 1)[6:] for n, chunk in enumerate(chunks)]
    stream = bytearray()
    for start in range(0, len(pdvs), 16):  # 16 PDVs per P-DATA-TF, within the negotiated 16384
        body = b"".join(pdvs[start : start + 16])
        stream += struct.pack(">BxI", 0x04, len(body)) + body
    for start in range(0, len(stream), 1000):  # TCP may cut anywhere
        scu.sock.sendall(stream[start : start + 1000])
    assert scu.read_status() == dimse.SUCCESS
    assert stored_path(storage, uid).read_bytes() == file_meta(CT, uid, EXPLICIT, "RAWSCU") + data
    scu.release()
    assert peer.ended().instances == 1


@pytest.mark.parametrize("how", ["A-ABORT", "connection closed"])
def test_an_abort_mid_object_leaves_no_temp_file(peer: Peer, storage: Storage, ct_image: tuple[str, bytes],
                                                 how: str) -> None:
    uid, data = ct_image
    scu = peer.scu()
    scu.begin_store(uid)
    scu.send_data(data[: len(data) // 2], last=False, fragment=1000)
    wait_until(lambda: peer.association.stats.bytes == len(data) // 2, timeout=10, what="half the data set read")
    # The data set is being received into its temp file (and the next one is not made yet).
    assert len(temp_files(storage)) == 1
    if how == "A-ABORT":
        scu.sock.sendall(A_ABORT)
    else:
        scu.sock.shutdown(socket.SHUT_RDWR)
    stats = peer.ended()
    assert stats.outcome == ("aborted by peer" if how == "A-ABORT" else "connection closed by peer")
    assert temp_files(storage) == [] and not stored_path(storage, uid).exists()
    assert (stats.instances, peer.records) == (0, [])


def test_a_data_set_past_max_object_size_aborts_and_leaves_no_temp_file(storage: Storage,
                                                                         ct_image: tuple[str, bytes]) -> None:
    uid, data = ct_image
    peer = Peer(storage, max_object_size=len(data) - 1)
    try:
        scu = peer.scu()
        scu.begin_store(uid)
        scu.send_data(data, last=True)
        assert scu.ended_by_server(10) == 0x07
        assert peer.ended().outcome.startswith("limit exceeded, aborted")
        assert temp_files(storage) == [] and not stored_path(storage, uid).exists()
    finally:
        peer.close()


def test_a_refused_store_is_drained_then_the_next_one_stored(peer: Peer, storage: Storage,
                                                             ct_image: tuple[str, bytes]) -> None:
    """0x0122 for a C-STORE whose Affected SOP Class is not its context's; its data set is read
    and dropped, and the association goes on."""
    uid, data = ct_image
    scu = peer.scu()
    scu.send_command(store_command(MR, uid.encode()))
    scu.send_data(data, last=True)
    assert scu.read_status() == dimse.SOP_CLASS_NOT_SUPPORTED
    assert len(temp_files(storage)) == 1  # only the one made ahead for the next store
    assert scu.store(uid, data) == dimse.SUCCESS
    scu.release()
    stats = peer.ended()
    assert (stats.instances, stats.failures) == (1, 1)


def test_store_latency_counts_from_the_request_even_when_refused(peer: Peer, ct_image: tuple[str, bytes]) -> None:
    """A refused C-STORE's response is timed from its own command (it was timed from the previous
    store's, or from the monotonic clock's zero: 'above 10 s' for an answer in microseconds)."""
    uid, data = ct_image
    scu = peer.scu()
    scu.send_command(store_command(CT, b""))  # no valid Affected SOP Instance UID: 0x0117
    scu.send_data(data, last=True)
    assert scu.read_status() == dimse.INVALID_OBJECT_INSTANCE
    scu.release()
    latency = peer.ended().latency
    assert latency.count == 1
    assert latency.counts[-1] == 0 and latency.sum < LATENCY_BUCKETS[-1], latency


def test_a_command_while_a_data_set_arrives_is_a_protocol_error(peer: Peer, storage: Storage,
                                                                 ct_image: tuple[str, bytes]) -> None:
    uid, data = ct_image
    scu = peer.scu()
    scu.begin_store(uid)
    scu.send_data(data[:100], last=False)
    scu.begin_store(uid, message_id=2)
    assert scu.ended_by_server(10) == 0x07
    assert peer.ended().outcome.startswith("protocol error, aborted")
    assert temp_files(storage) == []


def test_unsupported_command_with_a_data_set_is_drained_and_answered(peer: Peer, storage: Storage) -> None:
    scu = peer.scu()
    scu.send_command(command_set(0x0110, sop_class=CT, message_id=3, data_set=True))  # N-SET-RQ
    scu.send_data(b"\x00" * 5000, last=True, fragment=999)
    response, _ = scu.read_message()
    assert (response["CommandField"], response["Status"]) == (0x8110, dimse.UNRECOGNIZED_OPERATION)
    scu.release()
    stats = peer.ended()
    assert (stats.failures, stats.bytes, stats.outcome) == (1, 5000, "released")



@pytest.mark.parametrize("quarantine", [True, False])
def test_a_data_set_that_cannot_be_understood_is_quarantined(tmp_path: Path, quarantine: bool) -> None:
    """0xC000; with storage.quarantine the received file is kept aside with its reason, else dropped."""
    storage = Storage(str(tmp_path / "root"), quarantine=quarantine, layout=LayoutOptions(naming="flat"))
    storage.prepare()
    peer = Peer(storage)
    try:
        scu = peer.scu()
        garbage = struct.pack("<HH2sH", 0x0008, 0x0016, b"UI", 200) + b"1.2"  # a length past the end
        assert scu.store("1.2.3.4", garbage) == dimse.CANNOT_UNDERSTAND
        scu.release()
        assert peer.ended().failures == 1
    finally:
        peer.close()
    kept = sorted(os.listdir(storage.quarantine_dir))
    if quarantine:
        assert len(kept) == 2 and kept[1] == kept[0] + ".reason.txt"
        received = file_meta(CT, "1.2.3.4", EXPLICIT, "RAWSCU") + garbage
        assert Path(storage.quarantine_dir, kept[0]).read_bytes() == received
        assert Path(storage.quarantine_dir, kept[1]).read_text().startswith("1.2.3.4: ")
    else:
        assert kept == []
    assert temp_files(storage) == [] and sorted(os.listdir(storage.root)) == [".incoming", ".quarantine"]


def test_a_full_disk_answers_out_of_resources_and_the_association_goes_on(
        small_disk: Path, ct_image: tuple[str, bytes]) -> None:
    """A real ENOSPC (a 3 MB tmpfs): 0xA700, the temp file gone at once, the next store fits."""
    storage = Storage(str(small_disk / "root"), layout=LayoutOptions(naming="flat"))
    storage.prepare()
    peer = Peer(storage)
    try:
        scu = peer.scu()
        uid, data = ct_image
        scu.begin_store("1.2.3.4")
        scu.send_data(b"\x00" * (4 << 20), last=False, fragment=16000)
        wait_until(lambda: peer.association.stats.bytes == 4 << 20, timeout=10, what="the data set read")
        assert temp_files(storage) == []  # given back at the first failed write
        scu.send_data(b"\x00" * 8, last=True)
        assert scu.read_status() == dimse.OUT_OF_RESOURCES
        assert scu.store(uid, data) == dimse.SUCCESS
        assert stored_path(storage, uid).read_bytes() == file_meta(CT, uid, EXPLICIT, "RAWSCU") + data
        scu.release()
        stats = peer.ended()
        assert (stats.instances, stats.failures) == (1, 1)
    finally:
        peer.close()
    assert temp_files(storage) == [] and not stored_path(storage, "1.2.3.4").exists()


def test_the_free_space_watermark_refuses_before_any_file_is_made(tmp_path: Path,
                                                                   ct_image: tuple[str, bytes]) -> None:
    storage = Storage(str(tmp_path / "root"), layout=LayoutOptions(naming="flat"), min_free_bytes=1 << 62)
    storage.prepare()
    peer = Peer(storage)
    try:
        scu = peer.scu()
        uid, data = ct_image
        assert scu.store(uid, data) == dimse.OUT_OF_RESOURCES
        scu.release()
        assert peer.ended().failures == 1
    finally:
        peer.close()
    assert temp_files(storage) == [] and not stored_path(storage, uid).exists()


@pytest.mark.parametrize(("size", "full"), [(200, False), (8 << 20, False), (200, True)],
                         ids=["fits", "larger-than-the-buffer", "buffer-already-full"])
def test_a_message_goes_out_whole_whether_or_not_the_send_buffer_takes_it_at_once(storage: Storage,
                                                                                    size: int, full: bool) -> None:
    """Association.send writes a message to the descriptor in one call, and what the send buffer did
    not take (8 MiB: far more than it holds; or a buffer the peer has not emptied yet, where the write
    takes nothing) through the socket's sendall."""
    ours, theirs = socket.socketpair()
    before = bytearray()
    if full:  # what an earlier message left in the buffer, unread
        ours.setblocking(False)
        for chunk in (65536, 4096, 256, 16, 1):  # smaller and smaller: until not one byte more fits
            try:
                while True:
                    before += b"\x55" * ours.send(b"\x55" * chunk)
            except BlockingIOError:
                pass
    policy = AcceptancePolicy(ae_title="FASTSCP", storage_sop_classes=frozenset({CT}), max_pdu_size=16384)
    settings = ServiceSettings(policy=policy, storage=storage, acse_timeout=5.0, dimse_timeout=5.0,
                               max_object_size=1 << 20, max_command_set=4096, min_data_rate=0)
    association = Association(ours, "127.0.0.1:11112", settings, lambda record: None)
    ours.settimeout(10)  # as in data transfer: the descriptor is non-blocking
    command = dimse.encode_response(dimse.C_FIND_RSP, CT, 1, 0xFF00)
    data_set = os.urandom(size)
    expected = bytes(before) + p_data_tf(1, command, 0, data_set)
    received = bytearray()

    def read_slowly() -> None:
        theirs.settimeout(10)
        if full:
            time.sleep(0.5)  # the write meets the full buffer (reading sooner could only hide a fault)
        while len(received) < len(expected) and (chunk := theirs.recv(65536)):
            received.extend(chunk)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    try:
        association.send(1, command, data_set)
        reader.join(30)
        assert not reader.is_alive()
        assert bytes(received) == expected
    finally:
        ours.close()
        theirs.close()
