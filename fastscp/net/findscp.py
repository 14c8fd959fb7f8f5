"""C-FIND SCP (PS3.4 C.4.1): decode the request identifier, run the query,
stream pending responses, honour C-CANCEL.

One :class:`FindRequest` per C-FIND-RQ on an association: it collects the
identifier and streams the responses (:func:`responses`).

The matching itself (DICOM rules -> SQL on the index) lives in
:mod:`fastscp.query.cfind`; this module is the DIMSE side only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from io import BytesIO
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from fastscp.dicom.sopclasses import FIND_SOP_CLASSES as FIND_SOP_CLASSES  # the supervisor's import
from fastscp.net import dimse
from fastscp.net.negotiation import AcceptedContext
from fastscp.net.pdu import ProtocolError
from fastscp.query.cfind import IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, PENDING, UNABLE_TO_PROCESS, FindError

if TYPE_CHECKING:
    from fastscp.net.association import Association

log = logging.getLogger("fastscp.find")

#: Largest request identifier we read (they are a few hundred bytes).
MAX_IDENTIFIER_BYTES = 1 << 20

#: Matching terminated due to Cancel (PS3.4 C.4.1.1.4); the other C-FIND
#: statuses are :mod:`fastscp.query.cfind`'s.
CANCEL = 0xFE00

#: ``find(model_uid, identifier, relational) -> matches``: the query behind
#: the service; ``relational``: relational queries were negotiated.
Finder = Callable[[str, Dataset, bool], Iterator[Dataset]]

_IMPLICIT = "1.2.840.10008.1.2"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"


def decode_identifier(data: bytes, transfer_syntax: str) -> Dataset:
    """The request identifier as a pydicom Dataset (raises on garbage)."""
    ds = read_dataset(BytesIO(data), transfer_syntax == _IMPLICIT, transfer_syntax != _BIG_ENDIAN)
    for element in ds:  # decode now, so errors surface here and not mid-query
        _ = element.value
    return ds


def encode_identifier(ds: Dataset, transfer_syntax: str) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_implicit_VR = transfer_syntax == _IMPLICIT
    buffer.is_little_endian = transfer_syntax != _BIG_ENDIAN
    write_dataset(buffer, ds)
    return buffer.getvalue()


def responses(
    find: Finder, model: str, identifier: bytes, transfer_syntax: str, cancelled: Callable[[], bool],
    relational: bool = False,
) -> Iterator[tuple[int, bytes | None, str]]:
    """(status, encoded identifier or None, error comment) for each C-FIND-RSP.

    ``relational``: the association negotiated relational queries for ``model``.

    Pending responses carry a match; the last one is Success, Cancel or a
    failure, without an identifier.
    """
    try:
        request = decode_identifier(identifier, transfer_syntax)
    except Exception as exc:
        yield UNABLE_TO_PROCESS, None, f"cannot decode the identifier: {exc}"[:64]
        return
    if "QueryRetrieveLevel" not in request:
        yield IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, None, "Query/Retrieve Level (0008,0052) missing"
        return
    try:
        matches = find(model, request, relational)
        # 0xFF01 when some requested key can't be matched (PS3.4 C.4.1.1.4).
        pending = getattr(matches, "pending_status", PENDING)
        for match in matches:
            if cancelled():
                getattr(matches, "close", lambda: None)()
                yield CANCEL, None, ""
                return
            yield pending, encode_identifier(match, transfer_syntax), ""
    except FindError as exc:
        yield exc.status, None, exc.comment[:64]
        return
    except ValueError as exc:  # a request the matching rules refuse
        yield IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, None, str(exc)[:64]
        return
    except Exception as exc:
        log.exception("C-FIND failed")
        yield UNABLE_TO_PROCESS, None, f"query failed: {exc}"[:64]
        return
    yield dimse.SUCCESS, None, ""


class IdentifierMessage:
    """A request whose data set is a small identifier (C-FIND, C-MOVE, C-GET, N-ACTION): collected in
    memory, at most :data:`MAX_IDENTIFIER_BYTES`; :meth:`complete` is the subclass's."""

    __slots__ = ("_association", "_context", "_identifier", "_request")
    #: Names the request in the error when its identifier is too large.
    what = "identifier"

    def __init__(self, association: Association, request: dict[str, int | str], context: AcceptedContext) -> None:
        self._association = association
        self._request = request
        self._context = context
        self._identifier = bytearray()

    def receive(self, fragment: memoryview) -> None:
        """One fragment of the request identifier."""
        if len(self._identifier) + len(fragment) > MAX_IDENTIFIER_BYTES:
            raise ProtocolError(f"{self.what} larger than 1 MiB")
        self._identifier += fragment

    def abandon(self) -> None:
        """The association ended first: nothing to clean up."""


class FindRequest(IdentifierMessage):
    """One C-FIND-RQ on ``association``: its identifier, then the responses streamed to the peer."""

    __slots__ = ()
    what = "C-FIND identifier"

    def complete(self) -> None:
        """The identifier is complete: run the query and send each response."""
        association, context = self._association, self._context
        assert association.settings.find is not None and association.negotiation is not None
        message_id = int(self._request.get("MessageID", 0))
        for status, match, comment in responses(
            association.settings.find, context.abstract_syntax, bytes(self._identifier), context.transfer_syntax,
            association.cancel_requested, context.abstract_syntax in association.negotiation.relational_queries,
        ):
            command = dimse.encode_response(
                dimse.C_FIND_RSP, context.abstract_syntax, message_id, status,
                error_comment=comment, has_data_set=match is not None,
            )
            association.send(context.context_id, command, match)
        association.answered()
