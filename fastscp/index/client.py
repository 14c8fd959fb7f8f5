"""Sending records to the indexer from other processes (workers, the post-store stage).

:class:`IndexerClient` delivers records in batches and keeps them while the
indexer is down (a restart after a crash) or, for a worker, lagging at its
low priority, retrying in the background.
Queries go through :mod:`fastscp.query.client`.
"""

from __future__ import annotations

import collections
import logging
import socket
from collections.abc import Callable

import msgspec

from fastscp.index.records import ENCODER, Base, IndexRecord, InstanceRecord, RecordBatch
from fastscp.process.batcher import MAX_MESSAGE_BYTES, Batcher, fitting
from fastscp.process.ipc import local_address
from fastscp.process.kept import kept_folder as process_kept_folder
from fastscp.process.kept import write_kept
from fastscp.storage.files import PATIENT_DATA, FileModes
from fastscp.storage.reserved import INDEX_BACKLOG

log = logging.getLogger("fastscp.indexclient")

#: Seconds a record may wait in a worker to travel with others.
SEND_INTERVAL = 0.02
#: Records per message at most (a datagram must fit the socket's buffer).
BATCH_RECORDS = 32
#: Seconds between retries while records wait for the indexer.
RETRY_INTERVAL = 0.2
#: Bytes of messages a worker keeps for an indexer that lags before they go to a
#: file (~0.5 KB a CT's record in a batch of its series: ~60,000 records).
BACKLOG_BYTES = 32 * 1024 * 1024


def indexer_address(index_path: str) -> str:
    """The abstract socket name the indexer of an index file listens on for records.

    Derived from the file's absolute path, so any process that knows the
    index (a worker, ``fastscp query``) can find the server that owns it.
    """
    return local_address("indexer", index_path)


def kept_folder(root: str) -> str:
    """Where workers keep, in files, the records a lagging indexer had no room for (under the storage root)."""
    return process_kept_folder(root, INDEX_BACKLOG)


def batch_messages(records: list[IndexRecord], known: dict[str, Base] | None = None) -> list[tuple[bytes, int]]:
    """The records as messages of :data:`MAX_MESSAGE_BYTES` at most: (message, records in it).

    ``known``: the sender's base attribute maps by series, kept between calls
    (:func:`~fastscp.index.records.split_maps`).

    A batch too long is halved until each part fits. A single instance
    record that is still too long (a hostile header: its attribute map is
    bounded by characters, not bytes) travels without its attribute map;
    the file keeps every attribute.
    """
    messages = []
    for data, chunk in fitting(records, lambda part: ENCODER.encode(RecordBatch.of(part, known))):
        if len(data) > MAX_MESSAGE_BYTES and isinstance(chunk[0], InstanceRecord):
            (record,) = chunk
            # The path comes from header values: the log formatters escape it (fastscp.process.logs.escape).
            log.warning("the attribute map of %s is too long for a message (%d bytes): indexed without it",
                        record.path, len(data))
            record = msgspec.structs.replace(record, header=msgspec.structs.replace(record.header, attributes="{}"))
            data = ENCODER.encode(RecordBatch.of([record]))
        messages.append((data, len(chunk)))
    return messages


