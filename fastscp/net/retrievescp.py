"""C-MOVE and C-GET SCP (PS3.4 C.4.2, C.4.3): what both share.

Decode the request identifier, select the instances from the index
(:mod:`fastscp.query.retrieve`), run one C-STORE sub-operation per instance,
and produce the C-MOVE-RSP / C-GET-RSP statuses: a pending response with the
remaining, completed, failed and warning counts after each sub-operation,
C-CANCEL checked before each, and a final response (Success, Warning,
Failure or Cancel) whose identifier lists the Failed SOP Instance UIDs.

Where a sub-operation goes is the caller's: :mod:`fastscp.net.movescp` opens
an association to the move destination, :mod:`fastscp.net.getscp` stores on
the requester's own association. A file missing or unreadable fails its
sub-operation, never the whole request.

Files go out as stored, in their own transfer syntax. Only when the peer
accepted none for the SOP class is the data set converted (read by pydicom,
decompressed by its decoders) to an uncompressed transfer syntax it accepted.

In a shared index, the files of other nodes' rows are read or fetched first
(:mod:`fastscp.net.fetch`); this node's own files are sent as in one node.
"""

from __future__ import annotations

import logging
import ssl
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

from fastscp.net import dimse
from fastscp.net.findscp import CANCEL, decode_identifier, encode_identifier
from fastscp.query.cfind import PENDING, UNABLE_TO_PROCESS, FindError
from fastscp.query.retrieve import Instance, Selector

if TYPE_CHECKING:  # only types: the workers' fetching is passed in (RetrieveService.remote)
    from fastscp.net.fetch import FetchSettings, RemoteFiles

log = logging.getLogger("fastscp.retrieve")

# C-MOVE / C-GET statuses (PS3.4 C.4.2.1.5, C.4.3.1.4); Pending, 0xA900 and
# 0xC000 are C-FIND's (fastscp.query.cfind), Cancel fastscp.net.findscp's.
#: Sub-operations complete, one or more failures or warnings.
WARNING = 0xB000
#: Out of Resources - Unable to perform sub-operations (every one failed).
UNABLE_TO_PERFORM = 0xA702
MOVE_DESTINATION_UNKNOWN = 0xA801

#: What a peer may be sent when it accepts no context for a file's own transfer syntax, best first.
UNCOMPRESSED: tuple[str, ...] = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")


@dataclass(frozen=True)
class Destination:
    """A C-MOVE destination (retrieve.move_destinations)."""

    host: str
    port: int
    #: The client TLS context when the destination talks TLS, else None.
    tls: ssl.SSLContext | None = None


@dataclass(frozen=True)
class RetrieveService:
    """What the C-MOVE and C-GET services need (None in ServiceSettings: not offered)."""

    select: Selector
    #: Our AE title: the calling AE title of C-MOVE sub-associations.
    ae_title: str
    move_destinations: Mapping[str, Destination]
    #: A shared index: how the files of other nodes' rows are had (None: one node, its own files).
    remote: FetchSettings | None = None


@dataclass
class Counts:
    """The sub-operations of one request (PS3.7 9.3.4.2 Number of ... Sub-operations)."""

    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)

    def pending(self) -> tuple[int | None, int, int, int]:
        return self.remaining, self.completed, self.failed, self.warning

    def final(self) -> tuple[int | None, int, int, int]:
        return None, self.completed, self.failed, self.warning

    def add(self, uid: str, status: int) -> None:
        self.remaining -= 1
        if status == dimse.SUCCESS:
            self.completed += 1
        elif dimse.is_warning(status):
            self.warning += 1
        else:
            self.failed += 1
            self.failed_uids.append(uid)


class Response:
    """One C-MOVE-RSP / C-GET-RSP to send."""

    __slots__ = ("status", "suboperations", "identifier", "comment")

    def __init__(self, status: int, suboperations: tuple[int | None, int, int, int] | None = None,
                 identifier: bytes | None = None, comment: str = "") -> None:
        self.status = status
        self.suboperations = suboperations
        #: The encoded identifier (Failed SOP Instance UID List), or None.
        self.identifier = identifier
        self.comment = comment


#: ``store(instance) -> status`` of its C-STORE sub-operation (raises nothing:
#: a failure is a failure status).
Store = Callable[[Instance], int]


