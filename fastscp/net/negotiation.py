"""Association negotiation as the acceptor (PS3.8 section 7.1 and annex D).

pynetdicom decodes the A-ASSOCIATE-RQ PDU, encodes the A-ASSOCIATE-AC PDU and
negotiates each presentation context and SCP/SCU role; this module decides
*what* to accept. No I/O: PDU bytes in, PDU bytes and accepted contexts out.

A modality proposes the same presentation contexts at every association, and
some open one association per image: each worker remembers the outcome of the
A-ASSOCIATE-RQs it accepted lately (:class:`AcceptedRequests`), so the same
bytes are not decoded and negotiated again.
"""

from __future__ import annotations

import collections
import dataclasses
import struct
import threading
from dataclasses import dataclass, field

from pydicom.uid import UID
from pynetdicom import __version__ as PYNETDICOM_VERSION
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SOPClassExtendedNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from fastscp.dicom.sopclasses import GET_SOP_CLASSES, SUPPORTED_TRANSFER_SYNTAXES, VERIFICATION_SOP_CLASS
from fastscp.dicom.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from fastscp.net.access import AccessPolicy

#: DICOM Application Context Name (PS3.7 A.2.1).
APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, reason/diagnostic.
REJECTED_PERMANENT = 1
REJECTED_TRANSIENT = 2
SOURCE_SERVICE_USER = 1
SOURCE_PROVIDER_ACSE = 2
SOURCE_PROVIDER_PRESENTATION = 3

REJECT_REASONS: dict[tuple[int, int], str] = {
    (SOURCE_SERVICE_USER, 1): "no reason given",
    (SOURCE_SERVICE_USER, 2): "application context name not supported",
    (SOURCE_SERVICE_USER, 3): "calling AE title not recognized",
    (SOURCE_SERVICE_USER, 7): "called AE title not recognized",
    (SOURCE_PROVIDER_ACSE, 1): "no reason given",
    (SOURCE_PROVIDER_ACSE, 2): "protocol version not supported",
    (SOURCE_PROVIDER_PRESENTATION, 1): "temporary congestion",
    (SOURCE_PROVIDER_PRESENTATION, 2): "local limit exceeded",
}

_RJ = struct.Struct(">BBIBBBB")


def encode_associate_rj(result: int, source: int, reason: int) -> bytes:
    """Encode an A-ASSOCIATE-RJ PDU."""
    return _RJ.pack(0x03, 0, 4, 0, result, source, reason)


#: Where an A-ASSOCIATE-RQ carries the Called and the Calling AE Title, and where the -AC echoes
#: them (PS3.8 9.3.2, 9.3.3).
CALLED_AE_TITLE = slice(10, 26)
CALLING_AE_TITLE = slice(26, 42)


def peek_ae_titles(pdu: bytes) -> tuple[str, str]:
    """Called and calling AE titles of an A-ASSOCIATE-RQ PDU, without decoding the rest."""
    if len(pdu) < CALLING_AE_TITLE.stop or pdu[0] != 0x01:
        return "", ""
    return (
        pdu[CALLED_AE_TITLE].decode("ascii", "replace").strip(),
        pdu[CALLING_AE_TITLE].decode("ascii", "replace").strip(),
    )


@dataclass(frozen=True)
class AcceptancePolicy:
    """What this Storage SCP accepts."""

    ae_title: str
    storage_sop_classes: frozenset[str]
    max_pdu_size: int
    check_called_aet: bool = False
    access: AccessPolicy = AccessPolicy()
    #: Query/Retrieve FIND, MOVE and GET models and Storage Commitment offered (empty: none of those services).
    query_sop_classes: frozenset[str] = frozenset()


@dataclass(frozen=True)
class AcceptedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntax: str
    #: The requestor took the SCP role (SCP/SCU Role Selection): C-GET sends it C-STORE-RQs here.
    requestor_scp: bool = False


