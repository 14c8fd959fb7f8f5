"""Thumbnail speed: the compiled pass against numpy + Pillow on a 512x512 16-bit CT frame.

Run with ``pytest bench/test_bench_thumbnail.py --benchmark-only``.  The peer
is what one writes with numpy and Pillow: rescale and window the whole frame
in float32, clip, convert to uint8, then ``Image.resize(..., BOX)`` (area
averaging, like fastscp's).  A second peer replaces the float window by a
65536-entry lookup table (``np.take``) and ``Image.reduce(4)``: the fastest
numpy + Pillow route we know.  Each fastscp result reports its speed-up over
the first peer (printed, and ``extra_info["x_vs_numpy_pillow"]`` in
``--benchmark-json``); the goal is >= 5x.

JPEG encoding (thumbnail and full-size export) is measured with the venv's
PIL (Pillow-SIMD where it built; ``extra_info["pillow"]`` names it) and, in
the same run, with stock Pillow of the same version from bench/.pil-stock
(``extra_info["x_vs_stock"]``).
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastscp.dicom.synthetic import write_series
from fastscp.imaging import _thumbnail_py, thumbnail
from fastscp.imaging import frames as imaging
from fastscp.imaging.thumbnail import PixelInfo

ROWS = COLUMNS = 512
SIZE = 128
# A CT as scanners send it: 12 bits stored in 16, Rescale Intercept -1024, a
# soft-tissue window.
INFO = PixelInfo(bits_stored=12, rescale_slope=1.0, rescale_intercept=-1024.0, window_center=40.0,
                 window_width=400.0)
# Medians of this run, seconds, by implementation; filled as the tests run.
MEDIANS: dict[str, float] = {}


@pytest.fixture(scope="module")
def ct() -> np.ndarray:
    """A 512x512 frame: a disc of soft tissue with noise, in air (stored values)."""
    rng = np.random.default_rng(0)
    y, x = np.indices((ROWS, COLUMNS))
    inside = (x - 256) ** 2 + (y - 256) ** 2 < 230**2
    hu = np.where(inside, 40 + rng.normal(0, 120, (ROWS, COLUMNS)), -1000 + rng.normal(0, 20, (ROWS, COLUMNS)))
    return np.clip(hu + 1024, 0, 4095).astype(np.uint16)


def numpy_pillow(pixels: np.ndarray) -> np.ndarray:
    """The peer: float32 rescale + window over the frame, then Pillow's BOX resize."""
    lo = INFO.window_center - 0.5 - (INFO.window_width - 1) / 2
    hi = INFO.window_center - 0.5 + (INFO.window_width - 1) / 2
    values = pixels.astype(np.float32) * np.float32(INFO.rescale_slope) + np.float32(INFO.rescale_intercept)
    display = np.clip((values - np.float32(lo)) * np.float32(255 / (hi - lo)), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(display).resize((SIZE, SIZE), Image.Resampling.BOX))


def _lut() -> np.ndarray:
    stored = np.arange(65536, dtype=np.float64)
    lo = INFO.window_center - 0.5 - (INFO.window_width - 1) / 2
    hi = INFO.window_center - 0.5 + (INFO.window_width - 1) / 2
    return np.clip((stored + INFO.rescale_intercept - lo) * 255 / (hi - lo) + 0.5, 0, 255).astype(np.uint8)


LUT = _lut()


