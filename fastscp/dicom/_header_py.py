"""Pure-Python DICOM header scanner: the twin of ``fastscp/dicom/_header_cext.pyx``.

This module is the reference implementation: the Cython module
``fastscp.dicom._header_cext`` must give the same :class:`HeaderFields` and raise the
same errors for every input.  It also holds what both twins share beyond
their result (:mod:`fastscp.dicom.fields`: the result and error types, the
table of kept elements): the transfer syntax switch, the deflate path and the
rarely used value conversions (character sets, odd numeric strings), so that
the compiled module only re-implements the hot loop.

The scanner reads a DICOM *dataset* (PS3.5 section 7) as sent in a C-STORE: no
preamble, no File Meta Information.  It walks the top-level data elements up to
Pixel Data, skips sequences and private elements without decoding them, and
converts only the ~35 elements that :class:`HeaderFields` keeps.  Values are
converted with the same rules as pydicom (trailing padding, first value of a
multi-valued number, Specific Character Set decoding), so that the index holds
what ``pydicom.dcmread`` would show.
"""

from __future__ import annotations

import functools
import math
import re
import struct
import zlib
from collections.abc import Callable
from typing import Final

import msgspec
from pydicom.charset import convert_encodings, decode_bytes, python_encoding
from pydicom.datadict import DicomDictionary
from pydicom.multival import MultiValue
from pydicom.valuerep import TEXT_VR_DELIMS
from pydicom.values import convert_PN, convert_text

# What both twins yield, shared with the rest of fastscp (fastscp.dicom.fields); the compiled
# twin reads these through this module and checks its C copies against them at import.
from fastscp.dicom.fields import (  # noqa: F401
    ALL_VALUES,
    FIELDS,
    KIND_DS,
    KIND_IS,
    KIND_PN,
    KIND_STR,
    KIND_TEXT,
    KIND_US,
    MAP_FD,
    MAP_FL,
    MAP_KINDS,
    MAP_LONG_TEXT,
    MAP_MAX_CHARS,
    MAP_MAX_ELEMENTS,
    MAP_MAX_VALUE,
    MAP_PN,
    MAP_SL,
    MAP_SS,
    MAP_STRIP,
    MAP_SV,
    MAP_TEXT,
    MAP_UL,
    MAP_UR,
    MAP_US,
    MAP_UV,
    HeaderError,
    HeaderFields,
    IncompleteHeader,
    map_eligible,
)

__all__ = [
    "HeaderError",
    "HeaderFields",
    "IncompleteHeader",
    "parse_header",
]


_SLOT_BY_TAG: Final = {tag: slot for slot, (tag, _, _) in enumerate(FIELDS)}

_MAP_NUMBERS: Final = {MAP_US: "H", MAP_SS: "h", MAP_UL: "I", MAP_SL: "i", MAP_UV: "Q", MAP_SV: "q",
                       MAP_FL: "f", MAP_FD: "d"}
