"""The post-store stage's own state (the records kept in files for it), and when it works: not while
stores keep arriving, unless its records have waited long enough."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastscp.config import ScansheetConfig, ThumbnailsConfig
from fastscp.dicom.header import read_header_from
from fastscp.dicom.synthetic import write_series
from fastscp.imaging.thumbnail import thumbnail_path
from fastscp.index.client import IndexerClient
from fastscp.index.records import BATCH_DECODER, ENCODER, InstanceRecord, ThumbnailMade
from fastscp.poststore.client import kept_folder
from fastscp.poststore.stage import INGEST_QUIET, MAX_DEFER, PostStore, deliver_at_exit
from fastscp.process import sender
from fastscp.process.kept import write_kept
from fastscp.storage.files import PATIENT_DATA
from fastscp.storage.layout import LayoutOptions
from tests.conftest import receive_messages


def test_the_lag_counts_the_files_kept_for_the_stage(tmp_path: Path) -> None:
    """The status page's post-store lag (status.PostStoreState.kept_files): kept files, not the ones being written."""
    root = str(tmp_path)
    stage = PostStore(root, LayoutOptions(), ThumbnailsConfig(), ScansheetConfig(),
                      f"\0fastscp-test-stage-{uuid.uuid4().hex}", IndexerClient(f"\0fastscp-test-{uuid.uuid4().hex}"),
                      PATIENT_DATA)
    try:
        assert stage.state().kept_files == 0  # no folder yet
        write_kept(kept_folder(root), [b"one"])
        write_kept(kept_folder(root), [b"two", b"three"])
        (Path(kept_folder(root)) / ".tmp-1-2-3.records").write_bytes(b"being written")
        assert stage.state().kept_files == 2
    finally:
        stage.listener.close()


@pytest.fixture
def stage(tmp_path: Path) -> Iterator[PostStore]:
    """A stage on ``tmp_path`` with thumbnails on and no scan sheets (its indexer is nowhere: records wait)."""
    indexer = IndexerClient(f"\0fastscp-test-{uuid.uuid4().hex}")
    stage = PostStore(str(tmp_path), LayoutOptions(), ThumbnailsConfig(), ScansheetConfig(enabled=False),
                      f"\0fastscp-test-stage-{uuid.uuid4().hex}", indexer, PATIENT_DATA)
    yield stage
    for key in list(stage.selector.get_map().values()):  # the listener, and the connections it accepted
        if isinstance(key.fileobj, socket.socket):
            key.fileobj.close()
    indexer.close()


def _stored(root: Path, name: str, received_at: float) -> tuple[bytes, Path]:
    """A message for an image stored under ``root`` as ``name`` (as a worker sends it), and where its
    thumbnail goes."""
    (path,) = write_series(str(root / name), 1, rows=8, columns=8, patient_id="DEFER")
    with open(path, "rb") as f:
        header = read_header_from(f).fields
    relative = os.path.relpath(path, root)
    record = InstanceRecord(path=relative, size=os.path.getsize(path), transfer_syntax_uid="1.2.840.10008.1.2.1",
                            calling_ae_title="SCU", called_ae_title="FASTSCP", peer_address="127.0.0.1",
                            received_at=received_at, header=header)
    return ENCODER.encode(record), Path(thumbnail_path(root, relative))


def _queued(stage: PostStore) -> list[str]:
    """The folders (as _stored named them) of the records in the stage's queue, in order."""
    return [os.path.basename(os.path.dirname(record.path)) for _, record in stage.queue]  # type: ignore[union-attr]


def test_records_wait_while_stores_keep_arriving_and_are_made_once_they_pause(stage: PostStore,
                                                                              tmp_path: Path) -> None:
    message, thumbnail = _stored(tmp_path, "new", time.time())
    stage._enqueue(message)
    stage.step()
    assert stage.deferring() and len(stage.queue) == 1 and not thumbnail.exists()
    time.sleep(INGEST_QUIET * 1.25)  # the stores pause
    assert not stage.deferring()
    stage.step()
    assert not stage.queue and thumbnail.is_file() and stage.made == 1


def test_a_record_that_waited_max_defer_is_made_while_stores_keep_arriving(stage: PostStore, tmp_path: Path) -> None:
    old, old_thumbnail = _stored(tmp_path, "old", time.time() - MAX_DEFER - 1)
    new, new_thumbnail = _stored(tmp_path, "new", time.time())
    stage._enqueue(old)
    stage._enqueue(new)  # a store has just arrived
    stage.step()
    assert old_thumbnail.is_file() and not new_thumbnail.exists()
    assert stage.deferring()  # the one left is young: it waits again


