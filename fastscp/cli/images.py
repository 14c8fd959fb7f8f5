"""Command line for images: ``fastscp convert dcm2jpg|jpg2dcm|dcm2nii`` and ``fastscp scansheet``.

Listed in :data:`fastscp.cli.main.COMMAND_MODULES`; :func:`register` adds the
subcommands.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["register"]


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``convert`` and ``scansheet`` to the ``fastscp`` subcommands."""
    from fastscp.cli.export import add_dcm2nii

    convert = commands.add_parser("convert", help="convert between DICOM and JPEG, a series to NIfTI")
    kinds = convert.add_subparsers(dest="conversion", required=True, metavar="{dcm2jpg,jpg2dcm,dcm2nii}")

    d2j = kinds.add_parser("dcm2jpg", help="export a frame of a DICOM file as JPEG (windowed)")
    d2j.add_argument("input", metavar="IN.dcm")
    d2j.add_argument("output", metavar="OUT.jpg")
    d2j.add_argument("--frame", type=int, help="0-based frame number (default: the middle frame)")
    d2j.add_argument("--thumbnail", action="store_true", help="a thumbnail (long side --size, default 128)")
    d2j.add_argument("--size", type=int, help="long side in pixels, scaled down by area averaging")
    d2j.add_argument("--window", nargs=2, type=float, metavar=("C", "W"),
                     help="Window Center and Width in modality units (default: the header's, else automatic)")
    d2j.add_argument("--quality", type=int, default=90, help="JPEG quality 1-95 (default 90)")
    d2j.set_defaults(func=_dcm2jpg)

    j2d = kinds.add_parser("jpg2dcm", help="wrap a JPEG in a DICOM Secondary Capture object")
    j2d.add_argument("input", metavar="IN.jpg")
    j2d.add_argument("output", metavar="OUT.dcm")
    for option, help_text in (
        ("--patient-name", "Patient's Name, Family^Given"),
        ("--patient-id", "Patient ID"),
        ("--birth-date", "Patient's Birth Date, YYYYMMDD"),
        ("--sex", "Patient's Sex: M, F or O"),
        ("--study-uid", "Study Instance UID of an existing study (default: a new study)"),
        ("--series-uid", "Series Instance UID of an existing series (default: a new series)"),
        ("--accession", "Accession Number"),
        ("--study-id", "Study ID"),
        ("--study-date", "Study Date, YYYYMMDD (default: today for a new study)"),
        ("--study-time", "Study Time, HHMMSS (default: now for a new study)"),
        ("--study-description", "Study Description"),
        ("--series-description", "Series Description"),
        ("--referring-physician", "Referring Physician's Name, Family^Given"),
        ("--modality", "Modality (default OT)"),
    ):
        j2d.add_argument(option, default="", help=help_text)
    j2d.add_argument("--series-number", type=int, default=1)
    j2d.add_argument("--instance-number", type=int, default=1)
    j2d.add_argument("--uncompressed", action="store_true",
                     help="store decoded pixels even for a JPEG Baseline file (default: the JPEG as it is)")
    j2d.set_defaults(func=_jpg2dcm)
    add_dcm2nii(kinds)

    sheet = commands.add_parser("scansheet", help="make a study's scan sheet (PNG and HTML)")
    sheet.add_argument("study_uid", metavar="STUDY_UID")
    sheet.add_argument("--storage-dir", help="storage root (default: storage.directory of the config)")
    sheet.add_argument("--index-db", help="find the study's files in this index (through the server while it runs) "
                                          "instead of reading every header; used anyway while a server runs")
    sheet.add_argument("--out", metavar="DIR",
                       help="folder for scansheet.png and scansheet.html (default: where the server puts it: the "
                            "study's folder of storage.naming, else <storage>/scansheets/<PatientID>/"
                            "<StudyDate>_<StudyInstanceUID>)")
    sheet.add_argument("--config", metavar="FILE", help="YAML config file (see config/fastscp.yaml)")
    sheet.set_defaults(func=_scansheet)


def _fail(command: str, message: object) -> int:
    print(f"fastscp {command}: {message}", file=sys.stderr)
    return 1


