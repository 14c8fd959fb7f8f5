"""Reading a stored image's frame (fastscp.imaging.frames) leaves the page cache as it found room for."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom

from fastscp.dicom.synthetic import write_series
from fastscp.imaging.frames import decode_frame
from fastscp.storage.files import RECYCLE_MIN_BYTES
from tests.conftest import cached_bytes


def test_a_large_images_pages_go_back_once_its_frame_is_read_a_small_ones_stay(page_cache: Path) -> None:
    """The post-store stage reads each stored image once, for its thumbnail: from a file of at least
    RECYCLE_MIN_BYTES its pages go back to the kernel (the next read's pages), a small file's stay."""
    (large,) = write_series(str(page_cache / "ct"), 1)
    (small,) = write_series(str(page_cache / "mr"), 1, rows=64, columns=64, modality="MR")
    assert Path(large).stat().st_size >= RECYCLE_MIN_BYTES > Path(small).stat().st_size
    for path in (large, small):
        expected = pydicom.dcmread(path).pixel_array  # and the file in the cache, as a just stored one is
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)  # written out, as the stage finds it (fsync always, or storage.area.PageRecycler)
        os.close(fd)
        assert cached_bytes(Path(path)) > 0
        assert np.array_equal(decode_frame(path).pixels, expected)
    assert cached_bytes(Path(large)) == 0
    assert cached_bytes(Path(small)) > 0
