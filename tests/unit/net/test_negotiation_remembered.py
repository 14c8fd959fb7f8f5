"""A worker remembers the A-ASSOCIATE-RQs it accepted (fastscp/net/negotiation.py, AcceptedRequests):
the same bytes under the same policy, whatever their Calling AE Title, get the same outcome without
being decoded again, the access check still runs for each peer, and what is remembered stays bounded
whatever a peer sends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pynetdicom.pdu import A_ASSOCIATE_RQ

from fastscp.config import AllowedAE
from fastscp.dicom.sopclasses import STORAGE_SOP_CLASSES
from fastscp.net import negotiation
from fastscp.net.access import build_access_policy
from fastscp.net.negotiation import ACCEPTED, AcceptancePolicy, AcceptedRequests, negotiate
from tests.rawscu import associate_rq

CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
STORAGE = frozenset(STORAGE_SOP_CLASSES.values())
POLICY = AcceptancePolicy(ae_title="FASTSCP", storage_sop_classes=STORAGE, max_pdu_size=262144)
REQUEST = associate_rq([(CT, [EXPLICIT, IMPLICIT]), (MR, [EXPLICIT]), ("1.2.3", [EXPLICIT])], max_length=16384,
                       roles={CT: (True, False)})


@pytest.fixture(autouse=True)
def forgotten() -> Iterator[None]:
    """Each test starts with nothing remembered, and leaves nothing for the next."""
    ACCEPTED.clear()
    yield
    ACCEPTED.clear()


@pytest.fixture
def undecodable(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, a request that is decoded fails: an outcome that comes back was remembered."""
    def refuse(_self: A_ASSOCIATE_RQ, _pdu: bytes) -> None:
        raise AssertionError("decoded again")
    monkeypatch.setattr(A_ASSOCIATE_RQ, "decode", refuse)


def _fields(result: negotiation.Negotiation) -> tuple[object, ...]:
    return (result.calling_ae_title, result.called_ae_title, result.response, result.accepted, result.reject_reason,
            result.contexts, result.peer_max_pdu, result.peer_implementation, result.relational_queries,
            result.refused)


def test_the_same_request_gets_the_same_outcome_without_being_decoded_again(request: pytest.FixtureRequest) -> None:
    first = negotiate(REQUEST, POLICY, "127.0.0.1")
    assert first.accepted and len(ACCEPTED) == 1
    request.getfixturevalue("undecodable")
    again = negotiate(REQUEST, POLICY, "127.0.0.1")
    assert _fields(again) == _fields(first)
    assert again is not first


def test_another_calling_ae_title_gets_its_own_outcome_without_a_decode(request: pytest.FixtureRequest) -> None:
    """The senders of one make differ in their Calling AE Title alone: the second is answered from
    memory, as a negotiation of its own request would answer it (its title echoed in the -AC)."""
    contexts = [(CT, [EXPLICIT, IMPLICIT]), (MR, [EXPLICIT]), ("1.2.3", [EXPLICIT])]
    second = associate_rq(contexts, aet="X RAY 2")
    fresh = negotiate(second, POLICY, "127.0.0.1")
    ACCEPTED.clear()
    assert negotiate(associate_rq(contexts, aet="X RAY 1"), POLICY, "127.0.0.1").calling_ae_title == "X RAY 1"
    request.getfixturevalue("undecodable")
    remembered = negotiate(second, POLICY, "127.0.0.1")
    assert _fields(remembered) == _fields(fresh)
    assert remembered.calling_ae_title == "X RAY 2" and remembered.response[26:42] == b"X RAY 2".ljust(16)
    assert len(ACCEPTED) == 1


def test_the_access_check_reads_the_calling_ae_title_of_each_request() -> None:
    policy = AcceptancePolicy(ae_title="FASTSCP", storage_sop_classes=STORAGE, max_pdu_size=0,
                              access=build_access_policy([AllowedAE(ae_title="MODALITY")]))
    assert negotiate(associate_rq([(CT, [EXPLICIT])], aet="MODALITY"), policy, "10.1.2.3").accepted
    refused = negotiate(associate_rq([(CT, [EXPLICIT])], aet="INTRUDER"), policy, "10.1.2.3")
    assert not refused.accepted
    assert refused.reject_reason == ("calling AE title not recognized: "
                                     "calling AE title 'INTRUDER' is not in access.allowed_calling_aets")


def test_a_calling_ae_title_the_acceptor_would_not_echo_as_sent_is_not_remembered() -> None:
    # pynetdicom strips leading spaces: the -AC's echo differs from the request's field.
    spaced = negotiate(associate_rq([(CT, [EXPLICIT])], aet="  SPACED"), POLICY)
    assert spaced.accepted and spaced.response[26:42] == b"SPACED".ljust(16)
    assert len(ACCEPTED) == 0
    # Nor is it answered from what another title left: its answer is the fresh one.
    assert negotiate(associate_rq([(CT, [EXPLICIT])], aet="SPACED"), POLICY).accepted and len(ACCEPTED) == 1
    assert _fields(negotiate(associate_rq([(CT, [EXPLICIT])], aet="  SPACED"), POLICY)) == _fields(spaced)


