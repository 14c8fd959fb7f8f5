"""Media export: ``fastscp export dicomdir`` and ``fastscp convert dcm2nii``, checked with pydicom's FileSet,
dcmtk (dcmdump, dcmftest, dcmmkdir), xorriso and nibabel, on files indexed by a real index (a stopped
server's file, or a running server)."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.fileset import FileSet
from pydicom.uid import ImplicitVRLittleEndian, MRImageStorage

from fastscp.cli.main import main
from fastscp.dicom.synthetic import write_series
from fastscp.index.reindex import reindex
from fastscp.media.dicomdir import MediaError, write_media_set
from fastscp.media.nifti import NiftiError, convert_files
from tests.conftest import dcmtk, wait_until

# File ID components: PS3.10 8.2 (1-8 of A-Z, 0-9, _), at most 8 of them.
_COMPONENT = re.compile(r"^[A-Z0-9_]{1,8}$")
_FILESETS: list[FileSet] = []


def _fileset(dicomdir: Path) -> FileSet:
    """pydicom's FileSet of a DICOMDIR (every referenced file must exist), its temp folder removed after the test."""
    fileset = FileSet()
    fileset.load(dicomdir, raise_orphans=True)
    _FILESETS.append(fileset)
    return fileset


@pytest.fixture(autouse=True)
def _clean_filesets() -> Iterator[None]:
    yield
    while _FILESETS:
        _FILESETS.pop()._stage["t"].cleanup()  # each FileSet keeps a TemporaryDirectory (and no close())


def _complete(paths: list[str], study_id: str) -> list[str]:
    """Give the synthetic files a Study ID (Type 1 in the STUDY record, PS3.3 F.5.2; Type 2 in the IOD)."""
    for path in paths:
        ds = dcmread(path)
        ds.StudyID = study_id
        ds.save_as(path, enforce_file_format=True)
    return paths


class Stored:
    """A storage folder with its index file: patient P1 with a CT study of 5 and one of 2, P2 with an MR of 3."""

    def __init__(self, root: Path) -> None:
        self.root = root / "storage"
        self.index = root / "index.duckdb"
        self.ct = _complete(write_series(str(self.root / "a"), 5, rows=16, columns=16, patient_id="P1"), "1")
        self.ct2 = _complete(write_series(str(self.root / "c"), 2, rows=16, columns=16, patient_id="P1", seed=2), "2")
        self.mr = _complete(write_series(str(self.root / "b"), 3, rows=16, columns=16, modality="MR",
                                         sop_class=MRImageStorage, patient_id="P2", seed=1), "3")
        result = reindex(str(self.root), str(self.index), progress=io.StringIO())
        assert result.indexed == 10 and not result.failed

    def args(self) -> list[str]:
        return ["--storage-dir", str(self.root), "--index-db", str(self.index)]


@pytest.fixture
def stored(tmp_path: Path) -> Stored:
    return Stored(tmp_path)


def _uid(path: str, keyword: str = "StudyInstanceUID") -> str:
    return str(getattr(dcmread(path, stop_before_pixels=True), keyword))


def _by_sop_instance(paths: list[str]) -> dict[str, bytes]:
    return {_uid(p, "SOPInstanceUID"): Path(p).read_bytes() for p in paths}


def _check_media_set(out: Path, expected: list[str], *, patients: int, studies: int, series: int,
                     leaves: int | None = None) -> FileSet:
    """pydicom's FileSet reads the set back: the records, the counts, every file byte-identical, nothing else."""
    fileset = _fileset(out / "DICOMDIR")
    assert fileset.ID == "FASTSCP"
    records = [r.DirectoryRecordType for r in dcmread(out / "DICOMDIR").DirectoryRecordSequence]
    assert (records.count("PATIENT"), records.count("STUDY"), records.count("SERIES"),
            len(records) - records.count("PATIENT") - records.count("STUDY") - records.count("SERIES")
            ) == (patients, studies, series, leaves or len(expected))
    if leaves is None:
        assert records.count("IMAGE") == len(expected)
    originals = _by_sop_instance(expected)
    assert len(fileset) == len(originals)
    referenced = set()
    for instance in fileset:
        components = Path(instance.FileID).parts
        assert 1 <= len(components) <= 8 and all(_COMPONENT.match(c) for c in components), instance.FileID
        assert Path(instance.path).read_bytes() == originals[instance.SOPInstanceUID]
        referenced.add(Path(instance.path).relative_to(out))
        assert instance.ReferencedTransferSyntaxUIDInFile == dcmread(instance.path).file_meta.TransferSyntaxUID
    on_disk = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    assert on_disk == referenced | {Path("DICOMDIR")}
    return fileset