def test_a_stopping_stage_does_not_wait(stage: PostStore, tmp_path: Path) -> None:
    message, thumbnail = _stored(tmp_path, "new", time.time())
    stage._enqueue(message)
    stage.stopping = True
    assert not stage.deferring()
    stage.step()
    assert thumbnail.is_file()


def test_a_full_queue_does_not_wait(stage: PostStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full queue stops the reading (records then wait in the workers, then in files): work, not wait."""
    monkeypatch.setattr("fastscp.poststore.stage.QUEUE_LIMIT", 2)
    first, first_thumbnail = _stored(tmp_path, "first", time.time())
    stage._enqueue(first)
    assert stage.deferring()
    second, _ = _stored(tmp_path, "second", time.time())
    stage._enqueue(second)
    assert not stage.deferring()
    stage.step()
    assert first_thumbnail.is_file() and len(stage.queue) == 1


def test_what_a_worker_sent_before_its_kept_file_is_queued_before_the_files_records(stage: PostStore,
                                                                                   tmp_path: Path) -> None:
    """The stage read its sockets, then paused (idle priority) while a worker sent one more message, then,
    its backlog past the bound, kept the next in a file. Taking the file, the stage queues what the socket
    holds first: in the order the worker handed them over (an association's report after its records)."""
    before, _ = _stored(tmp_path, "before", time.time())
    after, _ = _stored(tmp_path, "after", time.time())
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as worker:
        worker.connect(stage.listener.getsockname())
        worker.send(before)
        write_kept(kept_folder(str(tmp_path)), [after])
        stage._take_kept()  # its queue is empty: caught up
    assert _queued(stage) == ["before", "after"]
    assert stage.kept.count() == 0


def test_a_kept_file_is_taken_while_the_queue_has_room(stage: PostStore, tmp_path: Path) -> None:
    """Not only once caught up: a worker sends nothing by its socket until the stage has taken its file (so
    its records keep their order), and under steady stores the queue is never empty for long."""
    queued, _ = _stored(tmp_path, "queued", time.time())
    kept, _ = _stored(tmp_path, "kept", time.time())
    stage._enqueue(queued)  # stores keep arriving: the stage defers
    write_kept(kept_folder(str(tmp_path)), [kept])
    stage.step()
    assert stage.deferring()
    assert _queued(stage) == ["queued", "kept"]
    assert stage.kept.count() == 0


def test_what_its_sockets_held_at_stop_is_taken_before_the_files_workers_wrote_as_they_stopped(
        stage: PostStore, tmp_path: Path) -> None:
    """Workers stop first and keep what they still hold in files; the stage's sockets hold their older
    messages. Kept at the stage's stop, those come first at the next start (an association's records
    before its report), though their file is written last."""
    older, _ = _stored(tmp_path, "older", time.time())
    newer, _ = _stored(tmp_path, "newer", time.time())
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as worker:
        worker.connect(stage.listener.getsockname())
        worker.send(older)
        write_kept(kept_folder(str(tmp_path)), [newer])  # as the worker stopped
        stage.stopping = True
        stage._keep_unread()
    taken = [stage.kept.take_oldest(time.monotonic(), at_once=True) for _ in range(3)]
    assert [m for t in taken if t is not None for m in t[1]] == [older, newer]


def test_at_exit_the_records_for_an_indexer_still_busy_wait_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage's client of the indexer waits for it (no kept folder), a send at most SEND_TIMEOUT at a
    time; at the stage's exit its last records wait INDEXER_DELIVERY_WAIT for an indexer that reads
    again only after several of those: every one arrives."""
    monkeypatch.setattr(sender, "SEND_TIMEOUT", 0.2)
    address = f"\0fastscp-test-indexer-{uuid.uuid4().hex}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(address)
    listener.listen(1)
    indexer = IndexerClient(address)
    made = [ThumbnailMade(path=f"P/S/R/{n}.dcm", thumbnail_path=f"P/S/R/.thumbnails/{n}.jpg") for n in range(1500)]
    received: list[ThumbnailMade] = []
    try:
        indexer.send(made[0])
        conn, _ = listener.accept()
        with conn:
            for record in made[1:]:  # more than the socket holds unread: some wait in the client
                indexer.send(record)
            assert indexer.pending > 0, "the socket took everything unread: nothing tested"

            def read_later() -> None:
                time.sleep(1.0)  # five SEND_TIMEOUTs
                while len(received) < len(made) and (messages := receive_messages(conn, 10, 1)):
                    for batch in messages:
                        received.extend(BATCH_DECODER.decode(batch).others)

            reader = threading.Thread(target=read_later)
            reader.start()
            deliver_at_exit(indexer)
            reader.join(30)
    finally:
        listener.close()
    assert received == made and indexer.pending == 0
