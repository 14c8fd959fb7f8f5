"""The study browser: patients and studies from the index, a study's scan sheet and thumbnails, its zip.

Served by the monitor (:mod:`fastscp.monitor.server`) under ``/patients``
and ``/studies``:

- ``GET /patients?name=&id=``                    patients, searched by name and ID
- ``GET /studies?name=&id=&accession=&modality=&from=&to=``   studies, newest first
- ``GET /studies/<StudyInstanceUID>``            the study: header, scan sheet, series with thumbnails
- ``GET /studies/<StudyInstanceUID>/scansheet.png``
- ``GET /studies/<StudyInstanceUID>/thumbnails/<SOPInstanceUID>.jpg``
- ``GET /studies/<StudyInstanceUID>.zip``        the study's files, as stored, in a zip (streamed)

Every query goes to the running server's indexer
(:class:`fastscp.query.client.QueryClient`): DuckDB allows one process to
open the index, and that is the indexer. Request input never becomes a
path: UIDs must be UIDs (digits and dots), and every file served is one the
index names, checked to resolve inside the storage root (or
``storage.sr_directory``) after symbolic links. Every value shown is
HTML-escaped (patient names come from the network), pages run no script,
and a Content-Security-Policy allows only their own stylesheet and images.

Access: patient data. On a loopback address (127.0.0.0/8, ::1) the browser
needs no credentials but answers only requests whose Host is a loopback
name (a web page elsewhere can't read it through DNS rebinding); beyond
loopback it is served only with ``monitor.username``/``monitor.password``
(HTTP basic authentication) or ``monitor.token`` (a bearer token), and
without them it is off (see :meth:`Browser.from_config`). Every view of
patient data is logged on ``fastscp.browser``: who, what, from where.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import hmac
import html
import io
import ipaddress
import logging
import os
import re
import threading
import time
import zipfile
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, urlencode

import msgspec

from fastscp.config import Config, layout_options
from fastscp.imaging.scansheet import (
    InstanceSummary,
    SeriesSummary,
    StudySummary,
    format_date,
    format_name,
    format_time,
    pick,
    sheet_folder,
)
from fastscp.imaging.thumbnail import thumbnail_path
from fastscp.monitor import page as statuspage
from fastscp.monitor.http import HTML, Request, Response, StreamResponse, text_response
from fastscp.net.dimse import is_uid
from fastscp.query.client import QueryClient, ServerUnavailable, node_addresses
from fastscp.query.messages import Condition, QueryError, QueryRequest
from fastscp.query.retrieve import Instance
from fastscp.status import human_bytes
from fastscp.storage.layout import LayoutOptions
from fastscp.storage.reserved import THUMBNAILS

if TYPE_CHECKING:
    from fastscp.net.fetch import FetchSettings

log = logging.getLogger("fastscp.browser")

#: Rows of a search result page; more matches ask for a narrower search.
MAX_ROWS = 200
#: Characters of one search field, and fields in a query string.
MAX_FIELD = 64
MAX_FIELDS = 32
#: Instances of a study the study page and the zip take from the index (~0.7 KB of memory each while
#: a page is made; a larger study: 413 for its zip, no series list).
MAX_STUDY_INSTANCES = 50_000
#: Zips being sent at once (each reads files in its own thread); more get 503.
MAX_DOWNLOADS = 4
#: Queries to the indexer at once (threads: the query client blocks).
QUERY_THREADS = 4
#: Seconds each message of a query's answer may take.
QUERY_TIMEOUT = 15.0
#: Bytes per chunk of a zip on the wire, and chunks made ahead of the client:
#: a download holds about (ZIP_AHEAD + 3) * ZIP_CHUNK (queued, being sent, read, gathered).
ZIP_CHUNK = 256 * 1024
ZIP_AHEAD = 4
#: A thumbnail or scan sheet larger than this is not served (they are small JPEG/PNG files).
MAX_IMAGE_FILE = 16 * 1024 * 1024
#: Seconds a failed authentication waits before its 401 (slows guessing).
AUTH_FAILURE_DELAY = 0.5
#: Thumbnails per series on the study page.
DEFAULT_THUMBNAILS = 8

_DATE = re.compile(r"(\d{4})-?(\d{2})-?(\d{2})")
_MODALITY = re.compile(r"[A-Za-z0-9_]{1,16}")
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and an IPv4-mapped 127.x (never for a wildcard address or a name)."""
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _quoted(value: str) -> str:
    """A value for a log line: in quotes, quotes and control characters escaped (JSON rules)."""
    return msgspec.json.encode(value).decode()


# -- settings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BrowserSettings:
    index_path: str
    #: The storage root and storage.sr_directory, real paths ("" when none).
    root: str
    sr_root: str
    layout: LayoutOptions
    username: str = ""
    password: str = ""
    token: str = ""
    thumbnails_per_series: int = DEFAULT_THUMBNAILS
    #: Why the browser is off ("" when it is on).
    off: str = ""
    #: A shared index: how the files of other nodes' rows are had (None: one node).
    remote: FetchSettings | None = None

    @property
    def credentials(self) -> bool:
        return bool(self.username or self.token)


