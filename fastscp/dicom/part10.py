"""DICOM Part 10 file framing (PS3.10 7.1): preamble, prefix and File Meta Information.

The dataset that follows is written exactly as received; only this header is
made by fastscp.
"""

from __future__ import annotations

import struct

from fastscp.dicom.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

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


_ELEMENT = struct.Struct("<HH2s")


def read_file_meta(data: bytes) -> tuple[dict[int, str], int]:
    """The File Meta Information text elements of a Part 10 file, and where its data set starts.

    Walks group 0002 element by element (always Explicit VR Little Endian),
    so a file without (0002,0000) Group Length is read too.

    Returns
    -------
    (dict, int)
        Element number (0x0010 for Transfer Syntax UID) -> value without
        padding; the offset of the data set.

    Raises
    ------
    ValueError
        No ``DICM`` prefix, or the meta group runs past ``data``.
    """
    if len(data) < 132 or data[128:132] != b"DICM":
        raise ValueError("not a DICOM Part 10 file (no DICM prefix)")
    pos = 132
    values: dict[int, str] = {}
    while pos + 8 <= len(data):
        group, element, vr = _ELEMENT.unpack_from(data, pos)
        if group != 0x0002:
            break
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
            if pos + 12 > len(data):
                raise ValueError("File Meta Information runs past the end of the data")
            length = struct.unpack_from("<I", data, pos + 8)[0]
            start = pos + 12
        else:
            length = struct.unpack_from("<H", data, pos + 6)[0]
            start = pos + 8
        end = start + length
        if end > len(data):
            raise ValueError("File Meta Information runs past the end of the data")
        if vr in (b"UI", b"AE", b"SH", b"CS", b"LO"):
            values[element] = data[start:end].decode("ascii", "replace").rstrip("\0 ").lstrip(" ")
        pos = end
    if 0x0010 not in values:
        raise ValueError("File Meta Information has no Transfer Syntax UID (0002,0010)")
    return values, pos
