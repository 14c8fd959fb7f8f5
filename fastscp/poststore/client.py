"""The workers' side of the post-store stage: its address, and handing it a record without waiting
(:mod:`fastscp.poststore.stage` is the other side)."""

from __future__ import annotations

import logging

import msgspec

from fastscp.index.records import ENCODER, InstanceRecord
from fastscp.process.batcher import MAX_MESSAGE_BYTES, fitting
from fastscp.process.ipc import local_address
from fastscp.process.kept import kept_folder as process_kept_folder
from fastscp.process.sender import Sender
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


class PostStoreClient(Sender[InstanceRecord | AssociationReport]):
    """The worker side: hand over a record, never wait (:class:`~fastscp.process.sender.Sender`).

    Records travel in messages of up to :data:`BATCH_RECORDS`, a record
    waiting at most :data:`SEND_INTERVAL` for company, as to the indexer:
    one message per record was a system call per store in the association's
    thread, and a wake-up of the stage. An association's final report goes
    at once, after the records before it (and after those kept in a file:
    its association-ended hooks run after its instance-stored hooks).

    The post-store process runs at ``server.derived_priority``: under a
    burst it may not read for seconds, and its socket fills. What does not
    go at once is kept here (up to :data:`BACKLOG_BYTES`, oldest first) and
    tried again every :data:`RETRY_INTERVAL`; beyond that bound, and when
    the worker exits, in a file in ``kept_folder``, which the stage takes
    once its queue has room. Only if that file cannot be written are records
    dropped, counted and logged: thumbnails and scan sheets can be made
    again from the files.
    """

    def __init__(self, address: str, kept_folder: str = "", modes: FileModes = PATIENT_DATA,
                 backlog_bytes: int = BACKLOG_BYTES) -> None:
        fit = min(MAX_MESSAGE_BYTES, backlog_bytes)
        super().__init__(
            address, lambda records: [(data, len(chunk)) for data, chunk in fitting(records, ENCODER.encode, fit)],
            name="post-store stage", log=log, interval=SEND_INTERVAL, max_items=BATCH_RECORDS,
            retry_interval=RETRY_INTERVAL, backlog_bytes=backlog_bytes, kept_folder=kept_folder, modes=modes,
            ordered=True, hold=False,
            if_dropped="no thumbnails, scan sheets or hooks for them (fastscp convert, fastscp scansheet)")

    def send(self, record: InstanceRecord | AssociationReport, urgent: bool = False) -> None:
        """A stored instance, or an association's final report (its association-ended hooks: urgent)."""
        if isinstance(record, InstanceRecord):
            # The post-store stage needs no attribute map (~2.5 KB for a CT).
            header = msgspec.structs.replace(record.header, attributes="{}")
            record = msgspec.structs.replace(record, header=header)
        super().send(record, urgent=urgent or isinstance(record, AssociationReport))
