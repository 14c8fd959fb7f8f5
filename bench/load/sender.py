"""The load: K dcmtk ``storescu`` processes at once, each sending a slice.

storescu is driven as ``tests/corpus.py`` explains, so it sends every file
unchanged: an ``-xf`` config with one presentation context per (SOP class,
transfer syntax) of the corpus. Without ``-nh`` it stops at the first failed
C-STORE and exits 1, which the runner reports as an error.

Per-C-STORE latency: storescu logs through dcmtk's oflog (log4cplus); a
``-lc`` logger config with a microsecond time stamp pattern makes it print

    02:28:13.770.241 Sending Store Request (MsgID 1, CT)
    02:28:13.770.804 Received Store Response (Success)

The time from one to the other is the C-STORE as the sender sees it: the
data set leaving storescu until the response is decoded, receiver work and
TCP stalls included.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.load.corpora import SourceFile

LOG_CONFIG = """\
log4cplus.rootLogger = INFO, console
log4cplus.appender.console = log4cplus::ConsoleAppender
log4cplus.appender.console.layout = log4cplus::PatternLayout
log4cplus.appender.console.layout.ConversionPattern = %D{%H:%M:%S.%Q} %p %m%n
"""

_LINE = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3})\.(\d{3}) (\w+) (.*)$")


@dataclass
class StorescuLog:
    latencies: list[float] = field(default_factory=list)  # seconds per C-STORE
    successes: int = 0
    failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # E:/F: lines


def parse_storescu_log(text: str) -> StorescuLog:
    """Latencies and outcomes from storescu output under :data:`LOG_CONFIG`."""
    out = StorescuLog()
    sent_at: float | None = None
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        h, mi, s, ms, us = (int(x) for x in m.groups()[:5])
        level, message = m.group(6), m.group(7)
        t = h * 3600 + mi * 60 + s + ms / 1e3 + us / 1e6
        if message.startswith("Sending Store Request"):
            sent_at = t
        elif message.startswith("Received Store Response"):
            if sent_at is not None:
                out.latencies.append((t - sent_at) % 86400)  # across midnight
                sent_at = None
            if message.startswith("Received Store Response (Success"):
                out.successes += 1
            else:
                out.failures.append(message)
        elif level in ("ERROR", "FATAL"):
            out.errors.append(message)
    return out


def slices(files: list[SourceFile], k: int) -> list[list[SourceFile]]:
    """Split ``files`` into ``k`` slices, round-robin (each keeps the mix of the whole)."""
    k = max(1, min(k, len(files)))
    out: list[list[SourceFile]] = [[] for _ in range(k)]
    for i, f in enumerate(files):
        out[i % k].append(f)
    return out


def wait_all(procs: list[subprocess.Popen[bytes]], deadline: float) -> tuple[list[int], float]:
    """Wait for ``procs`` until ``deadline`` (time.perf_counter), then kill what is left: their exit
    codes in order, and when the last one exited or was killed (time.perf_counter).

    Exact to the moment of each exit: ``Popen.wait(timeout)`` polls with sleeps that double up to
    50 ms, so it saw an exit up to 50 ms late, half of a 0.1 s mixed-k4 run (its images/s fell on
    two values, ~1,200 and ~1,650, by that alone). A process's pidfd is readable once it has exited.
    """
    poller = select.poll()
    waiting: dict[int, subprocess.Popen[bytes]] = {}
    ended = time.perf_counter()
    try:
        for proc in procs:
            fd = os.pidfd_open(proc.pid)  # an exited, not yet reaped process has one too
            waiting[fd] = proc
            poller.register(fd, select.POLLIN)
        while waiting:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                for proc in waiting.values():
                    proc.kill()
                ended = time.perf_counter()  # a run cut at its deadline lasted until then
                break
            for fd, _events in poller.poll(max(1, int(remaining * 1000))):
                ended = time.perf_counter()
                poller.unregister(fd)
                os.close(fd)
                waiting.pop(fd).wait()
    except BaseException:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        raise
    finally:
        for fd in waiting:
            os.close(fd)
    return [proc.wait() for proc in procs], ended


@dataclass
class SendResult:
    wall_seconds: float
    exit_codes: list[int]
    log: StorescuLog
    sender_cpu_seconds: float
    logs: list[Path]


def send(port: int, ae_title: str, files: list[SourceFile], k: int, workdir: Path, *,
         nagle: bool, config: Path, profile: str, dimse_timeout: int = 120,
         timeout: float = 1800) -> SendResult:
    """Send ``files`` over ``k`` concurrent storescu associations; wait for all."""
    log_config = workdir / "storescu-log.cfg"
    log_config.write_text(LOG_CONFIG)
    env = dict(os.environ)
    env.pop("TCP_NODELAY", None)
    if not nagle:
        env["TCP_NODELAY"] = "1"
    procs: list[tuple[subprocess.Popen, Path, object]] = []
    before = os.times()
    t0 = time.perf_counter()
    for i, part in enumerate(slices(files, k)):
        argv = ["storescu", "-lc", str(log_config), "-aet", f"BENCHSCU{i}", "-aec", ae_title,
                "-xf", str(config), profile, "-to", "30", "-ta", "30", "-td", str(dimse_timeout),
                "127.0.0.1", str(port), *(f.path for f in part)]
        log = workdir / f"storescu-{i}.log"
        fh = open(log, "w")
        procs.append((subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                       env=env), log, fh))
    try:
        codes, ended = wait_all([proc for proc, _log, _fh in procs], t0 + timeout)
    finally:
        for _proc, _log, fh in procs:
            fh.close()  # type: ignore[attr-defined]
    wall = ended - t0
    after = os.times()
    merged = StorescuLog()
    for _proc, log, _fh in procs:
        parsed = parse_storescu_log(log.read_text(errors="replace"))
        merged.latencies += parsed.latencies
        merged.successes += parsed.successes
        merged.failures += parsed.failures
        merged.errors += parsed.errors
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return SendResult(wall, codes, merged, cpu, [log for _p, log, _f in procs])
