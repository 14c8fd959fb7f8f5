"""C-STORE (fastscp.net.storescp) over a socket pair, through what a peer, the files and the index
see: each status with the comment that says why, data sets longer than the part scanned in
memory, duplicates and what the index is told of them, the figures an association reports."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from fastscp.dicom.part10 import file_meta
from fastscp.index.records import DuplicateConflict, InstanceRecord
from fastscp.net import dimse
from fastscp.storage.area import HEADER_PREFIX_BYTES, RECYCLE_DEPTH, Storage
from fastscp.storage.files import RECYCLE_MIN_BYTES
from fastscp.storage.layout import LayoutOptions
from fastscp.storage.policy import DuplicatePolicy
from tests.conftest import wait_until
from tests.dicomfiles import Encoder, pad
from tests.rawscu import RawSCU, command_set, p_data, store_command
from tests.unit.net.test_association import CT, EXPLICIT, Peer, stored_path, temp_files

ENC = Encoder(True, False)
MR = "1.2.840.10008.5.1.4.1.1.4"
#: A private element of 100 KB between the SOP Common and the Patient module: the header runs past the prefix.
LONG_EARLY = ENC.element(0x00090010, "LO", pad("FASTSCP TEST")) + ENC.element(0x00091000, "OB", bytes(100_000))
#: Data Set Trailing Padding after Pixel Data: the data set does not end inside Pixel Data.
TRAILER = ENC.element(0xFFFCFFFC, "OB", bytes(8))


def data_set(uid: str | None, *, sop_class: str | None = CT, pixels: bytes | None = bytes(512),
             declared: int | None = None, early: bytes = b"", late: bytes = b"") -> bytes:
    """A CT data set (Explicit VR Little Endian), elements in tag order: ``early`` ones before the Patient
    module, ``late`` ones after Pixel Data (``declared`` overrides its length); None leaves a UID or
    Pixel Data out."""
    out = ENC.element(0x00080016, "UI", pad(sop_class, "UI")) if sop_class else b""
    out += ENC.element(0x00080018, "UI", pad(uid, "UI")) if uid else b""
    out += ENC.element(0x00080060, "CS", pad("CT")) + early
    out += (ENC.element(0x00100020, "LO", pad("PATIENT7")) + ENC.element(0x0020000D, "UI", pad("1.2.3.1", "UI"))
            + ENC.element(0x0020000E, "UI", pad("1.2.3.2", "UI")))
    if pixels is not None:
        out += ENC.header(0x7FE00010, "OW", len(pixels) if declared is None else declared) + pixels
    return out + late


def area(root: Path, **options: object) -> Storage:
    storage = Storage(str(root), layout=LayoutOptions(naming="flat"), **options)  # type: ignore[arg-type]
    storage.prepare()
    return storage


def store(scu: RawSCU, command_uid: str | None, data: bytes) -> tuple[int, str]:
    """(status, Error Comment) of one C-STORE."""
    scu.send_command(store_command(CT, None if command_uid is None else command_uid.encode()))
    scu.send_data(data, last=True, fragment=16000)  # within the Peer's Maximum Length (16384)
    response, _ = scu.read_message()
    return int(response["Status"]), str(response.get("ErrorComment", ""))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def held_stored_files(storage: Storage) -> int:
    """This process's descriptors of stored files (their temp names, gone since the link)."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # the listing's own descriptor
            continue
    return sum(link.startswith(storage.incoming_dir + os.sep) and link.endswith(" (deleted)") for link in links)


def test_a_data_set_of_exactly_max_object_size_is_stored(tmp_path: Path) -> None:
    storage = area(tmp_path / "root")
    data = data_set("1.2.3.4")
    peer = Peer(storage, max_object_size=len(data))
    try:
        scu = peer.scu()
        assert scu.store("1.2.3.4", data) == dimse.SUCCESS
        scu.release()
        assert peer.ended().instances == 1
    finally:
        peer.close()


@pytest.mark.parametrize("uid, why", [(None, "Affected SOP Instance UID missing"),
                                      ("1.2.x", "Affected SOP Instance UID invalid")])
def test_a_refused_store_says_why(tmp_path: Path, uid: str | None, why: str) -> None:
    peer = Peer(area(tmp_path / "root"))
    try:
        scu = peer.scu()
        scu.send_command(store_command(CT, None if uid is None else uid.encode()))
        scu.send_data(data_set("1.2.3.4"), last=True)
        response, _ = scu.read_message()
        assert (response["Status"], response["ErrorComment"]) == (dimse.INVALID_OBJECT_INSTANCE, why)
        # What is no UID is not echoed: the peer's bytes may be anything.
        assert "AffectedSOPInstanceUID" not in response
        scu.release()
        assert peer.ended().failures == 1
    finally:
        peer.close()


