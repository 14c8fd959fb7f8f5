"""HTTP/1.1 messages for the monitor's small server: parsing a request head, encoding responses. No I/O.

:mod:`fastscp.monitor.server` adds the sockets and the status routes;
:mod:`fastscp.monitor.browser` answers the study browser's routes with these types.
"""

from __future__ import annotations

import email.utils
import http
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fastscp import __version__

#: A body on a GET is read and ignored up to this size; larger: 413.
MAX_REQUEST_BODY = 64 * 1024

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
HTML = "text/html; charset=utf-8"


class BadRequest(Exception):
    """A request we answer with ``status`` and then close the connection."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    version: str
    #: Header names in lower case; repeated headers joined with ", ".
    headers: dict[str, str]
    #: The query string after "?", still percent-encoded.
    query: str = ""

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens

    def body_length(self) -> int:
        """Bytes of body to read and discard (we serve no request bodies)."""
        if "transfer-encoding" in self.headers:
            raise BadRequest(501, "request bodies with Transfer-Encoding are not supported")
        value = self.headers.get("content-length", "0").strip()
        if not value.isdigit():
            raise BadRequest(400, "invalid Content-Length")
        if int(value) > MAX_REQUEST_BODY:
            raise BadRequest(413, "request body too large")
        return int(value)


def parse_request_head(head: bytes) -> Request:
    """Parse a request line and headers (ending in an empty line).

    Raises
    ------
    BadRequest
        Malformed line or header (400), an HTTP version other than 1.0/1.1 (505).
    """
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha():
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise BadRequest(505, f"HTTP version not supported: {version[:20]}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise BadRequest(400, "malformed header line")
        name = name.lower()
        headers[name] = f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
    # origin-form ("/status.json?x") or absolute-form ("http://host/status.json")
    parts = urlsplit(target) if target.startswith(("/", "http://", "https://")) else None
    path = parts.path if parts is not None else ""
    if parts is None or not path.startswith("/"):
        raise BadRequest(400, "malformed request target")
    return Request(method=method, path=path, version=version, headers=headers, query=parts.query)


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = field(default=())

    def encode(self, *, keep_alive: bool, head_only: bool = False) -> bytes:
        """The response as bytes on the wire (HTTP/1.1)."""
        head = _head(self.status, self.content_type, f"Content-Length: {len(self.body)}",
                     "keep-alive" if keep_alive else "close", self.headers)
        return head if head_only else head + self.body


def _head(status: int, content_type: str, framing: str, connection: str,
          headers: tuple[tuple[str, str], ...]) -> bytes:
    """A response's status line and headers; ``framing`` says where its body ends."""
    lines = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        f"Date: {email.utils.formatdate(usegmt=True)}",
        f"Server: fastscp/{__version__}",
        f"Content-Type: {content_type}",
        *([framing] if framing else []),
        # Always the live figures: no browser or proxy cache.
        "Cache-Control: no-store",
        "X-Content-Type-Options: nosniff",
        f"Connection: {connection}",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass(frozen=True)
class StreamResponse:
    """A response whose body is made while it is sent (a study's zip): chunked on HTTP/1.1, then closed.

    The chunked framing ends with a zero-length chunk only when ``chunks``
    ends normally, so a client can tell a cut-off body from a whole one.
    """

    status: int
    content_type: str
    chunks: AsyncIterator[bytes]
    headers: tuple[tuple[str, str], ...] = field(default=())

    def head(self, *, chunked: bool) -> bytes:
        # Without chunked framing (HTTP/1.0) the body ends where the connection does.
        return _head(self.status, self.content_type, "Transfer-Encoding: chunked" if chunked else "", "close",
                     self.headers)


def text_response(status: int, text: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, TEXT, (text + "\n").encode(), headers)