def browser_settings(config: Config, bound_host: str) -> BrowserSettings:
    """The browser's settings for a monitor listening on ``bound_host`` (the address it bound).

    Beyond loopback without credentials the browser is off and the status
    page stays on: refusing to start would stop the whole server, and so
    the reception of images, over a page that can simply be withheld.
    """
    monitor = config.monitor
    off = ""
    if not monitor.browser:
        off = "monitor.browser is false"
    elif not is_loopback(bound_host) and not (monitor.username or monitor.token):
        off = (f"monitor.listen {monitor.listen} is beyond loopback and no credentials are configured: set "
               f"monitor.username and monitor.password, or monitor.token, to serve it there")
    sr = config.storage.sr_directory
    remote = None
    if config.lake is not None:
        from fastscp.net.fetch import fetch_settings  # pynetdicom: only a shared index needs it here

        remote = fetch_settings(config, os.path.realpath(config.storage.directory),
                                node_addresses(config.index_path, config.retrieve.node_timeout))
    return BrowserSettings(
        index_path=config.index_path,
        root=os.path.realpath(config.storage.directory),
        sr_root=os.path.realpath(sr) if sr else "",
        layout=layout_options(config),
        username=monitor.username, password=monitor.password, token=monitor.token,
        thumbnails_per_series=config.scansheet.thumbnails_per_series,
        off=off,
        remote=remote,
    )


def inside(path: str, root: str) -> str | None:
    """The real path of ``path`` if it resolves (symbolic links followed) inside ``root``, else None."""
    if not root:
        return None
    real = os.path.realpath(path)
    return real if real != root and real.startswith(root.rstrip(os.sep) + os.sep) else None


# -- pages ------------------------------------------------------------------------------

# The status page's look (its stylesheet), and more for forms and images.
_STYLE = statuspage._STYLE + """
header a { color: #fff; }
header nav a { margin-right: 14px; }
form.search { display: flex; flex-wrap: wrap; gap: 8px 14px; align-items: end; }
form.search label { display: flex; flex-direction: column; font-size: 12px; color: var(--muted); }
form.search input { font: inherit; padding: 3px 6px; border: 1px solid var(--line); border-radius: 4px; }
form.search button { font: inherit; padding: 4px 14px; }
.thumbs img { background: #000; margin: 0 6px 6px 0; vertical-align: top; }
img.sheet { max-width: 100%; border: 1px solid var(--line); }
td.uid { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; overflow-wrap: anywhere; }
"""

#: No script at all; images and forms from here only.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; style-src {statuspage._sha256(_STYLE)}; img-src 'self'; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
_PAGE_HEADERS = (("Content-Security-Policy", CONTENT_SECURITY_POLICY), ("Referrer-Policy", "no-referrer"),
                 ("X-Frame-Options", "DENY"))


def esc(value: object) -> str:
    """Text for HTML content or a quoted attribute."""
    return html.escape("" if value is None else str(value), quote=True)


def _page(title: str, body: str, status: int = 200) -> Response:
    document = (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<title>{esc(title)} - fastscp</title>\n<link rel="icon" href="data:,">\n<style>{_STYLE}</style>\n'
        '</head>\n<body>\n<header><h1>fastscp</h1><nav><a href="/studies">Studies</a>'
        '<a href="/patients">Patients</a><a href="/">Status</a></nav></header>\n'
        f"<main>\n{body}\n</main>\n</body>\n</html>\n"
    )
    return Response(status, HTML, document.encode(), _PAGE_HEADERS)


def _error_page(status: int, message: str) -> Response:
    return _page(f"{status}", f'<div class="alert bad">{esc(message)}</div>', status)


def _table(headings: Iterable[str], rows: list[str], empty: str, id_: str) -> str:
    if not rows:
        return f'<p class="empty" id="{id_}">{esc(empty)}</p>'
    head = "".join(f"<th>{esc(h)}</th>" for h in headings)
    return f'<table id="{id_}"><thead><tr>{head}</tr></thead><tbody>\n' + "\n".join(rows) + "\n</tbody></table>"


def _study_href(uid: str, suffix: str = "") -> str:
    return f"/studies/{quote(uid)}{suffix}"


def _count_note(shown: int, more: bool) -> str:
    if more:
        return f"the first {shown} matches; narrow the search to see the others"
    return f"{shown} match{'es' if shown != 1 else ''}"


class BadSearch(ValueError):
    """A search field we refuse (too long, not a date...); the message names it."""


def _text_condition(keyword: str, value: str) -> Condition | None:
    """Free text: matched anywhere unless it has its own wildcards (* ?); backslashes (value lists) dropped."""
    value = value.replace("\\", "").strip()
    if not value:
        return None
    return Condition(keyword, value if "*" in value or "?" in value else f"*{value}*")


def _date(name: str, value: str) -> str:
    match = _DATE.fullmatch(value.strip())
    if match is None:
        raise BadSearch(f"{name}: a date as YYYY-MM-DD")
    return "".join(match.groups())


