"""The storage area: received datasets stream into a temp file, then link into place.

A temp file lives in ``<root>/.incoming`` (the same filesystem as the final
path, so the link is atomic). Its Part 10 header is written first; the
dataset bytes follow exactly as they arrive. A final path only ever holds a
complete file.

The area owns the storage policy: the free-space watermark, which root a
SOP class goes to, which UID names the file, the layout, duplicates
(:meth:`Storage.out_of_space`, :meth:`Storage.store`). The association asks;
it decides nothing about files.
"""

from __future__ import annotations

import collections
import copy
import errno
import functools
import hashlib
import itertools
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Protocol

import msgspec

from fastscp.dicom.fields import HeaderFields
from fastscp.dicom.part10 import content_hash, dataset_content_hash, dataset_hash, file_meta, read_file_meta
from fastscp.dicom.sopclasses import MODALITY_SOP_CLASSES
from fastscp.storage.files import (
    FILE_MODE,
    PATIENT_DATA,
    RECYCLE_MIN_BYTES,
    TEMP_PREFIX,
    FileModes,
    fsync_dir,
    give_back_pages,
    makedirs,
    write_all,
)
from fastscp.storage.layout import LayoutOptions, relative_path
from fastscp.storage.policy import DuplicatePolicy, Outcome
from fastscp.storage.reserved import BACKLOGS, FETCHED, INCOMING, QUARANTINE

#: How much of the dataset's start is kept in memory for the header scan;
#: longer headers are scanned in the mapped file (fastscp.dicom.walk.mapped_dataset).
HEADER_PREFIX_BYTES = 64 * 1024
#: errno values that mean "no room": answered with 0xA700 Out of resources.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
#: Names tried for one instance when its layout name holds other instances.
MAX_NAMES = 100
#: PERF: the free space is measured at most every FREE_SPACE_INTERVAL seconds while it is more than
#: FREE_SPACE_MARGIN bytes above storage.min_free_bytes (a statvfs per store is a system call where another
#: association may take the GIL); nearer the watermark, and below it, at every store.
FREE_SPACE_INTERVAL = 0.1
FREE_SPACE_MARGIN = 256 << 20
#: Stored files an association keeps open while their writeback runs (4 was enough in the measure
#: of :class:`PageRecycler`; 8 gave the same).
RECYCLE_DEPTH = 4
#: Structured reports go to storage.sr_directory when it is set.
SR_SOP_CLASSES: frozenset[str] = frozenset(MODALITY_SOP_CLASSES["SR"])


class Locate(Protocol):
    """Where the index has SOP instances stored (:class:`fastscp.query.client.Locator`)."""

    def __call__(self, uids: tuple[str, ...]) -> tuple[str, ...]:
        """The paths (as the index records them) where any of ``uids`` is stored (asked only if
        :meth:`may_hold`)."""

    def may_hold(self, uids: tuple[str, ...]) -> bool:
        """False only when the index surely holds none of ``uids`` (a new instance: nothing to look up)."""


class Committed(msgspec.Struct, frozen=True):
    """Where a received data set ended up. (PERF: a Struct is made in a fifth of a frozen dataclass's time.)"""

    #: The final absolute path: the new file, or the existing one it duplicates.
    path: str
    #: Stored, a resend, or a duplicate settled by storage.duplicates (:class:`~fastscp.storage.policy.Outcome`).
    outcome: Outcome
    #: The content hash of the existing file's data set, for a conflict.
    existing_hash: str = ""
    #: The existing file's path, for a conflict (differs from ``path`` for keep-both).
    existing_path: str = ""
    #: The layout's name, when it held another instance (another SOP Instance
    #: UID) and this one was stored under a name of its own (``path``).
    collided_path: str = ""
    #: The other instance's SOP Instance UID (from its File Meta), for a collision.
    collided_uid: str = ""


def _link_new(source: str, target: str) -> bool:
    """Hard-link ``source`` at ``target`` unless ``target`` exists (atomic, no clobber)."""
    try:
        os.link(source, target)
        return True
    except FileExistsError:
        return False


