"""DIMSE command sets as peers see them (fastscp/net/dimse.py): requests as
pynetdicom encodes them, responses as pynetdicom decodes them, C-STORE
statuses as ``fastscp send`` reports them from a real peer, and the UID rule a
real server applies to what it stores."""

from __future__ import annotations

import io
import struct
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE, evt
from pynetdicom import dimse_messages as messages
from pynetdicom import dimse_primitives as primitives
from pynetdicom.dsutils import decode

from fastscp.dicom.part10 import dataset_offset
from fastscp.dicom.synthetic import write_series
from fastscp.net import dimse
from tests.dicomfiles import pad
from tests.e2e.test_hostile import dataset
from tests.e2e.test_server import fastscp
from tests.rawscu import RawSCU

CT = str(CTImageStorage)
MR = str(MRImageStorage)
EXPLICIT = str(ExplicitVRLittleEndian)
#: Every command element the decoder reads (PS3.7 E.1-1), by keyword.
KEYWORDS = {"AffectedSOPClassUID", "RequestedSOPClassUID", "CommandField", "MessageID", "MessageIDBeingRespondedTo",
            "Priority", "CommandDataSetType", "Status", "ErrorComment", "AffectedSOPInstanceUID",
            "RequestedSOPInstanceUID", "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID"}


def _encoded_by_pynetdicom(message_class: type, primitive: object) -> bytes:
    message = message_class()
    message.primitive_to_message(primitive)
    return b"".join(bytes(pdv[1][1:]) for pdu in message.encode_msg(1, 0)
                    for pdv in pdu.presentation_data_value_list if pdv[1][0] & 1)


def _store_rq() -> tuple[type, object]:
    rq = primitives.C_STORE()
    rq.MessageID, rq.Priority = 65535, 1
    rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID = CT, "12"  # a two-byte UID stays text
    rq.MoveOriginatorApplicationEntityTitle, rq.MoveOriginatorMessageID = "MOVER", 258
    return messages.C_STORE_RQ, rq


def _store_rsp() -> tuple[type, object]:
    rsp = primitives.C_STORE()
    rsp.MessageIDBeingRespondedTo, rsp.Status, rsp.ErrorComment = 513, 0xA701, "disk full"
    rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID = "1.2.3", "1.2.840.99"
    return messages.C_STORE_RSP, rsp


def _echo_rq() -> tuple[type, object]:
    rq = primitives.C_ECHO()
    rq.MessageID, rq.AffectedSOPClassUID = 3, "1.2.840.10008.1.1"
    return messages.C_ECHO_RQ, rq


def _find_rq() -> tuple[type, object]:
    rq = primitives.C_FIND()
    rq.MessageID, rq.Priority, rq.AffectedSOPClassUID = 4, 2, "1.2.840.10008.5.1.4.1.2.2.1"
    rq.Identifier = io.BytesIO(b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY ")
    return messages.C_FIND_RQ, rq


def _cancel_rq() -> tuple[type, object]:
    rq = primitives.C_CANCEL()
    rq.MessageIDBeingRespondedTo = 4
    return messages.C_CANCEL_RQ, rq


def _n_get_rq() -> tuple[type, object]:
    rq = primitives.N_GET()
    rq.MessageID, rq.RequestedSOPClassUID, rq.RequestedSOPInstanceUID = 6, "1.2.840.10008.5.1.1.16", "1.2.3.4"
    return messages.N_GET_RQ, rq


@pytest.mark.parametrize("make, constant", [(_store_rq, "C_STORE_RQ"), (_store_rsp, "C_STORE_RSP"),
                                             (_echo_rq, "C_ECHO_RQ"), (_find_rq, "C_FIND_RQ"),
                                             (_cancel_rq, "C_CANCEL_RQ"), (_n_get_rq, None)],
                         ids=["C-STORE-RQ", "C-STORE-RSP", "C-ECHO-RQ", "C-FIND-RQ", "C-CANCEL-RQ", "N-GET-RQ"])
def test_every_element_read_decodes_as_pynetdicom_encoded_it(make, constant: str | None) -> None:  # type: ignore[no-untyped-def]
    encoded = _encoded_by_pynetdicom(*make())
    theirs = decode(io.BytesIO(encoded), True, True)
    expected = {e.keyword: (e.value if isinstance(e.value, int) else str(e.value).strip())
                for e in theirs if e.keyword in KEYWORDS}
    assert dimse.decode_command_set(encoded) == expected
    if constant is not None:
        # The Command Field fastscp dispatches on (or answers with) is the one pynetdicom sends.
        assert expected["CommandField"] == getattr(dimse, constant)


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, element, len(value)) + value


