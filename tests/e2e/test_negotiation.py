"""Association negotiation as a requestor sees it (fastscp/net/negotiation.py):
the A-ASSOCIATE-AC and -RJ PDUs decoded by pynetdicom, responses fragmented to
the requestor's Maximum Length on a real server, the rejection reasons
``fastscp echo`` names when a peer rejects, and the AE titles the supervisor
reads from a request it must reject unread."""

from __future__ import annotations

import collections
import io
import random
import socket
import struct
import threading
import warnings

import pytest
from pydicom.uid import UID
from pynetdicom.dsutils import decode
from pynetdicom.pdu import A_ASSOCIATE_AC
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    SOPClassExtendedNegotiation,
)

from fastscp.dicom.sopclasses import STORAGE_SOP_CLASSES
from fastscp.dicom.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from fastscp.net import dimse
from fastscp.net.access import build_access_policy
from fastscp.net.negotiation import AcceptancePolicy, negotiate, peek_ae_titles
from fastscp.net.scu import SCUError, echo
from tests.rawscu import associate_rq, command_set, p_data, raw_associate_rq

CT, MR, US = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.6.1"
EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
VERIFICATION = "1.2.840.10008.1.1"
STUDY_FIND, PATIENT_FIND = "1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.1.2.1.1"
POLICY = AcceptancePolicy(ae_title="FASTSCP", storage_sop_classes=frozenset(STORAGE_SOP_CLASSES.values()),
                          max_pdu_size=262144)


def _ac(response: bytes) -> A_ASSOCIATE:
    assert response[0] == 0x02, f"expected A-ASSOCIATE-AC, got PDU type {response[0]}"
    pdu = A_ASSOCIATE_AC()
    pdu.decode(response)
    return pdu.to_primitive()


def test_contexts_roles_and_refusals_of_one_request() -> None:
    pdu = associate_rq([(CT, [EXPLICIT]), (MR, [EXPLICIT]), (US, [IMPLICIT, EXPLICIT]), ("1.2.3", [EXPLICIT]),
                        (CT, ["1.2.3.4"])], max_length=16384,
                       roles={CT: (True, False), MR: (False, True), US: (True, True)})
    result = negotiate(pdu, POLICY)
    assert result.accepted and result.reject_reason == ""
    assert (result.calling_ae_title, result.called_ae_title, result.peer_max_pdu) == ("RAWSCU", "FASTSCP", 16384)
    assert {i: (c.abstract_syntax, c.transfer_syntax) for i, c in result.contexts.items()} == {
        1: (CT, EXPLICIT), 5: (US, IMPLICIT)}
    # Why each other context was refused, in request order (PS3.8 9.3.3.2), for the warning log line.
    assert result.refused == [(MR, "user rejection"), ("1.2.3", "abstract syntax not supported"),
                              (CT, "transfer syntaxes not supported")]
    ac = _ac(result.response)
    assert [(c.context_id, c.result) for c in ac.presentation_context_definition_results_list] == [
        (1, 0), (3, 1), (5, 0), (7, 3), (9, 4)]
    items = {type(item).__name__: item for item in ac.user_information}
    assert items["MaximumLengthNotification"].maximum_length_received == 262144
    assert items["ImplementationClassUIDNotification"].implementation_class_uid == IMPLEMENTATION_CLASS_UID
    assert items["ImplementationVersionNameNotification"].implementation_version_name == IMPLEMENTATION_VERSION_NAME
    # SCP/SCU Role Selection (PS3.7 D.3.3.4): the requestor may be SCU, never SCP; no reply for a refused context.
    roles = [(str(i.sop_class_uid), i.scu_role, i.scp_role) for i in ac.user_information
             if isinstance(i, SCP_SCU_RoleSelectionNegotiation)]
    assert roles == [(CT, True, False), (US, True, False)]


