"""Logging: plain or JSON lines, to stderr and optionally a rotating file.

Only the supervisor writes log output. Its children (workers, indexer,
monitor) forward each record over a Unix datagram socket, so the rotating
file has one writer and rotation never races between processes.

Loggers: ``fastscp.association`` (the connection log, one line per
association), ``fastscp.action`` (one line per stored object), and one per
component.
"""

from __future__ import annotations

import logging
import logging.handlers
import socket
import sys
import time

import msgspec

_FORWARDED = ("name", "levelno", "levelname", "created", "msecs", "process", "processName", "threadName")


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return msgspec.json.encode(entry).decode()


def _formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JSONFormatter()
    return logging.Formatter("%(asctime)s %(levelname)s [%(processName)s] %(name)s: %(message)s")


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
    root.setLevel(level)
    # pynetdicom's default handlers log (and copy) every dataset; the SCU
    # commands use it, so quieten it unless asked for DEBUG.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)


class ForwardHandler(logging.Handler):
    """In a child process: send each record to the supervisor."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {name: getattr(record, name) for name in _FORWARDED}
            fields["msg"] = record.getMessage()
            if record.exc_info:
                fields["exc_text"] = logging.Formatter().formatException(record.exc_info)
            self.sock.send(msgspec.msgpack.encode(fields)[:200_000])
        except OSError:
            # The supervisor is gone or overwhelmed: don't block the worker.
            pass
        except Exception:
            self.handleError(record)


def forward_to(sock: socket.socket) -> None:
    """Make every record of this (child) process go to the supervisor."""
    root = logging.getLogger()
    root.handlers[:] = [ForwardHandler(sock)]


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
            fields = msgspec.msgpack.decode(data)
        except msgspec.DecodeError:
            continue
        record = logging.makeLogRecord(fields)
        for handler in logging.getLogger().handlers:
            if record.levelno >= handler.level:
                handler.handle(record)
