"""A supervisor that dies without stopping: its children go with it, a restart works at once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from fastscp.dicom.part10 import dataset_offset
from fastscp.dicom.synthetic import write_series
from fastscp.net.scu import associate
from tests.conftest import wait_until
from tests.e2e.test_server import fastscp
from tests.rawscu import RawSCU

pytestmark = pytest.mark.dcmtk

#: Every child must be gone this long after the supervisor's death.
CHILDREN_GONE_WITHIN = 10.0


@pytest.fixture(scope="module")
def ct_pair(tmp_path_factory) -> list[tuple[str, bytes]]:  # type: ignore[no-untyped-def]
    """Two 512x512 CTs: (SOP Instance UID, data set bytes) each."""
    out = []
    for path in write_series(str(tmp_path_factory.mktemp("crash")), 2):
        raw = Path(path).read_bytes()
        out.append((str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID), raw[dataset_offset(raw):]))
    return out


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for init to reap it counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


# SIGKILL, and a signal the supervisor does not handle (its default action ends the process).
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGUSR1], ids=["SIGKILL", "SIGUSR1"])
def test_a_dead_supervisor_takes_its_children_and_a_restart_reconciles(start_server, ct_pair, signum) -> None:  # type: ignore[no-untyped-def]
    (stored_uid, stored_data), (partial_uid, partial_data) = ct_pair
    server = start_server(workers=2, monitor="127.0.0.1:0")
    scu = RawSCU(server.port, CTImageStorage, ExplicitVRLittleEndian)
    assert scu.store(stored_uid, stored_data) == 0
    scu.release()
    # Open associations when it dies: one idle, one half-way through an object.
    ae = AE(ae_title="CRASHTEST")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    idle = associate(ae, "127.0.0.1", server.port, ae_title=server.ae_title)
    assert idle.is_established
    partial = RawSCU(server.port, CTImageStorage, ExplicitVRLittleEndian)
    partial.begin_store(partial_uid)
    partial.send_data(partial_data[: len(partial_data) // 2], last=False)
    server.wait_for_log("monitor started", "post-store stage started", "indexer started")
    children = server.children()
    assert len(children) == 5, f"2 workers, indexer, post-store, monitor: {children}"

    os.kill(server.process.pid, signum)
    assert server.process.wait(10) == -signum
    started = time.monotonic()
    wait_until(lambda: not any(alive(pid) for pid in children), timeout=CHILDREN_GONE_WITHIN,
               what=f"children {children} to die with the supervisor")
    print(f"children gone {time.monotonic() - started:.2f} s after the supervisor")  # shown with -s
    partial.close()
    idle.abort()

    # The index file of the dead server: read from the file, no running server claimed.
    result = fastscp("stats", "--index-db", str(server.index))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "server stopped: read from the file" in result.stdout
    assert "server running" not in result.stdout

    # A new server on the same storage and index starts at once and reconciles.
    again = start_server(storage=server.storage, workers=1)
    again.wait_for_log("reconcile:", timeout=30)
    result = fastscp("query", "instances", "--index-db", str(again.index), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert stored_uid in result.stdout
    assert partial_uid not in result.stdout
    (final,) = again.stored_files()
    assert final.read_bytes()[dataset_offset(final.read_bytes()):] == stored_data
    assert list((again.storage / ".incoming").iterdir()) == [] or all(
        p.stat().st_size == 0 for p in (again.storage / ".incoming").iterdir()
    ), "the half-received object's temp file is gone"
    assert again.stop() == 0


# A grandchild of the script calls die_with_parent for its parent `mid`, either
# after `mid` is gone (the race) or before `mid` exits; it reports "survived"
# on the pipe only if it is still running 5 s later.
_ORPHAN_SCRIPT = """
import os, signal, sys, time
from fastscp.process.orphan import die_with_parent
parent_dies_first = sys.argv[1] == "late"
r, w = os.pipe()
mid = os.fork()
if mid == 0:
    parent = os.getpid()
    if os.fork() == 0:
        if parent_dies_first:
            while os.getppid() == parent:
                time.sleep(0.01)
        die_with_parent(parent, signal.SIGKILL)
        os.write(w, b"armed;")
        time.sleep(5)
        os.write(w, b"survived")
        os._exit(0)
    if not parent_dies_first:
        time.sleep(0.5)
    os._exit(0)
os.close(w)
os.waitpid(mid, 0)
out = b""
while chunk := os.read(r, 100):
    out += chunk
print(out.decode() or "exited")
"""


@pytest.mark.parametrize("when", ["late", "early"])
def test_die_with_parent_also_when_the_parent_died_first(when) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", _ORPHAN_SCRIPT, when], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    # late: it exits inside die_with_parent; early: the kernel kills it when its parent exits.
    assert result.stdout.strip() == ("exited" if when == "late" else "armed;"), result.stdout
    assert time.monotonic() - started < 4, "nobody waited for the 5 s sleep"
