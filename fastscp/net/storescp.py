"""C-STORE SCP (PS3.4 B.2, PS3.7 9.1.1): one :class:`StoreRequest` per C-STORE-RQ.

Its life: begin (the command's checks, the temp file made ahead taken),
receive (each data set fragment straight into the temp file, hashed as it
passes), complete (walk and scan the data set, the storage area's verdict,
the C-STORE-RSP), hand over (after the response: log, count, the record to
the index).

The storage area decides where the file goes, what a duplicate is and when
the disk is too full (:class:`fastscp.storage.area.Storage`); this module
maps its answers to DIMSE statuses.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec

from fastscp.dicom.header import HeaderError, HeaderFields, IncompleteHeader, parse_header
from fastscp.dicom.part10 import BLAKE3_PREFIX
from fastscp.dicom.walk import mapped_dataset, walk_dataset, walk_from_prefix
from fastscp.index.records import DuplicateConflict, InstanceRecord
from fastscp.net import dimse
from fastscp.net.negotiation import AcceptedContext
from fastscp.net.pdu import LimitExceeded
from fastscp.process import logs
from fastscp.storage.area import NO_SPACE, Committed, IncomingFile, TempFile
from fastscp.storage.policy import Outcome

if TYPE_CHECKING:
    from fastscp.net.association import Association

#: Hash the data set in the data path's loop as it arrives (else read back after the response).
#: PERF: BLAKE3 in the compiled loop (cext/blake3, no GIL), on bytes still in the cache, spares the
#: read-back: 529 against 618 us of the association thread's CPU per 512x512 CT (median of 6
#: interleaved runs of 300 stores each, tmpfs). Only the last fragment's hash comes before the
#: C-STORE-RSP; SHA-256 here (~310 us per 512 KB) was not worth it.
HASH_WHILE_RECEIVING = True

#: Characters of a content hash a log line shows: "blake3:" and 12 hex digits.
SHORT_HASH = len(BLAKE3_PREFIX) + 12

# The association's loggers: what a C-STORE logs is part of its association's story.
log = logging.getLogger("fastscp.association")
action_log = logs.Lines("fastscp.action")


class StoreRequest:
    """One C-STORE-RQ on ``association``, from its command set to the hand-over after its response.

    A request refused at its command (another SOP class than its context's,
    no valid Affected SOP Instance UID, the disk below its watermark, no temp
    file) drains its data set and answers the refusal.
    """

    __slots__ = ("_association", "_committed", "_context", "_header", "_incoming", "_limit", "_received", "_refusal",
                 "_request", "_stats", "started")

    def __init__(self, association: Association, request: dict[str, int | str], context: AcceptedContext,
                 take_spare: Callable[[], TempFile | None]) -> None:
        self._association = association
        self._request = request
        self._context = context
        self._stats = association.stats
        self._limit = association.settings.max_object_size
        #: Bytes of the data set received (stored or drained).
        self._received = 0
        self._incoming: IncomingFile | None = None
        #: (status, comment) when the data set is drained, not stored.
        self._refusal: tuple[int, str] | None = None
        self._committed: Committed | None = None
        self._header: HeaderFields | None = None
        #: When the command arrived: the C-STORE-RSP's latency counts from here.
        self.started = time.monotonic()
        self._begin(take_spare)

    # -- begin ----------------------------------------------------------------------------

    def _begin(self, take_spare: Callable[[], TempFile | None]) -> None:
        request, storage = self._request, self._association.settings.storage
        sop_class = str(request.get("AffectedSOPClassUID", ""))
        if sop_class != self._context.abstract_syntax:
            self._refuse(dimse.SOP_CLASS_NOT_SUPPORTED, "Affected SOP Class UID differs from the presentation context")
            return
        sop_instance = request.get("AffectedSOPInstanceUID")
        if not isinstance(sop_instance, str) or not dimse.is_uid(sop_instance):
            # It names the file and goes into its File Meta: mandatory in a
            # C-STORE-RQ (PS3.7 9.3.1.1), digits and dots, at most 64.
            why = "Affected SOP Instance UID missing" if sop_instance is None else "Affected SOP Instance UID invalid"
            self._refuse(dimse.INVALID_OBJECT_INSTANCE, why)
            return
        full = storage.out_of_space()
        if full:
            self._refuse(dimse.OUT_OF_RESOURCES, full)
            return
        try:
            self._incoming = storage.begin(sop_class, sop_instance, self._context.transfer_syntax,
                                           self._stats.calling_ae_title, take_spare())
        except OSError as exc:
            self._refuse(dimse.OUT_OF_RESOURCES, f"cannot create temp file: {exc.strerror}")

    def _refuse(self, status: int, comment: str) -> None:
        """Drain the coming data set and answer ``status``; logged (warning and action line) now."""
        self._refusal = (status, comment)
        sop_instance = str(self._request.get("AffectedSOPInstanceUID", ""))
        calling = self._stats.calling_ae_title
        log.warning("C-STORE %r from %r refused with 0x%04X: %s", sop_instance, calling, status, comment)
        if self._association.settings.action_log:
            action_log.info("refused %r (0x%04X %s) from %r", sop_instance, status, comment, calling)

    # -- receive ------------------------------------------------------------------------

    def receive(self, fragment: memoryview) -> None:
        """One fragment of the data set (a PDV's value, a view into the receive buffer)."""
        self._received += len(fragment)
        if self._received > self._limit:
            raise LimitExceeded(f"data set larger than limits.max_object_size ({self._limit})")
        if self._incoming is not None:
            self._incoming.write(fragment)
        self._stats.bytes += len(fragment)

    def direct(self) -> tuple[int, int, bytearray, int, bool, bytes] | None:
        """Where the data path (fastscp.net.datapath) writes this data set itself, for
        ``DataPath.to_file``: the temp file's descriptor, limits.max_object_size, the
        header prefix and its room, whether to hash it on the way, the File Meta to write
        first. None: a refusal, or a temp file that failed already, drained through
        :meth:`receive` and answered with the failure."""
        if self._incoming is None or self._incoming.error is not None:
            return None
        fd, prefix, room, head = self._incoming.target()
        return fd, self._limit - self._received, prefix, room, HASH_WHILE_RECEIVING, head

    def streamed(self, length: int, content_hash: str | None = None) -> None:
        """The data path has written ``length`` bytes of the data set to the temp file; with
        ``content_hash`` (the loop's hash of them), all of it."""
        assert self._incoming is not None
        self._stats.bytes += length - self._received
        self._received = length
        if content_hash is not None:
            self._incoming.streamed(length, content_hash)

    def write_failed(self, errno: int) -> None:
        """The data path could not write to the temp file: the rest is drained, the answer a failure."""
        assert self._incoming is not None
        self._incoming.failed(OSError(errno, os.strerror(errno)))

    # -- complete -----------------------------------------------------------------------

    def complete(self) -> None:
        """The data set's last fragment arrived: answer, then hand over."""
        if self._refusal is not None:
            self._stats.failures += 1
            self._answer(*self._refusal)
            return
        status, comment = self._finish()
        try:
            self._answer(status, comment)
        finally:
            self._hand_over()

    def abandon(self) -> None:
        """The association ended before the data set did: no temp file stays."""
        if self._incoming is not None:
            self._incoming.discard()

    def _answer(self, status: int, comment: str) -> None:
        self._association.respond(self._request, self._context.context_id, dimse.C_STORE_RSP, status, comment)
        self._stats.latency.observe(time.monotonic() - self.started)

    def _finish(self) -> tuple[int, str]:
        """Verify the data set and put it in place: the C-STORE-RSP's status and comment."""
        incoming, stats = self._incoming, self._stats
        assert incoming is not None
        if incoming.error is not None:
            stats.failures += 1
            if incoming.error.errno in NO_SPACE:
                return dimse.OUT_OF_RESOURCES, "storage full"
            return dimse.OUT_OF_RESOURCES, f"write failed: {incoming.error.strerror}"
        settings, context = self._association.settings, self._context
        sop_instance = str(self._request.get("AffectedSOPInstanceUID", ""))
        try:
            header = self._walk_and_scan(incoming, context.transfer_syntax)
        except HeaderError as exc:
            where = incoming.quarantine(f"{sop_instance}: {exc}")
            log.warning(
                "C-STORE %s from %s: cannot understand the data set (%s)%s",
                sop_instance, stats.calling_ae_title, exc, f"; kept in {where}" if where else "",
            )
            stats.failures += 1
            return dimse.CANNOT_UNDERSTAND, str(exc)[:64]
        sop_class = context.abstract_syntax
        if header.sop_class_uid and header.sop_class_uid != sop_class:
            incoming.discard()
            stats.failures += 1
            log.warning(
                "C-STORE %s from %s: the data set's SOP Class UID %s does not match its context's %s",
                sop_instance, stats.calling_ae_title, header.sop_class_uid, sop_class,
            )
            return dimse.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, f"SOP Class UID in data set is {header.sop_class_uid}"[:64]
        try:
            committed = settings.storage.store(incoming, header, sop_class, sop_instance, settings.locate)
        except OSError as exc:
            stats.failures += 1
            log.error("C-STORE %s: cannot store: %s", sop_instance, exc)
            return dimse.OUT_OF_RESOURCES, f"cannot store: {exc.strerror}"[:64]
        # What the sender waits for ends here; the rest runs after the
        # C-STORE-RSP has gone (_hand_over). The index records the data set's
        # own SOP Instance UID, else the command's.
        self._committed = committed
        self._header = header
        if not header.sop_instance_uid:
            self._header = msgspec.structs.replace(header, sop_instance_uid=sop_instance)
        if committed.outcome is Outcome.REJECTED:
            return dimse.DUPLICATE_SOP_INSTANCE, "other content stored under this SOP Instance UID"
        return dimse.SUCCESS, ""

    def _walk_and_scan(self, incoming: IncomingFile, transfer_syntax: str) -> HeaderFields:
        """Walk the data set to its end (nothing is acknowledged before), then scan its header.

        PERF: most objects need only the data set's first 64 KiB, in memory:
        small ones whole, images up to Pixel Data that runs to the end
        (walk_from_prefix; the mmap it spares costs ~15 us for a 512x512 CT).
        The rest are read through a read-only mmap of the temp file, whose
        pages of skipped values are never read.
        """
        prefix, length = incoming.prefix, incoming.dataset_length
        max_inflated = self._limit
        if length <= len(prefix):
            walk_dataset(prefix, transfer_syntax, max_inflated)
            return parse_header(prefix, transfer_syntax)
        walked = walk_from_prefix(prefix, transfer_syntax, length)
        if walked:
            try:
                return parse_header(prefix, transfer_syntax, complete=False)
            except IncompleteHeader:
                pass  # a header longer than the prefix: large SR, enhanced multi-frame
        with mapped_dataset(incoming.fileno(), incoming.meta_length, length) as mapped:
            if not walked:
                walk_dataset(mapped, transfer_syntax, max_inflated)
            try:
                return parse_header(prefix, transfer_syntax, complete=False)
            except IncompleteHeader:
                return parse_header(mapped, transfer_syntax)

    # -- hand over ----------------------------------------------------------------------

    def _hand_over(self) -> None:
        """After the C-STORE-RSP: log, count, and pass the record on (with its content hash).

        PERF: at one association the sender waits for each response, so
        nothing that can wait for it runs before it (bench.load ct-k1).
        The index stays complete without ordering: reconcile-on-start
        indexes any file whose record never arrived.
        """
        committed, header, incoming = self._committed, self._header, self._incoming
        if committed is None or header is None or incoming is None:
            return
        association, stats = self._association, self._stats
        try:
            settings = association.settings
            storage = settings.storage
            path = storage.relative(committed.path)
            now = time.time()
            if committed.collided_path:
                log.warning(
                    "C-STORE %r from %r: %s holds another instance (SOP Instance UID %r); stored as %s",
                    header.sop_instance_uid, stats.calling_ae_title,
                    storage.relative(committed.collided_path), committed.collided_uid, path,
                )
            if committed.existing_hash:
                self._conflict(committed, header.sop_instance_uid, incoming.content_hash, path, now)
            size = incoming.size
            if settings.action_log:
                action_log.info("%s %s (%d bytes) from %s", committed.outcome, path, size, stats.calling_ae_title)
            if committed.outcome is Outcome.REJECTED:
                stats.failures += 1
                return
            stats.instances += 1
            stats.by_modality[header.modality or "?"] += 1
            stats.sizes.observe(size)
            if committed.outcome.acknowledged_duplicate:
                # Acknowledged: the sender's data is (or stays) as first stored.
                stats.duplicates += 1
                return
            affected = str(self._request.get("AffectedSOPInstanceUID", ""))
            association.on_stored(
                InstanceRecord(
                    path=path,
                    size=size,
                    transfer_syntax_uid=self._context.transfer_syntax,
                    calling_ae_title=stats.calling_ae_title,
                    called_ae_title=stats.called_ae_title,
                    peer_address=stats.peer_address,
                    received_at=now,
                    header=header,
                    content_hash=incoming.content_hash,
                    affected_sop_instance_uid=affected if affected != header.sop_instance_uid else "",
                )
            )
        finally:
            incoming.close(association.pages)

    def _conflict(self, committed: Committed, sop_instance: str, new_hash: str, path: str, now: float) -> None:
        """Log and record an instance that arrived again with other content."""
        association = self._association
        storage = association.settings.storage
        log.warning(
            "C-STORE %s from %s: %s differs from the stored copy (content hash %s, new %s); storage.duplicates=%s: %s",
            sop_instance, self._stats.calling_ae_title, path, committed.existing_hash[:SHORT_HASH],
            new_hash[:SHORT_HASH], storage.duplicates, committed.outcome,
        )
        association.on_stored(
            DuplicateConflict(
                sop_instance_uid=sop_instance,
                path=storage.relative(committed.existing_path),
                existing_hash=committed.existing_hash, new_hash=new_hash,
                policy=str(storage.duplicates), outcome=str(committed.outcome),
                new_path=path if committed.outcome in (Outcome.KEPT_BOTH, Outcome.OVERWRITTEN) else "",
                calling_ae_title=self._stats.calling_ae_title, received_at=now,
            )
        )
