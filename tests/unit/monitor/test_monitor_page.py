"""The status page in a real headless Chromium: rendered by its script, live, values as text."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fastscp.status import human_bytes
from tests.unit.monitor.test_monitor import HOSTILE_AE, MonitorProcess, make_snapshot, running_monitor

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
def monitor() -> Iterator[MonitorProcess]:
    yield from running_monitor()


@pytest.fixture(scope="module")
def _chromium_present() -> None:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail("Chromium is missing: install Debian's chromium package (apt-get install chromium)")


def chromium(tmp_path: Path, url: str, *action: str) -> str:
    """Run headless Chromium on ``url`` with 3 s of page time; returns its stdout."""
    argv = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,1600",
        # Virtual time: 3 s of timers (three refreshes) without waiting 3 s,
        # and it does not advance while a fetch is pending.
        "--virtual-time-budget=3000", *action, url,
    ]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # its renderer and GPU processes too
        process.communicate()
        raise AssertionError("chromium did not finish within 120 s") from None
    assert process.returncode == 0, err[-3000:]
    return out


class _Page(HTMLParser):
    """The rendered DOM: text under each element with an id, tags seen, <body> attributes."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.text: dict[str, str] = {}
        self.tags: list[str] = []
        self.body: dict[str, str | None] = {}
        self._open: list[tuple[str, str | None]] = []  # (tag, id) of open elements
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "body":
            self.body = dict(attrs)
        if tag in ("meta", "link", "br", "img", "input"):
            return  # void elements: no end tag follows
        ident = dict(attrs).get("id")
        if ident:
            self.text.setdefault(ident, "")
        self._open.append((tag, ident))

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        for _tag, ident in self._open:
            if ident:
                self.text[ident] += data + " "


@pytest.mark.usefixtures("_chromium_present")
def test_page_shows_the_status_live_and_escaped(monitor: MonitorProcess, tmp_path: Path) -> None:
    snapshot = make_snapshot()
    snapshot.storage.free_bytes, snapshot.storage.below_watermark = 800_000_000, True
    snapshot.storage.used_bytes = snapshot.storage.total_bytes - snapshot.storage.free_bytes
    monitor.publish(snapshot)

    dom = chromium(tmp_path, monitor.url + "/", "--dump-dom")
    page = _Page(dom)
    # Rendered by the script from status.json, and refreshed (every second).
    assert int(page.body.get("data-updates") or 0) >= 2, dom[:2000]
    assert page.text["page-error"].strip() == ""
    assert "hidden" not in dom.split('id="content"')[1].split(">")[0]

    # The open association's calling AE, its counts; the hostile one as text, never as an element.
    open_text = page.text["open"]
    assert "CT_SCANNER_01" in open_text and "10.20.30.41:50412" in open_text and "1,204" in open_text
    assert "631 MB" in open_text and "12.6/s" in open_text
    assert HOSTILE_AE in open_text and HOSTILE_AE in page.text["calling"]
    assert "&lt;img src=x onerror=alert(1)&gt;" in dom
    assert "img" not in page.tags
    assert "<b>SR</b>" in page.text["modalities"] and "b" not in page.tags

    tiles = page.text["tiles"]
    assert "123,456" in tiles and "65.4 GB" in tiles and "13.3" in tiles and "800 MB" in tiles
    # Each value beside its own label: the index lag (45) is not found inside "123,456".
    assert re.search(r"Index lag\s+45\s+123,411 committed", tiles), tiles
    assert re.search(r"Instances stored\s+123,456\s", tiles), tiles
    assert re.search(r"Workers alive\s+2 of 2\s", tiles), tiles
    assert "FASTSCP" in page.text["heading"] and "running" in page.text["meta"]
    recent = page.text["recent"]
    assert "MR_3T_EAST" in recent and "released" in recent and "rejected (calling AE not recognized)" in recent
    assert "local limit exceeded" in page.text["rejects"]
    # One convention for sizes: fastscp status and fastscp send write them as the page does.
    assert [human_bytes(a.bytes) for a in snapshot.open] == ["631 MB", "1.57 MB"]
    for association in snapshot.open:
        assert human_bytes(association.bytes) in open_text
    for association in snapshot.recent:
        assert human_bytes(association.bytes) in recent
    for size in (snapshot.storage.free_bytes, snapshot.storage.total_bytes, snapshot.storage.used_bytes):
        assert human_bytes(size) in page.text["storage"]
    assert "/srv/pacs/received" in page.text["storage"]
    assert "server.max_associations" in page.text["config"]
    # Below the watermark: the administrator is told what it means.
    alerts = page.text["alerts"]
    assert "below its free-space watermark" in alerts and "0xA700 (Out of resources)" in alerts

    screenshot = tmp_path / "status-page.png"
    chromium(tmp_path, monitor.url + "/", f"--screenshot={screenshot}")
    assert screenshot.read_bytes().startswith(b"\x89PNG") and screenshot.stat().st_size > 20_000
    print(f"status page screenshot: {screenshot}")


@pytest.mark.usefixtures("_chromium_present")
def test_page_before_the_first_snapshot(monitor: MonitorProcess, tmp_path: Path) -> None:
    page = _Page(chromium(tmp_path, monitor.url + "/", "--dump-dom"))
    assert "Waiting for the first status report from the server" in page.text["alerts"]
    assert page.text["page-error"].strip() == ""
