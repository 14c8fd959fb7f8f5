"""The workers' side of the post-store stage: its address, and handing it a record without waiting
(:mod:`fastscp.poststore.stage` is the other side)."""

from __future__ import annotations

import collections
import errno
import logging
import socket
import threading
import time

import msgspec

from fastscp.index.records import ENCODER, InstanceRecord
from fastscp.process.ipc import local_address
from fastscp.process.kept import kept_folder as process_kept_folder
from fastscp.process.kept import write_kept
from fastscp.status import AssociationReport
from fastscp.storage.files import PATIENT_DATA, FileModes
from fastscp.storage.reserved import POSTSTORE_BACKLOG

log = logging.getLogger("fastscp.poststore")

#: Bytes of records a worker keeps for a stage that lags (~1.4 KB a CT's record: ~12,000 records).
BACKLOG_BYTES = 16 * 1024 * 1024
#: How often a worker tries again to send what it keeps, and how many messages per try hold its lock.
RETRY_INTERVAL = 0.2
RETRY_BATCH = 256


def poststore_address(index_path: str) -> str:
    """The abstract socket the post-store process of an index listens on."""
    return local_address("poststore", index_path)


def kept_folder(root: str) -> str:
    """Where workers keep, in files, the records a lagging stage had no room for (under the storage root)."""
    return process_kept_folder(root, POSTSTORE_BACKLOG)


class PostStoreClient:
    """The worker side: hand over a record, never wait.

    The post-store process runs at ``server.derived_priority``: under a
    burst it may not read for seconds, and its socket fills. A message that
    does not go at once is kept here (up to :data:`BACKLOG_BYTES`, oldest
    first) and sent by a background thread every :data:`RETRY_INTERVAL`,
    so a lagging stage catches up after the burst instead of losing the
    records. Beyond that bound, and when the worker exits, what is kept
    goes to a file in ``kept_folder`` (:func:`write_kept`), which the stage
    takes once it has caught up; only if that file cannot be written are
    records dropped, counted and logged. Thread-safe: a worker's
    associations share one client.
    """

    def __init__(self, address: str, kept_folder: str = "", modes: FileModes = PATIENT_DATA,
                 backlog_bytes: int = BACKLOG_BYTES) -> None:
        self.address = address
        #: Where kept records go beyond ``backlog_bytes`` (:func:`kept_folder`); "": dropped instead.
        self.kept_folder = kept_folder
        self.modes = modes
        self.backlog_bytes = backlog_bytes
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        #: Messages not yet sent, oldest first, and their total size.
        self._backlog: collections.deque[bytes] = collections.deque()
        self._backlog_bytes = 0
        self._retrying = False
        self.dropped = 0

    def send(self, record: InstanceRecord | AssociationReport) -> None:
        """A stored instance, or an association's final report (its association-ended hooks)."""
        if isinstance(record, InstanceRecord):
            # The post-store stage needs no attribute map (~2.5 KB for a CT).
            header = msgspec.structs.replace(record.header, attributes="{}")
            record = msgspec.structs.replace(record, header=header)
        data = ENCODER.encode(record)
        with self._lock:
            if self._backlog_bytes + len(data) > self.backlog_bytes:
                # PERF: ~130 ms for 16 MB here, once per ~12,000 records, after the C-STORE-RSPs of the
                # stores whose records wait (send runs after the response: storescp._hand_over).
                why = f"{len(self._backlog)} records waiting for it"
                unkept = self._keep_in_file(why)
                if unkept or len(data) > self.backlog_bytes:
                    self._drop(f"{why}; {unkept or 'a record larger than the backlog'}")
                    return
            self._backlog.append(data)
            self._backlog_bytes += len(data)
            if self._retrying:
                return  # it lags: the retry thread sends, in order; this thread has a store to serve
            if self._flush_locked() != "sent":
                self._retrying = True
                threading.Thread(target=self._retry, name="fastscp-poststore-send", daemon=True).start()

    def flush(self) -> int:
        """Try to send what is kept, now; returns how many messages remain."""
        with self._lock:
            self._flush_locked()
            return len(self._backlog)

    def _flush_locked(self, most: int = 0) -> str:
        """Send the kept messages in order, ``most`` at most (0: all).

        Returns "sent" (none is left), "more" (``most`` were sent) or
        "blocked" (the stage's socket is full, or the stage is down).
        """
        backlog = self._backlog
        sent = 0
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
                if most and sent >= most:
                    return "more"
                try:
                    self._sock.send(backlog[0])  # type: ignore[union-attr]
                except OSError as exc:
                    if exc.errno != errno.EMSGSIZE:
                        raise
                    self._drop("a record longer than the socket takes")  # it would hold up the others for good
                self._backlog_bytes -= len(backlog.popleft())
                sent += 1
        except BlockingIOError:
            return "blocked"  # its socket is full: it lags
        except OSError:
            if self._sock is not None:  # down (restarting): a new connection at the next try
                self._sock.close()
                self._sock = None
            return "blocked"
        return "sent"

    def _retry(self) -> None:
        """Send what is kept until none is left: a batch per hold of the lock, a pause while the stage is full."""
        while True:
            with self._lock:
                outcome = self._flush_locked(RETRY_BATCH)
                if outcome == "sent":
                    self._retrying = False
                    return
            time.sleep(RETRY_INTERVAL if outcome == "blocked" else 0)

    def _keep_in_file(self, why: str) -> str:
        """Move the backlog to a file for the stage to take later: "", or why it stays here."""
        if not self.kept_folder:
            return "no folder to keep them in"
        if not self._backlog:
            return ""
        try:
            path = write_kept(self.kept_folder, list(self._backlog), self.modes)
        except OSError as exc:
            return f"cannot keep them in {self.kept_folder}: {exc.strerror}"
        log.warning("post-store stage busy or down (%s): kept in %s for it", why, path)
        self._backlog.clear()
        self._backlog_bytes = 0
        return ""

    def _drop(self, why: str) -> None:
        self.dropped += 1
        if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
            log.warning("post-store stage busy or down (%s): %d records without thumbnails (fastscp convert, "
                        "fastscp scansheet)", why, self.dropped)

    def close(self) -> None:
        """At the worker's exit: what is still kept goes to a file for the stage, else is dropped (logged)."""
        with self._lock:
            why = f"{len(self._backlog)} records not sent at exit"
            unkept = self._keep_in_file(why)
            if self._backlog:
                self.dropped += len(self._backlog) - 1  # _drop counts the last one
                self._drop(f"{why}; {unkept}")
                self._backlog.clear()
                self._backlog_bytes = 0
            if self._sock is not None:
                self._sock.close()
                self._sock = None
