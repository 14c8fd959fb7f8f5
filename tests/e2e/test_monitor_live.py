"""The monitor of a real running server while stores run: the page in headless
Chromium, /metrics through a Prometheus parser, /healthz, ``fastscp status``."""

from __future__ import annotations

import json
import re
import select
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from fastscp.dicom.part10 import dataset_offset
from fastscp.dicom.synthetic import write_series
from tests.conftest import ARTIFACTS, dcmtk, wait_until
from tests.e2e.test_server import fastscp
from tests.rawscu import RawSCU
from tests.unit.monitor.test_monitor_page import chromium

pytestmark = pytest.mark.dcmtk


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def status(url: str) -> dict:  # type: ignore[type-arg]
    return json.loads(get(url + "/status.json")[1])


def test_status_page_metrics_and_cli_while_storing(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = start_server(monitor="127.0.0.1:0")
    url = server.monitor_url()
    series = write_series(str(tmp_path / "ct"), 5, rows=64, columns=64)
    dcmtk("storescu", "-aec", server.ae_title, "-aet", "FIRST_CT", "-xe", "127.0.0.1", str(server.port), *series)

    # An association that stays open, 3 instances in, while we look.
    scu = RawSCU(server.port, CTImageStorage, ExplicitVRLittleEndian, aet="OPEN_MR_3T")
    for path in write_series(str(tmp_path / "open"), 3, rows=32, columns=32, seed=7):
        raw = Path(path).read_bytes()
        assert scu.store(str(pydicom.dcmread(path).SOPInstanceUID), raw[dataset_offset(raw):]) == 0
    wait_until(lambda: any(a["instances"] == 3 for a in status(url)["open"]), what="the open association's report")

    snapshot = status(url)
    (open_assoc,) = snapshot["open"]
    assert open_assoc["calling_ae_title"] == "OPEN_MR_3T" and open_assoc["peer_address"].startswith("127.0.0.1:")
    assert snapshot["totals"]["instances"] == 8
    assert snapshot["per_calling_ae"] == {"FIRST_CT": 5, "OPEN_MR_3T": 3}
    assert snapshot["per_modality"] == {"CT": 8}
    assert [a["calling_ae_title"] for a in snapshot["recent"]] == ["FIRST_CT"]
    assert len(snapshot["workers"]) == 2 and all(w["alive"] for w in snapshot["workers"])
    assert snapshot["storage"]["free_bytes"] > 0

    assert get(url + "/healthz")[0] == 200
    families = {f.name: f for f in text_string_to_metric_families(get(url + "/metrics")[1])}
    stored = families["fastscp_instances_stored"].samples
    assert [s.value for s in stored if s.name == "fastscp_instances_stored_total"] == [8]
    latency = families["fastscp_store_latency_seconds"].samples
    assert [s.value for s in latency if s.name.endswith("_count")] == [8]
    assert [s.value for s in latency if s.labels.get("le") == "+Inf"] == [8]

    page = tmp_path / "status-page.png"
    dom = chromium(tmp_path, url + "/", "--dump-dom")
    chromium(tmp_path, url + "/", f"--screenshot={page}")
    assert "OPEN_MR_3T" in dom and "FIRST_CT" in dom
    assert page.stat().st_size > 10_000
    artifacts = ARTIFACTS
    artifacts.mkdir(exist_ok=True)
    shutil.copy(page, artifacts / "status-page-live.png")

    result = fastscp("status", "--url", url)
    assert result.returncode == 0, result.stderr
    assert "OPEN_MR_3T" in result.stdout
    as_json = json.loads(fastscp("status", "--url", url, "--json").stdout)
    assert as_json["totals"]["instances"] == 8

    scu.release()
    wait_until(lambda: status(url)["open"] == [], what="the association to end")
    assert status(url)["totals"]["associations"] == 2


def test_failures_duplicates_and_rejections_of_a_real_server_reach_the_status(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """What the status shows comes from real associations, not from a hand-made snapshot."""
    config = tmp_path / "fastscp.yaml"
    config.write_text("access:\n  allowed_calling_aets: [WARD_7]\n")
    server = start_server(monitor="127.0.0.1:0", config=config)
    url = server.monitor_url()
    (path,) = write_series(str(tmp_path / "ct"), 1, rows=32, columns=32)
    raw = Path(path).read_bytes()
    uid, data = str(pydicom.dcmread(path).SOPInstanceUID), raw[dataset_offset(raw):]

    scu = RawSCU(server.port, CTImageStorage, ExplicitVRLittleEndian, aet="WARD_7")
    assert scu.store(uid, data) == 0
    assert scu.store(uid, data) == 0  # a resend: acknowledged, counted as a duplicate
    assert scu.store("1.2.3.4.5", b"\x08\x00\x18\x00UI\xff\x7f" + b"1.2.3" * 10) == 0xC000
    scu.release()
    rejected = RawSCU(server.port, CTImageStorage, ExplicitVRLittleEndian, aet="INTRUDER")
    assert rejected.rejection is not None

    wait_until(lambda: status(url)["totals"]["rejected"] == 1 and status(url)["open"] == [],
               what="the rejection and the end of the association in the status")
    snapshot = status(url)
    totals = snapshot["totals"]
    assert (totals["instances"], totals["duplicates"], totals["failures"], totals["associations"]) == (2, 1, 1, 1)
    assert snapshot["per_calling_ae"] == {"WARD_7": 2}
    assert snapshot["rejects"] == {"calling AE title not recognized": 1}
    (recent,) = [a for a in snapshot["recent"] if a["calling_ae_title"] == "WARD_7" and a["instances"]]
    assert (recent["instances"], recent["failures"], recent["duplicates"]) == (2, 1, 1)
    assert len(server.stored_files()) == 1


def test_committed_counts_instances_not_records(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fastscp.query.client import QueryClient
    from fastscp.query.messages import QueryRequest

    # Thumbnails on (the default): each instance also sends a thumbnail record to the indexer.
    server = start_server(monitor="127.0.0.1:0")
    url = server.monitor_url()
    count = 12
    series = write_series(str(tmp_path / "ct"), count, rows=32, columns=32)
    dcmtk("storescu", "-aec", server.ae_title, "-xe", "127.0.0.1", str(server.port), *series)
    queries = QueryClient(str(server.index))

    def thumbnails_indexed() -> bool:
        with queries.query(QueryRequest(level="IMAGE", keys=["ThumbnailPath"])) as result:
            paths = [row[0] for row in result]
        return len(paths) == count and all(paths)

    wait_until(thumbnails_indexed, timeout=60, what="every instance and its thumbnail in the index")
    wait_until(lambda: queries.state().pending == 0, what="nothing left to commit")
    state = queries.state()
    # The indexer tells the supervisor its state every second: wait until the page shows it.
    wait_until(lambda: status(url)["index"]["committed"] == state.committed, what="the status page to catch up")
    assert status(url)["index"]["committed"] == count, f"{count} instances stored"
    assert state.committed == count


def _connect(port: int, request: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(request)
    return sock


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b"EOF"
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head)[1])  # type: ignore[index]
    while len(body) < length:
        body += sock.recv(65536)
    return head


def _idle_keep_alive(port: int, socks: list[socket.socket]) -> None:
    """A keep-alive connection (in ``socks``) that asked once and stays idle."""
    socks.append(_connect(port, b"GET /healthz HTTP/1.1\r\nHost: flood\r\n\r\n"))
    assert _read_response(socks[-1]).startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize("flood", ["slow-header", "idle-keep-alive"])
def test_healthz_answers_under_connection_floods(start_server, flood: str) -> None:  # type: ignore[no-untyped-def]
    """Issue 11.7: 70 slow-header or 66 idle keep-alive connections made /healthz answer 503."""
    server = start_server(monitor="127.0.0.1:0")
    url = server.monitor_url()
    port = int(url.rsplit(":", 1)[1])
    wait_until(lambda: get(url + "/healthz")[0] == 200, what="the first status snapshot")
    socks: list[socket.socket] = []
    try:
        if flood == "slow-header":
            # Request heads that never end, more than the monitor's connection cap.
            socks += [_connect(port, b"GET /healthz HTTP/1.1\r\nHost: flood\r\n") for _ in range(70)]
            evicted = "connection without a whole request head"
        else:
            for _ in range(66):
                _idle_keep_alive(port, socks)
            evicted = "idle keep-alive connection"
        assert get(url + "/healthz") == (200, "ok\n")
        # The other kind on top; every closed one is logged (rate-limited).
        if flood == "slow-header":
            for _ in range(66):
                _idle_keep_alive(port, socks)
        else:
            socks += [_connect(port, b"GET / HTTP/1.1\r\nHost: flood\r\n") for _ in range(70)]
        assert get(url + "/healthz") == (200, "ok\n")
        server.wait_for_log(f"connection from 127.0.0.1 closed: {evicted}, closed for a new one at the cap of 64")
    finally:
        for sock in socks:
            sock.close()


def test_trickled_keep_alive_request_head_is_cut_at_its_deadline(start_server) -> None:  # type: ignore[no-untyped-def]
    """A keep-alive connection's next head had the 30 s idle time to trickle in; now 10 s (REQUEST_TIMEOUT)."""
    server = start_server(monitor="127.0.0.1:0")
    url = server.monitor_url()
    wait_until(lambda: get(url + "/healthz")[0] == 200, what="the first status snapshot")
    socks: list[socket.socket] = []
    try:
        _idle_keep_alive(int(url.rsplit(":", 1)[1]), socks)
        (sock,) = socks
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        started = time.monotonic()
        closed = False
        while not closed and time.monotonic() - started < 20:
            try:
                sock.sendall(b"X-Trickle: 1\r\n")
                readable, _, _ = select.select([sock], [], [], 1.0)
                closed = bool(readable) and sock.recv(1) == b""
            except (BrokenPipeError, ConnectionResetError):
                closed = True
        assert closed, "a trickling request head kept its connection for 20 s"
        assert 9 < time.monotonic() - started < 15
        server.wait_for_log("connection from 127.0.0.1 closed: no whole request head within 10 s")
    finally:
        for sock in socks:
            sock.close()
