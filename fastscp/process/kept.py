"""Records kept in files for a process that lags: the workers' overflow, taken back once it has caught up.

The post-store stage and the indexer run at ``server.derived_priority``:
under a burst they may not read their sockets for seconds. A worker keeps
what they could not take in memory up to a bound, then in a file of its
own under the storage root (:func:`kept_folder`); the process takes the
files, oldest first, once its queue is empty. The files hold the messages
the socket would have carried, each after its length.
"""

from __future__ import annotations

import itertools
import os
import struct
import time
from collections.abc import Iterable, Iterator

from fastscp.storage.files import PATIENT_DATA, TEMP_PREFIX, FileModes, write_atomic
from fastscp.storage.reserved import INCOMING

#: A kept file's messages: each after its length (4 bytes, little-endian).
_LENGTH = struct.Struct("<I")
#: Numbers a process's kept files (with its PID: a name no other writer uses).
_kept_numbers = itertools.count()


def kept_folder(root: str, name: str) -> str:
    """The folder under the storage root where workers keep records for one process
    (``name``: one of :mod:`fastscp.storage.reserved`'s backlog folders)."""
    return os.path.join(root, INCOMING, name)


def write_kept(folder: str, messages: Iterable[bytes], modes: FileModes = PATIENT_DATA) -> str:
    """Write encoded messages to a new file in ``folder`` (whole or not at all: temp file and rename); its path."""
    path = os.path.join(folder, f"{time.time_ns()}-{os.getpid()}-{next(_kept_numbers)}.records")
    write_atomic(path, b"".join(_LENGTH.pack(len(m)) + m for m in messages), modes=modes)
    return path


def kept_files(folder: str) -> list[str]:
    """The files of :func:`write_kept` in ``folder``, oldest first (none if there is no folder).

    Raises
    ------
    OSError
        The folder cannot be read.
    """
    try:
        return sorted(name for name in os.listdir(folder) if not name.startswith(TEMP_PREFIX))
    except FileNotFoundError:
        return []


def read_kept(path: str) -> Iterator[bytes]:
    """The encoded messages of a file :func:`write_kept` wrote, in order (a torn end is ignored)."""
    with open(path, "rb") as f:
        data = f.read()
    at = 0
    while at + _LENGTH.size <= len(data):
        (length,) = _LENGTH.unpack_from(data, at)
        at += _LENGTH.size
        if at + length > len(data):
            return
        yield data[at:at + length]
        at += length
