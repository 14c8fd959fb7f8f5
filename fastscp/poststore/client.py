"""The workers' side of the post-store stage: its address, and handing it a record without waiting
(:mod:`fastscp.poststore.stage` is the other side)."""

from __future__ import annotations

import collections
import errno
import logging
import socket

import msgspec

from fastscp.index.records import ENCODER, InstanceRecord
from fastscp.process.batcher import MAX_MESSAGE_BYTES, Batcher, fitting
from fastscp.process.ipc import local_address
from fastscp.process.kept import kept_folder as process_kept_folder
from fastscp.process.kept import write_kept
from fastscp.status import AssociationReport
from fastscp.storage.files import PATIENT_DATA, FileModes
from fastscp.storage.reserved import POSTSTORE_BACKLOG

log = logging.getLogger("fastscp.poststore")

#: Bytes of records a worker keeps for a stage that lags (~1.4 KB a CT's record: ~12,000 records).
BACKLOG_BYTES = 16 * 1024 * 1024
#: Seconds a record may wait in a worker to travel with others, and records per message at most.
SEND_INTERVAL = 0.02
BATCH_RECORDS = 32
#: How often a worker tries again to send what it keeps.
RETRY_INTERVAL = 0.2


def poststore_address(index_path: str) -> str:
    """The abstract socket the post-store process of an index listens on."""
    return local_address("poststore", index_path)


def kept_folder(root: str) -> str:
    """Where workers keep, in files, the records a lagging stage had no room for (under the storage root)."""
    return process_kept_folder(root, POSTSTORE_BACKLOG)


