"""A DICOM media set (PS3.10 File-set) of stored files: a DICOMDIR, the files byte-exact, an ISO 9660 image.

The Basic Directory (PS3.3 F.2) has PATIENT, STUDY, SERIES and IMAGE
records (or the leaf record type of the SOP class: SR DOCUMENT,
PRESENTATION, ...), made by pydicom's record creators, encoded in Explicit
VR Little Endian; File IDs are ``PTnnnnnn/STnnnnnn/SEnnnnnn/IMnnnnnn``, at
most 8 components of at most 8 upper-case letters and digits (PS3.10 8.2;
PS3.11 General Purpose CD-R, STD-GEN-CD, PS3.12 Annex F). Each file is
copied from storage as it is.

pydicom's :class:`~pydicom.fileset.FileSet` writes the same layout, but it
re-encodes every file and its ``add`` is quadratic (2000 instances took
144 s here), so this module lays out the records and their offsets itself
in one pass; FileSet reads the result back in the tests.

The set is made in a temp folder beside the output and renamed at the end:
the output folder is complete or absent. The ISO 9660 image (PS3.12 Annex
F: the File-set ID is the Volume Identifier; a File ID maps to
``/PT000000/.../IM000000.;1``) is written by Debian's ``xorriso``, with
Rock Ridge and Joliet names beside the ISO 9660 ones.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import IO, NamedTuple

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.fileset import _PREFIXES, FileSet
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, MediaStorageDirectoryStorage, generate_uid

from fastscp.dicom.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from fastscp.index.reindex import Progress
from fastscp.media import current_umask

__all__ = ["DEFAULT_FILESET_ID", "MediaError", "MediaSet", "make_iso", "write_media_set"]

#: File-set ID (0004,1130) and ISO 9660 Volume Identifier when none is given.
DEFAULT_FILESET_ID = "FASTSCP"
# CS, at most 16 characters (PS3.3 F.3.2.1); ISO 9660 d-characters (no space) so that
# it is the Volume Identifier as it is.
_FILESET_ID = re.compile(r"^[A-Z0-9_]{1,16}$")
#: Seconds xorriso may take per GiB of media set (a DVD's worth is written in well under a minute).
ISO_SECONDS_PER_GIB = 120


class MediaError(Exception):
    """The media set can't be made (the message names the file or the folder, and why)."""


class MediaSet(NamedTuple):
    """What :func:`write_media_set` wrote."""

    folder: str
    instances: int
    patients: int
    studies: int
    series: int
    bytes: int
    #: The ISO 9660 image, "" if none was asked for.
    iso: str
    #: Files not exported because an earlier one has the same SOP Instance UID.
    duplicates: int
    #: Type 1 record values filled in for attributes the files lack (as dcmmkdir does), one line each.
    invented: list[str]
    #: Transfer Syntax UID -> files. STD-GEN-CD allows Explicit VR Little Endian only.
    transfer_syntaxes: dict[str, int]


def check_output(out: str) -> None:
    """Refuse an output folder that exists and is not empty (or is not a folder).

    Raises
    ------
    MediaError
    """
    if os.path.lexists(out):
        if not os.path.isdir(out) or os.path.islink(out):
            raise MediaError(f"{out}: exists and is not a folder")
        if os.listdir(out):
            raise MediaError(f"{out}: exists and is not empty; give a new or empty folder")


# Where the STUDY record's Study Date and Time come from when a file has none (Type 2 in the IODs), in
# the order dcmmkdir takes them.
_ALTERNATIVES = {"StudyDate": ("SeriesDate", "AcquisitionDate", "ContentDate"),
                 "StudyTime": ("SeriesTime", "AcquisitionTime", "ContentTime")}