ECHO = _element(0x0100, b"\x30\x00")


@pytest.mark.parametrize("data, why", [
    (ECHO + b"\x00\x00\x02\x00\x04\x00", "truncated at byte 10"),           # an element header cut short
    (ECHO + _element(0x0110, b"\x01\x00")[:-1], "runs past the end"),      # its value cut short
    (ECHO + struct.pack("<HHI", 0, 0x1000, 1 << 20) + b"1.2", "runs past the end"),
    (ECHO + _element(0x0110, b"\x01\x00").replace(b"\x00\x00\x10\x01", b"\x08\x00\x10\x01"), "(0008,0110)"),
    (_element(0x0110, b"\x01\x00"), "no Command Field"),
])
def test_a_broken_command_set_is_refused_naming_the_fault(data: bytes, why: str) -> None:
    with pytest.raises(dimse.CommandSetError, match=f"{why}".replace("(", r"\(").replace(")", r"\)")):
        dimse.decode_command_set(data)


def test_empty_elements_and_wrong_length_numbers_are_read_as_the_standard_allows() -> None:
    # A zero-length last element ends the set exactly; a US element of another
    # length is not a number (left out); unknown elements are skipped.
    data = (ECHO + _element(0x0110, b"\x07\x00\x00\x00") + _element(0x0700, b"\x02\x00") + _element(0x0800, b"\x01")
            + _element(0x0001, b"\x00\x00\x00\x00") + _element(0x0002, b" 1.2.3\x00") + _element(0x1000, b""))
    assert dimse.decode_command_set(data) == {"CommandField": 0x0030, "Priority": 2, "AffectedSOPClassUID": "1.2.3",
                                              "AffectedSOPInstanceUID": ""}


def _raw_elements(encoded: bytes) -> dict[int, bytes]:
    out, pos = {}, 0
    while pos < len(encoded):
        _group, element, length = struct.unpack_from("<HHI", encoded, pos)
        out[element] = encoded[pos + 8 : pos + 8 + length]
        pos += 8 + length
    return out


@pytest.mark.parametrize("sop_class, sop_instance", [("1", "1.2"), ("1.2.3", "1.2.34"), ("1.23", "1.2.345"),
                                                     ("1.2.34567", "1.2.3")])
def test_responses_pad_each_value_to_even_length_as_its_vr_requires(sop_class: str, sop_instance: str) -> None:
    encoded = dimse.encode_response(dimse.C_STORE_RSP, sop_class, 1, 0xA700, sop_instance, "abc")
    elements = _raw_elements(encoded)
    assert all(len(value) % 2 == 0 for value in elements.values())
    # UI pads with NUL, LO with a space (PS3.5 6.2).
    assert elements[0x0002] == (sop_class + "\x00" * (len(sop_class) % 2)).encode()
    assert elements[0x1000] == (sop_instance + "\x00" * (len(sop_instance) % 2)).encode()
    assert elements[0x0902] == b"abc "
    ds = decode(io.BytesIO(encoded), True, True)
    assert (ds.AffectedSOPClassUID, ds.AffectedSOPInstanceUID, ds.ErrorComment) == (sop_class, sop_instance, "abc")
    assert ds.CommandGroupLength == len(encoded) - 12