@dataclass
class Negotiation:
    """The outcome of one A-ASSOCIATE-RQ."""

    calling_ae_title: str
    called_ae_title: str
    #: The PDU to send back: A-ASSOCIATE-AC or -RJ.
    response: bytes
    accepted: bool
    #: Why it was rejected, in PS3.8 words (empty when accepted).
    reject_reason: str = ""
    #: Accepted presentation contexts by context ID.
    contexts: dict[int, AcceptedContext] = field(default_factory=dict)
    #: The requestor's Maximum Length Received: our P-DATA-TF PDUs must not
    #: exceed it (0: no limit).
    peer_max_pdu: int = 0
    peer_implementation: str = ""
    #: Query/Retrieve FIND SOP classes for which the requestor asked for, and
    #: we agreed to, relational queries (SOP Class Extended Negotiation).
    relational_queries: frozenset[str] = frozenset()
    #: Refused presentation contexts: (abstract syntax UID, why), in request order.
    refused: list[tuple[str, str]] = field(default_factory=list)


#: Presentation context results other than acceptance (PS3.8 9.3.3.2).
CONTEXT_REFUSALS: dict[int, str] = {
    1: "user rejection",
    2: "no reason (provider rejection)",
    3: "abstract syntax not supported",
    4: "transfer syntaxes not supported",
}


def _reject(calling: str, called: str, result: int, source: int, reason: int, detail: str = "") -> Negotiation:
    why = REJECT_REASONS.get((source, reason), f"reason {reason}")
    return Negotiation(
        calling_ae_title=calling.strip(),
        called_ae_title=called.strip(),
        response=encode_associate_rj(result, source, reason),
        accepted=False,
        reject_reason=f"{why}: {detail}" if detail else why,
    )


#: What one A-ASSOCIATE-RQ may propose: pynetdicom spends ~15-70 us of the worker's CPU, with its GIL
#: held, on each item it decodes, so a 1 MiB request of 20,000 tiny presentation contexts took ~1 s
#: (and was accepted). Presentation context IDs are the odd numbers 1-255 (PS3.8 9.3.2.2): 128 at
#: most. A real requestor proposes a few transfer syntaxes per context, and in its User Information
#: at most a role selection and an extended negotiation per SOP class.
MAX_PRESENTATION_CONTEXTS = 128
MAX_TRANSFER_SYNTAXES = 4096
MAX_USER_ITEMS = 512
#: Top-level items besides the presentation contexts: the Application Context and the User Information.
MAX_OTHER_ITEMS = 8
_ITEM = struct.Struct(">BxH")
#: Where an A-ASSOCIATE-RQ's variable items start (PS3.8 Table 9-11: header, version, AE titles, reserved).
_VARIABLE_ITEMS = 74


def proposal_over_limits(pdu: bytes) -> str:
    """Why the A-ASSOCIATE-RQ ``pdu`` proposes more than a worker negotiates, from its item headers
    alone; "" if it does not. It stops at the first limit crossed, so it reads a few thousand item
    headers at most; a malformed length ends the count (the decoder then says what is wrong)."""
    contexts = syntaxes = user_items = others = 0
    end = len(pdu)
    pos = _VARIABLE_ITEMS
    while pos + 4 <= end:
        kind, length = _ITEM.unpack_from(pdu, pos)
        body, pos = pos + 4, min(pos + 4 + length, end)
        if kind == 0x20:  # Presentation Context: ID, 3 reserved bytes, then its sub-items
            contexts += 1
            if contexts > MAX_PRESENTATION_CONTEXTS:
                return f"more than {MAX_PRESENTATION_CONTEXTS} presentation contexts proposed"
            sub = body + 4
            while sub + 4 <= pos:
                sub_kind, sub_length = _ITEM.unpack_from(pdu, sub)
                sub += 4 + sub_length
                if sub_kind == 0x40:  # Transfer Syntax
                    syntaxes += 1
                    if syntaxes > MAX_TRANSFER_SYNTAXES:
                        return f"more than {MAX_TRANSFER_SYNTAXES} transfer syntaxes proposed"
        elif kind == 0x50:  # User Information
            sub = body
            while sub + 4 <= pos:
                sub += 4 + _ITEM.unpack_from(pdu, sub)[1]
                user_items += 1
                if user_items > MAX_USER_ITEMS:
                    return f"more than {MAX_USER_ITEMS} user information items"
        else:
            others += 1
            if others > MAX_OTHER_ITEMS:
                return f"more than {MAX_OTHER_ITEMS} items other than presentation contexts"
    return ""