class _Inventor:
    """Values for Type 1 keys of the directory records that a file lacks (PS3.3 F.5).

    Only the record gets them, never the file, as dcmmkdir does: Study Date
    and Time from the series, acquisition or content date and time; with
    ``--invent``, IDs and numbers (an empty Study ID, Type 2 in the image
    IODs, is common). One value per patient, study and series, so records
    still group. A file with no date at all is refused.
    """

    def __init__(self) -> None:
        self.notes: list[str] = []
        self._patients: dict[str, str] = {}
        self._studies: dict[str, str] = {}
        self._series: dict[str, int] = {}
        self._instances: dict[str, int] = {}

    def fill(self, ds: Dataset) -> None:
        study = str(ds.get("StudyInstanceUID", ""))
        series = str(ds.get("SeriesInstanceUID", ""))
        for keyword, alternatives in _ALTERNATIVES.items():
            if not ds.get(keyword):
                found = next((a for a in alternatives if ds.get(a)), None)
                if found is not None:
                    setattr(ds, keyword, ds.get(found))
                    self._note(keyword, f"{ds.get(keyword)} (its {found})", f"study {study}")
        if not ds.get("PatientID"):
            ds.PatientID = self._patients.setdefault(study, f"FASTSCPPAT{len(self._patients) + 1:06d}")
            self._note("PatientID", ds.PatientID, f"study {study}")
        if not ds.get("StudyID"):
            ds.StudyID = self._studies.setdefault(study, f"FASTSCPST{len(self._studies) + 1:06d}")
            self._note("StudyID", ds.StudyID, f"study {study}")
        if ds.get("SeriesNumber") in (None, ""):
            ds.SeriesNumber = self._series.setdefault(series, len(self._series) + 1)
            self._note("SeriesNumber", ds.SeriesNumber, f"series {series}")
        if ds.get("InstanceNumber") in (None, ""):
            ds.InstanceNumber = self._instances[series] = self._instances.get(series, 0) + 1
            self._note("InstanceNumber", ds.InstanceNumber, f"series {series}")

    def _note(self, keyword: str, value: object, of: str) -> None:
        note = f"{keyword} {value} invented for the records of {of}"
        if keyword == "InstanceNumber" or note not in self.notes[-1:]:
            self.notes.append(note)


def _header(path: str) -> Dataset:
    try:
        return dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise MediaError(f"{path}: can't read its header: {exc}") from None


def _copy(source: str, target: Path) -> int:
    """Copy ``source`` to ``target`` byte for byte; its size."""
    try:
        shutil.copyfile(source, target)
    except OSError as exc:
        raise MediaError(f"{source}: can't copy it: {exc.strerror}") from None
    return target.stat().st_size


def _fsync_folder(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Node:
    """A directory record and the records below it (keyed by what identifies them: PS3.3 F.5)."""

    __slots__ = ("children", "file_id", "offset", "record", "source")

    def __init__(self, record: Dataset, source: str = "") -> None:
        self.record = record
        self.source = source
        self.children: dict[str, _Node] = {}
        self.file_id: list[str] = []
        self.offset = 0


def _recordify(ds: Dataset) -> list[Dataset]:
    """The records of an instance, patient first and its own last (or its own alone).

    pydicom's record creators (pydicom.fileset.DIRECTORY_RECORDERS) through
    the method that picks them by SOP class and level. It uses no state of
    the FileSet (pydicom is pinned; the tests read the result with FileSet).
    """
    return list(FileSet._recordify(None, ds))  # type: ignore[arg-type]


# What identifies a record among its siblings.
_KEYS = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID"}


def _walk(nodes: dict[str, _Node]) -> list[_Node]:
    """The records in the order of the Directory Record Sequence: each before its children."""
    out: list[_Node] = []
    for node in nodes.values():
        out.append(node)
        out.extend(_walk(node.children))
    return out


def _encoded_length(dataset: Dataset) -> int:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, dataset)
    return len(buffer.getvalue())


