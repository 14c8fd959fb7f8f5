"""C-ECHO and C-STORE service class users (``fastscp echo`` and ``fastscp send``), on pynetdicom.

``send`` reports every file: stored (with the status's PS3.4 name), failed,
refused (the receiver did not accept its SOP class or transfer syntax) or
skipped (a file in a folder that is not DICOM Part 10). A file the receiver
refused never stops the others.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Literal

import pydicom
from pydicom.uid import UID
from pynetdicom import AE, Association, _config, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AddressInformation, AssociationSocket

from fastscp.net.dimse import is_warning, status_name
from fastscp.status import human_bytes

#: PS3.8 allows at most 128 presentation contexts in one A-ASSOCIATE-RQ.
MAX_CONTEXTS = 128
#: Seconds between redraws of the progress line.
PROGRESS_INTERVAL = 0.1

# Presentation context results (PS3.8 9.3.3.2) -> why a file's context was refused.
_CONTEXT_REFUSED = {
    1: "refused: the receiver rejected the presentation context (user rejection)",
    2: "refused: the receiver rejected the presentation context (no reason given)",
    3: "refused: SOP class not accepted by the receiver",
    4: "refused: transfer syntax not accepted by the receiver",
}


class SCUError(Exception):
    """The peer could not be reached or refused the association."""


# -- association ------------------------------------------------------------------------------


class _RequestorSocket(AssociationSocket):
    """pynetdicom's requestor socket, keeping why the TCP connect or TLS handshake failed.

    pynetdicom 3.0.4 (pinned) only logs the error and reports the
    association as aborted; ``fastscp echo`` and ``send`` say "connection
    refused". The body is pynetdicom's own ``connect`` plus the line that
    keeps the exception, TCP_NODELAY, and a close of the socket that failed.
    """

    connect_error: OSError | None = None

    def connect(self, primitive: Any) -> None:
        assert self.socket is not None
        try:
            if self.tls_args:
                context, server_hostname = self.tls_args
                self.socket = context.wrap_socket(self.socket, server_side=False, server_hostname=server_hostname)
            self.socket.settimeout(self.assoc.connection_timeout)
            self.socket.connect(primitive.address_info.as_tuple)
            self.socket.settimeout(None)
            # pynetdicom sends a C-STORE's command and data set in separate writes: with Nagle's algorithm on,
            # the second waits for the peer's delayed ACK (~40 ms per instance to dcmtk storescp: 20 img/s).
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.assoc.requestor.address_info = AddressInformation.from_tuple(self.socket.getsockname())
            self._is_connected = True
            evt.trigger(self.assoc, evt.EVT_CONN_OPEN, {"address": primitive.address_info.as_tuple})
            primitive.result = "Evt2"  # transport connection confirmed
            self.provider_queue.put(primitive)
        except OSError as exc:
            self.connect_error = exc
            if self.socket is not None:
                # Not pynetdicom's _shutdown_socket: its shutdown() of a socket that never connected raises
                # and skips close(), and the descriptor waits for the garbage collector.
                self.socket.close()
                self.socket = None
            primitive.result = "Evt17"  # transport connection closed
            self.provider_queue.put(primitive)
        finally:
            self._ready.set()


class _RequestorAE(AE):
    """An AE whose associations keep the connect error (see :class:`_RequestorSocket`)."""

    def _create_socket(self, assoc: Association, address: AddressInformation,
                       tls_args: tuple[ssl.SSLContext, str] | None) -> AssociationSocket:
        sock = _RequestorSocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock


def _new_ae(aet: str, timeout: float) -> AE:
    ae = _RequestorAE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    return ae


def associate(ae: AE, host: str, port: int, **kwargs: Any) -> Association:
    """``ae.associate(host, port, **kwargs)``, with pynetdicom's reactor kept off our responses.

    pynetdicom pauses the association's reactor thread before a
    ``send_c_*()`` waits for its response, but the pause can race: the
    reactor may look paused while on its way out of the wait, take the
    response off the queue as an "unexpected" message, and leave the send
    waiting for the DIMSE timeout. A fast SCP makes it show (fastscp answers
    before it hashes). Responses the reactor takes go back on the queue.
    """
    assoc = ae.associate(host, port, **kwargs)
    serve = assoc._serve_request

    def serve_requests_only(message: Any, context_id: int) -> None:
        if message.is_valid_response and not message.is_valid_request:
            assoc.dimse.msg_queue.put((context_id, message))
        else:
            serve(message, context_id)

    assoc._serve_request = serve_requests_only  # type: ignore[method-assign]
    return assoc


def _tls_args(tls: ssl.SSLContext | None, host: str) -> tuple[ssl.SSLContext, str] | None:
    return (tls, host) if tls is not None else None


def tls_context(*, ca_bundle: str = "", certificate: str = "", private_key: str = "",
                min_version: str = "1.2") -> ssl.SSLContext:
    """The client-side TLS context: the receiver's certificate checked against ``ca_bundle``
    (default: the system's CAs) and its host name; our certificate if the receiver asks for one.

    Raises
    ------
    SCUError
        A file is missing or can't be loaded; the message names the option.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3 if min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    try:
        if ca_bundle:
            context.load_verify_locations(ca_bundle)
        else:
            context.load_default_certs()
    except (ssl.SSLError, OSError) as exc:
        raise SCUError(f"--tls-ca-bundle: cannot load {ca_bundle}: {exc}") from None
    if bool(certificate) != bool(private_key):
        raise SCUError("--tls-certificate and --tls-private-key go together (PEM files)")
    if certificate:
        try:
            context.load_cert_chain(certificate, private_key)
        except (ssl.SSLError, OSError) as exc:
            raise SCUError(f"--tls-certificate/--tls-private-key: cannot load {certificate}: {exc}") from None
    return context


def _why(assoc: Association) -> str:
    """Why no association was established, in the words of PS3.8 where it has them."""
    if assoc.is_rejected and assoc.acceptor.primitive is not None:
        p = assoc.acceptor.primitive
        from fastscp.net.negotiation import REJECT_REASONS
        return "rejected: " + REJECT_REASONS.get((p.result_source, p.diagnostic), str(p.diagnostic))
    sock = assoc.dul.socket
    exc = sock.connect_error if isinstance(sock, _RequestorSocket) else None
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (socket.timeout, TimeoutError)) or getattr(exc, "errno", None) == errno.ETIMEDOUT:
        return "connection timed out"
    if exc is not None:
        return f"cannot connect: {exc.strerror or exc}"
    if assoc.is_aborted:  # pynetdicom aborts too when the receiver does not answer in time
        return "aborted (by the receiver, or no answer within the timeout)"
    return "no answer to the association request (ACSE timeout)"