def parse_search(query: str, fields: tuple[str, ...]) -> dict[str, str]:
    """The search fields of a query string (others ignored), each bounded.

    Raises
    ------
    BadSearch
        A field longer than :data:`MAX_FIELD` or with control characters.
    """
    values = dict.fromkeys(fields, "")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=MAX_FIELDS)
    except ValueError:
        raise BadSearch(f"too many search fields (at most {MAX_FIELDS})") from None
    for name, value in pairs:
        if name not in values:
            continue
        if len(value) > MAX_FIELD:
            raise BadSearch(f"{name}: at most {MAX_FIELD} characters")
        if not value.isprintable():
            raise BadSearch(f"{name}: no control characters")
        values[name] = value.strip()
    return values


def study_conditions(fields: dict[str, str]) -> list[Condition]:
    """The conditions of a study search (name, id, accession, modality, from, to; patient_id: exactly)."""
    exact = fields["patient_id"].replace("\\", "")
    conditions = [Condition("PatientID", exact)] if exact else []
    conditions += [c for c in (_text_condition("PatientName", fields["name"]),
                              _text_condition("PatientID", fields["id"]),
                              _text_condition("AccessionNumber", fields["accession"])) if c]
    if fields["modality"]:
        if not _MODALITY.fullmatch(fields["modality"]):
            raise BadSearch("modality: letters and digits, like CT or MR")
        conditions.append(Condition("ModalitiesInStudy", fields["modality"].upper()))
    low = _date("from", fields["from"]) if fields["from"] else ""
    high = _date("to", fields["to"]) if fields["to"] else ""
    if low or high:
        conditions.append(Condition("StudyDate", f"{low}-{high}"))
    return conditions


STUDY_FIELDS = ("name", "id", "accession", "modality", "from", "to", "patient_id")
PATIENT_FIELDS = ("name", "id")
_STUDY_KEYS = ["StudyInstanceUID", "PatientName", "PatientID", "PatientBirthDate", "StudyDate", "StudyTime",
               "AccessionNumber", "ModalitiesInStudy", "StudyDescription", "NumberOfStudyRelatedSeries",
               "NumberOfStudyRelatedInstances", "Bytes"]
_PATIENT_KEYS = ["PatientID", "PatientName", "PatientBirthDate", "PatientSex", "NumberOfPatientRelatedStudies",
                 "NumberOfPatientRelatedInstances", "Bytes"]
_HEADER_KEYS = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "StudyDescription", "AccessionNumber", "ReferringPhysicianName", "ModalitiesInStudy",
                "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "Bytes"]
_INSTANCE_KEYS = ["SeriesInstanceUID", "SeriesNumber", "Modality", "SeriesDescription", "SOPInstanceUID",
                  "InstanceNumber", "Path"]
#: In a shared index, also the row's node and what fetching its file from that node takes.
_NODE_INSTANCE_KEYS = [*_INSTANCE_KEYS, "Node", "SOPClassUID", "TransferSyntaxUID", "StudyInstanceUID",
                       "CallingAETitle"]


def _search_form(fields: dict[str, str], inputs: tuple[tuple[str, str, str], ...], action: str) -> str:
    parts = [f'<form class="search" method="get" action="{action}">']
    for name, label, kind in inputs:
        if kind == "hidden":  # kept while searching on, if given
            if fields[name]:
                parts.append(f'<label>{esc(label)}: {esc(fields[name])}'
                             f'<input type="hidden" name="{name}" value="{esc(fields[name])}"></label>')
            continue
        parts.append(f'<label>{esc(label)}<input type="{kind}" name="{name}" value="{esc(fields[name])}" '
                     f'maxlength="{MAX_FIELD}"></label>')
    parts.append('<button type="submit">Search</button></form>')
    return "".join(parts)


# -- the browser --------------------------------------------------------------------------


def parse_authorization(header: str) -> tuple[str, str, str]:
    """An Authorization header as (scheme in lower case, user, secret): Basic gives the user and
    password (RFC 7617), Bearer the token; ("", "", "") when there is none."""
    scheme, _, value = header.strip().partition(" ")
    scheme, value = scheme.lower(), value.strip()
    if scheme == "basic":
        try:
            user, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, ValueError):
            return scheme, "(not base64 UTF-8)", ""
        return scheme, user, password
    return scheme, "", value