def write_media_set(sources: Sequence[str], out: str, *, fileset_id: str = DEFAULT_FILESET_ID, iso: str = "",
                    progress: IO[str] | None = None) -> MediaSet:
    """Write the files ``sources`` as a media set in the folder ``out``, with its DICOMDIR.

    Parameters
    ----------
    sources : sequence of str
        Stored Part 10 files. A second file with the SOP Instance UID of an
        earlier one is left out (counted in ``duplicates``).
    out : str
        A new or empty folder; its parent is created.
    fileset_id : str
        File-set ID, also the ISO 9660 Volume Identifier: 1-16 of A-Z, 0-9, _.
    iso : str
        Also write an ISO 9660 image of the set to this new file.
    progress : text stream, optional
        Where progress goes (default: standard error; a bar on a terminal).

    Raises
    ------
    MediaError
        Bad arguments, an unreadable or unsuitable file (named), a full
        disk, xorriso failing. Nothing is left at ``out`` or ``iso`` then.
    """
    if not sources:
        raise MediaError("no files to export")
    if not _FILESET_ID.match(fileset_id):
        raise MediaError(f"File-set ID {fileset_id!r}: use 1 to 16 of A-Z, 0-9 and _")
    out = os.path.abspath(out)
    check_output(out)
    if iso and os.path.lexists(iso):
        raise MediaError(f"{iso}: exists; give a new file for the ISO image")
    tree, duplicates, invented, syntaxes = _read_tree(sources, progress)
    leaves = _assign_file_ids(tree)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent))
    iso_temp = ""
    try:
        umask = current_umask()
        os.chmod(temp, 0o777 & ~umask)  # mkdtemp makes 0700: the folder gets what the files get
        copying = Progress(len(leaves), progress, label="copied")
        size = 0
        folders: set[Path] = set()
        for leaf in leaves:
            target = temp.joinpath(*leaf.file_id)
            if target.parent not in folders:
                target.parent.mkdir(parents=True, exist_ok=True)
                folders.add(target.parent)
            size += _copy(leaf.source, target)
            copying.advance(1)
        copying.finish()
        _write_dicomdir(tree, temp / "DICOMDIR", fileset_id)
        # Complete on disk before it gets its name. PERF: one sync(2) instead
        # of an fsync per file and folder (2000 fsyncs took 8.5 s here).
        os.sync()
        counts = Counter(node.record.DirectoryRecordType for node in _walk(tree))
        result = MediaSet(out, len(leaves), counts["PATIENT"], counts["STUDY"], counts["SERIES"], size, iso,
                          duplicates, invented, dict(syntaxes))
        if iso:
            iso_dir = os.path.dirname(os.path.abspath(iso))
            os.makedirs(iso_dir, exist_ok=True)
            fd, iso_temp = tempfile.mkstemp(prefix=f".{os.path.basename(iso)}.partial-", dir=iso_dir)
            os.close(fd)
            make_iso(temp, iso_temp, fileset_id, size)
            os.chmod(iso_temp, 0o666 & ~umask)
            os.sync()
        if os.path.isdir(out):
            check_output(out)  # still empty: rename(2) replaces an empty folder
        os.rename(temp, out)
        if iso:
            os.rename(iso_temp, iso)
            _fsync_folder(os.path.dirname(os.path.abspath(iso)))
        _fsync_folder(parent)
        return result
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        if iso_temp:
            try:
                os.unlink(iso_temp)
            except FileNotFoundError:
                pass
        raise


def _read_tree(sources: Sequence[str],
               progress: IO[str] | None) -> tuple[dict[str, _Node], int, list[str], Counter[str]]:
    """The directory records of the sources' headers: (root records, duplicates, invented, transfer syntaxes)."""
    tree: dict[str, _Node] = {}
    seen: set[str] = set()
    duplicates = 0
    syntaxes: Counter[str] = Counter()
    inventor = _Inventor()
    reading = Progress(len(sources), progress, label="read")
    for path in sources:
        ds = _header(path)
        uid = str(ds.get("SOPInstanceUID", ""))
        if not uid or "TransferSyntaxUID" not in ds.file_meta:
            raise MediaError(f"{path}: not a Part 10 file with a SOP Instance UID")
        if uid in seen:
            duplicates += 1
            continue
        seen.add(uid)
        inventor.fill(ds)
        try:
            records = _recordify(ds)
        except (ValueError, KeyError, AttributeError) as exc:
            raise MediaError(f"{path}: no directory record can be made for it: {exc}") from None
        level = tree
        for record in records[:-1]:
            key = str(record.get(_KEYS[record.DirectoryRecordType]) or ds.get(_KEYS[record.DirectoryRecordType]))
            node = level.get(key)
            if node is None:
                node = level[key] = _Node(record)
            level = node.children
        level[uid] = _Node(records[-1], path)
        syntaxes[str(ds.file_meta.TransferSyntaxUID)] += 1
        reading.advance(1)
    reading.finish()
    return tree, duplicates, inventor.notes, syntaxes