def test_a_data_set_of_another_sop_class_gets_a900_and_leaves_nothing(tmp_path: Path) -> None:
    """0xA900, the comment naming the data set's SOP Class UID (cut to the 64 characters of an LO);
    the association goes on."""
    storage = area(tmp_path / "root")
    other = (MR + ".1.2.3.4.5.6.7.8.9.10.11.12.13.14.15.16.17.18")[:64]
    peer = Peer(storage)
    try:
        scu = peer.scu()
        status, comment = store(scu, "1.2.3.4", data_set("1.2.3.4", sop_class=other))
        assert (status, comment) == (dimse.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
                                     f"SOP Class UID in data set is {other}"[:64])
        assert len(comment) == 64
        assert scu.store("1.2.3.5", data_set("1.2.3.5")) == dimse.SUCCESS
        scu.release()
        stats = peer.ended()
        assert (stats.instances, stats.failures, len(peer.records)) == (1, 1, 1)
    finally:
        peer.close()
    assert not stored_path(storage, "1.2.3.4").exists() and temp_files(storage) == []
    assert os.listdir(storage.quarantine_dir) == []


def test_a_data_set_without_a_sop_class_uid_is_stored_as_its_contexts(tmp_path: Path) -> None:
    storage = area(tmp_path / "root")
    data = data_set("1.2.3.4", sop_class=None)
    peer = Peer(storage)
    try:
        scu = peer.scu()
        assert scu.store("1.2.3.4", data) == dimse.SUCCESS
        scu.release()
        peer.ended()
    finally:
        peer.close()
    assert stored_path(storage, "1.2.3.4").read_bytes() == file_meta(CT, "1.2.3.4", EXPLICIT, "RAWSCU") + data


def test_the_index_gets_both_uids_when_command_and_data_set_differ(tmp_path: Path) -> None:
    """The file is named by the command's UID; the record's instance UID is the data set's own (else
    the command's), and the command's is kept beside it when it differs."""
    storage = area(tmp_path / "root")
    peer = Peer(storage)
    try:
        scu = peer.scu()
        assert scu.store("1.2.3.4", data_set("1.2.3.99")) == dimse.SUCCESS
        assert scu.store("1.2.3.5", data_set(None)) == dimse.SUCCESS
        scu.release()
        peer.ended()
    finally:
        peer.close()
    first, second = peer.records
    assert isinstance(first, InstanceRecord) and isinstance(second, InstanceRecord)
    assert (first.path, first.header.sop_instance_uid, first.affected_sop_instance_uid) == (
        "1.2.3.4.dcm", "1.2.3.99", "1.2.3.4")
    assert (second.path, second.header.sop_instance_uid, second.affected_sop_instance_uid) == (
        "1.2.3.5.dcm", "1.2.3.5", "")


@pytest.mark.parametrize("early, pixels, late", [
    pytest.param(b"", bytes(200_000), b"", id="pixel-data-to-the-end"),
    pytest.param(b"", bytes(200_000), TRAILER, id="a-value-after-pixel-data"),
    pytest.param(LONG_EARLY, bytes(512), b"", id="a-header-past-the-prefix"),
    # Encapsulated PDF: no Pixel Data; the header scan runs out of the prefix inside the document.
    pytest.param(b"", None, ENC.element(0x00420011, "OB", bytes(200_000)), id="a-document-to-the-end"),
])
def test_data_sets_longer_than_the_prefix_are_walked_and_scanned_whole(tmp_path: Path, early: bytes,
                                                                      pixels: bytes | None, late: bytes) -> None:
    storage = area(tmp_path / "root")
    data = data_set("1.2.3.4", early=early, pixels=pixels, late=late)
    assert len(data) > HEADER_PREFIX_BYTES
    peer = Peer(storage)
    try:
        scu = peer.scu()
        assert store(scu, "1.2.3.4", data) == (dimse.SUCCESS, "")
        scu.release()
        peer.ended()
    finally:
        peer.close()
    assert stored_path(storage, "1.2.3.4").read_bytes() == file_meta(CT, "1.2.3.4", EXPLICIT, "RAWSCU") + data
    (record,) = peer.records
    assert isinstance(record, InstanceRecord)
    assert (record.header.patient_id, record.header.series_instance_uid, record.header.modality) == (
        "PATIENT7", "1.2.3.2", "CT")