def _open(ae: AE, host: str, port: int, aec: str, tls: ssl.SSLContext | None, **kwargs: Any) -> Association:
    assoc = associate(ae, host, port, ae_title=aec, tls_args=_tls_args(tls, host), **kwargs)
    if not assoc.is_established:
        raise SCUError(f"no association with {aec} at {host}:{port} ({_why(assoc)})")
    return assoc


# -- C-ECHO -----------------------------------------------------------------------------------


def echo(host: str, port: int, *, aet: str = "FASTSCU", aec: str = "ANY-SCP", timeout: float = 30,
         tls: ssl.SSLContext | None = None) -> int:
    """Send one C-ECHO; returns its status (0 is success).

    Raises
    ------
    SCUError
        No association (the message says why: connection refused, rejected...)
        or no response.
    """
    ae = _new_ae(aet, timeout)
    ae.add_requested_context(Verification)
    assoc = _open(ae, host, port, aec, tls)
    try:
        status = assoc.send_c_echo()
        if "Status" not in status:
            raise SCUError("no C-ECHO response (timed out or aborted)")
        return int(status.Status)
    finally:
        assoc.release()


# -- C-STORE ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outgoing:
    path: str
    sop_class_uid: str
    transfer_syntax_uid: str
    size: int


Outcome = Literal["stored", "failed", "refused", "skipped"]


@dataclass(frozen=True)
class FileResult:
    """What happened to one file: its report line is ``str(result)``."""

    path: str
    outcome: Outcome
    #: Status code and name, or why it was not sent.
    detail: str
    sop_class_uid: str = ""

    def __str__(self) -> str:
        what = f"{UID(self.sop_class_uid).name}: " if self.sop_class_uid else ""
        return f"{self.path}: {what}{self.detail}"