def stored_uid(path: str) -> str | None:
    """The Media Storage SOP Instance UID (0002,0003) of a stored file; None if it has none or can't be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        meta, _offset = read_file_meta(os.pread(fd, 65536, 0))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    return meta.get(0x0003)


def own_name(path: str, sop_instance_uid: str, attempt: int) -> str:
    """The name of an instance whose layout name holds another instance: the
    layout name with a suffix from its SOP Instance UID (deterministic, so a
    resend finds it again); ``attempt`` > 0 only if that name is taken too."""
    stem, dot, extension = path.rpartition(".")
    if not dot or "/" in extension:
        stem, extension = path, ""
    tag = hashlib.sha256(sop_instance_uid.encode("ascii", "replace")).hexdigest()[:10]
    more = f"-{attempt + 1}" if attempt else ""
    return f"{stem}.u{tag}{more}" + (f".{extension}" if extension else "")


def _unlink_if_there(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


#: Temp file names: this process's PID (set again in a forked child) and a count. PERF: uuid4 cost a
#: getrandom and os.getpid a system call per store, each a moment the GIL goes to another association.
_temp_numbers = itertools.count()
_temp_pid = os.getpid()


def _temp_name() -> str:
    return f"{_temp_pid}-{next(_temp_numbers)}.part"


def _forked() -> None:
    global _temp_pid
    _temp_pid = os.getpid()


os.register_at_fork(after_in_child=_forked)

#: (folder, mode) of temp files that came out of os.open with exactly that mode (umask and ACLs leave it).
_exact_modes: set[tuple[str, int]] = set()


class TempFile:
    """A new, empty file in the incoming folder, made ahead of the data set it will hold.

    PERF: creating a file can take ~0.7 ms (on this machine's disk right
    after thousands of files were deleted: ext4 walks past inodes deleted
    in the last 60 s; 20 us on a fresh filesystem; NFS is slow too), so an
    association makes its next temp file while it waits for the next
    C-STORE, not after the request arrives.
    """

    def __init__(self, incoming_dir: str, mode: int = FILE_MODE) -> None:
        while True:
            self.path = os.path.join(incoming_dir, _temp_name())
            try:
                # Read-write: the data set is hashed back from this descriptor after
                # the C-STORE-RSP (IncomingFile.content_hash). After the link into
                # place it still names our own inode, even if a later store replaces
                # the final path.
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
                break
            except FileExistsError:
                continue  # left by a killed process that had our PID: the next number
        try:
            # storage.file_mode exactly, whatever the umask or a default ACL made of it. PERF: once a
            # folder's file came out with the mode as asked, the next ones are not looked at (a system
            # call less per store, where another association may take the GIL).
            if (incoming_dir, mode) not in _exact_modes:
                if stat.S_IMODE(os.fstat(self.fd).st_mode) == mode:
                    _exact_modes.add((incoming_dir, mode))
                else:
                    os.fchmod(self.fd, mode)
        except OSError:
            self.discard()
            raise

    def discard(self) -> None:
        os.close(self.fd)
        _unlink_if_there(self.path)


class IncomingFile:
    """One C-STORE data set being received into a temp file."""

    def __init__(self, storage: Storage, meta: bytes, temp: TempFile | None = None) -> None:
        self._storage = storage
        temp = temp or TempFile(storage.incoming_dir, storage.modes.file)
        self.temp_path = temp.path
        self.meta_length = len(meta)
        self.dataset_length = 0
        self.prefix = bytearray()
        self._content_hash = ""
        #: The first write error; once set, further data is discarded.
        self.error: OSError | None = None
        self._fd: int | None = temp.fd
        #: The File Meta Information, written with the data set's first bytes (PERF: a system
        #: call less per store): by :meth:`write`, or by the data path (:meth:`target`).
        self._head = meta

    def _write(self, data: bytes | memoryview) -> None:
        if self.error is not None:
            return
        try:
            head, self._head = self._head, b""
            write_all(self._fd, data, head)  # type: ignore[arg-type]
        except OSError as exc:
            self.failed(exc)

    def failed(self, exc: OSError) -> None:
        """Writing failed: keep draining the message from the peer, but stop
        writing and give the disk space back at once."""
        self.error = exc
        self.discard()

    def write(self, fragment: memoryview) -> None:
        """Append a fragment of the data set."""
        room = HEADER_PREFIX_BYTES - len(self.prefix)
        if room > 0:
            self.prefix += fragment[:room]
        self.dataset_length += len(fragment)
        self._write(fragment)

    def target(self) -> tuple[int, bytearray, int, bytes]:
        """Where the data path (fastscp.net.datapath) writes the data set itself, instead of
        :meth:`write`: the descriptor (at the file's end), the prefix to fill and its room, and
        what it writes first (the File Meta, if not written yet)."""
        head, self._head = self._head, b""
        return self.fileno(), self.prefix, HEADER_PREFIX_BYTES - len(self.prefix), head

    def streamed(self, length: int, content_hash: str) -> None:
        """The data path wrote ``length`` bytes of the data set (and filled the prefix);
        ``content_hash``: their content hash, taken as they passed ("": read back when asked)."""
        self.dataset_length += length
        if self.error is None and content_hash:
            self._content_hash = content_hash

    @property
    def size(self) -> int:
        """The file's length: its File Meta Information and the data set received."""
        return self.meta_length + self.dataset_length

    @property
    def content_hash(self) -> str:
        """The content hash of the data set bytes (:func:`~fastscp.dicom.part10.dataset_content_hash`):
        as the data path took it while they passed (:meth:`streamed`; storescp.HASH_WHILE_RECEIVING),
        else computed when first asked: a data set no longer than the header prefix from memory, a
        longer one read back from the file."""
        if not self._content_hash:
            if len(self.prefix) == self.dataset_length:
                self._content_hash = content_hash(self.prefix)
            else:
                assert self._fd is not None, "the file is closed"
                start = self.meta_length
                self._content_hash = dataset_content_hash(self._fd, start, start + self.dataset_length)
        return self._content_hash

    def commit(
        self, relative_path: str, duplicates: DuplicatePolicy = DuplicatePolicy.KEEP_FIRST, root: str | None = None, *,
        sop_instance_uids: tuple[str, ...] = (), locate: Callable[[], Iterable[str]] | None = None,
    ) -> Committed:
        """Make the file durable (per ``storage.fsync``) and put it at its final path.

        The link into place never replaces an existing file. A file at the
        path whose File Meta names another SOP Instance UID is another
        instance (layouts named by Instance Number, templates without the
        UID): this one gets a name of its own (:func:`own_name`). The same
        SOP Instance UID, at the path or where ``locate`` says it is, is a
        duplicate: the same data set bytes are a resend (kept, not
        rewritten), other bytes follow ``duplicates``.

        Parameters
        ----------
        sop_instance_uids : tuple of str
            The instance's UIDs, distinct and not empty: the one it is named
            by (the command's Affected SOP Instance UID, in its File Meta)
            first, then the data set's if it differs. Empty: the File Meta's.
        locate : callable, optional
            Absolute paths where the index has one of these UIDs stored.
            Called only before a link to a free name: a resend to the same
            name is settled by that file's File Meta, without the index.

        Raises
        ------
        OSError
            The temp file is removed first.
        """
        if self._head:  # no byte of the data set came: the file holds its File Meta alone
            self._write(b"")
            if self.error is not None:
                raise self.error  # failed() removed the temp file
        assert self._fd is not None and self.error is None
        storage = self._storage
        root = root or storage.root
        final = os.path.normpath(os.path.join(root, relative_path))
        if not final.startswith(root.rstrip(os.sep) + os.sep):
            self.discard()
            raise PermissionError(errno.EACCES, f"path {relative_path!r} leaves the storage root")
        uids = sop_instance_uids or (stored_uid(self.temp_path) or "",)
        try:
            if storage.fsync:
                os.fsync(self._fd)
                # PERF: its pages are clean now, and the next data set is written into them. 512 KB
                # files with fsync: 236-302 -> 164-170 us of kernel time each; bench.load fsync always,
                # 3 rounds: ct-k1 680 against 360 images/s, ct-k4 966 against 673. The post-store stage
                # reads the file back from disk instead (its CPU per CT 0.56 -> 0.8 ms, after the stores).
                give_back_pages(self._fd)
            outcome = self._place(final, DuplicatePolicy(duplicates), uids, locate)
            if storage.fsync and outcome.outcome.wrote:
                fsync_dir(os.path.dirname(outcome.path))
        except OSError:
            self.discard()
            raise
        self._unlink_temp()  # the temp name, if it is still there; the descriptor stays open
        return outcome

    def _place(self, final: str, duplicates: DuplicatePolicy, uids: tuple[str, ...],
               locate: Callable[[], Iterable[str]] | None) -> Committed:
        collided = ("", "")
        same: str | None = None  # where the index has the UID: asked once, only before a link
        same_hash = ""
        for attempt in range(MAX_NAMES + 1):
            candidate = final if attempt == 0 else own_name(final, uids[0], attempt - 1)
            if same is None and locate is not None and not os.path.lexists(candidate):
                same = next((p for p in locate() if os.path.normpath(p) != candidate and os.path.isfile(p)), "")
                same_hash = dataset_hash(same) if same else ""
                if same and (duplicates is not DuplicatePolicy.KEEP_BOTH or same_hash == self.content_hash):
                    # Stored before under another name (its layout fields
                    # changed): the policy applies there; overwrite replaces it.
                    resolved = self._resolve_duplicate(same, duplicates, same_hash)
                    return msgspec.structs.replace(resolved, collided_path=collided[0], collided_uid=collided[1])
            try:
                linked = _link_new(self.temp_path, candidate)
            except FileNotFoundError:
                if attempt:  # own names sit beside the first: its folder is there
                    raise
                # PERF: the folder is made when the link finds none, not checked before every store.
                makedirs(os.path.dirname(final), self._storage.modes.folder)
                linked = _link_new(self.temp_path, candidate)
            if linked:
                if same:
                    return Committed(candidate, Outcome.KEPT_BOTH, same_hash, same, *collided)
                return Committed(candidate, Outcome.STORED, "", "", *collided)
            other = stored_uid(candidate)
            if other is not None and other in uids:
                resolved = self._resolve_duplicate(candidate, duplicates)
                return msgspec.structs.replace(resolved, collided_path=collided[0], collided_uid=collided[1])
            if attempt == 0:
                collided = (candidate, other or "")
        raise OSError(errno.EEXIST, f"{MAX_NAMES} names after {final} hold other instances")

    def _resolve_duplicate(self, final: str, duplicates: DuplicatePolicy, existing: str = "") -> Committed:
        """The same SOP Instance UID is stored at ``final`` (its data set's hash ``existing``, if known):
        the data set bytes and ``duplicates`` decide."""
        existing = existing or dataset_hash(final)
        new = self.content_hash
        if existing == new:
            return Committed(final, Outcome.IDENTICAL)
        if duplicates is DuplicatePolicy.OVERWRITE:
            os.replace(self.temp_path, final)
            return Committed(final, Outcome.OVERWRITTEN, existing, final)
        if duplicates is DuplicatePolicy.KEEP_BOTH:
            stem = final[: -len(".dcm")] if final.endswith(".dcm") else final
            for version in range(2, 10000):
                candidate = f"{stem}.v{version}.dcm"
                if _link_new(self.temp_path, candidate):
                    return Committed(candidate, Outcome.KEPT_BOTH, existing, final)
            raise OSError(errno.EEXIST, f"too many versions of {final}")
        kept = Outcome.KEPT_FIRST if duplicates is DuplicatePolicy.KEEP_FIRST else Outcome.REJECTED
        return Committed(final, kept, existing, final)

    def quarantine(self, reason: str) -> str | None:
        """Move the complete received file aside for inspection, with its reason."""
        if not self._storage.quarantine or self.error is not None:
            self.discard()
            return None
        self.close()
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = os.path.join(self._storage.quarantine_dir, f"{stamp}_{uuid.uuid4().hex[:8]}.dcm")
        try:
            os.replace(self.temp_path, target)
            fd = os.open(target + ".reason.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                         self._storage.modes.file)
            with open(fd, "w", encoding="utf-8") as f:
                f.write(reason + "\n")
        except OSError:
            self.discard()
            return None
        return target

    def fileno(self) -> int:
        """The temp file's descriptor (the file stays open until :meth:`close`)."""
        assert self._fd is not None, "the file is closed"
        return self._fd

    def close(self, pages: PageRecycler | None = None) -> None:
        """Release the file descriptor (after :meth:`commit`, once the hash is taken); to ``pages``
        if given and the file is long enough to pay (:data:`RECYCLE_MIN_BYTES`)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if pages is not None and self.size >= RECYCLE_MIN_BYTES:
            pages.take(fd)
        else:
            os.close(fd)

    def _unlink_temp(self) -> None:
        _unlink_if_there(self.temp_path)

    def discard(self) -> None:
        """Remove the temp file (the peer aborted, or storing failed)."""
        self.close()
        self._unlink_temp()


class PageRecycler:
    """One association's stored files, held open until their pages can go back to the kernel.

    PERF (storage.fsync: never; :func:`~fastscp.storage.files.give_back_pages`):
    dirty pages cannot be given back at once: the first POSIX_FADV_DONTNEED
    starts their writeback, the second, RECYCLE_DEPTH files later, frees
    them, now clean. One process writing 1,000 files of 512 KB into a page
    cache that keeps the files before (as bench.load does), 3 rounds:
    1,150-1,280 us of CPU per file without, 220-290 with (the writeback's
    CPU included: /proc/stat); files of 8 KB: 12-22 us without, 28-48 with
    (RECYCLE_MIN_BYTES).
    """

    __slots__ = ("_fds",)

    def __init__(self) -> None:
        self._fds: collections.deque[int] = collections.deque()

    def take(self, fd: int) -> None:
        """``fd``: a stored file's descriptor, now the recycler's to close."""
        self._fds.append(fd)
        give_back_pages(fd)  # none yet: starts their writeback
        if len(self._fds) > RECYCLE_DEPTH:
            self._release(self._fds.popleft())

    def close(self) -> None:
        """At the association's end: the files still held (their clean pages go back too)."""
        while self._fds:
            self._release(self._fds.popleft())

    @staticmethod
    def _release(fd: int) -> None:
        give_back_pages(fd)
        os.close(fd)


class Storage:
    """The storage root and its policy (the ``storage.*`` config keys)."""

    def __init__(self, root: str, *, fsync: bool = True, quarantine: bool = True, sr_root: str = "",
                 modes: FileModes = PATIENT_DATA, layout: LayoutOptions | None = None,
                 duplicates: DuplicatePolicy = DuplicatePolicy.KEEP_FIRST, min_free_bytes: int = 0) -> None:
        self.root = os.path.abspath(root)
        #: storage.file_mode and storage.dir_mode: given to every file and folder we create, and to
        #: the files derived from this area's images (thumbnails, scan sheets).
        self.modes = modes
        #: Root for structured reports (storage.sr_directory), or "" for ``root``.
        self.sr_root = os.path.abspath(sr_root) if sr_root else ""
        self.fsync = fsync
        self.quarantine = quarantine
        #: storage.naming and its options: header fields -> the path below the root.
        self.layout = layout or LayoutOptions()
        #: storage.duplicates (reloadable: :meth:`reconfigured`).
        self.duplicates = DuplicatePolicy(duplicates)
        #: storage.min_free_bytes: below this many free bytes new data sets are refused (reloadable).
        self.min_free_bytes = min_free_bytes
        self.incoming_dir = os.path.join(self.root, INCOMING)
        self.quarantine_dir = os.path.join(self.root, QUARANTINE)
        #: Until when (time.monotonic) the free space is far enough above the watermark not to be measured again.
        self._roomy_until = 0.0

    def reconfigured(self, *, duplicates: DuplicatePolicy, min_free_bytes: int) -> Storage:
        """This area with the reloadable policy (``storage.duplicates``, ``storage.min_free_bytes``)
        replaced: itself if nothing changes, so a reload hands workers only what changed."""
        if (duplicates, min_free_bytes) == (self.duplicates, self.min_free_bytes):
            return self
        changed = copy.copy(self)
        changed.duplicates, changed.min_free_bytes = DuplicatePolicy(duplicates), min_free_bytes
        changed._roomy_until = 0.0  # measured against the new watermark at once
        return changed

    def prepare(self) -> int:
        """Create the folders and remove temp files a killed process left.

        Returns the number of stale temp files removed. Only the supervisor
        calls this, before any worker runs.
        """
        makedirs(self.incoming_dir, self.modes.folder)
        makedirs(self.quarantine_dir, self.modes.folder)
        if self.sr_root:
            makedirs(self.sr_root, self.modes.folder)
        removed = 0
        for name in os.listdir(self.incoming_dir):
            if name.endswith(".part"):
                os.unlink(os.path.join(self.incoming_dir, name))
                removed += 1
            elif name.startswith(FETCHED):  # copies of other nodes' files (a shared index)
                shutil.rmtree(os.path.join(self.incoming_dir, name), ignore_errors=True)
            elif name in BACKLOGS:  # kept records are their process's; a temp file was being written
                kept = os.path.join(self.incoming_dir, name)
                for temp in os.listdir(kept):
                    if temp.startswith(TEMP_PREFIX):
                        os.unlink(os.path.join(kept, temp))
                        removed += 1
        return removed

    def free_bytes(self) -> int:
        """Free space for us under the root (what an unprivileged writer gets)."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def out_of_space(self) -> str:
        """Why no new data set can be taken now (free space below storage.min_free_bytes), else ""."""
        if not self.min_free_bytes:
            return ""
        now = time.monotonic()
        if now < self._roomy_until:
            return ""
        free = self.free_bytes()
        if free < self.min_free_bytes:
            return f"free space {free // 1_000_000} MB below storage.min_free_bytes"
        if free - self.min_free_bytes > FREE_SPACE_MARGIN:
            self._roomy_until = now + FREE_SPACE_INTERVAL
        return ""

    def store(self, incoming: IncomingFile, header: HeaderFields, sop_class_uid: str,
              affected_sop_instance_uid: str, locate: Locate | None = None) -> Committed:
        """Put a received data set, walked and scanned, in place under this area's policy.

        The file is named by the UID the sender gave in the command (the one
        in its File Meta), else the data set's; structured reports go to the
        SR root when there is one; the duplicate rules go by either UID.

        Parameters
        ----------
        header : HeaderFields
            The data set's fields, as scanned (its own SOP Instance UID).
        locate : callable, optional
            Where the index has any of the instance's UIDs stored: a resend
            stored under another name is a duplicate too.

        Raises
        ------
        OSError
            Nothing could be stored; the temp file is removed first.
        """
        named = header  # PERF: not copied when the command and the data set agree (nearly always)
        if affected_sop_instance_uid and affected_sop_instance_uid != header.sop_instance_uid:
            named = msgspec.structs.replace(header, sop_instance_uid=affected_sop_instance_uid)
        root = self.sr_root if self.sr_root and sop_class_uid in SR_SOP_CLASSES else None
        # Distinct, none empty (IncomingFile.commit). PERF: no generator at each store.
        first, own = named.sop_instance_uid, header.sop_instance_uid
        uids: tuple[str, ...] = (first,) if first else ()
        if own and own != first:
            uids += (own,)
        # PERF: a new instance (nearly every store) skips the lookup and the file system check before it.
        maybe_stored = bool(locate and uids and locate.may_hold(uids))
        return incoming.commit(relative_path(self.layout, named), self.duplicates, root, sop_instance_uids=uids,
                               locate=functools.partial(self._stored_at, locate, uids) if maybe_stored else None)

    def _stored_at(self, locate: Locate, uids: tuple[str, ...]) -> list[str]:
        """Absolute paths where the index has any of ``uids`` stored."""
        return [os.path.join(self.root, p) for p in locate(uids)]

    def relative(self, path: str) -> str:
        """A final path as the index records it: relative to the root, or
        absolute when it lies elsewhere (storage.sr_directory)."""
        # PERF: a prefix, not os.path.relpath (~15 us a store: it makes both paths absolute and
        # compares them part by part); commit's paths are normalised joins of the root.
        inside = self.root.rstrip(os.sep) + os.sep
        return path[len(inside):] if path.startswith(inside) else path

    def begin(
        self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, calling_ae: str,
        temp: TempFile | None = None,
    ) -> IncomingFile:
        """Start receiving a data set (into ``temp`` if given); raises OSError
        if no temp file can be made. On any error ``temp`` is discarded."""
        try:
            meta = file_meta(sop_class_uid, sop_instance_uid, transfer_syntax_uid, calling_ae)
            return IncomingFile(self, meta, temp)
        except BaseException:
            if temp is not None:
                temp.discard()
            raise

    def page_recycler(self) -> PageRecycler | None:
        """Where an association's stored files go when done with (:meth:`IncomingFile.close`); None
        with storage.fsync, where commit gives their pages back after the fsync."""
        return None if self.fsync else PageRecycler()

    def spare(self) -> TempFile | None:
        """A temp file for the next data set, or None if none can be made now
        (begin then tries again and reports why)."""
        try:
            return TempFile(self.incoming_dir, self.modes.file)
        except OSError:
            return None
