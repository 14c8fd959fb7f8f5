"""One C-MOVE-RQ or C-GET-RQ on an association (PS3.4 C.4.2, C.4.3): the :class:`RetrieveRequest` message.

It collects the request identifier like :class:`~fastscp.net.findscp.FindRequest`
and, once complete, runs the sub-operations (:mod:`fastscp.net.movescp`: on an
association to the move destination; :mod:`fastscp.net.getscp`: C-STORE-RQs
on this association, through :meth:`Association.send_fragments` and
:meth:`Association.next_command`) while it sends each C-MOVE-RSP / C-GET-RSP.
"""

from __future__ import annotations

from fastscp.net import dimse, getscp, movescp
from fastscp.net.findscp import IdentifierMessage
from fastscp.net.pdu import ProtocolError


class RetrieveRequest(IdentifierMessage):
    """One C-MOVE-RQ or C-GET-RQ on ``association``: its identifier, then the sub-operations and responses."""

    __slots__ = ()
    what = "C-MOVE/C-GET identifier"

    def complete(self) -> None:
        """The identifier is complete: run the sub-operations, a pending response after each, then the final one."""
        association, context, request = self._association, self._context, self._request
        service, negotiation = association.settings.retrieve, association.negotiation
        assert service is not None and negotiation is not None
        message_id = int(request.get("MessageID", 0))
        relational = context.abstract_syntax in negotiation.relational_queries
        identifier = bytes(self._identifier)
        if request["CommandField"] == dimse.C_MOVE_RQ:
            rsp_field = dimse.C_MOVE_RSP
            originator = movescp.MoveRequest(service.ae_title, association.stats.calling_ae_title, message_id,
                                             association.settings.dimse_timeout)
            responses = movescp.responses(service, context.abstract_syntax, identifier, context.transfer_syntax,
                                          relational, str(request.get("MoveDestination", "")), originator,
                                          association.cancel_requested)
        else:
            rsp_field = dimse.C_GET_RSP
            peer_max_pdu = negotiation.peer_max_pdu
            session = getscp.GetSession(
                {cid: (cx.abstract_syntax, cx.transfer_syntax) for cid, cx in negotiation.contexts.items()
                 if cx.requestor_scp},
                association.send_fragments, self._next_command, max(peer_max_pdu - 6, 1) if peer_max_pdu else 0,
                priority=int(request.get("Priority", 0)),
            )
            responses = getscp.responses(service, context.abstract_syntax, identifier, context.transfer_syntax,
                                         relational, session, association.cancel_requested,
                                         association.stats.calling_ae_title)
        try:
            for response in responses:
                command = dimse.encode_response(
                    rsp_field, context.abstract_syntax, message_id, response.status,
                    error_comment=response.comment, has_data_set=response.identifier is not None,
                    suboperations=response.suboperations,
                )
                association.send(context.context_id, command, response.identifier)
        except getscp.ProtocolViolation as exc:
            raise ProtocolError(str(exc)) from None
        finally:
            responses.close()  # at once, whatever ended it: files fetched from other nodes go with it
        association.answered()

    def _next_command(self) -> tuple[int, dict[str, int | str]]:
        got = self._association.next_command()
        if got is None:
            raise ProtocolError("A-RELEASE-RQ while a C-GET sub-operation awaits its C-STORE-RSP")
        return got
