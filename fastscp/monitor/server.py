"""The monitor process: serves the supervisor's status over HTTP.

The supervisor forks this process and sends it a
:class:`~fastscp.status.StatusSnapshot` (msgpack, one SOCK_SEQPACKET message)
about twice a second. The monitor keeps the latest one and answers, on
``monitor.listen``:

- ``GET /``             the live status page (:mod:`fastscp.monitor.page`)
- ``GET /status.json``  the latest snapshot as JSON
- ``GET /metrics``      Prometheus text format (:mod:`fastscp.monitor.metrics`)
- ``GET /healthz``      200 ``ok`` while fresh snapshots arrive and the server runs
- ``GET /studies``, ``/patients`` and below: the study browser
  (:mod:`fastscp.monitor.browser`), when the server gives the config

It runs apart from the supervisor so that a slow or hostile HTTP client can
never delay the supervisor's accept loop; the supervisor only ever does a
non-blocking send. The HTTP server is a small HTTP/1.1 implementation on
asyncio streams (uvloop): four read-only routes need no framework. Request
parsing (:mod:`fastscp.monitor.http`) and routing (:class:`Routes`) do no
I/O; :class:`MonitorServer` adds the sockets.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import msgspec
import uvloop

from fastscp.monitor import metrics
from fastscp.monitor import page as statuspage
from fastscp.monitor.http import (
    HTML,
    JSON,
    BadRequest,
    Request,
    Response,
    StreamResponse,
    parse_request_head,
    text_response,
)
from fastscp.process import logs
from fastscp.process.listen import bind_advice
from fastscp.status import DECODER, JSON_ENCODER, StatusSnapshot

if typing.TYPE_CHECKING:
    from fastscp.config import Config
    from fastscp.monitor.browser import Browser

log = logging.getLogger("fastscp.monitor")

#: ``monitor.listen`` when the config has none.
DEFAULT_LISTEN = "127.0.0.1:8080"
#: /healthz fails when the latest snapshot is older than this (the supervisor
#: sends one every 0.5 s, so 5 s means it is stuck or gone).
STALE_AFTER = 5.0
#: Request line plus headers; browsers send about 1 KiB.
MAX_REQUEST_HEAD = 16 * 1024
#: Concurrent HTTP connections. At the cap a new one closes the connection
#: that has waited longest with no request to answer (an idle keep-alive
#: one first, then one still sending its first request head), so slow or
#: idle clients can't keep /healthz from answering; when every connection
#: is being answered, the new one gets 503.
MAX_CONNECTIONS = 64
#: Deadline for a new connection's whole first request head (slow-header
#: clients are cut off here).
REQUEST_TIMEOUT = 10.0
#: A keep-alive connection gets this long to begin its next request (then
#: REQUEST_TIMEOUT for that request's whole head).
IDLE_TIMEOUT = 30.0
#: Largest snapshot message accepted; the kernel's SOCK_SEQPACKET limit (the
#: sender's SO_SNDBUF, ~208 KiB by default) is well below it.
MAX_SNAPSHOT = 4 * 1024 * 1024
#: How often the monitor checks that the supervisor is still its parent.
PARENT_CHECK_INTERVAL = 1.0



class ListenError(ValueError):
    """``monitor.listen`` can't be used; the message names it and says why."""


