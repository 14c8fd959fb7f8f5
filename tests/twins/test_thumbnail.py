"""fastscp.imaging.thumbnail: both twins against each other, against pydicom, and on edge cases.

Every test that renders runs twice, ``[cext]`` (the compiled module) and
``[py]`` (the numpy twin).  The cext case fails when the module is not built,
unless ``FASTSCP_NO_EXTENSIONS=1`` says to run without it.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_rescale, apply_voi_lut
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from fastscp.imaging import _thumbnail_py, thumbnail
from fastscp.imaging import frames as imaging
from fastscp.imaging.thumbnail import DecodeError, NoPixelData, PixelInfo, ThumbnailError
from tests.dicomfiles import PYDICOM_DATA, corpus_files, corpus_id
from tests.twins import compiled_twin

Render = Callable[..., np.ndarray]

# The twins differ only by float rounding: at most one grey level.
MAX_TWIN_DIFFERENCE = 1


# -- backends -------------------------------------------------------------------------


def _backend(name: str) -> Render:
    if name == "py":
        return thumbnail.thumbnail_py
    return compiled_twin(thumbnail.thumbnail_cext, "fastscp.imaging._thumbnail_cext")


@pytest.fixture(params=["cext", "py"])
def render(request: pytest.FixtureRequest) -> Render:
    return _backend(request.param)


def assert_twins_agree(render: Render, pixels: np.ndarray, info: PixelInfo, **kwargs) -> np.ndarray:
    """render's result, checked against the other twin (never against itself)."""
    other = _backend("cext") if render is thumbnail.thumbnail_py else thumbnail.thumbnail_py
    assert other is not render
    a, b = render(pixels, info, **kwargs), other(pixels, info, **kwargs)
    assert a.dtype == b.dtype == np.uint8
    assert a.shape == b.shape
    assert np.abs(a.astype(int) - b.astype(int)).max() <= MAX_TWIN_DIFFERENCE
    return a


def test_backend_switch() -> None:
    if thumbnail.NO_EXTENSIONS:
        assert thumbnail.BACKEND == "py"
    else:
        _backend("cext")
        assert thumbnail.BACKEND == "cext"
    assert issubclass(DecodeError, ThumbnailError) and issubclass(NoPixelData, DecodeError)
    assert issubclass(ThumbnailError, ValueError)


def test_no_extensions_environment_selects_the_twin() -> None:
    code = "from fastscp.imaging import thumbnail; print(thumbnail.BACKEND, thumbnail.thumbnail_cext)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "FASTSCP_NO_EXTENSIONS": "1"})
    assert out.stdout.split() == ["py", "None"]


def _distribution_of_loaded_pil() -> str:
    """The distribution whose recorded hash matches the PIL/_imaging module actually loaded."""
    import PIL._imaging

    loaded = Path(PIL._imaging.__file__).resolve()
    digest = base64.urlsafe_b64encode(hashlib.sha256(loaded.read_bytes()).digest()).rstrip(b"=").decode()
    owners = []
    for name in ("Pillow-SIMD", "pillow"):
        try:
            files = importlib.metadata.files(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        if any(Path(f.locate()).resolve() == loaded and f.hash and f.hash.value == digest for f in files):
            owners.append(name.lower())
    assert len(owners) == 1, owners
    return owners[0]


def test_pillow_flavour() -> None:
    assert imaging.PILLOW_FLAVOUR == _distribution_of_loaded_pil()
    assert imaging.PILLOW_VERSION == importlib.metadata.version(_distribution_of_loaded_pil())


# -- output size -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "size", "expected"),
    [
        ((512, 512), 128, (128, 128)),
        ((512, 256), 128, (128, 64)),
        ((256, 512), 128, (64, 128)),
        ((333, 517), 128, (82, 128)),
        ((100, 100), 128, (100, 100)),  # never enlarged
        ((1, 1000), 128, (1, 128)),  # never 0
        ((1000, 1), 128, (128, 1)),
        ((1, 1), 128, (1, 1)),
        ((512, 512), None, (512, 512)),
        ((3000, 2000), 256, (256, 171)),
    ],
)
def test_output_size(render: Render, shape: tuple[int, int], size: int | None, expected: tuple[int, int]) -> None:
    assert _thumbnail_py.output_size(*shape, size) == expected
    pixels = np.arange(shape[0] * shape[1], dtype=np.uint16).reshape(shape)
    assert render(pixels, PixelInfo(), size=size).shape == expected


# -- semantics against independent references ---------------------------------------------------


