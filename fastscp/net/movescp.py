"""C-MOVE sub-operations (PS3.4 C.4.2.3): C-STORE to the move destination on an association of our own.

The destination is named by its AE title in the C-MOVE-RQ and must be
configured (``retrieve.move_destinations``: AE title -> host, port, TLS);
an unknown one is answered 0xA801 before anything is selected. The
association is opened with pynetdicom as SCU (the helpers of
:mod:`fastscp.net.scu`), proposing for each SOP class the transfer syntaxes
the files are stored in plus one uncompressed context for the files that
must be converted (:func:`fastscp.net.retrievescp.choose_transfer_syntax`).
Files in their own transfer syntax are sent from disk as they are
(pynetdicom's chunked send: the data set bytes of the file, never decoded).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from pynetdicom import _config

from fastscp.net.fetch import remote_files
from fastscp.net.retrievescp import (
    MOVE_DESTINATION_UNKNOWN,
    UNCOMPRESSED,
    Destination,
    Response,
    RetrieveService,
    all_failed,
    choose_transfer_syntax,
    converted,
    failed,
    select_instances,
    suboperations,
)
from fastscp.net.scu import MAX_CONTEXTS, SCUError, _new_ae, _open
from fastscp.query.retrieve import Instance

log = logging.getLogger("fastscp.retrieve")


@dataclass(frozen=True)
class MoveRequest:
    """Who asked: the C-STORE sub-operations name them (Move Originator, PS3.7 9.3.1.1)."""

    #: Ours: the calling AE title of the sub-association.
    ae_title: str
    calling_ae_title: str
    message_id: int
    #: Seconds for connecting and for each response (server.dimse_timeout).
    timeout: float


def responses(service: RetrieveService, model: str, identifier: bytes, transfer_syntax: str, relational: bool,
              destination_ae: str, request: MoveRequest, cancelled: Callable[[], bool]
              ) -> Generator[Response, None, None]:
    """The C-MOVE-RSPs of one C-MOVE-RQ, running its sub-operations as they go."""
    destination = service.move_destinations.get(destination_ae)
    if destination is None:
        log.warning("C-MOVE from %r: Move Destination %r is not in retrieve.move_destinations",
                    request.calling_ae_title, destination_ae)
        yield Response(MOVE_DESTINATION_UNKNOWN, comment=f"Move Destination {destination_ae} unknown")
        return
    found = select_instances(service.select, model, identifier, transfer_syntax, relational)
    if isinstance(found, Response):
        yield found
        return
    with MoveSession(destination, destination_ae, request, found) as session:
        if found:
            try:
                session.open()
            except SCUError as exc:
                log.warning("C-MOVE from %r to %r: %s", request.calling_ae_title, destination_ae, exc)
                yield all_failed(found, transfer_syntax, str(exc))
                return
        files = remote_files(service.remote, found, request.calling_ae_title)
        try:
            yield from suboperations(found, session, cancelled, transfer_syntax,
                                     f"C-MOVE from {request.calling_ae_title!r} to {destination_ae!r}", files)
        finally:
            if files is not None:
                files.close()


def plan_contexts(found: list[Instance]) -> tuple[list[tuple[str, tuple[str, ...]]], set[str]]:
    """The presentation contexts (SOP class, transfer syntaxes) to propose for ``found`` from its start,
    at most :data:`~fastscp.net.scu.MAX_CONTEXTS`, and the SOP classes they cover.

    Each SOP class gets its files' own transfer syntaxes and one uncompressed context; the first
    class that no longer fits ends the list (its instances go on the next association).
    """
    contexts: dict[tuple[str, tuple[str, ...]], None] = {}
    classes: set[str] = set()
    for instance in found:
        wanted = {(instance.sop_class_uid, (instance.transfer_syntax_uid,)), (instance.sop_class_uid, UNCOMPRESSED)}
        if len(contexts.keys() | wanted) > MAX_CONTEXTS:
            if instance.sop_class_uid in classes:
                continue  # its uncompressed context is proposed: it goes converted
            break
        contexts.update(dict.fromkeys(sorted(wanted)))
        classes.add(instance.sop_class_uid)
    return list(contexts), classes


class MoveSession:
    """The association(s) to one move destination for one C-MOVE; call it per instance.

    An association proposes the contexts of the SOP classes met from the
    current instance on, at most :data:`~fastscp.net.scu.MAX_CONTEXTS`; an
    instance of a class it did not propose releases it and opens the next.
    """

    def __init__(self, destination: Destination, destination_ae: str, request: MoveRequest,
                 found: list[Instance]) -> None:
        _config.STORE_SEND_CHUNKED_DATASET = True
        self.destination = destination
        self.destination_ae = destination_ae
        self.request = request
        self._found = found
        self._position = {instance.sop_instance_uid: n for n, instance in enumerate(found)}
        self._next = 0
        self._assoc: Any = None
        self._classes: set[str] = set()

    def __enter__(self) -> MoveSession:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.release()
        self._assoc = None

    def open(self) -> None:
        """Open the association for the instances from the next one on.

        Raises
        ------
        SCUError
            The destination can't be reached or refused the association.
        """
        self.close()
        ae = _new_ae(self.request.ae_title, self.request.timeout)
        contexts, self._classes = plan_contexts(self._found[self._next:])
        for sop_class, syntaxes in contexts:
            ae.add_requested_context(sop_class, list(syntaxes))
        dest = self.destination
        self._assoc = _open(ae, dest.host, dest.port, self.destination_ae, dest.tls, max_pdu=0)

    def __call__(self, instance: Instance) -> int:
        """C-STORE one instance; its status (a failure status when it could not be sent)."""
        # In the order of the instances, but not each of them (another node's file may fail before).
        self._next = self._position[instance.sop_instance_uid]
        try:
            if self._assoc is None or instance.sop_class_uid not in self._classes:
                self.open()
            assoc = self._assoc
            if not assoc.is_established:
                return failed("C-MOVE", instance, "the association to the move destination was lost")
            accepted = {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
                        if str(cx.abstract_syntax) == instance.sop_class_uid}
            choice = choose_transfer_syntax(instance.transfer_syntax_uid, accepted)
            if choice is None:
                return failed("C-MOVE", instance, "the move destination accepted no context for it")
            syntax, convert = choice
            data: Any = converted(instance.path, syntax) if convert else instance.path
            status = assoc.send_c_store(data, originator_aet=self.request.calling_ae_title,
                                        originator_id=self.request.message_id)
        except SCUError as exc:
            return failed("C-MOVE", instance, str(exc))
        except FileNotFoundError:
            return failed("C-MOVE", instance, "its file is missing")
        except Exception as exc:  # unreadable file, decoder errors: pydicom raises many types
            return failed("C-MOVE", instance, f"{type(exc).__name__}: {exc}")
        if "Status" not in status:
            return failed("C-MOVE", instance, "no C-STORE response (association aborted or DIMSE timeout)")
        return int(status.Status)
