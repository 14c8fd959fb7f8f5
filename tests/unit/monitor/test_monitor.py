"""The monitor process over real HTTP: status.json, /metrics, /healthz, the protocol, its lifecycle.

``monitor_main`` runs in a forked child, as the supervisor runs it, fed with
real StatusSnapshot messages over a SOCK_SEQPACKET pair. The snapshot
builder and the process wrapper here are shared by the other
``test_monitor_*`` modules.
"""

from __future__ import annotations

import http.client
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Iterator

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastscp.config import load_config, to_builtins
from fastscp.monitor.server import STALE_AFTER, ListenError, monitor_main, parse_listen
from fastscp.status import (
    ENCODER,
    LATENCY_BUCKETS,
    SIZE_BUCKETS,
    AssociationState,
    Histogram,
    IndexState,
    PostStoreState,
    Rates,
    StatusSnapshot,
    StorageState,
    Totals,
    WorkerState,
)

_fork = multiprocessing.get_context("fork")

#: A calling AE title that is markup: the page must show it as text.
HOSTILE_AE = "<img src=x onerror=alert(1)>"
#: A calling AE title with every character the Prometheus format escapes.
QUOTED_AE = 'Q"AE\\1\nX'


def make_snapshot(**changes: object) -> StatusSnapshot:
    """A snapshot of a busy server: 2 open associations (one hostile), recent ones, counts, histograms."""
    now = time.time()
    latency = Histogram.empty(LATENCY_BUCKETS)
    for value in [0.0008] * 40 + [0.003] * 300 + [0.015] * 50 + [0.3] * 9 + [30.0]:
        latency.observe(value)
    sizes = Histogram.empty(SIZE_BUCKETS)
    for value in [520_000] * 380 + [12_000] * 15 + [80_000_000] * 5:
        sizes.observe(value)
    snapshot = StatusSnapshot(
        time=now,
        started=now - 3 * 3600 - 12 * 60,
        version="0.1.0",
        ae_title="FASTSCP",
        host="0.0.0.0",
        port=11112,
        state="running",
        open=[
            AssociationState(
                connection_id=401, worker=0, calling_ae_title="CT_SCANNER_01", called_ae_title="FASTSCP",
                peer_address="10.20.30.41:50412", started=now - 95.5, instances=1204, bytes=631_242_752,
                rate=12.6,
            ),
            AssociationState(
                connection_id=402, worker=1, calling_ae_title=HOSTILE_AE, called_ae_title="FASTSCP",
                peer_address="10.20.30.99:40001", started=now - 4.2, instances=3, failures=1, bytes=1_572_864,
                rate=0.7,
            ),
        ],
        recent=[
            AssociationState(
                connection_id=400, worker=1, calling_ae_title="MR_3T_EAST", called_ae_title="FASTSCP",
                peer_address="10.20.31.7:41100", started=now - 400, ended=now - 380, instances=212,
                bytes=110_100_480, rate=10.6, outcome="released",
            ),
            AssociationState(
                connection_id=399, worker=0, calling_ae_title="US_ROOM_2", called_ae_title="FASTSCP",
                peer_address="10.20.32.15:39002", started=now - 900, ended=now - 899, instances=1,
                failures=1, bytes=2_000_000, rate=1.0, outcome="aborted by peer",
            ),
            AssociationState(
                connection_id=398, worker=0, calling_ae_title="UNKNOWN_AE", called_ae_title="FASTSCP",
                peer_address="192.168.7.2:51234", started=now - 1200, ended=now - 1200,
                outcome="rejected (calling AE not recognized)",
            ),
        ],
        totals=Totals(instances=123_456, bytes=65_432_100_000, failures=7, duplicates=12, associations=321,
                      rejected=4),
        rates=Rates(instances_per_s_1m=13.3, mb_per_s_1m=6.9, instances_per_s_5m=11.8, mb_per_s_5m=6.1),
        per_modality={"CT": 100_000, "MR": 20_000, "US": 3_453, "<b>SR</b>": 3},
        per_calling_ae={"CT_SCANNER_01": 100_000, "MR_3T_EAST": 23_452, HOSTILE_AE: 3, QUOTED_AE: 1},
        rejects={"local limit exceeded": 3, "calling AE not recognized": 1},
        storage=StorageState(root="/srv/pacs/received", total_bytes=2_000_000_000_000,
                             used_bytes=1_500_000_000_000, free_bytes=500_000_000_000,
                             min_free_bytes=1_073_741_824, below_watermark=False),
        index=IndexState(path="/srv/pacs/received/index.duckdb", lag=45, committed=123_411),
        workers=[
            WorkerState(index=0, pid=4242, alive=True, open_associations=1, started=now - 11_520),
            WorkerState(index=1, pid=4243, alive=True, open_associations=1, started=now - 600, restarts=1),
        ],
        store_latency_seconds=latency,
        object_size_bytes=sizes,
        config=to_builtins(load_config()),
    )
    return msgspec.structs.replace(snapshot, **changes)


