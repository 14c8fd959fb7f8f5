"""storage.fsync, observed: strace counts the fsync calls a real server's workers make per store.

Under ``always`` every stored file is fsynced before its link into place, and
then its folder (the new directory entry); under ``never`` neither happens.
Trusting the configuration is not enough: these tests watch the system calls.
"""

from __future__ import annotations

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


def fsyncs_while_storing(server, files: list[str], tmp_path: Path) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    """(call, path) of every successful fsync/fdatasync the workers make while ``files`` are stored."""
    if shutil.which("strace") is None:
        pytest.fail("strace is not installed: run 'make setup' (Makefile APT_PACKAGES)")
    pids = worker_pids(server)
    assert len(pids) == 2, server.log_text()
    trace, errors = tmp_path / "strace.out", tmp_path / "strace.err"
    argv = ["strace", "-f", "-y", "-e", "trace=fsync,fdatasync", "-o", str(trace)]
    for pid in pids:
        argv += ["-p", str(pid)]
    with open(errors, "w") as err:
        tracer = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    try:
        # Each worker is attached ("Process N attached [with M threads]") before a store is sent.
        wait_until(lambda: errors.read_text().count("attached") >= len(pids) or tracer.poll() is not None,
                   what="strace to attach")
        assert tracer.poll() is None, errors.read_text()
        dcmtk("storescu", "-aec", server.ae_title, "-xe", "127.0.0.1", str(server.port), *files)
        wait_until(lambda: len(server.stored_files()) == len(files), what="the stored files")
        time.sleep(0.2)  # strace writes each line as the call returns
    finally:
        tracer.terminate()
        tracer.wait(30)
    calls = []
    for line in trace.read_text().splitlines():
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
