"""Run one association as the acceptor: upper-layer PDUs and DIMSE services.

pynetdicom negotiates the association (see :mod:`fastscp.net.negotiation`); the
data transfer phase is handled here, on one blocking socket per thread,
because it is the hot path: each P-DATA-TF PDU is read with one
``recv_into`` into a reusable buffer and its data set fragments go straight
to the temp file with no copy into Python objects. Stock pynetdicom reads
4 KiB at a time and polls with 1 ms sleeps (~90 images/s on 512x512 CT here).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import ssl
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
from pydicom.uid import UID

from fastscp.dicom.header import HeaderError, HeaderFields, IncompleteHeader, parse_header
from fastscp.dicom.sopclasses import FIND_SOP_CLASSES, MODALITY_SOP_CLASSES
from fastscp.dicom.walk import mapped_dataset, walk_dataset, walk_from_prefix
from fastscp.index.records import DuplicateConflict, InstanceRecord
from fastscp.net import dimse, findscp
from fastscp.net.access import peer_ip
from fastscp.net.findscp import MAX_IDENTIFIER_BYTES, Finder
from fastscp.net.negotiation import (
    REJECTED_TRANSIENT,
    SOURCE_PROVIDER_PRESENTATION,
    AcceptancePolicy,
    Negotiation,
    encode_associate_rj,
    negotiate,
)
from fastscp.status import LATENCY_BUCKETS, SIZE_BUCKETS, AssociationReport, AssociationState, Histogram
from fastscp.storage.area import NO_SPACE, Committed, IncomingFile, Storage, TempFile
from fastscp.storage.layout import LayoutOptions, relative_path

log = logging.getLogger("fastscp.association")
action_log = logging.getLogger("fastscp.action")

# PDU types (PS3.8 9.3.1).
A_ASSOCIATE_RQ = 0x01
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

_PDU_HEADER = struct.Struct(">BxI")
_PDV_HEADER = struct.Struct(">IBB")
#: Largest A-ASSOCIATE-RQ we read: far above any real one, bounds memory.
MAX_ASSOCIATE_RQ = 1024 * 1024
#: Read limit when our Maximum Length Received is 0 ("no limit").
UNLIMITED_PDU_CAP = 64 * 1024 * 1024

#: Structured reports go to storage.sr_directory when it is set.
SR_SOP_CLASSES: frozenset[str] = frozenset(MODALITY_SOP_CLASSES["SR"])

RELEASE_RP = _PDU_HEADER.pack(A_RELEASE_RP, 4) + b"\x00" * 4


def abort_pdu(source: int = 2, reason: int = 0) -> bytes:
    """An A-ABORT PDU; source 2 is the service provider (PS3.8 9.3.8)."""
    return _PDU_HEADER.pack(A_ABORT, 4) + bytes((0, 0, source, reason))


class PeerClosed(Exception):
    """The peer closed the connection (or aborted)."""


class ProtocolError(Exception):
    """The peer broke the upper layer protocol; we abort the association."""


class DeadlineExceeded(TimeoutError):
    """The peer took too long for a whole request or message (not one read)."""


class LimitExceeded(Exception):
    """The peer went past a configured limit (limits.*); we abort the association."""


class PDUStream:
    """Reads whole PDUs from a socket into one reusable buffer.

    Besides the socket's per-read timeout, reads can run against a deadline
    (:meth:`deadline`): a whole A-ASSOCIATE-RQ, or a message that must keep
    up a minimum rate, so a peer dripping one byte at a time cannot stretch
    a request for ever.
    """

    def __init__(self, sock: socket.socket, max_pdu: int) -> None:
        self.sock = sock
        self.limit = max_pdu or UNLIMITED_PDU_CAP
        # Room for two PDUs so one recv_into can take a whole PDU and the
        # start of the next one.
        self._buf = bytearray(max(2 * (min(self.limit, 4 * 1024 * 1024) + 6), 65536))
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self.bytes_read = 0
        # The deadline clock (see deadline()); off until armed.
        self._clock = False
        self._t0 = 0.0
        self._b0 = 0
        self._grace = 0.0
        self._rate = 0.0
        self._why = ""
        #: The per-read timeout the socket had, restored after a deadline narrowed it.
        self._idle_timeout = sock.gettimeout() if hasattr(sock, "gettimeout") else None
        self._narrowed = False
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            self._quickack = True
        except (OSError, AttributeError):
            self._quickack = False

    def set_timeout(self, seconds: float | None) -> None:
        """The per-read (idle) timeout."""
        self._idle_timeout = seconds
        self._narrowed = False
        self.sock.settimeout(seconds)

    def deadline(self, seconds: float, min_rate: float = 0.0, why: str = "") -> None:
        """From now, reads must be done within ``seconds`` plus one second per
        ``min_rate`` bytes received from now on (``min_rate`` 0: a fixed deadline)."""
        self._clock = True
        self._t0 = time.monotonic()
        self._b0 = self.bytes_read
        self._grace = seconds
        self._rate = float(min_rate)
        self._why = why

    def no_deadline(self) -> None:
        self._clock = False
        if self._narrowed:
            self.set_timeout(self._idle_timeout)

    def _arm(self) -> None:
        allowed = self._grace + ((self.bytes_read - self._b0) / self._rate if self._rate else 0.0)
        remaining = self._t0 + allowed - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(self._why or "deadline passed")
        idle = self._idle_timeout
        if idle is None or remaining < idle:
            self.sock.settimeout(remaining)
            self._narrowed = True
        elif self._narrowed:
            self.sock.settimeout(idle)
            self._narrowed = False

    def _fill(self, needed: int) -> None:
        if len(self._buf) < needed:
            # A new, larger buffer: the old one may still be exported (the
            # memoryview of the PDU the caller holds), so it can't be resized.
            tail = self._end - self._start
            buf = bytearray(needed + 65536)
            buf[:tail] = self._view[self._start : self._end]
            self._buf, self._view = buf, memoryview(buf)
            self._start, self._end = 0, tail
        elif self._start + needed > len(self._buf):
            # Compact: move the unread tail to the front.
            tail = self._end - self._start
            self._buf[:tail] = self._view[self._start : self._end]
            self._start, self._end = 0, tail
        while self._end - self._start < needed:
            if self._clock:
                self._arm()
            try:
                n = self.sock.recv_into(self._view[self._end :])
            except TimeoutError:
                if self._narrowed:
                    raise DeadlineExceeded(self._why or "deadline passed") from None
                raise
            if n == 0:
                raise PeerClosed("connection closed by peer")
            self._end += n
            self.bytes_read += n
            if self._quickack:
                # Linux leaves quick-ACK mode after a few segments; re-arm it
                # so a sender with Nagle on (dcmtk's default) never waits
                # ~40 ms for our delayed ACK.
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned by :meth:`read`."""
        return self._end - self._start

    def read(self, limit: int | None = None) -> tuple[int, memoryview]:
        """The next PDU's type and body (valid until the next call)."""
        self._fill(6)
        pdu_type, length = _PDU_HEADER.unpack_from(self._buf, self._start)
        cap = limit if limit is not None else self.limit
        if length > cap:
            raise ProtocolError(f"PDU of {length} bytes exceeds the maximum {cap}")
        self._fill(6 + length)
        start = self._start + 6
        self._start = start + length
        return pdu_type, self._view[start : self._start]


