"""The duplicate check's "where is this instance?": new instances are known new from the indexer's
shared UID filter, resends ask over kept connections to the indexer's locate socket (one connection
serves many), an indexer killed and restarted is found again, and hostile local clients of the locate
socket do not delay the stores."""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import time
from pathlib import Path

import pydicom
import pytest

from fastscp.dicom.part10 import dataset_offset
from fastscp.dicom.synthetic import write_series
from fastscp.index.uidfilter import SIZE as UID_FILTER_BYTES
from fastscp.query.messages import ServerUnavailable, locate_address
from tests.conftest import wait_until
from tests.e2e.test_duplicates import _config, indexed
from tests.rawscu import RawSCU

pytestmark = pytest.mark.dcmtk

TEMPLATE = 'storage:\n  template: "{PatientID}/{SOPInstanceUID}.dcm"\n'


def locate_connections(server) -> set[int]:  # type: ignore[no-untyped-def]
    """Inodes of the indexer's ends of the connections open on the server's locate socket (/proc/net/unix)."""
    name = "@" + locate_address(str(server.index))[1:]
    connected = set()
    with open("/proc/net/unix") as table:
        for line in table.read().splitlines()[1:]:
            fields = line.split()
            # Num RefCount Protocol Flags Type St Inode Path: St 03 is connected; the listener is St 01.
            if len(fields) == 8 and fields[7] == name and fields[5] == "03":
                connected.add(int(fields[6]))
    return connected


def indexer_pid(server) -> int:  # type: ignore[no-untyped-def]
    """The running indexer's PID, from its latest start-up log line."""
    server.wait_for_log("indexer started")
    return int(re.findall(r"indexer started \(pid (\d+)\)", server.log_text())[-1])


def instance(tmp_path: Path, name: str) -> tuple[pydicom.Dataset, bytes]:
    (path,) = write_series(str(tmp_path / name), 1, rows=16, columns=16)
    raw = Path(path).read_bytes()
    return pydicom.dcmread(path), raw[dataset_offset(raw):]


def relabelled(tmp_path: Path, ds: pydicom.Dataset, patient_id: str) -> bytes:
    """The same instance (same SOP Instance UID), its Patient ID corrected: the layout names it elsewhere."""
    ds = ds.copy()
    ds.PatientID = patient_id
    path = tmp_path / f"{patient_id}.dcm"
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    return raw[dataset_offset(raw):]


def test_new_instances_ask_nothing_and_resends_share_one_kept_connection(  # type: ignore[no-untyped-def]
        start_server, tmp_path: Path) -> None:
    """New instances are checked against the indexer's shared UID filter: no question on the locate
    socket. Resends under another name do ask, all over one kept connection, and are found."""
    server = start_server("--duplicates", "keep-first", "--naming", "template", workers=1,
                          config=_config(tmp_path, TEMPLATE))
    server.wait_for_log("indexed SOP Instance UIDs read")
    series = [Path(p) for p in write_series(str(tmp_path / "ct"), 20, rows=16, columns=16)]
    datasets = [pydicom.dcmread(path) for path in series]
    scu = RawSCU(server.port, str(datasets[0].SOPClassUID), str(datasets[0].file_meta.TransferSyntaxUID))
    for ds, path in zip(datasets, series, strict=True):
        raw = path.read_bytes()
        assert scu.store(str(ds.SOPInstanceUID), raw[dataset_offset(raw):]) == 0
    assert locate_connections(server) == set(), "a new instance asked the indexer where it is stored"
    wait_until(lambda: indexed(server) == 20, what="the series in the index")

    assert scu.store(str(datasets[0].SOPInstanceUID), relabelled(tmp_path, datasets[0], "CORRECTED0")) == 0
    first = locate_connections(server)
    assert len(first) == 1, f"one connection kept open after the first resend: {first}"
    for n, ds in enumerate(datasets[1:6], start=1):
        assert scu.store(str(ds.SOPInstanceUID), relabelled(tmp_path, ds, f"CORRECTED{n}")) == 0
    scu.release()
    assert locate_connections(server) == first, "the same connection answered every resend"
    assert len(server.stored_files()) == 20, "each resend under another name was found as a duplicate"
    server.wait_for_log("6 duplicates)")


