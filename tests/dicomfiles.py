"""DICOM bytes for the header tests: corpus files split at the File Meta, and a
tiny element encoder for datasets that pydicom will not write (odd lengths,
undefined-length private sequences, UN sequences, truncations).

Importable without pytest.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pydicom.data

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"

PYDICOM_DATA = Path(os.path.dirname(pydicom.data.__file__))
# pydicom's bundled test corpus: test_files/ (with dicomdirtests/) and the
# character set examples, which pydicom keeps in a sibling folder.
CORPUS_ROOTS = (PYDICOM_DATA / "test_files", PYDICOM_DATA / "charset_files")


class NotPart10(ValueError):
    """No File Meta Information with a Transfer Syntax UID."""


def dataset_bytes(path: str | os.PathLike[str]) -> tuple[bytes, str]:
    """Split a Part 10 file into (dataset bytes, Transfer Syntax UID).

    The dataset is everything after the File Meta group (0002,eeee), which is
    always Explicit VR Little Endian (PS3.10 7.1).  The group is walked element
    by element rather than trusting (0002,0000) File Meta Information Group
    Length, which some files lack.  Files without the 128-byte preamble but
    starting with the File Meta group are accepted, as pydicom does.
    """
    buf = Path(path).read_bytes()
    if buf[128:132] == b"DICM":
        pos = 132
    elif buf[:2] == b"\x02\x00":
        pos = 0
    else:
        raise NotPart10(f"{path}: no DICM prefix and no File Meta group")
    ts_uid = None
    while len(buf) - pos >= 8:
        group, element = struct.unpack_from("<HH", buf, pos)
        if group != 0x0002:
            break
        vr = buf[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            (length,) = struct.unpack_from("<I", buf, pos + 8)
            header = 12
        else:
            (length,) = struct.unpack_from("<H", buf, pos + 6)
            header = 8
        if element == 0x0010:
            ts_uid = buf[pos + header : pos + header + length].decode("ascii").rstrip("\0 ")
        pos += header + length
    if not ts_uid:
        raise NotPart10(f"{path}: File Meta has no (0002,0010) Transfer Syntax UID")
    return buf[pos:], ts_uid


def corpus_files() -> Iterator[Path]:
    """Every file of pydicom's corpus that has File Meta with a Transfer Syntax."""
    for root in CORPUS_ROOTS:
        for path in sorted(root.rglob("*")):
            if not path.is_file():
                continue
            try:
                dataset_bytes(path)
            except (NotPart10, struct.error, UnicodeDecodeError):
                continue
            yield path


def corpus_id(path: Path) -> str:
    return str(path.relative_to(PYDICOM_DATA))


# -- a tiny encoder -----------------------------------------------------------------

LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
UNDEFINED = 0xFFFFFFFF


class Encoder:
    """Encode data elements in one of the three uncompressed encodings.

    Values are given as encoded bytes (``pad()`` adds DICOM padding) or as
    ``int`` for US.  ``length`` overrides the length field, to make garbage.
    """

    def __init__(self, explicit: bool = True, big: bool = False) -> None:
        self.explicit = explicit
        self.big = big
        self._e = ">" if big else "<"

    def tag(self, tag: int) -> bytes:
        return struct.pack(self._e + "HH", tag >> 16, tag & 0xFFFF)

    def header(self, tag: int, vr: str, length: int) -> bytes:
        if not self.explicit:
            return self.tag(tag) + struct.pack(self._e + "I", length)
        if vr in LONG_VRS:
            return self.tag(tag) + vr.encode() + b"\0\0" + struct.pack(self._e + "I", length)
        return self.tag(tag) + vr.encode() + struct.pack(self._e + "H", length)

    def element(self, tag: int, vr: str, value: bytes | int, length: int | None = None) -> bytes:
        if isinstance(value, int):
            value = struct.pack(self._e + "H", value)
        return self.header(tag, vr, len(value) if length is None else length) + value

    def item(self, content: bytes, undefined: bool = True) -> bytes:
        if undefined:
            return (self.tag(0xFFFEE000) + struct.pack(self._e + "I", UNDEFINED) + content
                    + self.tag(0xFFFEE00D) + b"\0\0\0\0")
        return self.tag(0xFFFEE000) + struct.pack(self._e + "I", len(content)) + content

    def sequence(self, tag: int, items: list[bytes], undefined: bool = True,
                 vr: str = "SQ") -> bytes:
        body = b"".join(items)
        if undefined:
            return (self.header(tag, vr, UNDEFINED) + body
                    + self.tag(0xFFFEE0DD) + b"\0\0\0\0")
        return self.header(tag, vr, len(body)) + body


def pad(text: str | bytes, vr: str = "LO", encoding: str = "ascii") -> bytes:
    """Encode `text` and pad it to even length (NUL for UI, space otherwise)."""
    raw = text.encode(encoding) if isinstance(text, str) else text
    if len(raw) % 2:
        raw += b"\0" if vr == "UI" else b" "
    return raw
