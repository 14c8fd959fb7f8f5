"""Scan sheets: one page per study, as a PNG and as an HTML page with the same content.

The page has the patient and study header (name, ID, birth date, sex, study
date, description, accession, referring physician) and one row per series:
number, description, modality, instance count and a strip of thumbnails
spread evenly over the series.

Input is plain data, a :class:`StudySummary`, so the caller can build it from
the index (:func:`summarise_study` takes ``(path, HeaderFields)`` pairs) or
from files (:func:`summarise_study_files`).  Thumbnails already made by the
post-store stage are reused (``InstanceSummary.thumbnail_path``); missing
ones are rendered from the DICOM file.  Both files are replaced atomically
when a sheet is made again.

Text is drawn with DejaVu Sans (Debian's ``fonts-dejavu-core``) when it is
installed, else with Pillow's built-in font.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Final

import msgspec
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fastscp.dicom.fields import HeaderFields
from fastscp.imaging.frames import DecodeError, encode_jpeg, read_header
from fastscp.imaging.thumbnail import DEFAULT_SIZE, ThumbnailError, make_thumbnail, thumbnail_path
from fastscp.storage.files import BROWSABLE, FileModes, write_atomic
from fastscp.storage.layout import LayoutOptions, safe_component, study_folder
from fastscp.storage.reserved import NOT_INSTANCES, SCANSHEETS

__all__ = [
    "InstanceSummary",
    "QuietStudies",
    "SeriesSummary",
    "StudySummary",
    "find_study_instances",
    "make_scansheet",
    "read_headers",
    "scansheet_dir",
    "sheet_folder",
    "stored_thumbnails",
    "summarise_study",
    "summarise_study_files",
    "write_scansheet",
]

log = logging.getLogger("fastscp.scansheet")

#: Thumbnails per series row.
DEFAULT_THUMBNAILS: Final = 8

FONT_DIRS: Final = ("/usr/share/fonts/truetype/dejavu",)


# -- the data -----------------------------------------------------------------------


class InstanceSummary(msgspec.Struct, frozen=True, kw_only=True):
    """One instance of a series, as far as the sheet needs it."""

    path: str  # the DICOM file
    instance_number: int | None = None
    sop_instance_uid: str = ""
    #: A thumbnail JPEG already made (post-store stage); "" to render from `path`.
    thumbnail_path: str = ""


class SeriesSummary(msgspec.Struct, frozen=True, kw_only=True):
    """One series row: General Series attributes and its instances in order."""

    series_instance_uid: str
    series_number: int | None = None
    series_description: str = ""
    modality: str = ""
    instances: tuple[InstanceSummary, ...] = ()

    @property
    def instance_count(self) -> int:
        return len(self.instances)


class StudySummary(msgspec.Struct, frozen=True, kw_only=True):
    """What a scan sheet shows: Patient and General Study attributes and the series."""

    study_instance_uid: str
    patient_name: str = ""
    patient_id: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""
    study_time: str = ""
    study_description: str = ""
    accession_number: str = ""
    referring_physician_name: str = ""
    series: tuple[SeriesSummary, ...] = ()

    @property
    def instance_count(self) -> int:
        return sum(s.instance_count for s in self.series)


_STUDY_FIELDS: Final = ("patient_name", "patient_id", "patient_birth_date", "patient_sex", "study_date",
                        "study_time", "study_description", "accession_number", "referring_physician_name")


def _sort_key_number(value: int | None) -> tuple[int, int]:
    return (1, 0) if value is None else (0, value)


def summarise_study(
    items: Iterable[tuple[str, HeaderFields]],
    study_instance_uid: str | None = None,
    *,
    thumbnail_for: Callable[[str], str] | None = None,
) -> StudySummary:
    """Group instances of one study into series.

    Parameters
    ----------
    items : iterable of (path, HeaderFields)
        The study's instances, e.g. index rows or headers read from files.
    study_instance_uid : str, optional
        Keep only this study's instances.  Without it, all items must
        belong to one study.
    thumbnail_for : callable, optional
        path -> an existing thumbnail JPEG for it (or ""), for example
        ``lambda p: thumbnail_path(root, p)`` when thumbnails are made at
        store time.

    Returns
    -------
    StudySummary
        Series ordered by Series Number, instances by Instance Number; the
        patient and study values are the first non-empty ones met.

    Raises
    ------
    ValueError
        No instance of the study, or items of several studies without
        `study_instance_uid`.
    """
    rows = [(path, fields) for path, fields in items
            if study_instance_uid is None or fields.study_instance_uid == study_instance_uid]
    if not rows:
        raise ValueError(f"no instances of study {study_instance_uid or '(any)'}")
    studies = {fields.study_instance_uid for _path, fields in rows}
    if len(studies) > 1:
        raise ValueError(f"instances of {len(studies)} studies given; name one")
    values = dict.fromkeys(_STUDY_FIELDS, "")
    series: dict[str, list[tuple[str, HeaderFields]]] = {}
    for path, fields in rows:
        for name in _STUDY_FIELDS:
            if not values[name]:
                values[name] = getattr(fields, name)
        series.setdefault(fields.series_instance_uid, []).append((path, fields))
    summaries = []
    for uid, members in series.items():
        members.sort(key=lambda m: (_sort_key_number(m[1].instance_number), m[0]))
        first = next((f for _p, f in members if f.series_description or f.modality), members[0][1])
        instances = tuple(
            InstanceSummary(path=path, instance_number=f.instance_number, sop_instance_uid=f.sop_instance_uid,
                            thumbnail_path=thumbnail_for(path) if thumbnail_for else "")
            for path, f in members
        )
        summaries.append(SeriesSummary(series_instance_uid=uid, series_number=first.series_number,
                                       series_description=first.series_description, modality=first.modality,
                                       instances=instances))
    summaries.sort(key=lambda s: (_sort_key_number(s.series_number), s.series_instance_uid))
    return StudySummary(study_instance_uid=rows[0][1].study_instance_uid, series=tuple(summaries), **values)


def read_headers(paths: Iterable[str | os.PathLike[str]]) -> list[tuple[str, HeaderFields]]:
    """(path, HeaderFields) of DICOM files, reading their headers (not their pixels).

    Files that are not DICOM, or whose header cannot be parsed, are skipped
    with a log line.
    """
    items = []
    for path in paths:
        try:
            fields, _syntax, _start = read_header(path)
        except (DecodeError, OSError) as exc:
            log.info("scan sheet: skipped %s: %s", path, exc)
            continue
        items.append((os.fspath(path), fields))
    return items


def summarise_study_files(
    paths: Iterable[str | os.PathLike[str]], study_instance_uid: str | None = None, *,
    thumbnail_for: Callable[[str], str] | None = None,
) -> StudySummary:
    """:func:`summarise_study` of DICOM files (:func:`read_headers`)."""
    return summarise_study(read_headers(paths), study_instance_uid, thumbnail_for=thumbnail_for)


def find_study_instances(storage_root: str | os.PathLike[str],
                         study_instance_uid: str) -> list[tuple[str, HeaderFields]]:
    """(path, HeaderFields) of one study's DICOM files below a storage root, found by reading headers.

    Folders of the layout that name the study (``..._<StudyInstanceUID>`` or
    the UID itself) are searched first; if none exists the whole tree is,
    minus fastscp's own folders (:data:`fastscp.storage.reserved.NOT_INSTANCES`).
    """
    root = os.fspath(storage_root)
    uid_component = safe_component(study_instance_uid)
    named: list[str] = []
    for folder, dirs, _files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in NOT_INSTANCES)
        for d in list(dirs):
            if d == uid_component or d.endswith("_" + uid_component):
                named.append(os.path.join(folder, d))
                dirs.remove(d)  # found: nothing of the study lies deeper but in it
    found: list[tuple[str, HeaderFields]] = []
    for top in named or [root]:
        for folder, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if d not in NOT_INSTANCES)
            for name in sorted(files):
                if name.startswith(".") or name.endswith((".jpg", ".png", ".html", ".duckdb", ".wal", ".txt")):
                    continue
                path = os.path.join(folder, name)
                try:
                    fields, _syntax, _start = read_header(path)
                except (DecodeError, OSError):
                    continue
                if fields.study_instance_uid == study_instance_uid:
                    found.append((path, fields))
    return found


def scansheet_dir(storage_root: str | os.PathLike[str], study: StudySummary) -> str:
    """``<root>/scansheets/<PatientID>/<StudyDate>_<StudyInstanceUID>``: the hierarchical layout's study level."""
    return os.path.join(
        os.fspath(storage_root), SCANSHEETS, safe_component(study.patient_id),
        safe_component(f"{study.study_date}_{study.study_instance_uid}".strip("_")),
    )


