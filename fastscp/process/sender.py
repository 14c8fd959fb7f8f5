"""Handing records to another of fastscp's processes over its local socket, in order, whatever its lag.

One owner of what the workers' clients of the indexer, the post-store stage
and the forwarder do alike: records gathered into messages
(:class:`~fastscp.process.batcher.Batcher`), sent over a SOCK_SEQPACKET
connection, kept while the receiver lags or is down, and beyond a bound
kept in files the receiver takes back once it has caught up
(:mod:`fastscp.process.kept`).
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from fastscp.process.batcher import Batcher
from fastscp.process.kept import write_kept
from fastscp.storage.files import PATIENT_DATA, FileModes

__all__ = ["Sender"]

T = TypeVar("T")

#: How often :meth:`Sender.close` tries again while it waits for the receiver.
CLOSE_RETRY = 0.1
#: With ``wait``: how long one send waits for room in the receiver's socket before the message is kept and
#: tried again later, as a non-waiting sender's would be. A receiver that stopped reading holds the sender
#: up (that is the point of waiting), but never for good: not at :meth:`Sender.close` either.
SEND_TIMEOUT = 1.0
#: After a file could not take what is kept, seconds before the next try: not at each message past the
#: bound (each try joins the whole backlog, tens of MB, in the association's thread).
FILE_RETRY = 1.0


class Sender(Generic[T]):
    """Sends items to the process listening at ``address``; keeps what it cannot take yet.

    ``seal(items)`` makes a batch's messages: (message, items in it), each
    short enough for a datagram (:func:`~fastscp.process.batcher.fitting`).
    A batch goes when it is full, ``interval`` after its first item, or at
    once for an urgent item. A message the receiver's full socket does not
    take is kept here, oldest first, and tried again every
    ``retry_interval``: a receiver at ``server.derived_priority`` may not
    read for seconds under a burst, and catches up after it. With ``wait``
    a full socket holds the sender up instead (a process whose records may
    wait; a worker's never do), for :data:`SEND_TIMEOUT` at a time.

    Beyond ``backlog_bytes`` (what the socket does not take when tried
    once more), what is kept goes to a file in ``kept_folder``, which the
    receiver takes once it has room; so does what is still kept at
    :meth:`close`. ``ordered``: until the receiver has taken this sender's
    newest file, nothing goes by the socket, so a later message (an
    association's report) never overtakes an earlier one; the receiver
    takes what its sockets hold before it removes the file
    (:meth:`fastscp.process.kept.KeptFiles.take_oldest`).

    Where no file can take them (no folder, or it cannot be written),
    ``hold`` keeps them in memory (the index must not lose a record);
    otherwise what would pass the bound is dropped, counted
    (:attr:`dropped`) and logged with ``if_dropped``, what that means for
    the records. Thread-safe: a worker's associations share one sender.
    """

    def __init__(self, address: str, seal: Callable[[list[T]], list[tuple[bytes, int]]], *, name: str,
                 log: logging.Logger, interval: float, max_items: int, retry_interval: float,
                 backlog_bytes: int, kept_folder: str = "", modes: FileModes = PATIENT_DATA, wait: bool = False,
                 ordered: bool = False, hold: bool, if_dropped: str = "") -> None:
        self.address = address
        self._seal = seal
        #: Who receives the items, for the log ("indexer", "post-store stage", "forwarder").
        self.name = name
        self._log = log
        self.backlog_bytes = backlog_bytes
        self.kept_folder = kept_folder
        self.modes = modes
        self._wait = wait
        self._ordered = ordered
        self._hold = hold
        self._if_dropped = if_dropped
        self._sock: socket.socket | None = None
        #: Messages not yet sent, oldest first, with their record counts, and their total size.
        self._kept: collections.deque[tuple[bytes, int]] = collections.deque()
        self._kept_bytes = 0
        #: With ``ordered``: the newest file this sender kept messages in, until the receiver has taken it.
        self._file = ""
        #: The receiver could not be reached at the last try.
        self._down = False
        #: Why the last try could not write a file ("": it could, or none was tried), and when that
        #: try was (time.monotonic).
        self._unkept = ""
        self._file_tried = 0.0
        #: close() has run: what does not go at once goes to a file (or is dropped), not held for a retry.
        self._closed = False
        #: Records dropped (see the class).
        self.dropped = 0
        #: Items not yet sealed into a message; its lock guards all of the above.
        self._batcher: Batcher[T] = Batcher(self._deliver_locked, interval=interval, max_items=max_items,
                                            retry_interval=retry_interval,
                                            name=f"fastscp-{name.replace(' ', '-')}-send")

    def send(self, item: T, urgent: bool = False) -> None:
        """Hand ``item`` over, soon (at once if ``urgent``), never waiting unless ``wait``."""
        self._batcher.add(item, urgent=urgent)

    def flush(self) -> int:
        """Try to deliver everything now; returns how many records remain."""
        with self._batcher.lock:
            self._batcher.flush_locked()
            return self._waiting_locked()

    @property
    def pending(self) -> int:
        """Records not yet delivered."""
        with self._batcher.lock:
            return self._waiting_locked()

    def _waiting_locked(self) -> int:
        return self._batcher.waiting + self._kept_records()

    def _kept_records(self) -> int:
        return sum(count for _, count in self._kept)

    def _deliver_locked(self, items: list[T]) -> bool:
        """Seal ``items`` into messages, then send what is kept; False if some remain (the batcher's
        thread tries again)."""
        for data, count in self._seal(items) if items else ():
            self._keep(data, count)
        sent = self._send_locked()
        if not self._closed:
            return sent
        # Sent after close (an association that outlived the process's stop): no thread tries again.
        if not sent:
            self._to_file_or_drop(f"{self._kept_records()} records not sent at exit")
        self._close_socket()
        return True

    def _keep(self, data: bytes, count: int) -> None:
        """Keep a message to send; what would pass the bound (unless the socket takes it now) moves what
        is kept to a file first."""
        if self._kept_bytes + len(data) > self.backlog_bytes:
            self._send_locked()  # the receiver may read again
        if self._kept_bytes + len(data) > self.backlog_bytes:
            # PERF: ~130 ms for 16 MB here, once per ~12,000 records, after the C-STORE-RSPs of
            # the stores whose records wait (a worker sends after the response).
            why = f"{self._kept_records()} records waiting for it"
            unkept = self._to_file(why)
            if (unkept or len(data) > self.backlog_bytes) and not self._hold:
                self._drop(count, f"{why}; {unkept or 'a message larger than the backlog'}")
                return
        self._kept.append((data, count))
        self._kept_bytes += len(data)

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.settimeout(SEND_TIMEOUT if self._wait else 0.0)
            sock.connect(self.address)
        except OSError:
            sock.close()
            raise
        return sock

    def _send_locked(self) -> bool:
        """Send the kept messages in order; True if none is left (False: the receiver's socket is full,
        it is down, or it has not taken this sender's file yet)."""
        kept = self._kept
        if not kept:
            return True
        if self._file:
            if os.path.lexists(self._file):
                return False  # the receiver handles the file's older messages first
            self._file = ""
        try:
            if self._sock is None:
                self._sock = self._connect()
            while kept:
                data, count = kept[0]
                try:
                    self._sock.send(data)
                except OSError as exc:
                    if exc.errno != errno.EMSGSIZE:
                        raise
                    # Longer than the socket takes: it would hold up the others. A file has no such bound.
                    unkept = self._to_file("a message longer than the socket takes", now=True)
                    if not unkept:
                        continue  # all that was kept is in the file now
                    self._drop(count, f"a message longer than the socket takes; {unkept}")
                kept.popleft()
                self._kept_bytes -= len(data)
        except (BlockingIOError, TimeoutError):
            return False  # its socket is full: it lags (server.derived_priority), or (wait) has not read for a while
        except OSError as exc:
            self._close_socket()  # down (restarting): a new connection at the next try
            if not self._down:
                self._down = True
                self._log.warning("%s unreachable (%s); %d records kept for retry", self.name, exc,
                                  self._waiting_locked())
            return False
        if self._down:
            self._down = False
            self._log.info("%s reachable again; kept records delivered", self.name)
        return True

    def _to_file(self, why: str, *, now: bool = False) -> str:
        """Move what is kept to a file for the receiver: "" when done (or nothing is kept), else why not.
        After a failure, not tried again for :data:`FILE_RETRY` seconds, unless ``now`` (at exit)."""
        if not self._kept:
            return ""
        if not self.kept_folder:
            return "no folder to keep them in"
        if self._unkept and not now and time.monotonic() - self._file_tried < FILE_RETRY:
            return self._unkept
        try:
            path = write_kept(self.kept_folder, (data for data, _ in self._kept), self.modes)
        except OSError as exc:
            said, self._unkept = self._unkept, f"cannot keep them in {self.kept_folder}: {exc.strerror}"
            self._file_tried = time.monotonic()
            if not said and self._hold:  # held in memory: said once, not at each message
                self._log.warning("%s busy or down (%s); %s", self.name, why, self._unkept)
            return self._unkept
        self._unkept = ""
        self._log.warning("%s busy or down (%s): kept in %s for it", self.name, why, path)
        self._kept.clear()
        self._kept_bytes = 0
        self._file = path if self._ordered else ""
        return ""

    def _to_file_or_drop(self, why: str) -> None:
        """What is kept goes to a file for the receiver, else is dropped (unless held)."""
        unkept = self._to_file(why, now=True)
        if not self._kept:
            return
        if self._hold:
            self._log.warning("%s: %d records not delivered at exit (%s); %s", self.name, self._kept_records(),
                              unkept, self._if_dropped)
            return
        self._drop(self._kept_records(), f"{why}; {unkept}")
        self._kept.clear()
        self._kept_bytes = 0

    def _drop(self, count: int, why: str) -> None:
        before, self.dropped = self.dropped, self.dropped + count
        # Logged at the 1st, 10th, 100th record dropped, then each 1,000th.
        if any(before < mark <= self.dropped for mark in (1, 10, 100)) or before // 1000 < self.dropped // 1000:
            self._log.warning("%s busy or down (%s): %d records dropped; %s", self.name, why, self.dropped,
                              self._if_dropped)

    def close(self, wait: float = 0.0) -> None:
        """At the process's exit: up to ``wait`` seconds for the receiver to take what is kept (not while
        it has yet to take this sender's file: it takes files at its own pace, seconds apart); then what
        is still kept goes to a file for the receiver (else is dropped, unless held); so does what is
        sent after and does not go at once."""
        deadline = time.monotonic() + wait
        while self.flush() and not self._behind_file() and time.monotonic() < deadline:
            time.sleep(CLOSE_RETRY)
        self._batcher.close()
        with self._batcher.lock:
            self._closed = True
            self._batcher.flush_locked()  # anything kept was behind: delivered now, or to a file
            self._close_socket()

    def _behind_file(self) -> bool:
        """``ordered``: what is kept waits for the receiver to take this sender's file."""
        with self._batcher.lock:
            return bool(self._file) and os.path.lexists(self._file)

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
