"""The built-in actions a hook can name instead of a program (``hooks[].action``).

They run inside the post-store process, one at a time. ``jpeg`` and
``copy`` take instance-stored events and write below the hook's
``directory`` at the instance's path below its storage root, so the folder
mirrors the storage layout:

- ``jpeg``: the image at full size (rendered as ``fastscp convert dcm2jpg``
  does), ``.dcm`` replaced by ``.jpg``; written atomically.
- ``copy``: the file byte for byte, through a hidden temp file in the target
  folder, fsynced, renamed into place and the folder fsynced: a reader or a
  crash never sees a partial file at its name.

``nifti`` takes study-complete events (a volume needs every slice of its
series, and a quiet study is when they are all there): one NIfTI-1 volume
per image series of the study, converted by dcm2niix
(:func:`fastscp.media.nifti.convert_files`: complete or absent), at
``<directory>/<the study's folder below the storage root>/<SeriesInstanceUID>.nii.gz``.
"""

from __future__ import annotations

import os

from fastscp.config import HookConfig
from fastscp.hooks.events import Event
from fastscp.imaging.convert import dcm_to_jpg
from fastscp.imaging.scansheet import find_study_instances, read_headers
from fastscp.imaging.thumbnail import mirror_jpeg_path
from fastscp.storage.files import FileModes, fsync_dir, makedirs, write_atomic
from fastscp.storage.layout import safe_component
from fastscp.storage.reserved import NIFTI


def run_action(hook: HookConfig, event: Event, modes: FileModes) -> str:
    """Run ``hook.action`` for its event; returns what it wrote.

    Raises
    ------
    OSError, ValueError, fastscp.media.nifti.NiftiError
        Including :class:`fastscp.imaging.thumbnail.ThumbnailError` (no
        image to render); nothing is left at the target's name then.
    """
    if hook.action == "jpeg":
        return dcm_to_jpg(event.path, mirror_jpeg_path(hook.directory, event.relative_path), quality=hook.quality,
                          modes=modes)
    if hook.action == "copy":
        return copy_atomic(event.path, os.path.join(hook.directory, event.relative_path), modes)
    if hook.action == "nifti":
        return nifti_volumes(hook, event, modes)
    raise ValueError(f"unknown action {hook.action!r}")


def nifti_volumes(hook: HookConfig, event: Event, modes: FileModes) -> str:
    """The nifti action: a volume per image series of a quiet study; the paths written, a line each.

    The series are those of the study's folder as it is on disk (instances
    of earlier bursts and from before a restart included) and of the files
    the event lists (a layout without a study folder; in a shared index,
    every node's). A listed file that can't be read here (another node's
    own disk) converts nothing: no volume from part of a series. A series
    that fails does not stop the others.

    Raises
    ------
    fastscp.media.nifti.NiftiError
        Naming each series not converted and why (the run counts as failed,
        and is retried as ``retries`` says).
    """
    # media/ is a layer under the hooks; its converter (and the query client it brings) loads only
    # when a nifti hook first runs, so the post-store stage stays light without one.
    from fastscp.media.nifti import NiftiError, convert_files

    study_uid, root = str(event.document["study_instance_uid"]), event.storage_dir
    study_dir = event.env["FASTSCP_STUDY_DIR"]
    instances = find_study_instances(study_dir, study_uid) if study_dir else []
    folder = os.path.relpath(study_dir, root) if study_dir else safe_component(study_uid)
    found = {path for path, _fields in instances}
    listed = [path for path in event.document["stored"] if path not in found]
    read = read_headers(listed)
    if len(read) < len(listed):
        unread = sorted(set(listed) - {path for path, _fields in read})
        raise NiftiError(f"{len(unread)} of the study's files can't be read here, so no series is converted "
                         f"(on another node's own disk?): {', '.join(unread[:5])}")
    instances += [item for item in read if item[1].study_instance_uid == study_uid]
    series: dict[str, dict[str, str]] = {}
    for path, fields in instances:
        if fields.rows and fields.columns:  # images only: no SR, presentation states, ...
            # One file per SOP instance (storage.duplicates keep-both may keep two).
            series.setdefault(fields.series_instance_uid, {}).setdefault(fields.sop_instance_uid, path)
    target = os.path.join(hook.directory or os.path.join(root, NIFTI), folder)
    made, failed = [], []
    for series_uid, files in series.items():
        out = os.path.join(target, f"{safe_component(series_uid)}.nii.gz")
        try:
            makedirs(target, modes.folder)
            made.append(convert_files(list(files.values()), out, timeout=hook.timeout).path)
        except (NiftiError, OSError) as exc:
            failed.append(f"series {series_uid}: {exc}")
    if failed:
        raise NiftiError(f"{len(failed)} of {len(series)} series not converted ({len(made)} written): "
                         + "; ".join(failed))
    return "\n".join(made) or "no image series in the study"


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