class Browser:
    """The browser's routes: request in, response out, queries in threads."""

    def __init__(self, settings: BrowserSettings) -> None:
        self.settings = settings
        self.executor = concurrent.futures.ThreadPoolExecutor(QUERY_THREADS, thread_name_prefix="fastscp-browser")
        self.downloads = 0

    @classmethod
    def from_config(cls, config: Config, bound_host: str) -> Browser:
        settings = browser_settings(config, bound_host)
        if settings.off:
            log.warning("study browser off: %s", settings.off)
        else:
            access = ("basic authentication" if settings.username else "") + (
                " or " if settings.username and settings.token else "") + ("a bearer token" if settings.token else "")
            log.info("study browser at /studies (%s)", access or "loopback only, no authentication")
        return cls(settings)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def handles(path: str) -> bool:
        return path in ("/studies", "/patients") or path.startswith(("/studies/", "/patients/"))

    # -- access

    def _who(self, request: Request) -> str | None:
        """Who asks (for the log), or None when the request must not see patient data."""
        settings = self.settings
        if not settings.credentials:
            # Loopback only: and a loopback Host, so no other site's page can reach us by DNS rebinding.
            host = request.headers.get("host", "")
            name = host[1:].partition("]")[0] if host.startswith("[") else host.rpartition(":")[0] or host
            return "local user (no authentication on loopback)" if (
                name.lower() in _LOOPBACK_NAMES or is_loopback(name)) else None
        scheme, user, secret = parse_authorization(request.headers.get("authorization", ""))
        # Both halves compared, in constant time, whatever the first gave.
        if scheme == "basic" and settings.username and all(
                [hmac.compare_digest(user.encode(), settings.username.encode()),
                 hmac.compare_digest(secret.encode(), settings.password.encode())]):
            return f"user {_quoted(settings.username)}"
        if scheme == "bearer" and settings.token and hmac.compare_digest(secret.encode(), settings.token.encode()):
            return "bearer token holder"
        return None

    async def respond(self, request: Request, peer: str) -> Response | StreamResponse:
        settings = self.settings
        if settings.off:
            return text_response(403, f"the study browser is off: {settings.off}")
        who = self._who(request)
        if who is None:
            if not settings.credentials:
                log.warning("study browser: request from %s with Host %s refused (only loopback names are served "
                            "without credentials)", peer, _quoted(request.headers.get("host", "")[:100]))
                return text_response(403, "the study browser answers loopback names only (use http://127.0.0.1)")
            scheme, user, _secret = parse_authorization(request.headers.get("authorization", ""))
            if scheme:
                log.warning("study browser: wrong credentials from %s (%s%s)", peer, _quoted(scheme[:20]),
                            f" user {_quoted(user[:100])}" if user else "")
                await asyncio.sleep(AUTH_FAILURE_DELAY)
            scheme_header = 'Basic realm="fastscp study browser", charset="UTF-8"' if settings.username else "Bearer"
            return text_response(401, "authentication required", (("WWW-Authenticate", scheme_header),))
        if request.method not in ("GET", "HEAD"):
            return text_response(405, f"method {request.method[:20]} not allowed; use GET", (("Allow", "GET, HEAD"),))
        try:
            return await self._route(request, who, peer)
        except ServerUnavailable:
            return _error_page(503, "the index does not answer: the server's indexer is starting, stopping or "
                                    "restarting; try again in a moment")
        except BadSearch as exc:
            return _error_page(400, str(exc))
        except (QueryError, ConnectionError, OSError, msgspec.DecodeError) as exc:
            log.error("study browser: the index failed to answer %s: %s", request.path[:200], exc)
            return _error_page(502, "the index failed to answer; the server log says why")
        except Exception:
            log.exception("study browser: %s failed", request.path[:200])
            return _error_page(500, "the page failed; the server log says why")

    async def _route(self, request: Request, who: str, peer: str) -> Response | StreamResponse:
        path = request.path
        if path == "/studies":
            return await self.studies(request.query, who, peer)
        if path == "/patients":
            return await self.patients(request.query, who, peer)
        parts = path.split("/")  # "", "studies", UID[, ...]
        if parts[1] == "studies" and len(parts) >= 3:
            uid = parts[2]
            if len(parts) == 3 and uid.endswith(".zip") and is_uid(uid[:-4]):
                return await self.download(uid[:-4], who, peer)
            if is_uid(uid):
                if len(parts) == 3:
                    return await self.study(uid, who, peer)
                if len(parts) == 4 and parts[3] == "scansheet.png":
                    return await self.scansheet(uid, who, peer)
                if len(parts) == 5 and parts[3] == "thumbnails" and parts[4].endswith(".jpg") \
                        and is_uid(parts[4][:-4]):
                    return await self.thumbnail(uid, parts[4][:-4], who, peer)
        # Traversal attempts, encoded or not, and unknown UIDs all end here.
        return _error_page(404, "no such page or study")

    # -- queries

    def _query_now(self, request: QueryRequest) -> tuple[list[str], list[list[Any]]]:
        with QueryClient(self.settings.index_path, timeout=QUERY_TIMEOUT).query(request) as result:
            rows = []
            for row in result:
                rows.append(row)
                if request.limit and len(rows) >= request.limit:
                    break
            return result.columns, rows

    async def _query(self, level: str, conditions: list[Condition], keys: list[str],
                     limit: int) -> list[dict[str, Any]]:
        request = QueryRequest(level=level, conditions=conditions, keys=keys, limit=limit)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        columns, rows = await loop.run_in_executor(self.executor, self._query_now, request)
        return [dict(zip(columns, row, strict=True)) for row in rows]

    def _file(self, relative: str) -> str | None:
        """The real path of an indexed file (relative to the root, or absolute in sr_directory), if inside one."""
        settings = self.settings
        if os.path.isabs(relative):
            return inside(relative, settings.sr_root)
        return inside(os.path.join(settings.root, relative), settings.root)

    # -- pages

    async def _search(self, level: str, fields: dict[str, str], conditions: list[Condition], keys: list[str],
                      who: str, peer: str) -> tuple[list[dict[str, Any]], bool]:
        """(the first MAX_ROWS rows, whether there are more); the search logged."""
        rows = await self._query(level, conditions, keys, MAX_ROWS + 1)
        searched = ", ".join(f"{name}={_quoted(value)}" for name, value in fields.items() if value) or "everything"
        log.info("study browser: %s from %s searched %s (%s): %d shown", who, peer,
                 "patients" if level == "PATIENT" else "studies", searched, min(len(rows), MAX_ROWS))
        return rows[:MAX_ROWS], len(rows) > MAX_ROWS

    async def studies(self, query: str, who: str, peer: str) -> Response:
        fields = parse_search(query, STUDY_FIELDS)
        rows, more = await self._search("STUDY", fields, study_conditions(fields), _STUDY_KEYS, who, peer)
        lines = []
        for row in rows:
            uid = row["StudyInstanceUID"] or ""
            href = esc(_study_href(uid))
            lines.append(
                f'<tr><td><a href="{href}">{esc(format_name(row["PatientName"] or ""))}</a></td>'
                f'<td>{esc(row["PatientID"])}</td><td>{esc(format_date(row["PatientBirthDate"] or ""))}</td>'
                f'<td>{esc(format_date(row["StudyDate"] or ""))} {esc(format_time(row["StudyTime"] or ""))}</td>'
                f'<td>{esc(row["AccessionNumber"])}</td><td>{esc(row["ModalitiesInStudy"])}</td>'
                f'<td><a href="{href}">{esc(row["StudyDescription"])}</a></td>'
                f'<td class="num">{esc(row["NumberOfStudyRelatedSeries"])}</td>'
                f'<td class="num">{esc(row["NumberOfStudyRelatedInstances"])}</td>'
                f'<td class="num">{esc(human_bytes(int(row["Bytes"] or 0)))}</td>'
                f'<td><a href="{esc(_study_href(uid, ".zip"))}">zip</a></td></tr>')
        form = _search_form(fields, (("name", "Patient name", "search"), ("id", "Patient ID", "search"),
                                     ("accession", "Accession", "search"), ("modality", "Modality", "search"),
                                     ("from", "Study date from", "date"), ("to", "to", "date"),
                                     ("patient_id", "Patient ID exactly", "hidden")), "/studies")
        table = _table(("Patient", "Patient ID", "Birth date", "Study date", "Accession", "Modalities",
                        "Description", "Series", "Instances", "Size", ""), lines, "No study matches.", "study-list")
        body = (f'<section><h2>Studies</h2>{form}</section>\n<section><h2>Results <span class="note" id="count">'
                f"{esc(_count_note(len(rows), more))}</span></h2>{table}</section>")
        return _page("Studies", body)

    async def patients(self, query: str, who: str, peer: str) -> Response:
        fields = parse_search(query, PATIENT_FIELDS)
        conditions = [c for c in (_text_condition("PatientName", fields["name"]),
                                  _text_condition("PatientID", fields["id"])) if c]
        rows, more = await self._search("PATIENT", fields, conditions, _PATIENT_KEYS, who, peer)
        lines = []
        for row in rows:
            patient_id, name = row["PatientID"] or "", row["PatientName"] or ""
            # The patient's studies: by ID exactly, else (a patient without ID) by name.
            search = {"patient_id": patient_id} if patient_id else {"name": name}
            href = esc("/studies?" + urlencode(search))
            lines.append(
                f'<tr><td><a href="{href}">{esc(format_name(name))}</a></td><td>{esc(patient_id)}</td>'
                f'<td>{esc(format_date(row["PatientBirthDate"] or ""))}</td><td>{esc(row["PatientSex"])}</td>'
                f'<td class="num">{esc(row["NumberOfPatientRelatedStudies"])}</td>'
                f'<td class="num">{esc(row["NumberOfPatientRelatedInstances"])}</td>'
                f'<td class="num">{esc(human_bytes(int(row["Bytes"] or 0)))}</td></tr>')
        form = _search_form(fields, (("name", "Patient name", "search"), ("id", "Patient ID", "search")),
                            "/patients")
        table = _table(("Patient", "Patient ID", "Birth date", "Sex", "Studies", "Instances", "Size"), lines,
                       "No patient matches.", "patient-list")
        body = (f'<section><h2>Patients</h2>{form}</section>\n<section><h2>Results <span class="note" id="count">'
                f"{esc(_count_note(len(rows), more))}</span></h2>{table}</section>")
        return _page("Patients", body)

    async def _instances(self, uid: str) -> list[dict[str, Any]] | None:
        """The study's instances (series by number, instances by number); None when too many to list."""
        rows = await self._query("IMAGE", [Condition("StudyInstanceUID", uid)],
                                 _NODE_INSTANCE_KEYS if self.settings.remote else _INSTANCE_KEYS,
                                 MAX_STUDY_INSTANCES + 1)
        return None if len(rows) > MAX_STUDY_INSTANCES else rows

    def _summary(self, uid: str, header: dict[str, Any], instances: list[dict[str, Any]]) -> StudySummary:
        """The study as the scan sheet code sees it (series in order, instances with their files)."""
        series: dict[str, list[dict[str, Any]]] = {}
        for row in instances:
            series.setdefault(row["SeriesInstanceUID"], []).append(row)
        summaries = []
        for series_uid, members in series.items():
            first = members[0]
            summaries.append(SeriesSummary(
                series_instance_uid=series_uid, series_number=first["SeriesNumber"], modality=first["Modality"] or "",
                series_description=first["SeriesDescription"] or "",
                instances=tuple(InstanceSummary(path=self._absolute(m["Path"]), instance_number=m["InstanceNumber"],
                                                sop_instance_uid=m["SOPInstanceUID"] or "") for m in members)))
        return StudySummary(study_instance_uid=uid, patient_id=header["PatientID"] or "",
                            study_date=header["StudyDate"] or "", series=tuple(summaries))

    def _absolute(self, relative: str) -> str:
        return relative if os.path.isabs(relative) else os.path.join(self.settings.root, relative)

    def _sheet(self, summary: StudySummary) -> str | None:
        """The study's scan sheet PNG where the post-store stage writes it, if it is there (inside the root)."""
        if not summary.series:
            return None
        try:
            folder = sheet_folder(self.settings.root, self.settings.layout, summary)
        except ValueError:
            return None
        real = inside(os.path.join(folder, "scansheet.png"), self.settings.root)
        return real if real is not None and os.path.isfile(real) else None

    async def _header(self, uid: str) -> dict[str, Any] | None:
        rows = await self._query("STUDY", [Condition("StudyInstanceUID", uid)], _HEADER_KEYS, 1)
        return rows[0] if rows else None

    async def study(self, uid: str, who: str, peer: str) -> Response:
        header = await self._header(uid)
        if header is None:
            return _error_page(404, "no such page or study")
        instances = await self._instances(uid)
        log.info("study browser: %s from %s viewed study %s (patient ID %s)", who, peer, uid,
                 _quoted(header["PatientID"] or ""))
        date = " ".join(v for v in (format_date(header["StudyDate"] or ""), format_time(header["StudyTime"] or ""))
                        if v)
        facts = [("Patient", format_name(header["PatientName"] or "")), ("Patient ID", header["PatientID"]),
                 ("Birth date", format_date(header["PatientBirthDate"] or "")), ("Sex", header["PatientSex"]),
                 ("Study date", date), ("Description", header["StudyDescription"]),
                 ("Accession", header["AccessionNumber"]),
                 ("Referring physician", format_name(header["ReferringPhysicianName"] or "")),
                 ("Modalities", header["ModalitiesInStudy"]), ("Study UID", uid),
                 ("Instances", f"{header['NumberOfStudyRelatedInstances']} in "
                               f"{header['NumberOfStudyRelatedSeries']} series, "
                               f"{human_bytes(int(header['Bytes'] or 0))}")]
        facts_html = "".join(f"<dt>{esc(label)}</dt><dd>{esc(value)}</dd>" for label, value in facts)
        download = f'<p><a id="download" href="{esc(_study_href(uid, ".zip"))}">Download the study (zip)</a></p>'
        if instances is None:
            body = (f'<section><h2>Study</h2><dl id="study">{facts_html}</dl>{download}</section>'
                    f'<div class="alert warn">More than {MAX_STUDY_INSTANCES} instances: too many to list here.</div>')
            return _page("Study", body)
        summary = self._summary(uid, header, instances)
        loop = asyncio.get_running_loop()
        sheet = await loop.run_in_executor(self.executor, self._sheet, summary)
        if sheet:
            sheet_html = (f'<a href="{esc(_study_href(uid, "/scansheet.png"))}"><img class="sheet" id="scansheet" '
                          f'src="{esc(_study_href(uid, "/scansheet.png"))}" alt="scan sheet"></a>')
        else:
            sheet_html = ('<p class="empty" id="scansheet">No scan sheet yet: the server makes it once the study '
                          "has been quiet for scansheet.study_timeout seconds.</p>")
        lines = []
        for series in summary.series:
            thumbs = "".join(
                f'<img src="{esc(_study_href(uid, "/thumbnails/" + quote(i.sop_instance_uid) + ".jpg"))}" '
                f'alt="instance {esc(i.instance_number)}" loading="lazy">'
                for i in pick(series.instances, self.settings.thumbnails_per_series) if is_uid(i.sop_instance_uid))
            lines.append(
                f'<tr><td class="num">{esc(series.series_number)}</td><td>{esc(series.modality)}</td>'
                f'<td>{esc(series.series_description)}</td><td class="num">{series.instance_count}</td>'
                f'<td class="thumbs">{thumbs}</td></tr>')
        table = _table(("Series", "Modality", "Description", "Instances", "Thumbnails"), lines, "No series.",
                       "series-list")
        body = (f'<section><h2>Study</h2><dl id="study">{facts_html}</dl>{download}</section>\n'
                f"<section><h2>Series</h2>{table}</section>\n<section><h2>Scan sheet</h2>{sheet_html}</section>")
        return _page(f"Study {format_name(header['PatientName'] or '')}", body)

    async def _image(self, path: str | None, content_type: str) -> Response:
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(self.executor, _read_small, path) if path else None
        if data is None:
            return _error_page(404, "no such image")
        return Response(200, content_type, data, _PAGE_HEADERS)

    async def scansheet(self, uid: str, who: str, peer: str) -> Response:
        header = await self._header(uid)
        instances = await self._instances(uid) if header is not None else None
        if header is None or not instances:
            return _error_page(404, "no such page or study")
        log.debug("study browser: %s from %s fetched the scan sheet of study %s", who, peer, uid)
        loop = asyncio.get_running_loop()
        sheet = await loop.run_in_executor(self.executor, self._sheet, self._summary(uid, header, instances))
        return await self._image(sheet, "image/png")

    async def thumbnail(self, uid: str, sop_uid: str, who: str, peer: str) -> Response:
        rows = await self._query("IMAGE", [Condition("StudyInstanceUID", uid), Condition("SOPInstanceUID", sop_uid)],
                                 ["Path", "ThumbnailPath"], 1)
        if not rows:
            return _error_page(404, "no such image")
        log.debug("study browser: %s from %s fetched the thumbnail of %s", who, peer, sop_uid)
        root = self.settings.root
        made, stored = rows[0]["ThumbnailPath"] or "", rows[0]["Path"] or ""
        candidate = os.path.join(root, made) if made and not os.path.isabs(made) else ""
        if not candidate and stored and not os.path.isabs(stored):
            try:
                candidate = thumbnail_path(root, stored)
            except ValueError:
                candidate = ""
        path = inside(candidate, os.path.join(root, THUMBNAILS)) if candidate else None
        return await self._image(path, "image/jpeg")

    async def download(self, uid: str, who: str, peer: str) -> Response | StreamResponse:
        header = await self._header(uid)
        if header is None:
            return _error_page(404, "no such page or study")
        instances = await self._instances(uid)
        if instances is None:
            return _error_page(413, f"the study has more than {MAX_STUDY_INSTANCES} instances: too many for one "
                                    f"zip from the browser")
        if self.downloads >= MAX_DOWNLOADS:
            return text_response(503, f"{MAX_DOWNLOADS} studies are being downloaded; try again in a moment",
                                 (("Retry-After", "5"),))
        remote = self.settings.remote
        mine = "" if remote is None else remote.node
        # An instance kept on several nodes goes in once: this node's copy, else the first other's.
        own = {row["SOPInstanceUID"] for row in instances if (row.get("Node") or mine) == mine}
        files: list[tuple[str, str | None, Instance | None]] = []
        names = {self._zip_name(row["Path"] or "") for row in instances if (row.get("Node") or mine) == mine}
        for row in instances:
            relative = row["Path"] or ""
            node = row.get("Node") or mine
            if node == mine:
                files.append((self._zip_name(relative), self._file(relative), None))
                continue
            if row["SOPInstanceUID"] in own:
                continue
            own.add(row["SOPInstanceUID"])
            name = relative.lstrip("/")
            if name in names:
                name = f"{node}/{name}"  # another node's file at one of our names (another layout)
            names.add(name)
            files.append((name, None, Instance(row["SOPInstanceUID"], row["SOPClassUID"] or "",
                                               row["TransferSyntaxUID"] or "", relative, node,
                                               row["StudyInstanceUID"] or "", row["SeriesInstanceUID"] or "",
                                               row["CallingAETitle"] or "")))
        log.info("study browser: %s from %s downloaded study %s (patient ID %s, %d files)", who, peer, uid,
                 _quoted(header["PatientID"] or ""), len(files))
        disposition = f'attachment; filename="study-{uid}.zip"'
        return StreamResponse(200, "application/zip", _Download(self, self._zip(uid, files)),
                              (("Content-Disposition", disposition),))

    def _zip_name(self, relative: str) -> str:
        """A file's name in a study's zip: its path below the storage root (or sr_directory)."""
        if os.path.isabs(relative):
            return "sr_directory/" + os.path.relpath(relative, self.settings.sr_root or "/")
        return relative

    async def _zip(self, uid: str, files: list[tuple[str, str | None, Instance | None]]
                   ) -> AsyncGenerator[bytes, None]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes | None | BaseException] = asyncio.Queue()
        ahead = threading.Semaphore(ZIP_AHEAD)
        cancelled = threading.Event()
        out = _ChunkWriter(loop, queue, ahead, cancelled)
        thread = threading.Thread(target=_write_zip, args=(out, files, uid, self.settings.remote),
                                  name="fastscp-browser-zip", daemon=True)
        thread.start()
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                ahead.release()
        finally:
            cancelled.set()


