"""Run one association as the acceptor: A-ASSOCIATE, the data transfer phase, A-RELEASE / A-ABORT.

pynetdicom negotiates the association (see :mod:`fastscp.net.negotiation`); the
data transfer phase is handled here, on one blocking socket per thread,
because it is the hot path: each P-DATA-TF PDU is read with one
``recv_into`` into a reusable buffer (:class:`fastscp.net.pdu.PDUStream`) and
its data set fragments go straight to the temp file with no copy into Python
objects. Stock pynetdicom reads 4 KiB at a time and polls with 1 ms sleeps
(~90 images/s on 512x512 CT here).

The association is the connection: it reassembles command sets, dispatches
each DIMSE message to an object of its own (:class:`~fastscp.net.storescp.StoreRequest`,
:class:`~fastscp.net.findscp.FindRequest`, :class:`Unsupported`) that receives
the message's data set and answers it, and keeps no state of any one message.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from pydicom.uid import UID

from fastscp.dicom.sopclasses import FIND_SOP_CLASSES, GET_SOP_CLASSES, MOVE_SOP_CLASSES, STORAGE_COMMITMENT_PUSH
from fastscp.index.records import DuplicateConflict, InstanceRecord
from fastscp.net import commitscp, dimse
from fastscp.net.access import peer_ip
from fastscp.net.datapath import COMMAND, DATA_SET, FRAGMENT, PROGRESS, WRITE_FAILED, data_path
from fastscp.net.findscp import Finder, FindRequest
from fastscp.net.negotiation import (
    REJECTED_TRANSIENT,
    SOURCE_PROVIDER_PRESENTATION,
    AcceptancePolicy,
    Negotiation,
    encode_associate_rj,
    negotiate,
)
from fastscp.net.pdu import (
    A_ABORT,
    A_ASSOCIATE_RQ,
    A_RELEASE_RQ,
    MAX_ASSOCIATE_RQ,
    P_DATA_TF,
    PDU_HEADER,
    PDV_HEADER,
    RELEASE_RP,
    DeadlineExceeded,
    LimitExceeded,
    PDUStream,
    PeerClosed,
    ProtocolError,
    abort_pdu,
    p_data_tf,
)
from fastscp.net.retrieve import RetrieveRequest
from fastscp.net.retrievescp import RetrieveService
from fastscp.net.stats import AssociationStats
from fastscp.net.storescp import StoreRequest
from fastscp.storage.area import Locate, PageRecycler, Storage, TempFile

log = logging.getLogger("fastscp.association")


def _sop_class_name(uid: str) -> str:
    """A SOP class UID with its name, for logs (the UID is the peer's: shown escaped)."""
    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else repr(uid)


def _always_admit(_calling_ae_title: str) -> tuple[bool, str]:
    return True, ""


@dataclass(frozen=True)
class ServiceSettings:
    policy: AcceptancePolicy
    #: The storage area, with its policy (storage.*: layout, duplicates, watermark).
    storage: Storage
    acse_timeout: float
    dimse_timeout: float
    #: limits.max_object_size: a larger data set (or one inflating past it) aborts.
    max_object_size: int
    #: limits.max_command_set: a longer command set aborts.
    max_command_set: int
    #: limits.min_data_rate: bytes/s a message must average after dimse_timeout (0: off).
    min_data_rate: int
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
    locate: Locate | None = None
    #: C-MOVE and C-GET (None: the Query/Retrieve MOVE and GET models are not served).
    retrieve: RetrieveService | None = None
    #: Storage Commitment Push Model (None: not served).
    commitment: commitscp.CommitmentService | None = None


class Message(Protocol):
    """A DIMSE message whose data set is arriving: it receives the fragments and answers at the last."""

    def receive(self, fragment: memoryview) -> None: ...
    def complete(self) -> None: ...
    def abandon(self) -> None: ...


class Unsupported:
    """A request we do not serve that has a data set: drained (bounded), then answered 0x0211."""

    __slots__ = ("_association", "_context_id", "_received", "_request")

    def __init__(self, association: Association, request: dict[str, int | str], context_id: int) -> None:
        self._association = association
        self._request = request
        self._context_id = context_id
        self._received = 0

    def receive(self, fragment: memoryview) -> None:
        self._received += len(fragment)
        limit = self._association.settings.max_object_size
        if self._received > limit:
            raise LimitExceeded(f"data set larger than limits.max_object_size ({limit})")
        self._association.stats.bytes += len(fragment)

    def complete(self) -> None:
        self._association.stats.failures += 1
        self._association.respond(self._request, self._context_id, *unsupported(self._request))

    def abandon(self) -> None:
        pass


def unsupported(request: dict[str, int | str]) -> tuple[int, int, str]:
    """The response to a command we do not serve: (its response's Command Field, status, comment)."""
    field = int(request["CommandField"])
    status = (dimse.UNRECOGNIZED_OPERATION, f"command 0x{field:04X} not supported")
    return field | 0x8000, *status


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
        #: The message whose data set is arriving, else None.
        self._message: Message | None = None
        #: The temp file the next C-STORE data set goes into, made in advance.
        self._spare: TempFile | None = None
        #: Where the stored files go once answered (their pages back to the kernel), or None.
        self.pages: PageRecycler | None = None
        self._peer_max_pdu = 0

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
            if self._message is not None:
                self._message.abandon()
                self._message = None
            if self._spare is not None:
                self._spare.discard()
                self._spare = None
            if self.pages is not None:
                self.pages.close()
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

    def answered(self) -> None:
        """A message has been answered: the next one gets dimse_timeout plus
        its size over limits.min_data_rate to arrive whole."""
        if self.settings.min_data_rate and self.stream is not None:
            self.stream.deadline(
                self.settings.dimse_timeout, self.settings.min_data_rate,
                "message slower than limits.min_data_rate after server.dimse_timeout",
            )

    def _data_transfer(self) -> None:
        """P-DATA-TF PDUs through the data path's loop (fastscp.net.datapath), which returns at each
        command set, data set end or fragment for a Python message; other PDUs here."""
        assert self.stream is not None
        path = data_path(self.stream, self.settings.max_command_set)
        self._spare = self.settings.storage.spare()
        self.pages = self.settings.storage.page_recycler()
        self.answered()
        while True:
            event = path.pump()
            if event == FRAGMENT:
                message = self._message
                if message is None:
                    raise ProtocolError("data set fragment without a command")
                message.receive(path.fragment)
                if path.last:
                    self._completed(message)
                continue
            if event == COMMAND:
                message = self._on_command(path.context_id, path.command)
                if isinstance(message, StoreRequest) and (target := message.direct()) is not None:
                    path.to_file(*target)
                continue
            if event == PROGRESS:
                assert isinstance(self._message, StoreRequest)
                self._message.streamed(path.length)
                continue
            if event == DATA_SET:
                assert isinstance(self._message, StoreRequest)
                self._message.streamed(path.length, path.content_hash)
                self._completed(self._message)
                continue
            if event == WRITE_FAILED:
                assert isinstance(self._message, StoreRequest)
                self._message.write_failed(path.errno)
                continue
            pdu_type, _body = self.stream.read()  # not P-DATA-TF
            if pdu_type == A_RELEASE_RQ:
                self.sock.sendall(RELEASE_RP)
                self.stats.outcome = "released"
                return
            elif pdu_type == A_ABORT:
                self.stats.outcome = "aborted by peer"
                return
            else:
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X} during data transfer")

    def _completed(self, message: Message) -> None:
        """The data set's last fragment arrived: the message answers; a temp file for the next C-STORE."""
        message.complete()
        self._message = None
        if self._spare is None:
            self._spare = self.settings.storage.spare()

    def _on_command(self, context_id: int, command: bytes) -> Message | None:
        """Dispatch a complete command set; returns the message whose data set follows, if any."""
        try:
            request = dimse.decode_command_set(command)
        except dimse.CommandSetError as exc:
            raise ProtocolError(str(exc)) from None
        assert self.negotiation is not None
        context = self.negotiation.contexts.get(context_id)
        if context is None:
            raise ProtocolError(f"message on presentation context {context_id}, which was not accepted")
        if self._message is not None:
            # PS3.7 9.1: a message's data set follows its command set; a new
            # command first would orphan the data set being received.
            raise ProtocolError("command set while a data set is still arriving")
        field = request["CommandField"]
        has_data_set = request.get("CommandDataSetType", dimse.NO_DATA_SET) != dimse.NO_DATA_SET
        if field == dimse.C_ECHO_RQ:
            self.respond(request, context_id, dimse.C_ECHO_RSP, dimse.SUCCESS)
        elif field == dimse.C_STORE_RQ and has_data_set:
            self._message = StoreRequest(self, request, context, self._take_spare)
        elif field == dimse.C_FIND_RQ and has_data_set and context.abstract_syntax in FIND_SOP_CLASSES:
            self._message = FindRequest(self, request, context)
        elif has_data_set and self.settings.retrieve is not None and context.abstract_syntax in (
            MOVE_SOP_CLASSES if field == dimse.C_MOVE_RQ else GET_SOP_CLASSES if field == dimse.C_GET_RQ else ()
        ):
            self._message = RetrieveRequest(self, request, context)
        elif (field == dimse.N_ACTION_RQ and has_data_set and self.settings.commitment is not None
              and context.abstract_syntax == STORAGE_COMMITMENT_PUSH):
            self._message = commitscp.CommitmentRequest(self, request, context)
        elif field == dimse.C_CANCEL_RQ:
            pass  # nothing of ours left to cancel
        elif has_data_set:
            # Not ours to serve: drain the data set that follows, then answer.
            self._message = Unsupported(self, request, context_id)
        else:
            self.respond(request, context_id, *unsupported(request))
        return self._message

    def _take_spare(self) -> TempFile | None:
        spare, self._spare = self._spare, None
        return spare

    def cancel_requested(self) -> bool:
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

    def send(self, context_id: int, command: bytes, data_set: bytes | None = None) -> None:
        """A message to the peer, fragmented to its Maximum Length Received."""
        data = p_data_tf(context_id, command, self._peer_max_pdu, data_set)
        if self.settings.tls is None and self.sock.gettimeout():
            # PERF: CPython polls before each send on a socket with a timeout (its descriptor is
            # non-blocking). A message the send buffer takes whole, a response nearly always, goes
            # in one write: a system call less per store, where another association may take the GIL.
            try:
                sent = os.write(self.sock.fileno(), data)
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        self.sock.sendall(data)

    # -- messages we send and the responses we await (C-GET, storage commitment) ------------

    def send_fragments(self, context_id: int, command: bytes, fragments: Iterable[tuple[bytes, bool]]) -> None:
        """A command set, then a data set given as (fragment, last) pairs, each fragment one P-DATA-TF PDU
        (a C-GET sub-operation's C-STORE-RQ: the file is never all in memory)."""
        self.sock.sendall(p_data_tf(context_id, command, self._peer_max_pdu))
        for fragment, last in fragments:
            self.sock.sendall(PDU_HEADER.pack(P_DATA_TF, len(fragment) + 6)
                              + PDV_HEADER.pack(len(fragment) + 2, context_id, 2 if last else 0) + fragment)

    def next_command(self) -> tuple[int, dict[str, int | str]] | None:
        """The peer's next command set, where we await a response (a C-STORE-RSP or C-CANCEL-RQ during a
        C-GET, an N-EVENT-REPORT-RSP); None if the peer sent A-RELEASE-RQ instead (not answered yet)."""
        assert self.stream is not None
        self.answered()
        command = bytearray()
        while True:
            pdu_type, body = self.stream.read()
            if pdu_type == A_ABORT:
                raise PeerClosed("aborted by peer")
            if pdu_type == A_RELEASE_RQ:
                return None
            if pdu_type != P_DATA_TF:
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X} where a response was awaited")
            pos = 0
            while pos < len(body):
                if len(body) - pos < 6:
                    raise ProtocolError("truncated PDV item")
                item_length, context_id, control = PDV_HEADER.unpack_from(body, pos)
                if item_length < 2 or pos + 4 + item_length > len(body) or not control & 1:
                    raise ProtocolError("a data set or a malformed PDV where a command set was expected")
                command += body[pos + 6 : pos + 4 + item_length]
                pos += 4 + item_length
                if len(command) > self.settings.max_command_set:
                    raise LimitExceeded(f"command set longer than limits.max_command_set "
                                        f"({self.settings.max_command_set})")
                if control & 2:
                    if pos < len(body):
                        raise ProtocolError("more PDVs after a complete command set")
                    try:
                        return context_id, dimse.decode_command_set(command)
                    except dimse.CommandSetError as exc:
                        raise ProtocolError(str(exc)) from None

    def answer_release(self) -> None:
        """Answer the A-RELEASE-RQ :meth:`next_command` met; the caller then ends with PeerClosed."""
        self.sock.sendall(RELEASE_RP)
        self.stats.outcome = "released"

    def respond(self, request: dict[str, int | str], context_id: int, command_field: int, status: int,
                comment: str = "") -> None:
        """Answer ``request`` (no data set); the next message's clock starts."""
        # The peer's UIDs are echoed only if they are UIDs (they may be any bytes).
        sop_class, sop_instance = (
            uid if isinstance(uid, str) and dimse.is_uid(uid) else ""
            for uid in (request.get("AffectedSOPClassUID"), request.get("AffectedSOPInstanceUID"))
        )
        command = dimse.encode_response(
            command_field, sop_class, int(request.get("MessageID", 0)), status, sop_instance, comment
        )
        self.send(context_id, command)
        self.answered()
