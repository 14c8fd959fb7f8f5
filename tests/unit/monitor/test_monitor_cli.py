"""``fastscp status`` against a real monitor process."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from fastscp.cli import main as cli
from fastscp.cli.status import url_for_listen
from fastscp.status import StatusSnapshot
from tests.unit.monitor.test_monitor import HOSTILE_AE, MonitorProcess, make_snapshot, running_monitor


@pytest.fixture
def monitor() -> Iterator[MonitorProcess]:
    yield from running_monitor()


def test_summary(monitor: MonitorProcess, capsys: pytest.CaptureFixture[str]) -> None:
    monitor.publish(make_snapshot())
    assert cli.main(["status", "--url", monitor.url]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("FASTSCP (fastscp 0.1.0) on 0.0.0.0:11112: running, up 3 h 12 min; status of ")
    assert "Stored         123,456 instances, 65.4 GB received; 7 failed, 12 duplicates" in lines
    assert "Associations   2 open, 321 ended, 4 rejected" in lines
    assert "Storage        /srv/pacs/received: 500 GB free of 2.00 TB, minimum 1.07 GB" in lines
    assert "By modality    CT 100,000, MR 20,000, US 3,453, <b>SR</b> 3" in lines
    assert "Rejected       local limit exceeded 3, calling AE not recognized 1" in lines
    assert "Open associations (2)" in lines
    ct = next(line for line in lines if "CT_SCANNER_01" in line and "10.20.30.41" in line)
    assert "1,204" in ct and "631 MB" in ct and "12.6/s" in ct
    assert any(HOSTILE_AE in line and "10.20.30.99:40001" in line for line in lines)
    assert any("aborted by peer" in line for line in lines)
    assert "WARNING" not in out


def test_summary_shows_the_post_store_lag(monitor: MonitorProcess, capsys: pytest.CaptureFixture[str]) -> None:
    from fastscp.status import PostStoreState

    monitor.publish(make_snapshot(poststore=PostStoreState(waiting=1_234, oldest_seconds=56.7, studies=3,
                                                           thumbnails=98_765)))
    assert cli.main(["status", "--url", monitor.url]) == 0
    assert ("Post-store     1,234 waiting (oldest 56.7 s), 3 studies before their scan sheet, 98,765 thumbnails "
            "made") in capsys.readouterr().out.splitlines()


def test_summary_warns_and_keeps_escape_sequences_off_the_terminal(
        monitor: MonitorProcess, capsys: pytest.CaptureFixture[str]) -> None:
    snapshot = make_snapshot(state="stopping", per_calling_ae={"\x1b[2J\x1b[31mEVIL": 5})
    snapshot.open[0].calling_ae_title = "CT\x1b]0;pwned\x07"
    snapshot.storage.below_watermark = True
    monitor.publish(snapshot)
    assert cli.main(["status", "--url", monitor.url + "/"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b[2J\\x1b[31mEVIL 5" in out and "CT\\x1b]0;pwned\\x07" in out
    assert "WARNING        storage is below its free-space watermark" in out
    assert "0xA700 (Out of resources)" in out
    assert "WARNING        the server is stopping: no new associations" in out


def test_json(monitor: MonitorProcess, capsys: pytest.CaptureFixture[str]) -> None:
    snapshot = make_snapshot()
    monitor.publish(snapshot)
    assert cli.main(["status", "--json", "--url", monitor.url]) == 0
    out = capsys.readouterr().out
    assert out.startswith("{\n  ")  # indented for reading
    assert msgspec.json.decode(out, type=StatusSnapshot) == snapshot


def test_before_the_first_snapshot(monitor: MonitorProcess, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", "--url", monitor.url]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"fastscp status: {monitor.url}/status.json: the server has not published its status yet")


def test_unreachable_monitor(capsys: pytest.CaptureFixture[str], closed_port: int) -> None:
    url = f"http://127.0.0.1:{closed_port}"
    assert cli.main(["status", "--url", url, "--timeout", "2"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"fastscp status: cannot reach the monitor at {url}/status.json: Connection refused")
    assert "monitor.listen" in captured.err and "--url" in captured.err


def test_not_a_fastscp_monitor(monitor: MonitorProcess, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", "--url", monitor.url + "/nowhere"]) == 1
    assert "HTTP 404" in capsys.readouterr().err


def test_address_from_the_config_file(monitor: MonitorProcess, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monitor.publish(make_snapshot())
    config = tmp_path / "site.yaml"
    config.write_text(f"monitor:\n  listen: 0.0.0.0:{monitor.port}\n")
    assert cli.main(["status", "--json", "--config", str(config)]) == 0
    assert msgspec.json.decode(capsys.readouterr().out)["ae_title"] == "FASTSCP"
    config.write_text(f"monitor:\n  enabled: false\n  listen: 127.0.0.1:{monitor.port}\n")
    assert cli.main(["status", "--config", str(config)]) == 1
    assert "monitor.enabled is false" in capsys.readouterr().err
    config.write_text("monitor:\n  listen: nowhere\n")
    assert cli.main(["status", "--config", str(config)]) == 1
    assert "monitor.listen 'nowhere': expected HOST:PORT" in capsys.readouterr().err


def test_a_config_error_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("server:\n  prot: 1\n")
    assert cli.main(["status", "--config", str(config)]) == 2
    assert "unknown key 'server.prot'" in capsys.readouterr().err


def test_the_installed_command(monitor: MonitorProcess) -> None:
    monitor.publish(make_snapshot())
    result = subprocess.run([sys.executable, "-m", "fastscp.cli", "status", "--url", monitor.url],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "CT_SCANNER_01" in result.stdout


@pytest.mark.parametrize(("listen", "url"), [
    ("127.0.0.1:8080", "http://127.0.0.1:8080"),
    ("0.0.0.0:9000", "http://127.0.0.1:9000"),
    ("[::]:8080", "http://[::1]:8080"),
    ("[::1]:8080", "http://[::1]:8080"),
    ("pacs.example.org:8080", "http://pacs.example.org:8080"),
])
def test_url_for_listen(listen: str, url: str) -> None:
    assert url_for_listen(listen) == url
