"""``python -m bench.nodes [--quick]``: storescu load through HAProxy on 1, 2 and 3 fastscp nodes, one DuckLake index.

See ``bench/README.md`` ("Nodes"). Every configuration gets the same load:
K dcmtk ``storescu`` processes (bench/load/sender.py) through one HAProxy
(``config/haproxy.cfg.example``, tests/cluster.py) in front of N ``fastscp
serve`` nodes on this machine, each with its own storage folder, all on one
DuckLake index (a PostgreSQL cluster started for the run, one Parquet
folder); and, for reference, one node on the embedded DuckDB file (the
single-node default) behind the same HAProxy. Per configuration it reports
images/s, the CPU per image of all the nodes together and of each node
(their process trees, /proc), and how long after the last response the
index counted every image; then the commit latency of the lake (this
process committing batches into it, the nodes idle).

The nodes share this machine's cores: N nodes here do not show what N
hosts would sustain; the CPU per image per node does (README "Performance").

Exit status: 0 when every configuration stored every file byte-exact,
indexed one row per file, and every node exited 0; 1 otherwise; 2 on a
setup problem. Speed never fails a run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.load import corpora, procstats, receivers, sender
from bench.load.runner import WORK_ROOT, Run, Trash, percentile
from tests import corpus as test_corpus
from tests.cluster import HAProxy, PostgresCluster

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "nodes"
#: Records per commit when measuring the lake's commit latency, and commits measured.
COMMIT_BATCH = 100
COMMITS = 30


@dataclass
class Setup:
    """One configuration: ``nodes`` fastscp nodes on the lake, or one on the embedded DuckDB file."""

    name: str
    nodes: int
    lake: bool


@dataclass
class NodesRun(Run):
    """One setup's run (the load runner's :class:`~bench.load.runner.Run`, ``receiver`` naming the setup)."""

    nodes: int = 1
    #: Each node's CPU per image it received (ms), and the images it received.
    node_cpu_ms_per_image: list[float] = field(default_factory=list)
    node_images: list[int] = field(default_factory=list)
    #: Seconds from the last response until the index counted every file.
    index_lag_s: float | None = None


@dataclass
class Address:
    """A node as HAProxy needs it."""

    host: str
    port: int


def setups(counts: list[int]) -> list[Setup]:
    return [Setup("embedded-duckdb", 1, False)] + [Setup(f"ducklake-{n}", n, True) for n in counts]


def run_setup(setup: Setup, round_: int, files: list[corpora.SourceFile], k: int, workdir: Path,
              postgres: PostgresCluster, storescu_config: Path) -> NodesRun:
    """Start the nodes and HAProxy, send, wait for the index, stop everything, check what arrived."""
    result = NodesRun(round_, "nodes", setup.name, k, False, len(files), sum(f.dataset_length for f in files),
                      started_at=time.time(), nodes=setup.nodes)
    workdir.mkdir(parents=True)
    catalog = ""
    if setup.lake:
        database = f"bench_{setup.name.replace('-', '_')}_r{round_}"
        postgres.psql(f"CREATE DATABASE {database}")
        catalog = postgres.catalog_of(database)
    running: list[receivers.Running] = []
    proxy = None
    try:
        backends = []
        for number in range(setup.nodes):
            name = f"node-{chr(ord('a') + number)}"
            monitor = receivers.free_port()
            receiver = receivers.Receiver(name, "fastscp", "fastscp serve", True,
                                          args=("--monitor", f"127.0.0.1:{monitor}"))
            config = (f"server:\n  node: {name}\ndatabase:\n  catalog: '{catalog}'\n"
                      f"  data_path: '{workdir / 'lake'}'\n") if setup.lake else ""
            node = receivers.start(receiver, workdir / name, fastscp_config=config)
            running.append(node)
            backends.append((name, Address("127.0.0.1", node.port), monitor))
        proxy = HAProxy(workdir, backends)
        monitors = [procstats.TreeMonitor(node.pid).start() for node in running]
        cpu0 = [monitor.sample().cpu_seconds for monitor in monitors]
        sent = sender.send(proxy.port, receivers.AE_TITLE, files, k, workdir, nagle=False, config=storescu_config,
                           profile=test_corpus.STORESCU_PROFILE)
        result.wall_s = sent.wall_seconds
        result.images_per_s = len(files) / sent.wall_seconds
        result.mb_per_s = result.dataset_bytes / 1e6 / sent.wall_seconds
        result.successes = sent.log.successes
        result.storescu_exit_codes = sent.exit_codes
        if sent.log.latencies:
            result.p50_ms = (percentile(sent.log.latencies, 50) or 0) * 1e3
            result.p99_ms = (percentile(sent.log.latencies, 99) or 0) * 1e3
        if any(sent.exit_codes) or sent.log.successes != len(files):
            result.errors.append(f"storescu exit codes {sent.exit_codes}, {sent.log.successes} of {len(files)} "
                                 f"C-STOREs answered Success: {'; '.join(sent.log.failures[:3] + sent.log.errors[:3])}")
        result.index_lag_s = index_lag(running[0], len(files))
        if result.index_lag_s is None:
            result.errors.append("the index did not count every file within 120 s")
        cpu = [monitor.stop().cpu_seconds - before for monitor, before in zip(monitors, cpu0, strict=True)]
        received = [node.received_files()[0] for node in running]
        result.node_images = [len(paths) for paths in received]
        result.node_cpu_ms_per_image = [seconds / max(1, count) * 1e3
                                        for seconds, count in zip(cpu, result.node_images, strict=True)]
        result.cpu_s = sum(cpu)
        result.cpu_ms_per_image = result.cpu_s / len(files) * 1e3
        result.peak_rss_mib = max(monitor.peak_rss_mib() for monitor in monitors)
        want = Counter(f.dataset_sha256 for f in files)
        got = Counter(corpora.dataset_digest(path)[1] for paths in received for path in paths)
        result.exact = sum((want & got).values())
        result.received = sum(result.node_images)
        if result.exact != len(files) or result.received != len(files):
            result.errors.append(f"{result.exact} of {len(files)} files stored byte-exact "
                                 f"({sum(result.node_images)} received)")
    except (receivers.ReceiverError, AssertionError, RuntimeError, OSError) as exc:
        result.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        if proxy is not None:
            proxy.stop()
        for node in running:
            code = node.stop()
            result.exit_code = code if result.exit_code in (None, 0) else result.exit_code
            if code != 0:
                result.errors.append(f"{node.receiver.name} exited with {code}:\n{node.log_tail(1500)}")
    return result


def index_lag(node: receivers.Running, files: int, timeout: float = 120) -> float | None:
    """Seconds until ``node``'s index counts ``files`` rows (every node's, in a lake); None if it never does."""
    from fastscp.query.client import QueryClient
    from fastscp.query.engine import SqlRequest

    assert node.index_path is not None
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with QueryClient(str(node.index_path)).query(SqlRequest(sql="SELECT count(*) FROM instances")) as rows:
            if [tuple(row) for row in rows] == [(files,)]:
                return time.monotonic() - started
        time.sleep(0.25)  # each count is work for the node (inside the CPU window): not too often
    return None


def commit_latency(postgres: PostgresCluster, files: list[corpora.SourceFile], workdir: Path) -> dict[str, float]:
    """p50/p99 ms of :data:`COMMITS` commits of :data:`COMMIT_BATCH` records into a lake (new paths each)."""
    import msgspec

    from fastscp.index.database import Index, Lake
    from fastscp.index.reindex import read_records, walk

    postgres.psql("CREATE DATABASE bench_commits")
    lake = Lake(postgres.catalog_of("bench_commits").removeprefix("postgres:"), str(workdir / "commit-lake"),
                "bench")
    folder = str(Path(files[0].path).parent)
    template = read_records(folder, sorted(walk(folder))[:COMMIT_BATCH])
    index = Index(str(workdir / "commit.duckdb"), lake=lake)
    times = []
    try:
        for n in range(COMMITS):
            batch = [msgspec.structs.replace(r, path=f"{n}/{r.path}") for r in template]
            started = time.perf_counter()
            index.add(batch)
            times.append(time.perf_counter() - started)
    finally:
        index.close()
    return {"records_per_commit": len(template), "commits": len(times),
            "p50_ms": (percentile(times, 50) or 0) * 1e3, "p99_ms": (percentile(times, 99) or 0) * 1e3}


def table(results: list[NodesRun]) -> str:
    """Medians over rounds, one row per setup."""
    lines = ["| setup | nodes | img/s | p50 ms | CPU ms/img (all nodes) | CPU ms/img per node | index lag s | exact |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    grouped: dict[str, list[NodesRun]] = {}
    for r in results:
        grouped.setdefault(r.receiver, []).append(r)
    for name, rs in grouped.items():
        good = [r for r in rs if not r.errors] or rs
        exact = f"{min(r.exact for r in rs)}/{rs[0].files}"
        lags = [r.index_lag_s for r in good if r.index_lag_s is not None]
        if not lags:
            lines.append(f"| {name} | {rs[0].nodes} | - | - | - | - | - | {exact} |")
            continue
        per_node = ", ".join(f"{statistics.median(values):.2f}"
                             for values in zip(*(r.node_cpu_ms_per_image for r in good), strict=False))
        p50 = [r.p50_ms for r in good if r.p50_ms is not None]
        lines.append(f"| {name} | {rs[0].nodes} | {statistics.median(r.images_per_s for r in good):.1f} | "
                     f"{statistics.median(p50) if p50 else 0:.2f} | "
                     f"{statistics.median(r.cpu_ms_per_image for r in good):.2f} | {per_node} | "
                     f"{statistics.median(lags):.2f} | {exact} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.nodes", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny corpus, one round: a check that it works")
    p.add_argument("--nodes", default="1,2,3", help="node counts on the lake (default 1,2,3)")
    p.add_argument("--corpus", choices=("ct", "mr"), default="ct", help="bench/load corpus (default ct)")
    p.add_argument("--files", type=int, help="files of the corpus (default: 400 ct / 2000 mr; --quick 24)")
    p.add_argument("-k", type=int, default=6, help="concurrent storescu associations (default 6)")
    p.add_argument("--rounds", type=int, help="rounds, setups interleaved (default 3; --quick 1)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    for tool in ("storescu", "echoscu", "haproxy"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: run 'make setup' (Debian's dcmtk, haproxy)", file=sys.stderr)
            return 2
    counts = [int(n) for n in args.nodes.split(",")]
    size = args.files or (24 if args.quick else {"ct": 400, "mr": 2000}[args.corpus])
    rounds = args.rounds or (1 if args.quick else 3)
    corpus = corpora.build(args.corpus, size)
    files = list(corpus.files)
    corpora.make_ignored_folder(WORK_ROOT)
    base = Path(tempfile.mkdtemp(prefix="nodes-", dir=WORK_ROOT))
    config = base / "storescu.cfg"
    config.write_text(test_corpus.storescu_config(files))  # type: ignore[arg-type]
    print(f"fastscp nodes benchmark: {corpus.description}, K={args.k}, {rounds} round(s), setups "
          f"{', '.join(s.name for s in setups(counts))}", flush=True)
    results: list[NodesRun] = []
    try:
        postgres = PostgresCluster()
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"PostgreSQL could not start: {exc}", file=sys.stderr)
        return 2
    try:
        for round_ in range(1, rounds + 1):
            for setup in setups(counts):
                r = run_setup(setup, round_, files, args.k, base / f"r{round_}-{setup.name}", postgres, config)
                results.append(r)
                per_node = " ".join(f"{ms:.2f}" for ms in r.node_cpu_ms_per_image)
                status = "OK" if not r.errors else "ERROR: " + " | ".join(e.splitlines()[0] for e in r.errors)
                print(f"[r{round_}] {setup.name:<16} {r.images_per_s:8.1f} img/s  CPU {r.cpu_ms_per_image:.2f} "
                      f"ms/img (per node: {per_node})  images per node {r.node_images}  "
                      f"index lag {r.index_lag_s if r.index_lag_s is not None else '-'} s  {status}", flush=True)
        latency = commit_latency(postgres, files, base)
    finally:
        postgres.stop()
    print()
    print(table(results))
    print(f"\nlake commit latency, {latency['records_per_commit']} records per commit: p50 "
          f"{latency['p50_ms']:.1f} ms, p99 {latency['p99_ms']:.1f} ms ({latency['commits']} commits)")
    mode = "quick" if args.quick else "full"
    stamp = datetime.datetime.now().astimezone().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"nodes-{mode}-{stamp}.json"
    out.write_text(json.dumps({"mode": mode, "corpus": corpus.description, "k": args.k, "rounds": rounds,
                               "environment": _environment(), "commit_latency": latency,
                               "results": [r.to_dict() for r in results]}, indent=2) + "\n")
    (args.out / f"nodes-{mode}-{stamp}.md").write_text(table(results) + "\n")
    print(f"results: {out}")
    failed = [r for r in results if r.errors]
    if failed:
        print(f"received files and logs kept in {base}")
        return 1
    Trash(WORK_ROOT).add(base)  # not deleted: the next benchmark would make its files slowly (Trash)
    return 0


def _environment() -> dict[str, str]:
    from bench.load.runner import environment_notes

    return environment_notes()


if __name__ == "__main__":
    sys.exit(main())
