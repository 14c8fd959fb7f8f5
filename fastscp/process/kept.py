"""Records kept in files for a process that lags: the workers' overflow, taken back once it has caught up.

The post-store stage and the indexer run at ``server.derived_priority``:
under a burst they may not read their sockets for seconds. A worker keeps
what they could not take in memory up to a bound, then in a file of its
own under the storage root (:func:`kept_folder`); the process takes the
files, oldest first, once its queue is empty. The files hold the messages
the socket would have carried, each after its length.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator

from fastscp.storage.files import PATIENT_DATA, TEMP_PREFIX, FileModes, write_atomic
from fastscp.storage.reserved import INCOMING

log = logging.getLogger("fastscp.kept")

#: How often, at most, a process that has caught up looks for records workers kept in files for it.
CHECK_INTERVAL = 1.0
#: After the folder or a file could not be read: when to try again (not a warning a second).
RETRY_AFTER_ERROR = 60.0

#: A kept file's messages: each after its length (4 bytes, little-endian).
_LENGTH = struct.Struct("<I")
#: A kept file's name ends so; one that could not be taken is set aside under its name and SET_ASIDE.
SUFFIX = ".records"
SET_ASIDE = ".unreadable"
#: Numbers a process's kept files (with its PID: a name no other writer uses).
_kept_numbers = itertools.count()


def kept_folder(root: str, name: str) -> str:
    """The folder under the storage root where workers keep records for one process
    (``name``: one of :mod:`fastscp.storage.reserved`'s backlog folders)."""
    return os.path.join(root, INCOMING, name)


def write_kept(folder: str, messages: Iterable[bytes], modes: FileModes = PATIENT_DATA, *,
               first: bool = False) -> str:
    """Write encoded messages to a new file in ``folder`` (whole or not at all: temp file and rename); its path.

    Files are taken oldest name first: a file is named after every file now in the folder, even if
    the clock was set back since they were written. ``first``: before every file now in the folder
    (messages older than all of them: a receiver's unread socket at its stop).
    """
    stamp = time.time_ns()
    with contextlib.suppress(OSError, ValueError, IndexError):
        names = kept_files(folder)
        stamp = min(stamp, _stamp(names[0]) - 1) if first else max(stamp, _stamp(names[-1]) + 1)
    path = os.path.join(folder, f"{stamp:019d}-{os.getpid()}-{next(_kept_numbers)}{SUFFIX}")
    write_atomic(path, b"".join(_LENGTH.pack(len(m)) + m for m in messages), modes=modes)
    return path


def _stamp(name: str) -> int:
    """The time in a kept file's name (its order)."""
    return int(name.split("-", 1)[0])


def kept_files(folder: str) -> list[str]:
    """The files of :func:`write_kept` in ``folder``, oldest first (none if there is no folder).

    Raises
    ------
    OSError
        The folder cannot be read.
    """
    try:
        return sorted(name for name in os.listdir(folder)
                      if name.endswith(SUFFIX) and not name.startswith(TEMP_PREFIX))
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


class KeptFiles:
    """The files workers keep for one lagging process (``folder``), taken back oldest first.

    The process asks :meth:`take_oldest` whenever it has room; a file is
    read at most every :data:`CHECK_INTERVAL` (at once after one was taken,
    :data:`RETRY_AFTER_ERROR` after the folder could not be read). A file
    that cannot be read or removed is set aside (renamed, ending in
    :data:`SET_ASIDE`) rather than tried again forever: it would hold up the
    files after it. Both are logged with ``if_lost``: what becomes of records
    that can't be taken back.
    """

    def __init__(self, folder: str, owner: str, if_lost: str = "") -> None:
        self.folder, self._owner = folder, owner
        #: Ends each warning: what becomes of the records.
        self._if_lost = f"; {if_lost}" if if_lost else ""
        self._next_check = 0.0

    def count(self) -> int:
        """How many files wait (0 if the folder can't be read: :meth:`take_oldest` says why)."""
        try:
            return len(kept_files(self.folder))
        except OSError:
            return 0

    def take_oldest(self, now: float, *, at_once: bool = False,
                    before_removal: Callable[[], None] | None = None) -> tuple[str, list[bytes]] | None:
        """The oldest file's path and messages, the file removed; None if none is due or there is none.

        ``now``: ``time.monotonic()``; ``at_once``: whatever the schedule (a process that is stopping).
        ``before_removal`` runs once the file is read, before it is removed: a worker sends nothing by
        its socket while its file is there (:class:`fastscp.process.sender.Sender`), so what the
        sockets hold then came before the file's messages.
        """
        if now < self._next_check and not at_once:
            return None
        self._next_check = now + CHECK_INTERVAL
        try:
            names = kept_files(self.folder)
        except OSError as exc:
            return self._cannot_take(now, exc)
        if not names:
            return None
        path = os.path.join(self.folder, names[0])
        try:
            messages = list(read_kept(path))
        except OSError as exc:
            return self._set_aside(now, path, exc)
        if before_removal is not None:
            before_removal()
        try:
            os.unlink(path)
        except OSError as exc:
            return self._set_aside(now, path, exc)
        self._next_check = 0.0  # the next file as soon as these are done
        log.info("%s: took back %d messages kept while it lagged, from %s", self._owner, len(messages), path)
        return path, messages

    def _set_aside(self, now: float, path: str, error: OSError) -> None:
        """The oldest file cannot be taken: renamed out of the way (kept for whoever looks into it), so
        the files after it are taken, and a worker that waits for its own file to go sends again."""
        try:
            os.rename(path, path + SET_ASIDE)
        except OSError:
            return self._cannot_take(now, error)
        log.warning("%s: cannot take the records kept in %s (%s): set aside as %s%s", self._owner, path,
                    error.strerror or error, os.path.basename(path) + SET_ASIDE, self._if_lost)
        self._next_check = 0.0
        return None

    def _cannot_take(self, now: float, error: OSError) -> None:
        log.warning("%s: cannot take the records kept in %s: %s%s", self._owner, self.folder, error, self._if_lost)
        self._next_check = now + RETRY_AFTER_ERROR
        return None