@dataclass
class AssociationStats:
    connection_id: int = 0
    worker: int = 0
    calling_ae_title: str = ""
    called_ae_title: str = ""
    peer_address: str = ""
    accepted: bool = False
    outcome: str = ""
    instances: int = 0
    failures: int = 0
    #: Resends of stored instances (acknowledged, not rewritten).
    duplicates: int = 0
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    started_epoch: float = field(default_factory=time.time)
    #: The connection closed before sending anything (a port probe).
    probe: bool = False
    #: Presentation contexts accepted at negotiation.
    contexts: int = 0
    by_modality: Counter[str] = field(default_factory=Counter)
    latency: Histogram = field(default_factory=lambda: Histogram.empty(LATENCY_BUCKETS))
    sizes: Histogram = field(default_factory=lambda: Histogram.empty(SIZE_BUCKETS))

    def report(self, ended: bool = False) -> AssociationReport:
        """The cumulative figures, for the supervisor (and the status page)."""
        elapsed = max(time.monotonic() - self.started, 1e-6)
        state = AssociationState(
            connection_id=self.connection_id, worker=self.worker, calling_ae_title=self.calling_ae_title,
            called_ae_title=self.called_ae_title, peer_address=self.peer_address, started=self.started_epoch,
            instances=self.instances, failures=self.failures, duplicates=self.duplicates, bytes=self.bytes,
            rate=self.instances / elapsed, ended=time.time() if ended else 0.0,
            outcome=self.outcome if self.accepted or not ended else f"rejected ({self.outcome})",
        )
        return AssociationReport(
            state=state, by_modality=dict(self.by_modality), store_latency_seconds=self.latency,
            object_size_bytes=self.sizes, ended=ended, probe=self.probe,
        )

    def log_line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        who = f"{self.calling_ae_title or '?'} ({self.peer_address}) -> {self.called_ae_title or '?'}"
        if not self.accepted:
            return f"association {who}: rejected ({self.outcome}) after {elapsed:.3f} s"
        mb = self.bytes / 1e6
        # A-ASSOCIATE-AC with every context refused: nothing can be exchanged.
        accepted = "accepted" if self.contexts else "accepted with every presentation context refused"
        return (
            f"association {who}: {accepted}, {self.outcome}; {self.instances} instances"
            f" ({self.failures} failed, {self.duplicates} duplicates), {mb:.2f} MB in {elapsed:.3f} s"
            f" ({self.instances / elapsed:.1f} img/s, {mb / elapsed:.2f} MB/s)"
        )