class PostStoreClient:
    """The worker side: hand over a record, never wait.

    Records travel in messages of up to :data:`BATCH_RECORDS`, a record
    waiting at most :data:`SEND_INTERVAL` for company, as to the indexer
    (:class:`fastscp.process.batcher.Batcher`): one message per record
    was a system call per store in the association's thread, and a
    wake-up of the stage. An association's final report goes at once,
    after the records before it.

    The post-store process runs at ``server.derived_priority``: under a
    burst it may not read for seconds, and its socket fills. A message that
    does not go at once is kept here (up to :data:`BACKLOG_BYTES`, oldest
    first) and tried again every :data:`RETRY_INTERVAL`, so a lagging stage
    catches up after the burst instead of losing the records. Beyond that
    bound, and when the worker exits, what is kept goes to a file in
    ``kept_folder`` (:func:`write_kept`), which the stage takes once it has
    caught up; only if that file cannot be written are records dropped,
    counted and logged. Thread-safe: a worker's associations share one
    client.
    """

    def __init__(self, address: str, kept_folder: str = "", modes: FileModes = PATIENT_DATA,
                 backlog_bytes: int = BACKLOG_BYTES) -> None:
        self.address = address
        #: Where kept records go beyond ``backlog_bytes`` (:func:`kept_folder`); "": dropped instead.
        self.kept_folder = kept_folder
        self.modes = modes
        self.backlog_bytes = backlog_bytes
        self._sock: socket.socket | None = None
        #: Messages not yet sent, oldest first, with their record counts, and their total size.
        self._backlog: collections.deque[tuple[bytes, int]] = collections.deque()
        self._backlog_bytes = 0
        #: Records dropped (see the class).
        self.dropped = 0
        #: close() has run: what does not go at once is kept in a file or dropped, not held.
        self._closed = False
        #: Records not yet in a message; its lock guards all of the above.
        self._batcher: Batcher[InstanceRecord | AssociationReport] = Batcher(
            self._deliver_locked, interval=SEND_INTERVAL, max_items=BATCH_RECORDS, retry_interval=RETRY_INTERVAL,
            name="fastscp-poststore-send")

    def send(self, record: InstanceRecord | AssociationReport) -> None:
        """A stored instance, or an association's final report (its association-ended hooks)."""
        if isinstance(record, InstanceRecord):
            # The post-store stage needs no attribute map (~2.5 KB for a CT).
            header = msgspec.structs.replace(record.header, attributes="{}")
            record = msgspec.structs.replace(record, header=header)
        self._batcher.add(record, urgent=isinstance(record, AssociationReport))

    def flush(self) -> int:
        """Try to send what waits, now; returns how many records remain."""
        with self._batcher.lock:
            self._batcher.flush_locked()
            return self._batcher.waiting + sum(count for _, count in self._backlog)

    def _deliver_locked(self, records: list[InstanceRecord | AssociationReport]) -> bool:
        """Seal ``records`` into messages, then send what is kept; False if some remain (the stage lags or
        is down: the batcher's thread tries again)."""
        fit = min(MAX_MESSAGE_BYTES, self.backlog_bytes)
        for data, chunk in fitting(records, ENCODER.encode, fit) if records else ():
            if self._backlog_bytes + len(data) > self.backlog_bytes:
                # PERF: ~130 ms for 16 MB here, once per ~12,000 records, after the C-STORE-RSPs of the
                # stores whose records wait (send runs after the response: storescp._hand_over).
                why = f"{self._kept_records()} records waiting for it"
                unkept = self._keep_in_file(why)
                if unkept or len(data) > self.backlog_bytes:
                    self._drop(len(chunk), f"{why}; {unkept or 'a record larger than the backlog'}")
                    continue
            self._backlog.append((data, len(chunk)))
            self._backlog_bytes += len(data)
        sent = self._send_locked()
        if not self._closed:
            return sent
        # A record from an association that outlived the worker's stop: sent, kept in a file, or dropped.
        self._keep_or_drop(f"{self._kept_records()} records not sent at exit")
        self._close_socket()
        return True

    def _kept_records(self) -> int:
        return sum(count for _, count in self._backlog)

    def _send_locked(self) -> bool:
        """Send the kept messages in order; True if none is left (False: the stage's socket is full, or
        the stage is down)."""
        backlog = self._backlog
        try:
            if backlog and self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                try:
                    sock.setblocking(False)
                    sock.connect(self.address)
                except OSError:
                    sock.close()
                    raise
                self._sock = sock
            while backlog:
                data, count = backlog[0]
                try:
                    self._sock.send(data)  # type: ignore[union-attr]
                except OSError as exc:
                    if exc.errno != errno.EMSGSIZE:
                        raise
                    self._drop(count, "a record longer than the socket takes")  # it would hold up the others
                backlog.popleft()
                self._backlog_bytes -= len(data)
        except BlockingIOError:
            return False  # its socket is full: it lags
        except OSError:
            self._close_socket()  # down (restarting): a new connection at the next try
            return False
        return True

    def _keep_in_file(self, why: str) -> str:
        """Move the backlog to a file for the stage to take later: "", or why it stays here."""
        if not self.kept_folder:
            return "no folder to keep them in"
        if not self._backlog:
            return ""
        try:
            path = write_kept(self.kept_folder, (data for data, _ in self._backlog), self.modes)
        except OSError as exc:
            return f"cannot keep them in {self.kept_folder}: {exc.strerror}"
        log.warning("post-store stage busy or down (%s): kept in %s for it", why, path)
        self._backlog.clear()
        self._backlog_bytes = 0
        return ""

    def _drop(self, count: int, why: str) -> None:
        before, self.dropped = self.dropped, self.dropped + count
        # Logged at the 1st, 10th, 100th record dropped, then each 1,000th.
        if any(before < mark <= self.dropped for mark in (1, 10, 100)) or before // 1000 < self.dropped // 1000:
            log.warning("post-store stage busy or down (%s): %d records without thumbnails (fastscp convert, "
                        "fastscp scansheet)", why, self.dropped)

    def _keep_or_drop(self, why: str) -> None:
        """What is kept goes to a file for the stage, else is dropped (counted, logged)."""
        unkept = self._keep_in_file(why)
        if self._backlog:
            self._drop(self._kept_records(), f"{why}; {unkept}")
            self._backlog.clear()
            self._backlog_bytes = 0

    def close(self) -> None:
        """At the worker's exit: what is still kept goes to a file for the stage, else is dropped (logged);
        so does what is sent after and does not go at once."""
        self._batcher.close()
        with self._batcher.lock:
            self._closed = True
            self._batcher.flush_locked()
            self._keep_or_drop(f"{self._kept_records()} records not sent at exit")
            self._close_socket()

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