def _run_monitor(listen: str, child: socket.socket, ready, close: socket.socket, stale_after: float) -> None:  # type: ignore[no-untyped-def]
    # Like the supervisor's _child: the monitor must not hold the sending
    # end, or it would never see EOF when the sender goes away.
    close.close()
    monitor_main(listen, child, ready, stale_after=stale_after)


class MonitorProcess:
    """``monitor_main`` in a forked child, and the supervisor's end of its sockets."""

    def __init__(self, listen: str = "127.0.0.1:0", stale_after: float = STALE_AFTER) -> None:
        self.sender, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ready_r, ready_w = _fork.Pipe(duplex=False)
        self.process = _fork.Process(target=_run_monitor, name="fastscp-monitor",
                                     args=(listen, child, ready_w, self.sender, stale_after))
        self.process.start()
        child.close()
        ready_w.close()
        if not ready_r.poll(30):
            self.process.kill()
            raise AssertionError("the monitor did not report within 30 s")
        self.outcome: tuple[str, str] = ready_r.recv()
        ready_r.close()
        self.url = self.outcome[1] if self.outcome[0] == "ready" else ""
        self.host, _, port = self.url.removeprefix("http://").rpartition(":")
        self.port = int(port) if port.isdigit() else 0

    def send(self, snapshot: StatusSnapshot) -> None:
        self.sender.send(ENCODER.encode(snapshot))

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host.strip("[]"), self.port, timeout=10)

    def get(self, path: str, method: str = "GET") -> tuple[int, http.client.HTTPMessage, bytes]:
        conn = self.connection()
        try:
            conn.request(method, path)
            response = conn.getresponse()
            return response.status, response.headers, response.read()
        finally:
            conn.close()

    def wait_for(self, path: str, status: int, timeout: float = 10) -> bytes:
        """Poll until ``path`` answers ``status`` (a snapshot takes a moment to arrive)."""
        deadline = time.monotonic() + timeout
        while True:
            got, _headers, body = self.get(path)
            if got == status:
                return body
            if time.monotonic() > deadline:
                raise AssertionError(f"{path}: still {got} after {timeout} s: {body!r}")
            time.sleep(0.02)

    def publish(self, snapshot: StatusSnapshot) -> None:
        """Send and wait until the monitor serves exactly this snapshot."""
        self.send(snapshot)
        deadline = time.monotonic() + 10
        while msgspec.json.decode(self.wait_for("/status.json", 200), type=StatusSnapshot) != snapshot:
            assert time.monotonic() < deadline, "the monitor did not take the new snapshot"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.sender.close()


@pytest.fixture
def start_monitor() -> Iterator:
    """Factory: ``start_monitor(listen=..., stale_after=...)`` -> a :class:`MonitorProcess`, always stopped."""
    monitors: list[MonitorProcess] = []

    def start(**kwargs) -> MonitorProcess:  # type: ignore[no-untyped-def]
        monitor = MonitorProcess(**kwargs)
        monitors.append(monitor)
        return monitor

    yield start
    for monitor in monitors:
        monitor.stop()


