"""The built-in actions a hook can name instead of a program (``hooks[].action``).

Both run inside the post-store process, one at a time, on instance-stored
events, and write below the hook's ``directory`` at the instance's path
below its storage root, so the folder mirrors the storage layout:

- ``jpeg``: the image at full size (rendered as ``fastscp convert dcm2jpg``
  does), ``.dcm`` replaced by ``.jpg``; written atomically.
- ``copy``: the file byte for byte, through a hidden temp file in the target
  folder, fsynced, renamed into place and the folder fsynced: a reader or a
  crash never sees a partial file at its name.
"""

from __future__ import annotations

import os

from fastscp.config import HookConfig
from fastscp.hooks.events import Event
from fastscp.imaging.convert import dcm_to_jpg
from fastscp.imaging.thumbnail import mirror_jpeg_path
from fastscp.storage.files import FileModes, fsync_dir, write_atomic


def run_action(hook: HookConfig, event: Event, modes: FileModes) -> str:
    """Run ``hook.action`` for an instance-stored event; returns what it wrote.

    Raises
    ------
    OSError, ValueError
        Including :class:`fastscp.imaging.thumbnail.ThumbnailError` (no
        image to render); nothing is left at the target's name then.
    """
    if hook.action == "jpeg":
        return dcm_to_jpg(event.path, mirror_jpeg_path(hook.directory, event.relative_path), quality=hook.quality,
                          modes=modes)
    if hook.action == "copy":
        return copy_atomic(event.path, os.path.join(hook.directory, event.relative_path), modes)
    raise ValueError(f"unknown action {hook.action!r}")


def copy_atomic(source: str, target: str, modes: FileModes) -> str:
    """Copy ``source`` to ``target`` so that ``target`` is the whole file or absent, and durable once this returns.

    An earlier file at ``target`` is replaced atomically (the instance was
    stored again: storage.duplicates overwrite). Folders made get
    ``modes.folder``, the file ``modes.file``.
    """
    with open(source, "rb") as data:
        write_atomic(target, data, fsync=True, modes=modes)
    fsync_dir(os.path.dirname(os.path.abspath(target)))  # the rename, too, must survive a power cut
    return target