def _pydicom_display(ds: pydicom.Dataset, pixels: np.ndarray) -> np.ndarray:
    """pydicom's rescale + linear window, as 0..255 floats."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = apply_voi_lut(apply_rescale(pixels, ds), ds, index=0)
    return values


def test_full_size_matches_pydicom_windowing(render: Render) -> None:
    path = PYDICOM_DATA / "test_files" / "MR_small.dcm"
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    # pydicom's apply_voi_lut maps the window onto the range of Bits Stored
    # (signed: -2**15..2**15-1 for MR_small).
    low = -(2 ** (ds.BitsStored - 1)) if ds.PixelRepresentation else 0
    expected = (_pydicom_display(ds, pixels) - low) * 255.0 / (2 ** ds.BitsStored - 1)
    frame = imaging.decode_frame(path)
    got = render(frame.pixels, frame.info, size=None)
    assert np.abs(got - expected).max() <= 1.0


def test_area_average_of_an_integer_factor(render: Render) -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (64, 96), dtype=np.uint8)
    info = PixelInfo(window_center=128, window_width=256)  # identity for 8-bit: lo 0, hi 255
    expected = pixels.reshape(16, 4, 24, 4).mean(axis=(1, 3))
    got = render(pixels, info, size=24)
    assert got.shape == (16, 24)
    assert np.abs(got - expected).max() <= 0.5 + 1e-6


def test_fractional_boxes_keep_the_mean(render: Render) -> None:
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (101, 67), dtype=np.uint8)
    info = PixelInfo(window_center=128, window_width=256)
    got = render(pixels, info, size=31)
    # every source pixel counts once in total: the means agree
    assert abs(got.mean() - pixels.mean()) < 0.6


def test_window_clips_before_averaging(render: Render) -> None:
    # alternate columns far below and far above the window: each output pixel
    # is half black, half white, so mid grey; averaging stored values first
    # would land inside the window and give a different grey.
    pixels = np.tile(np.array([-1000, 3000], dtype=np.int16), (8, 4))
    info = PixelInfo(window_center=40, window_width=400)
    got = render(pixels, info, size=4)
    assert got.shape == (4, 4)
    assert np.all(np.abs(got.astype(int) - 128) <= 1)


# -- edge cases: both twins, compared ---------------------------------------------------


def _rgb_to_ybr_full(rgb: np.ndarray) -> np.ndarray:
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    return np.clip(np.rint(np.stack((y, cb, cr), axis=-1)), 0, 255).astype(np.uint8)


RNG = np.random.default_rng(7)
CT = RNG.integers(0, 4096, (512, 512), dtype=np.uint16)
CT_INFO = PixelInfo(bits_stored=12, rescale_slope=1.0, rescale_intercept=-1024.0, window_center=40.0,
                    window_width=400.0)
RGB = RNG.integers(0, 256, (37, 53, 3), dtype=np.uint8)

EDGE_CASES: dict[str, tuple[np.ndarray, PixelInfo]] = {
    "ct-512": (CT, CT_INFO),
    "1x1": (np.array([[1234]], dtype=np.uint16), CT_INFO),
    "1xN": (RNG.integers(0, 4096, (1, 1001), dtype=np.uint16), CT_INFO),
    "Nx1": (RNG.integers(0, 4096, (999, 1), dtype=np.uint16), CT_INFO),
    "odd-333x517": (RNG.integers(0, 4096, (333, 517), dtype=np.uint16), CT_INFO),
    "signed-16": (RNG.integers(-2000, 2000, (130, 257), dtype=np.int16),
                  PixelInfo(bits_stored=16, window_center=0, window_width=1000)),
    "signed-12-in-16": (RNG.integers(-2048, 2048, (64, 64), dtype=np.int16), PixelInfo(bits_stored=12)),
    "unsigned-8": (RNG.integers(0, 256, (200, 300), dtype=np.uint8), PixelInfo(bits_stored=8)),
    "signed-8": (RNG.integers(-128, 128, (200, 300), dtype=np.int8), PixelInfo(bits_stored=8)),
    "uint32": (RNG.integers(0, 2**31, (40, 50), dtype=np.uint32), PixelInfo(bits_stored=32)),
    "int32": (RNG.integers(-(2**30), 2**30, (40, 50), dtype=np.int32), PixelInfo(bits_stored=32)),
    "float32-nan": (np.where(RNG.random((60, 70)) < 0.1, np.nan, RNG.random((60, 70))).astype(np.float32),
                    PixelInfo()),
    "float64": (RNG.standard_normal((60, 70)), PixelInfo(window_center=0.0, window_width=2.0)),
    "big-endian": (CT.astype(">u2"), CT_INFO),
    "monochrome1": (CT, PixelInfo(photometric_interpretation="MONOCHROME1", bits_stored=12)),
    "slope-intercept": (RNG.integers(0, 1000, (100, 120), dtype=np.uint16),
                        PixelInfo(rescale_slope=2.5, rescale_intercept=-500.0, window_center=500.0,
                                  window_width=1500.0)),
    "negative-slope": (RNG.integers(0, 1000, (100, 120), dtype=np.uint16),
                       PixelInfo(rescale_slope=-1.0, rescale_intercept=0.0)),
    "no-window": (CT, PixelInfo(bits_stored=12)),
    "window-width-1": (CT, PixelInfo(bits_stored=12, window_center=2048.0, window_width=1.0)),
    "flat": (np.full((50, 50), 77, dtype=np.uint16), PixelInfo()),
    "high-bits-garbage": (CT | np.uint16(0xF000), CT_INFO),
    "rgb": (RGB, PixelInfo(photometric_interpretation="RGB", samples_per_pixel=3)),
    "rgb-planar": (np.ascontiguousarray(RGB.transpose(2, 0, 1)),
                   PixelInfo(photometric_interpretation="RGB", samples_per_pixel=3, planar_configuration=1)),
    "rgb-16bit": ((RGB.astype(np.uint16) * 257), PixelInfo(photometric_interpretation="RGB", bits_stored=16)),
    "ybr-full": (_rgb_to_ybr_full(RGB), PixelInfo(photometric_interpretation="YBR_FULL", samples_per_pixel=3)),
    "ybr-full-planar": (np.ascontiguousarray(_rgb_to_ybr_full(RGB).transpose(2, 0, 1)),
                        PixelInfo(photometric_interpretation="YBR_FULL", samples_per_pixel=3,
                                  planar_configuration=1)),
    "rgb-3x3": (RNG.integers(0, 256, (3, 3, 3), dtype=np.uint8), PixelInfo(photometric_interpretation="RGB")),
    "rgb-large": (RNG.integers(0, 256, (700, 900, 3), dtype=np.uint8), PixelInfo(photometric_interpretation="RGB")),
}


@pytest.mark.parametrize("case", EDGE_CASES)
@pytest.mark.parametrize("size", [128, 7, None])
def test_edge_cases_twins_agree(render: Render, case: str, size: int | None) -> None:
    pixels, info = EDGE_CASES[case]
    image = assert_twins_agree(render, pixels, info, size=size)
    colour = info.photometric_interpretation in ("RGB", "YBR_FULL")
    assert image.ndim == (3 if colour else 2)


def test_monochrome1_is_inverted(render: Render) -> None:
    mono2 = render(CT, CT_INFO)
    mono1 = render(CT, PixelInfo(**{**_info_dict(CT_INFO), "photometric_interpretation": "MONOCHROME1"}))
    # 255 - round(d) and round(255 - d) differ where d ends in .5
    assert np.abs(mono1.astype(int) - (255 - mono2.astype(int))).max() <= 1


def _info_dict(info: PixelInfo) -> dict[str, object]:
    return {name: getattr(info, name) for name in info.__struct_fields__}


def test_planar_configurations_agree(render: Render) -> None:
    interleaved = render(*EDGE_CASES["rgb"], size=16)
    planar = render(*EDGE_CASES["rgb-planar"], size=16)
    assert np.array_equal(interleaved, planar)


def test_ybr_full_becomes_rgb(render: Render) -> None:
    rgb = render(*EDGE_CASES["rgb"], size=None)
    ybr = render(*EDGE_CASES["ybr-full"], size=None)
    assert np.abs(rgb.astype(int) - ybr.astype(int)).max() <= 3  # the YBR rounding of _rgb_to_ybr_full


def test_16_bit_colour_is_scaled_to_8_bits(render: Render) -> None:
    assert np.array_equal(render(*EDGE_CASES["rgb-16bit"]), render(*EDGE_CASES["rgb"]))


def test_bits_above_bits_stored_are_ignored(render: Render) -> None:
    assert np.array_equal(render(*EDGE_CASES["high-bits-garbage"]), render(CT, CT_INFO))


def test_auto_window_uses_the_range(render: Render) -> None:
    gradient = np.tile(np.arange(1000, 2000, dtype=np.uint16), (10, 1))
    image = render(gradient, PixelInfo(), size=None)
    assert image.min() == 0 and image.max() == 255
    assert np.all(np.diff(image[0].astype(int)) >= 0)  # monotone


def test_window_override(render: Render) -> None:
    image = render(CT, CT_INFO, window=(100000.0, 10.0))  # far above every value
    assert image.max() == 0


def test_flat_image_is_black(render: Render) -> None:
    assert render(*EDGE_CASES["flat"]).max() == 0


@pytest.mark.parametrize(
    ("pixels", "info", "message"),
    [
        (np.zeros((4, 4), np.uint8), PixelInfo(photometric_interpretation="PALETTE COLOR"), "decode it to RGB"),
        (np.zeros((4, 4, 3), np.uint8), PixelInfo(), "must be 2-D"),
        (np.zeros((4, 4), np.uint8), PixelInfo(photometric_interpretation="RGB"), "rows, columns, 3"),
        (np.zeros((4, 4), np.complex64), PixelInfo(), "cannot be rendered"),
        (np.zeros((0, 4), np.uint8), PixelInfo(), "empty frame"),
    ],
)
def test_refused(render: Render, pixels: np.ndarray, info: PixelInfo, message: str) -> None:
    with pytest.raises(ThumbnailError, match=message):
        render(pixels, info)


def test_refuses_size_zero(render: Render) -> None:
    with pytest.raises(ThumbnailError, match="size"):
        render(CT, CT_INFO, size=0)


# -- pydicom's corpus ------------------------------------------------------------------------


def _has_pixel_data(path: Path) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, force=True, specific_tags=["PixelData"])
        except Exception:
            return False
    return "PixelData" in ds


CORPUS_IMAGES = [path for path in corpus_files() if _has_pixel_data(path)]


def _pydicom_frame(path: Path) -> np.ndarray | None:
    """pydicom's own decoding of the frame fastscp picks, or None if it cannot."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, force=True)
            frames = int(ds.get("NumberOfFrames") or 1)
            return pydicom.pixels.pixel_array(ds, index=frames // 2)
        except Exception:
            return None


def test_corpus_images_are_there() -> None:
    assert len(CORPUS_IMAGES) > 80
    names = {corpus_id(p) for p in CORPUS_IMAGES}
    assert {"test_files/CT_small.dcm", "test_files/JPEG2000.dcm", "test_files/SC_rgb_rle_2frame.dcm",
            "test_files/examples_ybr_color.dcm"} <= names


@pytest.mark.parametrize("path", CORPUS_IMAGES, ids=corpus_id)
def test_corpus_file(render: Render, path: Path) -> None:
    reference = _pydicom_frame(path)
    try:
        frame = imaging.decode_frame(path)
    except DecodeError:
        # fastscp may refuse only what pydicom cannot decode either; never crash
        assert reference is None
        return
    if reference is None:  # fastscp's own reader is more lenient (badVR.dcm: an IS of "1A" elsewhere)
        assert corpus_id(path) in {"test_files/badVR.dcm"}
        reference = frame.pixels
    assert frame.index == frame.number_of_frames // 2
    assert frame.pixels.shape[-2:] == reference.shape[-2:] or frame.pixels.shape[:2] == reference.shape[:2]
    image = assert_twins_agree(render, frame.pixels, frame.info)
    assert max(image.shape[:2]) <= 128
    made = thumbnail.make_thumbnail(path)
    assert made.shape == image.shape


# -- files -----------------------------------------------------------------------------------


def write_image(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2",
                transfer_syntax: str = ExplicitVRLittleEndian, **attrs: object) -> Path:
    """A minimal image object with `pixels` ((frames,) rows, columns[, 3]) as Pixel Data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = (
        CTImageStorage if photometric.startswith("MONO") else SecondaryCaptureImageStorage)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "THUMB", "OT"
    samples = 3 if photometric in ("RGB", "YBR_FULL") else 1
    frames = pixels.shape[0] if pixels.ndim == (3 if samples == 1 else 4) else 1
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if samples == 3 else pixels.shape[-2:]
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if samples == 3:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    big = transfer_syntax == ExplicitVRBigEndian
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder(">" if big else "<")).tobytes()
    if transfer_syntax == RLELossless:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.compress(RLELossless, encoding_plugin="pydicom")
    ds.save_as(path, enforce_file_format=True, implicit_vr=transfer_syntax == ImplicitVRLittleEndian,
               little_endian=not big)
    return path


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, RLELossless])
def test_multi_frame_uses_the_middle_frame(tmp_path: Path, syntax: str) -> None:
    frames = np.stack([np.full((20, 30), value, dtype=np.uint16) for value in (0, 1000, 2000, 3000, 4000)])
    frames[2, 0, 0] = 0  # a mark: the middle frame has one dark pixel
    path = write_image(tmp_path / "multi.dcm", frames, WindowCenter=2000, WindowWidth=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's notes on retired Big Endian
        frame = imaging.decode_frame(path)
    assert (frame.index, frame.number_of_frames) == (2, 5)
    assert frame.pixels[0, 0] == 0 and frame.pixels[1, 1] == 2000
    image = thumbnail.make_thumbnail(path, size=None)
    assert image[0, 0] == 0 and image[1, 1] == 129  # (2000 - 1950) * 255 / 99, window 2000/100
    assert imaging.decode_frame(path, 4).pixels[1, 1] == 4000
    with pytest.raises(DecodeError, match="frame 5 requested"):
        imaging.decode_frame(path, 5)


def test_colour_file(tmp_path: Path) -> None:
    path = write_image(tmp_path / "rgb.dcm", RGB, photometric="RGB")
    image = thumbnail.make_thumbnail(path, size=None)
    assert np.array_equal(image, RGB)


def test_write_thumbnail(tmp_path: Path) -> None:
    path = write_image(tmp_path / "ct.dcm", CT, WindowCenter=2000, WindowWidth=4000)
    out = tmp_path / "thumbs" / "a" / "ct.jpg"
    assert thumbnail.write_thumbnail(path, out) == str(out)
    with Image.open(out) as im:
        assert im.format == "JPEG" and im.size == (128, 128) and im.mode == "L"
    first = out.read_bytes()
    thumbnail.write_thumbnail(path, out, size=64)  # replaced atomically
    with Image.open(out) as im:
        assert im.size == (64, 64)
    assert out.read_bytes() != first
    assert sorted(p.name for p in out.parent.iterdir()) == ["ct.jpg"]  # no temp files left


def test_no_pixel_data_is_reported_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sr = PYDICOM_DATA / "test_files" / "test-SR.dcm"
    with pytest.raises(NoPixelData):
        thumbnail.make_thumbnail(sr)
    with caplog.at_level(logging.INFO, logger="fastscp.thumbnail"):
        assert thumbnail.try_write_thumbnail(sr, tmp_path / "sr.jpg") is None
    assert "no Pixel Data" in caplog.text
    assert not (tmp_path / "sr.jpg").exists()


def test_undecodable_and_broken_files(tmp_path: Path) -> None:
    not_dicom = tmp_path / "x.dcm"
    not_dicom.write_bytes(b"hello")
    with pytest.raises(DecodeError, match="not a DICOM"):
        thumbnail.make_thumbnail(not_dicom)
    with pytest.raises(DecodeError, match="cannot read"):
        thumbnail.make_thumbnail(tmp_path / "missing.dcm")
    path = write_image(tmp_path / "ct.dcm", CT)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(DecodeError, match="Pixel Data holds|truncated"):
        thumbnail.make_thumbnail(truncated)
    # a JPEG Extended file none of the installed plugins decodes (pydicom's own example)
    with pytest.raises(DecodeError, match="JPEG Extended"):
        imaging.decode_frame(PYDICOM_DATA / "test_files" / "JPEG-lossy.dcm")


def test_thumbnail_path() -> None:
    root = "/srv/received"
    assert thumbnail.thumbnail_path(root, "P1/20260101_1.2/1_CT/1.2.3.dcm") == \
        "/srv/received/thumbnails/P1/20260101_1.2/1_CT/1.2.3.jpg"
    assert thumbnail.thumbnail_path(root, "1.2.3.DCM") == "/srv/received/thumbnails/1.2.3.jpg"
    assert thumbnail.thumbnail_path(root, "a/IMG0001") == "/srv/received/thumbnails/a/IMG0001.jpg"
    for bad in ("../etc/passwd", "/etc/passwd", "a/../../b.dcm", "a//b.dcm", ""):
        with pytest.raises(ValueError):
            thumbnail.thumbnail_path(root, bad)


def test_read_header_of_a_long_header(tmp_path: Path) -> None:
    # a header longer than the first read (64 KiB): read on until Pixel Data
    path = tmp_path / "long.dcm"
    write_image(path, CT[:16, :16])
    ds = pydicom.dcmread(path)
    ds.add_new(0x00090010, "LO", "FASTSCP TEST")
    ds.add_new(0x00091010, "OB", b"x" * 100_000)
    ds.save_as(path, enforce_file_format=True)
    fields, syntax, start = imaging.read_header(path)
    assert fields.rows == 16 and syntax == ExplicitVRLittleEndian and fields.pixel_data_offset > 100_000
    assert thumbnail.make_thumbnail(path).shape == (16, 16)
