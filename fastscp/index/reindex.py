"""Indexing from the files alone: the storage walk, file -> record, and ``fastscp reindex``.

The files are the source of truth. Two users:

* the indexer's *reconcile on start* (:func:`plan`, :func:`read_record`):
  compare the files under the storage root with the index by path, size and
  modification time, parse only the headers of new or changed files, and
  drop rows whose file is gone. That covers every record a killed indexer
  had not committed (a worker sends a record only after its file is in place).
* :func:`reindex`: rebuild an index file from scratch into a temp file, then
  rename it over the old one.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator
from typing import IO, NamedTuple

import msgspec

from fastscp.dicom.header import HeaderError, read_header_from
from fastscp.dicom.part10 import dataset_content_hash
from fastscp.index.database import Index, IndexUnavailable, read_conflicts
from fastscp.index.records import DuplicateConflict, InstanceRecord
from fastscp.storage.reserved import NOT_INSTANCES

log = logging.getLogger("fastscp.reindex")

#: Every storage layout names its files ``*.dcm``; other files (scan sheets,
#: the index itself, notes) are not instances.
SUFFIX = ".dcm"


class FileState(NamedTuple):
    """A stored file as the walk found it."""

    path: str  # relative to the storage root, "/" separated
    size: int
    mtime_ns: int


def walk(root: str, *, skip: frozenset[str] = frozenset(), absolute: bool = False) -> Iterator[FileState]:
    """Every stored instance file under ``root`` (``*.dcm``, regular files only).

    Uses ``os.scandir`` (one ``stat`` per file, no symlinks followed), skips
    :data:`~fastscp.storage.reserved.NOT_INSTANCES` at the top, dot-folders, and the absolute paths in ``skip``.
    Paths are relative to ``root``, or absolute with ``absolute=True`` (as
    the index records files stored outside the storage root).
    """
    if absolute:
        for state in walk(root, skip=skip):
            yield state._replace(path=os.path.join(os.path.abspath(root), state.path))
        return
    stack = [""]
    while stack:
        relative = stack.pop()
        folder = os.path.join(root, relative) if relative else root
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue  # removed while we walk
        for entry in entries:
            name = entry.name
            child = f"{relative}/{name}" if relative else name
            try:
                if entry.is_dir(follow_symlinks=False):
                    # fastscp's own folders are at the top; deeper, the name is a tag value's.
                    if not name.startswith(".") and (relative or name not in NOT_INSTANCES):
                        stack.append(child)
                    continue
                if not name.lower().endswith(SUFFIX) or entry.path in skip:
                    continue
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(info.st_mode):
                yield FileState(child, info.st_size, info.st_mtime_ns)


class Plan(NamedTuple):
    """What reconcile must do to make the index match the files."""

    files: int  # stored files found
    missing: list[FileState]  # on disk, not indexed
    changed: list[FileState]  # indexed, but the file is newer or another size
    gone: list[str]  # indexed, no file


def walk_storage(root: str, sr_root: str = "", *, skip: frozenset[str] = frozenset()) -> Iterator[FileState]:
    """:func:`walk` of the storage root, then of ``storage.sr_directory`` when it lies outside it.

    The paths are as the index records them (``Storage.relative``): relative
    to the root, absolute for files outside it.
    """
    yield from walk(root, skip=skip)
    if sr_root and os.path.relpath(os.path.abspath(sr_root), os.path.abspath(root)).startswith(".."):
        yield from walk(sr_root, skip=skip, absolute=True)


def plan(root: str, indexed: dict[str, tuple[int, int]], *, sr_root: str = "", skip: frozenset[str] = frozenset(),
         stop: Callable[[], bool] = lambda: False) -> Plan:
    """Compare the files under ``root`` (and ``sr_root``) with ``indexed`` (path -> (size, received_at µs)).

    A file is *changed* when its size differs or it was modified after the
    row's ``received_at``: a worker stamps ``received_at`` after the rename,
    and rows made from files use the file's modification time.
    """
    remaining = dict(indexed)
    missing: list[FileState] = []
    changed: list[FileState] = []
    files = 0
    for state in walk_storage(root, sr_root, skip=skip):
        if stop():
            break
        files += 1
        known = remaining.pop(state.path, None)
        if known is None:
            missing.append(state)
        elif known[0] != state.size or state.mtime_ns // 1000 > known[1]:
            changed.append(state)
    return Plan(files, missing, changed, list(remaining))


# -- one file -> one record ------------------------------------------------------------

def read_record(root: str, state: FileState, *, content_hash: bool = True) -> InstanceRecord:
    """The index record of one stored file, made from the file alone.

    ``received_at`` is the file's modification time and ``calling_ae_title``
    its Source Application Entity Title (fastscp writes the calling AE
    there); the called AE and peer address are not in the file ("").

    Raises
    ------
    OSError, ValueError, HeaderError
        The file can't be read or is not a DICOM file fastscp can parse.
    """
    full = os.path.join(root, state.path)
    with open(full, "rb") as f:
        header, meta, transfer_syntax, offset = read_header_from(f)
        digest = dataset_content_hash(f.fileno(), offset) if content_hash else ""
    affected = meta.get(0x0003, "")
    if not header.sop_instance_uid and affected:
        # As the acceptor does: the sender's UID names the file when the data set has none.
        header = msgspec.structs.replace(header, sop_instance_uid=affected)
    return InstanceRecord(
        path=state.path,
        size=state.size,
        transfer_syntax_uid=transfer_syntax,
        calling_ae_title=meta.get(0x0016, ""),
        called_ae_title="",
        peer_address="",
        received_at=state.mtime_ns / 1e9,
        header=header,
        content_hash=digest,
        affected_sop_instance_uid=affected if affected != header.sop_instance_uid else "",
    )


def read_records(root: str, states: list[FileState], *, content_hash: bool = True,
                 failed: list[tuple[str, str]] | None = None) -> list[InstanceRecord]:
    """:func:`read_record` for each state; unreadable files go to ``failed`` as (path, reason)."""
    records = []
    for state in states:
        try:
            records.append(read_record(root, state, content_hash=content_hash))
        except FileNotFoundError:
            continue  # replaced or removed since the walk: its record comes from the worker
        except (OSError, ValueError, HeaderError) as exc:
            if failed is not None:
                failed.append((state.path, str(exc)))
    return records


# -- fastscp reindex ------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on a stream: count, rate and ETA, redrawn at most 10 times a second.

    On a stream that is not a terminal it prints a line every 5 seconds instead.
    """

    def __init__(self, total: int, stream: IO[str] | None = None, label: str = "indexed") -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.label = label
        self.done = 0
        self.started = time.monotonic()
        self._shown = 0.0
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def advance(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self._shown >= (0.1 if self._tty else 5.0):
            self._shown = now
            self._draw(final=False)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        share = self.done / self.total if self.total else 1.0
        width = 24
        bar = "#" * int(share * width)
        return (f"{self.label} {self.done}/{self.total} files [{bar:<{width}}] {share:6.1%} "
                f"{rate:,.0f} files/s  ETA {_clock(left)}")

    def _draw(self, *, final: bool) -> None:
        text = self.line()
        if self._tty:
            self.stream.write(f"\r{text}\x1b[K" + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        self._draw(final=True)


def _clock(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ReindexResult(NamedTuple):
    files: int
    indexed: int
    failed: list[tuple[str, str]]
    seconds: float


def reindex(storage_root: str, index_path: str, *, sr_root: str = "", content_hash: bool = True,
            batch_size: int = 2000, progress: IO[str] | None = None) -> ReindexResult:
    """Build the index of ``index_path`` from the files under ``storage_root`` alone.

    The new index is written to ``<index>.reindex`` and renamed over the old
    one at the end, so the old index stays intact until then. The
    ``duplicate_conflicts`` log of the old index (not in the files) is copied
    when the old index can be read.

    Parameters
    ----------
    sr_root : str
        ``storage.sr_directory``: structured reports stored outside the root.
    content_hash : bool
        Compute each data set's content hash (reads every file whole).
    progress : text stream, optional
        Where the progress bar goes (default: stderr).

    Raises
    ------
    IndexUnavailable
        The index is open in another process (a running server).
    """
    started = time.monotonic()
    index_path = os.path.abspath(index_path)
    temp = index_path + ".reindex"
    for stale in (temp, temp + ".wal"):
        if os.path.exists(stale):
            os.remove(stale)
    os.makedirs(os.path.dirname(index_path), exist_ok=True)
    conflicts = _old_conflicts(index_path)
    skip = frozenset({index_path, index_path + ".wal", temp, temp + ".wal"})
    states = list(walk_storage(storage_root, sr_root, skip=skip))
    bar = Progress(len(states), progress)
    bar.stream.write(f"reindex: {len(states)} files under {storage_root} "
                     f"({time.monotonic() - started:.1f} s to list them)\n")
    failed: list[tuple[str, str]] = []
    indexed = 0
    index = Index(temp, wal_mode=True)
    try:
        for start in range(0, len(states), batch_size):
            chunk = states[start:start + batch_size]
            indexed += index.add(read_records(storage_root, chunk, content_hash=content_hash, failed=failed))
            bar.advance(len(chunk))
        if conflicts is not None:
            index.add((), conflicts)
        index.checkpoint()
    finally:
        index.close()
    bar.finish()
    old = _open_old(index_path)  # raises if a server started on it while we read the files
    if old is not None:
        old.close()
    if os.path.exists(index_path + ".wal"):
        os.remove(index_path + ".wal")  # the old index's log: not for the new file
    os.replace(temp, index_path)
    return ReindexResult(len(states), indexed, failed, time.monotonic() - started)


def _open_old(index_path: str) -> Index | None:
    """The index being replaced, read-only and of any schema version; None if there is none or it is unreadable.

    Raises
    ------
    IndexUnavailable
        A server (or another reindex) has it open.
    """
    if not os.path.exists(index_path):
        return None
    try:
        return Index(index_path, read_only=True, any_version=True)
    except IndexUnavailable as exc:
        if "another process" in str(exc):
            raise
        log.warning("%s; its duplicate conflicts are not carried over", exc)
        return None


def _old_conflicts(index_path: str) -> list[DuplicateConflict] | None:
    """The old index's duplicate conflicts, None if there is no old index to read."""
    old = _open_old(index_path)
    if old is None:
        return None
    try:
        return read_conflicts(old.con)
    finally:
        old.close()