def _sop_class_name(uid: str) -> str:
    """A SOP class UID with its name, for logs (the UID is the peer's: shown escaped)."""
    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else repr(uid)


def _always_admit(_calling_ae_title: str) -> tuple[bool, str]:
    return True, ""


@dataclass(frozen=True)
class ServiceSettings:
    policy: AcceptancePolicy
    storage: Storage
    layout: LayoutOptions
    duplicates: str
    acse_timeout: float
    dimse_timeout: float
    #: limits.max_object_size: a larger data set (or one inflating past it) aborts.
    max_object_size: int
    #: limits.max_command_set: a longer command set aborts.
    max_command_set: int
    #: limits.min_data_rate: bytes/s a message must average after dimse_timeout (0: off).
    min_data_rate: int
    #: Below this many free bytes under the storage root, stores get 0xA700.
    min_free_bytes: int = 0
    tls: ssl.SSLContext | None = None
    #: One "fastscp.action" log line per stored object.
    action_log: bool = True
    #: The C-FIND query (None: the Query/Retrieve FIND models are not offered).
    find: Finder | None = None
    #: The post-store process's address ("": no thumbnails or scan sheets).
    poststore_address: str = ""
    #: The forwarder process's address ("": forwarding is off).
    forward_address: str = ""
    #: Where the index has any of these SOP Instance UIDs stored (paths as
    #: the index records them); None: no index to ask.
    locate: Callable[[tuple[str, ...]], tuple[str, ...]] | None = None


@dataclass(frozen=True)
class _Stored:
    """A data set in place, with what the index and the logs need of it."""

    incoming: IncomingFile
    committed: Committed
    header: HeaderFields
    transfer_syntax: str
    #: The command's Affected SOP Instance UID (the file is named by it).
    affected: str


