"""The post-store stage of a running server: thumbnails mirroring the layout and
a scan sheet per quiet study, remade when more images arrive."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import duckdb
import numpy as np
import pydicom
import pytest
from PIL import Image

from fastscp.dicom.synthetic import write_series
from tests.conftest import dcmtk, wait_until

pytestmark = pytest.mark.dcmtk


def test_thumbnails_and_scan_sheet_of_a_quiet_study(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "fastscp.yaml"
    config.write_text("scansheet:\n  study_timeout: 1\nthumbnails:\n  size: 64\n")
    server = start_server(config=config)
    series = write_series(str(tmp_path / "ct"), 6, rows=96, columns=80, patient_id="PS1")
    dcmtk("storescu", "-aec", server.ae_title, "-xe", "127.0.0.1", str(server.port), *series[:4])
    stored = server.stored_files()
    assert len(stored) == 4
    thumbnails = [server.storage / "thumbnails" / p.relative_to(server.storage).with_suffix(".jpg") for p in stored]
    wait_until(lambda: all(t.exists() for t in thumbnails), what="the thumbnails")
    with Image.open(thumbnails[0]) as image:
        assert image.size == (53, 64)  # (width, height): 80 columns x 96 rows, long side 64, aspect kept
        assert np.asarray(image).std() > 5, "not blank"

    study = stored[0].parent.parent  # PatientID/StudyDate_StudyUID
    png, html = study / "scansheet.png", study / "scansheet.html"
    wait_until(lambda: png.exists() and html.exists(), timeout=30, what="the scan sheet")
    with Image.open(png) as sheet:
        assert sheet.width >= 400 and np.asarray(sheet.convert("L")).std() > 10
    text = html.read_text()
    # The study's patient in the header, its one series with its count, a thumbnail per instance.
    assert ">PS1</td>" in text and "Synthetic" in text
    assert text.count('<div class="count">') == 1 and '<div class="count">4 instances</div>' in text
    assert text.count('<span class="thumb"') == 4

    # More images of the study: the sheet is made again, with all of them.
    first = os.stat(png).st_mtime_ns
    dcmtk("storescu", "-aec", server.ae_title, "-xe", "127.0.0.1", str(server.port), *series[4:])
    wait_until(lambda: os.stat(png).st_mtime_ns != first, timeout=30, what="the scan sheet to be remade")
    wait_until(lambda: "(6 instances)" in server.log_text(), what="the log line of the remade sheet")
    assert '<div class="count">6 instances</div>' in html.read_text()
    assert server.stop() == 0
    # The thumbnails' paths are in the index, beside their instances.
    rows = duckdb.connect(str(server.index), read_only=True).execute(
        "SELECT i.path, t.thumbnail_path FROM instances i JOIN thumbnails t USING (path)").fetchall()
    assert len(rows) == 6
    for path, thumbnail in rows:
        assert (server.storage / thumbnail).is_file()
        assert Path(thumbnail).with_suffix("") == Path("thumbnails", path).with_suffix("")


def test_scansheet_command_while_the_server_runs(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fastscp.query.client import QueryClient
    from tests.e2e.test_server import fastscp

    config = tmp_path / "fastscp.yaml"
    config.write_text("scansheet:\n  study_timeout: 3600\n")  # the server makes its sheet only when it stops
    server = start_server(config=config)
    series = write_series(str(tmp_path / "ct"), 3, rows=32, columns=32, patient_id="PS2")
    dcmtk("storescu", "-aec", server.ae_title, "-xe", "127.0.0.1", str(server.port), *series)
    study_uid = str(pydicom.dcmread(series[0], stop_before_pixels=True).StudyInstanceUID)
    wait_until(lambda: QueryClient(str(server.index)).stats().instances == 3, what="the study in the index")

    result = fastscp("scansheet", study_uid, "--storage-dir", str(server.storage), "--index-db", str(server.index))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    study = server.stored_files()[0].parent.parent  # PatientID/StudyDate_StudyUID: where the server puts it
    png = study / "scansheet.png"
    assert png.exists() and "3 instances" in result.stdout
    assert "PS2" in (study / "scansheet.html").read_text()
    made_by_hand = os.stat(png).st_mtime_ns

    assert server.stop() == 0
    server.wait_for_log(f"scan sheet of study {study_uid} (3 instances)")
    # The server's own sheet replaced it: one folder for both.
    assert list(server.storage.rglob("scansheet.png")) == [png]
    assert os.stat(png).st_mtime_ns != made_by_hand


def test_thumbnails_and_scan_sheets_get_the_storage_modes(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """They show patient data as the images do: storage.file_mode/dir_mode, not 0644/0755 (issue 10)."""
    from tests.e2e.test_server import fastscp

    config = tmp_path / "fastscp.yaml"
    config.write_text("storage:\n  file_mode: '0600'\n  dir_mode: '0700'\nscansheet:\n  study_timeout: 1\n")
    server = start_server(config=config)
    series = write_series(str(tmp_path / "ct"), 2, rows=32, columns=32, patient_id="PS3")
    dcmtk("storescu", "-aec", server.ae_title, "-xe", "127.0.0.1", str(server.port), *series)
    stored = server.stored_files()
    study = stored[0].parent.parent
    thumbnail = server.storage / "thumbnails" / stored[0].relative_to(server.storage).with_suffix(".jpg")
    wait_until(lambda: thumbnail.exists() and (study / "scansheet.html").exists(), timeout=30,
               what="a thumbnail and the scan sheet")
    made = [thumbnail, study / "scansheet.png", study / "scansheet.html"]
    assert {oct(p.stat().st_mode & 0o777) for p in made} == {"0o600"}
    folders = [thumbnail.parent, *thumbnail.parent.relative_to(server.storage).parents][:-1]
    assert {oct((server.storage / p).stat().st_mode & 0o777) for p in folders} == {"0o700"}

    study_uid = str(pydicom.dcmread(series[0], stop_before_pixels=True).StudyInstanceUID)
    (study / "scansheet.png").unlink()
    result = fastscp("scansheet", study_uid, "--config", str(config), "--storage-dir", str(server.storage),
                     "--index-db", str(server.index))
    assert result.returncode == 0, result.stderr
    assert oct((study / "scansheet.png").stat().st_mode & 0o777) == "0o600"


def test_a_stray_message_does_not_stop_the_post_store_stage(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The post-store socket takes a worker's instance records and association reports, up to BATCH_RECORDS a
    message; anything else is dropped."""
    import socket

    from fastscp.dicom.fields import HeaderFields
    from fastscp.index.records import ENCODER, InstanceRecord, ThumbnailMade
    from fastscp.poststore.client import BATCH_RECORDS, poststore_address

    server = start_server()
    series = write_series(str(tmp_path / "ct"), 2, rows=32, columns=32, patient_id="PS9")
    dcmtk("storescu", "-aec", server.ae_title, "-xe", "127.0.0.1", str(server.port), series[0])
    wait_until(lambda: any((server.storage / "thumbnails").rglob("*.jpg")), what="the first thumbnail")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.connect(poststore_address(str(server.index)))
        # More records in one message than a worker sends (the stage's queue is bounded by message).
        record = InstanceRecord(path="none.dcm", size=1, transfer_syntax_uid="1.2.840.10008.1.2.1",
                                calling_ae_title="X", called_ae_title="Y", peer_address="127.0.0.1:1",
                                received_at=0.0, header=HeaderFields())
        sock.send(ENCODER.encode([record] * (BATCH_RECORDS + 1)))
        sock.send(b"\xc1 not msgpack")
        sock.send(ENCODER.encode(ThumbnailMade(path="a.dcm", thumbnail_path="thumbnails/a.jpg")))  # the indexer's
        sock.send(ENCODER.encode({"path": "../../etc/passwd"}))
        sock.send(ENCODER.encode([ThumbnailMade(path="a.dcm", thumbnail_path="t.jpg")] * 10))  # not records
    dcmtk("storescu", "-aec", server.ae_title, "-xe", "127.0.0.1", str(server.port), series[1])
    wait_until(lambda: len(list((server.storage / "thumbnails").rglob("*.jpg"))) == 2, what="the second thumbnail")
    assert "post-store stage exited" not in server.log_text()  # it used to die on the first one (and restart)
    assert ("1 messages that are not a worker's instance records or association reports dropped "
            f"({BATCH_RECORDS + 1} records in one message, more than {BATCH_RECORDS})") in server.log_text()
    assert "none.dcm" not in server.log_text()
    assert server.stop() == 0


