"""The supervisor's log output per forwarded line (issue 13, lever 5: log records).

Run with ``pytest bench/test_bench_logs.py --benchmark-only``. With the
action log on, each stored object is a line a worker forwards to the
supervisor, which writes it to stderr and the log file
(:func:`fastscp.process.logs.receive`). A batch of 200 such lines through the
handlers :func:`~fastscp.process.logs.configure` makes, as ``receive`` writes
it (one write per handler), against a record at a time through ``handle``
(a write, a flush and for the file two ``stat`` and a ``seek`` per line).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from fastscp.process import logs

GROUP = "200 forwarded lines to stderr and the log file"
LINES = [logs._line_fields("fastscp.action", logging.INFO, 1_764_800_000 + i / 1000, "association-1",
                           f"stored PAT1/20261204_1.2.3/1_MR/1.2.840.113619.2.55.{i}.dcm (8576 bytes) from STORESCU")
         for i in range(200)]
BATCH = msgspec.msgpack.encode(LINES)
BEFORE: dict[str, float] = {}


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A child's end and the supervisor's, the supervisor's handlers as configure makes them (stderr
    written to a file here)."""
    root = logging.getLogger()
    saved = root.handlers[:]
    logs.configure(file=str(tmp_path / "fastscp.log"))
    stderr = open(tmp_path / "stderr.log", "w")  # noqa: SIM115 - closed below
    root.handlers[0].setStream(stderr)  # type: ignore[attr-defined]
    child, parent = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield child, parent
    for handler in root.handlers:
        handler.close()
    root.handlers[:] = saved
    stderr.close()
    child.close()
    parent.close()


def _record_at_a_time(parent: socket.socket) -> None:
    for fields in msgspec.msgpack.decode(parent.recv(262144)):
        record = logging.makeLogRecord(fields)
        for handler in logging.getLogger().handlers:
            handler.handle(record)


def _run(benchmark, supervisor, receive: Callable[[socket.socket], None]) -> None:  # type: ignore[no-untyped-def]
    child, parent = supervisor

    def one_batch() -> None:
        child.send(BATCH)
        receive(parent)

    benchmark.group = GROUP
    benchmark(one_batch)


def test_lines_a_record_at_a_time(benchmark, supervisor) -> None:  # type: ignore[no-untyped-def]
    _run(benchmark, supervisor, _record_at_a_time)
    if benchmark.stats is not None:
        BEFORE[GROUP] = benchmark.stats.stats.median


def test_lines_as_receive_writes_them(benchmark, capsys, supervisor) -> None:  # type: ignore[no-untyped-def]
    _run(benchmark, supervisor, logs.receive)
    if benchmark.stats is None or GROUP not in BEFORE:
        return
    now, before = benchmark.stats.stats.median, BEFORE[GROUP]
    benchmark.extra_info["x_vs_before"] = round(before / now, 2)
    with capsys.disabled():
        print(f"\n  {GROUP}: {now * 1e6 / 200:.2f} us a line, a record at a time {before * 1e6 / 200:.2f} us: "
              f"{before / now:.2f}x")
