"""DIMSE command sets (PS3.7 section 9 and annex E): decode requests, encode responses.

A command set is always Implicit VR Little Endian and holds only group 0000
elements of a handful of VRs, so a dedicated codec is a few lines and avoids
building a pydicom Dataset for every C-STORE (~0.3 ms each in pynetdicom).
No I/O here: bytes in, values out.
"""

from __future__ import annotations

import re
import struct

# Command Field values (PS3.7 E.1-1).
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_GET_RQ = 0x0010
C_GET_RSP = 0x8010
C_FIND_RQ = 0x0020
C_FIND_RSP = 0x8020
C_MOVE_RQ = 0x0021
C_MOVE_RSP = 0x8021
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
C_CANCEL_RQ = 0x0FFF
N_EVENT_REPORT_RQ = 0x0100
N_EVENT_REPORT_RSP = 0x8100
N_ACTION_RQ = 0x0130
N_ACTION_RSP = 0x8130

#: Command Data Set Type value meaning "no data set follows".
NO_DATA_SET = 0x0101
#: Any other value means a data set follows; this is the usual one.
DATA_SET_FOLLOWS = 0x0000

# Status codes (PS3.4 B.2.3 for C-STORE, PS3.7 C for the general ones).
SUCCESS = 0x0000
#: PS3.7 C.4: a failure; used for a resend with other content (storage.duplicates: reject).
DUPLICATE_SOP_INSTANCE = 0x0111
OUT_OF_RESOURCES = 0xA700
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122
#: PS3.7 C.5: the SOP Instance UID violates the UID construction rules.
INVALID_OBJECT_INSTANCE = 0x0117
UNRECOGNIZED_OPERATION = 0x0211

STATUS_NAMES: dict[int, str] = {
    SUCCESS: "Success",
    DUPLICATE_SOP_INSTANCE: "Duplicate SOP instance",
    OUT_OF_RESOURCES: "Out of resources",
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS: "Data set does not match SOP class",
    CANNOT_UNDERSTAND: "Cannot understand",
    SOP_CLASS_NOT_SUPPORTED: "SOP class not supported",
    INVALID_OBJECT_INSTANCE: "Invalid object instance",
    UNRECOGNIZED_OPERATION: "Unrecognized operation",
}

# C-STORE statuses a receiver may send that fastscp itself never does (PS3.4 B.2.3):
# failures by range, warnings by code.
_STORE_FAILURE_RANGES: tuple[tuple[int, int, str], ...] = (
    (0xA700, 0xA7FF, "Out of resources"),
    (0xA900, 0xA9FF, "Data set does not match SOP class"),
    (0xC000, 0xCFFF, "Cannot understand"),
)
_STORE_WARNINGS: dict[int, str] = {
    0xB000: "Coercion of data elements",
    0xB007: "Data set does not match SOP class",
    0xB006: "Elements discarded",
}


def status_name(code: int) -> str:
    """The PS3.4/PS3.7 name of a C-STORE response status, e.g. ``0xA701`` -> "Out of resources"."""
    if code in STATUS_NAMES:
        return STATUS_NAMES[code]
    if code in _STORE_WARNINGS:
        return _STORE_WARNINGS[code]
    for low, high, name in _STORE_FAILURE_RANGES:
        if low <= code <= high:
            return name
    return "Warning" if is_warning(code) else "Failure"


def is_warning(code: int) -> bool:
    """A warning status (PS3.7 C.1.3: 0x0001 or 0xBxxx): the object was stored."""
    return code == 0x0001 or 0xB000 <= code <= 0xBFFF

# The command elements fastscp reads, by element number, with their VR.
_US = {0x0100, 0x0110, 0x0120, 0x0700, 0x0800, 0x0900, 0x1002, 0x1008, 0x1031}
_UL = {0x0000}
_TEXT = {0x0002, 0x0003, 0x1000, 0x1001, 0x1030, 0x0902, 0x0600}

_NAMES = {
    0x0002: "AffectedSOPClassUID",
    0x0003: "RequestedSOPClassUID",
    0x0100: "CommandField",
    0x0110: "MessageID",
    0x0120: "MessageIDBeingRespondedTo",
    0x0600: "MoveDestination",
    0x0700: "Priority",
    0x0800: "CommandDataSetType",
    0x0900: "Status",
    0x0902: "ErrorComment",
    0x1000: "AffectedSOPInstanceUID",
    0x1001: "RequestedSOPInstanceUID",
    0x1002: "EventTypeID",
    0x1008: "ActionTypeID",
    0x1030: "MoveOriginatorApplicationEntityTitle",
    0x1031: "MoveOriginatorMessageID",
}