def _assign_file_ids(tree: dict[str, _Node]) -> list[_Node]:
    """Give each file its File ID (``PT000000/ST000000/SE000000/IM000000``); the leaves, in order."""
    leaves: list[_Node] = []

    def assign(nodes: dict[str, _Node], above: list[str]) -> None:
        numbers: Counter[str] = Counter()
        for node in nodes.values():
            prefix = _PREFIXES.get(node.record.DirectoryRecordType, "IM")
            if numbers[prefix] > 999_999:  # File ID components have 8 characters at most
                raise MediaError(f"more than a million {node.record.DirectoryRecordType} records in one folder")
            name = f"{prefix}{numbers[prefix]:06d}"
            numbers[prefix] += 1
            if node.children:
                assign(node.children, [*above, name])
            else:
                node.file_id = [*above, name]
                node.record.ReferencedFileID = node.file_id
                leaves.append(node)

    assign(tree, [])
    return leaves


def _write_dicomdir(tree: dict[str, _Node], path: Path, fileset_id: str) -> None:
    """Write the DICOMDIR of ``tree`` (Basic Directory IOD, PS3.3 A.1 and F.3) to ``path``.

    Each offset is the byte position, from the start of the file, of a
    record's item in the Directory Record Sequence. The records are laid
    out in order with their offsets still 0 (UL: the length does not
    depend on the value), then the offsets are filled in.
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds.FileSetID = fileset_id
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    ds.DirectoryRecordSequence = []
    empty = DicomBytesIO()
    ds.save_as(empty, enforce_file_format=True)
    nodes = _walk(tree)
    offset = len(empty.getvalue())  # where the (empty) sequence ends: its first item starts there
    for node in nodes:
        node.offset = offset
        offset += 8 + _encoded_length(node.record)  # item tag and length, then the record

    def link(siblings: list[_Node]) -> None:
        for n, node in enumerate(siblings):
            children = list(node.children.values())
            node.record.OffsetOfTheNextDirectoryRecord = siblings[n + 1].offset if n + 1 < len(siblings) else 0
            node.record.OffsetOfReferencedLowerLevelDirectoryEntity = children[0].offset if children else 0
            link(children)

    roots = list(tree.values())
    link(roots)
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = roots[0].offset
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = roots[-1].offset
    ds.DirectoryRecordSequence = [node.record for node in nodes]
    with open(path, "wb") as f:
        ds.save_as(f, enforce_file_format=True)
        if f.tell() != offset:  # a record's length changed with its offsets: a bug, never a wrong DICOMDIR
            raise MediaError(f"{path}: {f.tell()} bytes written, {offset} laid out")


def make_iso(folder: str | os.PathLike[str], iso: str, volume_id: str, size: int = 0) -> None:
    """Write an ISO 9660 image of ``folder`` to ``iso`` (a new or empty file) with Debian's ``xorriso``.

    The Volume Identifier is ``volume_id`` (PS3.12 F.3.1: the File-set ID).
    ISO 9660 names stay as they are (``DICOMDIR.;1``: File IDs are already
    Level 1 names); Rock Ridge and Joliet keep them readable everywhere.

    Raises
    ------
    MediaError
        xorriso is missing, failed, or took longer than its time budget.
    """
    if shutil.which("xorriso") is None:
        raise MediaError("xorriso is not installed (Debian package xorriso): it writes the ISO image")
    timeout = 60 + ISO_SECONDS_PER_GIB * size / 2**30
    argv = ["xorriso", "-no_rc", "-abort_on", "FAILURE", "-outdev", f"stdio:{iso}", "-blank", "as_needed",
            "-volid", volume_id, "-joliet", "on", "-map", os.fspath(folder), "/", "-commit"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise MediaError(f"xorriso took longer than {timeout:.0f} s to write {iso}") from None
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise MediaError(f"xorriso failed ({done.returncode}) writing {iso}:\n{tail}")
