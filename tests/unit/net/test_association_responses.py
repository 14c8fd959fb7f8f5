"""Where the association awaits the peer's answer to a message of ours (a C-GET sub-operation's
C-STORE-RSP, an N-EVENT-REPORT-RSP): :meth:`Association.next_command` over a socket pair, fed raw
PDUs. A well-formed response in any cut is read; anything else ends the association as a
protocol error or a limit, never as a response."""

from __future__ import annotations

import dataclasses
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fastscp.net import dimse
from fastscp.net.association import Association, ServiceSettings
from fastscp.net.negotiation import AcceptancePolicy
from fastscp.net.pdu import RELEASE_RP, DeadlineExceeded, LimitExceeded, PDUStream, PeerClosed, ProtocolError
from fastscp.storage.area import Storage
from tests.rawscu import p_data

CT = "1.2.840.10008.5.1.4.1.1.2"
Awaiting = Callable[..., tuple[Association, socket.socket]]
RESPONSE = dimse.encode_response(dimse.C_STORE_RSP, CT, 7, dimse.SUCCESS, "1.2.3.4")


def pdv(value: bytes, control: int, context_id: int = 3) -> bytes:
    return struct.pack(">IBB", len(value) + 2, context_id, control) + value


def pdu(body: bytes, pdu_type: int = 0x04) -> bytes:
    return struct.pack(">BxI", pdu_type, len(body)) + body


@pytest.fixture
def awaiting(tmp_path: Path) -> Iterator[Callable[..., tuple[Association, socket.socket]]]:
    """Makes (an association in its data transfer phase, the peer's end); keywords override
    ServiceSettings fields."""
    sockets: list[socket.socket] = []

    def make(**overrides: Any) -> tuple[Association, socket.socket]:
        settings = ServiceSettings(
            policy=AcceptancePolicy(ae_title="FASTSCP", storage_sop_classes=frozenset({CT}), max_pdu_size=16384),
            storage=Storage(str(tmp_path / "root")), acse_timeout=5.0, dimse_timeout=5.0, max_object_size=1 << 20,
            max_command_set=4096, min_data_rate=0, action_log=False,
        )
        ours, theirs = socket.socketpair()
        sockets.extend((ours, theirs))
        ours.settimeout(5)
        theirs.settimeout(5)
        association = Association(ours, "127.0.0.1:11112", dataclasses.replace(settings, **overrides),
                                  lambda record: None)
        association.stream = PDUStream(ours, 16384)
        return association, theirs

    yield make
    for sock in sockets:
        sock.close()


@pytest.mark.parametrize("cut", [[RESPONSE], [RESPONSE[:10], RESPONSE[10:40], RESPONSE[40:]]], ids=["one", "three"])
def test_a_response_in_any_number_of_pdvs_is_read_whole(awaiting: Awaiting,
                                                        cut: list[bytes]) -> None:
    association, theirs = awaiting()
    pdvs = [pdv(part, 1 | (2 if n == len(cut) - 1 else 0)) for n, part in enumerate(cut)]
    # The first PDV alone in a PDU, the rest together in the next.
    theirs.sendall(pdu(pdvs[0]) + (pdu(b"".join(pdvs[1:])) if pdvs[1:] else b""))
    context_id, command = association.next_command()  # type: ignore[misc]
    assert context_id == 3
    assert (command["CommandField"], command["MessageIDBeingRespondedTo"], command["Status"]) == (
        dimse.C_STORE_RSP, 7, dimse.SUCCESS)


def test_a_release_request_instead_is_handed_back_then_answered(awaiting: Awaiting) -> None:
    association, theirs = awaiting()
    theirs.sendall(pdu(bytes(4), 0x05))
    assert association.next_command() is None
    association.answer_release()
    assert theirs.recv(100) == RELEASE_RP and association.stats.outcome == "released"


def test_an_abort_instead_ends_the_association(awaiting: Awaiting) -> None:
    association, theirs = awaiting()
    theirs.sendall(pdu(bytes(4), 0x07))
    with pytest.raises(PeerClosed, match="aborted by peer"):
        association.next_command()


@pytest.mark.parametrize("sent, why", [
    (pdu(bytes(4), 0x02), "unexpected PDU type 0x02 where a response was awaited"),
    (pdu(bytes(5)), "truncated PDV item"),
    (pdu(struct.pack(">IBB", 1, 3, 3)), "a data set or a malformed PDV where a command set was expected"),
    (pdu(struct.pack(">IBB", 200, 3, 3) + RESPONSE[:50]), "a data set or a malformed PDV"),
    (pdu(pdv(RESPONSE, 2)), "a data set or a malformed PDV"),
    (pdu(pdv(RESPONSE, 3) + pdv(b"", 2)), "more PDVs after a complete command set"),
    (pdu(pdv(RESPONSE[:-3], 3)), "runs past the end"),
], ids=["another-pdu", "truncated-item", "item-too-short", "item-past-its-pdu", "a-data-set", "more-after-the-last",
        "undecodable"])
def test_anything_but_a_command_set_is_a_protocol_error(awaiting: Awaiting, sent: bytes,
                                                        why: str) -> None:
    association, theirs = awaiting()
    theirs.sendall(sent)
    with pytest.raises(ProtocolError, match=why):
        association.next_command()


def _padded(size: int) -> bytes:
    """The response padded to ``size`` bytes with an element no command uses, (0000,0005)."""
    return RESPONSE + struct.pack("<HHI", 0, 0x0005, size - len(RESPONSE) - 8) + bytes(size - len(RESPONSE) - 8)


def test_a_response_of_max_command_set_bytes_is_read(awaiting: Awaiting) -> None:
    association, theirs = awaiting()
    theirs.sendall(pdu(pdv(_padded(4096), 3)))
    assert association.next_command() is not None


def test_a_response_longer_than_max_command_set_is_a_limit(awaiting: Awaiting) -> None:
    """Counted across fragments: two of 2100 bytes, neither the last."""
    association, theirs = awaiting()
    theirs.sendall(pdu(pdv(bytes(2100), 1)) + pdu(pdv(bytes(2100), 1)))
    with pytest.raises(LimitExceeded, match=r"limits.max_command_set \(4096\)"):
        association.next_command()


def test_with_a_minimum_rate_a_silent_peer_is_cut_at_dimse_timeout(awaiting: Awaiting) -> None:
    """limits.min_data_rate holds for the response awaited too: the socket's idle timeout (5 s) is not
    what ends it."""
    association, theirs = awaiting(dimse_timeout=0.3, min_data_rate=1000)
    theirs.sendall(p_data(3, RESPONSE[:20], command=True, last=False))
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="limits.min_data_rate"):
        association.next_command()
    assert time.monotonic() - started < 3