#: Implicit VR: the map kind of each tag the data dictionary gives one kept VR
#: ("US or SS" and other VRs that depend on the data are left out).
IMPLICIT_MAP_KINDS: Final[dict[int, int]] = {
    tag: MAP_KINDS[entry[0].encode()] for tag, entry in sorted(DicomDictionary.items())
    if entry[0].encode() in MAP_KINDS
}
# Transfer syntaxes whose dataset is not Explicit VR Little Endian.
IMPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BIG_ENDIAN: Final = "1.2.840.10008.1.2.2"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2.1.99"
# JPIP Referenced Deflate and JPIP HTJ2K Referenced Deflate deflate the dataset
# too (PS3.5 A.6, A.7); pydicom 3.0 only knows the first of the three.
DEFLATED_SYNTAXES: Final = frozenset(
    {DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.205"}
)

# Encodings (the value of encoding_for()).
ENC_IMPLICIT_LE: Final = 0
ENC_EXPLICIT_LE: Final = 1
ENC_EXPLICIT_BE: Final = 2
ENC_DEFLATED: Final = 3


def encoding_for(transfer_syntax_uid: str) -> int:
    """Return how a dataset in `transfer_syntax_uid` is encoded (``ENC_*``).

    Every transfer syntax other than Implicit VR Little Endian, Explicit VR
    Big Endian and the deflated ones encodes its dataset as Explicit VR Little
    Endian, including all the encapsulated (compressed) ones.
    """
    uid = transfer_syntax_uid.rstrip("\0 ")  # UI padding, if the caller kept it
    if uid == IMPLICIT_VR_LITTLE_ENDIAN:
        return ENC_IMPLICIT_LE
    if uid == EXPLICIT_VR_BIG_ENDIAN:
        return ENC_EXPLICIT_BE
    if uid in DEFLATED_SYNTAXES:
        return ENC_DEFLATED
    return ENC_EXPLICIT_LE


# Data element structure (PS3.5 7.1, 7.5).
ITEM: Final = 0xFFFEE000
ITEM_DELIMITATION: Final = 0xFFFEE00D
SEQUENCE_DELIMITATION: Final = 0xFFFEE0DD
UNDEFINED_LENGTH: Final = 0xFFFFFFFF
# Pixel Data, Float Pixel Data, Double Float Pixel Data: the scan stops there.
PIXEL_DATA_TAGS: Final = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
# Explicit VRs with 2 reserved bytes and a 32-bit length (PS3.5 table 7.1-1).
LONG_VRS: Final = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
# Open sequences plus open items; real data nests a handful deep.
MAX_DEPTH: Final = 64
# A deflated dataset is inflated in chunks, first INFLATE_CHUNK bytes, its input
# fed INFLATE_CHUNK bytes at a time; a header (everything before Pixel Data)
# inflating past MAX_INFLATED is refused: it bounds a worker's memory against
# a compression bomb (the whole data set is walked in bounded memory first,
# fastscp.dicom.walk).
INFLATE_CHUNK: Final = 1 << 16
MAX_INFLATED: Final = 64 << 20

# Error codes shared with fastscp/dicom/_header_cext.pyx; make_error() turns them into text.
ERR_HEADER: Final = 1  # element/item header runs past the end
ERR_VALUE: Final = 2  # defined-length value runs past the end
ERR_ITEM: Final = 3  # defined-length item runs past the end
ERR_UNCLOSED: Final = 4  # data ends inside an undefined-length sequence or item
ERR_END: Final = 5  # data ends before Pixel Data (complete=False only)
ERR_NOT_ITEM: Final = 6  # sequence content that is not an item or delimiter
ERR_DELIMITER: Final = 7  # item or delimiter tag where a data element belongs
ERR_DEPTH: Final = 8  # sequences nested deeper than MAX_DEPTH
ERR_TAG: Final = 9  # data ends inside a tag
_TRUNCATION: Final = frozenset({ERR_HEADER, ERR_VALUE, ERR_ITEM, ERR_UNCLOSED, ERR_END, ERR_TAG})


def _tag_str(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def make_error(code: int, pos: int, tag: int, length: int, start: int, size: int, complete: bool) -> HeaderError:
    """Build the exception for a failed scan (shared by both twins).

    Running out of data gives :class:`IncompleteHeader` when the caller said
    more may follow (``complete=False``), :class:`HeaderError` otherwise.
    """
    if code == ERR_HEADER:
        msg = f"header of {_tag_str(tag)} at byte offset {pos} runs past the end"
    elif code == ERR_VALUE:
        msg = f"value of {_tag_str(tag)} at byte offset {pos} (length {length}) runs past the end"
    elif code == ERR_ITEM:
        msg = f"item at byte offset {pos} (length {length}) runs past the end"
    elif code == ERR_UNCLOSED:
        msg = f"data ends inside the undefined-length sequence or item opened at byte offset {start}"
    elif code == ERR_END:
        msg = f"data ends at byte offset {pos}, before Pixel Data"
    elif code == ERR_NOT_ITEM:
        msg = f"expected an item or a sequence delimiter, got {_tag_str(tag)} at byte offset {pos}"
    elif code == ERR_DELIMITER:
        msg = f"unexpected {_tag_str(tag)} at byte offset {pos} where a data element belongs"
    elif code == ERR_DEPTH:
        msg = f"sequences nested deeper than {MAX_DEPTH} levels at byte offset {pos}"
    elif code == ERR_TAG:
        msg = f"tag at byte offset {pos} runs past the end"
    else:  # pragma: no cover - a new code without a message is a bug
        msg = f"scan error {code} at byte offset {pos}"
    if code in _TRUNCATION:
        msg = f"{msg} of the data ({size} bytes)"
        if not complete:
            return IncompleteHeader(msg)
    return HeaderError(msg)


class _ScanError(Exception):
    """Internal: carries make_error()'s arguments out of the scan loop."""

    def __init__(self, code: int, pos: int, tag: int = 0, length: int = 0, start: int = 0):
        super().__init__(code)
        self.args5 = (code, pos, tag, length, start)


_UNPACK_TAG = {False: struct.Struct("<HH").unpack_from, True: struct.Struct(">HH").unpack_from}
_UNPACK_U16 = {False: struct.Struct("<H").unpack_from, True: struct.Struct(">H").unpack_from}
_UNPACK_U32 = {False: struct.Struct("<I").unpack_from, True: struct.Struct(">I").unpack_from}

# Stack levels: a dataset (top level, or an undefined-length item) holds data
# elements; an undefined-length sequence holds items.
_DATASET: Final = 0
_SEQUENCE: Final = 1


def _is_vr(b0: int, b1: int) -> bool:
    # pydicom's test for "these two bytes are an explicit VR": both A-Z.
    return 0x41 <= b0 <= 0x5A and 0x41 <= b1 <= 0x5A


def vr_switch(explicit: bool, vr0: int, vr1: int, first: bool, at_zero: bool) -> tuple[bool, bool]:
    """pydicom's explicit/implicit rule for one element (the Python twins of the
    header scan and of the walk share it; the compiled ones repeat it in C).

    Returns (this element is explicit, its data set is from now on): bytes
    that are no VR make the element implicit, and the whole data set if it
    is its ``first`` element; a VR at offset 0 of an implicit data set
    (``at_zero``) makes the data set explicit (one sent as implicit).
    """
    if explicit:
        if _is_vr(vr0, vr1):
            return True, True
        return False, not first
    if at_zero and _is_vr(vr0, vr1):
        return True, True
    return False, False


def scan(
    buf: memoryview, explicit: bool, big: bool, complete: bool
) -> tuple[list[int], list[int], int | None, list[tuple[int, int, int, int]]]:
    """Walk `buf` up to Pixel Data and find the kept top-level elements.

    Returns
    -------
    offsets, lengths : list of int
        Per slot of :data:`FIELDS`: value offset and length, -1 if absent.
    pixel_data_offset : int or None
        Offset of the Pixel Data tag, None if the dataset has none.
    entries : list of (tag, map kind, offset, length)
        The other elements for the attribute map (:func:`build_map`).

    Raises
    ------
    _ScanError
        With the arguments of :func:`make_error`.
    """
    n = len(buf)
    offsets = [-1] * len(FIELDS)
    lengths = [-1] * len(FIELDS)
    entries: list[tuple[int, int, int, int]] = []
    # Each level: [kind, explicit, big, start offset]; start is where its first
    # element (or item) begins, used for pydicom's implicit/explicit detection.
    stack: list[list] = [[_DATASET, explicit, big, 0]]
    pos = 0
    # Every pass consumes >= 8 bytes or leaves, so this ends within n / 8 passes.
    while True:
        level = stack[-1]
        kind, explicit, big, start = level
        if n - pos < 4:
            if pos == n and len(stack) == 1:
                if complete:
                    return offsets, lengths, None, entries
                raise _ScanError(ERR_END, pos)
            if pos == n:
                raise _ScanError(ERR_UNCLOSED, pos, start=start)
            raise _ScanError(ERR_TAG, pos)
        group, element = _UNPACK_TAG[big](buf, pos)
        tag = group << 16 | element

        if kind == _SEQUENCE:
            if n - pos < 8:
                raise _ScanError(ERR_HEADER, pos, tag)
            (length,) = _UNPACK_U32[big](buf, pos + 4)
            if tag == ITEM:
                if length == UNDEFINED_LENGTH:
                    if len(stack) >= MAX_DEPTH:
                        raise _ScanError(ERR_DEPTH, pos, tag)
                    stack.append([_DATASET, explicit, big, pos + 8])
                    pos += 8
                elif length > n - pos - 8:
                    raise _ScanError(ERR_ITEM, pos, tag, length)
                else:
                    pos += 8 + length
            elif tag == SEQUENCE_DELIMITATION:
                stack.pop()
                pos += 8
            else:
                raise _ScanError(ERR_NOT_ITEM, pos, tag)
            continue

        if group == 0xFFFE:
            if tag == ITEM_DELIMITATION and len(stack) > 1:
                if n - pos < 8:
                    raise _ScanError(ERR_HEADER, pos, tag)
                stack.pop()
                pos += 8
                continue
            raise _ScanError(ERR_DELIMITER, pos, tag)
        if len(stack) == 1 and tag in PIXEL_DATA_TAGS:
            return offsets, lengths, pos, entries
        if n - pos < 8:
            raise _ScanError(ERR_HEADER, pos, tag)

        vr0 = buf[pos + 4]
        vr1 = buf[pos + 5]
        elem_explicit, level[1] = vr_switch(explicit, vr0, vr1, pos == start, pos == 0)

        if elem_explicit:
            vr = bytes((vr0, vr1))
            if vr in LONG_VRS:
                if n - pos < 12:
                    raise _ScanError(ERR_HEADER, pos, tag)
                (length,) = _UNPACK_U32[big](buf, pos + 8)
                header = 12
            else:
                (length,) = _UNPACK_U16[big](buf, pos + 6)
                header = 8
        else:
            vr = b""
            (length,) = _UNPACK_U32[big](buf, pos + 4)
            header = 8

        if length == UNDEFINED_LENGTH:
            # A sequence (or encapsulated data) whose end is found by walking
            # its items.  UN with undefined length is a sequence encoded in
            # Implicit VR Little Endian (PS3.5 6.2.2).
            if len(stack) >= MAX_DEPTH:
                raise _ScanError(ERR_DEPTH, pos, tag)
            if vr == b"UN":
                stack.append([_SEQUENCE, False, False, pos])
            else:
                stack.append([_SEQUENCE, elem_explicit, big, pos])
            pos += header
            continue

        if length > n - pos - header:
            raise _ScanError(ERR_VALUE, pos, tag, length)
        if len(stack) == 1:
            slot = _SLOT_BY_TAG.get(tag)
            if slot is not None:
                offsets[slot] = pos + header
                lengths[slot] = length
            elif (not group & 1 and 0x0002 < group < 0xFFFE and element  # map_eligible(), inline: per element
                  and length <= MAP_MAX_VALUE and len(entries) < MAP_MAX_ELEMENTS):
                map_kind = MAP_KINDS.get(vr) if elem_explicit else IMPLICIT_MAP_KINDS.get(tag)
                if map_kind is not None:
                    entries.append((tag, map_kind, pos + header, length))
        pos += header + length


# -- value conversions (the Cython twin calls these for its slow paths) --------

_DEFAULT_ENCODINGS: Final = ["iso8859"]  # pydicom's default_encoding
# Bytes that mean the same in every allowed codec when no ESC precedes them.
_ASCII_PROBE: Final = bytes(b for b in range(0x80) if b != 0x1B)


@functools.lru_cache(maxsize=64)
def _codec_is_usable(encoding: str) -> bool:
    """True if `encoding` is a text codec that decodes ASCII bytes as ASCII.

    Every codec that pydicom maps a DICOM term to passes.  Others can only
    come from a (0008,0005) value that names a Python codec, which pydicom
    accepts as it is; a hostile one ("rot13", "punycode", "undefined") makes
    pydicom raise, and "utf_16" turns ASCII into garbage.
    """
    try:
        if _ASCII_PROBE.decode(encoding) != _ASCII_PROBE.decode("ascii"):
            return False
        return all(bytes((b,)).decode(encoding) == chr(b) for b in _ASCII_PROBE)
    except Exception:  # any codec failure means "not usable"
        return False


def decode_str(raw: bytes) -> str:
    """Decode a CS/DA/TM/UI/AE value as pydicom does (latin-1, padding stripped)."""
    return raw.decode("latin-1").rstrip(" \0")


def charset_info(specific_character_set: str) -> list[str]:
    """Return the Python encodings for a (0008,0005) Specific Character Set value.

    `specific_character_set` is the decoded value, backslashes kept.  Unknown
    or misspelt terms go through pydicom's ``convert_encodings``, which warns
    and corrects them as pydicom would.  A codec that fails
    :func:`_codec_is_usable` is replaced by the default repertoire, so every
    returned encoding reads plain ASCII bytes as ASCII (the fast path).
    """
    if not specific_character_set:
        return _DEFAULT_ENCODINGS
    single = python_encoding.get(specific_character_set)
    if single is not None:
        return [single]
    terms = specific_character_set.split("\\")
    try:
        encodings = convert_encodings(terms[0] if len(terms) == 1 else terms)
    except Exception:  # e.g. ValueError from codecs.lookup() on a NUL in the value
        return _DEFAULT_ENCODINGS
    return [e if _codec_is_usable(e) else _DEFAULT_ENCODINGS[0] for e in encodings]


def _is_plain_ascii(raw: bytes) -> bool:
    # ESC starts an ISO 2022 code extension; anything else below 0x80 is ASCII
    # in every encoding that charset_info() returns.
    return raw.isascii() and b"\x1b" not in raw


def _decode_any(raw: bytes, encodings: list[str]) -> str:
    # Last resort when pydicom's converters raise: one decode of the whole value.
    try:
        return decode_bytes(raw, encodings, TEXT_VR_DELIMS)
    except Exception:  # a pydicom bug must not stop the scan
        return raw.decode("latin-1")


def decode_text(raw: bytes, encodings: list[str]) -> str:
    """Decode an LO/SH value as pydicom does; multiple values keep their ``\\``."""
    if _is_plain_ascii(raw):
        if b"\\" not in raw:
            return raw.decode("ascii").rstrip("\0 ")
        return "\\".join(v.rstrip("\0 ") for v in raw.decode("ascii").split("\\"))
    try:
        value = convert_text(raw, encodings, None)  # no vr: no validation warnings
    except Exception:  # pydicom raises on some garbage; see decode_pn
        return _decode_any(raw, encodings).rstrip("\0 ")
    return "\\".join(value) if isinstance(value, MultiValue) else value


def decode_pn(raw: bytes, encodings: list[str]) -> str:
    """Decode a PN value as ``str(ds.PatientName)`` does in pydicom."""
    if _is_plain_ascii(raw):
        return raw.rstrip(b"\0 ").decode("ascii")
    try:
        value = convert_PN(raw, encodings)
        if isinstance(value, MultiValue):
            return "\\".join(str(v) for v in value)
        return str(value)
    except Exception:
        # pydicom 3.0.2 re-encodes each name and raises (IndexError in its
        # ISO 2022 encoder) on some undecodable values: keep the decoded text.
        return _decode_any(raw.rstrip(b"\0 "), encodings)


def _first_number(raw: bytes) -> str:
    return raw.decode("latin-1").rstrip(" \0").split("\\", 1)[0].strip()


def is_value(raw: bytes) -> int | None:
    """Convert the first value of an IS element; None if it is no integer.

    Like pydicom, "12.0" is 12; unlike pydicom, which returns a float with a
    warning, "12.5" is None.
    """
    text = _first_number(raw)
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


def all_values(raw: bytes) -> str:
    """Every value of a multi-valued number as text, backslash-separated, each without padding."""
    return "\\".join(value.strip() for value in raw.decode("latin-1").rstrip(" \0").split("\\"))


def ds_value(raw: bytes) -> float | None:
    """Convert the first value of a DS element; None unless a finite number."""
    text = _first_number(raw)
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


_JSON_ESCAPES: Final = {c: f"\\u{c:04x}" for c in range(0x20)} | {ord('"'): '\\"', ord("\\"): "\\\\"}
_NEEDS_ESCAPE: Final = re.compile('[\\x00-\\x1f"\\\\]').search


def map_json(raw: bytes, kind: int, big: bool, specific_character_set: str) -> str:
    """One value of the attribute map as JSON string content (escaped, no quotes); "" if empty.

    The compiled twin calls this for the values it does not convert itself
    (text that is not plain ASCII, FL and FD).
    """
    number = _MAP_NUMBERS.get(kind)
    if number is not None:
        size = struct.calcsize(number)
        if len(raw) % size:
            return ""  # pydicom refuses such a value too
        values = struct.unpack(f"{'>' if big else '<'}{len(raw) // size}{number}", raw)
        text = "\\".join(map(repr, values))
    elif kind == MAP_STRIP or kind == MAP_UR or _is_plain_ascii(raw):
        text = raw.decode("latin-1")
        if kind == MAP_UR or kind == MAP_LONG_TEXT:
            text = text.rstrip(" \0")
        elif "\\" not in text:  # one value, the common case
            text = text.strip(" \0") if kind == MAP_STRIP else text.rstrip(" \0")
        elif kind == MAP_STRIP:
            text = "\\".join(value.strip(" \0") for value in text.split("\\"))
        else:
            text = "\\".join(value.rstrip(" \0") for value in text.split("\\"))
    else:
        encodings = charset_info(specific_character_set)
        if kind == MAP_TEXT:
            text = decode_text(raw, encodings)
        elif kind == MAP_PN:
            text = decode_pn(raw, encodings)
        else:
            text = _decode_any(raw, encodings).rstrip(" \0")
        # A lone surrogate has no UTF-8: "?" instead.
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text.translate(_JSON_ESCAPES) if _NEEDS_ESCAPE(text) else text


def build_map(buf: memoryview, entries: list[tuple[int, int, int, int]], big: bool,
              specific_character_set: str) -> str:
    """The attribute map: a JSON object of the entries' values, keyed by tag (8 hex digits).

    Values are text: several values are backslash-separated, as in DICOM;
    empty values are left out, and elements past :data:`MAP_MAX_CHARS`.
    """
    parts = []
    total = 2  # the braces
    for tag, kind, offset, length in entries:
        text = map_json(bytes(buf[offset : offset + length]), kind, big, specific_character_set)
        if not text:
            continue
        total += len(text) + 13 + (1 if parts else 0)  # "TTTTTTTT":"text"
        if total > MAP_MAX_CHARS:
            break
        parts.append(f'"{tag:08X}":"{text}"')
    return "{" + ",".join(parts) + "}"


def build_fields(
    buf: memoryview,
    offsets: list[int],
    lengths: list[int],
    big: bool,
    pixel_data_offset: int | None,
    entries: list[tuple[int, int, int, int]],
) -> HeaderFields:
    """Convert the kept values found by :func:`scan` into a HeaderFields."""
    values: dict[str, object] = {"pixel_data_offset": pixel_data_offset}
    encodings = None
    unpack_u16 = _UNPACK_U16[big]
    for slot, (_tag, name, kind) in enumerate(FIELDS):
        offset = offsets[slot]
        if offset < 0:
            continue
        length = lengths[slot]
        raw = bytes(buf[offset : offset + length])
        if kind == KIND_STR:
            values[name] = decode_str(raw)
        elif kind == KIND_TEXT or kind == KIND_PN:
            # Plain ASCII reads the same in every encoding charset_info() gives,
            # so the character set is only looked at for other values.
            if _is_plain_ascii(raw) and (kind == KIND_PN or b"\\" not in raw):
                values[name] = decode_str(raw)
            else:
                if encodings is None:
                    encodings = charset_info(values.get("specific_character_set", ""))
                decode = decode_text if kind == KIND_TEXT else decode_pn
                values[name] = decode(raw, encodings)
        elif kind == KIND_US:
            # pydicom rejects a length that is not a multiple of 2
            if length >= 2 and length % 2 == 0:
                values[name] = unpack_u16(raw)[0]
        elif kind == KIND_IS:
            values[name] = is_value(raw)
        else:
            values[name] = ds_value(raw)
            if b"\\" in raw and name in ALL_VALUES:
                values[ALL_VALUES[name]] = all_values(raw)
    values["attributes"] = build_map(buf, entries, big, values.get("specific_character_set", ""))  # type: ignore[arg-type]
    return HeaderFields(**values)


def parse_deflated(
    data: bytes | bytearray | memoryview,
    complete: bool,
    parse_plain: Callable[[bytes, int, bool], HeaderFields],
) -> HeaderFields:
    """Inflate a deflated dataset and scan it with `parse_plain`.

    The dataset is raw deflate (no zlib header) of Explicit VR Little Endian
    (PS3.5 A.5).  It is inflated in doubling chunks and scanned after each, so
    that the pixel data of a large image is never inflated just to read its
    header.  `parse_plain(buf, encoding, complete)` is the backend's own
    scanner.  The end of the deflate stream, not `complete`, says whether the
    dataset is whole; `complete` only decides which error a short stream gives.
    """
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = bytearray()
    pending: bytes | memoryview = b""
    fed = 0
    budget = INFLATE_CHUNK
    while True:
        # Inflate `budget` more bytes, feeding the input a chunk at a time:
        # neither the input nor the inflated data is ever copied whole.
        target = min(len(inflated) + budget, MAX_INFLATED + 1)
        while len(inflated) < target and not inflater.eof:
            if not pending:
                if fed >= len(view):
                    break
                pending = view[fed : fed + INFLATE_CHUNK]
                fed += len(pending)
            try:
                # At most a chunk per call: no large temporary beside `inflated`.
                inflated += inflater.decompress(pending, min(target - len(inflated), INFLATE_CHUNK))
            except zlib.error as exc:
                raise HeaderError(f"deflated dataset is not valid deflate data: {exc}") from None
            pending = inflater.unconsumed_tail
        if len(inflated) > MAX_INFLATED:
            raise HeaderError(f"deflated dataset: header inflates past {MAX_INFLATED} bytes")
        more = not inflater.eof and (bool(pending) or fed < len(view))
        try:
            fields = parse_plain(inflated, ENC_EXPLICIT_LE, inflater.eof)
        except IncompleteHeader as exc:
            if more:
                budget = len(inflated)  # doubling: total work stays linear
                continue
            if complete:
                raise HeaderError(f"deflated dataset is truncated; inflated data: {exc}") from None
            raise IncompleteHeader(f"inflated data: {exc}") from None
        except HeaderError as exc:
            raise HeaderError(f"inflated data: {exc}") from None
        # Offsets into the inflated bytes mean nothing to the caller.
        return msgspec.structs.replace(fields, pixel_data_offset=None)


def _parse_plain(data: bytes | bytearray | memoryview, encoding: int, complete: bool) -> HeaderFields:
    buf = memoryview(data)
    if buf.ndim != 1 or buf.itemsize != 1:
        buf = buf.cast("B")
    explicit = encoding != ENC_IMPLICIT_LE
    big = encoding == ENC_EXPLICIT_BE
    try:
        offsets, lengths, pixel_data_offset, entries = scan(buf, explicit, big, complete)
    except _ScanError as exc:
        raise make_error(*exc.args5, len(buf), complete) from None
    return build_fields(buf, offsets, lengths, big, pixel_data_offset, entries)


def parse_header(
    data: bytes | bytearray | memoryview, transfer_syntax_uid: str, *, complete: bool = True
) -> HeaderFields:
    """Extract the indexed attributes from an encoded dataset (pure Python).

    See :func:`fastscp.dicom.header.parse_header`, which documents the contract.
    """
    encoding = encoding_for(transfer_syntax_uid)
    if encoding == ENC_DEFLATED:
        return parse_deflated(data, complete, _parse_plain)
    return _parse_plain(data, encoding, complete)
