"""Child processes forward log records to the supervisor over a SOCK_SEQPACKET pair."""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading

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


@pytest.fixture
def collected():  # type: ignore[no-untyped-def]
    root = logging.getLogger()
    saved = root.handlers[:]
    collect = Collect()
    root.handlers[:] = [collect]
    yield collect.records
    root.handlers[:] = saved


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
