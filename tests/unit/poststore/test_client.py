"""The workers' side of the post-store stage: a record that finds no room is kept in a file, never lost."""

from __future__ import annotations

import os
import socket
import stat
import time
import uuid
from pathlib import Path

import msgspec
import pytest

from fastscp.dicom.fields import HeaderFields
from fastscp.index.records import POSTSTORE_DECODER, InstanceRecord
from fastscp.poststore.client import BATCH_RECORDS, PostStoreClient, kept_folder
from fastscp.process.kept import kept_files, read_kept, write_kept
from fastscp.status import LATENCY_BUCKETS, SIZE_BUCKETS, AssociationReport, AssociationState, Histogram
from fastscp.storage.files import FileModes
from tests.conftest import receive_messages


def _record(number: int) -> InstanceRecord:
    header = HeaderFields(sop_instance_uid=f"1.2.826.0.1.3680043.8.498.{number}", patient_name="TEST^KEPT",
                          study_instance_uid="1.2.826.0.1.3680043.8.498.1")
    return InstanceRecord(path=f"KEPT/{number}.dcm", size=1000, transfer_syntax_uid="1.2.840.10008.1.2.1",
                          calling_ae_title="SCU", called_ae_title="FASTSCP", peer_address="127.0.0.1",
                          received_at=1.0, header=header)


def _records(messages: list[bytes]) -> list[InstanceRecord | AssociationReport]:
    return [record for m in messages for record in POSTSTORE_DECODER.decode(m)]


def _paths(messages: list[bytes]) -> list[str]:
    return [msgspec.convert(record, InstanceRecord).path for record in _records(messages)]


def _kept(folder: Path) -> list[bytes]:
    return [m for f in sorted(folder.iterdir()) for m in read_kept(str(f))]


def _address() -> str:
    return f"\0fastscp-test-poststore-{uuid.uuid4().hex}"


def test_a_full_backlog_goes_to_a_file_and_nothing_is_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The stage reads nothing (its socket fills, then the worker's backlog of 64 KiB here): the records
    beyond are kept in files, with the storage's file mode; socket and files hold each record once."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(address := _address())
    listener.listen(1)
    folder = tmp_path / "kept"
    client = PostStoreClient(address, str(folder), FileModes(0o600, 0o700), backlog_bytes=64 * 1024)
    count = 3000
    try:
        for number in range(count):
            client.send(_record(number))
        files = sorted(folder.iterdir())
        assert files, "nothing was kept in a file"
        assert "post-store stage busy or down (" in caplog.text and f"kept in {files[0]} for it" in caplog.text
        assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o600}
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        client.close()  # what the backlog still holds goes to a file as well
        conn, _ = listener.accept()
        received: list[bytes] = []
        while message := conn.recv(1 << 20):  # b"": the client closed its end, after the last one
            received.append(message)
        conn.close()
    finally:
        listener.close()
    assert client.dropped == 0
    assert sorted(_paths(received) + _paths(_kept(folder))) == sorted(f"KEPT/{n}.dcm" for n in range(count))
    # The backlog never outgrew its bound: no file holds more than it.
    assert max(sum(map(len, read_kept(str(f)))) for f in folder.iterdir()) <= 64 * 1024
    assert not [f for f in folder.iterdir() if f.name.startswith(".")]  # no temp file left


