"""Command line of the index: ``fastscp query``, ``fastscp sql``, ``fastscp stats``, ``fastscp reindex``.

``query``, ``sql`` and ``stats`` ask the running server that owns the index (through
its indexer's query socket) or, when none does, open the index file
read-only. The index is chosen by ``--index-db``, else ``--storage-dir``
(its ``index.duckdb``), else ``--config`` (its ``database.path`` /
``storage.directory``), as ``fastscp serve`` would.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from fastscp.cli.common import add_index_arguments, index_config, run
from fastscp.status import human_bytes

#: CLI level names -> Query/Retrieve Levels.
LEVEL_NAMES: dict[str, str] = {"patients": "PATIENT", "studies": "STUDY", "series": "SERIES", "instances": "IMAGE"}
# A DICOM date range (PS3.4 C.2.2.2.5): a date, or a range with one or both ends.
_DATE_RANGE = re.compile(r"^(\d{8})?(-(\d{8})?)?$")


def register(commands: Any) -> None:
    """Add ``query``, ``stats`` and ``reindex`` to the ``fastscp`` subcommands."""
    query = commands.add_parser(
        "query", help="find patients, studies, series or instances in the index",
        description="Find patients, studies, series or instances. Matching follows DICOM C-FIND: "
                    "* and ? are wildcards, empty matches all, dates take ranges (20240101-20240131, "
                    "20240101-, -20240131), UIDs lists (uid1\\uid2).",
    )
    query.add_argument("level", choices=list(LEVEL_NAMES))
    filters = query.add_argument_group("filters")
    filters.add_argument("--patient-id", metavar="ID", help="Patient ID (wildcards allowed)")
    filters.add_argument("--patient-name", metavar="NAME", help="Patient's Name, e.g. 'DOE^J*' (case-insensitive)")
    filters.add_argument("--date", metavar="FROM-TO", help="Study Date or range: 20240101, 20240101-20240131, "
                                                          "20240101-, -20240131")
    filters.add_argument("--modality", metavar="MOD", help="Modality, e.g. CT (of a series; above: any series)")
    filters.add_argument("--accession", metavar="NUMBER", help="Accession Number (wildcards allowed)")
    filters.add_argument("--study-uid", metavar="UID", help="Study Instance UID (or a backslash-separated list)")
    filters.add_argument("--series-uid", metavar="UID", help="Series Instance UID (or a backslash-separated list)")
    query.add_argument("--keys", metavar="K1,K2", help="columns to show, DICOM keywords (default: per level)")
    query.add_argument("--limit", type=int, default=0, metavar="N", help="at most N rows")
    query.add_argument("--json", action="store_true", help="print JSON lines (one object per row)")
    add_index_arguments(query)
    query.set_defaults(func=_query)

    sql = commands.add_parser(
        "sql", help="run a read-only SQL SELECT on the index",
        description="Run one SELECT statement on the index (DuckDB SQL; tables studies, series, instances, "
                    "duplicate_conflicts, thumbnails; views patients and *_counts), through the running server "
                    "or on the file when it is stopped. Other statements are refused.",
    )
    sql.add_argument("statement", help='e.g. "SELECT modality, count(*) FROM instances GROUP BY 1"')
    sql.add_argument("--format", choices=("table", "json", "csv", "parquet"), default="table",
                     help="table (default), JSON lines, CSV with a header line, or Parquet (needs --output)")
    sql.add_argument("--output", metavar="FILE", help="write the rows to FILE instead of standard output")
    add_index_arguments(sql)
    sql.set_defaults(func=_sql)

    stats = commands.add_parser("stats", help="counts and sizes in the index: by modality, calling AE, day")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    add_index_arguments(stats)
    stats.set_defaults(func=_stats)

    reindex = commands.add_parser(
        "reindex", help="rebuild the index from the stored files (the server must be stopped)",
        description="Rebuild the index from the files under the storage folder alone. The new index "
                    "replaces the old one when complete; the old one's duplicate conflict log is kept.",
    )
    reindex.add_argument("--no-hash", action="store_true",
                         help="skip the content hash of each data set (faster: reads headers only)")
    add_index_arguments(reindex)
    reindex.set_defaults(func=_reindex)


# -- query ----------------------------------------------------------------------------


def _conditions(args: argparse.Namespace, level: str) -> list[Any]:
    from fastscp.query.messages import Condition

    if args.date and not _DATE_RANGE.match(args.date) or args.date == "-":
        raise ValueError(f"--date {args.date!r}: use YYYYMMDD, YYYYMMDD-YYYYMMDD, YYYYMMDD- or -YYYYMMDD")
    modality = "ModalitiesInStudy" if level in ("PATIENT", "STUDY") else "Modality"
    pairs = (("PatientID", args.patient_id), ("PatientName", args.patient_name), ("StudyDate", args.date),
             (modality, args.modality), ("AccessionNumber", args.accession), ("StudyInstanceUID", args.study_uid),
             ("SeriesInstanceUID", args.series_uid))
    return [Condition(keyword, value) for keyword, value in pairs if value]


def _query(args: argparse.Namespace) -> int:
    from fastscp.query.messages import QueryRequest

    level = LEVEL_NAMES[args.level]
    try:
        conditions = _conditions(args, level)
    except ValueError as exc:
        print(f"fastscp query: {exc}", file=sys.stderr)
        return 2
    keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else []
    request = QueryRequest(level=level, conditions=conditions, keys=keys, limit=max(args.limit, 0))  # type: ignore[arg-type]
    return _run("query", args, request, "json" if args.json else "table", None, f"no {args.level} match")


def _sql(args: argparse.Namespace) -> int:
    from fastscp.query.messages import SqlRequest

    if args.format == "parquet" and not args.output:
        print("fastscp sql: --format parquet writes a file: give it with --output FILE", file=sys.stderr)
        return 2
    return _run("sql", args, SqlRequest(sql=args.statement), args.format, args.output, "no rows")


def _run(command: str, args: argparse.Namespace, request: Any, form: str, output: str | None, empty: str) -> int:
    """Run a query or SQL request on the index and write its rows in ``form``; the exit status."""
    from fastscp.index.database import IndexUnavailable
    from fastscp.query.client import open_query_client
    from fastscp.query.messages import QueryError

    config = index_config(args)
    index_path = config.index_path
    try:
        client = open_query_client(index_path, config.lake)
    except IndexUnavailable as exc:
        print(f"fastscp {command}: {exc}", file=sys.stderr)
        return 1
    try:
        with client.query(request) as result:
            if not write_rows(result.columns, result, form, output) and form == "table":
                print(empty, file=sys.stderr)
    except QueryError as exc:
        print(f"fastscp {command}: {exc}", file=sys.stderr)
        return 2
    except (ConnectionError, OSError) as exc:
        print(f"fastscp {command}: the server stopped answering: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


def write_rows(columns: Sequence[str], rows: Iterable[Sequence[Any]], form: str, output: str | None) -> int:
    """Write rows as a table, JSON lines, CSV or Parquet (to ``output``, else standard output); how many."""
    if form == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        listed = list(rows)
        by_column = list(zip(*listed, strict=True)) if listed else [() for _ in columns]
        pq.write_table(pa.Table.from_arrays([pa.array(list(values)) for values in by_column], names=list(columns)),
                       output)
        return len(listed)
    with open(output, "w", newline="", encoding="utf-8") if output else _stdout() as out:
        count = 0
        if form == "json":
            encode = msgspec.json.Encoder(enc_hook=str).encode
            for row in rows:
                out.write(encode(dict(zip(columns, row, strict=True))).decode() + "\n")
                count += 1
        elif form == "csv":
            writer = csv.writer(out)
            writer.writerow(columns)
            for row in rows:
                writer.writerow(row)
                count += 1
        else:
            listed = list(rows)
            if listed:
                out.write(format_table(columns, listed))
            count = len(listed)
        return count


class _stdout:
    """Standard output as a context manager that flushes and does not close it."""

    def __enter__(self) -> Any:
        return sys.stdout

    def __exit__(self, *_exc: object) -> None:
        sys.stdout.flush()




def _cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    if column == "Bytes":
        return human_bytes(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def format_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """An aligned text table: a header line, then one line per row; numbers right-aligned."""
    rows = list(rows)
    cells = [[_cell(c, v) for c, v in zip(columns, row, strict=True)] for row in rows]
    widths = [max([len(c)] + [len(row[n]) for row in cells]) for n, c in enumerate(columns)]
    right = [c == "Bytes" or (any(row[n] is not None for row in rows) and all(
        row[n] is None or (isinstance(row[n], int | float) and not isinstance(row[n], bool)) for row in rows))
        for n, c in enumerate(columns)]
    lines = [[c.rjust(w) if r else c.ljust(w) for c, w, r in zip(columns, widths, right, strict=True)]]
    lines += [[v.rjust(w) if r else v.ljust(w) for v, w, r in zip(row, widths, right, strict=True)] for row in cells]
    return "".join("  ".join(line).rstrip() + "\n" for line in lines)


# -- stats ------------------------------------------------------------------------------------


def _stats(args: argparse.Namespace) -> int:
    from fastscp.index.database import IndexUnavailable
    from fastscp.query.client import open_query_client
    from fastscp.query.messages import StatsRequest

    config = index_config(args)
    index_path = config.index_path
    try:
        client = open_query_client(index_path, config.lake)
    except IndexUnavailable as exc:
        print(f"fastscp stats: {exc}", file=sys.stderr)
        return 1
    try:
        stats = client.stats(StatsRequest(utc_offset=time.localtime().tm_gmtoff))
    except (ConnectionError, OSError) as exc:
        print(f"fastscp stats: the server stopped answering: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if args.json:
        sys.stdout.buffer.write(msgspec.json.encode(stats) + b"\n")
        sys.stdout.flush()
        return 0
    sys.stdout.write(format_stats(stats, index_path))
    return 0


def format_stats(stats: Any, index_path: str) -> str:
    """The readable form of :class:`fastscp.query.messages.Stats`."""
    if stats.indexer is not None:
        state = stats.indexer
        source = (f"server running (indexer pid {state.pid}: {state.pending} records pending, "
                  f"{state.committed} instances committed since start, reconcile {state.reconcile})")
    else:
        source = "server stopped: read from the file"
    lines = [
        f"index {index_path} ({source})",
        f"instances  {stats.instances:>12,}  {human_bytes(stats.bytes)}",
        f"series     {stats.series:>12,}",
        f"studies    {stats.studies:>12,}",
        f"patients   {stats.patients:>12,}",
        f"duplicate conflicts {stats.duplicate_conflicts:,}",
    ]
    for title, counts in (("modality", stats.by_modality), ("calling AE title", stats.by_calling_ae_title),
                          ("day received", stats.by_day)):
        lines.append("")
        lines.append(f"by {title}:")
        table = format_table(
            [title, "instances", "studies", "Bytes"],
            [[c.name or "(none)", c.instances, c.studies, c.bytes] for c in counts],
        )
        lines.extend("  " + line for line in table.splitlines())
    return "\n".join(lines) + "\n"


# -- reindex ----------------------------------------------------------------------------------


def _reindex(args: argparse.Namespace) -> int:
    from fastscp.index.database import IndexUnavailable
    from fastscp.index.reindex import reindex
    from fastscp.query.client import server_running

    config = index_config(args)
    storage, index_path = config.storage.directory, config.index_path
    sr_root = getattr(config.storage, "sr_directory", "")
    if config.lake:
        print(f"fastscp reindex: {args.config}: database.catalog: reindex rebuilds an index file, not the shared "
              "index; start the node instead (its reconcile indexes the files it has and drops rows of files "
              "that are gone)", file=sys.stderr)
        return 1
    if server_running(index_path):
        print(f"fastscp reindex: a running fastscp server owns {index_path}; stop it first "
              "(the server keeps its index up to date and reconciles it with the files when it starts)",
              file=sys.stderr)
        return 1
    if not os.path.isdir(storage):
        print(f"fastscp reindex: {storage}: no such storage folder", file=sys.stderr)
        return 1
    try:
        result = reindex(storage, index_path, sr_root=sr_root, content_hash=not args.no_hash)
    except IndexUnavailable as exc:
        print(f"fastscp reindex: {exc}", file=sys.stderr)
        return 1
    for path, reason in result.failed[:20]:
        print(f"fastscp reindex: {path}: not indexed: {reason}", file=sys.stderr)
    if len(result.failed) > 20:
        print(f"fastscp reindex: ... and {len(result.failed) - 20} more unreadable files", file=sys.stderr)
    print(f"indexed {result.indexed} of {result.files} files from {storage} into {index_path} "
          f"in {result.seconds:.1f} s" + (f"; {len(result.failed)} unreadable" if result.failed else ""))
    return 0 if not result.failed else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastscp.cli.index query|stats|reindex ...``: these commands alone.

    ``fastscp`` itself gets them through ``fastscp.cli.main.COMMAND_MODULES``.
    """
    parser = argparse.ArgumentParser(prog="fastscp", description="fastscp index commands")
    register(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