_ELEMENT = struct.Struct("<HHI")
# PS3.5 9.1: digits and dots, at most 64 characters. Leading zeros in a
# component are tolerated: real senders make them, and they harm nothing.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def is_uid(value: str) -> bool:
    """True if ``value`` can be a UID (and so a file name and a File Meta value)."""
    return len(value) <= 64 and _UID.fullmatch(value) is not None


class CommandSetError(ValueError):
    """A command set that can't be decoded."""


def decode_command_set(data: bytes | bytearray | memoryview) -> dict[str, int | str]:
    """Decode a command set into ``{keyword: value}``.

    Elements fastscp does not use are skipped; values of type US/UL become
    ``int``, UI/AE/LO become ``str`` without padding.

    Raises
    ------
    CommandSetError
        On a truncated element or an element outside group 0000.
    """
    data = bytes(data)
    out: dict[str, int | str] = {}
    pos, end = 0, len(data)
    while pos < end:
        if pos + 8 > end:
            raise CommandSetError(f"command set truncated at byte {pos}")
        group, element, length = _ELEMENT.unpack_from(data, pos)
        pos += 8
        if group != 0x0000:
            raise CommandSetError(f"element ({group:04X},{element:04X}) in a command set")
        if length > end - pos:
            raise CommandSetError(f"element (0000,{element:04X}) runs past the end")
        value = data[pos : pos + length]
        pos += length
        name = _NAMES.get(element)
        if name is None:
            continue
        if element in _US and length == 2:
            out[name] = int.from_bytes(value, "little")
        elif element in _UL and length == 4:
            out[name] = int.from_bytes(value, "little")
        elif element in _TEXT:
            out[name] = value.rstrip(b"\x00 ").decode("ascii", "replace").strip()
    if "CommandField" not in out:
        raise CommandSetError("command set has no Command Field (0000,0100)")
    return out


def _text(element: int, value: str) -> bytes:
    raw = value.encode("ascii")
    if len(raw) % 2:
        # UI values pad with NUL, the other text VRs with a space (PS3.5 6.2).
        raw += b"\x00" if element in (0x0002, 0x0003, 0x1000, 0x1001) else b" "
    return _ELEMENT.pack(0, element, len(raw)) + raw


def _us(element: int, value: int) -> bytes:
    return _ELEMENT.pack(0, element, 2) + value.to_bytes(2, "little")


def encode_response(
    command_field: int,
    sop_class_uid: str,
    message_id: int,
    status: int,
    sop_instance_uid: str = "",
    error_comment: str = "",
    has_data_set: bool = False,
    suboperations: tuple[int | None, int, int, int] | None = None,
) -> bytes:
    """Encode a C-STORE-RSP, C-ECHO-RSP, C-FIND-RSP, C-MOVE-RSP or C-GET-RSP command set.

    ``suboperations``: (remaining, completed, failed, warning) of a C-MOVE or
    C-GET (PS3.7 9.3.4.2, 9.3.3.2); remaining None: left out (final responses).
    """
    body = _text(0x0002, sop_class_uid)
    body += _us(0x0100, command_field)
    body += _us(0x0120, message_id)
    body += _us(0x0800, DATA_SET_FOLLOWS if has_data_set else NO_DATA_SET)
    body += _us(0x0900, status)
    if error_comment:
        # LO, default repertoire: the comment may quote peer data (a UID from
        # the data set), so anything else becomes "?".
        comment = "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in error_comment[:64])
        body += _text(0x0902, comment)
    if sop_instance_uid:
        body += _text(0x1000, sop_instance_uid)
    if suboperations is not None:
        for element, count in zip((0x1020, 0x1021, 0x1022, 0x1023), suboperations, strict=True):
            if count is not None:
                body += _us(element, min(count, 0xFFFF))
    return _group(body)


def _group(body: bytes) -> bytes:
    """A command set: Command Group Length (0000,0000) and then ``body``."""
    return _ELEMENT.pack(0, 0, 4) + len(body).to_bytes(4, "little") + body


def encode_request(command_field: int, sop_class_uid: str, sop_instance_uid: str, message_id: int, *,
                   priority: int | None = None, event_type_id: int | None = None) -> bytes:
    """Encode the command set of a request a data set follows: a C-STORE-RQ (PS3.7 9.3.1.1, with
    ``priority``) or an N-EVENT-REPORT-RQ (PS3.7 10.3.1.1, with ``event_type_id``)."""
    body = _text(0x0002, sop_class_uid) + _us(0x0100, command_field) + _us(0x0110, message_id)
    if priority is not None:
        body += _us(0x0700, priority)
    body += _us(0x0800, DATA_SET_FOLLOWS) + _text(0x1000, sop_instance_uid)
    if event_type_id is not None:
        body += _us(0x1002, event_type_id)
    return _group(body)