def test_records_travel_together_and_a_report_goes_at_once_after_them() -> None:
    """A message per record was a system call per store, and a wake-up of the stage."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(address := _address())
    listener.listen(1)
    client = PostStoreClient(address)
    client._batcher.interval = 60  # nothing goes by time here: the full batch goes, then the report takes the rest
    try:
        for number in range(BATCH_RECORDS + 5):
            client.send(_record(number))
        # The association ended: its hooks need not wait for the interval.
        client.send(report := _report(BATCH_RECORDS + 5))
        conn, _ = listener.accept()
        conn.settimeout(5)
        messages = [conn.recv(1 << 20), conn.recv(1 << 20)]
        records = _records(messages)
        assert [len(POSTSTORE_DECODER.decode(m)) for m in messages] == [BATCH_RECORDS, 6]
        assert [r.path for r in records[:-1]] == [f"KEPT/{n}.dcm" for n in range(BATCH_RECORDS + 5)]  # type: ignore[union-attr]
        assert records[-1] == report
        assert client.flush() == 0
        conn.close()
    finally:
        client.close()
        listener.close()
    assert client.dropped == 0


def _report(instances: int) -> AssociationReport:
    return AssociationReport(
        state=AssociationState(connection_id=7, worker=0, calling_ae_title="SCU", called_ae_title="FASTSCP",
                               peer_address="127.0.0.1:1", instances=instances, outcome="released"),
        by_modality={"CT": instances}, store_latency_seconds=Histogram.empty(LATENCY_BUCKETS),
        object_size_bytes=Histogram.empty(SIZE_BUCKETS), ended=True)


def test_a_report_never_overtakes_the_records_kept_in_a_file(tmp_path: Path) -> None:
    """The stage lags: the worker's records pass the backlog's bound and go to a file, which the stage
    takes only once it has caught up. Nothing goes by the socket until it has: the association's report
    came before its records, and its association-ended hooks ran before their instance-stored hooks."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(address := _address())
    listener.listen(1)
    folder = tmp_path / "kept"
    client = PostStoreClient(address, str(folder), backlog_bytes=64 * 1024)
    count = 3000
    try:
        for number in range(count):
            client.send(_record(number))
        assert kept_files(str(folder)), "nothing was kept in a file: nothing tested"
        client.send(report := _report(count))
        conn, _ = listener.accept()
        with conn:
            # The stage reads what is in its socket, and for 1 s (5 of the client's retries) what comes.
            received = receive_messages(conn, 1.0)
            assert report not in _records(received), "the report overtook the records kept in a file"
            # It takes the files, oldest first, as it does once caught up (KeptFiles), then reads again.
            taken: list[bytes] = []
            while names := kept_files(str(folder)):
                taken += read_kept(str(folder / names[0]))
                (folder / names[0]).unlink()
            after: list[bytes] = []
            deadline = time.monotonic() + 20
            while report not in _records(after) and time.monotonic() < deadline:
                after += receive_messages(conn, 0.5)
    finally:
        client.close()
        listener.close()
    records = _records(received) + _records(taken) + _records(after)
    assert records[-1] == report
    assert [msgspec.convert(r, InstanceRecord).path for r in records[:-1]] == [f"KEPT/{n}.dcm" for n in range(count)]
    assert client.dropped == 0


def test_a_record_sent_after_close_goes_to_a_file_when_the_stage_is_down(tmp_path: Path) -> None:
    """An association may outlive its worker's stop (its join timed out): its record is kept in a file
    for the stage, not held in the closed client."""
    folder = tmp_path / "kept"
    client = PostStoreClient(_address(), str(folder))  # nobody listens
    client.close()
    client.send(_record(7))
    assert client.dropped == 0 and client.flush() == 0
    assert _paths(_kept(folder)) == ["KEPT/7.dcm"]


def test_records_kept_for_a_stage_that_is_down_go_to_a_file_at_exit(tmp_path: Path) -> None:
    folder = tmp_path / "kept"
    client = PostStoreClient(_address(), str(folder))  # nobody listens
    for number in range(5):
        client.send(_record(number))
    assert not folder.exists()  # within the backlog: kept in memory, retried
    client.close()
    assert client.dropped == 0
    assert _paths(_kept(folder)) == [f"KEPT/{n}.dcm" for n in range(5)]


def test_without_a_folder_records_beyond_the_backlog_are_dropped_and_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    client = PostStoreClient(_address(), backlog_bytes=4096)  # nobody listens, nowhere to keep them
    for number in range(40):
        client.send(_record(number))
    assert 0 < client.dropped < 40
    assert client.flush() == 40 - client.dropped
    assert "no folder to keep them in" in caplog.text and "records dropped; no thumbnails" in caplog.text
    client.close()
    assert client.dropped == 40


def test_the_folder_is_under_the_storage_roots_incoming_folder(tmp_path: Path) -> None:
    assert kept_folder(str(tmp_path)) == str(tmp_path / ".incoming" / "poststore-backlog")
    assert kept_files(kept_folder(str(tmp_path))) == []  # no folder yet: none kept


def test_records_are_dropped_and_counted_only_when_no_file_can_take_them(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("in the way")
    client = PostStoreClient(_address(), str(tmp_path / "file" / "kept"), backlog_bytes=4096)
    for number in range(40):
        client.send(_record(number))
    kept = client.flush()
    assert client.dropped > 0
    client.close()
    assert client.dropped == 40 and kept > 0
    assert "records dropped; no thumbnails" in caplog.text and "cannot keep them in" in caplog.text


def test_a_torn_file_yields_its_whole_messages(tmp_path: Path) -> None:
    """A file cut short (a full disk mid-write cannot leave one: write_atomic; a copy might) ends at its last
    whole message."""
    messages = [b"a" * 10, b"b" * 300, b"c"]
    path = write_kept(str(tmp_path), messages)
    assert list(read_kept(path)) == messages
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:-1])
    assert list(read_kept(path)) == messages[:2]
    Path(path).write_bytes(data[:4 + 10 + 2])
    assert list(read_kept(path)) == messages[:1]
    assert os.path.basename(path).endswith(".records")
