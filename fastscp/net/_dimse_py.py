"""DIMSE command set codec: the pure-Python twin of ``fastscp/net/_dimse_cext.pyx``.

Decodes a request's command set, encodes a response's, and tells a UID from
anything else. :mod:`fastscp.net.dimse` gives the compiled twin unless
``FASTSCP_NO_EXTENSIONS=1`` or it is not built; the tables here are the
single source of truth, which the compiled twin reads at import. No I/O:
bytes in, values out.
"""

from __future__ import annotations

import re
import struct

#: Command Data Set Type value meaning "no data set follows".
NO_DATA_SET = 0x0101
#: Any other value means a data set follows; this is the usual one.
DATA_SET_FOLLOWS = 0x0000

# The command elements fastscp reads, by element number, with their VR.
US_ELEMENTS = {0x0100, 0x0110, 0x0120, 0x0700, 0x0800, 0x0900, 0x1002, 0x1008, 0x1031}
UL_ELEMENTS = {0x0000}
TEXT_ELEMENTS = {0x0002, 0x0003, 0x1000, 0x1001, 0x1030, 0x0902, 0x0600}
#: The UI ones: their values pad with NUL, the other text VRs' with a space (PS3.5 6.2).
UI_ELEMENTS = (0x0002, 0x0003, 0x1000, 0x1001)

#: Keyword of each command element fastscp reads (PS3.7 E.1-1); the others are skipped.
KEYWORDS = {
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

#: LO (Error Comment) holds at most 64 characters (PS3.5 6.2).
MAX_COMMENT = 64
#: A UID has at most 64 characters (PS3.5 9.1).
MAX_UID = 64

_ELEMENT = struct.Struct("<HHI")
# PS3.5 9.1: digits and dots, at most 64 characters. Leading zeros in a
# component are tolerated: real senders make them, and they harm nothing.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def is_uid(value: str) -> bool:
    """True if ``value`` can be a UID (and so a file name and a File Meta value)."""
    return len(value) <= MAX_UID and _UID.fullmatch(value) is not None


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
        name = KEYWORDS.get(element)
        if name is None:
            continue
        if element in US_ELEMENTS and length == 2:
            out[name] = int.from_bytes(value, "little")
        elif element in UL_ELEMENTS and length == 4:
            out[name] = int.from_bytes(value, "little")
        elif element in TEXT_ELEMENTS:
            out[name] = value.rstrip(b"\x00 ").decode("ascii", "replace").strip()
    if "CommandField" not in out:
        raise CommandSetError("command set has no Command Field (0000,0100)")
    return out


def _text(element: int, value: str) -> bytes:
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += b"\x00" if element in UI_ELEMENTS else b" "
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
        comment = "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in error_comment[:MAX_COMMENT])
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