def running_monitor(**kwargs) -> Iterator[MonitorProcess]:  # type: ignore[no-untyped-def]
    """Body of a ``monitor`` fixture (the other test_monitor_* modules define theirs with it)."""
    monitor = MonitorProcess(**kwargs)
    try:
        assert monitor.outcome[0] == "ready", monitor.outcome
        yield monitor
    finally:
        monitor.stop()


@pytest.fixture
def monitor() -> Iterator[MonitorProcess]:
    """A monitor listening on a free port of 127.0.0.1, no snapshot sent yet."""
    yield from running_monitor()


# -- status.json ---------------------------------------------------------------------------


def test_status_json_before_the_first_snapshot_is_503_json(monitor: MonitorProcess) -> None:
    status, headers, body = monitor.get("/status.json")
    assert status == 503
    assert headers["Content-Type"] == "application/json"
    assert "no status snapshot yet" in msgspec.json.decode(body)["error"]


def test_status_json_round_trips_the_latest_snapshot(monitor: MonitorProcess) -> None:
    first = make_snapshot()
    monitor.send(first)
    body = monitor.wait_for("/status.json", 200)
    assert msgspec.json.decode(body, type=StatusSnapshot) == first
    # The newest snapshot replaces the previous one.
    second = make_snapshot(totals=Totals(instances=123_500, bytes=65_500_000_000), state="stopping")
    monitor.publish(second)
    status, headers, body = monitor.get("/status.json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    assert msgspec.json.decode(body, type=StatusSnapshot) == second


def test_a_message_that_is_not_a_snapshot_is_dropped(monitor: MonitorProcess) -> None:
    snapshot = make_snapshot()
    monitor.publish(snapshot)
    monitor.sender.send(b"\x93not a snapshot")
    monitor.sender.send(msgspec.msgpack.encode({"time": "yesterday"}))
    time.sleep(0.2)
    assert msgspec.json.decode(monitor.wait_for("/status.json", 200), type=StatusSnapshot) == snapshot
    assert monitor.process.is_alive()


# -- /metrics -----------------------------------------------------------------------------


def _families(text: str) -> dict[str, object]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def _value(families: dict, name: str, sample: str | None = None, **labels: str) -> float:  # type: ignore[type-arg]
    family = families[name]
    for s in family.samples:
        if s.name == (sample or s.name) and s.labels == labels:
            return s.value
    raise AssertionError(f"no sample {sample or name}{labels} in {family.samples}")


def test_metrics_in_prometheus_text_format(monitor: MonitorProcess) -> None:
    status, _headers, _body = monitor.get("/metrics")
    assert status == 503
    snapshot = make_snapshot()
    monitor.publish(snapshot)
    status, headers, body = monitor.get("/metrics")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = _families(body.decode())

    # Counters: the parser names a family without its _total suffix.
    assert families["fastscp_instances_stored"].type == "counter"
    assert _value(families, "fastscp_instances_stored") == 123_456
    assert _value(families, "fastscp_bytes_received") == 65_432_100_000
    assert _value(families, "fastscp_store_failures") == 7
    assert _value(families, "fastscp_duplicates") == 12
    assert _value(families, "fastscp_associations") == 321
    assert _value(families, "fastscp_associations_rejected", reason="local limit exceeded") == 3
    assert _value(families, "fastscp_associations_rejected", reason="calling AE not recognized") == 1
    assert {s.labels["modality"]: s.value for s in families["fastscp_instances_by_modality"].samples} == {
        "CT": 100_000, "MR": 20_000, "US": 3_453, "<b>SR</b>": 3,
    }
    # Label values with quotes, backslashes and line feeds survive the escaping.
    by_ae = {s.labels["calling_ae"]: s.value for s in families["fastscp_instances_by_calling_ae"].samples}
    assert by_ae == {"CT_SCANNER_01": 100_000, "MR_3T_EAST": 23_452, HOSTILE_AE: 3, QUOTED_AE: 1}

    # Gauges.
    assert families["fastscp_open_associations"].type == "gauge"
    assert _value(families, "fastscp_open_associations") == 2
    assert _value(families, "fastscp_storage_free_bytes") == 500_000_000_000
    assert _value(families, "fastscp_storage_used_bytes") == 1_500_000_000_000
    assert _value(families, "fastscp_storage_total_bytes") == 2_000_000_000_000
    assert _value(families, "fastscp_storage_min_free_bytes") == 1_073_741_824
    assert _value(families, "fastscp_storage_below_watermark") == 0
    assert _value(families, "fastscp_index_lag") == 45
    assert _value(families, "fastscp_index_committed") == 123_411
    assert _value(families, "fastscp_workers_alive") == 2
    assert _value(families, "fastscp_worker_restarts") == 1
    assert _value(families, "fastscp_worker_open_associations", worker="1") == 1
    assert _value(families, "fastscp_uptime_seconds") == pytest.approx(3 * 3600 + 12 * 60)
    assert 0 <= _value(families, "fastscp_status_age_seconds") < 60
    assert _value(families, "fastscp_stopping") == 0
    assert _value(families, "fastscp_info", version="0.1.0", ae_title="FASTSCP") == 1

    # Histograms: cumulative buckets, +Inf == _count, the snapshot's sum.
    for name, histogram in (("fastscp_store_latency_seconds", snapshot.store_latency_seconds),
                            ("fastscp_object_size_bytes", snapshot.object_size_bytes)):
        family = families[name]
        assert family.type == "histogram"
        buckets = [(s.labels["le"], s.value) for s in family.samples if s.name == f"{name}_bucket"]
        assert [float(le) for le, _ in buckets] == [*histogram.buckets, float("inf")]
        running = 0
        for (_le, value), count in zip(buckets, histogram.counts, strict=True):
            running += count
            assert value == running
        assert buckets[-1] == ("+Inf", histogram.count)
        assert _value(families, name, f"{name}_count") == histogram.count
        assert _value(families, name, f"{name}_sum") == pytest.approx(histogram.sum)
    # The bounds as written in fastscp.status: 0.001 s, 5 ms, 10 s (no exponent notation).
    latency = {s.labels["le"]: s.value for s in families["fastscp_store_latency_seconds"].samples
               if s.name.endswith("_bucket")}
    assert [latency[le] for le in ("0.001", "0.005", "0.5", "10", "+Inf")] == [40, 340, 399, 399, 400]


def test_metrics_follow_storage_below_the_watermark_and_stopping(monitor: MonitorProcess) -> None:
    snapshot = make_snapshot(state="stopping")
    snapshot.storage.free_bytes, snapshot.storage.below_watermark = 512_000_000, True
    monitor.publish(snapshot)
    families = _families(monitor.get("/metrics")[2].decode())
    assert _value(families, "fastscp_storage_below_watermark") == 1
    assert _value(families, "fastscp_storage_free_bytes") == 512_000_000
    assert _value(families, "fastscp_stopping") == 1


def test_metrics_of_the_post_store_lag(monitor: MonitorProcess) -> None:
    """The derived work's backlog (issue 13): what waits, for how long; no family when no post-store runs."""
    monitor.publish(make_snapshot())
    assert "fastscp_poststore" not in monitor.get("/metrics")[2].decode()
    monitor.publish(make_snapshot(poststore=PostStoreState(waiting=1_234, oldest_seconds=56.7, studies=3,
                                                           thumbnails=98_765, kept_files=2)))
    families = _families(monitor.get("/metrics")[2].decode())
    assert families["fastscp_poststore_waiting"].type == "gauge"
    assert _value(families, "fastscp_poststore_waiting") == 1_234
    assert _value(families, "fastscp_poststore_oldest_seconds") == pytest.approx(56.7)
    assert _value(families, "fastscp_poststore_studies_waiting") == 3
    assert families["fastscp_thumbnails_made"].type == "counter"
    assert _value(families, "fastscp_thumbnails_made") == 98_765
    assert families["fastscp_poststore_kept_files"].type == "gauge"
    assert _value(families, "fastscp_poststore_kept_files") == 2


def test_metrics_of_the_index_lag(monitor: MonitorProcess) -> None:
    """The indexer's backlog (issue 13): records not committed, files of records kept for it."""
    snapshot = make_snapshot()
    snapshot.index.lag, snapshot.index.kept_files = 4_321, 3
    monitor.publish(snapshot)
    families = _families(monitor.get("/metrics")[2].decode())
    assert _value(families, "fastscp_index_lag") == 4_321
    assert families["fastscp_index_kept_files"].type == "gauge"
    assert _value(families, "fastscp_index_kept_files") == 3


# -- /healthz -----------------------------------------------------------------------------


def test_healthz_needs_a_fresh_snapshot_of_a_running_server(start_monitor) -> None:  # type: ignore[no-untyped-def]
    monitor = start_monitor(stale_after=0.6)
    status, headers, body = monitor.get("/healthz")
    assert (status, body) == (503, b"no status snapshot yet: the server is starting\n")
    assert headers["Content-Type"] == "text/plain; charset=utf-8"

    monitor.send(make_snapshot())
    assert monitor.wait_for("/healthz", 200) == b"ok\n"
    # No snapshot for longer than stale_after: the supervisor is stuck or gone.
    body = monitor.wait_for("/healthz", 503, timeout=5)
    assert body.startswith(b"stale: the last status snapshot is ")
    # Snapshots again: healthy again.
    monitor.send(make_snapshot())
    assert monitor.wait_for("/healthz", 200) == b"ok\n"
    # The server is stopping: not healthy, though fresh.
    monitor.send(make_snapshot(state="stopping"))
    assert monitor.wait_for("/healthz", 503) == b"state: stopping\n"


# -- HTTP ---------------------------------------------------------------------------------


def _raw(monitor: MonitorProcess, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes."""
    with socket.create_connection((monitor.host, monitor.port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_keep_alive_head_and_errors(monitor: MonitorProcess) -> None:
    monitor.publish(make_snapshot())
    conn = monitor.connection()
    try:
        # Several requests on one connection (HTTP/1.1 keep-alive).
        for path in ("/", "/status.json", "/metrics", "/healthz", "/index.html", "/status.json?x=1"):
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            assert response.status == 200, path
            assert response.headers["Connection"] == "keep-alive"
        conn.request("HEAD", "/status.json")
        response = conn.getresponse()
        assert response.status == 200 and int(response.headers["Content-Length"]) > 1000
        assert response.read() == b""
        conn.request("GET", "/nothing-here")
        response = conn.getresponse()
        assert response.status == 404 and b"/status.json" in response.read()
        conn.request("POST", "/status.json", body=b"{}")
        response = conn.getresponse()
        assert response.status == 405 and response.headers["Allow"] == "GET, HEAD"
        response.read()
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def test_page_is_html_with_a_content_security_policy(monitor: MonitorProcess) -> None:
    status, headers, body = monitor.get("/")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    policy = headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy and "unsafe" not in policy
    assert body.startswith(b"<!doctype html>") and b"status.json" in body


def test_connection_close_http_1_0_and_bad_requests(monitor: MonitorProcess) -> None:
    answer = _raw(monitor, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 503 ") and b"Connection: close" in answer
    answer = _raw(monitor, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 503 ") and b"Connection: close" in answer
    # Two pipelined requests, the second closing.
    answer = _raw(monitor, b"GET /healthz HTTP/1.1\r\n\r\nGET /nope HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert answer.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 404 " in answer
    assert _raw(monitor, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert _raw(monitor, b"GET /healthz HTTP/2.0\r\n\r\n").startswith(b"HTTP/1.1 505 ")
    assert _raw(monitor, b"GET /healthz HTTP/1.1\r\nBad header\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    big = b"GET / HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 20_000 + b"\r\n\r\n"
    assert _raw(monitor, big).startswith(b"HTTP/1.1 431 ")
    chunked = b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert _raw(monitor, chunked).startswith(b"HTTP/1.1 501 ")
    assert _raw(monitor, b"GET / HTTP/1.1\r\nContent-Length: 999999\r\n\r\n").startswith(b"HTTP/1.1 413 ")
    # A GET with a small body: the body is read and ignored, the connection stays usable.
    answer = _raw(monitor, b"GET /healthz HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /healthz HTTP/1.1\r\n"
                           b"Connection: close\r\n\r\n")
    assert answer.count(b"HTTP/1.1 503 ") == 2


# -- lifecycle ----------------------------------------------------------------------------


def test_sigint_is_ignored_and_sigterm_stops_with_a_client_connected(monitor: MonitorProcess) -> None:
    monitor.publish(make_snapshot())
    idle = socket.create_connection((monitor.host, monitor.port))  # a keep-alive client idling
    try:
        os.kill(monitor.process.pid, signal.SIGINT)
        time.sleep(0.3)
        assert monitor.process.is_alive()
        assert monitor.get("/healthz")[0] == 200
        started = time.monotonic()
        os.kill(monitor.process.pid, signal.SIGTERM)
        monitor.process.join(10)
        assert monitor.process.exitcode == 0
        assert time.monotonic() - started < 5
        assert idle.recv(1) == b""  # the idle connection was closed
    finally:
        idle.close()


def test_exits_when_the_supervisor_closes_its_end(monitor: MonitorProcess) -> None:
    monitor.publish(make_snapshot())
    monitor.sender.close()
    monitor.process.join(10)
    assert monitor.process.exitcode == 0
    with pytest.raises(OSError):
        socket.create_connection((monitor.host, monitor.port), timeout=2).close()


def test_port_in_use_is_reported_on_ready(start_monitor) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        monitor = start_monitor(listen=f"127.0.0.1:{port}")
        kind, message = monitor.outcome
        assert kind == "error"
        assert message.startswith(f"monitor.listen '127.0.0.1:{port}': cannot listen on")
        assert "Address already in use" in message and "monitor.enabled: false" in message
        monitor.process.join(10)
        assert monitor.process.exitcode == 2


def test_a_malformed_listen_is_reported_on_ready(start_monitor) -> None:  # type: ignore[no-untyped-def]
    monitor = start_monitor(listen="localhost")
    assert monitor.outcome[0] == "error"
    assert monitor.outcome[1].startswith("monitor.listen 'localhost': expected HOST:PORT")


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_listen(start_monitor) -> None:  # type: ignore[no-untyped-def]
    monitor = start_monitor(listen="[::1]:0")
    assert monitor.outcome[0] == "ready"
    assert monitor.url.startswith("http://[::1]:") and monitor.port > 0
    assert monitor.get("/healthz")[0] == 503


@pytest.mark.parametrize(("listen", "expected"), [
    ("127.0.0.1:8080", ("127.0.0.1", 8080)),
    ("0.0.0.0:0", ("0.0.0.0", 0)),
    ("localhost:9100", ("localhost", 9100)),
    ("[::1]:8080", ("::1", 8080)),
    ("[::]:65535", ("::", 65535)),
])
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["8080", ":8080", "host:", "host:http", "host:70000", "::1:8080", "[::1]8080",
                                    "[::1]", ""])
def test_parse_listen_rejects(listen: str) -> None:
    with pytest.raises(ListenError, match=r"^monitor\.listen "):
        parse_listen(listen)