def sheet_folder(storage_root: str | os.PathLike[str], layout: LayoutOptions, study: StudySummary) -> str:
    """Where a study's scan sheet goes: its folder in the storage layout, beside its series
    (:func:`fastscp.storage.layout.study_folder`), else :func:`scansheet_dir` (layouts without a study level).

    The post-store stage and ``fastscp scansheet`` both ask here, so a sheet
    made by hand replaces the server's. Only an instance below the root
    names the folder (a study's files may also lie on other nodes, or in
    storage.sr_directory): the sheet never goes elsewhere.
    """
    root = os.fspath(storage_root)
    below = (relative for series in study.series for instance in series.instances
             if not (relative := os.path.relpath(instance.path, root)).startswith(os.pardir + os.sep))
    first = next(below, None)
    folder = study_folder(layout, first) if first is not None else None
    return os.path.join(root, folder) if folder else scansheet_dir(root, study)


def stored_thumbnails(storage_root: str | os.PathLike[str]) -> Callable[[str], str]:
    """path -> where the post-store stage puts its thumbnail (it may not exist); "" outside the root."""
    root = os.fspath(storage_root)

    def thumbnail_for(path: str) -> str:
        relative = os.path.relpath(path, root)
        return "" if relative.startswith("..") else thumbnail_path(root, relative)

    return thumbnail_for


