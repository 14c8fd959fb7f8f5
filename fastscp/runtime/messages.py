"""Messages between the supervisor and its children (msgspec, MessagePack, one SOCK_SEQPACKET message each).

Every child has one socket pair with the supervisor (its *channel*,
:class:`fastscp.runtime.child.Child`); each direction of each kind of
channel has its own decoder, so a message can only be one its receiver
knows. The index records workers send the indexer are another socket's
(:mod:`fastscp.index.records`).
"""

from __future__ import annotations

import msgspec

from fastscp.status import AssociationReport, IndexerState

# -- any child -> supervisor: readiness ------------------------------------------------


class Ready(msgspec.Struct, frozen=True, tag="ready"):
    """A child that has something to open first (the index, a port) has it: it counts as running."""

    #: What it opened, for the log ("http://127.0.0.1:8080" for the monitor); "" if nothing to say.
    detail: str = ""


class StartFailed(msgspec.Struct, frozen=True, tag="start-failed"):
    """A child can't start; ``reason`` names the setting and what to do. It exits after sending this."""

    reason: str


# -- supervisor <-> worker -------------------------------------------------------------


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


class Reconfigure(msgspec.Struct, frozen=True, kw_only=True, tag="reconfigure"):
    """The supervisor reloaded the config (SIGHUP): settings for the associations a worker starts from now.

    ``settings`` holds the :class:`~fastscp.net.association.ServiceSettings` fields
    that changed, pickled (the access policy holds ``ipaddress`` networks);
    it only ever travels over the supervisor's socket pair with its own
    forked worker, never from a peer.
    """

    settings: bytes
    shutdown_timeout: float


#: The largest message a channel takes whole (either way).
MESSAGE_MAX = 65536
ENCODER = msgspec.msgpack.Encoder()
#: What a worker reads from the supervisor.
TO_WORKER = msgspec.msgpack.Decoder(Handoff | AdmissionReply | Stop | Reconfigure)
#: What the supervisor reads from a worker.
FROM_WORKER = msgspec.msgpack.Decoder(AssociationReport | AdmissionRequest)
#: What the supervisor reads from the indexer: readiness, then its state about once a second.
FROM_INDEXER = msgspec.msgpack.Decoder(Ready | StartFailed | IndexerState)
#: What the supervisor reads from a child that only reports readiness (the monitor).
READINESS = msgspec.msgpack.Decoder(Ready | StartFailed)