@dataclass
class SendSummary:
    stored: int = 0
    failed: int = 0
    refused: int = 0
    skipped: int = 0
    #: Bytes of the files stored.
    bytes: int = 0
    seconds: float = 0.0
    #: Why sending stopped early (no association), else "".
    error: str = ""
    results: list[FileResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every DICOM file was stored (skipped non-DICOM files don't count)."""
        return not (self.failed or self.refused or self.error)

    def add(self, result: FileResult) -> None:
        self.results.append(result)
        setattr(self, result.outcome, getattr(self, result.outcome) + 1)

    def __str__(self) -> str:
        rate = f" ({human_bytes(self.bytes / self.seconds)}/s)" if self.seconds > 0 and self.bytes else ""
        return (f"stored {self.stored}, failed {self.failed}, refused {self.refused}, skipped {self.skipped} "
                f"(not DICOM); {human_bytes(self.bytes)} in {self.seconds:.1f} s{rate}")


def iter_files(paths: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """(path, named) for the files named and every file below the folders named, in a stable order.

    ``named`` is True for a path given itself (not found in a folder).
    """
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield os.path.join(root, name), False
        else:
            yield path, True


def _describe(path: str, named: bool) -> Outgoing | FileResult:
    """The file's SOP class and transfer syntax from its File Meta Information, or why it won't be sent."""
    try:
        size = os.stat(path).st_size
        meta = pydicom.filereader.read_file_meta_info(path)
        return Outgoing(path, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID), size)
    except FileNotFoundError:
        return FileResult(path, "failed", "failed: no such file")
    except OSError as exc:
        return FileResult(path, "failed", f"failed: cannot read: {exc.strerror or exc}")
    except Exception:  # anything pydicom can't read as Part 10 File Meta Information
        if named:
            return FileResult(path, "failed", "failed: not a DICOM Part 10 file")
        return FileResult(path, "skipped", "skipped: not DICOM")


def _batches(files: list[Outgoing]) -> Iterator[list[Outgoing]]:
    """Split so that no association needs more than MAX_CONTEXTS contexts."""
    batch: list[Outgoing] = []
    contexts: set[tuple[str, str]] = set()
    for item in files:
        key = (item.sop_class_uid, item.transfer_syntax_uid)
        if key not in contexts and len(contexts) == MAX_CONTEXTS:
            yield batch
            batch, contexts = [], set()
        contexts.add(key)
        batch.append(item)
    if batch:
        yield batch


class Progress:
    """One live line on a terminal: files, bytes and rate. Off (draws nothing) elsewhere.

    Bytes count as they leave (pynetdicom's ``EVT_DATA_SENT``, from its
    reactor thread), so a large file moves the line too.
    """

    def __init__(self, stream: IO[str] | None, total_files: int, total_bytes: int, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.enabled = bool(stream is not None and stream.isatty())
        self.total_files, self.total_bytes = total_files, total_bytes
        self.files = 0
        #: Bytes of the files done, and bytes sent of the file in progress.
        self.done_bytes = self.current = 0
        self.clock = clock
        self.start = clock()
        self._drawn = 0.0
        self._shown = False
        self._lock = threading.Lock()

    def sent(self, nbytes: int) -> None:
        if self.enabled:
            with self._lock:
                self.current += nbytes
                self._draw_locked(force=False)

    def file_done(self, size: int) -> None:
        if self.enabled:
            with self._lock:
                self.files += 1
                self.done_bytes += size
                self.current = 0
                self._draw_locked(force=True)

    def line(self) -> str:
        sent = min(self.done_bytes + self.current, self.total_bytes)
        elapsed = max(self.clock() - self.start, 1e-6)
        return (f"{self.files}/{self.total_files} files, {human_bytes(sent)} of {human_bytes(self.total_bytes)}, "
                f"{human_bytes(sent / elapsed)}/s")

    def _draw_locked(self, force: bool) -> None:
        now = self.clock()
        if not force and now - self._drawn < PROGRESS_INTERVAL:
            return
        assert self.stream is not None
        self._drawn = now
        self._shown = True
        self.stream.write("\r" + self.line() + "\x1b[K")
        self.stream.flush()

    def clear(self) -> None:
        """Erase the line (before other output to the same terminal)."""
        if self.enabled and self._shown:
            with self._lock:
                assert self.stream is not None
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self._shown = False


def send(host: str, port: int, paths: Iterable[str], *, aet: str = "FASTSCU", aec: str = "ANY-SCP",
         timeout: float = 60, tls: ssl.SSLContext | None = None, out: IO[str] | None = sys.stdout,
         progress: IO[str] | None = None) -> SendSummary:
    """C-STORE every DICOM file named (folders recursively), unchanged; one report line per file.

    Each file travels in its own transfer syntax and its data set bytes are
    sent as they are on disk (pynetdicom's chunked send), never re-encoded.
    Every (SOP class, transfer syntax) pair is offered, at most
    :data:`MAX_CONTEXTS` per association (more: several associations). A
    file whose context the receiver refused is reported and the rest go on.
    A file named that does not exist or is not DICOM Part 10 fails; a
    non-DICOM file found in a folder is skipped.

    Parameters
    ----------
    out : file, optional
        Where the line of each file goes (None: nowhere).
    progress : file, optional
        A terminal for the live progress line (files, bytes, rate); ignored
        unless it is a TTY.

    Returns
    -------
    SendSummary
        Counts, bytes, and ``error`` if sending stopped early because no
        association could be made (the files not sent count as failed).
    """
    _config.STORE_SEND_CHUNKED_DATASET = True
    summary = SendSummary()
    started = time.monotonic()
    files: list[Outgoing] = []
    for path, named in iter_files(paths):
        item = _describe(path, named)
        if isinstance(item, Outgoing):
            files.append(item)
        else:
            summary.add(item)
            if out is not None:
                print(item, file=out)
    meter = Progress(progress, len(files), sum(f.size for f in files))

    def report(result: FileResult, size: int) -> None:  # size: the file's, sent or not
        summary.add(result)
        if result.outcome == "stored":
            summary.bytes += size
        meter.clear()
        if out is not None:
            print(result, file=out, flush=meter.enabled)
        meter.file_done(size)

    handlers = [(evt.EVT_DATA_SENT, lambda event: meter.sent(len(event.data)))] if meter.enabled else []
    queue = list(_batches(files))
    while queue:
        batch = queue.pop(0)
        ae = _new_ae(aet, timeout)
        for sop_class, syntax in dict.fromkeys((f.sop_class_uid, f.transfer_syntax_uid) for f in batch):
            ae.add_requested_context(sop_class, [syntax])
        try:
            assoc = _open(ae, host, port, aec, tls, max_pdu=0, evt_handlers=handlers)
        except SCUError as exc:
            summary.error = str(exc)
            summary.failed += sum(len(b) for b in (batch, *queue))
            break
        try:
            rest = _store_batch(assoc, batch, report)
        finally:
            if assoc.is_established:
                assoc.release()
        if len(rest) == len(batch):  # lost before anything was tried: don't try forever
            for item in rest:
                report(FileResult(item.path, "failed", "failed: not sent (association lost)", item.sop_class_uid),
                       item.size)
        elif rest:  # the association was lost: the files not yet sent go on a new one
            queue.insert(0, rest)
    meter.clear()
    summary.seconds = time.monotonic() - started
    return summary


def _store_batch(assoc: Association, batch: list[Outgoing],
                 report: Callable[[FileResult, int], None]) -> list[Outgoing]:
    """Send a batch on one association; returns the files not tried because the association was lost."""
    accepted = {(c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.accepted_contexts}
    refused = {(c.abstract_syntax, c.transfer_syntax[0]): c.result for c in assoc.rejected_contexts}
    for i, item in enumerate(batch):
        key = (item.sop_class_uid, item.transfer_syntax_uid)
        if key not in accepted:
            why = _CONTEXT_REFUSED.get(refused.get(key, 3), _CONTEXT_REFUSED[3])
            if refused.get(key) == 4:
                why += f" ({UID(item.transfer_syntax_uid).name})"
            report(FileResult(item.path, "refused", why, item.sop_class_uid), item.size)
            continue
        if not assoc.is_established:
            return batch[i:]
        status = assoc.send_c_store(item.path)
        code = int(status.Status) if "Status" in status else None
        if code is None:
            report(FileResult(item.path, "failed", "failed: no response (association aborted or DIMSE timeout)",
                              item.sop_class_uid), item.size)
            continue
        name = f"0x{code:04X} {status_name(code)}"
        # Peer-supplied text: repr() shows control characters escaped.
        comment = f": {str(status.ErrorComment)!r}" if "ErrorComment" in status and status.ErrorComment else ""
        if code == 0 or is_warning(code):
            report(FileResult(item.path, "stored", f"stored ({name}{comment})", item.sop_class_uid), item.size)
        else:
            report(FileResult(item.path, "failed", f"failed: {name}{comment}", item.sop_class_uid), item.size)
    return []
