"""fastscp.net.dimse's codec: both twins, the same command sets, the same results and errors.

Every case runs twice, ``[cext]`` (the compiled module) and ``[py]`` (the
pure-Python twin), against answers written out here; the randomized cases
compare the twins with each other. An outcome is the whole result (the
dict's items in order, with the type of each value, or the bytes) or the
exception's type and message. The cext case fails when the module is not
built, unless ``FASTSCP_NO_EXTENSIONS=1`` says to run without it.
"""

from __future__ import annotations

import io
import random
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
from pydicom.uid import UID, CTImageStorage
from pynetdicom.dsutils import decode

from fastscp.dicom.backend import NO_EXTENSIONS
from fastscp.net import _dimse_py, dimse
from tests.twins import compiled_twin

CEXT = "fastscp.net._dimse_cext"
CT = str(CTImageStorage)
INSTANCE = "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345"


class Text(str):
    """A str subclass: the compiled twin leaves it to the Python one."""


class Codec(NamedTuple):
    decode_command_set: Callable[..., dict[str, int | str]]
    encode_response: Callable[..., bytes]
    is_uid: Callable[..., bool]


def _codec(name: str) -> Codec:
    if name == "py":
        return Codec(dimse.decode_command_set_py, dimse.encode_response_py, dimse.is_uid_py)
    compiled_twin(dimse.decode_command_set_cext, CEXT)
    return Codec(dimse.decode_command_set_cext, dimse.encode_response_cext, dimse.is_uid_cext)  # type: ignore[arg-type]


@pytest.fixture(params=["cext", "py"])
def codec(request: pytest.FixtureRequest) -> Codec:
    return _codec(request.param)


@pytest.fixture
def both() -> tuple[Codec, Codec]:
    """(cext, py), for comparing the twins directly."""
    return _codec("cext"), _codec("py")