def filter_resident_kib(pid: int) -> int:
    """KiB of the shared UID filter's mapping resident in process ``pid`` (its pages mapped in)."""
    size_kib = -(-UID_FILTER_BYTES // 4096) * 4
    blocks = Path(f"/proc/{pid}/smaps").read_text().split("\n")
    (at,) = [i for i, line in enumerate(blocks) if line.split() == ["Size:", f"{size_kib}", "kB"]]
    (rss,) = [line.split()[1] for line in blocks[at:at + 5] if line.startswith("Rss:")]
    return int(rss)


def test_a_worker_maps_the_uid_filter_in_when_it_starts(start_server) -> None:  # type: ignore[no-untyped-def]
    """Not a page fault at each of its first few thousand stores (UidFilter.map_in)."""
    server = start_server(workers=1)
    (pid,) = server.worker_pids().values()
    # The supervisor logs the start as it forks: the worker maps the filter in a moment later.
    wait_until(lambda: filter_resident_kib(pid) * 1024 >= UID_FILTER_BYTES - 4096, timeout=5,
               what="the whole filter resident in the worker")


def test_duplicates_are_found_again_after_the_indexer_is_killed(  # type: ignore[no-untyped-def]
        start_server, tmp_path: Path) -> None:
    server = start_server("--duplicates", "keep-first", "--naming", "template", workers=1,
                          config=_config(tmp_path, TEMPLATE))
    ds, data = instance(tmp_path, "ct")
    scu = RawSCU(server.port, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
    assert scu.store(str(ds.SOPInstanceUID), data) == 0
    wait_until(lambda: indexed(server) == 1, what="the first copy in the index")

    old = indexer_pid(server)
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: not Path(f"/proc/{old}").exists() or "Z" in Path(f"/proc/{old}/stat").read_text().split()[2],
               what="the indexer gone")
    wait_until(lambda: server.log_text().count("indexer started") >= 2, timeout=60, what="the indexer restarted")
    wait_until(lambda: _indexed_if_up(server) == 1, timeout=60, what="the restarted indexer answering")
    wait_until(lambda: _locate_listening(server), what="the locate socket")

    # The same association (its worker's kept connection died with the old indexer): the same
    # instance under another layout name is still a duplicate, kept once.
    assert scu.store(str(ds.SOPInstanceUID), relabelled(tmp_path, ds, "CORRECTED")) == 0
    scu.release()
    assert len(server.stored_files()) == 1, "no second copy under the new name"
    server.wait_for_log("1 duplicates)")
    assert "can't say where SOP instances are stored" not in server.log_text()


def _indexed_if_up(server) -> int:  # type: ignore[no-untyped-def]
    try:
        return indexed(server)
    except (OSError, ServerUnavailable):
        return -1


def _locate_listening(server) -> bool:  # type: ignore[no-untyped-def]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(locate_address(str(server.index)))
        except OSError:
            return False
    return True


def test_hostile_locate_clients_do_not_delay_stores(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Local clients that connect to the locate socket and send nothing, half a message, garbage or a
    huge length: the stores' own questions are answered at once, and a duplicate under another name
    is still found."""
    server = start_server("--duplicates", "keep-first", "--naming", "template",
                          config=_config(tmp_path, TEMPLATE))
    ds, data = instance(tmp_path, "ct")
    hostile = []
    # More silent ones than the indexer had threads for locates before connections were kept (4).
    payloads = [b""] * 4 + [b"\x00\x00", b"\x00\x00\x00\x10garbage", struct.pack(">I", 1 << 30), b"\xff" * 64]
    for payload in payloads:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(locate_address(str(server.index)))
        sock.sendall(payload)
        hostile.append(sock)
    try:
        scu = RawSCU(server.port, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        started = time.monotonic()
        assert scu.store(str(ds.SOPInstanceUID), data) == 0
        assert time.monotonic() - started < 1.5, "the store waited behind a hostile locate client"
        wait_until(lambda: indexed(server) == 1, what="the first copy in the index")
        assert scu.store(str(ds.SOPInstanceUID), relabelled(tmp_path, ds, "CORRECTED")) == 0
        scu.release()
    finally:
        for sock in hostile:
            sock.close()
    assert len(server.stored_files()) == 1, "the resend under another name was found as a duplicate"
    server.wait_for_log("1 duplicates)")
    assert "can't say where SOP instances are stored" not in server.log_text()
