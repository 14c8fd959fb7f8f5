"""fastscp.imaging.scansheet and ``fastscp scansheet``: one PNG and one HTML page per study."""

from __future__ import annotations

import argparse
import os
import re
import shutil
from pathlib import Path

import msgspec
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from fastscp.cli import images as cli_images
from fastscp.imaging import scansheet
from fastscp.imaging.frames import read_header
from fastscp.imaging.scansheet import QuietStudies, StudySummary
from fastscp.imaging.thumbnail import make_thumbnail, thumbnail_path
from fastscp.index.database import Index
from fastscp.index.records import InstanceRecord
from fastscp.storage.layout import LayoutOptions

HOSTILE = "<script>alert('x')</script>&\"Evil\"^Name"


def write_instance(path: Path, study: str, series: str, series_number: int, number: int, *,
                   modality: str = "CT", description: str = "", patient_name: str = "Doe^Jane",
                   pixels: bool = True) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, "PID42", "19700315", "F"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study, "20260102", "134501"
    ds.StudyDescription, ds.AccessionNumber, ds.ReferringPhysicianName = "CT Chest", "ACC77", "House^Gregory"
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = series, series_number, modality
    if description:
        ds.SeriesDescription = description
    ds.InstanceNumber = number
    if pixels:
        ds.Rows, ds.Columns = 64, 96
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        y, x = np.indices((64, 96))
        ds.PixelData = ((x * 40 + y * 10 + number * 100) % 4096).astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def study_files(tmp_path: Path) -> tuple[str, list[Path]]:
    """A study of 3 series (written out of order) in a hierarchical tree below tmp_path/storage."""
    study = generate_uid()
    root = tmp_path / "storage" / "PID42" / f"20260102_{study}"
    paths = []
    for series_number, count, modality, description in ((2, 12, "CT", "Axial 1mm"), (1, 1, "CT", "Scout"),
                                                           (3, 3, "SR", "")):
        series = generate_uid()
        for number in range(count, 0, -1):
            pixels = modality != "SR"
            paths.append(write_instance(root / f"{series_number}_{modality}" / f"{number}.dcm", study, series,
                                        series_number, number, modality=modality, description=description,
                                        pixels=pixels))
    return study, paths


def image_variance(path: Path) -> float:
    with Image.open(path) as image:
        return float(np.asarray(image.convert("L"), dtype=np.float64).var())


def test_summarise_study_files(study_files: tuple[str, list[Path]]) -> None:
    study_uid, paths = study_files
    study = scansheet.summarise_study_files(paths)
    assert study.study_instance_uid == study_uid
    assert (study.patient_name, study.patient_id, study.patient_birth_date, study.patient_sex) == (
        "Doe^Jane", "PID42", "19700315", "F")
    assert (study.study_date, study.study_description, study.accession_number, study.referring_physician_name) == (
        "20260102", "CT Chest", "ACC77", "House^Gregory")
    assert [(s.series_number, s.modality, s.series_description, s.instance_count) for s in study.series] == [
        (1, "CT", "Scout", 1), (2, "CT", "Axial 1mm", 12), (3, "SR", "", 3)]
    assert [i.instance_number for i in study.series[1].instances] == list(range(1, 13))
    assert study.instance_count == 16


def test_summarise_study_errors(study_files: tuple[str, list[Path]], tmp_path: Path) -> None:
    _uid, paths = study_files
    other = write_instance(tmp_path / "other.dcm", generate_uid(), generate_uid(), 1, 1)
    with pytest.raises(ValueError, match="2 studies"):
        scansheet.summarise_study_files([*paths, other])
    with pytest.raises(ValueError, match="no instances"):
        scansheet.summarise_study([], "1.2.3")
    (tmp_path / "junk.dcm").write_bytes(b"junk")  # skipped, not fatal
    assert scansheet.summarise_study_files([other, tmp_path / "junk.dcm"]).instance_count == 1


def test_write_scansheet(study_files: tuple[str, list[Path]], tmp_path: Path) -> None:
    study = scansheet.summarise_study_files(study_files[1])
    png, page = scansheet.write_scansheet(study, tmp_path / "sheet")
    assert (png, page) == (str(tmp_path / "sheet" / "scansheet.png"), str(tmp_path / "sheet" / "scansheet.html"))
    with Image.open(png) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert width >= 8 * 128 and height >= 3 * 128
    assert image_variance(Path(png)) > 100  # text and images, not blank
    text = Path(page).read_text("utf-8")
    for value in ("Doe, Jane", "PID42", "1970-03-15", "2026-01-02 13:45:01", "CT Chest", "ACC77",
                  "House, Gregory", study.study_instance_uid, "Series 2  CT", "Axial 1mm", "12 instances",
                  "Series 3  SR", "no image"):
        assert value in text, value
    # 1 + 8 + 0 thumbnails (12 instances: 8 picked; the SR series has no images)
    assert len(re.findall(r'src="data:image/jpeg;base64,', text)) == 9