def test_the_called_ae_title_is_checked_only_when_asked() -> None:
    pdu = associate_rq([(CT, [EXPLICIT])], aec="ANYONE")
    assert negotiate(pdu, POLICY).accepted
    checked_policy = AcceptancePolicy(ae_title="FASTSCP", storage_sop_classes=POLICY.storage_sop_classes,
                                      max_pdu_size=0, check_called_aet=True)
    checked = negotiate(pdu, checked_policy)
    assert not checked.accepted
    assert checked.reject_reason == "called AE title not recognized: called 'ANYONE', we are 'FASTSCP'"
    assert checked.response == bytes([3, 0, 0, 0, 0, 4, 0, 1, 1, 7])  # rejected permanent, service user, reason 7
    assert (checked.calling_ae_title, checked.called_ae_title, checked.contexts) == ("RAWSCU", "ANYONE", {})
    # Our own title passes the check.
    assert negotiate(associate_rq([(CT, [EXPLICIT])], aec="FASTSCP"), checked_policy).accepted


def test_a_calling_ae_title_not_allowed_is_rejected_saying_why() -> None:
    policy = AcceptancePolicy(ae_title="FASTSCP", storage_sop_classes=POLICY.storage_sop_classes, max_pdu_size=0,
                              access=build_access_policy(["MODALITY"]))
    assert negotiate(associate_rq([(CT, [EXPLICIT])], aet="MODALITY"), policy, "127.0.0.1").accepted
    result = negotiate(associate_rq([(CT, [EXPLICIT])], aet="STRANGER"), policy, "127.0.0.1")
    assert not result.accepted
    assert result.response == bytes([3, 0, 0, 0, 0, 4, 0, 1, 1, 3])
    assert result.reject_reason == ("calling AE title not recognized: "
                                    "calling AE title 'STRANGER' is not in access.allowed_calling_aets")


def _request_with(items: list[object], contexts: list[tuple[str, list[str]]]) -> bytes:
    return associate_rq(contexts, aet="FINDSCU", user_information=items)


def _extended(uid: str, info: bytes) -> SOPClassExtendedNegotiation:
    item = SOPClassExtendedNegotiation()
    item.sop_class_uid, item.service_class_application_information = uid, info
    return item


def test_relational_queries_are_agreed_only_for_find_classes_that_ask_and_are_accepted() -> None:
    policy = AcceptancePolicy(ae_title="FASTSCP", storage_sop_classes=frozenset({CT}), max_pdu_size=0,
                              query_sop_classes=frozenset({STUDY_FIND, PATIENT_FIND}))
    length = MaximumLengthNotification()
    length.maximum_length_received = 0  # no limit
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = "OTHER_1"
    pdu = _request_with([length, version,
                         _extended(STUDY_FIND, b"\x01\x01\x01"),  # relational, and two options we lack
                         _extended(PATIENT_FIND, b"\x00"),         # not asked
                         _extended(CT, b"\x01"),                    # not a FIND class
                         _extended("1.2.840.10008.5.1.4.1.2.3.1", b"\x01")],  # FIND, but not proposed
                        [(STUDY_FIND, [EXPLICIT]), (PATIENT_FIND, [EXPLICIT]), (CT, [EXPLICIT])])
    result = negotiate(pdu, policy)
    assert result.relational_queries == frozenset({STUDY_FIND})
    assert result.peer_max_pdu == 0
    replies = [(str(i.sop_class_uid), i.service_class_application_information) for i in _ac(result.response)
               .user_information if isinstance(i, SOPClassExtendedNegotiation)]
    assert replies == [(STUDY_FIND, b"\x01\x00\x00")]


def test_a_request_without_maximum_length_means_no_limit() -> None:
    uid = ImplementationClassUIDNotification()
    uid.implementation_class_uid = UID("1.2.3.4")
    result = negotiate(_request_with([uid], [(VERIFICATION, [IMPLICIT])]), POLICY)
    assert result.accepted and result.peer_max_pdu == 0


# -- on a real server: responses fit the requestor's Maximum Length -------------------------------


def _read_pdu(reader) -> tuple[int, bytes]:  # type: ignore[no-untyped-def]
    pdu_type, length = struct.unpack(">BxI", reader.read(6))
    return pdu_type, reader.read(length)


