"""Files and folders made durably and with the configured permissions: one owner for every stage that writes.

The storage area (:mod:`fastscp.storage.area`) places received images; the
post-store stage, the hooks, conversions and the CLI write thumbnails, scan
sheets, copies and JPEGs. All of them make folders with exactly the
configured mode, replace files atomically, and fsync folders the same way.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
import threading
from typing import BinaryIO, NamedTuple

#: storage.file_mode and storage.dir_mode defaults: patient data, so the
#: owner and its group only.
FILE_MODE = 0o640
DIR_MODE = 0o750


class FileModes(NamedTuple):
    """The permission bits of the files and of the folders fastscp creates (storage.file_mode, storage.dir_mode)."""

    file: int = FILE_MODE
    folder: int = DIR_MODE

    @classmethod
    def of(cls, file_mode: str, dir_mode: str) -> FileModes:
        """From the config's octal strings (storage.file_mode, storage.dir_mode), checked when the config loads."""
        return cls(int(file_mode, 8), int(dir_mode, 8))

    def umask(self) -> int:
        """The process umask that gives files made by others (DuckDB's index and WAL, the log) no more than these."""
        return 0o777 & ~(self.file | self.folder)


#: The defaults, for images and everything made from them.
PATIENT_DATA = FileModes()
#: Files made for someone to open at once (``fastscp convert`` output): the usual 0644/0755.
BROWSABLE = FileModes(0o644, 0o755)


#: How the names of write_atomic's temp files start: a file being written (or left by a writer that was killed).
TEMP_PREFIX = ".tmp-"
#: Numbers the temp files of write_atomic (with the PID and the thread: a name no other writer uses).
_temp_numbers = itertools.count()


#: A file at least this long is worth giving its page cache back to the kernel once written out or
#: read (:func:`give_back_pages`); for a shorter one the system calls, and its early writeback, cost
#: more than its pages (figures in storage.area.PageRecycler).
RECYCLE_MIN_BYTES = 128 * 1024


def give_back_pages(fd: int) -> None:
    """Drop the file's clean pages from the page cache; its dirty ones stay, their writeback started.

    PERF: the page cache keeps a file's pages until memory runs short, so
    the next file is written or read into pages never used before; on this
    VM the first write to a page the host does not back costs ~10 us per
    4 KB (README, "Page faults on the shared UID filter"). Pages given back
    are the next ones used. A hint: where it fails, the pages stay cached.
    """
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def makedirs(path: str, mode: int) -> None:
    """``os.makedirs(path, exist_ok=True)``, each folder it creates given exactly ``mode`` (not masked by the umask).

    Folders that exist are left as they are: the storage root and its tree
    may have been set up by an administrator.
    """
    missing: list[str] = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, mode)
        except FileExistsError:
            continue  # another association made it just now
        os.chmod(folder, mode)


def fsync_dir(directory: str) -> None:
    """fsync a folder: its new directory entries (a link, a rename) must survive a power cut too."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview, head: bytes | memoryview = b"") -> None:
    """Write ``head``, then ``data``, whole, at ``fd``'s position: the two in one system call (writev:
    a File Meta with its data set's first bytes), the rest of a short write after (a full disk)."""
    head, view = memoryview(head), memoryview(data)
    while head:
        written = os.writev(fd, [head, view])
        head, view = head[written:], view[max(0, written - len(head)) :]
    while view:
        view = view[os.write(fd, view) :]


def write_atomic(path: str | os.PathLike[str], data: bytes | BinaryIO, *, fsync: bool = False,
                 modes: FileModes = BROWSABLE) -> None:
    """Write `data` (bytes, or a binary file, read to its end) to `path` via a temp file in its folder and a rename.

    Readers see the old file or the new one, never a part.  Parent folders
    are created.  The file and the folders it creates get `modes` exactly:
    the server passes storage.file_mode/dir_mode, since a thumbnail or a scan
    sheet shows patient data as much as the image does.  No fsync by default:
    thumbnails and scan sheets can be made again from the images.

    PERF: making the file is the largest part of a thumbnail's CPU (0.56 of
    1.36 ms per 512x512 CT, process_time, issue 13); the temp file opened at
    a name of our own (no mkstemp), in a folder assumed to exist (makedirs
    only when it does not), written without a file object: 4-10% less.
    """
    folder = os.path.dirname(os.path.abspath(path))
    suffix = os.path.splitext(path)[1]
    temp = os.path.join(folder, f"{TEMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{next(_temp_numbers)}{suffix}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(temp, flags, modes.file)
    except (FileNotFoundError, NotADirectoryError):  # no folder yet, or a file in its way: makedirs says which
        makedirs(folder, modes.folder)
        fd = os.open(temp, flags, modes.file)
    except FileExistsError:  # left by a dead process that had our PID
        fd, temp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=suffix, dir=folder)
    try:
        try:
            os.fchmod(fd, modes.file)  # exactly: the umask may have taken bits away
            if isinstance(data, bytes):
                write_all(fd, data)
            else:
                with os.fdopen(os.dup(fd), "wb") as f:
                    shutil.copyfileobj(data, f, 1 << 20)  # a stored file: never whole in memory
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
