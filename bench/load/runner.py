"""Scenarios, rounds and one measured run: receiver up, load, check, receiver down."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.load import procstats, receivers, sender
from bench.load.corpora import Corpus, SourceFile, dataset_digest

MAIN = ("fastscp", "fastscp-nofsync", "storescp", "storescp+B", "orthanc", "pynetdicom")
#: Sender with Nagle on: dcmtk-based receivers stall on delayed ACKs.
NAGLE = ("fastscp", "storescp+B", "storescp+B-stock", "orthanc", "orthanc-stock", "pynetdicom")
#: Sender with Nagle off, receivers as installed vs tuned.
STOCK = ("fastscp", "storescp+B", "storescp+B-stock", "orthanc", "orthanc-stock")


#: The burst: scan sheets 1 s after a study's last image (the default waits 60 s), so the time until
#: they are complete is the catch-up, not the wait.
BURST_CONFIG = "scansheet:\n  study_timeout: 1\n"
BURST_NOTE = "one study; then the time until index, thumbnails and scan sheets are complete"
#: Longest wait for the derived work after a burst, seconds.
DERIVED_WAIT = 1800.0
#: Longest wait, after any other load, for the index and the post-store stage to catch up, seconds.
CAUGHT_UP_WAIT = 120.0

#: fastscp's children by /proc/PID/comm (fastscp.process.priority.set_process_name: 15 bytes of
#: "fastscp-worker-0", ...); the supervisor is the tree's root.
FASTSCP_ROLES = {"fastscp-worker-": "workers", "fastscp-indexer": "indexer", "fastscp-post-st": "post-store",
                 "fastscp-monitor": "monitor", "fastscp-forward": "forwarder"}


@dataclass(frozen=True)
class Scenario:
    name: str
    corpus: str  # ct | mr | large | mixed
    k: int  # concurrent storescu associations
    nagle: bool = False  # storescu without TCP_NODELAY=1 (Debian's default)
    limit: int | None = None  # first N files of the corpus
    receivers: tuple[str, ...] = MAIN
    note: str = ""
    #: fastscp: after the load, wait until the index, thumbnails and scan sheets are complete and time it.
    burst: bool = False
    #: YAML given to fastscp receivers as their --config file.
    fastscp_config: str = ""


@dataclass(frozen=True)
class Plan:
    """Corpus sizes and scenarios of one mode."""

    sizes: dict[str, int]
    scenarios: tuple[Scenario, ...]
    rounds: int


def plan(quick: bool) -> Plan:
    if quick:
        nagle_files = 10
        return Plan(
            sizes={"ct": 40, "mr": 200, "large": 128 << 20, "mixed": 5, "burst": 60},
            scenarios=(
                Scenario("ct-k1", "ct", 1),
                Scenario("ct-k4", "ct", 4),
                Scenario("mr-k4", "mr", 4),
                Scenario("mixed-k1", "mixed", 1),
                Scenario("large-k1", "large", 1, receivers=("fastscp", "storescp+B")),
                Scenario("ct-k1-nagle", "ct", 1, nagle=True, limit=nagle_files,
                         receivers=("fastscp", "storescp+B", "orthanc")),
                Scenario("burst-k4", "burst", 4, receivers=("fastscp",), burst=True, fastscp_config=BURST_CONFIG,
                         note=BURST_NOTE),
            ),
            rounds=1,
        )
    nagle_files = 60
    return Plan(
        # 1,000 CT: at ~800 images/s a run of 400 lasted half a second, start-up transients included.
        sizes={"ct": 1000, "mr": 2000, "large": 1 << 30, "mixed": 30, "burst": 10_000},
        scenarios=(
            Scenario("ct-k1", "ct", 1),
            Scenario("ct-k4", "ct", 4),
            Scenario("ct-k16", "ct", 16),
            Scenario("mr-k1", "mr", 1),
            Scenario("mr-k4", "mr", 4),
            Scenario("mr-k16", "mr", 16),
            Scenario("mixed-k1", "mixed", 1),
            Scenario("mixed-k4", "mixed", 4),
            Scenario("large-k1", "large", 1),
            Scenario("ct-k1-nagle", "ct", 1, nagle=True, limit=nagle_files, receivers=NAGLE,
                     note="storescu with Nagle on (no TCP_NODELAY, Debian's default)"),
            Scenario("ct-k4-nagle", "ct", 4, nagle=True, limit=nagle_files, receivers=NAGLE,
                     note="storescu with Nagle on (no TCP_NODELAY, Debian's default)"),
            Scenario("ct-k4-stock", "ct", 4, limit=nagle_files, receivers=STOCK,
                     note="storescu with TCP_NODELAY=1; -stock receivers without it"),
            Scenario("burst-k4", "burst", 4, receivers=("fastscp", "fastscp-nofsync"), burst=True,
                     fastscp_config=BURST_CONFIG, note=BURST_NOTE),
        ),
        rounds=3,
    )


@dataclass
class Run:
    round: int
    scenario: str
    receiver: str
    k: int
    nagle: bool
    files: int
    dataset_bytes: int
    started_at: float = 0.0
    wall_s: float = 0.0
    images_per_s: float = 0.0
    mb_per_s: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    successes: int = 0
    cpu_s: float = 0.0
    cpu_ms_per_image: float = 0.0
    sender_cpu_s: float = 0.0
    peak_rss_mib: float = 0.0
    worker_peak_rss_mib: float | None = None
    received: int = 0
    exact: int = 0
    other_files: int = 0
    index_rows: int | None = None
    #: CPU ms per image of each process kind (fastscp: supervisor, workers, indexer, post-store, monitor).
    cpu_ms_by_process: dict[str, float] = field(default_factory=dict)
    #: The same until the last storescu exited (the rest is fastscp's catch-up: derived work, index
    #: commits), and the receiver's total then: what competed with the senders for the CPUs.
    load_cpu_ms_by_process: dict[str, float] = field(default_factory=dict)
    load_cpu_ms_per_image: float = 0.0
    #: Of that, the receiver's system time (by process, and in all): what no faster code of its own would spare.
    load_kernel_ms_by_process: dict[str, float] = field(default_factory=dict)
    load_kernel_ms_per_image: float = 0.0
    #: The largest sum of RSS over the receiver's processes at one moment, MiB; and of their PSS.
    total_rss_mib: float = 0.0
    total_pss_mib: float = 0.0
    #: Burst: seconds from the last storescu's exit until the index, the thumbnails and the scan sheets
    #: were complete (None: not within the wait).
    derived_s: dict[str, float | None] = field(default_factory=dict)
    exit_code: int | None = None
    storescu_exit_codes: list[int] = field(default_factory=list)
    foreign_cores: float = 0.0
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def sender_cpu_ms_per_image(self) -> float:
        """The storescu senders' CPU per image (they share the CPUs with the receiver)."""
        return self.sender_cpu_s / self.files * 1e3 if self.files else 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation; None if empty."""
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def wait_for_quiet(max_cores: float, max_wait: float, log) -> float:  # type: ignore[no-untyped-def]
    """Wait until other processes use less than ``max_cores``; returns the last reading."""
    deadline = time.monotonic() + max_wait
    load = procstats.foreign_load(0.5)
    warned = False
    while load > max_cores and time.monotonic() < deadline:
        if not warned:
            log(f"  machine busy ({load:.2f} cores used by others); waiting up to {max_wait:.0f} s ...")
            warned = True
        time.sleep(2)
        load = procstats.foreign_load(1.0)
    return load


def _fastscp_workers(running: receivers.Running) -> set[int]:
    """The supervisor's children except the indexer (the one holding the index file)."""
    index = str(running.index_path) if running.index_path else None
    out = set()
    for pid in procstats.children(running.pid):
        paths = procstats.open_paths(pid)
        if index and any(p.startswith(index) for p in paths):
            continue
        out.add(pid)
    return out


