"""Signals, dying workers, full disks and huge objects: nothing lost, no partial files."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from fastscp.dicom.part10 import dataset_offset
from fastscp.dicom.synthetic import write_large_multiframe, write_series
from fastscp.net.scu import associate
from tests.conftest import wait_until
from tests.e2e.test_server import fastscp
from tests.rawscu import RawSCU

pytestmark = pytest.mark.dcmtk


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory) -> tuple[str, bytes]:  # type: ignore[no-untyped-def]
    """A 512x512 CT: its SOP Instance UID and data set bytes."""
    (path,) = write_series(str(tmp_path_factory.mktemp("ct1")), 1)
    raw = Path(path).read_bytes()
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID), raw[dataset_offset(raw):]


def incoming(server) -> list[Path]:  # type: ignore[no-untyped-def]
    """Temp files holding (part of) a data set. An association also keeps
    one empty temp file ready for its next C-STORE; that one holds nothing."""
    found = []
    for path in (server.storage / ".incoming").iterdir():
        try:
            if path.stat().st_size > 0:
                found.append(path)
        except FileNotFoundError:
            pass
    return found


def refuses_connections(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_sigterm_lets_the_open_association_finish(server, ct_file) -> None:  # type: ignore[no-untyped-def]
    uid, data = ct_file
    scu = RawSCU(server.port, CTImageStorage, ExplicitVRLittleEndian)
    scu.begin_store(uid)
    half = len(data) // 2
    scu.send_data(data[:half], last=False)
    wait_until(lambda: incoming(server), what="the temp file")
    server.signal(signal.SIGTERM)
    wait_until(lambda: refuses_connections(server.port), what="the listener to close")
    assert server.process.poll() is None, "must wait for the open association"
    assert server.stored_files() == [], "no partial file at a final path"
    scu.send_data(data[half:], last=True)
    assert scu.read_status() == 0
    scu.release()
    assert server.process.wait(30) == 0
    (stored,) = server.stored_files()
    assert stored.read_bytes()[dataset_offset(stored.read_bytes()):] == data
    # Not even the empty temp file kept ready for a next C-STORE stays behind.
    assert list((server.storage / ".incoming").iterdir()) == []


def test_second_signal_stops_at_once_without_partial_files(server, ct_file) -> None:  # type: ignore[no-untyped-def]
    uid, data = ct_file
    scu = RawSCU(server.port, CTImageStorage, ExplicitVRLittleEndian)
    scu.begin_store(uid)
    scu.send_data(data[: len(data) // 2], last=False)
    wait_until(lambda: incoming(server), what="the temp file")
    server.signal(signal.SIGINT)
    wait_until(lambda: "stopping:" in server.log_text(), what="graceful stop to begin")
    server.signal(signal.SIGINT)
    assert server.process.wait(15) == 0
    assert "stopping now" in server.log_text()
    assert server.stored_files() == []
    assert incoming(server) == []
    with pytest.raises((ConnectionError, OSError)):
        scu.send_data(data[len(data) // 2 :], last=True)
        scu.read_status()
    scu.close()


def _worker_pids(server) -> dict[int, int]:  # type: ignore[no-untyped-def]
    return server.worker_pids()


def test_a_dying_worker_is_replaced_and_only_its_association_aborts(start_server, ct_file) -> None:  # type: ignore[no-untyped-def]
    server = start_server(workers=2)
    pids = _worker_pids(server)
    assert len(pids) == 2
    ae = AE(ae_title="KILLTEST")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    first = associate(ae, "127.0.0.1", server.port, ae_title=server.ae_title)
    second = associate(ae, "127.0.0.1", server.port, ae_title=server.ae_title)
    assert first.is_established and second.is_established
    # Least-busy dispatch put one association on each worker; kill worker 0.
    os.kill(pids[0], signal.SIGKILL)
    wait_until(lambda: server.log_text().count("worker 0 started") == 2, what="the replacement worker")
    dataset = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    outcomes = []
    for assoc in (first, second):
        status = assoc.send_c_store(dataset) if assoc.is_established else None
        outcomes.append(status is not None and "Status" in status and status.Status == 0)
        if assoc.is_established:
            assoc.release()
    assert sorted(outcomes) == [False, True], "exactly the killed worker's association aborts"
    third = associate(ae, "127.0.0.1", server.port, ae_title=server.ae_title)
    assert third.is_established
    assert third.send_c_store(dataset).Status == 0
    third.release()
    assert "worker 0 (pid" in server.log_text() and "restarting it" in server.log_text()
    assert server.stop() == 0


def test_full_disk_answers_out_of_resources_and_keeps_running(start_server, small_disk, tmp_path, ct_file) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "no-watermark.yaml"
    config.write_text("storage:\n  min_free_bytes: 0\n")  # the disk itself must fill up
    server = start_server(storage=small_disk / "received", config=config)
    big = write_series(str(tmp_path / "big"), 1, rows=1500, columns=1500)[0]  # 4.5 MB > 3 MB disk
    raw = Path(big).read_bytes()
    scu = RawSCU(server.port, CTImageStorage, ExplicitVRLittleEndian)
    status = scu.store(str(pydicom.dcmread(big, stop_before_pixels=True).SOPInstanceUID), raw[dataset_offset(raw):])
    assert status == 0xA700
    assert incoming(server) == [], "the temp file is removed at once"
    assert server.stored_files() == []
    # Space is there for a small object: the same association carries on.
    uid, data = ct_file
    assert scu.store(uid, data) == 0
    scu.release()
    assert len(server.stored_files()) == 1
    assert server.stop() == 0


def _sha256(path: Path, offset: int = 0) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


def test_one_gib_object_streams_to_disk(start_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = start_server("--fsync", "never", workers=1)
    source = Path(write_large_multiframe(str(tmp_path / "big.dcm"), 1 << 30))
    try:
        result = fastscp("send", "127.0.0.1", str(server.port), str(source), "--aec", server.ae_title, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        (stored,) = server.stored_files()
        head_a, head_b = source.read_bytes()[:4096], stored.read_bytes()[:4096]
        assert _sha256(stored, dataset_offset(head_b)) == _sha256(source, dataset_offset(head_a))
        (worker,) = _worker_pids(server).values()
        peak = _peak_rss_mb(worker)
        # A memory bound, not a speed one: the object must never be in memory.
        assert peak < 200, f"worker peak RSS {peak:.0f} MB for a 1 GiB object"
    finally:
        source.unlink()
        for path in server.stored_files():
            path.unlink()
