"""Corpora for the load runner: generated once, cached in ``bench/.corpora``.

Nothing is downloaded. Each corpus is a folder of Part 10 files and a
``manifest.json`` written last (a folder without one is rebuilt), listing
every file with the SHA-256 of its data set bytes (everything after the File
Meta group): what a byte-exact receiver must reproduce.

* ``ct``: single-frame 512x512 16-bit CT slices of one series
  (:func:`fastscp.dicom.synthetic.write_series`), ~0.5 MiB each: the bulk case.
* ``burst``: as ``ct``, as many as a burst has (10,000 in the full run): the
  derived work's catch-up.
* ``mr``: 64x64 16-bit MR slices, ~8 KiB each: per-message overhead.
* ``large``: one multi-frame CT of at least the given size
  (:func:`fastscp.dicom.synthetic.write_large_multiframe`): streaming and memory.
* ``mixed``: pydicom's test files that dcmtk ``storescu`` delivers unchanged
  (``tests/corpus.py``; 8 transfer syntaxes, 10 SOP classes, one file per
  SOP Instance UID so no receiver overwrites one with another), plus
  synthetic 256x256 CT slices encoded RLE Lossless by pydicom and, when
  pylibjpeg-openjpeg is installed, JPEG 2000 Lossless.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

#: Bump when a generator changes, so cached corpora are rebuilt.
VERSION = 2
ROOT = Path(__file__).resolve().parent.parent / ".corpora"

RLE_LOSSLESS = "1.2.840.10008.1.2.5"
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"


@dataclass(frozen=True)
class SourceFile:
    """One file of a corpus. Duck-types as ``tests.corpus.CorpusFile`` for
    :func:`tests.corpus.storescu_config` (which reads the two UID fields)."""

    path: str
    size: int
    dataset_length: int
    dataset_sha256: str
    sop_class_uid: str
    transfer_syntax_uid: str


@dataclass(frozen=True)
class Corpus:
    name: str
    description: str
    folder: Path
    files: tuple[SourceFile, ...]

    @property
    def dataset_bytes(self) -> int:
        return sum(f.dataset_length for f in self.files)


# -- data set bytes ------------------------------------------------------------------


def _file_meta(path: str) -> tuple[dict[int, str], int]:
    """:func:`fastscp.dicom.part10.read_file_meta` of a file: its File Meta text elements and data set offset."""
    from fastscp.dicom.part10 import META_READ, read_file_meta

    with open(path, "rb") as f:
        head = f.read(META_READ)
    try:
        return read_file_meta(head)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def dataset_offset(path: str) -> int:
    """Where the data set starts in a Part 10 file (with or without File Meta Group Length)."""
    return _file_meta(path)[1]


def dataset_digest(path: str) -> tuple[int, str]:
    """(length, SHA-256 hex) of a Part 10 file's data set bytes, as fastscp hashes them."""
    from fastscp.dicom.part10 import dataset_sha256

    offset = dataset_offset(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.fstat(fd).st_size - offset, dataset_sha256(fd, offset)
    finally:
        os.close(fd)


def _meta_uids(path: str) -> tuple[str, str]:
    """(MediaStorageSOPClassUID, TransferSyntaxUID) from the File Meta group."""
    meta, _offset = _file_meta(path)
    return meta.get(0x0002, ""), meta[0x0010]


# -- generators -----------------------------------------------------------------------


def _gen_series(folder: Path, count: int, rows: int, modality: str) -> None:
    from pydicom.uid import CTImageStorage, MRImageStorage

    from fastscp.dicom.synthetic import write_series

    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    write_series(str(folder), count, rows=rows, columns=rows, modality=modality, sop_class=sop_class,
                 patient_id=f"BENCH{modality}", seed=rows)


def _gen_large(folder: Path, size: int) -> None:
    from fastscp.dicom.synthetic import write_large_multiframe

    write_large_multiframe(str(folder / "LARGE.dcm"), size)


def _encoded_series(folder: Path, count: int, transfer_syntax: str, prefix: str) -> None:
    import numpy as np
    from pydicom.uid import CTImageStorage

    from fastscp.dicom.synthetic import write_series

    tmp = folder / f".{prefix}-raw"
    paths = write_series(str(tmp), count, rows=256, columns=256, patient_id=f"BENCH{prefix}",
                         sop_class=CTImageStorage, seed=7)
    import pydicom

    rng = np.random.default_rng(11)
    for number, path in enumerate(paths, start=1):
        ds = pydicom.dcmread(path)
        # Smooth content with noise: compresses like an image, not like random bytes.
        y, x = np.mgrid[0:256, 0:256]
        pixels = (1000 + 800 * np.sin((x + number) / 23.0) * np.cos(y / 31.0)).astype(np.uint16)
        pixels += rng.integers(0, 16, pixels.shape, dtype=np.uint16)
        kwargs = {"encoding_plugin": "pylibjpeg"} if transfer_syntax == JPEG2000_LOSSLESS else {}
        ds.compress(transfer_syntax, pixels, generate_instance_uid=False, **kwargs)
        ds.save_as(folder / f"{prefix}{number:04d}.dcm", enforce_file_format=True)
    shutil.rmtree(tmp)


def _j2k_available() -> bool:
    try:
        from pydicom.pixels.encoders import JPEG2000LosslessEncoder
    except ImportError:
        return False
    return bool(JPEG2000LosslessEncoder.is_available)


_PATIENT_STUDY_SERIES = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")


def _gen_mixed(folder: Path, synthetic: int) -> list[str]:
    """Returns notes on what the set holds."""
    import pydicom

    from tests import corpus

    seen: set[str] = set()
    copied = unidentified = 0
    for f in corpus.corpus_files():
        if not f.storescu_ok or f.sop_instance_uid in seen:
            continue
        ds = pydicom.dcmread(f.path, stop_before_pixels=True)
        if not all(ds.get(k) for k in _PATIENT_STUDY_SERIES):
            # Orthanc refuses these (0xA700): its data model needs all three.
            unidentified += 1
            continue
        seen.add(f.sop_instance_uid)
        name = f.name.replace(os.sep, "_")
        shutil.copyfile(f.path, folder / f"pydicom-{name.removesuffix('.dcm')}.dcm")
        copied += 1
    notes = [f"{copied} pydicom test files (storescu_ok in tests/corpus.py, one per SOP Instance UID; "
             f"{unidentified} without PatientID/StudyInstanceUID/SeriesInstanceUID left out)"]
    _encoded_series(folder, synthetic, RLE_LOSSLESS, "RLE")
    notes.append(f"{synthetic} synthetic 256x256 CT, RLE Lossless (pydicom encoder)")
    if _j2k_available():
        _encoded_series(folder, synthetic, JPEG2000_LOSSLESS, "J2K")
        notes.append(f"{synthetic} synthetic 256x256 CT, JPEG 2000 Lossless (pylibjpeg-openjpeg)")
    else:
        notes.append("no JPEG 2000 synthetic files: pylibjpeg-openjpeg is not installed")
    # storescu must deliver every file unchanged, or the byte-exact check is void.
    for path in sorted(folder.glob("*.dcm")):
        if path.name.startswith(("RLE", "J2K")):
            checked = corpus._classify(str(path))
            if not checked.storescu_ok:
                raise RuntimeError(f"{path}: storescu would change it: {checked.reason}")
    return notes


# -- cache ------------------------------------------------------------------------------


def _spec_folder(kind: str, size: int) -> str:
    if kind in ("ct", "burst"):
        return f"ct512-{size}"
    if kind == "mr":
        return f"mr64-{size}"
    if kind == "large":
        return f"large-{size >> 20}MiB"
    if kind == "mixed":
        return f"mixed-{size}" + ("-j2k" if _j2k_available() else "")
    raise ValueError(f"unknown corpus kind {kind!r}")


DESCRIPTIONS = {
    "ct": "{n} x CT 512x512 16-bit, Explicit VR LE ({mb:.0f} MB)",
    "burst": "{n} x CT 512x512 16-bit, Explicit VR LE, one study ({mb:.0f} MB)",
    "mr": "{n} x MR 64x64 16-bit, Explicit VR LE ({mb:.1f} MB)",
    "large": "1 x multi-frame CT 1024x1024 16-bit, {mb:.0f} MB",
    "mixed": "{n} files, {ts} transfer syntaxes, {sc} SOP classes ({mb:.1f} MB)",
}


def make_ignored_folder(root: Path) -> None:
    """Create ``root`` (if needed) with a .gitignore that hides all of it from git."""
    root.mkdir(parents=True, exist_ok=True)
    ignore = root / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# generated by bench/load\n*\n")


def build(kind: str, size: int, root: Path = ROOT, log=print) -> Corpus:  # type: ignore[no-untyped-def]
    """The corpus ``kind`` of ``size`` (files; bytes for ``large``; synthetic
    files per codec for ``mixed``), generated unless cached under ``root``."""
    make_ignored_folder(root)
    folder = root / _spec_folder(kind, size)
    manifest_path = folder / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("version") == VERSION:
            files = tuple(SourceFile(**{**f, "path": str(folder / f["path"])}) for f in manifest["files"])
            return Corpus(kind, manifest["description"], folder, files)
    if folder.exists():
        shutil.rmtree(folder)
    building = folder.with_name(folder.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir()
    log(f"generating corpus {folder.name} in {root} ...")
    notes: list[str] = []
    if kind in ("ct", "burst"):
        _gen_series(building, size, 512, "CT")
    elif kind == "mr":
        _gen_series(building, size, 64, "MR")
    elif kind == "large":
        _gen_large(building, size)
    else:
        notes = _gen_mixed(building, size)
    building.rename(folder)
    entries = []
    for path in sorted(folder.glob("*.dcm")):
        length, sha = dataset_digest(str(path))
        sop_class, ts = _meta_uids(str(path))
        entries.append(dict(path=path.name, size=path.stat().st_size, dataset_length=length,
                            dataset_sha256=sha, sop_class_uid=sop_class, transfer_syntax_uid=ts))
    mb = sum(e["size"] for e in entries) / 1e6
    description = DESCRIPTIONS[kind].format(
        n=len(entries), mb=mb, ts=len({e["transfer_syntax_uid"] for e in entries}),
        sc=len({e["sop_class_uid"] for e in entries}),
    )
    if notes:
        description += ": " + "; ".join(notes)
    manifest_path.write_text(json.dumps({"version": VERSION, "description": description, "files": entries}, indent=1))
    files = tuple(SourceFile(**{**e, "path": str(folder / e["path"])}) for e in entries)
    return Corpus(kind, description, folder, files)
