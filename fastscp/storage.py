"""The storage area: received datasets stream into a temp file, then rename into place.

A temp file lives in ``<root>/.incoming`` (the same filesystem as the final
path, so the rename is atomic). Its Part 10 header is written first; the
dataset bytes follow exactly as they arrive. A final path only ever holds a
complete file.
"""

from __future__ import annotations

import errno
import os
import time
import uuid

from fastscp.part10 import file_meta

INCOMING = ".incoming"
QUARANTINE = ".quarantine"
#: How much of the dataset's start is kept in memory for the header scan.
HEADER_PREFIX_BYTES = 256 * 1024
#: errno values that mean "no room": answered with 0xA700 Out of resources.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class IncomingFile:
    """One C-STORE data set being received into a temp file."""

    def __init__(self, storage: Storage, meta: bytes) -> None:
        self._storage = storage
        self.temp_path = os.path.join(storage.incoming_dir, f"{uuid.uuid4().hex}.part")
        self.meta_length = len(meta)
        self.dataset_length = 0
        self.prefix = bytearray()
        #: The first write error; once set, further data is discarded.
        self.error: OSError | None = None
        self._fd: int | None = os.open(
            self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644
        )
        self._write(meta)

    def _write(self, data: bytes | memoryview) -> None:
        if self.error is not None:
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]  # type: ignore[arg-type]
        except OSError as exc:
            # Keep draining the message from the peer, but stop writing and
            # give the disk space back at once.
            self.error = exc
            self.discard()

    def write(self, fragment: memoryview) -> None:
        """Append a fragment of the data set."""
        room = HEADER_PREFIX_BYTES - len(self.prefix)
        if room > 0:
            self.prefix += fragment[:room]
        self.dataset_length += len(fragment)
        self._write(fragment)

    @property
    def prefix_is_complete_dataset(self) -> bool:
        return self.dataset_length <= len(self.prefix)

    def read_dataset(self) -> bytes:
        """The whole data set, read back from the temp file (for long headers)."""
        with open(self.temp_path, "rb") as f:
            f.seek(self.meta_length)
            return f.read()

    def commit(self, relative_path: str) -> str:
        """Make the file durable (per ``storage.fsync``) and rename it into place.

        Returns
        -------
        str
            The final absolute path.

        Raises
        ------
        OSError
            The temp file is removed first.
        """
        assert self._fd is not None and self.error is None
        final = os.path.join(self._storage.root, relative_path)
        try:
            if self._storage.fsync:
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            directory = os.path.dirname(final)
            # exist_ok: another association may create the same study folder now.
            os.makedirs(directory, exist_ok=True)
            os.replace(self.temp_path, final)
            if self._storage.fsync:
                # The rename itself must survive a power cut too.
                dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError:
            self.discard()
            raise
        return final

    def quarantine(self, reason: str) -> str | None:
        """Move the complete received file aside for inspection, with its reason."""
        if not self._storage.quarantine or self.error is not None:
            self.discard()
            return None
        self._close()
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = os.path.join(self._storage.quarantine_dir, f"{stamp}_{uuid.uuid4().hex[:8]}.dcm")
        try:
            os.replace(self.temp_path, target)
            with open(target + ".reason.txt", "w", encoding="utf-8") as f:
                f.write(reason + "\n")
        except OSError:
            self.discard()
            return None
        return target

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Remove the temp file (the peer aborted, or storing failed)."""
        self._close()
        try:
            os.unlink(self.temp_path)
        except FileNotFoundError:
            pass


class Storage:
    """The storage root and its policy."""

    def __init__(self, root: str, *, fsync: bool = True, quarantine: bool = True) -> None:
        self.root = os.path.abspath(root)
        self.fsync = fsync
        self.quarantine = quarantine
        self.incoming_dir = os.path.join(self.root, INCOMING)
        self.quarantine_dir = os.path.join(self.root, QUARANTINE)

    def prepare(self) -> int:
        """Create the folders and remove temp files a killed process left.

        Returns the number of stale temp files removed. Only the supervisor
        calls this, before any worker runs.
        """
        os.makedirs(self.incoming_dir, exist_ok=True)
        os.makedirs(self.quarantine_dir, exist_ok=True)
        removed = 0
        for name in os.listdir(self.incoming_dir):
            if name.endswith(".part"):
                os.unlink(os.path.join(self.incoming_dir, name))
                removed += 1
        return removed

    def begin(
        self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, calling_ae: str
    ) -> IncomingFile:
        """Start receiving a data set; raises OSError if no temp file can be made."""
        meta = file_meta(sop_class_uid, sop_instance_uid, transfer_syntax_uid, calling_ae)
        return IncomingFile(self, meta)