def verify(run: Run, running: receivers.Running, expected: list[SourceFile]) -> None:
    """Count what arrived and how much of it is byte-exact; record errors."""
    dicom, other = running.received_files()
    run.received, run.other_files = len(dicom), len(other)
    want = Counter(f.dataset_sha256 for f in expected)
    got = Counter(dataset_digest(p)[1] for p in dicom)
    run.exact = sum((want & got).values())
    name = running.receiver.name
    if run.received < len(expected):
        run.errors.append(f"{name}: {len(expected) - run.received} of {len(expected)} files missing")
    elif run.received > len(expected):
        run.notes.append(f"{run.received - len(expected)} more files than sent")
    if running.receiver.strict and run.exact != len(expected):
        run.errors.append(f"{name}: {len(expected) - run.exact} of {len(expected)} files not byte-exact")
    quarantined = running.quarantined()
    if quarantined:
        run.errors.append(f"{name}: {quarantined} files quarantined")


#: Where the benchmarks' receivers store (bench.load, bench.store_thread, bench.nodes), and the trash they
#: share (:class:`Trash`). On the project's disk, not in /tmp: /tmp is tmpfs on many machines (fsync
#: costs nothing there), and on these it creates files ~50x slower than elsewhere on the same ext4
#: (0.7 ms against 0.015 ms).
WORK_ROOT = Path(__file__).resolve().parent.parent / ".work"