def _acceptor_context(rq_context: PresentationContext, policy: AcceptancePolicy) -> list[PresentationContext]:
    """The acceptor context to negotiate one requested context against.

    pynetdicom picks the first transfer syntax in the *acceptor's* order; we
    list the requestor's own syntaxes in its order, so its preferred one that
    we support wins and a compressed dataset is never forced to decompress.
    """
    abstract = str(rq_context.abstract_syntax)
    if (
        abstract != VERIFICATION_SOP_CLASS
        and abstract not in policy.storage_sop_classes
        and abstract not in policy.query_sop_classes
    ):
        return []
    context = PresentationContext()
    context.abstract_syntax = UID(abstract)
    syntaxes = [ts for ts in rq_context.transfer_syntax if str(ts) in SUPPORTED_TRANSFER_SYNTAXES]
    # An unsupported-only context still needs an acceptor entry, so that it is
    # refused as "transfer syntaxes not supported" rather than "abstract syntax".
    context.transfer_syntax = syntaxes or ["1.2.840.10008.1.2"]
    # SCP/SCU Role Selection: the requestor may act as SCU (it sends us
    # C-STORE / C-ECHO / C-FIND), and as SCP of the storage SOP classes only
    # when C-GET is offered (its C-STORE sub-operations go to the requestor).
    context.scu_role = True
    context.scp_role = abstract in policy.storage_sop_classes and not GET_SOP_CLASSES.isdisjoint(
        policy.query_sop_classes)
    return [context]


def _echoed_as_sent(field: bytes) -> bool:
    """A Calling AE Title field that a negotiation echoes byte for byte: printable ASCII but the
    backslash, no leading space, not all spaces (pynetdicom strips leading spaces when it decodes)."""
    title = field.rstrip(b" ")
    return bool(title) and title[0] != 0x20 and title.isascii() and title.decode().isprintable() and b"\\" not in title


class AcceptedRequests:
    """The last :data:`ACCEPTED_KEPT` A-ASSOCIATE-RQs accepted (up to :data:`ACCEPTED_MAX_PDU` bytes
    each), with their outcome: an outcome is a function of the PDU's bytes and the policy, but for
    the Calling AE Title, which only the access check reads (it runs again at every association) and
    the A-ASSOCIATE-AC echoes. So a request is remembered without its Calling AE Title: the
    modalities of one make and the senders of one PACS, which differ in that alone, share an entry.

    PERF: pynetdicom validates every UID of the request several times over: ~70 us per
    presentation context, so ~1 ms for 12 contexts and ~9 ms for the ~120 that dcmtk's
    storescu proposes by default, with the worker's GIL held (bench/test_bench_negotiation.py).
    A remembered outcome costs a dictionary lookup and a copy (~2-4 us).
    """

    def __init__(self, kept: int, max_pdu: int) -> None:
        self.kept = kept
        self.max_pdu = max_pdu
        self._lock = threading.Lock()
        #: PDU bytes without the Calling AE Title -> (the policy it was negotiated under, outcome).
        self._outcomes: collections.OrderedDict[bytes, tuple[AcceptancePolicy, Negotiation]] = \
            collections.OrderedDict()

    @staticmethod
    def _key(pdu: bytes) -> bytes:
        return pdu[: CALLING_AE_TITLE.start] + pdu[CALLING_AE_TITLE.stop :]

    def get(self, pdu: bytes, policy: AcceptancePolicy, peer_ip: str) -> Negotiation | None:
        """A copy of the outcome remembered for ``pdu`` under ``policy``, for its Calling AE Title,
        if the access check passes for it and ``peer_ip`` (a refusal is left to :func:`negotiate`,
        which says why); else None."""
        if len(pdu) > self.max_pdu or not _echoed_as_sent(calling := pdu[CALLING_AE_TITLE]):
            return None  # never kept (put): not hashed for the lookup either
        with self._lock:
            key = self._key(pdu)
            entry = self._outcomes.get(key)
            if entry is None or entry[0] is not policy:
                return None
            self._outcomes.move_to_end(key)
        title = calling.decode("ascii").strip()
        if policy.access.check(title, peer_ip):
            return None
        # The caller may turn it into a rejection (admission): its own copy.
        outcome = entry[1]
        response = outcome.response[: CALLING_AE_TITLE.start] + calling + outcome.response[CALLING_AE_TITLE.stop :]
        return dataclasses.replace(outcome, calling_ae_title=title, response=response)

    def put(self, pdu: bytes, policy: AcceptancePolicy, outcome: Negotiation) -> None:
        calling = pdu[CALLING_AE_TITLE]
        if (len(pdu) > self.max_pdu or not _echoed_as_sent(calling)
                or outcome.response[CALLING_AE_TITLE] != calling):
            return
        with self._lock:
            key = self._key(pdu)
            self._outcomes[key] = (policy, dataclasses.replace(outcome))
            self._outcomes.move_to_end(key)
            while len(self._outcomes) > self.kept:
                self._outcomes.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._outcomes.clear()

    def __len__(self) -> int:
        return len(self._outcomes)