def test_a_response_without_data_set_or_comment_or_instance() -> None:
    encoded = dimse.encode_response(dimse.C_ECHO_RSP, "1.2.840.10008.1.1", 65535, dimse.SUCCESS)
    ds = decode(io.BytesIO(encoded), True, True)
    assert [e.keyword for e in ds] == ["CommandGroupLength", "AffectedSOPClassUID", "CommandField",
                                       "MessageIDBeingRespondedTo", "CommandDataSetType", "Status"]
    assert (ds.CommandField, ds.MessageIDBeingRespondedTo, ds.CommandDataSetType, ds.Status) == (0x8030, 65535,
                                                                                                0x0101, 0)
    pending = decode(io.BytesIO(dimse.encode_response(dimse.C_FIND_RSP, "1.2", 2, 0xFF00, has_data_set=True)),
                     True, True)
    assert (pending.CommandField, pending.CommandDataSetType, pending.Status) == (0x8020, 0x0000, 0xFF00)


def test_an_error_comment_quoting_peer_bytes_stays_in_the_default_repertoire() -> None:
    # The comment may quote a peer's UID: control characters, backslash (the
    # LO value delimiter) and non-ASCII become "?", and LO holds 64 characters.
    comment = "bad\x1f \\uid ~\x7f\u00e9" + "x" * 80
    ds = decode(io.BytesIO(dimse.encode_response(dimse.C_STORE_RSP, "1.2", 1, 0xC000, "1.2.3", comment)), True, True)
    assert ds.ErrorComment == ("bad? ?uid ~??" + "x" * 80)[:64]


# -- statuses as `fastscp send` reports them ---------------------------------------------------------

#: The status a peer answers for each file, and the line `fastscp send` must print (PS3.4 B.2.3, PS3.7 C).
ANSWERS = {
    0x0000: "stored (0x0000 Success)",
    0x0001: "stored (0x0001 Warning)",
    0x0002: "failed: 0x0002 Failure",
    0x0111: "failed: 0x0111 Duplicate SOP instance",
    0x0117: "failed: 0x0117 Invalid object instance",
    0x0122: "failed: 0x0122 SOP class not supported",
    0x0211: "failed: 0x0211 Unrecognized operation",
    0xA6FF: "failed: 0xA6FF Failure",
    0xA700: "failed: 0xA700 Out of resources",
    0xA7FF: "failed: 0xA7FF Out of resources",
    0xA800: "failed: 0xA800 Failure",
    0xA8FF: "failed: 0xA8FF Failure",
    0xA900: "failed: 0xA900 Data set does not match SOP class",
    0xA9FF: "failed: 0xA9FF Data set does not match SOP class",
    0xAA00: "failed: 0xAA00 Failure",
    0xAFFF: "failed: 0xAFFF Failure",
    0xB000: "stored (0xB000 Coercion of data elements)",
    0xB001: "stored (0xB001 Warning)",
    0xB006: "stored (0xB006 Elements discarded)",
    0xB007: "stored (0xB007 Data set does not match SOP class)",
    0xB008: "stored (0xB008 Warning)",
    0xBFFF: "stored (0xBFFF Warning)",
    0xBFFE: "stored (0xBFFE Warning)",
    0xC000: "failed: 0xC000 Cannot understand",
    0xCFFF: "failed: 0xCFFF Cannot understand",
    0xD000: "failed: 0xD000 Failure",
}