def parse_listen(listen: str) -> tuple[str, int]:
    """Split ``monitor.listen`` into host and port.

    Parameters
    ----------
    listen : str
        ``HOST:PORT``, ``[IPv6]:PORT``; port 0 means any free port.

    Returns
    -------
    tuple of (str, int)
        The host (IPv6 without brackets) and the port.

    Raises
    ------
    ListenError
        When it isn't of that form or the port is out of range.
    """
    hint = "expected HOST:PORT, for example 127.0.0.1:8080, 0.0.0.0:8080 or [::1]:8080"
    text = listen.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ListenError(f"monitor.listen {listen!r}: {hint}")
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or ":" in host:
            raise ListenError(f"monitor.listen {listen!r}: {hint} (write an IPv6 address in brackets)")
    if not host:
        raise ListenError(f"monitor.listen {listen!r}: the host is missing; {hint}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ListenError(f"monitor.listen {listen!r}: the port must be a number from 0 to 65535; {hint}")
    return host, int(port_text)


def format_url(host: str, port: int) -> str:
    """``http://HOST:PORT``, with an IPv6 host in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


# -- the snapshot --------------------------------------------------------------------


class SnapshotStore:
    """The latest snapshot, its JSON and when it arrived.

    Parameters
    ----------
    stale_after : float
        Seconds after which the snapshot no longer counts as healthy.
    clock : callable
        Monotonic seconds (a parameter so tests can move time).
    """

    def __init__(self, stale_after: float = STALE_AFTER, clock: Callable[[], float] = time.monotonic) -> None:
        self.stale_after = stale_after
        self.clock = clock
        self.snapshot: StatusSnapshot | None = None
        #: The snapshot encoded once when it arrives, not per request.
        self.json = b""
        self.received = 0.0

    def update(self, message: bytes | memoryview) -> None:
        """Take a message from the supervisor; a bad one raises and keeps the old."""
        snapshot = DECODER.decode(message)
        self.json = JSON_ENCODER.encode(snapshot)
        self.snapshot = snapshot
        self.received = self.clock()

    def health(self) -> tuple[bool, str]:
        """(healthy, why): fresh and running, or what is wrong."""
        if self.snapshot is None:
            return False, "no status snapshot yet: the server is starting"
        age = self.clock() - self.received
        if age > self.stale_after:
            return False, f"stale: the last status snapshot is {age:.1f} s old (the supervisor is stuck or gone)"
        if self.snapshot.state != "running":
            return False, f"state: {self.snapshot.state}"
        return True, "ok"


# -- routing, no I/O ------------------------------------------------------------------------


class Routes:
    """Request -> response, from the store's latest snapshot."""

    def __init__(self, store: SnapshotStore) -> None:
        self.store = store
        self.routes = {
            "/": self.page,
            "/index.html": self.page,
            "/status.json": self.status_json,
            "/metrics": self.metrics,
            "/healthz": self.healthz,
        }

    def respond(self, request: Request) -> Response:
        route = self.routes.get(request.path)
        if route is None:
            return text_response(404, f"not found; try / /status.json /metrics /healthz (got {request.path[:200]})")
        if request.method not in ("GET", "HEAD"):
            return text_response(405, f"method {request.method} not allowed; use GET", (("Allow", "GET, HEAD"),))
        return route()

    def page(self) -> Response:
        return Response(200, HTML, statuspage.PAGE, (("Content-Security-Policy", statuspage.CONTENT_SECURITY_POLICY),))

    def status_json(self) -> Response:
        if self.store.snapshot is None:
            body = msgspec.json.encode({"error": "no status snapshot yet: the server is starting"})
            return Response(503, JSON, body, (("Retry-After", "1"),))
        return Response(200, JSON, self.store.json)

    def metrics(self) -> Response:
        if self.store.snapshot is None:
            return text_response(503, "no status snapshot yet: the server is starting", (("Retry-After", "1"),))
        return Response(200, metrics.CONTENT_TYPE, metrics.render(self.store.snapshot).encode())

    def healthz(self) -> Response:
        healthy, reason = self.store.health()
        return text_response(200 if healthy else 503, reason)


# -- the process ---------------------------------------------------------------------------


@dataclass(eq=False)
class _Connection:
    writer: asyncio.StreamWriter
    peer: str
    #: "head": waiting for its first request head; "idle": keep-alive,
    #: waiting for the next one; "busy": being answered.
    state: str = "head"
    #: When it entered that state (monotonic).
    since: float = field(default_factory=time.monotonic)

    def enter(self, state: str) -> None:
        self.state, self.since = state, time.monotonic()


class MonitorServer:
    """The monitor's event loop work: snapshots in, HTTP out, until told to stop."""

    def __init__(self, snapshots: socket.socket, stale_after: float = STALE_AFTER,
                 browser: Browser | None = None) -> None:
        self.snapshots = snapshots
        self.store = SnapshotStore(stale_after)
        self.routes = Routes(self.store)
        self.browser = browser
        self.stopped = asyncio.Event()
        self.connections: dict[asyncio.Task, _Connection] = {}
        self.drops = logs.DropLog(log)
        self._buffer = bytearray(MAX_SNAPSHOT)
        self._parent = os.getppid()

    def stop(self, why: str) -> None:
        if not self.stopped.is_set():
            log.info("monitor stopping: %s", why)
            self.stopped.set()

    # -- snapshots from the supervisor

    def on_snapshots_readable(self) -> None:
        view = memoryview(self._buffer)
        while True:
            try:
                nbytes, _ancillary, flags, _address = self.snapshots.recvmsg_into([self._buffer])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.stop(f"snapshot socket failed: {exc}")
                return
            if flags & socket.MSG_TRUNC:
                log.error("status snapshot dropped: larger than %d bytes", MAX_SNAPSHOT)
                continue
            if nbytes == 0:
                self.stop("the supervisor closed the status socket")
                return
            try:
                self.store.update(view[:nbytes])
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.error("status snapshot dropped: cannot decode it: %s", exc)

    def flush_drops(self) -> None:
        self.drops.flush()
        asyncio.get_running_loop().call_later(1.0, self.flush_drops)

    def check_parent(self) -> None:
        # EOF on the socket is the normal signal; this catches a supervisor
        # that died while another process still holds its end of the pair.
        if os.getppid() != self._parent:
            self.stop("the supervisor is gone")
            return
        asyncio.get_running_loop().call_later(PARENT_CHECK_INTERVAL, self.check_parent)

    # -- HTTP

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        connection = _Connection(writer, str(peer[0]) if isinstance(peer, tuple) else "?")
        try:
            if len(self.connections) >= MAX_CONNECTIONS and not self._evict():
                self.drops.note(connection.peer, f"{MAX_CONNECTIONS} connections are being answered (503)")
                await _send(writer, text_response(503, "too many connections").encode(keep_alive=False))
                return
            self.connections[task] = connection
            await self._serve(reader, writer, connection)
        except TimeoutError:
            # An idle keep-alive connection timing out is the normal end of one.
            if connection.state == "head":
                self.drops.note(connection.peer, f"no whole request head within {REQUEST_TIMEOUT:.0f} s")
            elif connection.state == "busy":
                self.drops.note(connection.peer, f"the response was not read within {IDLE_TIMEOUT:.0f} s")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: nothing to answer
        finally:
            self.connections.pop(task, None)
            writer.close()

    def _evict(self) -> bool:
        """Close the connection that has waited longest without a request to
        answer, idle keep-alive ones first; False if every one is busy."""
        waiting = [c for c in self.connections.items() if c[1].state == "idle"]
        waiting = waiting or [c for c in self.connections.items() if c[1].state == "head"]
        if not waiting:
            return False
        task, victim = min(waiting, key=lambda c: c[1].since)
        del self.connections[task]
        # Its pending read ends with EOF, and its task closes and leaves.
        victim.writer.transport.abort()
        kind = "idle keep-alive connection" if victim.state == "idle" else "connection without a whole request head"
        self.drops.note(victim.peer, f"{kind}, closed for a new one at the cap of {MAX_CONNECTIONS}")
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     connection: _Connection) -> None:
        while not self.stopped.is_set():
            try:
                first = b""
                if connection.state == "idle":
                    # Keep-alive: up to IDLE_TIMEOUT to begin the next request...
                    async with asyncio.timeout(IDLE_TIMEOUT):
                        first = await reader.readexactly(1)
                    connection.enter("head")
                # ...and REQUEST_TIMEOUT for the whole head, however it trickles in.
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    head = first + await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                await _send(writer, text_response(431, "request head too large").encode(keep_alive=False))
                return
            except asyncio.IncompleteReadError:
                return  # closed between requests: the normal end of keep-alive
            connection.enter("busy")
            try:
                request = parse_request_head(head)
                length = request.body_length()
                if length:
                    async with asyncio.timeout(REQUEST_TIMEOUT):
                        await reader.readexactly(length)
            except BadRequest as exc:
                await _send(writer, text_response(exc.status, exc.reason).encode(keep_alive=False))
                return
            if self.browser is not None and self.browser.handles(request.path):
                response: Response | StreamResponse = await self.browser.respond(request, connection.peer)
            else:
                response = self.routes.respond(request)
            if isinstance(response, StreamResponse):
                await _send_stream(writer, response, request)
                return
            keep_alive = request.keep_alive and not self.stopped.is_set() and response.status != 401
            await _send(writer, response.encode(keep_alive=keep_alive, head_only=request.method == "HEAD"))
            if not keep_alive:
                return
            connection.enter("idle")

    async def run(self, listener: socket.socket, ready: Connection, url: str) -> None:
        loop = asyncio.get_running_loop()
        server = await asyncio.start_server(self.handle, sock=listener, limit=MAX_REQUEST_HEAD)
        self.snapshots.setblocking(False)
        loop.add_reader(self.snapshots.fileno(), self.on_snapshots_readable)
        loop.add_signal_handler(signal.SIGTERM, self.stop, "SIGTERM")
        loop.call_later(PARENT_CHECK_INTERVAL, self.check_parent)
        loop.call_later(1.0, self.flush_drops)
        ready.send(("ready", url))
        ready.close()
        log.info("monitor listening on %s (status page, /status.json, /metrics, /healthz)", url)
        await self.stopped.wait()
        loop.remove_reader(self.snapshots.fileno())
        server.close()
        for task in list(self.connections):
            task.cancel()
        await asyncio.gather(*self.connections, return_exceptions=True)
        await server.wait_closed()