def make_scansheet(
    storage_root: str | os.PathLike[str],
    layout: LayoutOptions,
    study_instance_uid: str,
    items: Iterable[tuple[str, HeaderFields]],
    *,
    per_row: int = DEFAULT_THUMBNAILS,
    modes: FileModes = BROWSABLE,
    out_dir: str | os.PathLike[str] | None = None,
) -> tuple[StudySummary, str, str]:
    """Make a study's scan sheet as the server does, and write it.

    The one assembly of a sheet: the post-store stage and ``fastscp
    scansheet`` both call it, so a sheet made by hand is the server's sheet
    (same place, same thumbnails, same number per series) and replaces it.

    Parameters
    ----------
    items : iterable of (path, HeaderFields)
        The study's instances (absolute paths), from the files or the index.
    per_row : int
        ``scansheet.thumbnails_per_series``.
    modes : FileModes
        ``storage.file_mode``/``dir_mode`` of the files and folders made.
    out_dir : str or PathLike, optional
        Another folder than the server's (:func:`sheet_folder`).

    Returns
    -------
    tuple
        (StudySummary, png_path, html_path).

    Raises
    ------
    ValueError
        No instance of the study in ``items``.
    OSError
        The sheet can't be written.
    """
    root = os.fspath(storage_root)
    summary = summarise_study(items, study_instance_uid, thumbnail_for=stored_thumbnails(root))
    out = sheet_folder(root, layout, summary) if out_dir is None else out_dir
    png, page = write_scansheet(summary, out, per_row=per_row, modes=modes)
    return summary, png, page


# -- the trigger --------------------------------------------------------------------


