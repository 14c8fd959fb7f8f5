"""fastscp.storage.files, the one owner of how every stage writes: folders and files with exactly
their modes whatever the umask, atomic replacement that leaves no temp file, and the fsyncs
(watched with strace: a file and a folder fsync must be real system calls, not trusted)."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastscp.storage.files import BROWSABLE, FileModes, fsync_dir, makedirs, write_atomic
from tests.e2e.test_durability import _CALL


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def umask() -> Iterator[None]:
    """A umask that would take bits away: the modes must not depend on it."""
    old = os.umask(0o077)
    yield
    os.umask(old)


@pytest.mark.usefixtures("umask")
def test_makedirs_gives_each_folder_it_makes_exactly_the_mode(tmp_path: Path) -> None:
    kept = tmp_path / "kept"
    kept.mkdir(mode=0o700)
    makedirs(str(kept / "a" / "b" / "c"), 0o2775)
    for folder in (kept / "a", kept / "a" / "b", kept / "a" / "b" / "c"):
        assert mode(folder) == 0o2775, folder
    assert mode(kept) == 0o700  # a folder that exists is left as it is
    makedirs(str(kept / "a" / "b" / "c"), 0o700)  # all there: nothing changes
    assert mode(kept / "a" / "b" / "c") == 0o2775


@pytest.mark.usefixtures("umask")
@pytest.mark.parametrize("kind", ["bytes", "file"])
def test_write_atomic_places_the_bytes_with_exactly_the_modes(tmp_path: Path, kind: str) -> None:
    data = os.urandom(3 << 20)  # more than one 1 MiB copy chunk
    path = tmp_path / "new" / "deeper" / "x.jpg"
    before = open_fds()
    write_atomic(path, data if kind == "bytes" else io.BytesIO(data))
    assert path.read_bytes() == data
    # BROWSABLE by default (0644/0755), not narrowed by the umask.
    assert (mode(path), mode(path.parent), mode(path.parent.parent)) == (0o644, 0o755, 0o755)
    assert BROWSABLE == FileModes(0o644, 0o755)
    write_atomic(path, b"replaced", modes=FileModes(0o660, 0o770))
    assert path.read_bytes() == b"replaced" and mode(path) == 0o660
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.jpg"]  # no temp file left
    assert open_fds() == before  # no descriptor left open


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    class Broken(io.RawIOBase):
        def readinto(self, buffer: object) -> int:
            raise OSError("the source went away")

    path = tmp_path / "x.png"
    write_atomic(path, b"old")
    before = open_fds()
    with pytest.raises(OSError, match="the source went away"):
        write_atomic(path, Broken())  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
    assert open_fds() == before


def fsyncs(tmp_path: Path, code: str) -> list[str]:
    """The paths fsynced (successfully) by a Python process that runs ``code`` with fastscp.storage.files
    imported as ``files``, under strace."""
    if shutil.which("strace") is None:
        pytest.fail("strace is not installed: run 'make setup' (Makefile APT_PACKAGES)")
    trace = tmp_path / "strace.out"
    script = f"from fastscp.storage import files\n{code}\n"
    subprocess.run(["strace", "-f", "-y", "-e", "trace=fsync,fdatasync", "-o", str(trace), sys.executable, "-c",
                    script], check=True, timeout=120, cwd=tmp_path)
    return [match.group(3) for line in trace.read_text().splitlines() if (match := _CALL.match(line))]


def test_fsync_dir_and_write_atomic_fsync_for_real(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    code = (f"files.fsync_dir({str(folder)!r})\n"
            f"files.write_atomic({str(folder / 'synced.bin')!r}, b'x' * 10, fsync=True)\n"
            f"files.write_atomic({str(folder / 'unsynced.bin')!r}, b'y' * 10)")
    calls = fsyncs(tmp_path, code)
    # The folder, then the synced file's temp (before its rename); nothing for a write without fsync.
    assert len(calls) == 2, calls
    assert calls[0] == str(folder)
    assert calls[1].startswith(str(folder / ".tmp-")) and calls[1].endswith(".bin"), calls
    before = open_fds()
    fsync_dir(str(folder))
    assert open_fds() == before  # the folder's descriptor is closed