def _child_pid(server, name: str) -> int:  # type: ignore[no-untyped-def]
    """The PID of the server's child ``name`` ("post-store stage", "forwarder"), from its start-up log line."""
    server.wait_for_log(f"{name} started (pid")
    return int(re.findall(rf"{name} started \(pid (\d+)\)", server.log_text())[-1])


@contextlib.contextmanager
def _stage_stopped(server, tmp_path: Path, count: int, rows: int, patient_id: str) -> Iterator[int]:  # type: ignore[no-untyped-def]
    """The server's post-store stage stopped (SIGSTOP) while ``count`` CT images are stored, until the
    block ends (SIGCONT); yields its PID."""
    stage = _child_pid(server, "post-store stage")
    series = write_series(str(tmp_path / "ct"), count, rows=rows, columns=rows, patient_id=patient_id)
    os.kill(stage, signal.SIGSTOP)
    try:
        dcmtk("storescu", "-aec", server.ae_title, "-xe", "127.0.0.1", str(server.port), *series)
        assert len(server.stored_files()) == count
        yield stage
    finally:
        os.kill(stage, signal.SIGCONT)


@pytest.mark.parametrize("level", ["idle", "low", "normal"])
def test_derived_work_runs_at_server_derived_priority(start_server, tmp_path: Path, level: str) -> None:  # type: ignore[no-untyped-def]
    """The post-store stage, the forwarder and the indexer yield their CPU and disk to the workers
    (issue 13, lever 4); each child names its role in /proc/PID/comm (what bench.load reports CPU by)."""
    import yaml

    from fastscp.process.priority import io_priority, process_name

    config = tmp_path / "fastscp.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"derived_priority": level},
        "forwarding": {"destinations": {"pacs": {"ae_title": "DEST", "host": "127.0.0.1", "port": 9}},
                       "rules": [{"destinations": ["pacs"]}]}}))
    server = start_server(config=config)
    stage, forwarder = _child_pid(server, "post-store stage"), _child_pid(server, "forwarder")
    workers = list(server.worker_pids().values())
    names = {process_name(pid) for pid in server.children()}
    assert {"fastscp-worker-", "fastscp-indexer", "fastscp-post-st", "fastscp-forward"} <= names, names
    assert process_name(stage) == "fastscp-post-st" and process_name(forwarder) == "fastscp-forward"

    def priority(pid: int) -> tuple[int, int, tuple[int, int]]:
        return os.sched_getscheduler(pid), os.getpriority(os.PRIO_PROCESS, pid), io_priority(pid)

    # The workers keep the supervisor's priority; the indexer, which they never wait for, yields too.
    normal = priority(server.process.pid)
    assert normal[:2] == (os.SCHED_OTHER, 0) and normal[2][0] != 3
    indexer = next(pid for pid in server.children() if process_name(pid) == "fastscp-indexer")
    assert {priority(pid) for pid in workers} == {normal}
    for pid in (stage, forwarder, indexer):
        if level == "idle":
            assert (priority(pid)[0], priority(pid)[2][0]) == (os.SCHED_IDLE, 3)
        elif level == "low":
            assert priority(pid) == (os.SCHED_OTHER, 19, (2, 7))
        else:
            assert priority(pid) == normal
    assert server.stop() == 0


