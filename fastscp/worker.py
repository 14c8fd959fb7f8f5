"""A worker process: runs the associations the supervisor hands it, one thread each.

The supervisor passes each accepted socket over a Unix SOCK_SEQPACKET pair
(``SCM_RIGHTS``) and is told when its association ends, so it can hold
``server.max_associations`` across all workers. Stored instances go to the
indexer process as :class:`~fastscp.records.InstanceRecord` messages; a
worker never opens DuckDB.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time

from fastscp.acceptor import Association, ServiceSettings
from fastscp.indexclient import IndexerClient
from fastscp.records import DECODER, ENCODER, AssociationEnded, Handoff, Stop

log = logging.getLogger("fastscp.worker")


class Worker:
    def __init__(self, control: socket.socket, settings: ServiceSettings, indexer: IndexerClient,
                 shutdown_timeout: float) -> None:
        self.control = control
        self.settings = settings
        self.indexer = indexer
        self.shutdown_timeout = shutdown_timeout
        self._open: dict[int, Association] = {}
        self._threads: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()

    def run(self) -> None:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.control, 65536, 4)
            except InterruptedError:
                continue
            except OSError:
                data, fds = b"", []
            if not data:
                # The supervisor is gone: finish what is open, then leave.
                for fd in fds:
                    socket.close(fd)
                self._stop(now=False)
                return
            message = DECODER.decode(data)
            if isinstance(message, Handoff) and fds:
                self._start(message, fds[0])
            elif isinstance(message, Stop):
                self._stop(now=message.now)
                return

    def _start(self, handoff: Handoff, fd: int) -> None:
        sock = socket.socket(fileno=fd)
        sock.setblocking(True)
        association = Association(sock, handoff.peer_address, self.settings, self.indexer.send)
        thread = threading.Thread(
            target=self._serve, args=(handoff.connection_id, association),
            name=f"association-{handoff.connection_id}", daemon=True,
        )
        with self._lock:
            self._open[handoff.connection_id] = association
            self._threads[handoff.connection_id] = thread
        thread.start()

    def _serve(self, connection_id: int, association: Association) -> None:
        stats = association.run()
        with self._lock:
            self._open.pop(connection_id, None)
            self._threads.pop(connection_id, None)
        ended = AssociationEnded(connection_id=connection_id, instances=stats.instances, bytes=stats.bytes)
        try:
            self.control.send(ENCODER.encode(ended))
        except OSError:
            pass

    def _stop(self, now: bool) -> None:
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
        # Records of the last stores must reach the indexer before we exit.
        for _ in range(50):
            if not self.indexer.flush():
                break
            time.sleep(0.1)
        self.indexer.close()


def worker_main(control: socket.socket, settings: ServiceSettings, indexer_address: str,
                shutdown_timeout: float) -> None:
    """Entry point of a forked worker process."""
    # Ctrl-C reaches the whole process group; only the supervisor decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Worker(control, settings, IndexerClient(indexer_address), shutdown_timeout).run()
