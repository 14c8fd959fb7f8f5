"""The load runner's own logic (bench/load): log parsing, statistics, process
accounting, corpus digests and the report. Fast, no receivers started; the
runner end to end is ``python -m bench.load --quick`` (CI runs it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.load import corpora, procstats, receivers, report, runner, sender

STORESCU_LOG = """\
02:28:13.770.100 INFO Requesting Association
02:28:13.770.241 INFO Sending Store Request (MsgID 1, CT)
XMIT: .
02:28:13.770.804 INFO Received Store Response (Success)
02:28:13.770.876 INFO Sending Store Request (MsgID 2, CT)
02:28:13.771.249 INFO Received Store Response (Refused: OutOfResources)
23:59:59.999.000 INFO Sending Store Request (MsgID 3, CT)
00:00:00.001.000 INFO Received Store Response (Success)
02:28:14.000.000 ERROR Store SCU Failed: 0006:0213 Peer aborted Association
"""


def test_parse_storescu_log() -> None:
    log = sender.parse_storescu_log(STORESCU_LOG)
    assert log.successes == 2
    assert log.failures == ["Received Store Response (Refused: OutOfResources)"]
    assert log.errors == ["Store SCU Failed: 0006:0213 Peer aborted Association"]
    assert [round(x * 1e6) for x in log.latencies] == [563, 373, 2000]  # the last one across midnight


def test_slices_round_robin() -> None:
    files = list(range(10))
    parts = sender.slices(files, 4)  # type: ignore[arg-type]
    assert parts == [[0, 4, 8], [1, 5, 9], [2, 6], [3, 7]]
    assert sender.slices(files[:2], 16) == [[0], [1]]  # type: ignore[arg-type]


#: A child that sleeps, prints its time.perf_counter() (system-wide CLOCK_MONOTONIC) and exits at once.
EXIT_AT = "import os, sys, time; time.sleep(float(sys.argv[1])); print(time.perf_counter(), flush=True); os._exit(0)"


def test_wait_all_sees_each_exit_when_it_happens() -> None:
    """The load's wall time ends when the last storescu exits, not at the next step of a polling loop:
    Popen.wait(timeout) sleeps in steps doubling up to 50 ms, which saw these exits ~25 ms late in
    the median (spread over more than one step, whatever the start-up takes)."""
    late = []
    for sleep in (0.06, 0.075, 0.09, 0.105, 0.12):
        child = subprocess.Popen([sys.executable, "-c", EXIT_AT, str(sleep)], stdout=subprocess.PIPE)
        codes, ended = sender.wait_all([child], time.perf_counter() + 60)
        assert codes == [0]
        assert child.stdout is not None
        late.append(ended - float(child.stdout.read()))
        child.stdout.close()
    assert min(late) >= 0
    assert sorted(late)[2] < 0.01, late


def test_wait_all_gives_exit_codes_in_order_and_kills_at_the_deadline() -> None:
    failed = subprocess.Popen(["sh", "-c", "exit 3"])
    stuck = subprocess.Popen(["sleep", "30"])
    done = subprocess.Popen(["true"])
    codes, _ended = sender.wait_all([failed, stuck, done], time.perf_counter() + 0.5)
    assert codes == [3, -9, 0]
    assert all(proc.returncode is not None for proc in (failed, stuck, done))  # reaped: no zombie left


def test_percentile() -> None:
    assert runner.percentile([], 50) is None
    assert runner.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert runner.percentile([float(i) for i in range(101)], 99) == pytest.approx(99.0)
    assert runner.percentile([0.0, 10.0], 25) == pytest.approx(2.5)


def _run(round_: int, receiver: str, rate: float, errors: list[str] | None = None) -> runner.Run:
    run = runner.Run(round_, "ct-k1", receiver, 1, False, 10, 5_000_000)
    run.images_per_s, run.cpu_ms_per_image, run.peak_rss_mib = rate, 1000 / rate, 50.0
    run.received = run.exact = 10
    run.errors = errors or []
    return run


def test_ratios_pair_runs_of_the_same_round() -> None:
    runs = [_run(1, "fastscp", 400), _run(1, "storescp+B", 200), _run(2, "fastscp", 300),
            _run(2, "storescp+B", 300), _run(3, "fastscp", 500), _run(3, "storescp+B", 100, ["lost files"])]
    table = runner.ratios(runs)
    assert table["ct-k1"]["storescp+B"]["per_round"] == [2.0, 1.0]  # round 3 failed: not paired
    assert table["ct-k1"]["storescp+B"]["median"] == 1.5
    summary = runner.summarize(runs)
    assert summary["ct-k1"]["fastscp"]["images_per_s"] == 400
    assert summary["ct-k1"]["storescp+B"]["images_per_s"] == 250  # failed round left out
    assert summary["ct-k1"]["storescp+B"]["failed_rounds"] == 1


def test_report_markdown_and_targets() -> None:
    runs = [_run(1, "fastscp", 400), _run(1, "storescp+B", 200), _run(1, "orthanc", 250),
            _run(1, "fastscp-nofsync", 500)]
    summary, ratios = runner.summarize(runs), runner.ratios(runs)
    result = {
        "mode": "quick", "rounds": 1, "started": "2026-01-01T00:00:00+00:00",
        "environment": {"fastscp": "0.1.0", "storescp": "dcmtk", "orthanc": "Orthanc", "pynetdicom": "3",
                        "python": "3.11", "cpus": "2"},
        "corpora": {"ct": "10 x CT"},
        "scenarios": [{"name": "ct-k1", "corpus": "ct", "k": 1, "limit": None, "note": ""}],
        "summary": summary, "ratios": ratios, "skipped": ["x: not installed"], "errors": [],
        "runs": [r.to_dict() for r in runs],
    }
    result["targets"] = report.targets(summary, {"fastscp": ratios,
                                                 "fastscp-nofsync": runner.ratios(runs, subject="fastscp-nofsync")})
    text = report.markdown(result)
    assert "| storescp+B | 200 |" in text and "2.00x" in text
    # fsync never against storescp +B (1x) and Orthanc (2x); fsync always against storescp +B (0.6x at K=1).
    assert "| ct-k1: fastscp-nofsync ≥ 1x storescp+B (images/s) | 2.5 | yes |" in text
    assert "| ct-k1: fastscp-nofsync ≥ 2x orthanc (images/s) | 2.0 | yes |" in text
    assert "| ct-k1: fastscp ≥ 0.6x storescp+B (images/s) | 2.0 | yes |" in text
    assert "| ct-k4: fastscp ≥ 0.8x storescp+B (images/s) | – | – |" in text  # not run: not met either
    assert "- x: not installed" in text


def test_cpu_bounds_say_what_no_receiver_code_can_reach() -> None:
    # mr-k4 as measured on 2026-12-05: fastscp's kernel time alone, with storescp's cheaper senders,
    # caps it at 2 / (0.175 + 0.14) ms = 6,349 images/s, 0.73x storescp+B's 8,722; Orthanc's 2,000 is
    # within reach. Its k16 senders spend 0.35 ms against 0.215 at k4: 0.9x k16/k4 takes a receiver of
    # (0.9 x 0.35 - 0.215) / 0.1 = 1.0 ms per image; fastscp's 0.28 shows at most 0.495 / 0.63.
    # fsync always waited for the disk at k4 (1.0 of 2 CPUs busy): more associations may gain, no bound.
    summary = {
        "mr-k4": {"fastscp-nofsync": {"load_kernel_ms_per_image": 0.175, "sender_cpu_ms_per_image": 0.215,
                                      "load_cpu_ms_per_image": 0.28, "images_per_s": 4000},
                  "fastscp": {"sender_cpu_ms_per_image": 0.2, "load_cpu_ms_per_image": 0.3, "images_per_s": 2000},
                  "storescp+B": {"sender_cpu_ms_per_image": 0.14, "images_per_s": 8722},
                  "orthanc": {"sender_cpu_ms_per_image": 0.3, "images_per_s": 2000}},
        "mr-k16": {"fastscp-nofsync": {"sender_cpu_ms_per_image": 0.35, "load_cpu_ms_per_image": 0.3},
                   "fastscp": {"sender_cpu_ms_per_image": 0.3}},
    }
    bounds = {b["target"]: b for b in report.cpu_bounds(summary, 2)}
    assert set(bounds) == {"mr-k4: fastscp-nofsync ≥ 1x storescp+B (images/s)",
                           "mr-k4: fastscp-nofsync ≥ 2x orthanc (images/s)",
                           "fastscp-nofsync: mr-k16 ≥ 0.9x mr-k4 (images/s)",
                           "fastscp: mr-k16 ≥ 0.9x mr-k4 (images/s)"}
    waited = bounds["fastscp: mr-k16 ≥ 0.9x mr-k4 (images/s)"]
    assert waited["reachable"] is None and waited["how"].startswith("no bound: 1.00 of 2 CPUs busy at mr-k4")
    versus_storescp = bounds["mr-k4: fastscp-nofsync ≥ 1x storescp+B (images/s)"]
    assert (versus_storescp["bound"], versus_storescp["reachable"]) == (0.73, False)
    versus_orthanc = bounds["mr-k4: fastscp-nofsync ≥ 2x orthanc (images/s)"]
    assert (versus_orthanc["bound"], versus_orthanc["reachable"]) == (2.56, True)  # its own senders: cheaper
    scaling = bounds["fastscp-nofsync: mr-k16 ≥ 0.9x mr-k4 (images/s)"]
    assert (scaling["bound"], scaling["reachable"], scaling["needs_ms"]) == (0.79, False, 1.0)
    result = {"mode": "full", "rounds": 1, "started": "2026-12-05T00:00:00+00:00",
              "environment": {"fastscp": "x", "storescp": "dcmtk", "orthanc": "Orthanc", "pynetdicom": "3",
                              "python": "3.11", "cpus": "2"},
              "corpora": {}, "scenarios": [], "summary": {}, "ratios": {}, "targets": [], "skipped": [],
              "errors": [], "runs": [], "cpu_bounds": list(bounds.values())}
    assert ("| mr-k4: fastscp-nofsync ≥ 1x storescp+B (images/s) | 0.73 | **no** | no user time: 2 CPUs / "
            "(0.175 ms kernel + 0.140 ms senders) |") in report.markdown(result)


def test_load_budget_table_adds_the_senders_cpu_to_the_receivers() -> None:
    fastscp, storescp = _run(1, "fastscp", 2000), _run(1, "storescp+B", 4000)
    fastscp.load_cpu_ms_per_image, fastscp.sender_cpu_s = 0.7, 0.002  # 10 files: 0.2 ms each
    fastscp.load_cpu_ms_by_process = {"workers": 0.45, "indexer": 0.2, "supervisor": 0.05}
    fastscp.load_kernel_ms_per_image, storescp.load_kernel_ms_per_image = 0.3, 0.12
    storescp.load_cpu_ms_per_image, storescp.sender_cpu_s = 0.2, 0.0015
    summary = runner.summarize([fastscp, storescp])
    summary["ct-k1"]["orthanc"] = {"images_per_s": 250}  # from a result of an older bench: no row
    result = {"scenarios": [{"name": "ct-k1"}], "summary": summary}
    rows = [line for line in report.load_budget_table(result) if line.startswith("| ct-k1")]
    assert rows == [
        "| ct-k1 | fastscp | 0.45 | 0.20 | – | 0.05 | – | – | – | 0.70 | 0.30 | 0.20 | 0.90 | 2,000 | 1.80 |",
        "| ct-k1 | storescp+B | – | – | – | – | – | – | – | 0.20 | 0.12 | 0.15 | 0.35 | 4,000 | 1.40 |",
    ]


def test_tree_monitor_counts_children_and_peak_rss() -> None:
    # A parent that forks a child which burns CPU and touches ~64 MiB, then exits.
    code = (
        "import os, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    b = bytearray(64 << 20)\n"
        "    t = time.process_time()\n"
        "    while time.process_time() - t < 0.3: pass\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "time.sleep(5)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        monitor = procstats.TreeMonitor(proc.pid, interval=0.02).start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and monitor.sample().cpu_seconds < 0.3:
            time.sleep(0.05)
        snapshot = monitor.stop()
        assert snapshot.cpu_seconds >= 0.28  # the reaped child's time is in the parent's cutime
        assert monitor.peak_rss_mib() >= 60
    finally:
        proc.kill()
        proc.wait()


def test_tree_monitor_splits_kernel_time_by_role() -> None:
    # Two processes after the mark: one spends its CPU in user space, one in the kernel (zeroing pages
    # for reads of /dev/zero); cpu_by_role(kernel=True) tells them apart.
    # (Not time.process_time() in the loop: it is a system call; time.monotonic() is not, by the vDSO.)
    user = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 1: sum(range(10000))\ntime.sleep(5)\n"
    kernel = ("import os, time\nfd = os.open('/dev/zero', os.O_RDONLY)\nt = time.monotonic()\n"
              "while time.monotonic() - t < 1: os.read(fd, 4 << 20)\ntime.sleep(5)\n")
    spent = {}
    for name, code in (("user", user), ("kernel", kernel)):
        proc = subprocess.Popen([sys.executable, "-c", f"import time\ntime.sleep(0.3)\n{code}"])
        try:
            monitor = procstats.TreeMonitor(proc.pid, interval=0.02)
            monitor.mark()  # before the work: the interpreter's start is done, its sleep not
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and monitor.sample().cpu_seconds < 0.45:
                time.sleep(0.05)
            spent[name] = (monitor.cpu_by_role(lambda _pid, _comm: "all")["all"],
                           monitor.cpu_by_role(lambda _pid, _comm: "all", kernel=True)["all"])
        finally:
            proc.kill()
            proc.wait()
    (user_cpu, user_kernel), (kernel_cpu, kernel_kernel) = spent["user"], spent["kernel"]
    assert user_cpu >= 0.35 and kernel_cpu >= 0.35
    assert user_kernel <= 0.25 * user_cpu
    assert kernel_kernel >= 0.5 * kernel_cpu


def test_dataset_digest_matches_the_bytes_after_file_meta(tmp_path: Path) -> None:
    from fastscp.dicom.synthetic import write_series

    (path,) = write_series(str(tmp_path), 1, rows=8, columns=8)
    data = Path(path).read_bytes()
    offset = corpora.dataset_offset(path)
    assert data[offset : offset + 2] == b"\x08\x00"  # the data set starts at group 0008
    length, digest = corpora.dataset_digest(path)
    import hashlib

    assert (length, digest) == (len(data) - offset, hashlib.sha256(data[offset:]).hexdigest())
    assert os.path.getsize(path) == offset + length


def test_profile_summary_splits_association_threads(tmp_path: Path) -> None:
    raw = tmp_path / "p.txt"
    raw.write_text(
        'process 1:"python -m fastscp.cli serve";run (fastscp/runtime/worker.py:10);'
        "Association.run (fastscp/net/association.py:5);IncomingFile.write (fastscp/storage/area.py:99) 30\n"
        'process 1:"python -m fastscp.cli serve";run (fastscp/runtime/worker.py:10);'
        "Association.run (fastscp/net/association.py:5);PDUStream._fill (fastscp/net/association.py:70) 10\n"
        'process 2:"python -m fastscp.cli serve";Indexer.run (fastscp/index/indexer.py:3);'
        "Index.add (fastscp/index/database.py:7) 5\n"
    )
    text = report.profile_summary(raw)
    assert "association threads: 40 samples" in text
    assert "| `IncomingFile.write (storage/area.py)` | 75.0 | 75.0 |" in text
    assert "other threads: 5 samples" in text and "| `Index.add (index/database.py)` | 100.0 | 100.0 |" in text


def test_trash_keeps_finished_runs_until_the_disk_needs_the_room(tmp_path: Path) -> None:
    """A run's files are not deleted right after it (ext4 would make the next run's files slowly:
    runner.Trash); only when the next run needs the room, and then with a pause."""
    trash = runner.Trash(tmp_path)
    for name in ("r1-ct-k1-fastscp", "r1-ct-k1-storescp+B"):
        (tmp_path / name / "storage").mkdir(parents=True)
        (tmp_path / name / "storage" / "a.dcm").write_bytes(b"DICM")
        trash.add(tmp_path / name)
        assert not (tmp_path / name).exists(), "the name is free for the next run at once"
    assert len(list(trash.folder.iterdir())) == 2
    # A later benchmark shares the trash (bench.load keeps its folders there at its end): the same run names.
    (tmp_path / "r1-ct-k1-fastscp" / "storage").mkdir(parents=True)
    runner.Trash(tmp_path).add(tmp_path / "r1-ct-k1-fastscp")
    assert len(list(trash.folder.iterdir())) == 3
    assert sorted(p.name for p in trash.folder.glob("*/*")) == ["r1-ct-k1-fastscp", "r1-ct-k1-fastscp",
                                                                "r1-ct-k1-storescp+B"]
    said: list[str] = []
    trash.make_room(1 << 20, said.append)
    assert len(list(trash.folder.iterdir())) == 3 and said == [], "room enough: nothing deleted"
    trash.INODE_REUSE_S = 0.0
    trash.make_room(shutil.disk_usage(tmp_path).free, said.append)
    assert not trash.folder.exists() and len(said) == 1 and "inodes" in said[0]


def test_status_is_read_after_a_burst_of_log_lines(tmp_path: Path) -> None:
    """The status page's URL is in the log's first lines; a burst's action log lines (10,000 CT:
    megabytes) must not hide it (bench.load's wait for derived work never ended)."""
    import http.server
    import json
    import threading

    class Status(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            body = json.dumps({"index": {"lag": 0}}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Status)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    log = tmp_path / "receiver.log"
    action = "INFO fastscp.action: stored BENCHCT/2026/1_CT/1.2.826.0.1.3680043.8.498.1.dcm (525246 bytes)\n"
    log.write_text(f"INFO fastscp.supervisor: fastscp listening; status page http://127.0.0.1:{server.server_port}\n"
                   + action * 30_000)
    try:
        running = receivers.Running(receivers.default_receivers()["fastscp"], tmp_path, 0, tmp_path,
                                    None, log)  # type: ignore[arg-type]
        assert running.status() == {"index": {"lag": 0}}
    finally:
        server.shutdown()
        server.server_close()