def _dcmmkdir_check(out: Path, tmp: Path) -> None:
    """What dcmtk's dcmmkdir says about the set, on a copy (it rewrites the DICOMDIR).

    1. ``+U`` (update) reads our DICOMDIR and adds every file of the tree in
       strict General Purpose CD-R mode: each file passes its checks (Part 10,
       Explicit VR Little Endian, the Type 1 record attributes present, legal
       File IDs), and each is found already referenced: no record is added.
    2. A DICOMDIR dcmtk makes from the tree alone has the same records (keys,
       File IDs, referenced UIDs and transfer syntaxes) as ours.
    """
    copy = tmp / "dcmmkdir-update"
    shutil.copytree(out, copy)
    before = dcmread(copy / "DICOMDIR").DirectoryRecordSequence
    tops = sorted(p.name for p in copy.iterdir() if p.is_dir())
    result = subprocess.run(["dcmmkdir", "+U", "+r", *tops], cwd=copy, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert not re.search(r"^[EWF]:", result.stdout + result.stderr, re.M), result.stdout + result.stderr
    after = dcmread(copy / "DICOMDIR").DirectoryRecordSequence
    assert len(after) == len(before)

    ref = tmp / "dcmmkdir-ref"
    shutil.copytree(out, ref)
    (ref / "DICOMDIR").unlink()
    result = subprocess.run(["dcmmkdir", "+r", *tops], cwd=ref, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and not re.search(r"^[EWF]:", result.stdout + result.stderr, re.M), \
        result.stdout + result.stderr

    def records(fileset: FileSet) -> set[tuple[str, ...]]:
        return {(i.FileID, i.PatientID, str(i.PatientName), i.StudyInstanceUID, i.StudyDate, i.StudyID,
                 i.SeriesInstanceUID, i.Modality, str(i.SeriesNumber), str(i.InstanceNumber), i.SOPInstanceUID,
                 i.SOPClassUID, i.TransferSyntaxUID) for i in fileset}

    assert records(_fileset(out / "DICOMDIR")) == records(_fileset(ref / "DICOMDIR"))


def test_export_study(stored: Stored, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cd"
    assert main(["export", "dicomdir", "--study", _uid(stored.ct[0]), str(out), *stored.args()]) == 0
    assert f"wrote {out}: 5 instances (1 patients, 1 studies, 1 series" in capsys.readouterr().out
    _check_media_set(out, stored.ct, patients=1, studies=1, series=1)
    dump = dcmtk("dcmdump", str(out / "DICOMDIR")).stdout
    assert "=MediaStorageDirectoryStorage" in dump and "=LittleEndianExplicit" in dump
    assert dump.count('"Directory Record" IMAGE') == 5
    for path in out.rglob("IM*"):
        assert dcmtk("dcmftest", str(path)).stdout.startswith("yes: ")
    _dcmmkdir_check(out, tmp_path)
    # nothing left behind beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cd", "dcmmkdir-ref", "dcmmkdir-update", "index.duckdb",
                                                           "storage"]


def test_export_patient_and_query(stored: Stored, tmp_path: Path) -> None:
    out = tmp_path / "patient"
    assert main(["export", "dicomdir", "--patient", "P1", str(out), *stored.args()]) == 0
    _check_media_set(out, stored.ct + stored.ct2, patients=1, studies=2, series=2)
    _dcmmkdir_check(out, tmp_path)
    mr = tmp_path / "mr"
    out.rename(tmp_path / "kept")
    assert main(["export", "dicomdir", "--query", "Modality=MR", "--query", "StudyDate=20260101-", str(mr),
                 *stored.args()]) == 0
    _check_media_set(mr, stored.mr, patients=1, studies=1, series=1)
    both = tmp_path / "both"
    assert main(["export", "dicomdir", "--query", "PatientID=P*", str(both), *stored.args()]) == 0
    _check_media_set(both, stored.ct + stored.ct2 + stored.mr, patients=2, studies=3, series=3)


def test_iso_image(stored: Stored, tmp_path: Path) -> None:
    out, iso = tmp_path / "cd", tmp_path / "cd.iso"
    assert main(["export", "dicomdir", "--patient", "P1", str(out), "--iso", str(iso), "--fileset-id", "CASE_42",
                 *stored.args()]) == 0
    listed = dcmtk("xorriso", "-indev", str(iso), "-find", "/", "-type", "f").stdout
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert sorted(re.findall(r"'/(.+)'", listed)) == files
    volume = subprocess.run(["xorriso", "-indev", str(iso), "-pvd_info"], capture_output=True, text=True).stdout
    assert re.search(r"^Volume Id\s*:\s*CASE_42$", volume, re.M), volume
    # PS3.12 F.1.2.1: a File ID's last component is the ISO 9660 name NAME.;1 (Level 1, no extension).
    data = iso.read_bytes()
    assert b"DICOMDIR.;1" in data and b"IM000000.;1" in data
    extracted = tmp_path / "extracted"
    dcmtk("xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", "/", str(extracted))
    for name in files:
        assert (extracted / name).read_bytes() == (out / name).read_bytes(), name
    assert _fileset(extracted / "DICOMDIR").ID == "CASE_42"


def test_errors_leave_nothing(stored: Stored, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cd"
    assert main(["export", "dicomdir", "--study", "1.2.3.4", str(out), *stored.args()]) == 1
    assert "study 1.2.3.4: no instances in the index" in capsys.readouterr().err
    assert main(["export", "dicomdir", "--patient", "NOBODY", str(out), *stored.args()]) == 1
    assert "patient NOBODY: no instances" in capsys.readouterr().err
    assert main(["export", "dicomdir", str(out), *stored.args()]) == 2
    assert "select what to export" in capsys.readouterr().err
    assert main(["export", "dicomdir", "--query", "Modality", str(out), *stored.args()]) == 2
    assert "KEYWORD=VALUE" in capsys.readouterr().err
    assert main(["export", "dicomdir", "--query", "NoSuchKeyword=1", str(out), *stored.args()]) == 1
    assert "NoSuchKeyword" in capsys.readouterr().err
    assert main(["export", "dicomdir", "--patient", "P1", "--fileset-id", "lower case", str(out),
                 *stored.args()]) == 1
    assert "File-set ID" in capsys.readouterr().err
    assert not out.exists()
    # OUT exists and is not empty: untouched
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(["export", "dicomdir", "--patient", "P1", str(out), *stored.args()]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    # an empty OUT is fine
    (out / "mine.txt").unlink()
    assert main(["export", "dicomdir", "--patient", "P2", str(out), *stored.args()]) == 0
    _check_media_set(out, stored.mr, patients=1, studies=1, series=1)
    # a stored file gone since it was indexed: the export fails whole, naming it
    gone = tmp_path / "gone"
    os.unlink(stored.ct[3])
    assert main(["export", "dicomdir", "--patient", "P1", str(gone), "--iso", str(tmp_path / "gone.iso"),
                 *stored.args()]) == 1
    assert stored.ct[3] in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cd", "index.duckdb", "storage"]


def test_failure_after_copying_leaves_nothing(stored: Stored, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                              ) -> None:
    """A failure at the last step (the ISO image's folder can't be made) removes the copied set."""
    (tmp_path / "afile").write_text("")
    out = tmp_path / "cd"
    assert main(["export", "dicomdir", "--patient", "P1", str(out), "--iso", str(tmp_path / "afile" / "cd.iso"),
                 *stored.args()]) == 1
    assert "afile" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "index.duckdb", "storage"]


def test_messages_escape_stored_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A path (made of header values by storage.naming) with a terminal escape is printed escaped."""
    root = tmp_path / "storage"
    (first, *_rest) = _complete(write_series(str(root / "s"), 2, rows=8, columns=8, patient_id="ESC"), "1")
    hostile = root / "s" / "bad\x1b[2J.dcm"
    os.rename(first, hostile)
    reindex(str(root), str(tmp_path / "index.duckdb"), progress=io.StringIO())
    hostile.unlink()
    assert main(["export", "dicomdir", "--patient", "ESC", str(tmp_path / "cd"), "--storage-dir", str(root),
                 "--index-db", str(tmp_path / "index.duckdb")]) == 1
    err = capsys.readouterr().err
    assert "bad\\x1b[2J.dcm" in err and "\x1b" not in err


def test_study_date_from_the_content_date_else_refused(tmp_path: Path) -> None:
    """Study Date is Type 1 in the STUDY record: taken from the series, acquisition or content date (as dcmmkdir
    does), and a file with none of them is refused by name, leaving nothing."""
    paths = _complete(write_series(str(tmp_path / "src"), 2, rows=8, columns=8), "1")
    ds = dcmread(paths[0])
    del ds.StudyDate
    ds.ContentDate = "20250102"
    ds.save_as(paths[0], enforce_file_format=True)
    media = write_media_set(paths, str(tmp_path / "cd"), progress=io.StringIO())
    assert any(n.startswith("StudyDate 20250102 (its ContentDate)") for n in media.invented)
    assert {i.StudyDate for i in _fileset(tmp_path / "cd" / "DICOMDIR")} == {"20250102"}
    del ds.ContentDate
    ds.save_as(paths[0], enforce_file_format=True)
    with pytest.raises(MediaError, match=re.escape(paths[0]) + ".*Study Date"):
        write_media_set(paths, str(tmp_path / "cd2"), progress=io.StringIO())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cd", "src"]


def test_other_record_types_and_transfer_syntaxes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """pydicom's own test objects: SR, RT plan and dose, JPEG 2000 and Explicit VR Big Endian: each gets its
    leaf record type and File ID prefix, every file is exported byte-exact, and the transfer syntaxes are counted
    (STD-GEN-CD allows Explicit VR Little Endian only: the CLI warns)."""
    from pydicom.data import get_testdata_file

    names = ("test-SR.dcm", "CT_small.dcm", "MR_small_bigendian.dcm", "rtplan.dcm", "rtdose.dcm", "JPEG2000.dcm")
    files = [str(get_testdata_file(name)) for name in names]
    media = write_media_set(files, str(tmp_path / "cd"), progress=io.StringIO())
    assert media.transfer_syntaxes == {"1.2.840.10008.1.2.1": 2, "1.2.840.10008.1.2.2": 1,
                                       "1.2.840.10008.1.2": 2, "1.2.840.10008.1.2.4.91": 1}
    fileset = _check_media_set(tmp_path / "cd", files, patients=6, studies=6, series=6, leaves=6)
    kinds = {Path(i.FileID).name[:2]: i.node.record_type for i in fileset}
    assert kinds == {"SR": "SR DOCUMENT", "IM": "IMAGE", "RP": "RT PLAN", "RD": "RT DOSE"}
    # the command says which files the General Purpose CD-R profile does not allow
    root = tmp_path / "storage"
    root.mkdir()
    for path in files:
        shutil.copyfile(path, root / Path(path).name)
    reindex(str(root), str(tmp_path / "index.duckdb"), progress=io.StringIO())
    assert main(["export", "dicomdir", "--query", "Modality=RT*", str(tmp_path / "rt"), "--storage-dir", str(root),
                 "--index-db", str(tmp_path / "index.duckdb")]) == 0
    assert ("2 files are not in Explicit VR Little Endian (2 in 1.2.840.10008.1.2): exported as stored"
            in capsys.readouterr().err)


def test_invented_record_values(tmp_path: Path) -> None:
    """Files without a Study ID (common: Type 2 in the IODs) get one in the STUDY record only, as dcmmkdir +I does."""
    paths = write_series(str(tmp_path / "src"), 3, rows=8, columns=8)
    implicit = write_series(str(tmp_path / "src2"), 2, rows=8, columns=8, seed=3)
    for path in implicit:  # stored as an Implicit VR Little Endian peer sent it
        ds = dcmread(path)
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
    media = write_media_set(paths + implicit + paths[:1], str(tmp_path / "cd"), progress=io.StringIO())
    assert media.duplicates == 1  # the same SOP Instance UID again: left out
    assert media.transfer_syntaxes == {"1.2.840.10008.1.2.1": 3, "1.2.840.10008.1.2": 2}
    assert len([n for n in media.invented if n.startswith("StudyID")]) == 2
    fileset = _check_media_set(tmp_path / "cd", paths + implicit, patients=1, studies=2, series=2)
    assert sorted({i.StudyID for i in fileset}) == ["FASTSCPST000001", "FASTSCPST000002"]
    assert all("StudyID" not in dcmread(i.path) for i in fileset)
    # strict dcmmkdir refuses the files (no Study ID, Implicit VR); with --invent it accepts them and
    # finds every one of our records: it invents no Study ID of its own and adds no record.
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "cd", copy)
    strict = subprocess.run(["dcmmkdir", "+U", "+r", "PT000000"], cwd=copy, capture_output=True, text=True)
    assert "StudyID (0020,0010) missing" in strict.stderr + strict.stdout
    invent = subprocess.run(["dcmmkdir", "+U", "+I", "+r", "PT000000"], cwd=copy, capture_output=True, text=True)
    assert "inventing" not in invent.stdout + invent.stderr
    assert len(dcmread(copy / "DICOMDIR").DirectoryRecordSequence) == 1 + 2 + 2 + 5


def test_export_from_a_running_server(start_server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    """While the server runs, the index is asked through it; the set holds the files as the server stored them."""
    server = start_server()
    sent = _complete(write_series(str(tmp_path / "send"), 4, rows=16, columns=16, patient_id="LIVE1",
                                  image_positions=[(0.0, 0.0, 5.0 * k) for k in range(4)],
                                  image_orientation=(1, 0, 0, 0, 1, 0), pixel_spacing=(1.0, 1.0),
                                  slice_thickness=5.0), "9")
    dcmtk("storescu", "-aec", server.ae_title, "127.0.0.1", str(server.port), *sent)
    study = _uid(sent[0])
    args = ["--storage-dir", str(server.storage), "--index-db", str(server.index)]

    def indexed() -> bool:
        return main(["query", "instances", "--study-uid", study, "--json", *args]) == 0 and \
            capsys.readouterr().out.count("\n") == 4

    wait_until(indexed, 30, "the stored instances in the index")
    out = tmp_path / "cd"
    assert main(["export", "dicomdir", "--study", study, str(out), *args]) == 0
    stored = [str(p) for p in server.stored_files()]
    assert len(stored) == 4
    _check_media_set(out, stored, patients=1, studies=1, series=1)
    nifti = tmp_path / "live.nii.gz"
    assert main(["convert", "dcm2nii", _uid(sent[0], "SeriesInstanceUID"), str(nifti), *args]) == 0
    _check_volume(nifti, stored)
    assert server.stop() == 0


# -- NIfTI -------------------------------------------------------------------------------------


def _series(tmp: Path, name: str, *, modality: str, sop_class: str, orientation: tuple[float, ...],
            spacing: tuple[float, float], step: tuple[float, float, float], count: int, order: list[int]
            ) -> list[str]:
    """A series whose Instance Numbers follow ``order`` of slice positions (slice k at origin + k*step)."""
    positions = [tuple(-30.0 + k * s for s in step) for k in order]
    positions = [(p[0], p[1] + 10.0, p[2] + 50.0) for p in positions]
    return write_series(str(tmp / name), count, rows=12, columns=10, modality=modality, sop_class=sop_class,
                        image_positions=positions, image_orientation=orientation, pixel_spacing=spacing,
                        slice_thickness=float(np.linalg.norm(step)), seed=len(name))


def _check_volume(nifti: Path, dicom: list[str]) -> None:
    """Every voxel of the volume is the DICOM pixel at its position: shape, affine and slice order together.

    The affine maps a voxel to RAS+ millimetres; DICOM positions are LPS+.
    Each slice's plane and its row and column directions locate the pixel.
    """
    image = nib.load(nifti)
    data = image.get_fdata()  # scl_slope and scl_inter applied
    slices = [dcmread(p) for p in dicom]
    first = slices[0]
    assert sorted(data.shape) == sorted((first.Columns, first.Rows, len(slices)))
    row_dir, col_dir = np.array(first.ImageOrientationPatient[:3]), np.array(first.ImageOrientationPatient[3:])
    normal = np.cross(row_dir, col_dir)
    spacing = np.array([float(v) for v in first.PixelSpacing])  # row spacing, column spacing
    zooms = sorted(float(z) for z in image.header.get_zooms()[:3])
    step = sorted([spacing[0], spacing[1], float(first.SliceThickness)])
    assert np.allclose(zooms, step, atol=1e-4)
    planes = {round(float(np.dot(np.array(ds.ImagePositionPatient, dtype=float), normal)), 3): ds for ds in slices}
    lps = np.diag([-1.0, -1.0, 1.0])
    checked = 0
    for index in np.ndindex(*data.shape):
        ras = image.affine @ np.array([*index, 1.0])
        point = lps @ ras[:3]
        ds = planes[round(float(np.dot(point, normal)), 3)]
        offset = point - np.array(ds.ImagePositionPatient, dtype=float)
        column = float(np.dot(offset, row_dir)) / spacing[1]
        row = float(np.dot(offset, col_dir)) / spacing[0]
        r, c = round(row), round(column)
        assert abs(row - r) < 1e-3 and abs(column - c) < 1e-3, (index, row, column)
        expected = float(ds.pixel_array[r, c]) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert data[index] == pytest.approx(expected), index
        checked += 1
    assert checked == first.Rows * first.Columns * len(slices)


def test_dcm2nii_ct_axial_reversed_order(stored: Stored, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Axial CT, Instance Numbers head to feet (slice positions descending), non-square pixels."""
    ct = _series(stored.root, "ct", modality="CT", sop_class="1.2.840.10008.5.1.4.1.1.2",
                 orientation=(1, 0, 0, 0, 1, 0), spacing=(0.8, 0.6), step=(0, 0, 2.5), count=7,
                 order=[6, 5, 4, 3, 2, 1, 0])
    reindex(str(stored.root), str(stored.index), progress=io.StringIO())
    out = tmp_path / "nifti" / "ct.nii.gz"
    assert main(["convert", "dcm2nii", _uid(ct[0], "SeriesInstanceUID"), str(out), *stored.args()]) == 0
    assert f"wrote {out} (7 files)" in capsys.readouterr().out
    assert out.read_bytes()[:2] == b"\x1f\x8b"  # gzip
    image = nib.load(out)
    assert image.shape == (10, 12, 7)
    # RAS: x from L to R is -row direction (LPS x), y flipped too; slices ascend in z from the lowest position
    # RAS+: columns run to the patient's left (-x), rows are stored bottom-up (+y from the last row), slices
    # ascend from the lowest position (Image Position (Patient) (-30, -20, 20 + 2.5 k), LPS+).
    assert np.allclose(image.affine, [[-0.6, 0, 0, 30.0], [0, 0.8, 0, 20.0 - 11 * 0.8], [0, 0, 2.5, 20.0],
                                      [0, 0, 0, 1]], atol=1e-4), image.affine
    _check_volume(out, ct)
    assert sorted(p.name for p in out.parent.iterdir()) == ["ct.nii.gz"]


def test_dcm2nii_mr_sagittal_shuffled(tmp_path: Path) -> None:
    """Sagittal MR (rows along anterior-posterior, columns feet-ward), slices in shuffled order, uncompressed."""
    mr = _series(tmp_path, "mr", modality="MR", sop_class=MRImageStorage, orientation=(0, 1, 0, 0, 0, -1),
                 spacing=(1.5, 1.2), step=(3.0, 0, 0), count=6, order=[2, 0, 5, 1, 4, 3])
    out = tmp_path / "mr.nii"
    volume = convert_files(mr, str(out))
    assert volume.files == 6
    assert out.read_bytes()[344:348] == b"n+1\x00"  # NIfTI-1 single file, not gzip
    image = nib.load(out)
    assert sorted(image.shape) == [6, 10, 12]
    _check_volume(out, mr)


def test_dcm2nii_errors(stored: Stored, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.nii.gz"
    assert main(["convert", "dcm2nii", "1.2.3.4", str(out), *stored.args()]) == 1
    assert "series 1.2.3.4: no instances in the index" in capsys.readouterr().err
    with pytest.raises(NiftiError, match="nii.gz"):
        convert_files(stored.ct, str(tmp_path / "x.img"))
    # files dcm2niix can't make a volume of: no output, no temp folder
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 200)
    with pytest.raises(NiftiError, match="dcm2niix made no volume"):
        convert_files([str(junk)], str(out))
    # two echoes in one series make two volumes: refused with their names
    echoes = write_series(str(tmp_path / "echoes"), 4, rows=8, columns=8, modality="MR", sop_class=MRImageStorage,
                          image_positions=[(0.0, 0.0, 2.0 * (k % 2)) for k in range(4)],
                          image_orientation=(1, 0, 0, 0, 1, 0), pixel_spacing=(1.0, 1.0), slice_thickness=2.0)
    for k, path in enumerate(echoes):
        ds = dcmread(path)
        ds.EchoNumbers, ds.EchoTime = 1 + k // 2, 10.0 * (1 + k // 2)
        ds.save_as(path, enforce_file_format=True)
    with pytest.raises(NiftiError, match=r"makes 2 volumes \(volume_e1.nii.gz, volume_e2.nii.gz\)"):
        convert_files(echoes, str(out))
    shutil.rmtree(tmp_path / "echoes")
    # an existing output is replaced whole
    out.write_bytes(b"old")
    convert_files(stored.mr, str(out))
    assert nib.load(out).shape[:2] == (16, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.duckdb", "junk.dcm", "storage", "x.nii.gz"]