def _dcm2jpg(args: argparse.Namespace) -> int:
    from fastscp.imaging.convert import dcm_to_jpg
    from fastscp.imaging.thumbnail import DEFAULT_SIZE, ThumbnailError

    size = args.size if args.size is not None else (DEFAULT_SIZE if args.thumbnail else None)
    if size is not None and size < 1:
        return _fail("convert", "--size must be at least 1")
    try:
        dcm_to_jpg(args.input, args.output, frame=args.frame, size=size,
                   window=tuple(args.window) if args.window else None, quality=args.quality)
    except (ThumbnailError, OSError) as exc:
        return _fail("convert", f"{args.input}: {exc}")
    print(f"wrote {args.output}")
    return 0


def _jpg2dcm(args: argparse.Namespace) -> int:
    from fastscp.imaging.convert import ConversionError, jpg_to_dcm

    try:
        uid = jpg_to_dcm(
            args.input, args.output,
            patient_name=args.patient_name, patient_id=args.patient_id, patient_birth_date=args.birth_date,
            patient_sex=args.sex, study_uid=args.study_uid, series_uid=args.series_uid, accession=args.accession,
            study_id=args.study_id, study_date=args.study_date, study_time=args.study_time,
            study_description=args.study_description, series_description=args.series_description,
            referring_physician=args.referring_physician, modality=args.modality or "OT",
            series_number=args.series_number, instance_number=args.instance_number,
            uncompressed=args.uncompressed,
        )
    except (ConversionError, OSError) as exc:
        return _fail("convert", f"{args.input}: {exc}")
    print(f"wrote {args.output} (SOP Instance UID {uid})")
    return 0


def study_files_from_index(index_path: str, study_uid: str) -> list[str]:
    """Paths (as indexed: relative to the storage root) of a study's files, through the running
    server's index or, when none runs, the file read-only.

    Raises
    ------
    fastscp.index.database.IndexUnavailable
        No server answers and the file can't be opened.
    fastscp.query.messages.QueryError, ConnectionError
        The server refused the query or stopped answering.
    """
    from fastscp.query.client import open_query_client
    from fastscp.query.messages import Condition, QueryRequest

    client = open_query_client(index_path)
    try:
        request = QueryRequest(level="IMAGE", conditions=[Condition("StudyInstanceUID", study_uid)], keys=["Path"])
        with client.query(request) as result:
            return [row[0] for row in result]
    finally:
        client.close()


def _scansheet(args: argparse.Namespace) -> int:
    from fastscp.config import layout_options, load_config
    from fastscp.imaging.scansheet import find_study_instances, make_scansheet, read_headers
    from fastscp.index.database import IndexUnavailable
    from fastscp.query.client import server_running
    from fastscp.query.messages import QueryError
    from fastscp.storage.files import BROWSABLE, FileModes

    config = load_config(args.config, {"storage.directory": args.storage_dir, "database.path": args.index_db})
    root = config.storage.directory
    # DuckDB lets one process open the index: while the server runs, ask it.
    from_index = bool(args.index_db) or server_running(config.index_path)
    try:
        if from_index:
            try:
                paths = study_files_from_index(config.index_path, args.study_uid)
            except (IndexUnavailable, QueryError) as exc:
                return _fail("scansheet", exc)
            except (ConnectionError, OSError) as exc:
                return _fail("scansheet", f"{config.index_path}: the server stopped answering: {exc}")
            items = read_headers(os.path.join(root, p) for p in paths)
        else:
            items = find_study_instances(root, args.study_uid)
        # Beside the server's own sheets, with the same storage.file_mode/dir_mode; --out: readable by all.
        modes = BROWSABLE if args.out else FileModes.of(config.storage.file_mode, config.storage.dir_mode)
        study, png, page = make_scansheet(root, layout_options(config), args.study_uid, items,
                                          per_row=config.scansheet.thumbnails_per_series, modes=modes,
                                          out_dir=args.out or None)
    except ValueError as exc:
        return _fail("scansheet", f"{exc} (looked in {config.index_path if from_index else root})")
    print(f"wrote {png} and {page} ({len(study.series)} series, {study.instance_count} instances)")
    return 0
