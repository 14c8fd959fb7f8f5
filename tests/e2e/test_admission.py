"""Hostile peers: idle sockets, floods from one or many addresses, forged log
lines. Connections awaiting their A-ASSOCIATE-RQ take no association slot
and have their own bounded budget (server.max_pending_connections,
server.max_pending_per_address); what is dropped is logged at INFO,
rate-limited. Values a peer sends are escaped in the log."""

from __future__ import annotations

import contextlib
import json
import re
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from fastscp.net.scu import echo
from tests.conftest import dcmtk, wait_until
from tests.e2e.test_access import associate, config
from tests.e2e.test_monitor_live import get
from tests.rawscu import RawSCU

pytestmark = pytest.mark.dcmtk

LIMITS = """
server:
  max_associations: 4
  max_pending_connections: 20
  max_pending_per_address: 8
"""


@contextlib.contextmanager
def idle_sockets(port: int, source: str, count: int) -> Iterator[list[socket.socket]]:
    """``count`` TCP connections from ``source`` (a 127.x address) that send nothing."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            socks.append(sock)
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", port))
        yield socks
    finally:
        for sock in socks:
            sock.close()


def closed_by_server(socks: list[socket.socket], wait: float = 2.0) -> list[socket.socket]:
    """The sockets the server has closed (EOF, reset or A-ABORT) within ``wait`` seconds."""
    closed: list[socket.socket] = []
    deadline = time.monotonic() + wait
    while len(closed) < len(socks) and (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([s for s in socks if s not in closed], [], [], left)
        for sock in readable:
            try:
                data = sock.recv(16)
            except ConnectionResetError:
                data = b""
            # Nothing, or an A-ABORT before the close (a timed-out association).
            assert data == b"" or data[0] == 0x07, f"the server sent {data!r} to a connection that sent nothing"
            closed.append(sock)
    return closed


def echoscu_succeeds(server, aet: str = "ECHOSCU") -> None:  # type: ignore[no-untyped-def]
    result = dcmtk("echoscu", "-aet", aet, "-aec", server.ae_title, "127.0.0.1", str(server.port), check=False)
    assert result.returncode == 0, f"echoscu failed:\n{result.stdout}\n{result.stderr}"


def test_idle_sockets_take_no_association_slot(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Issue 11.1: 70 idle sockets from one host locked out every sender."""
    server = start_server(config=config(tmp_path, LIMITS), workers=2, monitor="127.0.0.1:0")
    url = server.monitor_url()
    with idle_sockets(server.port, "127.0.0.2", 70) as socks:
        # Far more than max_associations (4) idle sockets, yet senders get in.
        echoscu_succeeds(server)
        assert echo("127.0.0.1", server.port, aet="PYNETDICOM", aec=server.ae_title) == 0
        # 8 wait for their A-ASSOCIATE-RQ (the per-address cap); 62 were closed at once.
        assert len(closed_by_server(socks)) == 62
        # /metrics shows them: 8 pending, 62 dropped by the per-address cap.
        wait_until(lambda: _metrics(url) == (8.0, {"server.max_pending_per_address": 62.0}),
                   what="8 pending and 62 dropped connections in /metrics")
        # max_associations still holds for real associations.
        held = [associate(server, f"HOLD{i}") for i in range(4)]
        try:
            assert all(a.is_established for a in held)
            result = dcmtk("echoscu", "-aec", server.ae_title, "127.0.0.1", str(server.port), check=False)
            assert result.returncode != 0
        finally:
            for assoc in held:
                assoc.release()
        wait_until(lambda: _echo_ok(server), what="the freed association slots")
    # The drops are logged at INFO with the address and the key, rate-limited:
    # one line, then one line that counts the rest.
    log = server.wait_for_log("connection from 127.0.0.2: 61 more closed", timeout=20)
    lines = [line for line in log.splitlines() if "connection from 127.0.0.2" in line]
    assert len(lines) == 2, lines
    assert " INFO " in lines[0] and "server.max_pending_per_address" in lines[0]
    assert lines[1].endswith("61 as 8 connections from this address are waiting for their A-ASSOCIATE-RQ"
                             " (server.max_pending_per_address)")


