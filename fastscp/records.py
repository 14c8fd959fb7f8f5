"""Messages between processes (msgspec, MessagePack on the wire)."""

from __future__ import annotations

import msgspec

from fastscp.header import HeaderFields
from fastscp.status import AssociationState, Histogram


class InstanceRecord(msgspec.Struct, frozen=True, kw_only=True, tag="instance"):
    """One stored instance, sent by a worker to the indexer after its rename."""

    path: str  # relative to the storage root
    size: int  # bytes of the whole Part 10 file
    transfer_syntax_uid: str
    calling_ae_title: str
    called_ae_title: str
    peer_address: str
    received_at: float  # seconds since the epoch
    header: HeaderFields
    #: SHA-256 (hex) of the data set bytes as received; "" if not computed.
    content_hash: str = ""


class DuplicateConflict(msgspec.Struct, frozen=True, kw_only=True, tag="conflict"):
    """An instance arrived again with different content (``storage.duplicates``)."""

    sop_instance_uid: str
    path: str  # the existing file, relative to the storage root
    existing_hash: str
    new_hash: str
    policy: str  # reject | keep-first | overwrite | keep-both
    #: What happened: "rejected", "kept-first", "overwritten", "kept-both".
    outcome: str
    #: Where the new copy went (keep-both, overwrite), else "".
    new_path: str
    calling_ae_title: str
    received_at: float


class ThumbnailMade(msgspec.Struct, frozen=True, kw_only=True, tag="thumbnail"):
    """The post-store stage made a thumbnail for a stored instance."""

    path: str  # the instance, relative to the storage root
    thumbnail_path: str  # relative to the storage root


#: What workers and the post-store stage tell the indexer.
IndexRecord = InstanceRecord | DuplicateConflict | ThumbnailMade


class RecordBatch(msgspec.Struct, frozen=True, tag="batch"):
    """Several index records in one message (one datagram, one wake-up of the indexer)."""

    records: list[IndexRecord]


class AssociationReport(msgspec.Struct, frozen=True, kw_only=True, tag="report"):
    """A worker's cumulative figures for one association (``ended`` when it has).

    Sent about twice a second while it is open, and once when it ends; the
    supervisor keeps the latest one and frees its slot on ``ended``.
    """

    state: AssociationState
    by_modality: dict[str, int]
    store_latency_seconds: Histogram
    object_size_bytes: Histogram
    ended: bool = False
    #: The connection closed before any PDU (a port probe): not counted.
    probe: bool = False


class AdmissionRequest(msgspec.Struct, frozen=True, kw_only=True, tag="admit?"):
    """A worker asks whether a calling AE may have one more association."""

    connection_id: int
    calling_ae_title: str


class AdmissionReply(msgspec.Struct, frozen=True, kw_only=True, tag="admit"):
    connection_id: int
    admitted: bool
    reason: str = ""


class Handoff(msgspec.Struct, frozen=True, kw_only=True, tag="handoff"):
    """The supervisor hands a worker an accepted connection (its fd rides along)."""

    connection_id: int
    peer_address: str


class Stop(msgspec.Struct, frozen=True, kw_only=True, tag="stop"):
    """The supervisor asks a worker to stop: ``now`` aborts open associations."""

    now: bool = False


Message = (
    InstanceRecord
    | DuplicateConflict
    | ThumbnailMade
    | RecordBatch
    | AssociationReport
    | AdmissionRequest
    | AdmissionReply
    | Handoff
    | Stop
)
ENCODER = msgspec.msgpack.Encoder()
DECODER = msgspec.msgpack.Decoder(Message)
#: The indexer's decoder: workers and the post-store stage send only batches.
BATCH_DECODER = msgspec.msgpack.Decoder(RecordBatch)
