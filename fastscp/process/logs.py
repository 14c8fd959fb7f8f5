"""Logging: plain or JSON lines, to stderr and optionally a rotating file.

Only the supervisor writes log output. Its children (workers, indexer,
monitor) forward each record over a Unix datagram socket, so the rotating
file has one writer and rotation never races between processes.

Loggers: ``fastscp.association`` (the connection log, one line per
association), ``fastscp.action`` (one line per stored object), and one per
component.

Messages carry values a peer chose (AE titles, UIDs, addresses, comments,
paths), so both formats write every control character of a message as a
visible escape (:func:`escape`): no peer can forge a log line.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable

import msgspec

from fastscp.process.batcher import Batcher

_FORWARDED = ("name", "levelno", "levelname", "created", "msecs", "process", "processName", "threadName")


#: C0 and C1 control characters, DEL, and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` with each control character written as ``\\xNN`` (``\\uNNNN``).

    A CR/LF in a calling AE title or a UID would otherwise start a line of
    the peer's making in the log; a terminal escape would act on the
    reader's terminal.
    """
    return _CONTROL.sub(_escaped, text) if _CONTROL.search(text) else text


class _SecondStamp:
    """A time format's text for a record's whole second, made once per second (PERF: ``strftime`` and
    ``localtime`` are most of a line's timestamp, and a busy server writes thousands a second)."""

    __slots__ = ("_convert", "_format", "_last")

    def __init__(self, convert: Callable[[float], time.struct_time], fmt: str) -> None:
        self._convert = convert
        self._format = fmt
        self._last = (-1, "")  # (second, text): one attribute, so threads never see a torn pair

    def __call__(self, created: float) -> str:
        second = int(created)
        last_second, text = self._last
        if second != last_second:
            text = time.strftime(self._format, self._convert(created))
            self._last = (second, text)
        return text


class PlainFormatter(logging.Formatter):
    """Timestamp, level, process, logger and the escaped message, one line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s [%(processName)s] %(name)s: %(message)s")
        self._stamp = _SecondStamp(self.converter, self.default_time_format)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self.default_msec_format % (self._stamp(record.created), record.msecs)

    def formatMessage(self, record: logging.LogRecord) -> str:
        # The record is shared by every handler: its fields with the message escaped (PERF: a dict
        # copied, not the LogRecord: ~4 us a line).
        values = record.__dict__.copy()
        values["message"] = escape(record.message)
        return self._fmt % values  # type: ignore[operator]

    def format(self, record: logging.LogRecord) -> str:
        # A traceback is the only multi-line part, and its exception message
        # may quote a peer: indent its lines so none can pass for a record.
        first, *rest = super().format(record).split("\n")
        return "\n".join([first, *(f"    {escape(line)}" for line in rest)])


class JSONFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._stamp = _SecondStamp(time.gmtime, "%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": f"{self._stamp(record.created)}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "pid": record.process,
            "message": escape(record.getMessage()),
        }
        exception = self.formatException(record.exc_info) if record.exc_info else record.exc_text
        if exception:
            # Line breaks kept (a traceback's own), every other control character escaped.
            entry["exception"] = "\n".join(escape(line) for line in exception.split("\n"))
        return msgspec.json.encode(entry).decode()


def _formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JSONFormatter()
    return PlainFormatter()


def configure(level: str = "INFO", fmt: str = "plain", file: str = "", max_bytes: int = 50 << 20,
              backups: int = 10) -> None:
    """Set up the supervisor's output: stderr, plus a rotating file if ``file``."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if file:
        handlers.append(logging.handlers.RotatingFileHandler(file, maxBytes=max_bytes, backupCount=backups,
                                                             encoding="utf-8"))
    root = logging.getLogger()
    for handler in handlers:
        handler.setFormatter(_formatter(fmt))
    root.handlers[:] = handlers
    set_level(level)


def set_level(level: str) -> None:
    """This process's log level (``logging.level``; a reload changes it live)."""
    logging.getLogger().setLevel(level)
    # pynetdicom's default handlers log (and copy) every dataset; the SCU
    # commands use it, so quieten it unless asked for DEBUG.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)


#: At most one "connection closed" line per address per this many seconds;
#: the next line counts the ones not logged.
DROP_LOG_INTERVAL = 5.0
#: Addresses a DropLog tracks at once; more are counted together.
DROP_LOG_ADDRESSES = 1024