def test_a_stalled_post_store_stage_catches_up_without_losing_records(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """While the stage does not read (SIGSTOP: what SCHED_IDLE does to it under saturation), its socket
    fills; the workers keep the records and the stage makes every thumbnail once it runs again, its lag
    on the status page meanwhile. The old client dropped what did not fit the socket (~100 records)."""
    config = tmp_path / "fastscp.yaml"
    config.write_text("scansheet:\n  enabled: false\n")
    server = start_server(config=config, monitor="127.0.0.1:0", workers=1)
    url = server.monitor_url()

    def poststore() -> dict:  # type: ignore[type-arg]
        with urllib.request.urlopen(url + "/status.json", timeout=10) as response:
            return json.loads(response.read())["poststore"] or {}

    count = 600
    with _stage_stopped(server, tmp_path, count, 256, "PS10"):
        time.sleep(1.0)
        assert not list((server.storage / "thumbnails").rglob("*.jpg"))
    lags: list[dict] = []  # type: ignore[type-arg]

    def caught_up() -> bool:
        lags.append(poststore())
        return lags[-1].get("thumbnails") == count and lags[-1].get("waiting") == 0

    wait_until(caught_up, timeout=120, what=f"{count} thumbnails")
    assert len(list((server.storage / "thumbnails").rglob("*.jpg"))) == count
    # A snapshot may come before the stage's first report ({}): the lag must show in a later one.
    assert any(lag.get("waiting", 0) > 0 and lag.get("oldest_seconds", 0) >= 1.0 for lag in lags), lags
    assert "records dropped; no thumbnails" not in server.log_text()
    assert server.stop() == 0


def test_records_the_stage_had_not_taken_at_stop_get_thumbnails_at_the_next_start(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The server stops while its stage lags (SIGSTOP until the supervisor has asked it to stop): the records
    in the worker's backlog go to a file under .incoming at its exit, those in the stage's socket at the
    stage's, and the next start makes their thumbnails. Before, the worker dropped its backlog at exit
    ("records dropped; no thumbnails") and the socket's records went with the socket."""
    from fastscp.poststore.client import kept_folder
    from tests.conftest import sigterm_pending

    config = tmp_path / "fastscp.yaml"
    config.write_text("scansheet:\n  enabled: false\n")
    server = start_server(config=config, workers=1)
    count = 400
    with _stage_stopped(server, tmp_path, count, 64, "PS12") as stage:
        server.signal(signal.SIGTERM)  # the workers stop first, then the stage
        wait_until(lambda: sigterm_pending(stage), timeout=60, what="the stage's SIGTERM")
    assert server.process.wait(60) == 0
    thumbnails = server.storage / "thumbnails"
    assert not list(thumbnails.rglob("*.jpg"))  # a stopping stage starts nothing new
    folder = Path(kept_folder(str(server.storage)))
    assert len(list(folder.iterdir())) == 2, server.log_text()  # the worker's file and the stage's
    assert "records dropped; no thumbnails" not in server.log_text()
    again = start_server(config=config, workers=1, storage=server.storage)
    wait_until(lambda: len(list(thumbnails.rglob("*.jpg"))) == count, timeout=120, what=f"{count} thumbnails")
    wait_until(lambda: not list(folder.iterdir()), what="the kept files taken")
    assert "post-store: took back " in again.log_text()
    assert again.stop() == 0