#: Requests a worker remembers, and the largest it remembers (bytes): 120 contexts take ~8 KB.
#: An entry holds ~50 KB with its outcome (120 contexts), at most ~90 KB (128 contexts, the most a
#: request may propose: MAX_PRESENTATION_CONTEXTS): at most ~6 MB, however a peer varies its requests.
ACCEPTED_KEPT = 64
ACCEPTED_MAX_PDU = 32 * 1024
ACCEPTED = AcceptedRequests(ACCEPTED_KEPT, ACCEPTED_MAX_PDU)


def negotiate(pdu: bytes, policy: AcceptancePolicy, peer_ip: str = "") -> Negotiation:
    """Negotiate an association from the bytes of an A-ASSOCIATE-RQ PDU.

    Raises
    ------
    ValueError
        If the PDU can't be decoded (the caller aborts the association).
    """
    remembered = ACCEPTED.get(pdu, policy, peer_ip)
    if remembered is not None:
        return remembered
    excess = proposal_over_limits(pdu)
    if excess:
        called, calling = peek_ae_titles(pdu)
        return _reject(calling, called, REJECTED_PERMANENT, SOURCE_PROVIDER_PRESENTATION, 2, excess)
    rq_pdu = A_ASSOCIATE_RQ()
    try:
        rq_pdu.decode(pdu)
        rq = rq_pdu.to_primitive()
    except Exception as exc:  # pynetdicom raises a variety on malformed PDUs
        raise ValueError(f"malformed A-ASSOCIATE-RQ: {exc}") from exc

    calling, called = str(rq.calling_ae_title), str(rq.called_ae_title).strip()
    if str(rq.application_context_name) != APPLICATION_CONTEXT_NAME:
        return _reject(calling, called, REJECTED_PERMANENT, SOURCE_SERVICE_USER, 2)
    denied = policy.access.check(calling, peer_ip)
    if denied:
        return _reject(calling, called, REJECTED_PERMANENT, SOURCE_SERVICE_USER, 3, denied)
    if policy.check_called_aet and called != policy.ae_title:
        return _reject(calling, called, REJECTED_PERMANENT, SOURCE_SERVICE_USER, 7,
                       f"called {called!r}, we are {policy.ae_title!r}")

    peer_max_pdu = 0
    peer_implementation = ""
    roles: dict[UID, tuple[bool | None, bool | None]] = {}
    extended: dict[str, bytes] = {}
    for item in rq.user_information:
        if isinstance(item, MaximumLengthNotification):
            peer_max_pdu = int(item.maximum_length_received or 0)
        elif isinstance(item, ImplementationVersionNameNotification):
            peer_implementation = str(item.implementation_version_name)
        elif isinstance(item, SOPClassExtendedNegotiation):
            extended[str(item.sop_class_uid)] = bytes(item.service_class_application_information or b"")
        elif type(item).__name__ == "SCP_SCU_RoleSelectionNegotiation":
            roles[UID(item.sop_class_uid)] = (item.scu_role, item.scp_role)

    results: list[PresentationContext] = []
    reply_roles = []
    for rq_context in rq.presentation_context_definition_list:
        # PS3.8 9.3.2.2: one abstract syntax and one or more transfer syntaxes; pynetdicom's negotiation
        # assumes both (without an abstract syntax it raised TypeError, logged as a bug of ours).
        context_id = rq_context.context_id
        if rq_context.abstract_syntax is None:
            raise ValueError(f"malformed A-ASSOCIATE-RQ: presentation context {context_id} has no abstract syntax")
        if not rq_context.transfer_syntax:
            raise ValueError(f"malformed A-ASSOCIATE-RQ: presentation context {context_id} has no transfer syntax")
        result, role_items = negotiate_as_acceptor(
            [rq_context], _acceptor_context(rq_context, policy), roles
        )
        results.extend(result)
        reply_roles.extend(role_items)

    ac = A_ASSOCIATE()
    ac.application_context_name = UID(APPLICATION_CONTEXT_NAME)
    ac.calling_ae_title = rq.calling_ae_title
    ac.called_ae_title = rq.called_ae_title
    ac.result = 0x00
    ac.result_source = 0x01
    ac.presentation_context_definition_results_list = results
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = policy.max_pdu_size
    impl_uid = ImplementationClassUIDNotification()
    impl_uid.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
    impl_name = ImplementationVersionNameNotification()
    impl_name.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    accepted_syntaxes = {str(cx.abstract_syntax) for cx in results if cx.result == 0x00}
    relational, reply_extended = _relational_queries(extended, policy.query_sop_classes & accepted_syntaxes)
    ac.user_information = [max_length, impl_uid, impl_name, *reply_roles, *reply_extended]

    ac_pdu = A_ASSOCIATE_AC()
    ac_pdu.from_primitive(ac)
    contexts = {
        int(cx.context_id): AcceptedContext(
            int(cx.context_id), str(cx.abstract_syntax), str(cx.transfer_syntax[0]), bool(cx.as_scu)
        )
        for cx in results
        if cx.result == 0x00
    }
    refused = [
        (str(cx.abstract_syntax), CONTEXT_REFUSALS.get(int(cx.result or 0), f"result {cx.result}"))
        for cx in results
        if cx.result != 0x00
    ]
    outcome = Negotiation(
        calling_ae_title=calling.strip(),
        called_ae_title=called,
        response=ac_pdu.encode(),
        accepted=True,
        contexts=contexts,
        peer_max_pdu=peer_max_pdu,
        peer_implementation=peer_implementation,
        relational_queries=relational,
        refused=refused,
    )
    ACCEPTED.put(pdu, policy, outcome)
    return outcome


def _relational_queries(
    requested: dict[str, bytes], find_classes: frozenset[str]
) -> tuple[frozenset[str], list[SOPClassExtendedNegotiation]]:
    """The FIND SOP classes to answer relational queries for, and the reply items.

    Query/Retrieve extended negotiation (PS3.4 C.5.1.1.1): byte 1 is
    relational-queries (1 = asked for); the later bytes (combined date-time
    matching, fuzzy semantic matching, timezone adjustment...) are not
    supported and are answered 0.
    """
    agreed = []
    replies = []
    for uid, info in requested.items():
        if uid in find_classes and info[:1] == b"\x01":
            agreed.append(uid)
            reply = SOPClassExtendedNegotiation()
            reply.sop_class_uid = UID(uid)
            reply.service_class_application_information = b"\x01" + bytes(len(info) - 1)
            replies.append(reply)
    return frozenset(agreed), replies


__all__ = ["PYNETDICOM_VERSION", "negotiate", "encode_associate_rj", "peek_ae_titles"]
