"""Child processes forward log records to the supervisor over a SOCK_SEQPACKET pair."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import logging.handlers
import socket
import sys
import threading
import time
from collections.abc import Iterator

import msgspec
import pytest

from fastscp.process import logs


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def pair():  # type: ignore[no-untyped-def]
    child, parent = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield child, parent
    child.close()
    parent.close()


@contextlib.contextmanager
def _root_handlers(*handlers: logging.Handler) -> Iterator[None]:
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = list(handlers)
    try:
        yield
    finally:
        root.handlers[:] = saved
        for handler in handlers:
            handler.close()


@pytest.fixture
def collected():  # type: ignore[no-untyped-def]
    collect = Collect()
    with _root_handlers(collect):
        yield collect.records


def record(message: str, level: int = logging.INFO, exc_info=None) -> logging.LogRecord:  # type: ignore[no-untyped-def]
    return logging.LogRecord("fastscp.test", level, __file__, 1, "%s", (message,), exc_info)


def test_info_records_wait_for_a_flush_and_travel_together(pair, collected) -> None:  # type: ignore[no-untyped-def]
    child, parent = pair
    handler = logs.ForwardHandler(child)
    handler.emit(record("first"))
    handler.emit(record("second"))
    logs.receive(parent)
    assert collected == []
    handler.flush()
    logs.receive(parent)
    assert [r.getMessage() for r in collected] == ["first", "second"]


def test_a_warning_goes_at_once_with_what_waited(pair, collected) -> None:  # type: ignore[no-untyped-def]
    child, parent = pair
    handler = logs.ForwardHandler(child)
    handler.emit(record("before"))
    handler.emit(record("disk full", logging.WARNING))
    logs.receive(parent)
    got = [(r.getMessage(), r.levelno) for r in collected]
    assert got == [("before", logging.INFO), ("disk full", logging.WARNING)]


def test_a_huge_message_and_traceback_arrive_cut_not_lost(pair, collected) -> None:  # type: ignore[no-untyped-def]
    child, parent = pair
    handler = logs.ForwardHandler(child)
    try:
        raise ValueError("x" * 500_000)
    except ValueError:
        handler.emit(record("y" * 500_000, logging.ERROR, sys.exc_info()))
    logs.receive(parent)
    (got,) = collected
    assert got.getMessage() == "y" * logs.MAX_FIELD_CHARS
    assert len(got.exc_text) == logs.MAX_FIELD_CHARS and got.exc_text.endswith("x" * 100)


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_a_peer_value_in_a_forwarded_traceback_cannot_forge_a_line(pair, fmt: str, capsys) -> None:  # type: ignore[no-untyped-def]
    """An exception message may quote a peer (an AE title, a UID): its CR/LF stay inside the record."""
    child, parent = pair
    logs.configure(fmt=fmt)
    try:
        logs.forward_to(child)
        try:
            raise ValueError("bad AE title 'EVIL\r\n2026-12-01 00:00:00,000 INFO [MainProcess] forged'")
        except ValueError:
            logging.getLogger("fastscp.association").exception("association from %s failed", "X\nFORGED")
        logs.flush()
        logs.configure(fmt=fmt)
        logs.receive(parent)
    finally:
        logs.configure()
    lines = capsys.readouterr().err.splitlines()
    if fmt == "json":
        # One line: the traceback's line breaks are inside a JSON string.
        (entry,) = [json.loads(line) for line in lines]
        assert entry["message"] == "association from X\\x0aFORGED failed"
        assert entry["exception"].endswith("'EVIL\\x0d\n2026-12-01 00:00:00,000 INFO [MainProcess] forged'")
    else:
        # The traceback's lines, the peer's among them, are indented: none passes for a record.
        assert lines[0].endswith("association from X\\x0aFORGED failed")
        assert all(line.startswith("    ") for line in lines[1:]) and len(lines) > 3
        assert lines[-2:] == ["    ValueError: bad AE title 'EVIL\\x0d",
                              "    2026-12-01 00:00:00,000 INFO [MainProcess] forged'"]


def test_a_supervisor_that_does_not_read_never_blocks_a_child_and_learns_what_was_dropped(
        collected) -> None:  # type: ignore[no-untyped-def]
    # The supervisor's end, as it makes it (runtime/supervisor.py), left unread: its queue fills.
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    handler = logs.ForwardHandler(child)
    done = threading.Event()

    def log_a_lot() -> None:
        for i in range(2000):  # a warning goes at once: 2,000 datagrams, far more than the queue holds
            handler.emit(record(f"warning {i}", logging.WARNING))
        done.set()

    threading.Thread(target=log_a_lot, daemon=True).start()
    try:
        assert done.wait(10), "a child's logging blocked on a supervisor that does not read"
        logs.receive(parent)  # what fitted
        kept = len(collected)
        assert 0 < kept < 2000
        handler.emit(record("after", logging.WARNING))
        logs.receive(parent)
        told = [r for r in collected[kept:] if r.levelno == logging.WARNING and "dropped" in r.getMessage()]
        assert [r.getMessage() for r in told] == [f"{2000 - kept} log records dropped: the supervisor did not "
                                                  "read them in time"]
        assert collected[-1].getMessage() == "after"
    finally:
        child.close()
        parent.close()



@contextlib.contextmanager
def _as_a_child(child: socket.socket) -> Iterator[list[logging.LogRecord]]:
    """This process as a child: the root's only handler is the ForwardHandler (pytest's own are
    set aside: they are added for the test's call, after its fixtures). Yields the LogRecords made
    meanwhile (logging's record factory, counted)."""
    root = logging.getLogger()
    saved, level, factory = root.handlers[:], root.level, logging.getLogRecordFactory()
    made: list[logging.LogRecord] = []

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        made.append(factory(*args, **kwargs))
        return made[-1]

    logs.forward_to(child)
    root.setLevel(logging.INFO)
    logging.setLogRecordFactory(counted)
    try:
        yield made
    finally:
        logging.setLogRecordFactory(factory)
        root.handlers[:] = saved
        root.setLevel(level)


def _received(parent: socket.socket) -> list[logging.LogRecord]:
    """What the supervisor's end gets of what this child's ForwardHandler holds."""
    logs.flush()
    collect = Collect()
    logging.getLogger().handlers[:] = [collect]
    logs.receive(parent)
    return collect.records


def test_a_line_goes_to_the_supervisor_as_logging_would_send_it(pair) -> None:  # type: ignore[no-untyped-def]
    """In a child, Lines makes no LogRecord, and the supervisor gets the fields logging would send."""
    child, parent = pair
    with _as_a_child(child) as made:
        logging.getLogger("fastscp.test-lines").info("%s %s (%d bytes)", "stored", "a/b.dcm", 12)
        assert len(made) == 1
        logs.Lines("fastscp.test-lines").info("%s %s (%d bytes)", "stored", "a/b.dcm", 12)
        assert len(made) == 1
        by_logging, by_lines = _received(parent)
    fields = ("name", "levelno", "levelname", "process", "processName", "threadName")
    assert [getattr(by_lines, f) for f in fields] == [getattr(by_logging, f) for f in fields]
    assert by_lines.getMessage() == by_logging.getMessage() == "stored a/b.dcm (12 bytes)"
    assert 0 <= by_lines.created - by_logging.created < 5 and by_lines.msecs == int(by_lines.msecs)


def test_lines_take_loggings_way_when_anything_else_would_see_them(pair) -> None:  # type: ignore[no-untyped-def]
    """Another handler (pytest's caplog, the supervisor's), a filter or a level: as logging decides."""
    child, parent = pair
    lines, logger = logs.Lines("fastscp.test-lines"), logging.getLogger("fastscp.test-lines")
    collect = Collect()
    with _as_a_child(child) as made:
        logger.addHandler(collect)  # a handler below the root
        lines.info("to both %d", 1)
        logger.removeHandler(collect)
        logger.addFilter(lambda r: "secret" not in r.getMessage())  # a filter on the way
        lines.info("a secret")
        lines.info("no filter stops %s", "this")
        logger.filters.clear()
        logger.setLevel(logging.WARNING)  # a level the line is below
        lines.info("below the level")
        logger.setLevel(logging.NOTSET)
        assert len(made) == 3
        assert [r.getMessage() for r in collect.records] == ["to both 1"]
        assert [r.getMessage() for r in _received(parent)] == ["to both 1", "no filter stops this"]


# -- the supervisor's side: a forwarded batch to its handlers ------------------------------


class _OldPlainFormatter(logs.PlainFormatter):
    """The oracle: PlainFormatter as it was before a batch went in one write (logging's own
    timestamp, the message escaped in a copy of the record)."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return logging.Formatter.formatTime(self, record, datefmt)

    def formatMessage(self, record: logging.LogRecord) -> str:
        escaped = logging.makeLogRecord(record.__dict__)
        escaped.message = logs.escape(record.message)
        return logging.Formatter.formatMessage(self, escaped)


class _CountedWrites(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def _forwarded_lines(count: int) -> list[dict[str, object]]:
    """Lines a child forwards, over several seconds, a few with a peer's control character or a
    patient's name in them, and one WARNING."""
    start = 1_764_800_000.25
    return [logs._line_fields("fastscp.action", logging.WARNING if i == 7 else logging.INFO,
                              start + i * 0.137, "association-3",
                              f"stored PAT{i}/Müller^Jörg/1_MR/1.2.840.{i}.dcm ({i * 97} bytes) from EVIL\r\nAE")
            for i in range(count)]


def _send_batch(child: socket.socket, batch: list[dict[str, object]]) -> None:
    child.send(msgspec.msgpack.encode(batch))


def test_a_forwarded_batch_reaches_each_handler_in_one_write(pair) -> None:  # type: ignore[no-untyped-def]
    """PERF: a line per stored object came to stderr and the log file a write (and flush) each."""
    child, parent = pair
    stream = _CountedWrites()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.PlainFormatter())
    with _root_handlers(handler):
        _send_batch(child, _forwarded_lines(50))
        logs.receive(parent)
    assert stream.writes == 1
    assert len(stream.getvalue().splitlines()) == 50