class QuietStudies:
    """Studies with no new instance for `timeout` seconds: when to (re)make a sheet.

    The post-store stage calls :meth:`touch` for every stored instance and
    :meth:`pop_due` now and then; a study that receives more instances after
    its sheet was made becomes due again, so the sheet is regenerated.  Pure
    bookkeeping: no I/O, no threads.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._last: dict[str, float] = {}

    def touch(self, study_instance_uid: str, now: float | None = None) -> None:
        """An instance of the study was stored (at `now`, default time.monotonic())."""
        self._last[study_instance_uid] = time.monotonic() if now is None else now

    def pop_due(self, now: float | None = None) -> list[str]:
        """Studies quiet for `timeout` seconds, oldest first; they are forgotten until touched again."""
        now = time.monotonic() if now is None else now
        due = sorted((t, uid) for uid, t in self._last.items() if now - t >= self.timeout)
        for _t, uid in due:
            del self._last[uid]
        return [uid for _t, uid in due]

    def next_due_in(self, now: float | None = None) -> float | None:
        """Seconds until the next study is due (0 if one is), None if none is pending."""
        if not self._last:
            return None
        now = time.monotonic() if now is None else now
        return max(0.0, min(self._last.values()) + self.timeout - now)

    def __len__(self) -> int:
        return len(self._last)


# -- rendering ----------------------------------------------------------------------


def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for folder in FONT_DIRS:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size)


def format_date(value: str) -> str:
    """DA ``YYYYMMDD`` as ``YYYY-MM-DD``; anything else as it is."""
    if len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value


def format_time(value: str) -> str:
    """TM ``HHMMSS.frac`` as ``HH:MM:SS`` (shorter forms kept as far as they go)."""
    digits = value.split(".")[0]
    if digits.isdigit() and len(digits) in (2, 4, 6):
        return ":".join(digits[i : i + 2] for i in range(0, len(digits), 2))
    return value


def format_name(value: str) -> str:
    """PN ``Family^Given^Middle^Prefix^Suffix`` as ``Family, Given Middle``."""
    parts = value.split("=")[0].split("^")
    family = parts[0].strip()
    given = " ".join(p.strip() for p in parts[1:3] if p.strip())
    return f"{family}, {given}" if family and given else family or given


def _printable(value: str) -> str:
    """Text safe to draw: control characters (CR, LF, ESC, ...) become spaces."""
    return "".join(c if c.isprintable() else " " for c in value)


def header_lines(study: StudySummary) -> list[tuple[str, str]]:
    """(label, value) pairs of the sheet's header, in order; PNG and HTML both show these."""
    date = " ".join(v for v in (format_date(study.study_date), format_time(study.study_time)) if v)
    return [
        ("Patient", format_name(study.patient_name)),
        ("Patient ID", study.patient_id),
        ("Birth date", format_date(study.patient_birth_date)),
        ("Sex", study.patient_sex),
        ("Study date", date),
        ("Description", study.study_description),
        ("Accession", study.accession_number),
        ("Referring physician", format_name(study.referring_physician_name)),
        ("Study UID", study.study_instance_uid),
        ("Instances", f"{study.instance_count} in {len(study.series)} series"),
    ]


#: Header lines drawn across the whole width (long values), after the two-column ones.
WIDE_LINES: Final = frozenset({"Study UID", "Instances"})


def _header_grid(study: StudySummary) -> list[list[tuple[str, str]]]:
    """Header lines grouped into display rows: pairs, then the wide lines alone."""
    lines = header_lines(study)
    narrow = [line for line in lines if line[0] not in WIDE_LINES]
    grid = [narrow[i : i + 2] for i in range(0, len(narrow), 2)]
    return grid + [[line] for line in lines if line[0] in WIDE_LINES]


def series_label(series: SeriesSummary) -> tuple[str, str, str]:
    """(title, description, count) text of a series row."""
    number = "?" if series.series_number is None else str(series.series_number)
    count = f"{series.instance_count} instance{'s' if series.instance_count != 1 else ''}"
    return f"Series {number}  {series.modality}".rstrip(), series.series_description, count


def pick(instances: tuple[InstanceSummary, ...], count: int) -> list[InstanceSummary]:
    """Up to `count` instances spread evenly from first to last."""
    if len(instances) <= count:
        return list(instances)
    indices = np.unique(np.round(np.linspace(0, len(instances) - 1, count)).astype(int))
    return [instances[i] for i in indices]