async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    # A client that stops reading must not hold its connection slot forever.
    writer.write(data)
    async with asyncio.timeout(IDLE_TIMEOUT):
        await writer.drain()


async def _send_stream(writer: asyncio.StreamWriter, response: StreamResponse, request: Request) -> None:
    """Send a streamed response, then the connection closes.

    Each chunk waits for the client to take the one before (drain), so at
    most one chunk per connection sits in the transport; a body that fails
    half way aborts the connection without the final chunk.
    """
    chunked = request.version == "HTTP/1.1"
    try:
        await _send(writer, response.head(chunked=chunked))
        if request.method == "HEAD":
            return
        async for chunk in response.chunks:
            if chunked:
                # Size line, chunk, CRLF as they are: no copy of the chunk into a framed one.
                writer.write(b"%x\r\n" % len(chunk))
                writer.write(chunk)
                await _send(writer, b"\r\n")
            else:
                await _send(writer, chunk)
        if chunked:
            await _send(writer, b"0\r\n\r\n")
    except (TimeoutError, ConnectionError):
        writer.transport.abort()  # no final chunk: the client sees the body is incomplete
        raise
    except Exception as exc:  # the body failed half way (its maker logged why)
        log.error("%s: response cut off: %s", request.path[:200], exc)
        writer.transport.abort()
    finally:
        await response.chunks.aclose()  # type: ignore[attr-defined]