def select_instances(select: Selector, model: str, identifier: bytes, transfer_syntax: str,
                     relational: bool) -> list[Instance] | Response:
    """The instances a request names, or the final (failure) response to send instead."""
    try:
        request = decode_identifier(identifier, transfer_syntax)
    except Exception as exc:
        return Response(UNABLE_TO_PROCESS, comment=f"cannot decode the identifier: {exc}"[:64])
    try:
        return select(model, request, relational)
    except FindError as exc:
        return Response(exc.status, comment=exc.comment[:64])
    except Exception as exc:
        log.exception("C-MOVE/C-GET: selecting the instances failed")
        return Response(UNABLE_TO_PROCESS, comment=f"query failed: {exc}"[:64])


def suboperations(found: list[Instance], store: Store, cancelled: Callable[[], bool],
                  transfer_syntax: str, what: str = "C-MOVE/C-GET",
                  files: RemoteFiles | None = None) -> Iterator[Response]:
    """Run a C-STORE sub-operation per instance: a pending response after each, then the final one.

    ``what`` names the request in the log line of its outcome. ``files``
    gives the files of other nodes' instances (None: they fail); it is
    closed before the final response, so that the files fetched for the
    request are gone once the requester has its answer.
    """
    counts = Counts(remaining=len(found))
    started = time.monotonic()
    for instance in found:
        if cancelled():
            log.info("%s: cancelled after %d completed, %d failed, %d warning, %d remaining, %.3f s", what,
                     counts.completed, counts.failed, counts.warning, counts.remaining, time.monotonic() - started)
            if files is not None:
                files.close()
            yield Response(CANCEL, counts.pending(), _failed_list(counts, transfer_syntax))
            return
        if not instance.node:
            status = store(instance)
        else:
            local = files.local(instance) if files is not None else (
                f"its file is on node {instance.node!r}; a request of another node is served from this node's "
                "files only")
            status = store(local) if isinstance(local, Instance) else failed(what, instance, local)
            if files is not None:
                files.done(instance)
        counts.add(instance.sop_instance_uid, status)
        if counts.remaining:
            yield Response(PENDING, counts.pending())
    if counts.failed and not (counts.completed or counts.warning):
        status = UNABLE_TO_PERFORM
    elif counts.failed or counts.warning:
        status = WARNING
    else:
        status = dimse.SUCCESS
    log.info("%s: %d completed, %d failed, %d warning in %.3f s", what, counts.completed, counts.failed,
             counts.warning, time.monotonic() - started)
    if files is not None:
        files.close()
    yield Response(status, counts.final(), _failed_list(counts, transfer_syntax))


def all_failed(found: list[Instance], transfer_syntax: str, comment: str) -> Response:
    """The final response when no sub-operation could start (no association to the move destination)."""
    counts = Counts(remaining=0, failed=len(found), failed_uids=[i.sop_instance_uid for i in found])
    return Response(UNABLE_TO_PERFORM, counts.final(), _failed_list(counts, transfer_syntax), comment[:64])


def failed(service: str, instance: Instance, why: str) -> int:
    """Log a sub-operation that could not be done; its status (counted as failed)."""
    log.warning("%s sub-operation for %r failed: %s", service, instance.sop_instance_uid, why)
    return dimse.OUT_OF_RESOURCES


def _failed_list(counts: Counts, transfer_syntax: str) -> bytes | None:
    """The final response's identifier: Failed SOP Instance UID List (0008,0058), when any failed."""
    if not counts.failed_uids:
        return None
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = counts.failed_uids
    return encode_identifier(ds, transfer_syntax)


def choose_transfer_syntax(stored: str, accepted: set[str] | frozenset[str]) -> tuple[str, bool] | None:
    """The transfer syntax to send a file in, and whether it must be converted; None: none will do.

    Its own when the peer accepted it; else the first of :data:`UNCOMPRESSED` it accepted.
    """
    if stored in accepted:
        return stored, False
    for syntax in UNCOMPRESSED:
        if syntax in accepted:
            return syntax, True
    return None


def converted(path: str, transfer_syntax: str) -> Dataset:
    """The file's data set, decompressed by pydicom's decoders if need be, to be encoded in ``transfer_syntax``.

    Raises
    ------
    Exception
        Whatever pydicom or its decoder plugins raise (no common type).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small deviations of stored files don't stop a conversion
        ds = pydicom.dcmread(path)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress(generate_instance_uid=False)
    syntax = UID(transfer_syntax)
    ds.file_meta.TransferSyntaxUID = syntax
    # Encoders (pydicom's, pynetdicom's) go by the data set's own encoding: make it the target's.
    ds.set_original_encoding(syntax.is_implicit_VR, syntax.is_little_endian, ds.original_character_set)
    return ds
