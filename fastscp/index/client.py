"""Sending records to the indexer from other processes (workers, the post-store stage).

:class:`IndexerClient` delivers records in batches and keeps them while the
indexer is down (a restart after a crash) or, for a worker, lagging at its
low priority, retrying in the background.
Queries go through :mod:`fastscp.query.client`.
"""

from __future__ import annotations

import logging

import msgspec

from fastscp.index.records import ENCODER, Base, IndexRecord, InstanceRecord, RecordBatch
from fastscp.process.batcher import MAX_MESSAGE_BYTES, fitting
from fastscp.process.ipc import local_address
from fastscp.process.kept import kept_folder as process_kept_folder
from fastscp.process.sender import Sender
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


class IndexerClient(Sender[IndexRecord]):
    """Sends records to the indexer (or the forwarder: ``name``) in batches; keeps them while it is
    unreachable (:class:`~fastscp.process.sender.Sender`).

    A record waits at most :data:`SEND_INTERVAL` for others to travel with
    (:data:`BATCH_RECORDS` at most): one message per record made the
    indexer's receive loop its bottleneck (bench/test_bench_index.py). While
    the indexer is down the records are kept and tried again every
    :data:`RETRY_INTERVAL`, so they reach a restarted indexer even if no
    other image arrives; none is dropped for want of room (only a message
    longer than the socket takes, where no file can take it: logged).
    Nothing waiting here is lost for good if the process dies: the indexer's
    reconcile on start indexes the files whose records never arrived.

    With ``kept_folder`` (a worker's client) a send never waits: the indexer
    runs at ``server.derived_priority`` and under a burst may not read for
    seconds. What its full socket does not take is kept here, up to
    ``backlog_bytes``, then in files in ``kept_folder``, which the indexer
    takes once it has caught up (a newer record of the same file, come by
    the socket meanwhile, stays); so is what is still kept at :meth:`close`.
    Without it (the post-store stage's client of the indexer) a full
    socket holds the sender up, one send at most ``SEND_TIMEOUT`` at a
    time (:mod:`fastscp.process.sender`): it keeps what did not go.
    """

    def __init__(self, address: str, name: str = "indexer", *, kept_folder: str = "",
                 modes: FileModes = PATIENT_DATA, backlog_bytes: int = BACKLOG_BYTES) -> None:
        #: The base attribute map of each recent series (batch_messages).
        bases: dict[str, Base] = {}
        super().__init__(
            address, lambda records: batch_messages(records, bases), name=name, log=log, interval=SEND_INTERVAL,
            max_items=BATCH_RECORDS, retry_interval=RETRY_INTERVAL, backlog_bytes=backlog_bytes,
            kept_folder=kept_folder, modes=modes, wait=not kept_folder, hold=True,
            if_dropped=f"the {name}'s reconcile at its next start finds their files")
