"""Structural walk of a received data set before its success status.

The walk runs in the compiled module ``fastscp.dicom._walk_cext`` (built from
``fastscp/dicom/_walk_cext.pyx``) unless ``FASTSCP_NO_EXTENSIONS=1`` or the module is not
built; then the pure-Python twin ``fastscp.dicom._walk_py`` runs, with the same
results. :data:`BACKEND` tells which. See :mod:`fastscp.dicom._walk_py` for what
the walk checks.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

from fastscp.dicom._header_py import ENC_DEFLATED, ENC_EXPLICIT_BE, ENC_IMPLICIT_LE, HeaderError, encoding_for
from fastscp.dicom._walk_py import Walker as WalkerPy
from fastscp.dicom._walk_py import walk_deflated
from fastscp.dicom.backend import compiled

__all__ = ["BACKEND", "HeaderError", "WalkerCext", "WalkerPy", "mapped_dataset", "walk_dataset", "walk_from_prefix"]

#: The compiled walker class; None if not built or FASTSCP_NO_EXTENSIONS=1.
WalkerCext: Any = compiled("fastscp.dicom._walk_cext", "Walker")
#: "cext" or "py": the implementation behind :func:`walk_dataset`.
BACKEND: Final = "cext" if WalkerCext is not None else "py"
_Walker: Any = WalkerCext or WalkerPy


def walk_dataset(
    data: bytes | bytearray | memoryview, transfer_syntax_uid: str, max_inflated: int, walker: Any = None
) -> None:
    """Walk a whole data set encoded in ``transfer_syntax_uid`` to its end.

    ``walker`` picks the twin (a Walker class); the default is :data:`BACKEND`'s.

    Raises
    ------
    HeaderError
        The data set is malformed; the message says what and where.
    """
    cls = walker or _Walker
    encoding = encoding_for(transfer_syntax_uid)
    if encoding == ENC_DEFLATED:
        walk_deflated(data, cls(True, False), max_inflated)
        return
    w = cls(encoding != ENC_IMPLICIT_LE, encoding == ENC_EXPLICIT_BE)
    w.feed(data)
    w.finish()


def walk_from_prefix(
    prefix: bytes | bytearray | memoryview, transfer_syntax_uid: str, length: int, walker: Any = None
) -> bool:
    """Walk a data set of ``length`` bytes from its first bytes alone, if they suffice.

    They suffice when they end inside a value that runs exactly to the end
    of the data set: the Pixel Data of most images. Returns True if the walk
    passed, False if it needs the rest (then walk the whole data set).

    PERF: spares the mmap of the temp file (~15 us) for a 512x512 CT.

    Raises
    ------
    HeaderError
        The first bytes alone show the data set malformed.
    """
    encoding = encoding_for(transfer_syntax_uid)
    if encoding == ENC_DEFLATED or len(prefix) >= length:
        return False
    w = (walker or _Walker)(encoding != ENC_IMPLICIT_LE, encoding == ENC_EXPLICIT_BE)
    w.feed(prefix)
    skip = w.pending_skip
    if not skip or w.position + skip != length:
        return False
    w.advance(skip)
    w.finish()
    return True


@contextmanager
def mapped_dataset(fd: int, offset: int, length: int) -> Iterator[memoryview]:
    """The data set at ``offset`` (``length`` bytes) of an open file, mapped read-only.

    PERF: the walk and the header scan touch only the pages holding element
    headers; a skipped value (the pixel data) is never read into memory.
    """
    if length == 0:
        yield memoryview(b"")
        return
    mapped = mmap.mmap(fd, offset + length, prot=mmap.PROT_READ)
    view = memoryview(mapped)[offset:]
    try:
        yield view
    finally:
        view.release()
        try:
            mapped.close()
        except BufferError:
            # A slice of it lives on in a traceback being handled: the
            # mapping goes when that does.
            pass