def test_send_names_each_status_a_peer_answers_and_counts_warnings_as_stored(tmp_path: Path) -> None:
    paths = write_series(str(tmp_path / "ct"), len(ANSWERS), rows=8, columns=8)
    status_of = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): code
                 for p, code in zip(paths, ANSWERS, strict=True)}

    def answer(event: evt.Event) -> int:
        return status_of[str(event.request.AffectedSOPInstanceUID)]

    ae = AE(ae_title="PEER")
    ae.add_supported_context(CT, [EXPLICIT, "1.2.840.10008.1.2"])
    peer = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, answer)])
    try:
        result = fastscp("send", "127.0.0.1", str(peer.server_address[1]), *paths, "--aec", "PEER")
    finally:
        peer.shutdown()
    assert not [t for t in threading.enumerate() if t.name.startswith("AcceptorServer")]
    for path, expected in zip(paths, ANSWERS.values(), strict=True):
        (line,) = [line for line in result.stdout.splitlines() if line.startswith(f"{path}: ")]
        assert line == f"{path}: CT Image Storage: {expected}", result.stdout
    stored = sum(text.startswith("stored") for text in ANSWERS.values())
    assert f"stored {stored}, failed {len(ANSWERS) - stored}, refused 0, skipped 0" in result.stdout
    assert result.returncode == 1


# -- the UID rule on a real server ------------------------------------------------------------------


def test_a_64_character_uid_is_stored_and_a_65_character_one_refused(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(workers=1)
    results = {}
    for length in (64, 65):
        uid = "1.2." + "3" * (length - 4)
        scu = RawSCU(server.port, CT, EXPLICIT)
        scu.begin_store(uid, message_id=length)
        scu.send_data(dataset(uid), last=True)
        response, _ = scu.read_message()
        scu.release()
        results[length] = response
    assert (results[64]["Status"], results[64]["AffectedSOPInstanceUID"]) == (dimse.SUCCESS, "1.2." + "3" * 60)
    (stored,) = server.stored_files()
    assert stored.read_bytes()[dataset_offset(stored.read_bytes()):] == dataset("1.2." + "3" * 60)
    # Refused, and the 65-character value is not echoed: it is no UID.
    assert (results[65]["Status"], results[65]["MessageIDBeingRespondedTo"]) == (0x0117, 65)
    assert "AffectedSOPInstanceUID" not in results[65]


def test_a_server_answers_failures_with_the_standard_codes_and_says_why(start_server) -> None:  # type: ignore[no-untyped-def]
    # PS3.4 B.2.3 and PS3.7 C: the numbers a modality acts on, written out here, not taken from fastscp.
    server = start_server("--duplicates", "reject", workers=1)
    answers = []
    for uid, data in (("1.2.3.1", dataset("1.2.3.1").replace(pad(CT, "UI"), pad(MR, "UI"))),
                      ("1.2.3.2", dataset("1.2.3.2", bytes(100), declared=200)),
                      ("1.2.3.3", dataset("1.2.3.3")),
                      ("1.2.3.3", dataset("1.2.3.3", bytes(range(256)) * 2))):
        scu = RawSCU(server.port, CT, EXPLICIT)
        scu.begin_store(uid)
        scu.send_data(data, last=True)
        response, _ = scu.read_message()
        scu.release()
        answers.append((response["Status"], response.get("ErrorComment", "")))
    assert answers == [
        (0xA900, f"SOP Class UID in data set is {MR}"),   # Data Set does not match SOP Class
        (0xC000, answers[1][1]),                           # Cannot understand
        (0x0000, ""),
        (0x0111, "other content stored under this SOP Instance UID"),  # Duplicate SOP Instance
    ]
    assert "(7FE0,0010)" in answers[1][1]


def test_a_store_below_the_free_space_watermark_gets_0xa700(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "full.yaml").write_text("storage:\n  min_free_bytes: 1000000000000000000\n")
    full = start_server(config=tmp_path / "full.yaml", workers=1)
    scu = RawSCU(full.port, CT, EXPLICIT)
    scu.begin_store("1.2.3.4")
    scu.send_data(dataset("1.2.3.4"), last=True)
    response, _ = scu.read_message()
    scu.release()
    assert response["Status"] == 0xA700 and "free space" in str(response["ErrorComment"])  # Out of resources