class IndexerClient:
    """Sends records to the indexer in batches; keeps them while it is unreachable.

    Thread-safe (one lock): the associations of a worker share one client.
    A record waits at most :data:`SEND_INTERVAL` for others to travel with
    (:data:`BATCH_RECORDS` at most): one message per record made the
    indexer's receive loop its bottleneck (bench/test_bench_index.py). A
    background thread sends what waits, and while the indexer is down
    retries every :data:`RETRY_INTERVAL`, so kept records reach a restarted
    indexer even if no other image arrives. Nothing waiting here is lost for
    good if the process dies: the indexer's reconcile on start indexes the
    files whose records never arrived.

    With ``kept_folder`` (a worker's client) a send never waits: the indexer
    runs at ``server.derived_priority`` and under a burst may not read for
    seconds. What its full socket does not take is kept here, up to
    ``backlog_bytes``, then in a file in ``kept_folder``
    (:func:`fastscp.process.kept.write_kept`), which the indexer takes once
    it has caught up; so is what is still kept at :meth:`close`. Without
    it (the post-store stage's and the forwarder's clients) a full socket
    holds the sender up.
    """

    def __init__(self, address: str, name: str = "indexer", *, kept_folder: str = "",
                 modes: FileModes = PATIENT_DATA, backlog_bytes: int = BACKLOG_BYTES) -> None:
        self.address = address
        #: Who receives the records, for the log ("indexer", "forwarder").
        self.name = name
        self.kept_folder = kept_folder
        self.modes = modes
        self.backlog_bytes = backlog_bytes
        self._sock: socket.socket | None = None
        #: Sealed messages not yet delivered, oldest first, with their record counts, and their size.
        self._pending: collections.deque[tuple[bytes, int]] = collections.deque()
        self._pending_bytes = 0
        #: The indexer could not be reached at the last try.
        self._down = False
        #: The base attribute map of each recent series (batch_messages).
        self._bases: dict[str, Base] = {}
        #: Records not yet sealed into a message; its lock guards all of the above.
        self._batcher: Batcher[IndexRecord] = Batcher(
            self._deliver_locked, interval=SEND_INTERVAL, max_items=BATCH_RECORDS, retry_interval=RETRY_INTERVAL,
            name=f"fastscp-{name}-send")
        #: Hand a record to the indexer (soon; or keep it until the indexer is back).
        self.send: Callable[[IndexRecord], None] = self._batcher.add

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(self.address)
            sock.setblocking(not self.kept_folder)
        except OSError:
            sock.close()
            raise
        return sock

    def flush(self) -> int:
        """Try to deliver everything now; returns how many records remain."""
        with self._batcher.lock:
            self._batcher.flush_locked()
            return self._waiting_locked()

    @property
    def pending(self) -> int:
        """Records not yet delivered to the indexer."""
        with self._batcher.lock:
            return self._waiting_locked()

    def _waiting_locked(self) -> int:
        return self._batcher.waiting + sum(count for _, count in self._pending)

    def _deliver_locked(self, records: list[IndexRecord]) -> bool:
        """Seal ``records`` into messages and send every message kept; False if some remain
        (the indexer is down, or lags: they are sent at the next try)."""
        for message in batch_messages(records, self._bases) if records else ():
            self._pending.append(message)
            self._pending_bytes += len(message[0])
        if not self._pending:
            return True
        try:
            if self._sock is None:
                self._sock = self._connect()
            while self._pending:
                self._sock.send(self._pending[0][0])
                self._pending_bytes -= len(self._pending.popleft()[0])
        except BlockingIOError:
            pass  # its socket is full: it lags (server.derived_priority)
        except OSError as exc:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            if not self._down:
                self._down = True
                log.warning("%s unreachable (%s); %d records kept for retry", self.name, exc,
                            self._waiting_locked())
        else:
            if self._down:
                self._down = False
                log.info("%s reachable again; kept records delivered", self.name)
            return True
        if self._pending_bytes > self.backlog_bytes:  # beyond the bound: to a file (with a kept folder)
            self._keep_in_file(f"{self._waiting_locked()} records waiting for it")
        return False

    def _keep_in_file(self, why: str) -> None:
        """Move the sealed messages to a file the indexer takes once it has caught up (else they stay here)."""
        if not self.kept_folder or not self._pending:
            return
        try:
            path = write_kept(self.kept_folder, (message for message, _ in self._pending), self.modes)
        except OSError as exc:
            # In memory, they still reach the indexer; if this process dies first, the
            # indexer's reconcile on start indexes their files.
            log.warning("%s busy or down (%s); cannot keep them in %s: %s", self.name, why, self.kept_folder,
                        exc.strerror)
            return
        log.warning("%s busy or down (%s): kept in %s for it", self.name, why, path)
        self._pending.clear()
        self._pending_bytes = 0

    def close(self) -> None:
        """Stop the background thread; with a ``kept_folder``, what is still kept goes to a file for the indexer."""
        self._batcher.close()
        with self._batcher.lock:
            if self.kept_folder:
                self._batcher.flush_locked()
                self._keep_in_file(f"{self._waiting_locked()} records not sent at exit")
            if self._sock is not None:
                self._sock.close()
                self._sock = None
