"""A series as a NIfTI-1 volume, converted by dcm2niix.

dcm2niix (Chris Rorden's, the converter the neuroimaging field and BIDS
tools use) sorts the slices by position, derives the affine from Image
Position/Orientation (Patient) and Pixel Spacing, applies the rescale as
scl_slope/scl_inter, and knows the vendors' mosaics, multi-frame objects
and compressed transfer syntaxes. Its PyPI package ``dcm2niix`` ships the
binary (:data:`dcm2niix.bin`), so pip installs it with fastscp.

:func:`convert_files` is what a post-receive hook calls with a series'
files; :func:`export_series` finds them through the index first. The
converter reads copies in a temp folder (it converts every file of the
folder it is given, and never sees the storage area); the volume is
renamed to its name at the end: complete or absent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from typing import NamedTuple

from fastscp.media import current_umask
from fastscp.media.selection import SelectionError, select_instances
from fastscp.query.messages import Condition

__all__ = ["CONVERTER_TIMEOUT", "NiftiError", "NiftiVolume", "convert_files", "converter", "export_series"]

#: Seconds dcm2niix may take for one series (a 2000-slice CT takes a few seconds).
CONVERTER_TIMEOUT = 600.0
_SUFFIXES = (".nii.gz", ".nii")


class NiftiError(Exception):
    """The series can't be converted (the message says why: converter output included)."""


class NiftiVolume(NamedTuple):
    path: str
    #: Files of the series given to the converter.
    files: int
    #: dcm2niix's own messages (warnings about the series, for the log).
    log: str


def converter() -> str:
    """The dcm2niix binary: the PyPI package's, else one on PATH.

    Raises
    ------
    NiftiError
        Neither is installed.
    """
    try:
        import dcm2niix

        if os.access(dcm2niix.bin, os.X_OK):
            return str(dcm2niix.bin)
    except ImportError:
        pass
    found = shutil.which("dcm2niix")
    if found is None:
        raise NiftiError("dcm2niix is not installed (pip install dcm2niix, a dependency of fastscp)")
    return found


def _tail(text: str, lines: int = 8) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def convert_files(paths: Sequence[str], out: str, *, timeout: float = CONVERTER_TIMEOUT) -> NiftiVolume:
    """Convert the DICOM files ``paths`` (one series) into the NIfTI-1 file ``out``.

    Parameters
    ----------
    paths : sequence of str
        The series' files (they are copied; the originals are only read).
    out : str
        ``*.nii.gz`` (gzip-compressed) or ``*.nii``; replaced atomically if
        it exists; its folder is created.
    timeout : float
        Seconds the converter may take.

    Raises
    ------
    NiftiError
        No files, another suffix, a converter failure or time-out, or a
        series that makes more than one volume (echoes, differing
        orientations or gaps: the names are listed; convert with dcm2niix
        directly then).
    """
    if not paths:
        raise NiftiError("no files to convert")
    suffix = next((s for s in _SUFFIXES if out.endswith(s)), "")
    if not suffix or len(os.path.basename(out)) == len(suffix):
        raise NiftiError(f"{out}: name the output *.nii.gz (compressed) or *.nii")
    binary = converter()
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=folder)
    try:
        source, target = os.path.join(work, "dicom"), os.path.join(work, "nifti")
        os.mkdir(source)
        os.mkdir(target)
        for n, path in enumerate(paths):
            try:
                shutil.copyfile(path, os.path.join(source, f"{n:06d}.dcm"))
            except OSError as exc:
                raise NiftiError(f"{path}: can't copy it: {exc.strerror}") from None
        # -z i: gzip in-process (no pigz needed); -b n: no BIDS sidecar; -f: the output's name.
        argv = [binary, "-z", "i" if suffix == ".nii.gz" else "n", "-b", "n", "-f", "volume", "-o", target, source]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise NiftiError(f"dcm2niix took longer than {timeout:.0f} s") from None
        made = sorted(name for name in os.listdir(target) if name.endswith(_SUFFIXES))
        if done.returncode != 0 or not made:
            raise NiftiError(f"dcm2niix made no volume (exit {done.returncode}):\n{_tail(done.stdout + done.stderr)}")
        if len(made) > 1:
            raise NiftiError(f"the series makes {len(made)} volumes ({', '.join(made)}): convert it with dcm2niix "
                             f"directly\n{_tail(done.stdout)}")
        result = os.path.join(target, made[0])
        with open(result, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(result, 0o666 & ~current_umask())
        os.replace(result, out)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return NiftiVolume(out, len(paths), done.stdout)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def export_series(index_path: str, storage_root: str, series_uid: str, out: str, *,
                  timeout: float = CONVERTER_TIMEOUT) -> NiftiVolume:
    """Convert the stored series ``series_uid``, found through the index, into ``out`` (see :func:`convert_files`).

    Raises
    ------
    NiftiError
        The index can't be read, has no instance of the series, or the conversion failed.
    """
    try:
        instances = select_instances(index_path, storage_root, [Condition("SeriesInstanceUID", series_uid)],
                                     what=f"series {series_uid}")
    except SelectionError as exc:
        raise NiftiError(str(exc)) from None
    return convert_files([instance.path for instance in instances], out, timeout=timeout)