def numpy_lut_pillow(pixels: np.ndarray) -> np.ndarray:
    """The fastest peer we found: a lookup table for the window, then Image.reduce(4)."""
    display = np.take(LUT, pixels)
    return np.asarray(Image.fromarray(display).reduce(ROWS // SIZE))


def _median_seconds(func: Callable[[], object], number: int) -> float:
    return statistics.median(timeit.repeat(func, number=number, repeat=7)) / number


def _report(benchmark, impl: str, capsys: pytest.CaptureFixture, pixels: np.ndarray) -> None:
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing measured
        return
    median = benchmark.stats.stats.median
    MEDIANS[impl] = median
    peer = MEDIANS.get("numpy+pillow")
    if peer is None:  # the peer did not run (-k): measure it here
        peer = MEDIANS["numpy+pillow"] = _median_seconds(lambda: numpy_pillow(pixels), 50)
    ratio = peer / median
    benchmark.extra_info["x_vs_numpy_pillow"] = round(ratio, 1)
    with capsys.disabled():
        print(f"\n  thumbnail {impl}: {median * 1e6:.0f} us median, {ratio:.1f}x faster than "
              f"numpy + Pillow ({peer * 1e6:.0f} us)")


def test_numpy_pillow(benchmark, ct) -> None:
    benchmark.group = "CT 512x512 -> 128 thumbnail"
    benchmark.extra_info["pillow"] = f"{imaging.PILLOW_FLAVOUR} {imaging.PILLOW_VERSION}"
    image = benchmark(numpy_pillow, ct)
    assert image.shape == (SIZE, SIZE)
    if benchmark.stats is not None:
        MEDIANS["numpy+pillow"] = benchmark.stats.stats.median


def test_numpy_lut_pillow(benchmark, ct, capsys) -> None:
    benchmark.group = "CT 512x512 -> 128 thumbnail"
    benchmark.extra_info["pillow"] = f"{imaging.PILLOW_FLAVOUR} {imaging.PILLOW_VERSION}"
    image = benchmark(numpy_lut_pillow, ct)
    assert image.shape == (SIZE, SIZE)
    # the peers compute the same thumbnail (up to their rounding)
    assert np.abs(image.astype(int) - numpy_pillow(ct).astype(int)).max() <= 2
    _report(benchmark, "numpy-lut+pillow", capsys, ct)


@pytest.mark.parametrize("impl", ["py", "cext"])
def test_thumbnail(benchmark, ct, capsys, impl: str) -> None:
    render = thumbnail.thumbnail_cext if impl == "cext" else thumbnail.thumbnail_py
    if render is None:
        pytest.fail("fastscp.imaging._thumbnail_cext is not built")
    benchmark.group = "CT 512x512 -> 128 thumbnail"
    image = benchmark(render, ct, INFO, SIZE)
    assert image.shape == (SIZE, SIZE)
    assert np.abs(image.astype(int) - numpy_pillow(ct).astype(int)).max() <= 2  # the same picture
    _report(benchmark, impl, capsys, ct)
    if impl == "cext" and benchmark.stats is not None:
        assert benchmark.extra_info["x_vs_numpy_pillow"] >= 5  # the goal set for the compiled pass


def test_thumbnail_render_only(benchmark, ct) -> None:
    """The compiled pass alone, without the Python planning around it."""
    if thumbnail.thumbnail_cext is None:
        pytest.fail("fastscp.imaging._thumbnail_cext is not built")
    from fastscp.imaging import _thumbnail_cext

    plan = _thumbnail_py.plan(ct, INFO, SIZE)
    benchmark.group = "CT 512x512 -> 128 thumbnail"
    assert benchmark(_thumbnail_cext.render, plan).shape == (SIZE, SIZE)


# -- whole files and JPEG -----------------------------------------------------------


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(write_series(str(tmp_path_factory.mktemp("bench")), 1)[0])


def test_make_thumbnail_file(benchmark, ct_file) -> None:
    """Read the header and the frame from a file and render it: the post-store cost without JPEG."""
    benchmark.group = "file -> thumbnail"
    assert benchmark(thumbnail.make_thumbnail, ct_file).shape == (SIZE, SIZE)


def test_write_thumbnail_file(benchmark, ct_file, tmp_path) -> None:
    """The whole post-store stage for one CT: file -> JPEG thumbnail, atomically written.

    Each round writes a new file, as the stage does: replacing one file again and again
    costs several times more (ext4 writes a file renamed over another out at once)."""
    benchmark.group = "file -> thumbnail"
    benchmark.extra_info["pillow"] = f"{imaging.PILLOW_FLAVOUR} {imaging.PILLOW_VERSION}"
    names = (tmp_path / f"{n}.jpg" for n in itertools.count())
    benchmark.pedantic(thumbnail.write_thumbnail, setup=lambda: ((ct_file, next(names)), {}), rounds=500)


#: Stock Pillow installed beside the venv's PIL by ``make bench-setup``.
PIL_STOCK = Path(__file__).resolve().parent / ".pil-stock"
_TIME_ENCODE = """
import json, statistics, sys, timeit
import numpy as np
from fastscp.imaging import frames as imaging
image = np.load(sys.argv[1])
seconds = statistics.median(timeit.repeat(lambda: imaging.encode_jpeg(image), number=int(sys.argv[2]), repeat=7))
print(json.dumps({"pillow": f"{imaging.PILLOW_FLAVOUR} {imaging.PILLOW_VERSION}", "s": seconds / int(sys.argv[2])}))
"""


def _encode_seconds(image_file: Path, number: int, pythonpath: str = "") -> dict[str, object]:
    """imaging.encode_jpeg timed in a fresh interpreter, with ``pythonpath`` first on its path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (pythonpath, os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, "-c", _TIME_ENCODE, str(image_file), str(number)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


@pytest.mark.parametrize("what", ["thumbnail-128", "full-512"])
def test_encode_jpeg(benchmark, ct, tmp_path, what: str) -> None:
    """JPEG encoding with the venv's PIL (Pillow-SIMD where it built) against
    stock Pillow, the two timed alike in fresh interpreters, interleaved."""
    image = thumbnail.thumbnail(ct, INFO, SIZE if what == "thumbnail-128" else None)
    benchmark.group = f"JPEG encode {what}"
    benchmark.extra_info["pillow"] = f"{imaging.PILLOW_FLAVOUR} {imaging.PILLOW_VERSION}"
    assert benchmark(imaging.encode_jpeg, image)[:2] == b"\xff\xd8"
    if not (PIL_STOCK / "PIL").is_dir():
        benchmark.extra_info["vs_stock"] = "no stock Pillow in bench/.pil-stock (make bench-setup)"
        return
    image_file = tmp_path / "image.npy"
    np.save(image_file, image)
    number = 200 if what == "thumbnail-128" else 20
    runs = [(_encode_seconds(image_file, number), _encode_seconds(image_file, number, str(PIL_STOCK)))
            for _ in range(3)]
    ours = statistics.median(float(a["s"]) for a, _ in runs)
    stock = statistics.median(float(b["s"]) for _, b in runs)
    benchmark.extra_info.update(stock_pillow=runs[0][1]["pillow"], us=round(ours * 1e6, 1),
                                stock_us=round(stock * 1e6, 1), x_vs_stock=round(stock / ours, 2))
    print(f"\n{what}: {runs[0][0]['pillow']} {ours * 1e6:.1f} us, {runs[0][1]['pillow']} {stock * 1e6:.1f} us "
          f"({stock / ours:.2f}x)")


def test_full_size_export(benchmark, ct) -> None:
    """dcm2jpg's work after decoding: window at full size, encode."""
    benchmark.group = "full-size export 512x512"
    benchmark.extra_info["pillow"] = f"{imaging.PILLOW_FLAVOUR} {imaging.PILLOW_VERSION}"
    benchmark(lambda: imaging.encode_jpeg(thumbnail.thumbnail(ct, INFO, None)))


def test_pillow_resize_box(benchmark, ct) -> None:
    """Pillow's own BOX resize of an 8-bit frame (where Pillow-SIMD claims its gains)."""
    display = np.take(LUT, ct)
    image = Image.fromarray(display)
    benchmark.group = "Pillow resize 512 -> 128 (8-bit)"
    benchmark.extra_info["pillow"] = f"{imaging.PILLOW_FLAVOUR} {imaging.PILLOW_VERSION}"
    benchmark(image.resize, (SIZE, SIZE), Image.Resampling.BOX)
