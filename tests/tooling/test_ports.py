"""The suite's ports: a port free_port() picked and another process took before ours bound it.

free_port() closes its socket before the process it is for binds the port;
in that gap another process (often another server of the same test) can
take it. Each test here makes that happen on purpose: the first pick is a
port a socket of the test listens on, and the start must go on, on another.
"""

from __future__ import annotations

import socket
from pathlib import Path
from types import ModuleType

import pytest

from tests import cluster, conftest
from tests.cluster import HAProxy
from tests.conftest import PORT_ATTEMPTS, PortTaken, Server, dcmtk, free_port, wait_until
from tests.e2e import test_forward
from tests.e2e.test_forward import Orthanc, Storescp
from tests.e2e.test_monitor_live import get

pytestmark = pytest.mark.dcmtk


def recorded_picks(monkeypatch: pytest.MonkeyPatch, module: ModuleType, taken: int = 0) -> list[int]:
    """``module.free_port``, each port it gives recorded; ``taken``: given first, as if another process took it."""
    given: list[int] = []

    def pick(host: str = "127.0.0.1") -> int:
        given.append(taken if taken and not given else free_port(host))
        return given[-1]

    monkeypatch.setattr(module, "free_port", pick)
    return given


def test_a_server_whose_port_was_taken_starts_on_another(start_server, taken_port: int, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    picked = recorded_picks(monkeypatch, conftest, taken_port)
    server = start_server(workers=1)
    assert picked[0] == taken_port and server.port == picked[-1] != taken_port, picked
    # The first try met the taken port, and said so in its own log.
    assert f"127.0.0.1:{taken_port}: Address already in use" in (tmp_path / f"server-{taken_port}.log").read_text()
    assert "Address already in use" not in server.log_text()
    dcmtk("echoscu", "-aec", server.ae_title, "127.0.0.1", str(server.port))


def test_a_monitor_on_port_0_is_found_in_the_log(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(workers=1, monitor="127.0.0.1:0")
    port = server.monitor_port()
    assert port > 0 and server.monitor_url() == f"http://127.0.0.1:{port}"
    # /healthz says 503 until the supervisor publishes its first status snapshot, a moment after it listens.
    wait_until(lambda: get(f"{server.monitor_url()}/healthz")[0] == 200, what="/healthz answering 200")


def test_a_taken_port_the_test_chose_is_tried_a_bounded_number_of_times(tmp_path: Path, taken_port: int,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh DICOM port each time can't help when the monitor's port, given by the test, is the taken one."""
    picked = recorded_picks(monkeypatch, conftest)
    with pytest.raises(PortTaken) as failed:
        Server(tmp_path, workers=1, monitor=f"127.0.0.1:{taken_port}")
    assert len(picked) == PORT_ATTEMPTS
    # The error holds the last try's log, which says which port and why.
    assert f"monitor.listen '127.0.0.1:{taken_port}': cannot listen on" in str(failed.value)
    assert f"server-{picked[-1]}.log" in {p.name for p in tmp_path.iterdir()}


def test_a_storescp_destination_whose_port_was_taken_starts_on_another(tmp_path: Path, taken_port: int,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    picked = recorded_picks(monkeypatch, test_forward, taken_port)
    dest = Storescp(tmp_path / "dest", 0).start()  # 0: a port of free_port(), chosen at its start
    try:
        assert picked[0] == taken_port and dest.port == picked[-1] != taken_port, picked
        dcmtk("echoscu", "-aec", dest.ae_title, "127.0.0.1", str(dest.port))
    finally:
        dest.stop()


def test_haproxy_whose_port_was_taken_starts_on_another(tmp_path: Path, taken_port: int,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    picked = recorded_picks(monkeypatch, cluster, taken_port)
    proxy = HAProxy(tmp_path, [])
    try:
        assert picked[0] == taken_port and proxy.port == picked[-1] != taken_port, picked
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5):
            pass
    finally:
        proxy.stop()


@pytest.mark.parametrize("receiver", [Storescp, Orthanc])
def test_a_destination_down_then_up_starts_on_the_port_held_for_it(tmp_path: Path, closed_port: int,
                                                                   receiver: type[Storescp | Orthanc]) -> None:
    """The port a forwarding config names while its destination is down: nothing listens and nothing else
    can bind it meanwhile, yet the destination itself starts on it (test_forward's down-then-up tests)."""
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", closed_port), timeout=5):
        pass
    with socket.socket() as other, pytest.raises(OSError, match="in use"):
        other.bind(("127.0.0.1", closed_port))  # a process that does not set SO_REUSEADDR
    dest = receiver(tmp_path / "dest", closed_port).start()
    try:
        assert dest.port == closed_port
        dcmtk("echoscu", "-aec", dest.ae_title, "127.0.0.1", str(closed_port))
    finally:
        dest.stop()
