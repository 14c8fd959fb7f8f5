"""storage.fsync, observed: strace counts the fsync calls a real server's workers make per store.

Under ``always`` every stored file is fsynced before its link into place, and
then its folder (the new directory entry); under ``never`` neither happens.
Trusting the configuration is not enough: these tests watch the system calls.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from fastscp.dicom.synthetic import write_series
from tests.conftest import dcmtk, wait_until

pytestmark = pytest.mark.dcmtk

STORES = 3
# "1234  fsync(7</path/of/the/fd>) = 0" (strace -f -y)
_CALL = re.compile(r"^\d+\s+(fsync|fdatasync)\((\d+)<([^>]*)>\)\s+=\s+0")


def worker_pids(server) -> list[int]:  # type: ignore[no-untyped-def]
    return [int(pid) for pid in re.findall(r"worker \d+ started \(pid (\d+)\)", server.log_text())]


def trace_workers(server, store, tmp_path: Path, calls: str, *options: str) -> str:  # type: ignore[no-untyped-def]
    """The strace output (``-f -y``, ``trace=calls``) of the server's workers while ``store()`` runs."""
    if shutil.which("strace") is None:
        pytest.fail("strace is not installed: run 'make setup' (Makefile APT_PACKAGES)")
    pids = worker_pids(server)
    trace, errors = tmp_path / "strace.out", tmp_path / "strace.err"
    argv = ["strace", "-f", "-y", *options, "-e", f"trace={calls}", "-o", str(trace)]
    for pid in pids:
        argv += ["-p", str(pid)]
    with open(errors, "w") as err:
        tracer = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    try:
        # Each worker is attached ("Process N attached [with M threads]") before a store is sent.
        wait_until(lambda: errors.read_text().count("attached") >= len(pids) or tracer.poll() is not None,
                   what="strace to attach")
        assert tracer.poll() is None, errors.read_text()
        store()
        time.sleep(0.2)  # strace writes each line as the call returns
    finally:
        tracer.terminate()
        tracer.wait(30)
    return trace.read_text()


def fsyncs_while_storing(server, files: list[str], tmp_path: Path) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    """(call, path) of every successful fsync/fdatasync the workers make while ``files`` are stored."""
    assert len(worker_pids(server)) == 2, server.log_text()

    def store() -> None:
        dcmtk("storescu", "-aec", server.ae_title, "-xe", "127.0.0.1", str(server.port), *files)
        wait_until(lambda: len(server.stored_files()) == len(files), what="the stored files")

    calls = []
    for line in trace_workers(server, store, tmp_path, "fsync,fdatasync").splitlines():
        match = _CALL.match(line)
        if match and match.group(3).startswith(str(server.storage)):
            calls.append((match.group(1), match.group(3)))
    return calls


@pytest.fixture
def series(tmp_path: Path) -> list[str]:
    return write_series(str(tmp_path / "ct"), STORES, rows=16, columns=16, patient_id="DURABLE")


def test_fsync_always_syncs_each_file_and_its_folder(start_server, tmp_path: Path, series: list[str]) -> None:  # type: ignore[no-untyped-def]
    server = start_server("--fsync", "always")
    calls = fsyncs_while_storing(server, series, tmp_path)
    incoming = str(server.storage / ".incoming") + "/"
    files = [path for _call, path in calls if path.startswith(incoming) and path.endswith(".part")]
    folders = [path for _call, path in calls if not path.startswith(incoming)]
    # Each data set, before the link into place ...
    assert len(files) == STORES and len(set(files)) == STORES, calls
    # ... and then the folder that holds its new name.
    stored = server.stored_files()
    assert sorted(folders) == sorted(str(p.parent) for p in stored), calls


def test_fsync_never_syncs_nothing(start_server, tmp_path: Path, series: list[str]) -> None:  # type: ignore[no-untyped-def]
    server = start_server("--fsync", "never")
    assert fsyncs_while_storing(server, series, tmp_path) == []


# "1234 1700000000.123456 linkat(AT_FDCWD, "a", AT_FDCWD, "b", 0) = 0 <0.000012>", or the same split in an
# "... <unfinished ...>" line and a "<... linkat resumed>...) = 0 <0.000012>" line (strace -f -ttt -T).
_LINE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(.*)$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_DONE = re.compile(r"\)\s+=\s+(-?\d+)(?: [^<]*)?\s+<(\d+\.\d+)>$")


def timed_calls(text: str) -> list[tuple[int, str, float, float, str]]:
    """(thread, call, start, end, its text: arguments and result) of each completed call of an strace log."""
    started: dict[int, tuple[str, float, str]] = {}
    calls = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        tid, at, rest = int(match.group(1)), float(match.group(2)), match.group(3)
        resumed = _RESUMED.match(rest)
        if rest.endswith("<unfinished ...>"):
            started[tid] = (rest.split("(", 1)[0], at, rest)
            continue
        if resumed is not None:
            if tid not in started:
                continue
            name, start, head = started.pop(tid)
            rest = head.removesuffix("<unfinished ...>") + resumed.group(2)
        else:
            name, start = rest.split("(", 1)[0], at
        done = _DONE.search(rest)
        if done is None or int(done.group(1)) < 0:
            continue
        calls.append((tid, name, start, start + float(done.group(2)), rest))
    return calls


def test_concurrent_stores_sync_each_entry_before_its_response(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Four associations of one worker storing into one folder at once: each C-STORE-RSP leaves only after
    its file was synced and a folder fsync that began after its link completed (whichever thread made it:
    the guard of any sharing of folder fsyncs, issue 13 lever 6)."""
    from tests.conftest import storescu_concurrently

    server = start_server("--fsync", "always", workers=1)
    series = write_series(str(tmp_path / "ct"), 80, rows=16, columns=16, patient_id="GROUP")
    batches = [series[i::4] for i in range(4)]

    def store() -> None:
        storescu_concurrently(server, batches, "-xe")
        wait_until(lambda: len(server.stored_files()) == len(series), what="the stored files")

    text = trace_workers(server, store, tmp_path, "fsync,fdatasync,link,linkat,sendto,sendmsg,write,writev",
                         "-yy", "-ttt", "-T", "-s", "4096")
    calls = timed_calls(text)
    storage = str(server.storage)
    links = [(tid, start, end, re.findall(r'"([^"]*)"', rest)) for tid, name, start, end, rest in calls
             if name in ("link", "linkat")]
    links = [(tid, start, end, paths[0], paths[1]) for tid, start, end, paths in links if len(paths) == 2
             and paths[1].startswith(storage + "/") and "/.incoming/" not in paths[1]]
    assert sorted(final for *_, final in links) == sorted(str(p) for p in server.stored_files()), text[-3000:]
    syncs = [(tid, start, end, rest.split("<", 1)[1].split(">", 1)[0]) for tid, name, start, end, rest in calls
             if name in ("fsync", "fdatasync")]
    responses = [(tid, start) for tid, name, start, _end, rest in calls
                 if name in ("sendto", "sendmsg", "write", "writev") and "<TCP:" in rest.split(",", 1)[0]]
    for tid, link_start, link_end, temp, final in links:
        folder = os.path.dirname(final)
        # The data set, by this thread, before its link ...
        assert any(t == tid and path == temp and end <= link_start for t, _s, end, path in syncs), (temp, text[-3000:])
        # ... and the folder, by any thread, in a fsync that began after the link, before the response.
        response = min((start for t, start in responses if t == tid and start >= link_end), default=None)
        assert response is not None, f"no response after the link of {final}"
        assert any(path == folder and start >= link_end and end <= response for _t, start, end, path in syncs), final
    assert server.stop() == 0