def test_pending_budget_is_bounded_across_addresses(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = start_server(config=config(tmp_path, LIMITS), workers=2)
    # Also lets the start-up check's probe connection (conftest) end first.
    echoscu_succeeds(server)
    with contextlib.ExitStack() as stack:
        groups = [stack.enter_context(idle_sockets(server.port, f"127.0.0.{n}", 5)) for n in (2, 3, 4, 5)]
        # 20 pending in all: the whole budget (server.max_pending_connections), none closed.
        assert closed_by_server([s for group in groups for s in group]) == []
        extra = stack.enter_context(idle_sockets(server.port, "127.0.0.6", 3))
        assert len(closed_by_server(extra, wait=10)) == 3
        server.wait_for_log("connection from 127.0.0.6 closed: 20 connections are waiting for their"
                            " A-ASSOCIATE-RQ (server.max_pending_connections)")
        # Those that wait are still served once they speak: the budget frees up.
        for group in groups:
            for sock in group:
                sock.close()
        wait_until(lambda: _echo_ok(server), what="the pending budget to free up")


def test_idle_connection_dropped_after_acse_timeout_is_logged(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = start_server(config=config(tmp_path, "server:\n  acse_timeout: 1\n"))
    with idle_sockets(server.port, "127.0.0.7", 3) as socks:
        log = server.wait_for_log("connection from 127.0.0.7 closed: no A-ASSOCIATE-RQ within server.acse_timeout")
        assert len(closed_by_server(socks, wait=5)) == 3
    assert re.search(r" INFO .*connection from 127\.0\.0\.7 closed: no A-ASSOCIATE-RQ", log)


def _echo_ok(server) -> bool:  # type: ignore[no-untyped-def]
    result = dcmtk("echoscu", "-aec", server.ae_title, "127.0.0.1", str(server.port), check=False)
    return result.returncode == 0


@pytest.mark.parametrize("log_format", ["plain", "json"])
def test_peer_values_cannot_forge_log_lines(start_server, tmp_path: Path, log_format: str) -> None:  # type: ignore[no-untyped-def]
    """Issue 11.6: CR/LF in a calling AE title or a command UID was written verbatim."""
    server = start_server(config=config(tmp_path, f"logging:\n  format: {log_format}\n"))
    # pynetdicom's decoder refuses the AE title: the association is aborted
    # and the log line quotes it.
    evil = RawSCU(server.port, CTImageStorage, ExplicitVRLittleEndian, raw_calling_ae=b"EVIL\r\nFORGED AE")
    assert evil.response_type == 0x07  # A-ABORT
    evil.close()
    scu = RawSCU(server.port, CTImageStorage, ExplicitVRLittleEndian, aet="RAWSCU")
    # A UID that is no UID is refused (0x0117); the warning names it.
    assert scu.store("1.2.3\r\nFORGED UID\x1b[2J", b"\x08\x00\x16\x00garbage") == 0x0117
    scu.release()
    server.wait_for_log("FORGED AE", "FORGED UID")
    server.stop()
    lines = server.log_text().splitlines()
    assert not [line for line in lines if line.startswith("FORGED")]
    if log_format == "json":
        messages = [json.loads(line)["message"] for line in lines]
    else:
        assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \[", line) for line in lines), lines
        messages = lines
    assert any("'EVIL\\x0d\\x0aFORGED AE'" in m for m in messages), messages
    assert any("C-STORE '1.2.3\\r\\nFORGED UID\\x1b[2J' from 'RAWSCU' refused" in m for m in messages), messages
    assert not any(c in "".join(messages) for c in "\r\x1b")


def _metrics(url: str) -> tuple[float, dict[str, float]]:
    """fastscp_pending_connections and fastscp_connections_dropped_total by reason."""
    families = {f.name: f for f in text_string_to_metric_families(get(url + "/metrics")[1])}
    dropped = {s.labels["reason"]: s.value for s in families["fastscp_connections_dropped"].samples}
    return families["fastscp_pending_connections"].samples[0].value, dropped