@pytest.mark.parametrize("pixels, declared, late", [
    pytest.param(bytes(4192), 8192, b"", id="short-pixel-data"),
    pytest.param(bytes(200_000), 300_000, b"", id="short-pixel-data-past-the-prefix"),
    pytest.param(bytes(200_000), None, ENC.header(0xFFFCFFFC, "OB", 100) + bytes(10),
                 id="a-value-after-pixel-data-cut-short"),
])
def test_a_data_set_cut_short_anywhere_is_not_acknowledged(tmp_path: Path, pixels: bytes, declared: int | None,
                                                           late: bytes) -> None:
    """0xC000 Cannot understand, the reason as the Error Comment (cut to 64 characters), the file quarantined."""
    storage = area(tmp_path / "root")
    peer = Peer(storage)
    try:
        scu = peer.scu()
        status, comment = store(scu, "1.2.3.4", data_set("1.2.3.4", pixels=pixels, declared=declared, late=late))
        assert status == dimse.CANNOT_UNDERSTAND
        scu.release()
        assert (peer.ended().failures, peer.records) == (1, [])
    finally:
        peer.close()
    assert not stored_path(storage, "1.2.3.4").exists()
    (reason,) = Path(storage.quarantine_dir).glob("*.reason.txt")
    why = reason.read_text().removeprefix("1.2.3.4: ").rstrip("\n")
    assert "past the end" in why and len(why) > 64 and comment == why[:64].rstrip()  # LO: trailing spaces are padding


def test_no_temp_file_answers_out_of_resources_and_the_association_goes_on(tmp_path: Path) -> None:
    """The incoming folder gone (a disk unmounted under us): no temp file can be made, ahead or at
    the request; each C-STORE is answered 0xA700 saying so, and nothing is stored."""
    storage = area(tmp_path / "root")
    os.rmdir(storage.incoming_dir)
    peer = Peer(storage)
    try:
        scu = peer.scu()
        for uid in ("1.2.3.4", "1.2.3.5"):
            assert store(scu, uid, data_set(uid)) == (
                dimse.OUT_OF_RESOURCES, "cannot create temp file: No such file or directory")
        scu.release()
        stats = peer.ended()
        assert (stats.instances, stats.failures, stats.outcome) == (0, 2, "released")
    finally:
        peer.close()
    assert sorted(os.listdir(storage.root)) == [".quarantine"]


def test_a_write_error_other_than_a_full_disk_answers_out_of_resources(tmp_path: Path) -> None:
    """An I/O error while the data set is written (EBADF here: the descriptor of the temp file made
    ahead swapped for a read-only one, there being no other way to make a disk fail on cue): 0xA700
    "write failed" with the reason, the temp file gone at once, the association goes on."""
    storage = area(tmp_path / "root")
    peer = Peer(storage)
    try:
        scu = peer.scu()
        scu.send_command(command_set(dimse.C_ECHO_RQ, sop_class=CT, message_id=1))
        scu.read_message()  # the data transfer phase has begun: the temp file is made
        spare = peer.association._spare
        assert spare is not None
        read_only = os.open(os.devnull, os.O_RDONLY)
        os.dup2(read_only, spare.fd)
        os.close(read_only)
        assert store(scu, "1.2.3.4", data_set("1.2.3.4")) == (
            dimse.OUT_OF_RESOURCES, "write failed: Bad file descriptor")
        assert store(scu, "1.2.3.5", data_set("1.2.3.5")) == (dimse.SUCCESS, "")
        scu.release()
        stats = peer.ended()
        assert (stats.instances, stats.failures) == (1, 1)
    finally:
        peer.close()
    assert temp_files(storage) == [] and not stored_path(storage, "1.2.3.4").exists()


def test_a_file_that_cannot_be_placed_answers_out_of_resources(tmp_path: Path) -> None:
    """The hierarchical layout's patient folder is taken by a file: 0xA700 "cannot store", the temp
    file removed, the association goes on."""
    storage = Storage(str(tmp_path / "root"))
    storage.prepare()
    Path(storage.root, "PATIENT7").write_bytes(b"not a folder")
    peer = Peer(storage)
    try:
        scu = peer.scu()
        assert store(scu, "1.2.3.4", data_set("1.2.3.4")) == (dimse.OUT_OF_RESOURCES, "cannot store: Not a directory")
        scu.release()
        stats = peer.ended()
        assert (stats.instances, stats.failures, peer.records) == (0, 1, [])
    finally:
        peer.close()
    assert temp_files(storage) == []