def bind(listen: str) -> socket.socket:
    """A listening TCP socket for ``monitor.listen``.

    Raises
    ------
    ListenError
        The address is malformed, can't be resolved or can't be bound; the
        message names ``monitor.listen`` and says why.
    """
    host, port = parse_listen(listen)
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"monitor.listen {listen!r}: cannot resolve {host!r}: {exc.strerror}") from None
    # One socket, the first address: "localhost" could resolve to both
    # 127.0.0.1 and ::1, and with port 0 they would get different ports.
    family, _type, _proto, _canonical, address = info[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # A restart must not wait for the previous process's TIME_WAIT sockets.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ListenError(
            f"monitor.listen {listen!r}: cannot listen on {format_url(host, port)}: {exc.strerror}; "
            + bind_advice(exc, port, "monitor.listen (or --monitor HOST:PORT)",
                          off="monitor.enabled: false (or --monitor off)")
        ) from None
    sock.setblocking(False)
    return sock


def monitor_main(listen: str, snapshots: socket.socket, ready: Connection, config: Config | None = None, *,
                 stale_after: float = STALE_AFTER) -> None:
    """Run the monitor process until SIGTERM or the supervisor is gone.

    Called in a child forked by the supervisor (no event loop is running);
    it makes its own uvloop loop.

    Parameters
    ----------
    listen : str
        ``monitor.listen``: ``HOST:PORT`` or ``[IPv6]:PORT``, port 0 for any.
    snapshots : socket.socket
        This process's end of a Unix SOCK_SEQPACKET pair; each message is
        ``fastscp.status.ENCODER.encode(snapshot)``. EOF means the supervisor
        is gone, and the monitor exits.
    ready : multiprocessing.connection.Connection
        Receives ``("ready", "http://HOST:PORT")`` with the bound port once
        listening, or ``("error", message)`` if it can't listen.
    config : Config, optional
        The server's config: with it, the study browser is served
        (:mod:`fastscp.monitor.browser`; its access rules depend on where
        the monitor listens).
    stale_after : float, optional
        Seconds without a new snapshot after which /healthz answers 503.

    Raises
    ------
    SystemExit
        With code 2 after reporting an error on ``ready``.
    """
    # The supervisor decides about Ctrl-C (it reaches the whole process
    # group); SIGTERM from it means stop. Until the loop handles SIGTERM
    # the default action is fine: there is nothing to flush.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        listener = bind(listen)
    except ListenError as exc:
        ready.send(("error", str(exc)))
        ready.close()
        raise SystemExit(2) from None
    host, port = listener.getsockname()[:2]
    url = format_url(host, port)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    browser = None
    if config is not None:
        from fastscp.monitor.browser import Browser  # it builds on this module's HTTP types

        browser = Browser.from_config(config, host)
    try:
        loop.run_until_complete(MonitorServer(snapshots, stale_after, browser).run(listener, ready, url))
    finally:
        if browser is not None:
            browser.close()
        asyncio.set_event_loop(None)
        loop.close()
        listener.close()
    log.info("monitor stopped")
