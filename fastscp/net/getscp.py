"""C-GET sub-operations (PS3.4 C.4.3.3): C-STORE on the requester's own association.

The requester takes the SCP role for the storage SOP classes it wants
(SCP/SCU Role Selection, PS3.7 D.3.3.4; see
:attr:`fastscp.net.negotiation.AcceptedContext.requestor_scp`); on those
contexts we send C-STORE-RQ and read its C-STORE-RSP, in the middle of
the C-GET. A C-CANCEL-RQ can arrive while a C-STORE-RSP is awaited: it is
remembered (:attr:`GetSession.cancel_received`) and stops the C-GET before
the next sub-operation.

No socket here: the association passes ``send`` (a command set and a data
set in fragments, each one P-DATA-TF PDU) and ``receive`` (the next command
set from the peer). A file goes out as stored: its data set bytes, read
from disk one fragment at a time, never decoded; converted only when the
requester accepted none of its own transfer syntax for its SOP class.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator
from typing import BinaryIO

from fastscp.dicom.part10 import read_file_meta
from fastscp.net import dimse, retrievescp
from fastscp.net.fetch import remote_files
from fastscp.net.findscp import encode_identifier
from fastscp.query.retrieve import Instance

#: Bytes of File Meta Information read to find where the data set starts (far above any real one).
_META_READ = 64 * 1024
#: Fragment size when the requester announced no Maximum Length Received.
UNLIMITED_FRAGMENT = 1024 * 1024

#: (fragment, last) pairs of a data set.
Fragments = Iterator[tuple[bytes, bool]]
Send = Callable[[int, bytes, Fragments], None]
#: The next command set the requester sends: (presentation context ID, decoded command).
Receive = Callable[[], tuple[int, dict[str, int | str]]]


def responses(service: retrievescp.RetrieveService, model: str, identifier: bytes, transfer_syntax: str,
              relational: bool, session: GetSession, cancelled: Callable[[], bool],
              requester: str = "") -> Generator[retrievescp.Response, None, None]:
    """The C-GET-RSPs of one C-GET-RQ, running its sub-operations through ``session`` as they go."""
    found = retrievescp.select_instances(service.select, model, identifier, transfer_syntax, relational)
    if isinstance(found, retrievescp.Response):
        yield found
        return
    files = remote_files(service.remote, found, requester)
    try:
        yield from retrievescp.suboperations(found, session, lambda: session.cancel_received or cancelled(),
                                             transfer_syntax, f"C-GET from {requester!r}", files)
    finally:
        if files is not None:
            files.close()


class ProtocolViolation(ValueError):
    """The requester sent something other than a C-STORE-RSP or C-CANCEL-RQ during the C-GET."""


def _file_fragments(f: BinaryIO, offset: int, length: int, size: int) -> Fragments:
    """The data set bytes of an open file, ``size`` at a time (the caller closes the file)."""
    f.seek(offset)
    left = length
    while True:
        chunk = f.read(min(size, left)) if left else b""
        if len(chunk) < min(size, left):
            raise OSError(f"file shorter than when it was opened ({left - len(chunk)} bytes missing)")
        left -= len(chunk)
        yield chunk, left == 0
        if not left:
            return


def _bytes_fragments(data: bytes, size: int) -> Fragments:
    for start in range(0, max(len(data), 1), size):
        yield data[start : start + size], start + size >= len(data)


class GetSession:
    """The C-STORE sub-operations of one C-GET; call it per instance.

    Parameters
    ----------
    contexts : dict
        The accepted contexts on which the requester is SCP: context ID ->
        (abstract syntax, transfer syntax).
    fragment_size : int
        Largest data set fragment: the requester's Maximum Length Received
        less the 6 bytes of PDV header.
    """

    def __init__(self, contexts: dict[int, tuple[str, str]], send: Send, receive: Receive, fragment_size: int,
                 *, priority: int = 0) -> None:
        self._by_class: dict[str, dict[str, int]] = {}
        for context_id, (sop_class, syntax) in sorted(contexts.items()):
            self._by_class.setdefault(sop_class, {}).setdefault(syntax, context_id)
        self._send, self._receive = send, receive
        self._fragment = fragment_size or UNLIMITED_FRAGMENT
        self._priority = priority
        self._message_id = 0
        #: A C-CANCEL-RQ arrived while a sub-operation was under way.
        self.cancel_received = False

    def __call__(self, instance: Instance) -> int:
        """C-STORE one instance; its status (a failure status when it could not be sent)."""
        syntaxes = self._by_class.get(instance.sop_class_uid, {})
        try:
            f = open(instance.path, "rb")
        except FileNotFoundError:
            return retrievescp.failed("C-GET", instance, "its file is missing")
        except OSError as exc:
            return retrievescp.failed("C-GET", instance, f"cannot open its file: {exc.strerror}")
        with f:
            try:
                meta, offset = read_file_meta(f.read(_META_READ))
                length = os.fstat(f.fileno()).st_size - offset
            except (OSError, ValueError) as exc:
                return retrievescp.failed("C-GET", instance, f"cannot read its File Meta Information: {exc}")
            choice = retrievescp.choose_transfer_syntax(meta.get(0x0010) or instance.transfer_syntax_uid,
                                                        frozenset(syntaxes))
            if choice is None:
                return retrievescp.failed("C-GET", instance,
                                          "the requester accepted no SCP role context for its SOP class and syntax")
            syntax, convert = choice
            if convert:
                try:
                    data = encode_identifier(retrievescp.converted(instance.path, syntax), syntax)
                except Exception as exc:  # decoder plugins raise many types
                    return retrievescp.failed("C-GET", instance,
                                              f"cannot convert it to {syntax}: {type(exc).__name__}: {exc}")
                fragments = _bytes_fragments(data, self._fragment)
                sop_instance = instance.sop_instance_uid
            else:
                fragments = _file_fragments(f, offset, length, self._fragment)
                sop_instance = meta.get(0x0003) or instance.sop_instance_uid
            self._message_id = self._message_id % 0xFFFF + 1
            command = dimse.encode_request(dimse.C_STORE_RQ, instance.sop_class_uid, sop_instance, self._message_id,
                                           priority=self._priority)
            self._send(syntaxes[syntax], command, fragments)
        return self._response()

    def _response(self) -> int:
        """Read until the C-STORE-RSP of our request; note a C-CANCEL-RQ on the way."""
        while True:
            _context_id, command = self._receive()
            field = command["CommandField"]
            if field == dimse.C_CANCEL_RQ:
                self.cancel_received = True
            elif field == dimse.C_STORE_RSP and command.get("MessageIDBeingRespondedTo") == self._message_id:
                status = command.get("Status")
                if not isinstance(status, int):
                    raise ProtocolViolation("C-STORE-RSP without a Status")
                return status
            else:
                raise ProtocolViolation(f"command 0x{int(field):04X} while a C-GET sub-operation awaits its "
                                        f"C-STORE-RSP (message {self._message_id})")