class DropLog:
    """INFO lines for connections a server closes on a peer, rate-limited.

    A flood must not flood the log: the first drop from an address is logged
    at once; later ones within ``interval`` are counted, and :meth:`flush`
    (called now and then) logs them as one line when the interval ends.
    """

    def __init__(self, logger: logging.Logger, interval: float = DROP_LOG_INTERVAL) -> None:
        self.log = logger
        self.interval = interval
        #: address -> (quiet until, reasons of the drops not yet logged)
        self._quiet: dict[str, tuple[float, Counter[str]]] = {}

    def note(self, address: str, reason: str) -> None:
        if address not in self._quiet and len(self._quiet) >= DROP_LOG_ADDRESSES:
            address = "other addresses"
        entry = self._quiet.get(address)
        if entry is not None:
            entry[1][reason] += 1
            return
        self.log.info("connection from %s closed: %s", address, reason)
        self._quiet[address] = (time.monotonic() + self.interval, Counter())

    def flush(self) -> None:
        """Log the counts of intervals that have ended."""
        now = time.monotonic()
        for address, (until, suppressed) in list(self._quiet.items()):
            if until > now:
                continue
            del self._quiet[address]
            if suppressed:
                self.log.info(
                    "connection from %s: %d more closed in the last %.0f s: %s", address, suppressed.total(),
                    self.interval, "; ".join(f"{n} as {reason}" for reason, n in suppressed.most_common()),
                )
                # Still busy: stay quiet for another interval.
                self._quiet[address] = (now + self.interval, Counter())


#: How long a child holds INFO records before sending them as one message.
FORWARD_INTERVAL = 0.1
#: At most this many records (or bytes) per message.
FORWARD_BATCH = 256
FORWARD_BYTES = 150_000
#: A longer message or traceback is cut here, so one record always fits a datagram.
MAX_FIELD_CHARS = 16_000


def _fields(record: logging.LogRecord) -> dict[str, object]:
    """What of a record travels to the supervisor (cut to fit a datagram)."""
    fields = {name: getattr(record, name) for name in _FORWARDED}
    fields["msg"] = record.getMessage()[:MAX_FIELD_CHARS]
    if record.exc_info:
        fields["exc_text"] = logging.Formatter().formatException(record.exc_info)[-MAX_FIELD_CHARS:]
    return fields


class ForwardHandler(logging.Handler):
    """In a child process: send records to the supervisor, batched.

    PERF: one datagram (and one supervisor wake-up) per record cost ~28% of
    the images/s of a single 512x512 CT association with the action log on
    (348 -> 483 img/s without it, bench.load ct-k1); INFO records now wait up
    to FORWARD_INTERVAL and travel together. WARNING and above go at once.
    """

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock
        #: Records' fields (:meth:`emit`), and lines (:meth:`forward`).
        self._batcher: Batcher[dict[str, object] | tuple[str, int, float, str, str]] = Batcher(
            self._send, interval=FORWARD_INTERVAL, max_items=FORWARD_BATCH, max_cost=FORWARD_BYTES,
            name="log-forwarder")
        #: Records dropped since the last message that went (guarded by the batcher's lock).
        self._dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = _fields(record)
        except Exception:
            self.handleError(record)
            return
        size = len(fields["msg"]) + len(fields.get("exc_text", "")) + 200
        self._batcher.add(fields, size, urgent=record.levelno >= logging.WARNING)

    def forward(self, name: str, levelno: int, message: str) -> None:
        """A line of logger ``name`` sent as :meth:`emit` sends a record's, without the record
        (:class:`Lines`). PERF: only what differs from line to line is taken here; the other fields
        LogRecord would have set are added as the batch goes (:func:`_line_fields`), where a batch's
        lines run through warm code: a line made alone at each store costs twice as much."""
        message = message[:MAX_FIELD_CHARS]
        line = (name, levelno, time.time(), threading.current_thread().name, message)
        self._batcher.add(line, len(message) + 200, urgent=levelno >= logging.WARNING)

    def flush(self) -> None:
        self._batcher.flush()

    def _send(self, items: list[dict[str, object] | tuple[str, int, float, str, str]]) -> bool:
        if not items:
            return True
        batch = [item if isinstance(item, dict) else _line_fields(*item) for item in items]
        dropped = self._dropped
        if dropped:
            batch = [_fields(logging.LogRecord(
                __name__, logging.WARNING, __file__, 0,
                "%d log records dropped: the supervisor did not read them in time", (dropped,), None)), *batch]
        try:
            # Never wait: a supervisor that does not read (stopped, or its log disk stalled) must not
            # hold up a worker's association thread, which sends a warning itself.
            self.sock.send(msgspec.msgpack.encode(batch), socket.MSG_DONTWAIT)
            self._dropped = 0
        except OSError:
            # Gone or not keeping up: dropped, counted, and told in the next message that goes.
            self._dropped += len(batch) - (1 if dropped else 0)
        return True  # nothing kept for a retry


def _line_fields(name: str, levelno: int, created: float, thread_name: str, message: str) -> dict[str, object]:
    """The fields LogRecord would set for a line of :meth:`ForwardHandler.forward`, as :func:`_fields` sends them."""
    process_name = "MainProcess"
    if (mp := sys.modules.get("multiprocessing")) is not None:
        process_name = mp.current_process().name
    return {
        "name": name, "levelno": levelno, "levelname": logging.getLevelName(levelno), "created": created,
        "msecs": int((created - int(created)) * 1000) + 0.0, "process": _pid, "processName": process_name,
        "threadName": thread_name, "msg": message,
    }


