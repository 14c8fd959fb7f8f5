"""Storage Commitment Push Model SCP (PS3.4 Annex J): N-ACTION in, N-EVENT-REPORT out.

The requester asks (N-ACTION-RQ, Action Type ID 1) whether we have taken
responsibility for a list of SOP instances (Referenced SOP Sequence, under
a Transaction UID). The N-ACTION-RSP goes at once; the answer follows as an
N-EVENT-REPORT-RQ with Event Type ID 1 (all committed) or 2 (some failed),
its Referenced SOP Sequence listing the committed instances and its Failed
SOP Sequence the others with a Failure Reason (PS3.4 J.3.3.1.1):

- an instance is committed only when it is in the index with the SOP class
  the requester names, and its file and its folder have been fsynced (done
  here, whatever ``storage.fsync`` is);
- 0x0112 No such object instance: not in the index (after waiting up to
  :data:`INDEX_WAIT` seconds for the indexer to commit it), or its file
  is gone;
- 0x0119 Class / Instance conflict: stored with another SOP class;
- 0x0110 Processing failure: the index can't be asked, or the fsync failed.

The report goes on the same association (the association code sends it
and reads its N-EVENT-REPORT-RSP); when the requester released it first,
on a new association to the requester's address in
``retrieve.move_destinations`` (:func:`send_on_new_association`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.dataset import Dataset

from fastscp.dicom.sopclasses import STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_PUSH_INSTANCE
from fastscp.net import dimse
from fastscp.net.findscp import IdentifierMessage, decode_identifier, encode_identifier
from fastscp.net.pdu import PeerClosed, ProtocolError
from fastscp.net.retrievescp import Destination
from fastscp.query.cfind import FindError
from fastscp.query.retrieve import Instance, Lookup

log = logging.getLogger("fastscp.commitment")

#: Action Type ID of "Request Storage Commitment"; Event Type IDs of the report (PS3.4 J.3.2, J.3.3).
REQUEST_COMMITMENT = 1
ALL_COMMITTED = 1
SOME_FAILED = 2

# Failure Reasons (PS3.4 J.3.3.1.1.1 / C.14).
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119

# N-ACTION statuses (PS3.7 10.1.4.1.10).
NO_SUCH_ACTION_TYPE = 0x0123
MISSING_ATTRIBUTE = 0x0120
INVALID_ARGUMENT_VALUE = 0x0115
NO_SUCH_SOP_INSTANCE = 0x0112

#: Seconds to wait for instances not in the index yet: a C-STORE-RSP goes out
#: before its record is committed (database.batch_interval, 0.2 s by default).
INDEX_WAIT = 5.0


@dataclass(frozen=True)
class CommitmentService:
    """What the Storage Commitment SCP needs (None in ServiceSettings: not offered)."""

    lookup: Lookup
    #: Our AE title: the calling AE title of a report sent on a new association.
    ae_title: str
    #: Where requesters listen (retrieve.move_destinations), for reports on a new association.
    addresses: dict[str, Destination]


class CommitmentRequest(IdentifierMessage):
    """One N-ACTION-RQ on ``association``: its Action Information, then the N-ACTION-RSP and the report."""

    __slots__ = ()
    what = "N-ACTION Action Information"

    def complete(self) -> None:
        """N-ACTION-RSP at once, then the N-EVENT-REPORT on this association (else on a new one)."""
        association, context, request = self._association, self._context, self._request
        service = association.settings.commitment
        assert service is not None
        decoded = decode_request(request, bytes(self._identifier), context.transfer_syntax)
        status, comment = (dimse.SUCCESS, "") if isinstance(decoded, CommitRequest) else decoded
        association.send(context.context_id, dimse.encode_response(
            dimse.N_ACTION_RSP, STORAGE_COMMITMENT_PUSH, int(request.get("MessageID", 0)), status,
            STORAGE_COMMITMENT_PUSH_INSTANCE, comment))
        if not isinstance(decoded, CommitRequest):
            association.answered()
            return
        event_type, report = commit(decoded, service.lookup)
        association.send(context.context_id,
                         dimse.encode_request(dimse.N_EVENT_REPORT_RQ, STORAGE_COMMITMENT_PUSH,
                                              STORAGE_COMMITMENT_PUSH_INSTANCE, 1, event_type_id=event_type),
                         encode_identifier(report, context.transfer_syntax))
        answer = association.next_command()
        if answer is None:
            # Released before it answered (PS3.4 J.3.3): the report goes on a new association.
            association.answer_release()
            send_on_new_association(service, association.stats.calling_ae_title, event_type, report,
                                    association.settings.dimse_timeout)
            raise PeerClosed("released")
        _context_id, response = answer
        if response["CommandField"] != dimse.N_EVENT_REPORT_RSP or response.get("MessageIDBeingRespondedTo") != 1:
            raise ProtocolError(f"command 0x{int(response['CommandField']):04X} where an N-EVENT-REPORT-RSP "
                                f"was awaited")
        if response.get("Status") != dimse.SUCCESS:
            log.warning("storage commitment %s: %r answered the report with status 0x%04X", decoded.transaction_uid,
                        association.stats.calling_ae_title, int(response.get("Status", 0xFFFF)))
        association.answered()


class CommitRequest:
    """A decoded N-ACTION-RQ: its Transaction UID and (SOP Class UID, SOP Instance UID) references."""

    def __init__(self, transaction_uid: str, references: list[tuple[str, str]]) -> None:
        self.transaction_uid = transaction_uid
        self.references = references


def decode_request(command: dict[str, int | str], data: bytes,
                   transfer_syntax: str) -> CommitRequest | tuple[int, str]:
    """The request, or the N-ACTION-RSP failure status and comment to answer instead."""
    if command.get("ActionTypeID") != REQUEST_COMMITMENT:
        return NO_SUCH_ACTION_TYPE, f"Action Type ID {command.get('ActionTypeID')} (only 1 is defined)"
    if command.get("RequestedSOPInstanceUID") != STORAGE_COMMITMENT_PUSH_INSTANCE:
        return NO_SUCH_SOP_INSTANCE, "Requested SOP Instance UID is not the well-known 1.2.840.10008.1.20.1.1"
    try:
        ds = decode_identifier(data, transfer_syntax)
    except Exception as exc:
        return PROCESSING_FAILURE, f"cannot decode the Action Information: {exc}"[:64]
    transaction = str(ds.get("TransactionUID", "") or "")
    if not transaction:
        return MISSING_ATTRIBUTE, "Transaction UID (0008,1195) missing"
    references = []
    for item in ds.get("ReferencedSOPSequence", None) or []:
        sop_class = str(item.get("ReferencedSOPClassUID", ""))
        sop_instance = str(item.get("ReferencedSOPInstanceUID", ""))
        if not sop_class or not sop_instance:
            return MISSING_ATTRIBUTE, "a Referenced SOP Sequence item without its UIDs"
        references.append((sop_class, sop_instance))
    if not references:
        return MISSING_ATTRIBUTE, "Referenced SOP Sequence (0008,1199) missing or empty"
    return CommitRequest(transaction, references)


def _durable(instance: Instance) -> None:
    """fsync the file and its folder (storage.fsync: never leaves that to the kernel)."""
    for path, flags in ((instance.path, os.O_RDONLY), (os.path.dirname(instance.path), os.O_RDONLY | os.O_DIRECTORY)):
        fd = os.open(path, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def commit(request: CommitRequest, lookup: Lookup, *, wait: float = INDEX_WAIT,
           clock: Callable[[], float] = time.monotonic) -> tuple[int, Dataset]:
    """(Event Type ID, Event Information) of the N-EVENT-REPORT that answers ``request``."""
    reasons: dict[str, int] = {}
    found: dict[str, Instance] = {}
    deadline = clock() + wait
    wanted = list(dict.fromkeys(uid for _cls, uid in request.references))
    while True:
        try:
            found.update(lookup([uid for uid in wanted if uid not in found]))
        except FindError as exc:
            log.warning("storage commitment %s: %s", request.transaction_uid, exc.comment)
            reasons.update((uid, PROCESSING_FAILURE) for uid in wanted if uid not in found)
            break
        if len(found) == len(wanted) or clock() >= deadline:
            break
        time.sleep(0.1)
    event, failed, committed_items = Dataset(), [], []
    for sop_class, uid in request.references:
        reason = reasons.get(uid, 0)
        instance = found.get(uid)
        if not reason:
            if instance is None:
                reason = NO_SUCH_OBJECT_INSTANCE
            elif instance.sop_class_uid != sop_class:
                reason = CLASS_INSTANCE_CONFLICT
            else:
                try:
                    _durable(instance)
                except FileNotFoundError:
                    reason = NO_SUCH_OBJECT_INSTANCE
                except OSError as exc:
                    log.error("storage commitment: cannot fsync %s: %s", instance.path, exc)
                    reason = PROCESSING_FAILURE
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = uid
        if reason:
            item.FailureReason = reason
            failed.append(item)
        else:
            committed_items.append(item)
    event.TransactionUID = request.transaction_uid
    if committed_items:
        event.ReferencedSOPSequence = committed_items
    if failed:
        event.FailedSOPSequence = failed
    log.info("storage commitment %s: %d committed, %d failed", request.transaction_uid, len(committed_items),
             len(failed))
    return (SOME_FAILED if failed else ALL_COMMITTED), event


def send_on_new_association(service: CommitmentService, requester: str, event_type: int, report: Dataset,
                            timeout: float) -> bool:
    """Send the N-EVENT-REPORT on an association of our own to ``requester``; True if it was answered.

    We request the SCP role for Storage Commitment (SCP/SCU Role Selection,
    PS3.4 J.3.3: the SCP that reports on a new association is its requestor).
    """
    from pynetdicom import build_role

    from fastscp.net.scu import SCUError, _new_ae, _open

    address = service.addresses.get(requester)
    if address is None:
        log.error("storage commitment report for %r not delivered: the requester released the association "
                  "and has no address in retrieve.move_destinations", requester)
        return False
    ae = _new_ae(service.ae_title, timeout)
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
    try:
        assoc = _open(ae, address.host, address.port, requester, address.tls,
                      ext_neg=[build_role(STORAGE_COMMITMENT_PUSH, scp_role=True)])
    except SCUError as exc:
        log.error("storage commitment report for %r not delivered: %s", requester, exc)
        return False
    try:
        status, _reply = assoc.send_n_event_report(report, event_type, STORAGE_COMMITMENT_PUSH,
                                           STORAGE_COMMITMENT_PUSH_INSTANCE)
    finally:
        if assoc.is_established:
            assoc.release()
    answered = "Status" in status and int(status.Status) == 0
    if answered:
        log.info("storage commitment report for %r delivered on a new association", requester)
    else:
        log.error("storage commitment report for %r: no success response on the new association (%s)", requester,
                  f"status 0x{int(status.Status):04X}" if "Status" in status else "none")
    return answered
