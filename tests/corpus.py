"""pydicom's bundled test files as a byte-exact storage corpus.

Importable helper (no pytest dependency) used by the oracle test
(``tests/e2e/test_corpus_oracle.py``) and by the fastscp end-to-end tests.

* :func:`dataset_bytes` -- the bytes after the File Meta group of a Part 10
  file, plus its Transfer Syntax UID.  "Byte-exact storage" in this project
  means ``dataset_bytes(stored)[0] == dataset_bytes(source)[0]``.
* :func:`corpus_files` -- every file under ``pydicom/data/test_files`` that is
  a valid Part 10 storage object, with how (and whether) dcmtk ``storescu``
  can deliver it unchanged.  Computed from the file bytes only (a small
  element walker, no network, no subprocess), ~50 ms for the whole tree.
* :func:`storescu_command` -- argv for one storescu invocation (a batch of
  files sharing ``storescu_args``); run it with :func:`storescu_env`.

Everything here was established against dcmtk 3.6.7 ``storescp +B`` (bit
preserving) as the oracle receiver; see ``tests/CORPUS.md``.

Corpus membership ("valid Part 10 storage object"), all must hold:

1. 128-byte preamble followed by ``DICM``;
2. File Meta has (0002,0002) MediaStorageSOPClassUID that pynetdicom maps to
   the Storage Service Class, (0002,0003) MediaStorageSOPInstanceUID and
   (0002,0010) TransferSyntaxUID.  Private / unknown SOP classes are *not*
   part of the corpus: pydicom's tree has none, and whether an SCP accepts
   them is a policy question (storescp needs ``-pm``), not a byte-exactness
   one.  The Media Storage Directory class (DICOMDIR) is not a storage class;
3. the data set contains (0008,0016) SOPClassUID equal to the File Meta's and
   (0008,0018) SOPInstanceUID (any VR, UN included).  A SOPInstanceUID that
   differs from (0002,0003) is tolerated (pydicom's rtdose*/rtplan/badVR);
   ``sop_instance_uid`` is the data set's, ``meta_sop_instance_uid`` the
   File Meta's;
4. the data set has even length (an odd one cannot travel in P-DATA: dcmtk
   aborts with "Odd Fragment Length"; only image_dfl.dcm, whose deflate
   stream lacks its 00H pad);
5. dcmtk can read it: the data set parses completely (no value runs past the
   end of the file, valid explicit VR codes).  ``test_corpus_oracle`` checks
   this rule against ``dcmdump``.

How storescu (3.6.7) sends a file, found with the oracle:

* it re-encodes the parsed data set, it never streams the file's bytes;
* without a ``-x?`` option it proposes, per SOP class, one context with
  Explicit VR LE and one with {Explicit BE, Implicit LE}; compressed files
  then fail ("unable to convert") and Implicit VR LE files are converted to
  Explicit VR LE when the SCP picks Explicit BE for the second context (as
  storescp ``+xa`` does).  Hence one proposal option per transfer syntax,
  see :data:`STORESCU_TS_OPTION`: it proposes that TS alone in its own
  context, storescu then picks the context whose TS equals the file's;
* without ``-R`` it proposes a fixed list of common SOP classes and
  leaves out others (e.g. Segmentation Storage: "No presentation
  context for: (SG)"), so :func:`storescu_command` always passes ``-R``;
* ``-xd`` makes storescu send *every* unencapsulated file deflated (an
  Implicit VR LE file arrives as Deflated LE), so it may only be used for
  files that are deflated already;
* the MPEG/HEVC options in :data:`STORESCU_TS_OPTION` come from
  ``storescu --help``; no corpus file exercises them.

and what it changes on the way (such files get ``storescu_ok=False``):

* undefined-length sequences / items are written with explicit lengths
  (DIMSE always uses explicit length encoding; no command line option);
* (FFFC,FFFC) Data Set Trailing Padding is dropped;
* encapsulated Pixel Data with VR OW is written as OB;
* string values with surplus trailing padding are trimmed
  (``"OTHER  "`` -> ``"OTHER"``, ``"  "`` -> ``""``);
* Deflated Explicit VR LE is inflated and re-deflated: the inflated data set
  is identical, the deflate stream is not (no zlib level reproduces it).
  Moot for pydicom's only deflated file, which is not in the corpus (odd
  length, rule 4);
* group length elements are recalculated (693_J2KI.dcm: its (0008,0000)
  changes with the sequence lengths);
* assumed from dcmtk's data model, no corpus file triggers them: elements
  are written in tag order, odd-length values are padded;
* a SOPClassUID / SOPInstanceUID stored with VR UN is not found:
  "No SOP Class or Instance UID in file", nothing is sent.

pynetdicom ``send_c_store(path)`` with ``_config.STORE_SEND_CHUNKED_DATASET =
True`` sends the file's data set bytes unchanged and identifies the instance
from the File Meta, so it delivers every corpus file (verified by the oracle
test) given a context with the file's exact transfer syntax.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "CorpusFile",
    "STORESCU_TS_OPTION",
    "TEST_FILES_DIR",
    "corpus_files",
    "dataset_bytes",
    "storescu_batches",
    "storescu_command",
    "storescu_config",
    "storescu_env",
]

# -- transfer syntaxes -------------------------------------------------------

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"

#: storescu option that proposes exactly this transfer syntax in its own
#: presentation context (plus a separate fallback context with the
#: uncompressed ones, which storescu does not use for a file whose TS was
#: accepted).  Options of storescu 3.6.7, see ``storescu --help``.
STORESCU_TS_OPTION: dict[str, str] = {
    IMPLICIT_LE: "-xi",  # implicit VR LE *only* (no fallback context at all)
    EXPLICIT_LE: "-xe",  # same as the default -x= on little endian hosts
    EXPLICIT_BE: "-xb",
    DEFLATED_LE: "-xd",  # re-deflates, see module docstring: never storescu_ok
    "1.2.840.10008.1.2.5": "-xr",  # RLE Lossless
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG Lossless SV1 (Process 14)
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "-xu",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.4.100": "-xm",  # MPEG2 MP@ML
    "1.2.840.10008.1.2.4.101": "-xh",  # MPEG2 MP@HL
    "1.2.840.10008.1.2.4.102": "-xn",  # MPEG-4 AVC/H.264 HP@4.1
    "1.2.840.10008.1.2.4.103": "-xl",  # MPEG-4 AVC/H.264 BD-compatible
    "1.2.840.10008.1.2.4.104": "-x2",  # MPEG-4 AVC/H.264 HP@4.2 2D
    "1.2.840.10008.1.2.4.105": "-x3",  # MPEG-4 AVC/H.264 HP@4.2 3D
    "1.2.840.10008.1.2.4.106": "-xo",  # MPEG-4 AVC/H.264 Stereo HP@4.2
    "1.2.840.10008.1.2.4.107": "-x4",  # HEVC/H.265 Main@5.1
    "1.2.840.10008.1.2.4.108": "-x5",  # HEVC/H.265 Main 10@5.1
}

#: Explicit per-file decisions the rules below cannot derive.  Keyed by path
#: relative to TEST_FILES_DIR; value: (storescu_ok, reason).  Empty on
#: purpose: with pydicom 3.0.2 + dcmtk 3.6.7 every decision follows from the
#: rules, and the oracle test fails if one does not.  Add an entry (with a
#: comment naming the dcmtk behaviour) rather than loosening a rule.
STORESCU_EXCEPTIONS: dict[str, tuple[bool, str]] = {}


def _test_files_dir() -> str:
    import pydicom.data

    return os.path.join(os.path.dirname(pydicom.data.__file__), "test_files")


TEST_FILES_DIR = _test_files_dir()


# -- Part 10 parsing ---------------------------------------------------------

_LONG_VRS = frozenset(
    b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split()
)  # 2 reserved bytes + 4-byte length in explicit VR
_VALID_VRS = _LONG_VRS | frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split()
)
_STRING_VRS = frozenset(b"AE AS CS DA DS DT IS LO LT PN SH ST TM UC UI UR UT".split())
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_TRAILING_PADDING = 0xFFFCFFFC


class NotPart10Error(ValueError):
    """The file has no preamble + ``DICM`` or an unparsable File Meta group."""


def _read_meta(buf: bytes) -> tuple[int, dict[int, bytes]]:
    """Return (offset of the data set, {element number: raw value}) of group 2.

    The File Meta group is always Explicit VR Little Endian.  It is parsed
    element by element up to the first tag outside group 0002 (what dcmtk and
    pynetdicom's ``split_dataset`` do), so a missing or wrong (0002,0000)
    group length does not matter; if (0002,0000) is present and disagrees,
    the element walk wins.
    """
    if len(buf) < 132 or buf[128:132] != b"DICM":
        raise NotPart10Error("no 128-byte preamble followed by 'DICM'")
    pos, meta = 132, {}
    while pos + 8 <= len(buf):
        group, elem = struct.unpack_from("<HH", buf, pos)
        if group != 0x0002:
            break
        vr = buf[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", buf, pos + 8)
            hdr = 12
        elif vr in _VALID_VRS:
            (length,) = struct.unpack_from("<H", buf, pos + 6)
            hdr = 8
        else:  # implicit VR meta (non-conformant): 4-byte length
            (length,) = struct.unpack_from("<I", buf, pos + 4)
            hdr = 8
        if length == _UNDEFINED or pos + hdr + length > len(buf):
            raise NotPart10Error(f"bad File Meta element (0002,{elem:04X})")
        meta[elem] = buf[pos + hdr : pos + hdr + length]
        pos += hdr + length
    if not meta:
        raise NotPart10Error("no File Meta group")
    return pos, meta


def _uid(raw: bytes | None) -> str:
    return (raw or b"").rstrip(b"\0 ").decode("ascii", "replace")


def dataset_bytes(path: str | os.PathLike[str]) -> tuple[bytes, str]:
    """Return (data set bytes after the File Meta group, TransferSyntaxUID).

    The bytes are returned as stored (a deflated data set stays deflated).
    Raises :class:`NotPart10Error` for files without preamble/``DICM``.
    """
    with open(path, "rb") as fh:
        buf = fh.read()
    offset, meta = _read_meta(buf)
    return buf[offset:], _uid(meta.get(0x0010))


# -- data set walker -----------------------------------------------------------


class _Unreadable(Exception):
    pass


@dataclass
class _Scan:
    issues: set[str]
    top: dict[int, tuple[bytes | None, bytes]]  # top-level tag -> (VR, value)


def _dictionary_vr(tag: int) -> bytes | None:
    from pydicom.datadict import dictionary_VR

    if (tag >> 16) & 1:  # private
        return None
    try:
        return dictionary_VR(tag).split(" ")[0].encode()
    except KeyError:
        return None


def _string_changes(value: bytes, vr: bytes) -> bool:
    """Would dcmtk's trim-then-pad-to-even normalisation change the value?"""
    pad = b"\0" if vr == b"UI" else b" "
    stripped = value.rstrip(b" \0")
    if len(stripped) % 2:
        stripped += pad
    return stripped != value


def _scan(data: bytes, ts: str) -> _Scan:
    """Walk the data set; collect what storescu would not reproduce.

    Raises _Unreadable where dcmtk fails to read the file.
    """
    if ts == DEFLATED_LE:
        try:
            data = zlib.decompress(data, -15)
        except zlib.error as exc:
            raise _Unreadable(f"deflate stream: {exc}") from None
    implicit = ts == IMPLICIT_LE
    fmt = ">" if ts == EXPLICIT_BE else "<"
    issues: set[str] = set()
    top: dict[int, tuple[bytes | None, bytes]] = {}
    end_of_data = len(data)

    def header(pos: int, implicit_vr: bool) -> tuple[int, bytes | None, int, int]:
        if pos + 8 > end_of_data:
            raise _Unreadable(f"element header past end of data at {pos}")
        group, elem, length4 = struct.unpack_from(fmt + "HHI", data, pos)
        tag = (group << 16) | elem
        if group == 0xFFFE or implicit_vr:
            return tag, None, length4, 8
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > end_of_data:
                raise _Unreadable("element header past end of data")
            return tag, vr, struct.unpack_from(fmt + "I", data, pos + 8)[0], 12
        if vr not in _VALID_VRS:
            raise _Unreadable(f"invalid VR {vr!r} in ({group:04X},{elem:04X})")
        return tag, vr, struct.unpack_from(fmt + "H", data, pos + 6)[0], 8

    def dataset(pos: int, end: int | None, implicit_vr: bool, depth: int) -> int:
        last_tag = -1
        group_lengths: dict[int, tuple[int, int]] = {}  # group -> (declared, sum)
        limit = end if end is not None else end_of_data
        while pos < limit:
            tag, vr, length, hdr = header(pos, implicit_vr)
            if tag == _ITEM_END and end is None:
                return pos + 8
            if tag >> 16 == 0xFFFE:
                raise _Unreadable(f"unexpected delimiter {tag:08X} at {pos}")
            start = pos
            pos += hdr
            if tag <= last_tag:
                issues.add("elements out of tag order / duplicated")
            last_tag = tag
            if tag == _TRAILING_PADDING:
                issues.add("(FFFC,FFFC) Data Set Trailing Padding is dropped")
            is_seq = vr == b"SQ" or (
                length == _UNDEFINED and tag != _PIXEL_DATA and vr in (None, b"UN")
            )
            if length == _UNDEFINED and tag == _PIXEL_DATA:
                if vr not in (None, b"OB"):
                    issues.add(f"encapsulated Pixel Data has VR {vr.decode()}, sent as OB")
                pos = fragments(pos)
            elif is_seq:
                if length == _UNDEFINED:
                    issues.add("undefined-length sequence/item is sent with explicit length")
                # CP-246: UN with undefined length is implicit VR LE inside
                pos = sequence(pos, length, implicit_vr or vr == b"UN", depth + 1)
            else:
                if length == _UNDEFINED:
                    raise _Unreadable(f"undefined length on non-sequence {tag:08X}")
                if pos + length > end_of_data:
                    raise _Unreadable(f"value of {tag:08X} runs past the end of the file")
                value = data[pos : pos + length]
                if length % 2:
                    issues.add("odd-length value is padded")
                svr = vr if vr not in (None, b"UN") else None
                if vr is None:
                    svr = _dictionary_vr(tag)
                if svr in _STRING_VRS and _string_changes(value, svr):
                    issues.add("string value with surplus trailing padding is trimmed")
                if depth == 0:
                    top[tag] = (vr, value)
                if tag & 0xFFFF == 0 and length == 4:
                    (declared,) = struct.unpack(fmt + "I", value)
                    group_lengths[tag >> 16] = (declared, 0)
                pos += length
            grp = tag >> 16
            if grp in group_lengths and tag & 0xFFFF:
                declared, total = group_lengths[grp]
                group_lengths[grp] = (declared, total + pos - start)
        if end is None:
            raise _Unreadable("item without delimitation item")
        for declared, total in group_lengths.values():
            if declared != total:
                issues.add("group length element is recalculated")
        if end is not None and pos != end:
            raise _Unreadable("item length does not match its content")
        return pos

    def sequence(pos: int, length: int, implicit_vr: bool, depth: int) -> int:
        end = None if length == _UNDEFINED else pos + length
        while pos < (end if end is not None else end_of_data):
            tag, _, ilen, _ = header(pos, True)
            pos += 8
            if tag == _SEQ_END and end is None:
                return pos
            if tag != _ITEM:
                raise _Unreadable(f"expected item tag, got {tag:08X}")
            if ilen == _UNDEFINED:
                issues.add("undefined-length sequence/item is sent with explicit length")
                pos = dataset(pos, None, implicit_vr, depth)
            else:
                pos = dataset(pos, pos + ilen, implicit_vr, depth)
        if end is None:
            raise _Unreadable("sequence without delimiter")
        return pos

    def fragments(pos: int) -> int:
        while True:
            tag, _, flen, _ = header(pos, True)
            pos += 8
            if tag == _SEQ_END:
                return pos
            if tag != _ITEM or pos + flen > end_of_data:
                raise _Unreadable("broken encapsulated Pixel Data")
            if flen % 2:
                issues.add("odd-length value is padded")
            pos += flen

    dataset(0, end_of_data, implicit, 0)
    return _Scan(issues, top)


# -- corpus --------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusFile:
    path: str  # absolute
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    storescu_ok: bool  # storescu delivers it with identical data set bytes
    storescu_args: tuple[str, ...]  # extra storescu options for this file
    reason: str = ""  # why not storescu_ok / why not in the corpus
    in_corpus: bool = True  # False only with corpus_files(include_excluded=True)
    #: (0002,0003); sop_instance_uid is the data set's (0008,0018)
    meta_sop_instance_uid: str = ""

    @property
    def name(self) -> str:
        """Path relative to TEST_FILES_DIR (stable id for test ids/tables)."""
        return os.path.relpath(self.path, TEST_FILES_DIR)


def _is_storage_class(uid: str) -> bool:
    from pynetdicom.service_class import StorageServiceClass
    from pynetdicom.sop_class import uid_to_service_class

    return issubclass(uid_to_service_class(uid), StorageServiceClass)


def _classify(path: str) -> CorpusFile:
    rel = os.path.relpath(path, TEST_FILES_DIR)

    def out(reason: str, sc: str = "", si: str = "", ts: str = "") -> CorpusFile:
        return CorpusFile(path, sc, si, ts, False, (), reason, False, si)

    with open(path, "rb") as fh:
        buf = fh.read()
    try:
        offset, meta = _read_meta(buf)
    except NotPart10Error as exc:
        return out(f"not a Part 10 file: {exc}")
    sc, si, ts = _uid(meta.get(0x0002)), _uid(meta.get(0x0003)), _uid(meta.get(0x0010))
    if not ts:
        return out("File Meta has no TransferSyntaxUID", sc, si)
    if not sc:
        return out("File Meta has no MediaStorageSOPClassUID", sc, si, ts)
    if not _is_storage_class(sc):
        return out(f"{sc} is not a storage SOP class (DICOMDIR / unknown)", sc, si, ts)
    if not si:
        return out("File Meta has no MediaStorageSOPInstanceUID", sc, si, ts)
    try:
        scan = _scan(buf[offset:], ts)
    except (_Unreadable, struct.error) as exc:
        return out(f"dcmtk cannot read it: {exc}", sc, si, ts)
    if (len(buf) - offset) % 2:
        # image_dfl.dcm: a 4303-byte deflate stream without the 00H pad to
        # even length.  P-DATA fragments must be even: dcmtk's SCP aborts
        # ("DIMSE: Odd Fragment Length"), so no SCU can deliver it.
        return out(
            f"odd-length data set ({len(buf) - offset} bytes): cannot travel in P-DATA,"
            " dcmtk's SCP aborts ('Odd Fragment Length')",
            sc,
            si,
            ts,
        )
    ds_sc, ds_si = scan.top.get(0x00080016), scan.top.get(0x00080018)
    if ds_sc is None or ds_si is None:
        return out("data set has no SOPClassUID/SOPInstanceUID", sc, si, ts)
    if _uid(ds_sc[1]) != sc:
        return out("data set SOPClassUID differs from MediaStorageSOPClassUID", sc, si, ts)
    # A different SOPInstanceUID in the data set (rtdose*.dcm, rtplan.dcm,
    # badVR.dcm) is tolerated: storescu sends the data set's UID as
    # AffectedSOPInstanceUID, pynetdicom (chunked) the File Meta's.
    ds_instance = _uid(ds_si[1])

    reasons = sorted(scan.issues)
    if b"UN" in (ds_sc[0], ds_si[0]):
        reasons.insert(0, "SOP Class/Instance UID have VR UN: storescu finds none, sends nothing")
    if ts == DEFLATED_LE:
        reasons.insert(0, "storescu re-deflates: inflated bytes equal, deflate stream differs")
    option = STORESCU_TS_OPTION.get(ts)
    if option is None:
        reasons.insert(0, f"storescu has no option to propose {ts}")
    ok = not reasons
    reason = "; ".join(reasons)
    if rel in STORESCU_EXCEPTIONS:
        ok, reason = STORESCU_EXCEPTIONS[rel]
    return CorpusFile(
        path,
        sc,
        ds_instance,
        ts,
        ok,
        (option,) if option else (),
        reason,
        meta_sop_instance_uid=si,
    )


@lru_cache(maxsize=1)
def _scan_tree() -> tuple[CorpusFile, ...]:
    found = []
    for root, dirs, files in os.walk(TEST_FILES_DIR):
        dirs.sort()
        found.extend(_classify(os.path.join(root, f)) for f in sorted(files))
    return tuple(found)


def corpus_files(*, include_excluded: bool = False) -> list[CorpusFile]:
    """Valid Part 10 storage objects of pydicom's test tree (sorted by path).

    With ``include_excluded=True`` the other files are returned as well, with
    ``in_corpus=False`` and the exclusion in ``reason``.
    """
    return [f for f in _scan_tree() if include_excluded or f.in_corpus]


def storescu_batches(
    files: list[CorpusFile] | None = None,
) -> dict[tuple[str, ...], list[CorpusFile]]:
    """Group the ``storescu_ok`` files by their ``storescu_args``."""
    batches: dict[tuple[str, ...], list[CorpusFile]] = {}
    for f in corpus_files() if files is None else files:
        if f.storescu_ok:
            batches.setdefault(f.storescu_args, []).append(f)
    return batches


STORESCU_PROFILE = "FASTSCP_CORPUS"


def storescu_config(files: list[CorpusFile]) -> str:
    """storescu ``-xf`` config text: one context per (SOP class, TS) of files.

    Each context carries exactly one transfer syntax, so storescu can send a
    mixed batch in one association without converting anything (and fails
    instead of converting if the SCP rejects a context).  Write it to a file
    and pass that as ``storescu_command(..., config=path)``.  At most 128
    contexts (dcmtk limit).  Verified with the oracle for all storescu_ok
    files in a single invocation.
    """
    pairs = sorted({(f.sop_class_uid, f.transfer_syntax_uid) for f in files})
    if len(pairs) > 128:
        raise ValueError(f"{len(pairs)} presentation contexts, dcmtk allows 128")
    syntaxes = sorted({ts for _, ts in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(syntaxes):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines += ["", "[[PresentationContexts]]", f"[{STORESCU_PROFILE}]"]
    for i, (sop_class, ts) in enumerate(pairs, start=1):
        lines.append(f"PresentationContext{i} = {sop_class}\\TS{syntaxes.index(ts)}")
    lines += ["", "[[Profiles]]", f"[{STORESCU_PROFILE}]"]
    lines.append(f"PresentationContexts = {STORESCU_PROFILE}")
    return "\n".join(lines) + "\n"


def storescu_command(
    port: int,
    files: list[CorpusFile] | list[str] | list[os.PathLike[str]],
    *,
    aec: str = "FASTSCP",
    aet: str = "STORESCU",
    extra: tuple[str, ...] | list[str] = (),
    host: str = "127.0.0.1",
    timeout: int | None = 10,
    config: str | os.PathLike[str] | None = None,
) -> list[str]:
    """argv sending ``files`` (one association) with dcmtk storescu.

    For :class:`CorpusFile` items their (common) ``storescu_args`` are added;
    mixing files with different ``storescu_args`` raises ``ValueError``.
    ``-R`` (propose only the files' SOP classes) is always passed; ``timeout``
    bounds the connect/ACSE/DIMSE waits.  Run with ``env=storescu_env()``.

    With ``config`` (a file holding :func:`storescu_config` text) storescu
    uses ``-xf config FASTSCP_CORPUS`` instead; then files may mix transfer
    syntaxes and neither ``-R`` nor ``-x?`` options are passed (storescu
    refuses them together with ``-xf``).

    storescu stops at the first failed C-STORE and exits 1.  Pass
    ``extra=("-nh",)`` to keep going, but then it exits 0 even when stores
    failed and it silently skips files without readable SOP UIDs, so check
    what arrived rather than the exit status.
    """
    ts_args: set[tuple[str, ...]] = set()
    paths: list[str] = []
    for f in files:
        if isinstance(f, CorpusFile):
            ts_args.add(f.storescu_args)
            paths.append(f.path)
        else:
            paths.append(os.fspath(f))
    argv = ["storescu", "-aet", aet, "-aec", aec]
    if config is not None:
        argv += ["-xf", os.fspath(config), STORESCU_PROFILE]
        ts_args = set()
    elif len(ts_args) > 1:
        raise ValueError(f"files need different storescu options: {sorted(ts_args)}")
    else:
        argv.append("-R")
    if timeout is not None:
        argv += ["-to", str(timeout), "-ta", str(timeout), "-td", str(timeout)]
    argv += [*(ts_args.pop() if ts_args else ()), *extra, host, str(port), *paths]
    return argv


def storescu_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for storescu: Debian's build needs TCP_NODELAY=1, or every
    C-STORE stalls ~40 ms on delayed ACKs."""
    env = dict(os.environ if base is None else base)
    env["TCP_NODELAY"] = "1"
    return env
