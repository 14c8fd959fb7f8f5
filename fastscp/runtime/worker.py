"""A worker process: runs the associations the supervisor hands it, one thread each.

The supervisor passes each accepted socket over a Unix SOCK_SEQPACKET pair
(``SCM_RIGHTS``) and is told when its association ends, so it can hold
``server.max_associations`` across all workers. Stored instances go to the
indexer process as :class:`~fastscp.index.records.InstanceRecord` messages; a
worker never opens DuckDB.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import signal
import socket
import threading
import time

from fastscp.forward.process import kept_folder as forward_kept_folder
from fastscp.index.client import IndexerClient
from fastscp.index.client import kept_folder as index_kept_folder
from fastscp.index.records import DuplicateConflict, InstanceRecord
from fastscp.net.association import Association, ServiceSettings
from fastscp.poststore.client import PostStoreClient, kept_folder
from fastscp.query.client import Locator
from fastscp.runtime.messages import (
    ENCODER,
    MESSAGE_MAX,
    TO_WORKER,
    AdmissionReply,
    AdmissionRequest,
    Handoff,
    Reconfigure,
    Stop,
)

log = logging.getLogger("fastscp.worker")


#: How often open associations are reported to the supervisor (status page).
REPORT_INTERVAL = 0.5
#: How long an association waits for the supervisor's admission answer.
ADMISSION_TIMEOUT = 10.0
#: At stop: how long the indexer and the post-store stage get to take a worker's last records by their
#: sockets before the rest goes to a file they take later (once caught up, or at their next start).
DELIVERY_WAIT = 5.0


class Worker:
    def __init__(self, index: int, control: socket.socket, settings: ServiceSettings, indexer: IndexerClient,
                 shutdown_timeout: float) -> None:
        self.index = index
        self.control = control
        self.settings = settings
        self.indexer = indexer
        self.shutdown_timeout = shutdown_timeout
        self._open: dict[int, Association] = {}
        self._threads: dict[int, threading.Thread] = {}
        self._admissions: dict[int, tuple[threading.Event, list[AdmissionReply]]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.poststore = PostStoreClient(
            settings.poststore_address, kept_folder(settings.storage.root), settings.storage.modes,
        ) if settings.poststore_address else None
        # Like the indexer's records: never waited for (the forwarder runs at server.derived_priority), kept
        # while it lags or is down, beyond a bound and at exit in files it takes (its reconcile finds what a
        # dead worker held).
        self.forward = IndexerClient(
            settings.forward_address, "forwarder", kept_folder=forward_kept_folder(settings.storage.root),
            modes=settings.storage.modes) if settings.forward_address else None

    def run(self) -> None:
        threading.Thread(target=self._report_loop, name="reporter", daemon=True).start()
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.control, MESSAGE_MAX, 4)
            except InterruptedError:
                continue
            except OSError:
                data, fds = b"", []
            if not data:
                # The supervisor is gone: finish what is open, then leave.
                for fd in fds:
                    os.close(fd)
                self._stop(now=False)
                return
            message = TO_WORKER.decode(data)
            if isinstance(message, Handoff) and fds:
                self._start(message, fds[0])
            elif isinstance(message, AdmissionReply):
                self._admitted(message)
            elif isinstance(message, Stop):
                self._stop(now=message.now)
                return
            elif isinstance(message, Reconfigure):
                # Open associations keep the settings they started with.
                self.settings = dataclasses.replace(self.settings, **pickle.loads(message.settings))
                self.shutdown_timeout = message.shutdown_timeout

    def _send(self, message: object) -> None:
        try:
            self.control.send(ENCODER.encode(message))
        except OSError:
            pass  # the supervisor is gone; run() notices the EOF

    def _admit(self, connection_id: int, calling_ae_title: str) -> tuple[bool, str]:
        """Ask the supervisor (which sees every worker) for a per-AE slot."""
        waiter: tuple[threading.Event, list[AdmissionReply]] = (threading.Event(), [])
        with self._lock:
            self._admissions[connection_id] = waiter
        self._send(AdmissionRequest(connection_id=connection_id, calling_ae_title=calling_ae_title))
        answered = waiter[0].wait(ADMISSION_TIMEOUT)
        with self._lock:
            self._admissions.pop(connection_id, None)
        if not answered:
            return False, "the supervisor did not answer"
        reply = waiter[1][0]
        return reply.admitted, reply.reason

    def _admitted(self, reply: AdmissionReply) -> None:
        with self._lock:
            waiter = self._admissions.get(reply.connection_id)
        if waiter is not None:
            waiter[1].append(reply)
            waiter[0].set()

    def _start(self, handoff: Handoff, fd: int) -> None:
        sock = socket.socket(fileno=fd)
        sock.setblocking(True)
        connection_id = handoff.connection_id
        association = Association(
            sock, handoff.peer_address, self.settings, self._stored,
            connection_id=connection_id, worker=self.index,
            admit=lambda calling_ae: self._admit(connection_id, calling_ae),
        )
        thread = threading.Thread(
            target=self._serve, args=(connection_id, association),
            name=f"association-{connection_id}", daemon=True,
        )
        with self._lock:
            self._open[connection_id] = association
            self._threads[connection_id] = thread
        thread.start()

    def _stored(self, record: InstanceRecord | DuplicateConflict) -> None:
        # The index first: it must not lose a record; thumbnails may wait.
        self.indexer.send(record)
        if self.poststore is not None and isinstance(record, InstanceRecord):
            self.poststore.send(record)
        if self.forward is not None and isinstance(record, InstanceRecord):
            self.forward.send(record)

    def _serve(self, connection_id: int, association: Association) -> None:
        stats = association.run()
        with self._lock:
            self._open.pop(connection_id, None)
            self._threads.pop(connection_id, None)
        report = stats.report(ended=True)
        self._send(report)
        if self.poststore is not None and not report.probe:
            self.poststore.send(report)  # its association-ended hooks (fastscp.hooks)

    def _report_loop(self) -> None:
        while not self._stopping.wait(REPORT_INTERVAL):
            with self._lock:
                associations = list(self._open.values())
            for association in associations:
                if association.stats.accepted:
                    self._send(association.stats.report())

    def _stop(self, now: bool) -> None:
        self._stopping.set()
        deadline = time.monotonic() + (0 if now else self.shutdown_timeout)
        while True:
            with self._lock:
                threads = list(self._threads.values())
            if not threads:
                break
            if time.monotonic() >= deadline:
                with self._lock:
                    associations = list(self._open.values())
                for association in associations:
                    association.shutdown()
                for thread in threads:
                    thread.join(timeout=5)
                break
            threads[0].join(timeout=0.1)
        # The last stores' records: by the sockets if the indexer and the stage take them in time,
        # else in files they take later.
        self.indexer.close(wait=DELIVERY_WAIT)
        if self.poststore is not None:
            self.poststore.close(wait=DELIVERY_WAIT)
        if self.forward is not None:
            self.forward.close(wait=DELIVERY_WAIT)


def worker_main(control: socket.socket, index: int, settings: ServiceSettings, indexer_address: str,
                shutdown_timeout: float) -> None:
    """Entry point of a forked worker process; ``control`` is its channel with the supervisor."""
    # Ctrl-C reaches the whole process group; only the supervisor decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if isinstance(settings.locate, Locator):
        settings.locate.map_in()
    indexer = IndexerClient(indexer_address, kept_folder=index_kept_folder(settings.storage.root),
                            modes=settings.storage.modes)
    Worker(index, control, settings, indexer, shutdown_timeout).run()
