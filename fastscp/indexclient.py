"""The worker side of the indexer: delivers InstanceRecords, keeps them while it is down."""

from __future__ import annotations

import logging
import socket
import threading

from fastscp.records import ENCODER, InstanceRecord

log = logging.getLogger("fastscp.indexclient")


class IndexerClient:
    """Sends records to the indexer; keeps them while it is unreachable."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        self._pending: list[bytes] = []
        self._lock = threading.Lock()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(self.address)
        return sock

    def send(self, record: InstanceRecord) -> None:
        message = ENCODER.encode(record)
        with self._lock:
            self._pending.append(message)
            self._flush_locked()

    def flush(self) -> int:
        """Try to deliver what is pending; returns how many remain."""
        with self._lock:
            self._flush_locked()
            return len(self._pending)

    def _flush_locked(self) -> None:
        try:
            if self._sock is None:
                self._sock = self._connect()
            while self._pending:
                self._sock.send(self._pending[0])
                self._pending.pop(0)
        except OSError as exc:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            log.warning("indexer unreachable (%s); %d records kept for retry", exc, len(self._pending))

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