class Trash:
    """Received files of finished runs, deleted only when the disk needs the room, then a pause.

    Why: ext4 does not reuse an inode for 60 s after its file was deleted
    (fs/ext4/ialloc.c, ``recently_deleted``), and it finds the next free
    inode by walking past each such one. Right after a run's 1,000 files
    were deleted, making a file in the next run cost 0.3-1 ms of CPU on
    this VM's disk (perf: ``recently_deleted``, ``find_inode_bit``) against
    20 us on a fresh filesystem: the receivers were measured making inodes,
    fastscp twice per image (the image and its thumbnail). A server that
    receives does not delete thousands of files a minute.
    """

    #: ext4's 60 s, and more while the inode table block is dirty: after a benchmark deleted its ~30,000
    #: files at its end, making a file under bench/.work took 120-148 us of kernel time for more than
    #: 70 s (13-17 under /tmp, the same file system, meanwhile), 10-17 again after 2 minutes.
    INODE_REUSE_S = 120.0
    #: Room kept free on the disk beyond a run's own need.
    MARGIN = 5 << 30

    def __init__(self, base: Path) -> None:
        self.folder = base / ".trash"

    def add(self, workdir: Path) -> None:
        """Keep a run's folder (its name is free again at once), under a name no earlier benchmark's
        folder in the same trash has."""
        self.folder.mkdir(parents=True, exist_ok=True)
        workdir.rename(Path(tempfile.mkdtemp(prefix=f"{workdir.name}-", dir=self.folder)) / workdir.name)

    def make_room(self, need: int, log) -> None:  # type: ignore[no-untyped-def]
        """Before a run storing ``need`` bytes: if the disk is short of them (and the margin),
        delete what is kept and wait until ext4 reuses its inodes."""
        if not self.folder.exists() or shutil.disk_usage(self.folder).free >= need + self.MARGIN:
            return
        log(f"deleting the files of earlier runs for room, then {self.INODE_REUSE_S:.0f} s for ext4 to reuse "
            "their inodes")
        self.empty()
        time.sleep(self.INODE_REUSE_S)

    def empty(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def run_once(scenario: Scenario, receiver: receivers.Receiver, corpus: Corpus, round_: int, workdir: Path, *,
             config: Path, profile: str, settle: float = 0.3, keep: bool = False,
             py_spy: list[str] | None = None, trash: Trash | None = None) -> Run:
    """One receiver under one scenario's load. ``py_spy`` (a ``py-spy record``
    command line without ``--pid``) attaches to the receiver for the load. ``trash``: where
    the run's files go when it is done (and an earlier run's in ``workdir``), instead of
    being deleted at once."""
    files = list(corpus.files[: scenario.limit] if scenario.limit else corpus.files)
    run = Run(round_, scenario.name, receiver.name, scenario.k, scenario.nagle, len(files),
              sum(f.dataset_length for f in files), started_at=time.time())
    if workdir.exists():
        if trash is not None:
            trash.add(workdir)
        else:
            shutil.rmtree(workdir)
    # The earlier runs' dirty pages go to disk now, not during this run: a receiver that does not
    # fsync (storescp) left ~500 MB whose writeback slowed the next receiver's fsyncs.
    os.sync()
    try:
        running = receivers.start(receiver, workdir, fastscp_config=scenario.fastscp_config)
    except receivers.ReceiverError as first:
        # Once more in a clean folder: the free port may have been taken meanwhile.
        shutil.rmtree(workdir, ignore_errors=True)
        try:
            running = receivers.start(receiver, workdir, fastscp_config=scenario.fastscp_config)
        except receivers.ReceiverError as exc:
            run.errors.append(f"{exc}\n(first attempt: {first})")
            return run
        run.notes.append(f"started at the second attempt; the first: {first}")
    try:
        spy = None
        if py_spy:
            spy = subprocess.Popen([*py_spy, "--pid", str(running.pid)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # attached and sampling before the load starts
        monitor = procstats.TreeMonitor(running.pid).start()
        cpu0 = monitor.mark()
        busy0 = procstats.system_busy_seconds()
        self0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        dimse_timeout = 900 if scenario.corpus == "large" else 120
        result = sender.send(running.port, receivers.AE_TITLE, files, scenario.k, workdir, nagle=scenario.nagle,
                             config=config, profile=profile, dimse_timeout=dimse_timeout)
        at_load_end = monitor.sample().cpu_seconds
        role = _role(receiver, running.pid)
        load_roles, load_kernel = monitor.cpu_by_role(role), monitor.cpu_by_role(role, kernel=True)
        if scenario.burst and receiver.kind == "fastscp":
            run.derived_s = wait_for_derived(running, len(files))
        elif receiver.kind == "fastscp" and not wait_for_caught_up(running, len(files)):
            run.notes.append(f"index or post-store stage not caught up within {CAUGHT_UP_WAIT:.0f} s: "
                             "CPU per image without the rest")
        time.sleep(settle)  # let asynchronous work (index commits) finish inside the window
        workers = _fastscp_workers(running) if receiver.kind == "fastscp" else set()
        cpu1 = monitor.stop().cpu_seconds
        window = time.perf_counter() - t0
        busy1 = procstats.system_busy_seconds()
        self1 = resource.getrusage(resource.RUSAGE_SELF)
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output and exits
            try:
                spy.wait(60)
            except subprocess.TimeoutExpired:
                spy.kill()
            run.notes.append("profiled with py-spy (attached; it competes for the CPUs)")
    finally:
        run.exit_code = running.stop()
    own = (self1.ru_utime - self0.ru_utime) + (self1.ru_stime - self0.ru_stime)
    run.wall_s = result.wall_seconds
    run.images_per_s = len(files) / result.wall_seconds
    run.mb_per_s = run.dataset_bytes / 1e6 / result.wall_seconds
    log = result.log
    run.successes = log.successes
    if log.latencies:
        run.p50_ms = percentile(log.latencies, 50) * 1e3  # type: ignore[operator]
        run.p99_ms = percentile(log.latencies, 99) * 1e3  # type: ignore[operator]
        run.mean_ms = statistics.fmean(log.latencies) * 1e3
    run.cpu_s = cpu1 - cpu0
    run.cpu_ms_per_image = run.cpu_s / len(files) * 1e3
    run.sender_cpu_s = result.sender_cpu_seconds
    run.peak_rss_mib = monitor.peak_rss_mib()
    run.total_rss_mib = monitor.peak_total_rss_kib / 1024
    run.total_pss_mib = monitor.peak_total_pss_kib / 1024

    def per_image_ms(by_role: dict[str, float]) -> dict[str, float]:
        return {name: seconds / len(files) * 1e3 for name, seconds in sorted(by_role.items())}

    run.cpu_ms_by_process = per_image_ms(monitor.cpu_by_role(role))
    run.load_cpu_ms_by_process = per_image_ms(load_roles)
    run.load_cpu_ms_per_image = (at_load_end - cpu0) / len(files) * 1e3
    run.load_kernel_ms_by_process = per_image_ms(load_kernel)
    run.load_kernel_ms_per_image = sum(load_kernel.values()) / len(files) * 1e3
    if workers:
        run.worker_peak_rss_mib = monitor.peak_rss_mib(workers)
    run.foreign_cores = max(0.0, (busy1 - busy0) - run.cpu_s - result.sender_cpu_seconds - own) / window
    run.storescu_exit_codes = result.exit_codes
    if any(result.exit_codes):
        tail = "; ".join(log.failures[:3] + log.errors[:3])
        run.errors.append(f"storescu exit codes {result.exit_codes}: {tail}")
    if log.successes != len(files):
        run.errors.append(f"{log.successes} of {len(files)} C-STOREs answered Success")
    verify(run, running, files)
    if receiver.kind == "fastscp":
        if run.exit_code != 0:
            run.errors.append(f"fastscp exited with {run.exit_code}:\n{running.log_tail()}")
        try:
            run.index_rows = running.index_count()
        except Exception as exc:  # a locked or missing index is a failure of the run
            run.errors.append(f"cannot read the index: {exc}")
        else:
            if run.index_rows is not None and run.index_rows != len(files):
                run.errors.append(f"index holds {run.index_rows} rows for {len(files)} files")
        if scenario.burst:
            check_derived(run, running, len(files))
    run.notes += running.notes
    if run.errors:
        run.notes.append(f"receiver log tail: {running.log_tail(1500)}")
    if not keep and not run.errors:
        if trash is not None:
            trash.add(workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return run


def _role(receiver: receivers.Receiver, root: int):  # type: ignore[no-untyped-def]
    """What :meth:`procstats.TreeMonitor.cpu_by_role` files each process of ``receiver`` under."""
    def role(pid: int, name: str) -> str:
        if receiver.kind != "fastscp":
            return receiver.kind  # storescp --fork: the listener and its children together
        if pid == root:
            return "supervisor"
        return FASTSCP_ROLES.get(name, "other")
    return role


def wait_for_derived(running: receivers.Running, count: int, wait: float = DERIVED_WAIT) -> dict[str, float | None]:
    """Seconds until fastscp's index, thumbnails and scan sheets were complete for ``count`` stored
    images (from its status page); None for what was not within ``wait``."""
    t0 = time.monotonic()
    done: dict[str, float | None] = {"index": None, "thumbnails": None, "scan sheets": None}
    while time.monotonic() - t0 < wait and None in done.values():
        status = running.status()
        now = time.monotonic() - t0
        if status is not None:
            index, stage = status["index"], status.get("poststore") or {}
            if done["index"] is None and index["lag"] == 0 and index["committed"] >= count:
                done["index"] = now
            if stage and not stage["waiting"]:
                if done["thumbnails"] is None and stage["thumbnails"] >= count:
                    done["thumbnails"] = now
                if done["thumbnails"] is not None and done["scan sheets"] is None and not stage["studies"]:
                    done["scan sheets"] = now
        time.sleep(0.1)
    return {name: None if t is None else round(t, 2) for name, t in done.items()}


def wait_for_caught_up(running: receivers.Running, count: int, wait: float = CAUGHT_UP_WAIT) -> bool:
    """Wait until fastscp's index holds ``count`` images and its post-store stage holds no record, so the
    CPU per image counts the derived work: the stage waits while stores arrive (fastscp.poststore.stage
    MAX_DEFER). Not every image of a corpus gets a thumbnail (mixed), so thumbnails are not counted."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        status = running.status()
        if status is not None:
            index, stage = status["index"], status.get("poststore") or {}
            if index["lag"] == 0 and index["committed"] >= count and not stage.get("waiting"):
                return True
        time.sleep(0.1)
    return False


def check_derived(run: Run, running: receivers.Running, count: int) -> None:
    """After a burst (the receiver stopped): every image has its thumbnail and is on a scan sheet."""
    import re

    late = [name for name, t in run.derived_s.items() if t is None]
    if late:
        run.errors.append(f"not complete within {DERIVED_WAIT:.0f} s after the burst: {', '.join(late)}")
    thumbnails = sum(1 for _ in (running.storage / "thumbnails").rglob("*.jpg"))
    on_sheets = sum(int(n) for sheet in running.storage.rglob("scansheet.html")
                    for n in re.findall(r'<div class="count">(\d+) instances?</div>', sheet.read_text()))
    if thumbnails != count or on_sheets != count:
        run.errors.append(f"after the burst of {count}: {thumbnails} thumbnails, {on_sheets} images on scan sheets")


def rotate(items: list, by: int) -> list:
    if not items:
        return items
    by %= len(items)
    return items[by:] + items[:by]


def summarize(runs: list[Run]) -> dict[str, dict[str, dict]]:
    """Medians over rounds: {scenario: {receiver: {metric: median}}}."""
    grouped: dict[str, dict[str, list[Run]]] = {}
    for r in runs:
        grouped.setdefault(r.scenario, {}).setdefault(r.receiver, []).append(r)
    metrics = ("images_per_s", "mb_per_s", "p50_ms", "p99_ms", "cpu_ms_per_image", "peak_rss_mib",
               "worker_peak_rss_mib", "foreign_cores", "total_rss_mib", "load_cpu_ms_per_image",
               "load_kernel_ms_per_image", "sender_cpu_ms_per_image")
    out: dict[str, dict[str, dict]] = {}
    for scenario, by_receiver in grouped.items():
        out[scenario] = {}
        for receiver, rs in by_receiver.items():
            good = [r for r in rs if not r.errors] or rs
            entry: dict = {"rounds": len(rs), "failed_rounds": sum(1 for r in rs if r.errors)}
            for m in metrics:
                values = [getattr(r, m) for r in good if getattr(r, m) is not None]
                entry[m] = statistics.median(values) if values else None
            entry["peak_rss_mib"] = max((r.peak_rss_mib for r in rs), default=None)
            worker = [r.worker_peak_rss_mib for r in rs if r.worker_peak_rss_mib is not None]
            entry["worker_peak_rss_mib"] = max(worker) if worker else None
            entry["total_rss_mib"] = max((r.total_rss_mib for r in rs), default=None)
            entry["total_pss_mib"] = max((r.total_pss_mib for r in rs), default=None)
            entry["cpu_ms_by_process"] = _median_dicts([r.cpu_ms_by_process for r in good])
            entry["load_cpu_ms_by_process"] = _median_dicts([r.load_cpu_ms_by_process for r in good])
            entry["load_kernel_ms_by_process"] = _median_dicts([r.load_kernel_ms_by_process for r in good])
            entry["derived_s"] = _median_dicts([r.derived_s for r in good])
            entry["files"] = rs[0].files
            entry["received_min"] = min(r.received for r in rs)
            entry["exact_min"] = min(r.exact for r in rs)
            out[scenario][receiver] = entry
    return out


def _median_dicts(dicts: list[dict]) -> dict:
    """Per key, the median of the values that are not None (None when none is)."""
    keys = list(dict.fromkeys(k for d in dicts for k in d))
    out = {}
    for key in keys:
        values = [d[key] for d in dicts if d.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    return out


def ratios(runs: list[Run], subject: str = "fastscp", metric: str = "images_per_s") -> dict[str, dict[str, dict]]:
    """{scenario: {peer: {"median": x, "per_round": [...]}}}: subject / peer of
    the same round, then the median over rounds."""
    table: dict[tuple[str, int], dict[str, Run]] = {}
    for r in runs:
        table.setdefault((r.scenario, r.round), {})[r.receiver] = r
    per: dict[str, dict[str, list[float]]] = {}
    for (scenario, _round), by_receiver in table.items():
        mine = by_receiver.get(subject)
        if mine is None or mine.errors:
            continue
        for peer, theirs in by_receiver.items():
            if peer == subject or theirs.errors or not getattr(theirs, metric):
                continue
            per.setdefault(scenario, {}).setdefault(peer, []).append(getattr(mine, metric) / getattr(theirs, metric))
    return {s: {p: {"median": statistics.median(v), "per_round": v} for p, v in peers.items()}
            for s, peers in per.items()}


def environment_notes(fastscp_commit: str | None = None) -> dict[str, str]:
    """``fastscp_commit``: the commit fastscp ran from (--fastscp-ref), else the working tree's."""
    """Versions and machine facts recorded with the results."""
    import platform
    import subprocess

    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "not installed"
        text = (out.stdout or out.stderr).strip().splitlines()
        return text[0] if text else "?"

    import pydicom
    import pynetdicom

    import fastscp

    repo = str(Path(__file__).resolve().parents[2])
    commit = fastscp_commit or first_line(["git", "-C", repo, "describe", "--always", "--dirty"])
    return {
        "fastscp": f"{fastscp.__version__} ({commit})",
        "storescp": first_line(["storescp", "--version"]).strip("$ ").replace("$dcmtk: ", "dcmtk "),
        "orthanc": first_line(["Orthanc", "--version"]),
        "pynetdicom": pynetdicom.__version__,
        "pydicom": pydicom.__version__,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": str(os.cpu_count()),
    }