def test_an_outcome_changed_by_its_association_does_not_change_the_next() -> None:
    negotiate(REQUEST, POLICY)
    for _ in range(2):
        remembered = negotiate(REQUEST, POLICY)
        assert remembered.accepted and remembered.reject_reason == "" and remembered.response[0] == 0x02
        # What the association does when the supervisor does not admit it (server.max_associations).
        remembered.accepted, remembered.reject_reason, remembered.response = False, "local limit exceeded", b"\x03"


def test_the_access_check_runs_again_for_each_peer(request: pytest.FixtureRequest) -> None:
    policy = AcceptancePolicy(ae_title="FASTSCP", storage_sop_classes=STORAGE, max_pdu_size=0,
                              access=build_access_policy([AllowedAE(ae_title="MODALITY", hosts=["10.1.0.0/16"])]))
    modality = associate_rq([(CT, [EXPLICIT])], aet="MODALITY")
    assert negotiate(modality, policy, "10.1.2.3").accepted
    # The same bytes from an address the rule does not allow: refused, saying why.
    refused = negotiate(modality, policy, "10.9.9.9")
    assert not refused.accepted
    assert refused.response == bytes([3, 0, 0, 0, 0, 4, 0, 1, 1, 3])
    assert refused.reject_reason == ("calling AE title not recognized: "
                                     "calling AE title 'MODALITY' is not allowed from 10.9.9.9")
    request.getfixturevalue("undecodable")
    assert negotiate(modality, policy, "10.1.200.1").accepted


def test_another_policy_negotiates_afresh() -> None:
    assert set(negotiate(REQUEST, POLICY).contexts) == {1, 3}
    only_mr = AcceptancePolicy(ae_title="FASTSCP", storage_sop_classes=frozenset({MR}), max_pdu_size=262144)
    result = negotiate(REQUEST, only_mr)
    assert set(result.contexts) == {3}
    assert result.refused == [(CT, "abstract syntax not supported"), ("1.2.3", "abstract syntax not supported")]


def test_rejections_and_malformed_requests_are_not_remembered() -> None:
    checked = AcceptancePolicy(ae_title="FASTSCP", storage_sop_classes=STORAGE, max_pdu_size=0,
                               check_called_aet=True)
    stranger = associate_rq([(CT, [EXPLICIT])], aec="OTHER")
    assert not negotiate(stranger, checked).accepted
    with pytest.raises(ValueError, match="malformed A-ASSOCIATE-RQ"):
        negotiate(REQUEST[:-7], POLICY)
    assert len(ACCEPTED) == 0


def test_what_is_remembered_is_bounded() -> None:
    remembered = AcceptedRequests(kept=4, max_pdu=len(REQUEST) + 1)
    outcome = negotiate(REQUEST, POLICY)
    for n in range(10):
        remembered.put(REQUEST + bytes([n]), POLICY, outcome)
    assert len(remembered) == 4
    # The most recent stay; a longer request is not kept at all.
    assert remembered.get(REQUEST + bytes([9]), POLICY, "") is not None
    assert remembered.get(REQUEST + bytes([5]), POLICY, "") is None
    remembered.put(REQUEST + b"\x00\x00", POLICY, outcome)
    assert remembered.get(REQUEST + b"\x00\x00", POLICY, "") is None
    # A peer that varies its requests cannot make a worker remember more.
    for n in range(negotiation.ACCEPTED_KEPT * 2):
        negotiate(associate_rq([(CT, [EXPLICIT])], max_length=16384 + n), POLICY)
    assert len(ACCEPTED) == negotiation.ACCEPTED_KEPT


def test_the_requests_asked_for_lately_stay_and_a_refused_peer_forgets_nothing() -> None:
    remembered = AcceptedRequests(kept=2, max_pdu=len(REQUEST) + 1)
    outcome = negotiate(REQUEST, POLICY)
    first, second, third = (REQUEST + bytes([n]) for n in range(3))
    remembered.put(first, POLICY, outcome)
    remembered.put(second, POLICY, outcome)
    assert remembered.get(first, POLICY, "") is not None  # asked for: now the most recent
    remembered.put(third, POLICY, outcome)
    assert remembered.get(second, POLICY, "") is None  # the least recent went
    assert remembered.get(first, POLICY, "") is not None
    # One put again is the most recent too: the least recent (third) is put again, the next one pushes first out.
    remembered.put(third, POLICY, outcome)
    remembered.put(second, POLICY, outcome)
    assert remembered.get(third, POLICY, "") is not None
    assert remembered.get(first, POLICY, "") is None
    # A peer the access rules refuse gets nothing, and the entry stays for the next one.
    guarded = AcceptancePolicy(ae_title="FASTSCP", storage_sop_classes=STORAGE, max_pdu_size=0,
                               access=build_access_policy([AllowedAE(ae_title="RAWSCU", hosts=["10.1.0.0/16"])]))
    remembered.put(third, guarded, outcome)
    assert remembered.get(third, guarded, "10.9.9.9") is None
    assert remembered.get(third, guarded, "10.1.2.3") is not None
