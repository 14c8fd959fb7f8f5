"""DIMSE command sets (PS3.7 section 9 and annex E): decode requests, encode responses.

A command set is always Implicit VR Little Endian and holds only group 0000
elements of a handful of VRs, so a dedicated codec is a few lines and avoids
building a pydicom Dataset for every C-STORE (~0.3 ms each in pynetdicom).
No I/O here: bytes in, values out.

The request decoder, the response encoder and :func:`is_uid` run in the
compiled module ``fastscp.net._dimse_cext`` (built from
``fastscp/net/_dimse_cext.pyx``) unless the environment sets
``FASTSCP_NO_EXTENSIONS=1`` or the module is not built; then the pure-Python
twin ``fastscp.net._dimse_py`` runs, with the same results and errors.
:data:`BACKEND` tells which one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from fastscp.dicom.backend import compiled
from fastscp.net import _dimse_py

# Re-exported: what fastscp and its tests import from here. The codec's tables
# and helpers live in the twin; encode_request below builds on the same helpers.
from fastscp.net._dimse_py import DATA_SET_FOLLOWS as DATA_SET_FOLLOWS
from fastscp.net._dimse_py import NO_DATA_SET as NO_DATA_SET
from fastscp.net._dimse_py import CommandSetError as CommandSetError
from fastscp.net._dimse_py import _group, _text, _us

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


# -- the codec: compiled, or its pure-Python twin ---------------------------------------------

DecodeCommandSet = Callable[[bytes | bytearray | memoryview], dict[str, int | str]]
EncodeResponse = Callable[..., bytes]
IsUID = Callable[[str], bool]

_CEXT = "fastscp.net._dimse_cext"
#: The compiled codec's functions; None if not built or if FASTSCP_NO_EXTENSIONS=1
#: (then the module is not even imported).
decode_command_set_cext: DecodeCommandSet | None = compiled(_CEXT, "decode_command_set")
encode_response_cext: EncodeResponse | None = compiled(_CEXT, "encode_response")
is_uid_cext: IsUID | None = compiled(_CEXT, "is_uid")
decode_command_set_py: DecodeCommandSet = _dimse_py.decode_command_set
encode_response_py: EncodeResponse = _dimse_py.encode_response
is_uid_py: IsUID = _dimse_py.is_uid

#: "cext" or "py": the implementation behind the three functions below.
BACKEND: Final = "cext" if decode_command_set_cext is not None else "py"

# Bound directly, not wrapped: a wrapper would restate the signatures and add
# 15-30 ns a call to the compiled 80-240 ns. The docstrings are the twin's
# (fastscp/net/_dimse_py.py); the compiled module's types, its .pyi.
#: Decode a request's command set into ``{keyword: value}``; raises CommandSetError.
decode_command_set: DecodeCommandSet = decode_command_set_cext or decode_command_set_py
#: Encode a C-STORE/C-ECHO/C-FIND/C-MOVE/C-GET response's command set.
encode_response: EncodeResponse = encode_response_cext or encode_response_py
#: True if a str can be a UID: digits and dots, at most 64 characters (PS3.5 9.1).
is_uid: IsUID = is_uid_cext or is_uid_py


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