@pytest.mark.parametrize("policy", list(DuplicatePolicy))
def test_resends_are_answered_counted_and_recorded_by_policy(tmp_path: Path, policy: DuplicatePolicy,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A resend of the same bytes is acknowledged and counted as a duplicate; other bytes under the
    same UID follow storage.duplicates, and the index is told of the conflict. Every file descriptor
    the association opened is closed when it ends."""
    storage = area(tmp_path / "root", duplicates=policy)
    first, other = data_set("1.2.3.4"), data_set("1.2.3.4", pixels=b"\x01" * 512)
    fds = open_fds()
    peer = Peer(storage)
    try:
        scu = peer.scu()
        assert scu.store("1.2.3.4", first) == dimse.SUCCESS
        assert scu.store("1.2.3.4", first) == dimse.SUCCESS
        with caplog.at_level(logging.WARNING, logger="fastscp.association"):
            answer = scu.store("1.2.3.4", other)
        scu.release()
        stats = peer.ended()
    finally:
        peer.close()
    assert open_fds() == fds
    assert answer == (dimse.DUPLICATE_SOP_INSTANCE if policy is DuplicatePolicy.REJECT else dimse.SUCCESS)
    new_path = {DuplicatePolicy.OVERWRITE: "1.2.3.4.dcm", DuplicatePolicy.KEEP_BOTH: "1.2.3.4.v2.dcm"}.get(policy, "")
    stored, conflict, *rest = peer.records
    assert isinstance(stored, InstanceRecord) and stored.path == "1.2.3.4.dcm"
    assert isinstance(conflict, DuplicateConflict)
    assert (conflict.sop_instance_uid, conflict.path, conflict.policy, conflict.new_path) == (
        "1.2.3.4", "1.2.3.4.dcm", str(policy), new_path)
    assert conflict.existing_hash == stored.content_hash != conflict.new_hash
    # The warning an operator reads names both contents by their hashes' first 12 digits.
    assert (f"differs from the stored copy (content hash {conflict.existing_hash[:19]}, "
            f"new {conflict.new_hash[:19]}); storage.duplicates={policy!s}") in caplog.text
    assert conflict.existing_hash.startswith("blake3:")
    # A new file (overwrite, keep-both) is a new record; a kept or rejected one is not.
    assert [(r.path, r.content_hash) for r in rest if isinstance(r, InstanceRecord)] == (
        [(new_path, conflict.new_hash)] if new_path else [])
    rejected = policy is DuplicatePolicy.REJECT
    assert (stats.instances, stats.duplicates, stats.failures) == (
        3 - rejected, 1 + (policy is DuplicatePolicy.KEEP_FIRST), int(rejected))
    assert stats.by_modality == {"CT": 3 - rejected} and stats.sizes.count == 3 - rejected
    assert stats.bytes == 3 * len(first)


def test_a_connection_closed_before_any_pdu_is_a_probe(tmp_path: Path) -> None:
    """A port probe or health check is no association (it is not counted or logged as one); a peer
    that sent anything is."""
    peer = Peer(area(tmp_path / "root"))
    peer.close()
    assert peer.ended().probe
    peer = Peer(area(tmp_path / "other"))
    try:
        peer.sock.sendall(p_data(1, b"\x00" * 4, command=True, last=True)[:3])
    finally:
        peer.close()
    stats = peer.ended()
    assert not stats.probe and not stats.accepted


def test_without_fsync_the_stored_files_are_whole_and_closed_when_the_association_ends(tmp_path: Path) -> None:
    """storage.fsync never: the association holds its last stored files open while their pages go back
    to the kernel (storage.area.PageRecycler); every one is closed when it ends, stored byte for byte."""
    storage = area(tmp_path / "root", fsync=False)
    sent = {f"1.2.3.{n}": data_set(f"1.2.3.{n}", pixels=os.urandom(RECYCLE_MIN_BYTES))
            for n in range(RECYCLE_DEPTH + 3)}
    fds = open_fds()
    peer = Peer(storage)
    try:
        scu = peer.scu()
        assert [store(scu, uid, data)[0] for uid, data in sent.items()] == [dimse.SUCCESS] * len(sent)
        assert store(scu, "1.2.3.99", data_set("1.2.3.99"))[0] == dimse.SUCCESS  # too small to hold
        # The small file is closed after its C-STORE-RSP has gone (_hand_over): wait for it, bounded.
        wait_until(lambda: held_stored_files(storage) <= RECYCLE_DEPTH, timeout=10, what="the small file closed")
        assert held_stored_files(storage) == RECYCLE_DEPTH  # the last large ones
        scu.release()
        assert peer.ended().instances == len(sent) + 1
    finally:
        peer.close()
    assert open_fds() == fds
    sent["1.2.3.99"] = data_set("1.2.3.99")
    for uid, data in sent.items():
        assert stored_path(storage, uid).read_bytes()[-len(data):] == data
