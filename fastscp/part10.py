"""DICOM Part 10 file framing (PS3.10 7.1): preamble, prefix and File Meta Information.

The dataset that follows is written exactly as received; only this header is
made by fastscp.
"""

from __future__ import annotations

import struct

from fastscp.negotiation import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

PREAMBLE = b"\x00" * 128 + b"DICM"

_SHORT = struct.Struct("<HH2sH")  # explicit VR with a 2-byte length
_LONG = struct.Struct("<HH2s2xI")  # OB and friends: 2 reserved bytes, 4-byte length


def _element(element: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    if vr == b"OB":
        return _LONG.pack(0x0002, element, vr, len(value)) + value
    return _SHORT.pack(0x0002, element, vr, len(value)) + value


def file_meta(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    source_ae_title: str = "",
) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group, encoded.

    Parameters
    ----------
    sop_class_uid, sop_instance_uid : str
        Media Storage SOP Class/Instance UID: the C-STORE's Affected ones.
    transfer_syntax_uid : str
        The presentation context's transfer syntax: the dataset's encoding.
    source_ae_title : str
        Source Application Entity Title: the calling AE.
    """
    body = _element(0x0001, b"OB", b"\x00\x01", b"")
    body += _element(0x0002, b"UI", sop_class_uid.encode("ascii"), b"\x00")
    body += _element(0x0003, b"UI", sop_instance_uid.encode("ascii"), b"\x00")
    body += _element(0x0010, b"UI", transfer_syntax_uid.encode("ascii"), b"\x00")
    body += _element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii"), b"\x00")
    body += _element(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME.encode("ascii"), b" ")
    if source_ae_title:
        body += _element(0x0016, b"AE", source_ae_title.encode("ascii", "replace"), b" ")
    group_length = _SHORT.pack(0x0002, 0x0000, b"UL", 4) + struct.pack("<I", len(body))
    return PREAMBLE + group_length + body


def dataset_offset(header: bytes) -> int:
    """Where the dataset starts in a Part 10 file, from its first bytes.

    Raises
    ------
    ValueError
        If ``header`` does not start with a preamble, ``DICM`` and a File
        Meta Group Length element.
    """
    if len(header) < 144 or header[128:132] != b"DICM":
        raise ValueError("not a DICOM Part 10 file (no DICM prefix)")
    group, element, vr, length = _SHORT.unpack_from(header, 132)
    if (group, element, vr, length) != (0x0002, 0x0000, b"UL", 4):
        raise ValueError("File Meta Information Group Length (0002,0000) missing")
    return 144 + struct.unpack_from("<I", header, 140)[0]