def test_thumbnail_strip_is_the_images(study_files: tuple[str, list[Path]], tmp_path: Path) -> None:
    study = scansheet.summarise_study_files(study_files[1])
    sheet, _page = scansheet.render_scansheet(study, size=64, per_row=4)
    pixels = np.asarray(sheet.convert("L"))
    # the scout's row: its one thumbnail (64x43 centred in a 64x64 cell) is the image
    thumb = make_thumbnail(study.series[0].instances[0].path, 64)
    assert thumb.shape == (43, 64)
    found = False
    for y in range(pixels.shape[0] - 43):
        if np.array_equal(pixels[y : y + 43, 344 : 344 + 64], thumb):
            found = True
            break
    assert found


def test_hostile_values_are_escaped(study_files: tuple[str, list[Path]], tmp_path: Path) -> None:
    study = scansheet.summarise_study_files(study_files[1])
    study = msgspec.structs.replace(study, patient_name=HOSTILE, study_description="<img src=x onerror=alert(1)>",
                                    accession_number="A\nB\x1bC")
    png, page = scansheet.write_scansheet(study, tmp_path / "sheet")
    text = Path(page).read_text("utf-8")
    assert "<script>" not in text and "<img src=x" not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;&quot;Evil&quot;, Name" in text
    assert "&lt;img src=x onerror=alert(1)&gt;" in text
    assert image_variance(Path(png)) > 100


def test_regenerated_atomically(study_files: tuple[str, list[Path]], tmp_path: Path) -> None:
    study_uid, paths = study_files
    out = tmp_path / "sheet"
    png, page = scansheet.write_scansheet(scansheet.summarise_study_files(paths[:3]), out)
    before = (Path(png).read_bytes(), Path(page).read_text("utf-8"))
    scansheet.write_scansheet(scansheet.summarise_study_files(paths), out)
    after = (Path(png).read_bytes(), Path(page).read_text("utf-8"))
    assert before[0] != after[0] and before[1] != after[1]
    assert "16 in 3 series" in after[1]
    assert sorted(os.listdir(out)) == ["scansheet.html", "scansheet.png"]  # no temp files left


def test_existing_thumbnails_are_used(study_files: tuple[str, list[Path]], tmp_path: Path) -> None:
    _uid, paths = study_files
    white = tmp_path / "white.jpg"
    Image.new("L", (128, 85), 255).save(white)
    study = scansheet.summarise_study(
        [(str(p), read_header(p)[0]) for p in paths], thumbnail_for=lambda _path: str(white))
    sheet, page = scansheet.render_scansheet(study, per_row=2)
    assert "no image" not in page  # the SR series too: its "thumbnails" exist
    assert (np.asarray(sheet.convert("L")) >= 250).mean() > 0.5


def test_find_study_instances_and_cli(study_files: tuple[str, list[Path]], tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    study_uid, paths = study_files
    root = tmp_path / "storage"
    # another study in the same tree: not picked up
    write_instance(root / "PID42" / "20260105_9.9" / "1_CT" / "1.dcm", "9.9", generate_uid(), 1, 1)
    found = scansheet.find_study_instances(root, study_uid)
    assert sorted(p for p, _f in found) == sorted(map(str, paths))
    # also without a folder named after the study (flat layout)
    flat = tmp_path / "flat"
    flat.mkdir()
    for n, path in enumerate(paths[:4]):
        shutil.copy(path, flat / f"{n}.dcm")
    assert len(scansheet.find_study_instances(flat, study_uid)) == 4

    parser = argparse.ArgumentParser(prog="fastscp")
    cli_images.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["scansheet", study_uid, "--storage-dir", str(root)])
    assert args.func(args) == 0
    # Where the server's post-store stage puts it: the study's folder of the (hierarchical) layout.
    expected = root / "PID42" / f"20260102_{study_uid}"
    assert not (root / "scansheets").exists()
    assert (expected / "scansheet.png").exists() and (expected / "scansheet.html").exists()
    assert "3 series, 16 instances" in capsys.readouterr().out

    args = parser.parse_args(["scansheet", "1.2.3.4", "--storage-dir", str(root)])
    assert args.func(args) == 1
    assert "no instances of study 1.2.3.4" in capsys.readouterr().err


