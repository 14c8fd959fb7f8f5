"""fastscp.imaging.convert and ``fastscp convert``: DICOM -> JPEG and JPEG -> Secondary Capture."""

from __future__ import annotations

import argparse
import io
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, SecondaryCaptureImageStorage, generate_uid

from fastscp.cli import images as cli_images
from fastscp.cli import main as cli
from fastscp.dicom.synthetic import write_series
from fastscp.imaging import convert
from fastscp.imaging.convert import ConversionError, jpeg_info
from fastscp.imaging.thumbnail import ThumbnailError
from fastscp.net import scu
from tests.conftest import dcmtk


def run_cli(*argv: str) -> int:
    """``fastscp ...`` with only the image commands registered."""
    parser = argparse.ArgumentParser(prog="fastscp")
    cli_images.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return int(args.func(args))


def _gradient(rows: int = 101, columns: int = 151) -> np.ndarray:
    y, x = np.indices((rows, columns))
    return np.stack(((x * 255 // columns), (y * 255 // rows), ((x + y) % 256)), axis=-1).astype(np.uint8)


def write_jpeg(path: Path, image: np.ndarray, **options: object) -> Path:
    Image.fromarray(image).save(path, format="JPEG", quality=90, **options)
    return path


def read_strict(path: Path) -> pydicom.Dataset:
    """pydicom reads the file and decodes its pixels with warnings as errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = pydicom.dcmread(path)
        ds.pixel_array  # noqa: B018  (decodes)
        for element in ds.iterall():  # every value converts without a warning
            element.value  # noqa: B018
    return ds


def assert_dcmtk_reads(path: Path) -> None:
    result = dcmtk("dcmdump", "-q", str(path), check=False)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    result = dcmtk("dcmdump", "+E", str(path), check=False)  # +E: print parser errors too
    assert result.returncode == 0 and "E:" not in result.stderr and "W:" not in result.stderr, result.stderr
    out = path.with_suffix(".pgm")
    result = dcmtk("dcmj2pnm", str(path), str(out), check=False)  # dcmtk decodes the pixel data
    assert result.returncode == 0 and result.stderr == "", result.stderr


# -- dcm2jpg --------------------------------------------------------------------------------


@pytest.fixture
def ct(tmp_path: Path) -> Path:
    return Path(write_series(str(tmp_path / "ct"), 1, rows=300, columns=200)[0])


def test_dcm_to_jpg_full_size(ct: Path, tmp_path: Path) -> None:
    out = tmp_path / "full.jpg"
    assert convert.dcm_to_jpg(ct, out) == str(out)
    with Image.open(out) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "L", (200, 300))


def test_dcm_to_jpg_window_and_size(ct: Path, tmp_path: Path) -> None:
    convert.dcm_to_jpg(ct, tmp_path / "dark.jpg", window=(100000.0, 10.0), size=50)
    with Image.open(tmp_path / "dark.jpg") as im:
        assert im.size == (33, 50)
        assert np.asarray(im).max() <= 3  # all below the window: black (JPEG may ring by a level or two)


def test_dcm_to_tn(ct: Path, tmp_path: Path) -> None:
    convert.dcm_to_tn(ct, tmp_path / "tn.jpg")
    with Image.open(tmp_path / "tn.jpg") as im:
        assert im.size == (85, 128)


def test_dcm_to_jpg_errors(tmp_path: Path) -> None:
    (tmp_path / "x.dcm").write_bytes(b"not dicom")
    with pytest.raises(ThumbnailError):
        convert.dcm_to_jpg(tmp_path / "x.dcm", tmp_path / "x.jpg")
    assert not (tmp_path / "x.jpg").exists()


def test_cli_dcm2jpg(ct: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_cli("convert", "dcm2jpg", str(ct), str(tmp_path / "a.jpg")) == 0
    assert run_cli("convert", "dcm2jpg", str(ct), str(tmp_path / "t.jpg"), "--thumbnail") == 0
    assert run_cli("convert", "dcm2jpg", str(ct), str(tmp_path / "s.jpg"), "--size", "60", "--window", "40",
                   "400", "--frame", "0") == 0
    sizes = {}
    for name in ("a", "t", "s"):
        with Image.open(tmp_path / f"{name}.jpg") as im:
            sizes[name] = im.size
    assert sizes == {"a": (200, 300), "t": (85, 128), "s": (40, 60)}
    assert run_cli("convert", "dcm2jpg", str(ct), str(tmp_path / "f.jpg"), "--frame", "3") == 1
    assert "frame 3 requested" in capsys.readouterr().err


def test_cli_registry_integration(ct: Path, tmp_path: Path) -> None:
    """``fastscp convert`` through cli.main (cli.COMMAND_MODULES lists fastscp.cli.images)."""
    assert cli.main(["convert", "dcm2jpg", str(ct), str(tmp_path / "m.jpg"), "--thumbnail"]) == 0
    with Image.open(tmp_path / "m.jpg") as image:
        assert (image.format, image.size) == ("JPEG", (85, 128))  # the thumbnail of the 200x300 image
        assert np.asarray(image).std() > 5, "not blank"


# -- jpg2dcm --------------------------------------------------------------------------------


def test_jpeg_info(tmp_path: Path) -> None:
    colour = write_jpeg(tmp_path / "c.jpg", _gradient())
    info = jpeg_info(colour.read_bytes())
    assert (info.process, info.precision, info.rows, info.columns, info.components, info.subsampled) == (
        "baseline", 8, 101, 151, 3, True)
    full = write_jpeg(tmp_path / "f.jpg", _gradient(), subsampling=0)
    assert not jpeg_info(full.read_bytes()).subsampled
    progressive = write_jpeg(tmp_path / "p.jpg", _gradient(), progressive=True)
    assert jpeg_info(progressive.read_bytes()).process == "progressive"
    with pytest.raises(ConversionError, match="not a JPEG"):
        jpeg_info(b"GIF89a")


@pytest.mark.parametrize(
    ("kind", "photometric"),
    [("colour", "YBR_FULL_422"), ("colour-444", "YBR_FULL"), ("grey", "MONOCHROME2")],
)
def test_jpg_to_dcm_encapsulates_baseline_unchanged(tmp_path: Path, kind: str, photometric: str) -> None:
    image = _gradient() if kind != "grey" else _gradient()[..., 0]
    jpeg = write_jpeg(tmp_path / "in.jpg", image, **({"subsampling": 0} if kind == "colour-444" else {}))
    out = tmp_path / "out.dcm"
    uid = convert.jpg_to_dcm(jpeg, out, patient_name="Doe^Jane", patient_id="P123", accession="ACC9",
                             study_description="Photo", series_description="Wound")
    ds = read_strict(out)
    assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID == uid
    assert ds.SOPClassUID == SecondaryCaptureImageStorage
    assert ds.PhotometricInterpretation == photometric
    assert (ds.Rows, ds.Columns, ds.SamplesPerPixel) == (101, 151, 3 if kind != "grey" else 1)
    # the JPEG bytes, unchanged, in one fragment (padded to even length)
    (fragment,) = generate_frames(ds.PixelData, number_of_frames=1)
    data = jpeg.read_bytes()
    assert fragment[: len(data)] == data and len(fragment) - len(data) in (0, 1)
    # decoded pixels: what Pillow decodes from the JPEG itself
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB" if kind != "grey" else "L"))
    assert np.abs(ds.pixel_array.astype(int) - reference.astype(int)).mean() < 1.0
    assert_dcmtk_reads(out)


def test_jpg_to_dcm_modules(tmp_path: Path) -> None:
    jpeg = write_jpeg(tmp_path / "in.jpg", _gradient())
    study, series = generate_uid(), generate_uid()
    convert.jpg_to_dcm(jpeg, tmp_path / "a.dcm", patient_name="Doe^Jane", patient_id="P123",
                       patient_birth_date="19800102", patient_sex="F", study_uid=study, series_uid=series,
                       accession="ACC9", referring_physician="House^Gregory", modality="XC", series_number=7,
                       instance_number=3)
    convert.jpg_to_dcm(jpeg, tmp_path / "b.dcm")
    a, b = read_strict(tmp_path / "a.dcm"), read_strict(tmp_path / "b.dcm")
    # Patient, General Study, General Series
    assert (str(a.PatientName), a.PatientID, a.PatientBirthDate, a.PatientSex) == ("Doe^Jane", "P123", "19800102", "F")
    assert (a.StudyInstanceUID, a.SeriesInstanceUID, a.AccessionNumber) == (study, series, "ACC9")
    assert str(a.ReferringPhysicianName) == "House^Gregory"
    assert (a.Modality, a.SeriesNumber, a.InstanceNumber) == ("XC", 7, 3)
    assert a.StudyDate == "" and "StudyID" in a  # type 2: present; an existing study's date is not ours to guess
    # General Equipment and SC Equipment
    assert "Manufacturer" in a and a.ConversionType == "WSD"
    # General Image: lossy JPEG
    assert (a.LossyImageCompression, a.LossyImageCompressionMethod) == ("01", "ISO_10918_1")
    assert "PatientOrientation" in a
    # Image Pixel
    assert (a.BitsAllocated, a.BitsStored, a.HighBit, a.PixelRepresentation, a.PlanarConfiguration) == (8, 8, 7, 0, 0)
    # a new study, series and instance each time without UIDs
    assert len({a.SOPInstanceUID, b.SOPInstanceUID}) == 2
    assert b.StudyInstanceUID not in (study, a.StudyInstanceUID) and b.SeriesInstanceUID != series
    assert len(b.StudyDate) == 8 and b.Modality == "OT"
    for uid in (b.SOPInstanceUID, b.StudyInstanceUID, b.SeriesInstanceUID):
        assert pydicom.uid.UID(uid).is_valid


@pytest.mark.parametrize("case", ["progressive", "uncompressed", "cmyk"])
def test_jpg_to_dcm_uncompressed(tmp_path: Path, case: str) -> None:
    image = _gradient()
    if case == "cmyk":
        jpeg = tmp_path / "in.jpg"
        Image.fromarray(image).convert("CMYK").save(jpeg, format="JPEG", quality=95)
    else:
        jpeg = write_jpeg(tmp_path / "in.jpg", image, progressive=case == "progressive")
    out = tmp_path / "out.dcm"
    convert.jpg_to_dcm(jpeg, out, uncompressed=case == "uncompressed", patient_id="P1")
    ds = read_strict(out)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.PhotometricInterpretation == "RGB" and ds.LossyImageCompression == "01"
    assert np.abs(ds.pixel_array.astype(int) - image.astype(int)).mean() < 4  # JPEG's own loss
    assert_dcmtk_reads(out)


def test_jpg_to_dcm_character_set(tmp_path: Path) -> None:
    jpeg = write_jpeg(tmp_path / "in.jpg", _gradient()[..., 0])
    convert.jpg_to_dcm(jpeg, tmp_path / "u.dcm", patient_name="Müller^Zoë", study_description="Röntgen")
    ds = read_strict(tmp_path / "u.dcm")
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "Müller^Zoë" and ds.StudyDescription == "Röntgen"
    assert_dcmtk_reads(tmp_path / "u.dcm")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"patient_id": "x" * 65}, "exceeds the maximum length of 64"),
        ({"study_uid": "1.2.abc"}, "UI"),
        ({"patient_sex": "MALE"}, "Sex must be M, F or O"),
        ({"patient_birth_date": "1980-01-02"}, "DA"),
    ],
)
def test_jpg_to_dcm_refuses_bad_values(tmp_path: Path, options: dict[str, str], message: str) -> None:
    jpeg = write_jpeg(tmp_path / "in.jpg", _gradient())
    with pytest.raises(ConversionError, match=message):
        convert.jpg_to_dcm(jpeg, tmp_path / "out.dcm", **options)
    assert not (tmp_path / "out.dcm").exists()


def test_jpg_to_dcm_refuses_non_jpeg(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(ConversionError, match="not a JPEG"):
        convert.jpg_to_dcm(tmp_path / "x.jpg", tmp_path / "x.dcm")


def test_cli_jpg2dcm(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    jpeg = write_jpeg(tmp_path / "in.jpg", _gradient())
    study = generate_uid()
    assert run_cli("convert", "jpg2dcm", str(jpeg), str(tmp_path / "out.dcm"), "--patient-name", "Doe^John",
                   "--patient-id", "ID7", "--study-uid", study, "--series-uid", generate_uid(),
                   "--accession", "A42") == 0
    assert "SOP Instance UID" in capsys.readouterr().out
    ds = read_strict(tmp_path / "out.dcm")
    assert (str(ds.PatientName), ds.PatientID, ds.StudyInstanceUID, ds.AccessionNumber) == (
        "Doe^John", "ID7", study, "A42")
    assert run_cli("convert", "jpg2dcm", str(tmp_path / "out.dcm"), str(tmp_path / "again.dcm")) == 1
    assert "not a JPEG" in capsys.readouterr().err


@pytest.mark.dcmtk
def test_converted_object_is_accepted_over_the_network(start_server, tmp_path: Path) -> None:
    jpeg = write_jpeg(tmp_path / "in.jpg", _gradient())
    path = tmp_path / "sc.dcm"
    uid = convert.jpg_to_dcm(jpeg, path, patient_name="Net^Work", patient_id="NET1")
    server = start_server()
    sent = scu.send("127.0.0.1", server.port, [str(path)], aec=server.ae_title, out=io.StringIO())
    assert (sent.stored, sent.failed, sent.ok) == (1, 0, True)
    stored = server.stored_files()
    assert len(stored) == 1 and stored[0].name == f"{uid}.dcm"
    ds = read_strict(stored[0])
    assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert ds.PixelData == pydicom.dcmread(path).PixelData  # stored byte-exact