#: This process's PID in forwarded lines (LogRecord asks the kernel each time; set again in a forked child).
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def _sole_forwarder(logger: logging.Logger, levelno: int) -> ForwardHandler | None:
    """The ForwardHandler that alone would handle ``logger``'s records at ``levelno``: the root's only
    handler, no other handler or filter on the way. None otherwise (the supervisor's handlers, pytest's
    caplog)."""
    node: logging.Logger | None = logger
    while node is not None:
        if node.filters or not node.propagate and node.parent is not None:
            return None
        if node.parent is None:
            handlers = node.handlers
            if (len(handlers) == 1 and type(handlers[0]) is ForwardHandler and not handlers[0].filters
                    and handlers[0].level <= levelno):
                return handlers[0]
            return None
        if node.handlers:
            return None
        node = node.parent
    return None


class Lines:
    """INFO lines of the logger ``name``, as ``logging.getLogger(name).info`` writes them.

    PERF: a line per stored object (the action log) cost an association
    thread 20-37 us of CPU per store through logging (its LogRecord, the
    caller's frame, the handler chain), in a harness where a store costs
    ~180 us (bench.store_thread). In a child whose only handler is the
    ForwardHandler, a line goes to it straight (:meth:`ForwardHandler.forward`):
    the supervisor gets the same fields. Anything else on the way (a handler
    or filter of another kind) and the line takes logging's way.
    """

    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(name)

    def info(self, msg: str, *args: object) -> None:
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        handler = _sole_forwarder(logger, logging.INFO)
        if handler is None:
            logger.info(msg, *args, stacklevel=2)
        else:
            handler.forward(logger.name, logging.INFO, msg % args if args else msg)


def forward_to(sock: socket.socket) -> None:
    """Make every record of this (child) process go to the supervisor."""
    root = logging.getLogger()
    root.handlers[:] = [ForwardHandler(sock)]


def flush() -> None:
    """Send what a child still holds (before it exits)."""
    for handler in logging.getLogger().handlers:
        handler.flush()


def receive(sock: socket.socket) -> None:
    """In the supervisor: emit every forwarded record waiting on ``sock``."""
    while True:
        try:
            data = sock.recv(262144, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        try:
            batch = msgspec.msgpack.decode(data)
        except msgspec.DecodeError:
            continue
        records = [logging.makeLogRecord(fields) for fields in (batch if isinstance(batch, list) else ())]
        for handler in logging.getLogger().handlers:
            _handle_all(handler, [record for record in records if record.levelno >= handler.level])


#: The handlers :func:`configure` makes, which a forwarded batch reaches in one write each.
_BATCHED = (logging.StreamHandler, logging.handlers.RotatingFileHandler)


def _handle_all(handler: logging.Handler, records: list[logging.LogRecord]) -> None:
    """``records`` to ``handler``, as ``handler.handle`` would each.

    PERF: a batch of forwarded lines (one per stored object with the action log) went to each
    handler a line at a time: a write and a flush per line, and for the rotating file two
    ``stat`` and a ``seek`` more, and its line formatted twice: ~35 us per line for stderr and a
    file. :func:`configure`'s handlers get the batch's lines in one write (rotated before the line
    that would reach ``max_bytes``, as line by line); any other handler, or one with a filter,
    gets each record.
    """
    if not records:
        return
    if type(handler) not in _BATCHED or handler.filters:
        for record in records:
            handler.handle(record)
        return
    stream_handler: logging.StreamHandler = handler  # type: ignore[assignment]
    try:
        lines = [stream_handler.format(record) + stream_handler.terminator for record in records]
    except Exception:
        for record in records:  # the record that cannot be formatted is reported as handle would
            stream_handler.handle(record)
        return
    stream_handler.acquire()
    try:
        if isinstance(stream_handler, logging.handlers.RotatingFileHandler):
            _write_rotating(stream_handler, lines)
        else:
            stream_handler.stream.write("".join(lines))
        stream_handler.flush()
    except Exception:
        stream_handler.handleError(records[-1])
    finally:
        stream_handler.release()


def _write_rotating(handler: logging.handlers.RotatingFileHandler, lines: list[str]) -> None:
    """``lines`` to a rotating file, rolled over where ``shouldRollover`` would have for each line
    (the bytes in the file and the next line's characters against ``maxBytes``)."""
    if handler.stream is None:  # delay was set
        handler.stream = handler._open()
    # Never roll over anything but a regular file (bpo-45401, as the handler itself).
    rotating = handler.maxBytes > 0 and not (
        os.path.exists(handler.baseFilename) and not os.path.isfile(handler.baseFilename))
    size = 0
    if rotating:
        handler.stream.seek(0, 2)
        size = handler.stream.tell()
    pending: list[str] = []
    for line in lines:
        if rotating and size + len(line) >= handler.maxBytes:
            handler.stream.write("".join(pending))
            pending = []
            handler.doRollover()
            if handler.stream is None:
                handler.stream = handler._open()
            size = 0
        pending.append(line)
        size += len(line) if line.isascii() else len(line.encode(handler.encoding or "utf-8", "replace"))
    handler.stream.write("".join(pending))