def test_cli_from_the_index(study_files: tuple[str, list[Path]], tmp_path: Path) -> None:
    study_uid, paths = study_files
    root = tmp_path / "storage"
    index = Index(str(tmp_path / "index.duckdb"))
    index.add(
        InstanceRecord(path=os.path.relpath(p, root), size=p.stat().st_size, transfer_syntax_uid=ExplicitVRLittleEndian,
                       calling_ae_title="A", called_ae_title="B", peer_address="127.0.0.1", received_at=0.0,
                       header=read_header(p)[0])
        for p in paths
    )
    index.close()
    # a thumbnail made by the post-store stage is used as it is
    first = paths[0]
    tn = Path(thumbnail_path(root, os.path.relpath(first, root)))
    tn.parent.mkdir(parents=True)
    Image.new("L", (128, 85), 255).save(tn)
    parser = argparse.ArgumentParser(prog="fastscp")
    cli_images.register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "out"
    args = parser.parse_args(["scansheet", study_uid, "--storage-dir", str(root), "--index-db",
                              str(tmp_path / "index.duckdb"), "--out", str(out)])
    assert args.func(args) == 0
    assert "12 instances" in (out / "scansheet.html").read_text("utf-8")
    assert image_variance(out / "scansheet.png") > 100


def test_quiet_studies() -> None:
    quiet = QuietStudies(timeout=30)
    assert quiet.pop_due(now=0) == [] and quiet.next_due_in(now=0) is None
    quiet.touch("A", now=0)
    quiet.touch("B", now=10)
    assert quiet.next_due_in(now=20) == 10
    assert quiet.pop_due(now=29) == []
    quiet.touch("A", now=25)  # more instances: the clock starts again
    assert quiet.pop_due(now=40) == ["B"]
    assert quiet.pop_due(now=55) == ["A"] and len(quiet) == 0
    quiet.touch("A", now=100)  # a late instance: due again, the sheet is regenerated
    assert quiet.pop_due(now=130) == ["A"]


@pytest.mark.parametrize(
    ("func", "value", "expected"),
    [
        (scansheet.format_date, "20260102", "2026-01-02"),
        (scansheet.format_date, "2026", "2026"),
        (scansheet.format_time, "134501.123", "13:45:01"),
        (scansheet.format_time, "1345", "13:45"),
        (scansheet.format_name, "Doe^Jane^Q", "Doe, Jane Q"),
        (scansheet.format_name, "Doe", "Doe"),
        (scansheet.format_name, "^Jane", "Jane"),
        (scansheet.format_name, "Yamada^Tarou=山田^太郎", "Yamada, Tarou"),
    ],
)
def test_formatting(func, value: str, expected: str) -> None:  # type: ignore[no-untyped-def]
    assert func(value) == expected


def test_empty_study_renders() -> None:
    sheet, page = scansheet.render_scansheet(StudySummary(study_instance_uid="1.2.3"))
    assert sheet.size[0] > 0 and "no series" in page


def test_cli_sheet_is_the_servers_sheet(study_files: tuple[str, list[Path]], tmp_path: Path) -> None:
    """``fastscp scansheet`` assembles the sheet as the post-store stage does: scansheet.thumbnails_per_series too."""
    study_uid, _paths = study_files
    root = tmp_path / "storage"
    config = tmp_path / "fastscp.yaml"
    config.write_text("scansheet:\n  thumbnails_per_series: 2\n")
    parser = argparse.ArgumentParser(prog="fastscp")
    cli_images.register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "by-hand"
    args = parser.parse_args(["scansheet", study_uid, "--storage-dir", str(root), "--config", str(config),
                              "--out", str(out)])
    assert args.func(args) == 0
    by_hand = (out / "scansheet.html").read_text("utf-8")
    # The server's assembly, with the same config value.
    _summary, _png, server_html = scansheet.make_scansheet(
        root, LayoutOptions(), study_uid, scansheet.find_study_instances(root, study_uid), per_row=2,
        out_dir=tmp_path / "server")
    assert by_hand == Path(server_html).read_text("utf-8")
    rows = by_hand.split('<table class="series">')[1].split("<tr>")[1:]
    assert [row.count('class="thumb') for row in rows] == [1, 2, 2]  # series of 1, 12 and 3 instances


def test_the_sheet_folder_is_named_by_an_instance_below_the_root(tmp_path: Path) -> None:
    # A study's files may also lie outside this root (another node's storage, storage.sr_directory):
    # the sheet goes beside those below it, or to scansheets/, never outside the root.
    root, other = tmp_path / "node-a", tmp_path / "node-b"

    def summary(*paths: Path) -> StudySummary:
        instances = tuple(scansheet.InstanceSummary(path=str(p), instance_number=n) for n, p in enumerate(paths))
        return StudySummary(study_instance_uid="1.2.3", patient_id="P1", study_date="20260102",
                            series=(scansheet.SeriesSummary(series_instance_uid="1.2.3.4", instances=instances),))

    outside = other / "P1" / "20260102_1.2.3" / "1_CT" / "a.dcm"
    inside = root / "P1" / "20260102_1.2.3" / "1_CT" / "b.dcm"
    assert scansheet.sheet_folder(root, LayoutOptions(), summary(outside, inside)) == str(
        root / "P1" / "20260102_1.2.3")
    assert scansheet.sheet_folder(root, LayoutOptions(), summary(outside)) == str(
        root / "scansheets" / "P1" / "20260102_1.2.3")