def outcome(func: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    """("ok", result), with a dict's items in order and each value's type; or ("raised", type, message)."""
    try:
        result = func(*args, **kwargs)
    except Exception as exc:  # every exception: the twins must raise the same ones
        return "raised", type(exc), str(exc)
    if isinstance(result, dict):
        return "ok", [(key, type(value), value) for key, value in result.items()]
    return "ok", type(result), result


def element(number: int, value: bytes, group: int = 0x0000) -> bytes:
    """An Implicit VR Little Endian element, as the value is (no padding)."""
    return struct.pack("<HHI", group, number, len(value)) + value


def us(number: int, value: int) -> bytes:
    return element(number, struct.pack("<H", value))


def group_length(body: bytes) -> bytes:
    return element(0x0000, struct.pack("<I", len(body))) + body


def test_backend_switch() -> None:
    assert dimse.BACKEND == ("py" if NO_EXTENSIONS else "cext")
    twin = _codec(dimse.BACKEND)
    assert (dimse.decode_command_set, dimse.encode_response, dimse.is_uid) == tuple(twin)


# -- decode_command_set -------------------------------------------------------------------------

STORE_RQ = group_length(
    element(0x0002, CT.encode() + b"\x00") + us(0x0100, 0x0001) + us(0x0110, 7) + us(0x0700, 2)
    + us(0x0800, 0x0001) + element(0x1000, INSTANCE.encode())
)
ECHO = us(0x0100, 0x0030)


@pytest.mark.parametrize(("data", "expected"), [
    (STORE_RQ, [("AffectedSOPClassUID", CT), ("CommandField", 1), ("MessageID", 7), ("Priority", 2),
                ("CommandDataSetType", 1), ("AffectedSOPInstanceUID", INSTANCE)]),
    # every element read, in the order sent, whatever that is
    (element(0x1031, b"\x02\x01") + element(0x1030, b"MOVER ") + element(0x1008, b"\x05\x00")
     + element(0x1002, b"\x06\x00") + element(0x1001, b"1.2.4") + element(0x0902, b"disk full")
     + us(0x0900, 0xA701) + element(0x0600, b"DEST") + us(0x0120, 513) + element(0x0003, b"1.2.3\x00") + ECHO,
     [("MoveOriginatorMessageID", 258), ("MoveOriginatorApplicationEntityTitle", "MOVER"), ("ActionTypeID", 5),
      ("EventTypeID", 6), ("RequestedSOPInstanceUID", "1.2.4"), ("ErrorComment", "disk full"),
      ("Status", 0xA701), ("MoveDestination", "DEST"), ("MessageIDBeingRespondedTo", 513),
      ("RequestedSOPClassUID", "1.2.3"), ("CommandField", 0x0030)]),
    # a repeated element: the last value, where the first stood
    (us(0x0110, 1) + ECHO + us(0x0110, 9), [("MessageID", 9), ("CommandField", 0x0030)]),
    # US/UL of another length is no number; a text of odd length is read as it is
    (ECHO + element(0x0110, b"\x07\x00\x00\x00") + element(0x0700, b"\x02") + element(0x0800, b"")
     + element(0x0900, b"\x01\x02\x03") + element(0x0002, b"1.2.3"), [("CommandField", 0x0030),
                                                                       ("AffectedSOPClassUID", "1.2.3")]),
    # unknown elements are skipped, the group length too; elements numbered past the table
    (element(0x0000, b"\x00\x00\x00\x00") + element(0x0001, b"\x01\x00") + element(0x1020, b"\x01\x00")
     + element(0x5010, b"x") + element(0xFFFF, b"\xff\xff") + ECHO, [("CommandField", 0x0030)]),
    # numbers at their limits, and a zero-length last element
    (us(0x0100, 0xFFFF) + us(0x0110, 0) + element(0x1000, b""),
     [("CommandField", 0xFFFF), ("MessageID", 0), ("AffectedSOPInstanceUID", "")]),
])
def test_decode(codec: Codec, data: bytes, expected: list[tuple[str, int | str]]) -> None:
    assert outcome(codec.decode_command_set, data) == ("ok", [(k, type(v), v) for k, v in expected])


@pytest.mark.parametrize(("value", "text"), [
    (b"1.2.3\x00", "1.2.3"),
    (b" 1.2.3 \x00 \x00", "1.2.3"),  # NUL and space padding, a leading space
    (b"\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f1.2\x1f\x1e\x1d\x1c\r\x0c\x0b\n\t", "1.2"),  # what str.strip() strips
    (b"1.2\x00\t\x00", "1.2\x00"),  # NUL is padding only at the end, before the whitespace is stripped
    (b"\x001.2", "\x001.2"),  # ... and never at the start
    (b"1.2\x01", "1.2\x01"),  # other control characters stay
    (b"\x85\xa01.2\xe9\x80\xff", "\ufffd\ufffd1.2\ufffd\ufffd\ufffd"),  # not ASCII: U+FFFD each, not stripped
    (b"\x00\x00  \x00", ""),
    (b"A\\B", "A\\B"),
])
def test_decode_text(codec: Codec, value: bytes, text: str) -> None:
    data = ECHO + element(0x1000, value)
    assert outcome(codec.decode_command_set, data) == ("ok", [("CommandField", int, 0x0030),
                                                              ("AffectedSOPInstanceUID", str, text)])


@pytest.mark.parametrize(("data", "message"), [
    (ECHO + b"\x00\x00\x02\x00\x04\x00", "command set truncated at byte 10"),  # an element header cut short
    (b"\x00", "command set truncated at byte 0"),
    (ECHO + us(0x0110, 1)[:-1], "element (0000,0110) runs past the end"),  # its value cut short
    (ECHO + struct.pack("<HHI", 0, 0x1000, 0xFFFFFFFF) + b"1.2", "element (0000,1000) runs past the end"),
    (ECHO + struct.pack("<HHI", 0, 0xABCD, 0x80000000), "element (0000,ABCD) runs past the end"),
    (ECHO + element(0x0110, b"\x01\x00", group=0x0008), "element (0008,0110) in a command set"),
    (element(0x0010, b"", group=0xFFFE) + ECHO, "element (FFFE,0010) in a command set"),
    (us(0x0110, 1), "command set has no Command Field (0000,0100)"),
    (b"", "command set has no Command Field (0000,0100)"),
    (element(0x0100, b"\x01\x00\x00\x00"), "command set has no Command Field (0000,0100)"),  # a UL, not a US
    # the first fault met is the one named
    (element(0x0110, b"\x01\x00", group=0x0008) + b"\x00", "element (0008,0110) in a command set"),
])
def test_decode_refuses(codec: Codec, data: bytes, message: str) -> None:
    assert outcome(codec.decode_command_set, data) == ("raised", dimse.CommandSetError, message)


def test_one_error_class(codec: Codec) -> None:
    """CommandSetError is defined once: what association.py catches is what either twin raises."""
    with pytest.raises(dimse.CommandSetError) as info:
        codec.decode_command_set(b"\x00")
    assert type(info.value) is _dimse_py.CommandSetError is dimse.CommandSetError
    assert issubclass(dimse.CommandSetError, ValueError)


def _as_uint16(data: bytes) -> memoryview:
    """A memoryview of format "H" (bytes() takes its bytes); an unknown element evens the length."""
    return memoryview(data + element(0x0001, b"x") * (len(data) % 2)).cast("H")


def _strided() -> memoryview:
    doubled = bytes(b for pair in zip(STORE_RQ, bytes(len(STORE_RQ)), strict=True) for b in pair)
    return memoryview(doubled)[::2]


@pytest.mark.parametrize("make", [
    bytearray, memoryview, lambda d: memoryview(b"xx" + d + b"yy")[2:-2], _as_uint16,
    lambda _d: _strided(), list, lambda d: type("Sub", (bytes,), {})(d),
], ids=["bytearray", "memoryview", "slice", "memoryview-H", "strided", "list", "bytes-subclass"])
def test_decode_takes_what_bytes_takes(codec: Codec, make: Callable[[bytes], Any]) -> None:
    expected = outcome(dimse.decode_command_set_py, STORE_RQ)
    assert expected[0] == "ok"
    assert outcome(codec.decode_command_set, make(STORE_RQ)) == expected


@pytest.mark.parametrize(("value", "error"), [
    ("abc", "string argument without an encoding"), (None, "cannot convert 'NoneType' object to bytes"),
    (3, "command set truncated at byte 0"), (12, "command set truncated at byte 8"),
    (16, "command set has no Command Field (0000,0100)"),
])
def test_decode_refuses_what_bytes_refuses(codec: Codec, value: object, error: str) -> None:
    assert outcome(codec.decode_command_set, value)[2] == error


# -- encode_response ------------------------------------------------------------------------------


def response(cls: bytes, field: int, message: int, data_set: int, status: int, *rest: bytes) -> bytes:
    """A response command set written out: the elements in order, ``rest`` after Status."""
    return group_length(element(0x0002, cls) + us(0x0100, field) + us(0x0120, message) + us(0x0800, data_set)
                        + us(0x0900, status) + b"".join(rest))


@pytest.mark.parametrize(("args", "kwargs", "expected"), [
    ((dimse.C_STORE_RSP, CT, 7, dimse.SUCCESS, INSTANCE), {},
     response(CT.encode() + b"\x00", 0x8001, 7, 0x0101, 0, element(0x1000, INSTANCE.encode() + b"\x00"))),
    ((dimse.C_ECHO_RSP, "1.2.840.10008.1.1", 65535, 0), {},
     response(b"1.2.840.10008.1.1\x00", 0x8030, 65535, 0x0101, 0)),
    # odd lengths: UI pads with NUL, LO (the comment) with a space (PS3.5 6.2)
    ((dimse.C_STORE_RSP, "1", 1, 0xA700, "1.23", "abc"), {},
     response(b"1\x00", 0x8001, 1, 0x0101, 0xA700, element(0x0902, b"abc "), element(0x1000, b"1.23"))),
    # the comment: the default repertoire without backslash, 64 characters
    ((dimse.C_STORE_RSP, "", 0, 0xC000, "", "bad\x1f \\uid ~\x7f\u00e9\U0001f600" + "x" * 80), {},
     response(b"", 0x8001, 0, 0x0101, 0xC000, element(0x0902, b"bad? ?uid ~???" + b"x" * 50))),
    ((dimse.C_FIND_RSP, "1.2", 2, 0xFF00), {"has_data_set": True},
     response(b"1.2\x00", 0x8020, 2, 0x0000, 0xFF00)),
    ((dimse.C_MOVE_RSP, "1.2", 3, 0xFF00), {"suboperations": (5, 70000, 0, 1)},
     response(b"1.2\x00", 0x8021, 3, 0x0101, 0xFF00, us(0x1020, 5), us(0x1021, 0xFFFF), us(0x1022, 0),
              us(0x1023, 1))),
    ((dimse.C_GET_RSP, "1.2", 3, 0), {"suboperations": (None, 1 << 80, 2, 0), "has_data_set": 1},
     response(b"1.2\x00", 0x8010, 3, 0x0000, 0, us(0x1021, 0xFFFF), us(0x1022, 2), us(0x1023, 0))),
    # keywords only, and types the compiled twin leaves to the Python one: the same bytes
    ((), {"command_field": 0x8001, "sop_class_uid": CTImageStorage, "message_id": True, "status": 0,
          "sop_instance_uid": UID("1.2"), "error_comment": "", "has_data_set": [], "suboperations": None},
     response(CT.encode() + b"\x00", 0x8001, 1, 0x0101, 0, element(0x1000, b"1.2\x00"))),
    ((0x8001, "1.2", 1, 0, "", None, "yes", [None, None, 3, None]), {},
     response(b"1.2\x00", 0x8001, 1, 0x0000, 0, us(0x1022, 3))),
])
def test_encode(codec: Codec, args: tuple[Any, ...], kwargs: dict[str, Any], expected: bytes) -> None:
    assert outcome(codec.encode_response, *args, **kwargs) == ("ok", bytes, expected)


@pytest.mark.parametrize(("args", "error"), [
    ((0x8001, "1.2.\u00e9", 1, 0), UnicodeEncodeError),
    ((0x8001, "1.2", 1, 0, "1.2.\u00e9"), UnicodeEncodeError),
    ((0x8001, None, 1, 0), AttributeError),
    ((0x10000, "1.2", 1, 0), OverflowError),
    ((0x8001, "1.2", -1, 0), OverflowError),
    ((0x8001, "1.2", 1, 1 << 64), OverflowError),
    ((0x8001, "1.2", 1, 0.0), AttributeError),
    ((0x8001, "1.2", 1, 0, "", b"bytes"), TypeError),
    ((0x8001, "1.2", 1, 0, "", "", False, (1, 2, 3)), ValueError),
    ((0x8001, "1.2", 1, 0, "", "", False, (1, 2, 3, 4, 5)), ValueError),
    ((0x8001, "1.2", 1, 0, "", "", False, (None, -1, 0, 0)), OverflowError),
    ((0x8001, "1.2", 1, 0, "", "", False, (None, 1.0, 0, 0)), AttributeError),
])
def test_encode_refuses_as_the_twin_does(codec: Codec, args: tuple[Any, ...], error: type[Exception]) -> None:
    expected = outcome(dimse.encode_response_py, *args)
    assert expected[:2] == ("raised", error)
    assert outcome(codec.encode_response, *args) == expected


def test_compiled_twin_encodes_the_usual_responses_itself(both: tuple[Codec, Codec],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Exact str and int arguments, as the association passes them, never reach the Python twin."""
    cext, py = both
    calls = [(dimse.C_STORE_RSP, CT, 7, dimse.SUCCESS, INSTANCE),
             (dimse.C_STORE_RSP, CT, 0xFFFF, 0xA700, "1.2", "disk \u00e9 full\\" * 9, False),
             (dimse.C_MOVE_RSP, "1.2", 0, 0xFF00, "", "", True, (None, 1 << 80, 0xFFFF, 0)),
             (dimse.C_GET_RSP, "1.23", 1, 0, "", "", 0, (None, None, None, None))]
    expected = [py.encode_response(*call) for call in calls]

    def refuse(*_args: object) -> None:
        raise AssertionError("the compiled twin called the Python one")

    monkeypatch.setattr(_dimse_py, "encode_response", refuse)
    monkeypatch.setattr(_dimse_py, "is_uid", refuse)
    assert [cext.encode_response(*call) for call in calls] == expected
    assert cext.is_uid(INSTANCE) and not cext.is_uid("1..2")
    with pytest.raises(AssertionError, match="called the Python one"):  # the test's premise
        cext.encode_response(dimse.C_STORE_RSP, CTImageStorage, 1, 0)


# -- is_uid -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ("1.2.3", True), ("0", True), ("1.02.003", True), (INSTANCE, True), ("1" * 64, True), ("1." * 31 + "12", True),
    ("1" * 65, False), ("1." * 32 + "1", False), ("", False), (".", False), ("1.", False), (".1", False),
    ("1..2", False), ("1.2\n", False), (" 1.2", False), ("1.2a", False), ("1.2\x00", False),
    ("\u0661.\u0662", False), ("1.\u00b2", False), ("\U0001d7cf", False), (UID("1.2"), True), (Text("1.x"), False),
])
def test_is_uid(codec: Codec, value: str, expected: bool) -> None:
    assert outcome(codec.is_uid, value) == ("ok", bool, expected)


@pytest.mark.parametrize("value", [b"1.2", None, 12, ["1"]])
def test_is_uid_refuses_as_the_twin_does(codec: Codec, value: object) -> None:
    expected = outcome(dimse.is_uid_py, value)
    assert expected[:2] == ("raised", TypeError)
    assert outcome(codec.is_uid, value) == expected


# -- generated ------------------------------------------------------------------------------------

TEXT_BYTES = b"0123456789.. \x00\t\r\n\x1c\x1f\\^ABCxyz\x01\x7f\x80\xe9\xff"


def random_value(rng: random.Random, number: int) -> bytes:
    """A value for ``number``: most often of its own VR, sometimes of any length and bytes."""
    if rng.random() < 0.15:
        return rng.randbytes(rng.randrange(0, 9))
    if number in _dimse_py.US_ELEMENTS:
        return struct.pack("<H", rng.randrange(0x10000))
    if number in _dimse_py.UL_ELEMENTS:
        return struct.pack("<I", rng.randrange(1 << 32))
    return bytes(rng.choice(TEXT_BYTES) for _ in range(rng.randrange(0, 70)))


def random_command_set(rng: random.Random) -> bytes:
    numbers = [*_dimse_py.KEYWORDS, 0x0000, 0x0001, 0x1020, 0x1023, 0x5010, 0xFFFF]
    chosen = rng.sample(numbers, rng.randrange(1, len(numbers)))
    if rng.random() < 0.9:
        chosen.append(0x0100)  # most have a Command Field
    if rng.random() < 0.1:
        chosen += rng.choices(chosen, k=2)  # repeated elements
    body = b"".join(element(number, random_value(rng, number)) for number in chosen)
    return group_length(body) if rng.random() < 0.5 else body


def corrupt(rng: random.Random, data: bytes) -> bytes:
    mutated = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        cut = rng.random()
        if cut < 0.25 and mutated:
            del mutated[rng.randrange(len(mutated)):]
        elif cut < 0.5 and len(mutated) >= 8:
            # a length field: huge, or a little off
            at = rng.randrange(0, len(mutated) - 3)
            mutated[at : at + 4] = struct.pack("<I", rng.choice([0xFFFFFFFF, 0x80000000, rng.randrange(0, 80)]))
        elif cut < 0.75 and mutated:
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        else:
            at = rng.randrange(len(mutated) + 1)
            mutated[at:at] = rng.randbytes(rng.randrange(1, 9))
    return bytes(mutated)


FAULTS = ("truncated", "in a command set", "runs past the end", "no Command Field")


def test_random_command_sets(both: tuple[Codec, Codec]) -> None:
    """Valid, corrupted and random command sets: the same dict (keys, order, types, values) or error."""
    cext, py = both
    rng = random.Random(20261203)
    cases = [random_command_set(rng) for _ in range(2000)]
    cases += [corrupt(rng, random_command_set(rng)) for _ in range(4000)]
    cases += [rng.randbytes(rng.randrange(0, 64)) for _ in range(500)]
    kinds: Counter[str] = Counter()
    for data in cases:
        expected = outcome(py.decode_command_set, data)
        assert outcome(cext.decode_command_set, data) == expected, data
        assert outcome(cext.decode_command_set, bytearray(data)) == expected, data
        kinds[next(kind for kind in FAULTS if kind in expected[2]) if expected[0] == "raised" else "decoded"] += 1
    # the cases reach every outcome, each many times
    assert set(kinds) == {"decoded", *FAULTS}, kinds
    assert min(kinds.values()) >= 200, kinds


def random_uid(rng: random.Random) -> str:
    return ".".join(str(rng.randrange(10 ** rng.randrange(1, 12))) for _ in range(rng.randrange(1, 10)))[:64]


def test_random_round_trips(both: tuple[Codec, Codec]) -> None:
    """encode_response -> decode_command_set: the same bytes from both twins, the values back from both."""
    cext, py = both
    rng = random.Random(7)
    comments = "abc ~\\\x00\x1f\x7f\u00e9\u4e2d\U0001f600"
    for _ in range(2000):
        sop_class, sop_instance = random_uid(rng), rng.choice(["", random_uid(rng)])
        field, message, status = rng.randrange(0x10000), rng.randrange(0x10000), rng.randrange(0x10000)
        comment = "".join(rng.choice(comments) for _ in range(rng.choice([0, 1, 5, 63, 64, 65, 100])))
        data_set = rng.choice([True, False, 0, 1, None])
        suboperations = rng.choice([None, (None, rng.randrange(1 << 17), 0, rng.randrange(5)),
                                    tuple(rng.randrange(0x10000) for _ in range(4))])
        args = (field, sop_class, message, status, sop_instance, comment, data_set, suboperations)
        encoded = py.encode_response(*args)
        assert cext.encode_response(*args) == encoded, args
        assert struct.unpack_from("<I", encoded, 8)[0] == len(encoded) - 12
        expected: dict[str, int | str] = {"AffectedSOPClassUID": sop_class, "CommandField": field,
                                          "MessageIDBeingRespondedTo": message,
                                          "CommandDataSetType": 0x0000 if data_set else 0x0101, "Status": status}
        if comment:
            sanitized = "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in comment[:64])
            expected["ErrorComment"] = sanitized.strip()
        if sop_instance:
            expected["AffectedSOPInstanceUID"] = sop_instance
        decoded = ("ok", [(key, type(value), value) for key, value in expected.items()])
        for twin in (cext, py):
            assert outcome(twin.decode_command_set, encoded) == decoded, args


def test_responses_read_by_pynetdicom(codec: Codec) -> None:
    encoded = codec.encode_response(dimse.C_GET_RSP, "1.2.3", 513, 0xB000, "1.2.34", "a comment", True,
                                    (1, 2, 3, 4))
    ds = decode(io.BytesIO(encoded), True, True)
    assert [e.keyword for e in ds] == [
        "CommandGroupLength", "AffectedSOPClassUID", "CommandField", "MessageIDBeingRespondedTo",
        "CommandDataSetType", "Status", "ErrorComment", "AffectedSOPInstanceUID",
        "NumberOfRemainingSuboperations", "NumberOfCompletedSuboperations", "NumberOfFailedSuboperations",
        "NumberOfWarningSuboperations"]
    assert [ds[e.tag].value for e in ds] == [len(encoded) - 12, "1.2.3", 0x8010, 513, 0x0000, 0xB000, "a comment",
                                             "1.2.34", 1, 2, 3, 4]


# -- the compiled twin reads the Python twin's tables ---------------------------------------------------------


def test_compiled_twin_follows_the_tables(both: tuple[Codec, Codec], monkeypatch: pytest.MonkeyPatch) -> None:
    from fastscp.net import _dimse_cext

    data = ECHO + us(0x1020, 5) + element(0x0002, b"1.2 ")
    try:
        monkeypatch.setitem(_dimse_py.KEYWORDS, 0x1020, "NumberOfRemainingSuboperations")
        monkeypatch.setattr(_dimse_py, "US_ELEMENTS", {*_dimse_py.US_ELEMENTS, 0x1020})
        monkeypatch.delitem(_dimse_py.KEYWORDS, 0x0002)
        _dimse_cext._load_tables()
        expected = ("ok", [("CommandField", int, 0x0030), ("NumberOfRemainingSuboperations", int, 5)])
        assert [outcome(twin.decode_command_set, data) for twin in both] == [expected, expected]
        monkeypatch.setattr(_dimse_py, "UI_ELEMENTS", (0x0002, 0x1000))
        with pytest.raises(ImportError, match="UI_ELEMENTS differs"):
            _dimse_cext._load_tables()
        monkeypatch.setitem(_dimse_py.KEYWORDS, 0x2000, "Beyond")
        with pytest.raises(ImportError, match="past TABLE_SIZE"):
            _dimse_cext._load_tables()
    finally:
        monkeypatch.undo()
        _dimse_cext._load_tables()
    assert outcome(both[0].decode_command_set, data) == ("ok", [("CommandField", int, 0x0030),
                                                                ("AffectedSOPClassUID", str, "1.2")])
