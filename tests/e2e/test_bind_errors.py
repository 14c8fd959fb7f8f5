"""A port we can't listen on: the error names the key, the address, the cause and the fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

#: Run a command without the capability to bind ports below 1024, even as root
#: (what an unprivileged user without AmbientCapabilities has).
WITHOUT_BIND_CAPABILITY = ["setpriv", "--bounding-set=-net_bind_service", "--inh-caps=-net_bind_service"]


def serve(tmp_path: Path, port: int, *options: str, unprivileged: bool = False) -> subprocess.CompletedProcess:
    """``fastscp serve`` that is expected to exit; its result."""
    argv = [sys.executable, "-m", "fastscp.cli", "serve", str(port), "BINDTEST", "--host", "127.0.0.1",
            "--storage-dir", str(tmp_path / "received"), "--workers", "1", *options]
    if unprivileged and os.geteuid() == 0:
        argv = [*WITHOUT_BIND_CAPABILITY, *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_port_104_without_the_capability_says_what_it_needs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = serve(tmp_path, 104, "--monitor", "off", unprivileged=True)
    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("fastscp: server.port: cannot listen on 127.0.0.1:104: Permission denied;"), message
    assert "CAP_NET_BIND_SERVICE" in message and "root" in message, message
    assert "another" not in message, "nothing else holds port 104: " + message
    assert not (tmp_path / "received" / "index.duckdb").exists(), "no child started"


def test_a_taken_dicom_port_names_the_other_process(tmp_path, taken_port) -> None:  # type: ignore[no-untyped-def]
    result = serve(tmp_path, taken_port, "--monitor", "off")
    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert f"server.port: cannot listen on 127.0.0.1:{taken_port}: Address already in use;" in message, message
    assert "another process" in message and "CAP_NET_BIND_SERVICE" not in message, message


def test_a_taken_monitor_port_names_monitor_listen_and_the_fix(tmp_path, taken_port) -> None:  # type: ignore[no-untyped-def]
    # A second server on one machine: the status page's port is the first thing they share.
    result = serve(tmp_path, 0, "--monitor", f"127.0.0.1:{taken_port}")  # DICOM port 0: never the one refused
    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"fastscp: monitor.listen '127.0.0.1:{taken_port}': cannot listen on "
                              f"http://127.0.0.1:{taken_port}: Address already in use;"), message
    assert "another process" in message, message
    assert "monitor.enabled: false" in message and "--monitor off" in message, message
    assert "--monitor HOST:PORT" in message, message


def test_a_privileged_monitor_port_says_what_it_needs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = serve(tmp_path, 0, "--monitor", "127.0.0.1:81", unprivileged=True)
    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("fastscp: monitor.listen '127.0.0.1:81': cannot listen on"), message
    assert "CAP_NET_BIND_SERVICE" in message and "another" not in message, message
