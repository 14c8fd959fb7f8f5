"""The workers' side of the post-store stage: its address, and handing it a record without waiting.

A full queue drops the record (counted and logged): a thumbnail can always
be made again, an acknowledged store must never wait
(:mod:`fastscp.poststore.stage` is the other side).
"""

from __future__ import annotations

import logging
import socket

import msgspec

from fastscp.index.records import ENCODER, InstanceRecord
from fastscp.process.ipc import local_address
from fastscp.status import AssociationReport

log = logging.getLogger("fastscp.poststore")


def poststore_address(index_path: str) -> str:
    """The abstract socket the post-store process of an index listens on."""
    return local_address("poststore", index_path)


class PostStoreClient:
    """The worker side: hand over a record, never wait."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        self.dropped = 0

    def send(self, record: InstanceRecord | AssociationReport) -> None:
        """A stored instance, or an association's final report (its association-ended hooks)."""
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                sock.setblocking(False)
                sock.connect(self.address)
                self._sock = sock
            if isinstance(record, InstanceRecord):
                # The post-store stage needs no attribute map (~2.5 KB for a CT).
                header = msgspec.structs.replace(record.header, attributes="{}")
                record = msgspec.structs.replace(record, header=header)
            self._sock.send(ENCODER.encode(record))
        except OSError as exc:
            if self._sock is not None and not isinstance(exc, BlockingIOError):
                self._sock.close()
                self._sock = None
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.warning("post-store stage busy or down (%s): %d records without thumbnails", exc, self.dropped)