def _load_thumbnail(instance: InstanceSummary, size: int) -> np.ndarray | None:
    if instance.thumbnail_path and os.path.exists(instance.thumbnail_path):
        try:
            with Image.open(instance.thumbnail_path) as image:
                image.thumbnail((size, size))  # a thumbnail made at another size
                return np.asarray(image.convert("RGB" if image.mode != "L" else "L"))
        except OSError as exc:
            log.info("scan sheet: thumbnail %s unreadable (%s); rendering", instance.thumbnail_path, exc)
    try:
        return make_thumbnail(instance.path, size)
    except ThumbnailError as exc:
        log.info("scan sheet: no image for %s: %s", instance.path, exc)
        return None


class _Layout:
    """Sizes shared by the PNG; the HTML uses the same thumbnails and text."""

    margin = 24
    gap = 8
    label_width = 320
    title_size = 26
    text_size = 15


Tile = tuple[InstanceSummary, "np.ndarray | None"]  # an instance and its thumbnail (None: no image)
Row = tuple[SeriesSummary, list[Tile]]


def _render_png(study: StudySummary, rows: list[Row], size: int, per_row: int) -> Image.Image:
    lay = _Layout
    title_font, bold, font = _font(lay.title_size, True), _font(lay.text_size, True), _font(lay.text_size)
    line = lay.text_size + 7
    grid = _header_grid(study)
    header_height = lay.title_size + 16 + line * len(grid) + lay.margin
    row_height = max(size, 3 * line) + lay.gap * 2
    width = lay.margin * 2 + lay.label_width + per_row * (size + lay.gap)
    height = lay.margin + header_height + row_height * max(1, len(rows)) + lay.margin
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    x0, y = lay.margin, lay.margin
    draw.text((x0, y), "Scan sheet", font=title_font, fill="black")
    y += lay.title_size + 16
    half = (width - 2 * lay.margin) // 2
    indent = max(draw.textlength(f"{label}:", font=bold) for cells in grid for label, _v in cells) + 12
    for r, cells in enumerate(grid):
        for c, (label, value) in enumerate(cells):
            x = x0 + c * half
            draw.text((x, y + r * line), f"{label}:", font=bold, fill="black")
            draw.text((x + indent, y + r * line), _printable(value), font=font, fill="black")
    y += line * len(grid) + lay.margin // 2
    draw.line((x0, y - lay.gap, width - lay.margin, y - lay.gap), fill="#888888", width=1)
    if not rows:
        draw.text((x0, y + lay.gap), "no series", font=font, fill="black")
    for series, tiles in rows:
        title, description, count = series_label(series)
        draw.text((x0, y + lay.gap), _printable(title), font=bold, fill="black")
        draw.text((x0, y + lay.gap + line), _printable(description), font=font, fill="black")
        draw.text((x0, y + lay.gap + 2 * line), count, font=font, fill="#444444")
        x = x0 + lay.label_width
        for _instance, image in tiles:
            cell = (x, y + lay.gap, x + size - 1, y + lay.gap + size - 1)
            draw.rectangle(cell, fill="black")
            if image is None:
                draw.text((x + 8, y + lay.gap + size // 2 - 8), "no image", font=font, fill="#bbbbbb")
            else:
                tile = Image.fromarray(image)
                sheet.paste(tile, (x + (size - tile.width) // 2, y + lay.gap + (size - tile.height) // 2))
            x += size + lay.gap
        y += row_height
    return sheet


_CSS: Final = """
body { font-family: "DejaVu Sans", sans-serif; margin: 24px; color: #000; background: #fff; }
h1 { font-size: 26px; margin: 0 0 12px 0; }
table.header td { padding: 2px 16px 2px 0; vertical-align: top; }
table.header td.label { font-weight: bold; }
table.series { border-collapse: collapse; margin-top: 12px; }
table.series td { border-top: 1px solid #888; padding: 8px 8px 8px 0; vertical-align: top; }
.title { font-weight: bold; }
.count { color: #444; }
.thumb { display: inline-block; background: #000; margin-right: 8px; text-align: center; vertical-align: middle; }
.thumb img { display: block; margin: auto; }
.missing { color: #bbb; font-size: 12px; }
"""


def _render_html(study: StudySummary, rows: list[Row], size: int) -> str:
    esc = html.escape  # quote=True: values also go into attributes
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>Scan sheet: {esc(format_name(study.patient_name))} {esc(format_date(study.study_date))}</title>",
           f"<style>{_CSS}</style>", "</head>", "<body>", "<h1>Scan sheet</h1>", '<table class="header">']
    for cells in _header_grid(study):
        span = ' colspan="3"' if len(cells) == 1 else ""
        row = "".join(f'<td class="label">{esc(label)}:</td><td{span}>{esc(value)}</td>' for label, value in cells)
        out.append(f"<tr>{row}</tr>")
    out.append("</table>")
    out.append('<table class="series">')
    if not rows:
        out.append("<tr><td>no series</td></tr>")
    for series, tiles in rows:
        title, description, count = series_label(series)
        out.append("<tr>")
        out.append(f'<td><div class="title">{esc(title)}</div><div>{esc(description)}</div>'
                   f'<div class="count">{esc(count)}</div></td>')
        cells = []
        for instance, image in tiles:
            style = f'style="width:{size}px;height:{size}px"'
            if image is None:
                cells.append(f'<span class="thumb missing" {style}>no image</span>')
            else:
                data = base64.b64encode(encode_jpeg(image, 85)).decode("ascii")
                alt = esc(f"instance {instance.instance_number if instance.instance_number is not None else ''}")
                cells.append(f'<span class="thumb" {style}><img alt="{alt}" width="{image.shape[1]}" '
                             f'height="{image.shape[0]}" src="data:image/jpeg;base64,{data}"></span>')
        out.append(f"<td>{''.join(cells)}</td>")
        out.append("</tr>")
    out += ["</table>", "</body>", "</html>", ""]
    return "\n".join(out)


def render_scansheet(
    study: StudySummary, *, size: int = DEFAULT_SIZE, per_row: int = DEFAULT_THUMBNAILS
) -> tuple[Image.Image, str]:
    """The sheet as a Pillow image and as HTML text (thumbnails embedded as data: URLs)."""
    rows: list[Row] = [
        (series, [(inst, _load_thumbnail(inst, size)) for inst in pick(series.instances, per_row)])
        for series in study.series
    ]
    return _render_png(study, rows, size, per_row), _render_html(study, rows, size)


def write_scansheet(
    study: StudySummary,
    out_dir: str | os.PathLike[str],
    *,
    basename: str = "scansheet",
    size: int = DEFAULT_SIZE,
    per_row: int = DEFAULT_THUMBNAILS,
    modes: FileModes = BROWSABLE,
) -> tuple[str, str]:
    """Write ``<out_dir>/<basename>.png`` and ``.html`` for a study, replacing old ones atomically, with `modes`.

    Parameters
    ----------
    study : StudySummary
        See :func:`summarise_study` and :func:`summarise_study_files`.
    out_dir : str or PathLike
        Created if missing; :func:`scansheet_dir` gives the usual place.
    basename : str
        File name without extension.
    size : int
        Thumbnail size (long side, pixels).
    per_row : int
        Thumbnails per series, spread evenly over it.

    Returns
    -------
    tuple of str
        (png_path, html_path).
    """
    sheet, page = render_scansheet(study, size=size, per_row=per_row)
    png = io.BytesIO()
    sheet.save(png, format="PNG", optimize=False)
    png_path = os.path.join(os.fspath(out_dir), f"{basename}.png")
    html_path = os.path.join(os.fspath(out_dir), f"{basename}.html")
    write_atomic(png_path, png.getvalue(), modes=modes)
    write_atomic(html_path, page.encode("utf-8"), modes=modes)
    return png_path, html_path