class Association:
    """One association on an accepted socket, from A-ASSOCIATE-RQ to release."""

    def __init__(
        self,
        sock: socket.socket,
        peer_address: str,
        settings: ServiceSettings,
        on_stored: Callable[[InstanceRecord | DuplicateConflict], None],
        *,
        connection_id: int = 0,
        worker: int = 0,
        admit: Callable[[str], tuple[bool, str]] = _always_admit,
    ) -> None:
        self.sock = sock
        self.settings = settings
        self.on_stored = on_stored
        self.admit = admit
        self.stats = AssociationStats(connection_id=connection_id, worker=worker, peer_address=peer_address)
        self.negotiation: Negotiation | None = None
        self.stream: PDUStream | None = None
        self._store_started = 0.0
        self._command = bytearray()
        self._request: dict[str, int | str] | None = None
        self._context_id = 0
        self._incoming: IncomingFile | None = None
        #: A committed store waiting for its C-STORE-RSP to go out.
        self._stored: _Stored | None = None
        #: The temp file the next C-STORE data set goes into, made in advance.
        self._spare: TempFile | None = None
        #: Set when the current data set is being drained, not stored.
        self._reject_status: tuple[int, str] | None = None
        self._peer_max_pdu = 0
        self._closing = False
        #: The C-FIND request identifier being received, else None.
        self._identifier: bytearray | None = None
        #: Bytes of the data set being received (stored or drained).
        self._dataset_bytes = 0

    # -- life cycle ---------------------------------------------------------

    def run(self) -> AssociationStats:
        """Serve until release, abort or error; never raises."""
        try:
            started = time.monotonic()
            self.sock.settimeout(self.settings.acse_timeout)
            if self.settings.tls is not None:
                # CPython runs the whole handshake against one deadline of the
                # socket's timeout; what it took comes off the request's time.
                self.sock = self.settings.tls.wrap_socket(self.sock, server_side=True)
            self.stream = PDUStream(self.sock, self.settings.policy.max_pdu_size)
            # acse_timeout bounds the whole A-ASSOCIATE-RQ (and TLS handshake), not each read.
            self.stream.deadline(
                self.settings.acse_timeout - (time.monotonic() - started),
                why="A-ASSOCIATE-RQ not complete within server.acse_timeout",
            )
            if self._associate():
                self.stream.no_deadline()
                self.stream.set_timeout(self.settings.dimse_timeout)
                self._data_transfer()
        except PeerClosed as exc:
            self.stats.outcome = self.stats.outcome or str(exc)
        except DeadlineExceeded as exc:
            self.stats.outcome = f"timed out, aborted: {exc}"
            self._send_quietly(abort_pdu())
        except TimeoutError:
            self.stats.outcome = "timed out, aborted"
            self._send_quietly(abort_pdu())
        except LimitExceeded as exc:
            self.stats.outcome = f"limit exceeded, aborted: {exc}"
            self._send_quietly(abort_pdu())
        except ProtocolError as exc:
            self.stats.outcome = f"protocol error, aborted: {exc}"
            self._send_quietly(abort_pdu(reason=2))
        except ssl.SSLError as exc:
            self.stats.outcome = f"TLS handshake failed: {exc.reason or exc}"
        except OSError as exc:
            self.stats.outcome = f"network error: {exc}"
        except Exception as exc:  # a bug must not take the worker down
            log.exception("association %s failed", self.stats.peer_address)
            self.stats.outcome = f"internal error, aborted: {exc!r}"
            self._send_quietly(abort_pdu())
        finally:
            if self._incoming is not None:
                self._incoming.discard()
                self._incoming = None
            if self._spare is not None:
                self._spare.discard()
                self._spare = None
            self._close()
        if self.stream is not None and self.stream.bytes_read == 0 and not self.stats.accepted:
            # A port probe or load-balancer health check: not an association.
            self.stats.probe = True
            log.debug("connection from %s closed before any PDU", self.stats.peer_address)
        else:
            log.info(self.stats.log_line())
        return self.stats

    def shutdown(self) -> None:
        """Stop at once (a second SIGTERM): the thread's blocking read fails."""
        self._closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _send_quietly(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            pass

    # -- A-ASSOCIATE ----------------------------------------------------------

    def _associate(self) -> bool:
        assert self.stream is not None
        pdu_type, body = self.stream.read(limit=MAX_ASSOCIATE_RQ)
        if pdu_type != A_ASSOCIATE_RQ:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}")
        try:
            result = negotiate(
                bytes((pdu_type, 0)) + len(body).to_bytes(4, "big") + body,
                self.settings.policy,
                peer_ip(self.stats.peer_address),
            )
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
        self.negotiation = result
        self.stats.calling_ae_title = result.calling_ae_title
        self.stats.called_ae_title = result.called_ae_title
        if result.accepted:
            admitted, why = self.admit(result.calling_ae_title)
            if not admitted:
                result.accepted = False
                result.reject_reason = f"local limit exceeded: {why}"
                result.response = encode_associate_rj(REJECTED_TRANSIENT, SOURCE_PROVIDER_PRESENTATION, 2)
        self.sock.sendall(result.response)
        if not result.accepted:
            self.stats.outcome = result.reject_reason
            return False
        self.stats.accepted = True
        self.stats.contexts = len(result.contexts)
        if result.refused:
            log.warning(
                "association %r (%s): %d of %d presentation contexts refused: %s", result.calling_ae_title,
                self.stats.peer_address, len(result.refused), len(result.refused) + len(result.contexts),
                "; ".join(f"{_sop_class_name(uid)}: {why}" for uid, why in result.refused),
            )
        self._peer_max_pdu = result.peer_max_pdu
        return True

    # -- data transfer ------------------------------------------------------------

    def _restart_clock(self) -> None:
        """A message has been answered: the next one gets dimse_timeout plus
        its size over limits.min_data_rate to arrive whole."""
        if self.settings.min_data_rate and self.stream is not None:
            self.stream.deadline(
                self.settings.dimse_timeout, self.settings.min_data_rate,
                "message slower than limits.min_data_rate after server.dimse_timeout",
            )

    def _data_transfer(self) -> None:
        assert self.stream is not None
        read = self.stream.read
        self._spare = self.settings.storage.spare()
        self._restart_clock()
        while True:
            pdu_type, body = read()
            if pdu_type == P_DATA_TF:
                self._p_data(body)
            elif pdu_type == A_RELEASE_RQ:
                self.sock.sendall(RELEASE_RP)
                self.stats.outcome = "released"
                return
            elif pdu_type == A_ABORT:
                self.stats.outcome = "aborted by peer"
                return
            else:
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X} during data transfer")

    def _p_data(self, body: memoryview) -> None:
        pos, end = 0, len(body)
        while pos < end:
            if end - pos < 6:
                raise ProtocolError("truncated PDV item")
            item_length, context_id, control = _PDV_HEADER.unpack_from(body, pos)
            if item_length < 2 or pos + 4 + item_length > end:
                raise ProtocolError(f"PDV item length {item_length} does not fit its PDU")
            fragment = body[pos + 6 : pos + 4 + item_length]
            pos += 4 + item_length
            # Message Control Header (PS3.8 E.2): bit 0 command, bit 1 last.
            if control & 1:
                limit = self.settings.max_command_set
                if len(self._command) + len(fragment) > limit:
                    raise LimitExceeded(f"command set longer than limits.max_command_set ({limit})")
                self._command += fragment
                if control & 2:
                    self._on_command(context_id)
            else:
                self._on_data_fragment(fragment, last=bool(control & 2))

    def _on_command(self, context_id: int) -> None:
        try:
            request = dimse.decode_command_set(self._command)
        except dimse.CommandSetError as exc:
            raise ProtocolError(str(exc)) from None
        finally:
            self._command.clear()
        assert self.negotiation is not None
        context = self.negotiation.contexts.get(context_id)
        if context is None:
            raise ProtocolError(f"message on presentation context {context_id}, which was not accepted")
        if self._incoming is not None or self._reject_status is not None or self._identifier is not None:
            # PS3.7 9.1: a message's data set follows its command set; a new
            # command first would orphan the data set being received.
            raise ProtocolError("command set while a data set is still arriving")
        self._request, self._context_id = request, context_id
        self._dataset_bytes = 0
        field = request["CommandField"]
        has_data_set = request.get("CommandDataSetType", dimse.NO_DATA_SET) != dimse.NO_DATA_SET
        if field == dimse.C_ECHO_RQ:
            self._respond(dimse.C_ECHO_RSP, dimse.SUCCESS)
        elif field == dimse.C_STORE_RQ and has_data_set:
            self._begin_store(request, context.abstract_syntax, context.transfer_syntax)
        elif field == dimse.C_FIND_RQ and has_data_set and context.abstract_syntax in FIND_SOP_CLASSES:
            self._identifier = bytearray()
        elif field == dimse.C_CANCEL_RQ:
            self._request = None
        else:
            # Not ours to serve: answer, and drain any data set that follows.
            status = (dimse.UNRECOGNIZED_OPERATION, f"command 0x{int(field):04X} not supported")
            if has_data_set:
                self._reject_status = status
            else:
                self._respond(int(field) | 0x8000, *status)

    def _refuse(self, request: dict[str, int | str], status: int, comment: str) -> None:
        """Drain the coming data set and answer ``status``; logged (warning and action line) now."""
        self._reject_status = (status, comment)
        sop_instance = str(request.get("AffectedSOPInstanceUID", ""))
        log.warning("C-STORE %r from %r refused with 0x%04X: %s", sop_instance, self.stats.calling_ae_title,
                    status, comment)
        if self.settings.action_log:
            action_log.info("refused %r (0x%04X %s) from %r", sop_instance, status, comment,
                            self.stats.calling_ae_title)

    def _begin_store(self, request: dict[str, int | str], abstract_syntax: str, transfer_syntax: str) -> None:
        sop_class = str(request.get("AffectedSOPClassUID", ""))
        if sop_class != abstract_syntax:
            self._refuse(request, dimse.SOP_CLASS_NOT_SUPPORTED,
                         "Affected SOP Class UID differs from the presentation context")
            return
        sop_instance = request.get("AffectedSOPInstanceUID")
        if not isinstance(sop_instance, str) or not dimse.is_uid(sop_instance):
            # It names the file and goes into its File Meta: mandatory in a
            # C-STORE-RQ (PS3.7 9.3.1.1), digits and dots, at most 64.
            why = "Affected SOP Instance UID missing" if sop_instance is None else "Affected SOP Instance UID invalid"
            self._refuse(request, dimse.INVALID_OBJECT_INSTANCE, why)
            return
        self._store_started = time.monotonic()
        free = self.settings.storage.free_bytes()
        if free < self.settings.min_free_bytes:
            self._refuse(request, dimse.OUT_OF_RESOURCES,
                         f"free space {free // 1_000_000} MB below storage.min_free_bytes")
            return
        try:
            spare, self._spare = self._spare, None
            self._incoming = self.settings.storage.begin(
                sop_class,
                str(request.get("AffectedSOPInstanceUID", "")),
                transfer_syntax,
                self.stats.calling_ae_title,
                spare,
            )
        except OSError as exc:
            self._refuse(request, dimse.OUT_OF_RESOURCES, f"cannot create temp file: {exc.strerror}")

    def _on_data_fragment(self, fragment: memoryview, last: bool) -> None:
        if self._request is None:
            raise ProtocolError("data set fragment without a command")
        if self._identifier is not None:
            if len(self._identifier) + len(fragment) > MAX_IDENTIFIER_BYTES:
                raise ProtocolError("C-FIND identifier larger than 1 MiB")
            self._identifier += fragment
            if last:
                identifier, self._identifier = bytes(self._identifier), None
                self._find(identifier)
            return
        self._dataset_bytes += len(fragment)
        if self._dataset_bytes > self.settings.max_object_size:
            raise LimitExceeded(f"data set larger than limits.max_object_size ({self.settings.max_object_size})")
        if self._incoming is not None:
            self._incoming.write(fragment)
        self.stats.bytes += len(fragment)
        if not last:
            return
        if self._reject_status is not None:
            status, comment = self._reject_status
            self._reject_status = None
            self.stats.failures += 1
            field = int(self._request["CommandField"]) | 0x8000
            self._respond(field, status, comment)
            return
        status, comment = self._finish_store()
        try:
            self._respond(dimse.C_STORE_RSP, status, comment)
        finally:
            self._hand_over()
        if self._spare is None:
            self._spare = self.settings.storage.spare()

    def _finish_store(self) -> tuple[int, str]:
        incoming, self._incoming = self._incoming, None
        assert incoming is not None and self._request is not None
        if incoming.error is not None:
            self.stats.failures += 1
            if incoming.error.errno in NO_SPACE:
                return dimse.OUT_OF_RESOURCES, "storage full"
            return dimse.OUT_OF_RESOURCES, f"write failed: {incoming.error.strerror}"
        negotiation = self.negotiation
        assert negotiation is not None
        transfer_syntax = negotiation.contexts[self._context_id].transfer_syntax
        sop_instance = str(self._request.get("AffectedSOPInstanceUID", ""))
        try:
            header = self._walk_and_scan(incoming, transfer_syntax)
        except HeaderError as exc:
            where = incoming.quarantine(f"{sop_instance}: {exc}")
            log.warning(
                "C-STORE %s from %s: cannot understand the data set (%s)%s",
                sop_instance, self.stats.calling_ae_title, exc,
                f"; kept in {where}" if where else "",
            )
            self.stats.failures += 1
            return dimse.CANNOT_UNDERSTAND, str(exc)[:64]
        sop_class = negotiation.contexts[self._context_id].abstract_syntax
        if header.sop_class_uid and header.sop_class_uid != sop_class:
            incoming.discard()
            self.stats.failures += 1
            log.warning(
                "C-STORE %s from %s: the data set's SOP Class UID %s does not match its context's %s",
                sop_instance, self.stats.calling_ae_title, header.sop_class_uid, sop_class,
            )
            return dimse.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, f"SOP Class UID in data set is {header.sop_class_uid}"[:64]
        # The file is named by the UID the sender gave in the command (the one
        # in its File Meta); the index records the data set's own.
        named = msgspec.structs.replace(header, sop_instance_uid=sop_instance or header.sop_instance_uid)
        header = msgspec.structs.replace(header, sop_instance_uid=header.sop_instance_uid or sop_instance)
        settings = self.settings
        root = settings.storage.sr_root if sop_class in SR_SOP_CLASSES and settings.storage.sr_root else None
        # The duplicate rules are by SOP Instance UID, either of them.
        uids = tuple(dict.fromkeys(u for u in (named.sop_instance_uid, header.sop_instance_uid) if u))
        locate = settings.locate

        def elsewhere() -> list[str]:
            assert locate is not None
            return [os.path.join(settings.storage.root, p) for p in locate(uids)]

        try:
            committed = incoming.commit(relative_path(settings.layout, named), settings.duplicates, root,
                                        sop_instance_uids=uids, locate=elsewhere if locate and uids else None)
        except OSError as exc:
            self.stats.failures += 1
            log.error("C-STORE %s: cannot store: %s", sop_instance, exc)
            return dimse.OUT_OF_RESOURCES, f"cannot store: {exc.strerror}"[:64]
        # What the sender waits for ends here; the rest runs after the
        # C-STORE-RSP has gone (_hand_over).
        self._stored = _Stored(incoming, committed, header, transfer_syntax, named.sop_instance_uid)
        if committed.outcome == "rejected":
            return dimse.DUPLICATE_SOP_INSTANCE, "other content stored under this SOP Instance UID"
        return dimse.SUCCESS, ""

    def _hand_over(self) -> None:
        """After the C-STORE-RSP: hash, log, count, and pass the record on.

        PERF: at one association the sender waits for each response, so
        nothing that can wait for it runs before it (bench.load ct-k1).
        The index stays complete without ordering: reconcile-on-start
        indexes any file whose record never arrived.
        """
        stored, self._stored = self._stored, None
        if stored is None:
            return
        incoming, committed, header = stored.incoming, stored.committed, stored.header
        try:
            settings = self.settings
            path = settings.storage.relative(committed.path)
            now = time.time()
            if committed.collided_path:
                log.warning(
                    "C-STORE %r from %r: %s holds another instance (SOP Instance UID %r); stored as %s",
                    header.sop_instance_uid, self.stats.calling_ae_title,
                    settings.storage.relative(committed.collided_path), committed.collided_uid, path,
                )
            if committed.existing_hash:
                self._conflict(committed, header.sop_instance_uid, incoming.content_hash, path, now)
            size = incoming.meta_length + incoming.dataset_length
            if settings.action_log:
                action_log.info(
                    "%s %s (%d bytes) from %s", committed.outcome, path, size, self.stats.calling_ae_title
                )
            if committed.outcome == "rejected":
                self.stats.failures += 1
                return
            self.stats.instances += 1
            self.stats.by_modality[header.modality or "?"] += 1
            self.stats.sizes.observe(size)
            if committed.outcome in ("identical", "kept-first"):
                # Acknowledged: the sender's data is (or stays) as first stored.
                self.stats.duplicates += 1
                return
            self.on_stored(
                InstanceRecord(
                    path=path,
                    size=size,
                    transfer_syntax_uid=stored.transfer_syntax,
                    calling_ae_title=self.stats.calling_ae_title,
                    called_ae_title=self.stats.called_ae_title,
                    peer_address=self.stats.peer_address,
                    received_at=now,
                    header=header,
                    content_hash=incoming.content_hash,
                    affected_sop_instance_uid=stored.affected if stored.affected != header.sop_instance_uid else "",
                )
            )
        finally:
            incoming.close()

    def _conflict(self, committed: Committed, sop_instance: str, new_hash: str, path: str, now: float) -> None:
        """Log and record an instance that arrived again with other content."""
        settings = self.settings
        log.warning(
            "C-STORE %s from %s: %s differs from the stored copy (sha256 %s, new %s); storage.duplicates=%s: %s",
            sop_instance, self.stats.calling_ae_title, path, committed.existing_hash[:12],
            new_hash[:12], settings.duplicates, committed.outcome,
        )
        self.on_stored(
            DuplicateConflict(
                sop_instance_uid=sop_instance,
                path=settings.storage.relative(committed.existing_path),
                existing_hash=committed.existing_hash, new_hash=new_hash,
                policy=settings.duplicates, outcome=committed.outcome,
                new_path=path if committed.outcome in ("kept-both", "overwritten") else "",
                calling_ae_title=self.stats.calling_ae_title, received_at=now,
            )
        )

    def _walk_and_scan(self, incoming: IncomingFile, transfer_syntax: str) -> HeaderFields:
        """Walk the data set to its end (nothing is acknowledged before), then scan its header.

        PERF: most objects need only the data set's first 64 KiB, in memory:
        small ones whole, images up to Pixel Data that runs to the end
        (walk_from_prefix; the mmap it spares costs ~15 us for a 512x512 CT).
        The rest are read through a read-only mmap of the temp file, whose
        pages of skipped values are never read.
        """
        prefix, length = incoming.prefix, incoming.dataset_length
        max_inflated = self.settings.max_object_size
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

    def _find(self, identifier: bytes) -> None:
        assert self.negotiation is not None and self.settings.find is not None and self._request is not None
        request = self._request
        context = self.negotiation.contexts[self._context_id]
        for status, match, comment in findscp.responses(
            self.settings.find, context.abstract_syntax, identifier, context.transfer_syntax, self._cancel_requested,
            context.abstract_syntax in self.negotiation.relational_queries,
        ):
            command = dimse.encode_response(
                dimse.C_FIND_RSP, context.abstract_syntax, int(request.get("MessageID", 0)), status,
                error_comment=comment, has_data_set=match is not None,
            )
            self.sock.sendall(p_data_tf(self._context_id, command, self._peer_max_pdu, match))
        self._request = None
        self._restart_clock()

    def _cancel_requested(self) -> bool:
        """True if the peer sent C-CANCEL-RQ while we stream C-FIND results."""
        assert self.stream is not None
        # A C-CANCEL-RQ sent right after the request may already sit in the
        # stream's buffer, read along with the identifier.
        if not self.stream.buffered and not select.select([self.sock], [], [], 0)[0]:
            return False
        pdu_type, body = self.stream.read()
        if pdu_type == A_ABORT:
            raise PeerClosed("aborted by peer")
        if pdu_type != P_DATA_TF or len(body) < 6 or not body[5] & 1:
            raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X} during C-FIND")
        try:
            command = dimse.decode_command_set(body[6:])
        except dimse.CommandSetError as exc:
            raise ProtocolError(str(exc)) from None
        return command["CommandField"] == dimse.C_CANCEL_RQ

    def _respond(self, command_field: int, status: int, comment: str = "") -> None:
        request, self._request = self._request, None
        assert request is not None
        # The peer's UIDs are echoed only if they are UIDs (they may be any bytes).
        sop_class, sop_instance = (
            uid if isinstance(uid, str) and dimse.is_uid(uid) else ""
            for uid in (request.get("AffectedSOPClassUID"), request.get("AffectedSOPInstanceUID"))
        )
        command = dimse.encode_response(
            command_field, sop_class, int(request.get("MessageID", 0)), status, sop_instance, comment
        )
        self.sock.sendall(p_data_tf(self._context_id, command, self._peer_max_pdu))
        if command_field == dimse.C_STORE_RSP:
            self.stats.latency.observe(time.monotonic() - self._store_started)
        self._restart_clock()


def p_data_tf(context_id: int, command: bytes, peer_max_pdu: int, data_set: bytes | None = None) -> bytes:
    """A command set (and its data set) as P-DATA-TF PDUs, one PDV each,
    fragmented to the peer's Maximum Length Received (0: no limit)."""
    out = bytearray()
    for payload, is_command in ((command, True), (data_set, False)):
        if payload is None:
            continue
        room = max(peer_max_pdu - 6, 1) if peer_max_pdu else max(len(payload), 1)
        for start in range(0, max(len(payload), 1), room):
            chunk = payload[start : start + room]
            # Message Control Header: bit 0 command, bit 1 last fragment.
            control = (1 if is_command else 0) | (2 if start + room >= len(payload) else 0)
            out += _PDU_HEADER.pack(P_DATA_TF, len(chunk) + 6)
            out += _PDV_HEADER.pack(len(chunk) + 2, context_id, control)
            out += chunk
    return bytes(out)
