"""fastscp's own protocol code against pynetdicom's (stock behaviour, pinned version):
command sets, A-ASSOCIATE negotiation, PDU framing."""

from __future__ import annotations

import io
import socket
import threading

import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.pdu import A_ASSOCIATE_AC
from pynetdicom.sop_class import Verification

from fastscp.dicom.sopclasses import STORAGE_SOP_CLASSES
from fastscp.net import dimse
from fastscp.net.negotiation import AcceptancePolicy, negotiate
from fastscp.net.pdu import PDUStream, ProtocolError, p_data_tf
from tests.rawscu import associate_rq

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
BIG, JPEG_LS = "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.80"


def test_command_set_decoding_matches_pynetdicom() -> None:
    primitive = C_STORE()
    primitive.MessageID = 7
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = "1.2.3.4.5.6"
    primitive.Priority = 2
    primitive.MoveOriginatorApplicationEntityTitle = "MOVER"
    primitive.MoveOriginatorMessageID = 3
    from pynetdicom.dimse_messages import C_STORE_RQ

    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    encoded = b"".join(
        bytes(pdv[1][1:]) for p in message.encode_msg(1, 0) for pdv in p.presentation_data_value_list
        if pdv[1][0] & 1
    )
    ours = dimse.decode_command_set(encoded)
    theirs = decode(io.BytesIO(encoded), True, True)
    for keyword in ("CommandField", "MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority",
                    "CommandDataSetType", "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID"):
        assert ours[keyword] == (str(theirs[keyword].value).strip() if isinstance(ours[keyword], str)
                                 else theirs[keyword].value), keyword


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xA900, 0xC000, 0x0111])
def test_response_encoding_is_read_back_by_pynetdicom(status: int) -> None:
    encoded = dimse.encode_response(dimse.C_STORE_RSP, CT, 9, status, "1.2.3.44", "a comment" if status else "")
    ds = decode(io.BytesIO(encoded), True, True)
    assert ds.CommandGroupLength == len(encoded) - 12
    assert (ds.CommandField, ds.MessageIDBeingRespondedTo, ds.Status) == (0x8001, 9, status)
    assert (ds.AffectedSOPClassUID, ds.AffectedSOPInstanceUID, ds.CommandDataSetType) == (CT, "1.2.3.44", 0x0101)
    assert ("ErrorComment" in ds) == bool(status)


@pytest.mark.parametrize("data", [b"", b"\x00\x00", b"\x00\x00\x00\x00\x04\x00\x00\x00\x01\x00", b"\x08\x00" * 3])
def test_bad_command_sets_raise(data: bytes) -> None:
    with pytest.raises(dimse.CommandSetError):
        dimse.decode_command_set(data)


def _request(contexts: list[tuple[str, list[str]]], roles: dict[str, tuple[bool, bool]] | None = None,
             calling: str = "SCU", called: str = "FASTSCP") -> bytes:
    return associate_rq(contexts, aet=calling, aec=called, max_length=16384, roles=roles)


def _stock_acceptance(pdu: bytes) -> list[tuple[int, int, str]]:
    """What a stock pynetdicom AE (every storage class, every transfer syntax) answers."""
    ae = AE(ae_title="FASTSCP")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, [EXPLICIT, IMPLICIT, BIG, JPEG_LS], scu_role=True, scp_role=False)
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_ECHO, lambda e: 0)])
    try:
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as sock:
            sock.sendall(pdu)
            stream = PDUStream(sock, 1 << 20)
            pdu_type, body = stream.read()
            answer = bytes((pdu_type, 0)) + len(body).to_bytes(4, "big") + bytes(body)
    finally:
        server.shutdown()
        # The stock server's thread ("AcceptorServer@<time>") is gone with it.
        assert not [t for t in threading.enumerate() if t.name.startswith("AcceptorServer")]
    return _results(answer)


def _results(answer: bytes) -> list[tuple[int, int, str]]:
    assert answer[0] == 0x02, f"expected A-ASSOCIATE-AC, got PDU type {answer[0]}"
    ac = A_ASSOCIATE_AC()
    ac.decode(answer)
    return [(cx.context_id, cx.result, str(cx.transfer_syntax[0]) if cx.result == 0 else "")
            for cx in ac.to_primitive().presentation_context_definition_results_list]


POLICY = AcceptancePolicy(ae_title="FASTSCP", storage_sop_classes=frozenset(STORAGE_SOP_CLASSES.values()),
                          max_pdu_size=262144)