class _Download:
    """A zip being sent: holds one of the :data:`MAX_DOWNLOADS` slots until closed (sent, cut off, or never begun)."""

    def __init__(self, browser: Browser, chunks: AsyncGenerator[bytes, None]) -> None:
        self.browser, self.chunks = browser, chunks
        browser.downloads += 1
        self.closed = False

    def __aiter__(self) -> _Download:
        return self

    async def __anext__(self) -> bytes:
        return await self.chunks.__anext__()

    async def aclose(self) -> None:
        await self.chunks.aclose()
        if not self.closed:
            self.closed = True
            self.browser.downloads -= 1


def _read_small(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_IMAGE_FILE:
                return None
            return f.read(MAX_IMAGE_FILE)
    except OSError:
        return None


class _Cancelled(Exception):
    """The client went away: stop making the zip."""


class _ChunkWriter(io.RawIOBase):
    """zipfile's output: bytes gathered into chunks handed to the event loop, at most ZIP_AHEAD of them unsent."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[bytes | None | BaseException],
                 ahead: threading.Semaphore, cancelled: threading.Event) -> None:
        super().__init__()
        self.loop, self.queue, self.ahead, self.cancelled = loop, queue, ahead, cancelled
        self.buffer = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.buffer += data
        while len(self.buffer) >= ZIP_CHUNK:
            self.send_chunk()
        return len(data)

    def send_chunk(self) -> None:
        """Hand the event loop up to ZIP_CHUNK bytes of the buffer, once fewer than ZIP_AHEAD wait."""
        if not self.buffer:
            return
        while not self.ahead.acquire(timeout=0.5):  # the client reads slowly: wait for it
            if self.cancelled.is_set():
                raise _Cancelled
        if self.cancelled.is_set():
            raise _Cancelled
        chunk = bytes(self.buffer[:ZIP_CHUNK])
        del self.buffer[:ZIP_CHUNK]
        self.loop.call_soon_threadsafe(self.queue.put_nowait, chunk)

    def finish(self, last: None | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, last)
        except RuntimeError:
            pass  # the monitor is stopping: its loop is closed, nobody waits


def _write_zip(out: _ChunkWriter, files: list[tuple[str, str | None, Instance | None]], uid: str,
               remote: FetchSettings | None = None) -> None:
    """Write the zip of ``files`` ((name in the zip, real path or None, another node's instance or None),
    in order) to ``out``.

    Files are stored, not compressed: they go out byte for byte, and most
    pixel data compresses little for the CPU it costs. Other nodes' files
    are read from shared storage or fetched from their node first
    (:class:`fastscp.net.fetch.RemoteFiles`, ``remote``). A file that can't
    be read (removed since it was indexed, its node down) is named in
    ``fastscp-missing.txt`` at the end instead: the response has begun, its
    status can't change.
    """
    missing: list[str] = []
    others = [instance for _name, _path, instance in files if instance is not None]
    fetched = None
    if others and remote is not None:
        from fastscp.net.fetch import RemoteFiles

        fetched = RemoteFiles(remote, others)
    try:
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True, strict_timestamps=False) as archive:
            for name, path, instance in files:
                if instance is not None:
                    local = fetched.local(instance) if fetched is not None else "its node is unknown here"
                    if isinstance(local, str):
                        missing.append(f"{name}: {local}")
                        continue
                    path = local.path
                if path is None:
                    missing.append(f"{name}: not inside the storage root")
                    continue
                try:
                    source = open(path, "rb")
                except OSError as exc:
                    missing.append(f"{name}: {exc.strerror}")
                    continue
                with source:
                    stat = os.fstat(source.fileno())
                    info = zipfile.ZipInfo(name, time.localtime(stat.st_mtime)[:6])
                    info.file_size = stat.st_size  # decides ZIP64 for a large file
                    info.external_attr = 0o640 << 16
                    with archive.open(info, "w") as target:
                        while chunk := source.read(ZIP_CHUNK):
                            target.write(chunk)
                if fetched is not None and instance is not None:
                    fetched.done(instance)
            if missing:
                log.warning("study browser: zip of study %s without %d files: %s", uid, len(missing),
                            "; ".join(missing[:10]))
                archive.writestr("fastscp-missing.txt", "Files of this study the index names but that could not "
                                 "be read:\n" + "".join(f"{line}\n" for line in missing))
        while out.buffer:
            out.send_chunk()
        if fetched is not None:
            fetched.close()  # before the response ends: the client that has the zip finds no fetched file left
        out.finish(None)
    except _Cancelled:
        log.info("study browser: zip of study %s stopped: the client went away", uid)
    except Exception as exc:  # noqa: BLE001 - reported to the response, which is cut off
        log.error("study browser: zip of study %s failed: %s", uid, exc)
        out.finish(exc)
    finally:
        if fetched is not None:
            fetched.close()
