"""Type stub of the compiled thumbnail pass; the twin is ``fastscp/imaging/_thumbnail_py.py``."""

import numpy as np

from fastscp.imaging._thumbnail_py import PixelInfo, Plan

def render(p: Plan) -> np.ndarray: ...
def thumbnail(
    pixels: np.ndarray,
    info: PixelInfo,
    size: int | None = ...,
    window: tuple[float, float] | None = ...,
) -> np.ndarray: ...