@pytest.mark.parametrize("max_length", [0, 40])
def test_a_server_fragments_its_responses_to_the_requestors_maximum_length(server, max_length: int) -> None:  # type: ignore[no-untyped-def]
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock, sock.makefile("rb") as reader:
        sock.sendall(associate_rq([(VERIFICATION, [IMPLICIT])], max_length=max_length))
        assert _read_pdu(reader)[0] == 0x02
        sock.sendall(p_data(1, command_set(dimse.C_ECHO_RQ, sop_class=VERIFICATION, message_id=9), command=True,
                            last=True))
        command, bodies = b"", []
        while True:
            pdu_type, body = _read_pdu(reader)
            assert pdu_type == 0x04
            bodies.append(len(body))
            length, _context, control = struct.unpack_from(">IBB", body)
            assert 4 + length == len(body), "one PDV per PDU"
            command += body[6:]
            if control & 2:
                break
        sock.sendall(struct.pack(">BxI", 0x05, 4) + bytes(4))
        assert _read_pdu(reader)[0] == 0x06
    response = decode(io.BytesIO(command), True, True)
    assert (response.CommandField, response.MessageIDBeingRespondedTo, response.Status) == (0x8030, 9, 0)
    if max_length:
        # Maximum Length Received bounds a P-DATA-TF PDU's variable field (PS3.8 D.1).
        assert max(bodies) <= max_length and len(bodies) == -(-len(command) // (max_length - 6))
    else:
        assert bodies == [len(command) + 6]


# -- a peer's rejection, as `fastscp echo` reports it --------------------------------------------

#: (result, source, reason) of an A-ASSOCIATE-RJ and its words in PS3.8 9.3.4.
REJECTIONS = [(1, 1, 1, "no reason given"), (1, 1, 2, "application context name not supported"),
              (1, 1, 3, "calling AE title not recognized"), (1, 1, 7, "called AE title not recognized"),
              (2, 2, 1, "no reason given"), (1, 2, 2, "protocol version not supported"),
              (2, 3, 1, "temporary congestion"), (2, 3, 2, "local limit exceeded")]


def test_echo_names_the_reason_a_peer_rejects_with() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.settimeout(0.2)
    answer: list[bytes] = []
    stop = threading.Event()

    def peer() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn, conn.makefile("rb") as reader:
                try:
                    assert _read_pdu(reader)[0] == 0x01
                    conn.sendall(answer[-1])
                    conn.settimeout(30)
                    while conn.recv(4096):  # until the requestor closes
                        pass
                except OSError:
                    pass

    thread = threading.Thread(target=peer, daemon=True)
    thread.start()
    try:
        for result, source, reason, why in REJECTIONS:
            answer.append(bytes([0x03, 0, 0, 0, 0, 4, 0, result, source, reason]))
            for _attempt in range(5):
                with pytest.raises(SCUError) as error:
                    echo("127.0.0.1", port, aec="PEER", timeout=30)
                # pynetdicom's requestor now and then reports a rejection as an abort (its DUL closes the
                # socket before its main thread looks; see rawscu.RawSCU.rejection): ask again.
                if "(aborted" not in str(error.value):
                    break
            assert str(error.value) == f"no association with PEER at 127.0.0.1:{port} (rejected: {why})"
    finally:
        stop.set()
        thread.join(30)
        listener.close()
    assert not thread.is_alive()


# -- the supervisor's look at a request it rejects unread -------------------------------------------


def test_the_ae_titles_of_a_request_are_read_from_its_fixed_fields() -> None:
    pdu = associate_rq([(CT, [EXPLICIT])], aet="CALLING-16-CHARS", aec="CALLED--16-CHARS")
    assert peek_ae_titles(pdu) == ("CALLED--16-CHARS", "CALLING-16-CHARS")
    assert peek_ae_titles(pdu[:42]) == ("CALLED--16-CHARS", "CALLING-16-CHARS")  # the fixed fields suffice
    assert peek_ae_titles(associate_rq([(CT, [EXPLICIT])], aet="A", aec="B")) == ("B", "A")
    assert peek_ae_titles(pdu[:41]) == ("", "")
    assert peek_ae_titles(b"\x02" + pdu[1:]) == ("", "")  # an A-ASSOCIATE-AC is no request


# -- what one request may propose (negotiation.proposal_over_limits) --------------------------------

ROLE = (0x54, struct.pack(">H", len(CT)) + CT.encode() + b"\x01\x00")  # SCP/SCU Role Selection: SCU


def _contexts(count: int, syntaxes: int = 1) -> list[tuple[int, str, list[str]]]:
    return [((2 * i + 1) % 256, CT, [EXPLICIT] * syntaxes) for i in range(count)]


@pytest.mark.parametrize(("pdu", "why"), [
    (raw_associate_rq(_contexts(129)), "more than 128 presentation contexts proposed"),
    (raw_associate_rq(_contexts(20_000)), "more than 128 presentation contexts proposed"),
    (raw_associate_rq(_contexts(128, 33)), "more than 4096 transfer syntaxes proposed"),
    (raw_associate_rq(_contexts(1), [ROLE] * 512), "more than 512 user information items"),
    (raw_associate_rq(_contexts(1), other_items=8), "more than 8 items other than presentation contexts"),
], ids=["129 contexts", "20000 contexts", "4097 syntaxes", "513 user items", "9 other items"])
def test_a_request_proposing_too_much_is_rejected_before_it_is_decoded(pdu: bytes, why: str) -> None:
    """pynetdicom spends tens of us on each item with the worker's GIL held: a 360 KB request of
    20,000 contexts took ~1 s and was accepted. Rejected permanently, "local limit exceeded"."""
    result = negotiate(pdu, POLICY)
    assert not result.accepted
    assert result.response == bytes([3, 0, 0, 0, 0, 4, 0, 1, 3, 2])
    assert result.reject_reason == f"local limit exceeded: {why}"
    assert (result.calling_ae_title, result.called_ae_title) == ("RAWSCU", "FASTSCP")


def test_a_request_at_the_limits_is_negotiated() -> None:
    # 128 contexts of 32 syntaxes (4,096), 511 role selections and the Maximum Length (512 items).
    result = negotiate(raw_associate_rq(_contexts(128, 32), [ROLE] * 511, other_items=7), POLICY)
    assert result.accepted and len(result.contexts) == 128


@pytest.mark.parametrize(("context", "missing"), [((1, None, [EXPLICIT]), "abstract syntax"),
                                                  ((1, CT, []), "transfer syntax")])
def test_a_context_without_its_syntaxes_is_malformed(context: tuple[int, str | None, list[str]],
                                                     missing: str) -> None:
    """PS3.8 9.3.2.2. Without an abstract syntax pynetdicom's negotiation raised TypeError, which the
    association logged as a bug of ours with its traceback."""
    with pytest.raises(ValueError, match=f"^malformed A-ASSOCIATE-RQ: presentation context 1 has no {missing}$"):
        negotiate(raw_associate_rq([(3, CT, [EXPLICIT]), context]), POLICY)


def test_a_mutated_request_is_negotiated_or_malformed_never_a_crash() -> None:
    """Seeded mutations of valid requests (bytes changed, cut out, put in): an outcome, or ValueError (the
    association aborts it as malformed), never another exception (logged as a bug, with a traceback)."""
    rng = random.Random(7)
    bases = [associate_rq([(CT, [EXPLICIT, IMPLICIT])] * 3, roles={CT: (True, True)}),
             _request_with([_extended(STUDY_FIND, b"\x01")], [(STUDY_FIND, [EXPLICIT])])]
    outcomes = collections.Counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings about the invalid UIDs it meets
        for _ in range(3000):
            pdu = bytearray(rng.choice(bases))
            for _ in range(rng.randint(1, 4)):
                at, op = rng.randrange(len(pdu)), rng.random()
                if op < 0.6:
                    pdu[at] = rng.randrange(256)
                elif op < 0.8:
                    del pdu[at:at + rng.randint(1, 8)]
                else:
                    pdu[at:at] = rng.randbytes(rng.randint(1, 8))
            try:
                outcomes["accepted" if negotiate(bytes(pdu), POLICY).accepted else "rejected"] += 1
            except ValueError:
                outcomes["malformed"] += 1
    assert min(outcomes["accepted"], outcomes["rejected"], outcomes["malformed"]) > 0, outcomes