def test_a_forwarded_batch_is_written_and_rotated_as_line_by_line(pair, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Byte for byte what logging writes a record at a time: stderr, and a rotating file whose
    rollovers fall before the same lines (max_bytes small enough for several)."""
    child, parent = pair
    lines = _forwarded_lines(120)
    (tmp_path / "new").mkdir()
    (tmp_path / "old").mkdir()

    def handlers(folder: str, formatter: logging.Formatter) -> tuple[io.StringIO, logging.Handler, logging.Handler]:
        stream = io.StringIO()
        to_stream = logging.StreamHandler(stream)
        to_file = logging.handlers.RotatingFileHandler(tmp_path / folder / "fastscp.log", maxBytes=2500,
                                                       backupCount=50, encoding="utf-8")
        for handler in (to_stream, to_file):
            handler.setFormatter(formatter)
        return stream, to_stream, to_file

    new_stream, *new_handlers = handlers("new", logs.PlainFormatter())
    with _root_handlers(*new_handlers):
        _send_batch(child, lines[:70])  # two batches: the second appends to what the first left
        _send_batch(child, lines[70:])
        logs.receive(parent)
    old_stream, *old_handlers = handlers("old", _OldPlainFormatter())
    with _root_handlers(*old_handlers):
        for fields in lines:
            record = logging.makeLogRecord(fields)
            for handler in old_handlers:
                handler.handle(record)

    assert new_stream.getvalue() == old_stream.getvalue()
    assert "from EVIL\\x0d\\x0aAE" in new_stream.getvalue() and "Müller^Jörg" in new_stream.getvalue()
    files = sorted(p.name for p in (tmp_path / "old").iterdir())
    assert len(files) > 5 and files == sorted(p.name for p in (tmp_path / "new").iterdir())
    for name in files:
        assert (tmp_path / "new" / name).read_bytes() == (tmp_path / "old" / name).read_bytes(), name


def test_a_handler_with_a_filter_or_of_another_kind_gets_each_record(pair) -> None:  # type: ignore[no-untyped-def]
    child, parent = pair
    stream = _CountedWrites()
    filtered = logging.StreamHandler(stream)
    filtered.setFormatter(logs.PlainFormatter())
    filtered.addFilter(lambda record: "PAT3/" not in record.getMessage())
    collect = Collect()
    with _root_handlers(filtered, collect):
        _send_batch(child, _forwarded_lines(10))
        logs.receive(parent)
    assert stream.writes == 9 and "PAT3/" not in stream.getvalue()
    assert [r.getMessage().split("/")[0] for r in collect.records] == [f"stored PAT{i}" for i in range(10)]


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_each_lines_timestamp_is_its_own_second(fmt: str) -> None:
    """The timestamp's text is made once per second (PERF): records in other seconds get their own."""
    formatter = logs._formatter(fmt)
    for created in (1_764_800_000.001, 1_764_800_000.999, 1_764_800_001.5, 1_764_799_999.75, 1_764_800_000.5):
        record = logging.makeLogRecord({"msg": "x", "created": created, "msecs": (created - int(created)) * 1000,
                                        "levelname": "INFO", "name": "fastscp.test", "processName": "p"})
        if fmt == "json":
            stamp = json.loads(formatter.format(record))["time"]
            expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(record.msecs):03d}Z"
        else:
            stamp = formatter.format(record).split(" INFO ")[0]
            expected = logging.Formatter().formatTime(record)
        assert stamp == expected
