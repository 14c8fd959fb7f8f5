"""Command line for media export: ``fastscp export dicomdir`` and ``fastscp convert dcm2nii``.

Listed in :data:`fastscp.cli.main.COMMAND_MODULES`; ``convert dcm2nii`` is
added to ``convert`` by :mod:`fastscp.cli.images` through :func:`add_dcm2nii`.
Instances are found through the index: the running server's, else the
file read-only (the ``--index-db``/``--storage-dir``/``--config`` options of
``fastscp query``).
"""

from __future__ import annotations

import argparse
import io
import sys
from typing import Any

from fastscp.cli.common import add_index_arguments, index_paths
from fastscp.status import human_bytes

__all__ = ["add_dcm2nii", "register"]

#: Lines of invented record values shown; the rest are counted.
SHOWN_NOTES = 10


def register(commands: Any) -> None:
    """Add ``export`` (``export dicomdir``) to the ``fastscp`` subcommands."""
    export = commands.add_parser("export", help="export stored instances as a DICOM media set (DICOMDIR)")
    kinds = export.add_subparsers(dest="export_kind", required=True, metavar="{dicomdir}")
    dicomdir = kinds.add_parser(
        "dicomdir", help="a DICOMDIR media set of stored instances, optionally an ISO 9660 image",
        description="Copy the selected instances, byte for byte, into a new DICOM media set (PS3.10 File-set: "
                    "DICOMDIR with patient, study, series and image records; File IDs PT000000/ST000000/"
                    "SE000000/IM000000, the General Purpose CD-R layout). Selections combine: every one given "
                    "must match. The set is written to a temp folder and renamed to OUT/ when complete.",
    )
    dicomdir.add_argument("out", metavar="OUT/", help="a new or empty folder")
    select = dicomdir.add_argument_group("selection (at least one)")
    select.add_argument("--study", metavar="UID", help="Study Instance UID")
    select.add_argument("--patient", metavar="ID", help="Patient ID")
    select.add_argument("--query", metavar="KEYWORD=VALUE", action="append", default=[],
                        help="any key of `fastscp query` matched as C-FIND does (wildcards, date ranges, UID "
                             "lists), e.g. --query Modality=CT --query StudyDate=20260101-; repeatable")
    dicomdir.add_argument("--iso", metavar="FILE", help="also write an ISO 9660 image of the set (needs xorriso)")
    dicomdir.add_argument("--fileset-id", metavar="ID",
                          help="File-set ID and ISO Volume Identifier: 1-16 of A-Z, 0-9, _ (default FASTSCP)")
    add_index_arguments(dicomdir)
    dicomdir.set_defaults(func=_dicomdir)


def add_dcm2nii(kinds: Any) -> None:
    """Add ``dcm2nii`` to the ``convert`` subcommands."""
    dcm2nii = kinds.add_parser(
        "dcm2nii", help="convert a stored series into a NIfTI-1 volume (dcm2niix)",
        description="Find the series' files through the index, convert copies of them with dcm2niix, and write "
                    "the volume to OUT (.nii.gz compressed, .nii not) when complete.",
    )
    dcm2nii.add_argument("series_uid", metavar="SERIES_UID", help="Series Instance UID")
    dcm2nii.add_argument("output", metavar="OUT.nii.gz")
    add_index_arguments(dcm2nii)
    dcm2nii.set_defaults(func=_dcm2nii)


def _say(command: str, message: object) -> None:
    """A line on standard error; values from stored headers (UIDs, paths made of them) escaped."""
    from fastscp.process.logs import escape

    print(f"fastscp {command}: {escape(str(message))}", file=sys.stderr)


def _fail(command: str, message: object) -> int:
    _say(command, message)
    return 1


def _conditions(args: argparse.Namespace) -> list[Any]:
    from fastscp.query.messages import Condition

    conditions = []
    if args.study:
        conditions.append(Condition("StudyInstanceUID", args.study))
    if args.patient:
        conditions.append(Condition("PatientID", args.patient))
    for text in args.query:
        keyword, equals, value = text.partition("=")
        if not equals or not keyword.strip():
            raise ValueError(f"--query {text!r}: write KEYWORD=VALUE, e.g. Modality=CT")
        conditions.append(Condition(keyword.strip(), value))
    return conditions


def _named(args: argparse.Namespace) -> str:
    """The selection as the error for an empty one names it."""
    parts = [f"study {args.study}"] if args.study else []
    parts += [f"patient {args.patient}"] if args.patient else []
    parts += [f"query {q}" for q in args.query]
    return ", ".join(parts)


def _dicomdir(args: argparse.Namespace) -> int:
    from fastscp.media.dicomdir import DEFAULT_FILESET_ID, MediaError, check_output, write_media_set
    from fastscp.media.selection import SelectionError, select_instances

    try:
        conditions = _conditions(args)
    except ValueError as exc:
        print(f"fastscp export: {exc}", file=sys.stderr)
        return 2
    if not conditions:
        print("fastscp export: select what to export: --study UID, --patient ID or --query KEYWORD=VALUE",
              file=sys.stderr)
        return 2
    storage, index_path = index_paths(args)
    try:
        check_output(args.out)  # before the index is asked
        instances = select_instances(index_path, storage, conditions, what=_named(args))
        progress = sys.stderr if sys.stderr.isatty() else io.StringIO()
        media = write_media_set([i.path for i in instances], args.out, fileset_id=args.fileset_id or DEFAULT_FILESET_ID,
                                iso=args.iso or "", progress=progress)
    except (SelectionError, MediaError) as exc:
        return _fail("export", exc)
    except OSError as exc:
        return _fail("export", f"{exc.filename or args.out}: {exc.strerror}")
    for note in media.invented[:SHOWN_NOTES]:
        _say("export", note)
    if len(media.invented) > SHOWN_NOTES:
        _say("export", f"... and {len(media.invented) - SHOWN_NOTES} more invented values")
    if media.duplicates:
        _say("export", f"{media.duplicates} files left out: an earlier file has their SOP Instance UID")
    from pydicom.uid import ExplicitVRLittleEndian

    other = {uid: n for uid, n in media.transfer_syntaxes.items() if uid != ExplicitVRLittleEndian}
    if other:
        listed = ", ".join(f"{n} in {uid}" for uid, n in sorted(other.items()))
        _say("export", f"{sum(other.values())} files are not in Explicit VR Little Endian ({listed}): exported "
                       "as stored; the General Purpose CD-R profile (STD-GEN-CD) allows only that one")
    print(f"wrote {media.folder}: {media.instances} instances ({media.patients} patients, {media.studies} studies, "
          f"{media.series} series, {human_bytes(media.bytes)})" + (f" and {media.iso}" if media.iso else ""))
    return 0


def _dcm2nii(args: argparse.Namespace) -> int:
    from fastscp.media.nifti import NiftiError, export_series

    storage, index_path = index_paths(args)
    try:
        volume = export_series(index_path, storage, args.series_uid, args.output)
    except NiftiError as exc:
        return _fail("convert", exc)
    except OSError as exc:
        return _fail("convert", f"{exc.filename or args.output}: {exc.strerror}")
    print(f"wrote {volume.path} ({volume.files} files)")
    return 0