def test_negotiation_matches_stock_pynetdicom_where_it_should() -> None:
    contexts = [
        (CT, [EXPLICIT]),               # accepted
        (MR, [IMPLICIT, EXPLICIT]),     # accepted: both agree on the requestor's first here
        ("1.2.3.4.5.6.7", [EXPLICIT]),  # unknown abstract syntax: refused (0x03)
        (CT, ["1.2.3.4.999"]),          # no supported transfer syntax: refused (0x04)
        (Verification, [IMPLICIT]),
    ]
    pdu = _request(contexts, roles={CT: (True, False), MR: (False, True)})
    ours = negotiate(pdu, POLICY)
    assert ours.accepted
    # The same results per context ID (pynetdicom lists accepted ones first; order carries no meaning).
    assert sorted(_results(ours.response)) == sorted(_stock_acceptance(pdu))


def test_requestor_preference_wins_unlike_stock_pynetdicom() -> None:
    # Stock pynetdicom picks the first syntax in the *acceptor's* list; a
    # Storage SCP that stores bytes as received should take the sender's
    # first choice, so JPEG-LS data is never forced to decompress.
    pdu = _request([(CT, [JPEG_LS, EXPLICIT, IMPLICIT]), (MR, [BIG, EXPLICIT])])
    assert [r[2] for r in _results(negotiate(pdu, POLICY).response)] == [JPEG_LS, BIG]
    assert [r[2] for r in _stock_acceptance(pdu)] == [EXPLICIT, EXPLICIT]


def test_reject_for_bad_application_context() -> None:
    pdu = bytearray(_request([(CT, [EXPLICIT])]))
    name = b"1.2.840.10008.3.1.1.1"
    at = pdu.index(name)
    pdu[at : at + len(name)] = b"1.2.840.10008.3.1.1.9"
    result = negotiate(bytes(pdu), POLICY)
    assert not result.accepted and result.reject_reason == "application context name not supported"
    assert result.response == bytes([3, 0, 0, 0, 0, 4, 0, 1, 1, 2])


class _FakeSocket:
    """Feeds bytes in chunks of a fixed size, like a slow network."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self.data, self.chunk = data, chunk

    def setsockopt(self, *args: object) -> None:
        raise OSError("not a TCP socket")

    def recv_into(self, view: memoryview) -> int:
        n = min(self.chunk, len(self.data), len(view))
        view[:n] = self.data[:n]
        self.data = self.data[n:]
        return n


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
def test_pdu_stream_reassembles_pdus_split_anywhere(chunk: int) -> None:
    command = dimse.encode_response(dimse.C_ECHO_RSP, Verification, 1, 0)
    pdus = b"".join(p_data_tf(1, command * k, 100) for k in range(1, 20))
    stream = PDUStream(_FakeSocket(pdus, chunk), 200)  # type: ignore[arg-type]
    seen = bytearray()
    while len(seen) < len(pdus):
        pdu_type, body = stream.read()
        assert pdu_type == 0x04 and len(body) <= 100
        seen += bytes((pdu_type, 0)) + len(body).to_bytes(4, "big") + bytes(body)
    assert bytes(seen) == pdus


@pytest.mark.parametrize("max_pdu", [0, 16384])
def test_pdu_stream_grows_for_a_pdu_larger_than_its_buffer(max_pdu: int) -> None:
    # max_pdu_size 0 ("no limit") with a 12 MB PDU, or a ~600 KiB
    # A-ASSOCIATE-RQ (read with its own limit): the buffer is replaced, not
    # resized, so a body the caller still holds stays valid (issue 11: BufferError).
    small = p_data_tf(1, b"\x01" * 100, 0)
    size = 12_000_000 if max_pdu == 0 else 600_000
    big = bytes((0x04, 0)) + size.to_bytes(4, "big") + bytes(range(256)) * (size // 256) + bytes(size % 256)
    stream = PDUStream(_FakeSocket(small + big, 1 << 20), max_pdu)  # type: ignore[arg-type]
    _type, first = stream.read()
    _type, second = stream.read(limit=None if max_pdu == 0 else 1 << 20)
    assert bytes(first) == small[6:] and bytes(second) == big[6:]


def test_pdu_larger_than_announced_is_a_protocol_error() -> None:
    stream = PDUStream(_FakeSocket(b"\x04\x00" + (1000).to_bytes(4, "big") + bytes(1000), 4096), 500)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="exceeds the maximum 500"):
        stream.read()


def test_response_fragmented_to_the_peer_maximum() -> None:
    command = dimse.encode_response(dimse.C_STORE_RSP, CT, 1, 0, "1.2.3")
    pdus = p_data_tf(3, command, 40)
    stream = PDUStream(_FakeSocket(pdus, 4096), 40)  # type: ignore[arg-type]
    out, controls = b"", []
    while len(out) < len(command):
        _type, body = stream.read()
        assert len(body) <= 40  # Maximum Length Received bounds the PDU's variable field
        controls.append(body[5])
        out += bytes(body[6:])
    assert out == command and controls[-1] == 0x03 and set(controls[:-1]) == {0x01}
