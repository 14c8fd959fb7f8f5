"""``python -m bench.store_thread``: one association's thread, its CPU per C-STORE, against storescp's.

The load runner (``bench.load``) measures whole receivers. This isolates
what issue 13's compiled C-STORE path has to shrink: the CPU of the one
thread that serves an association. One dcmtk ``storescu`` sends a corpus
over loopback TCP to an :class:`~fastscp.net.association.Association` run
in a child process's main thread, as a worker runs it, without the worker:
no indexer or post-store stage (its records are dropped), its log records
forwarded to a socket nobody reads (as a worker's go to the supervisor),
``fsync`` never. The child reports its thread's user and system time
(``getrusage(RUSAGE_THREAD)``) and context switches. ``storescp +B`` without
``--fork`` (one process, so all of its CPU is the association's) gets the
same load, its CPU read from /proc (10 ms ticks: use a corpus of 1,000 or
more). Rounds interleave the variants; the report gives medians.

    .venv/bin/python -m bench.store_thread                      # 2,000 64x64 MR, 5 rounds
    .venv/bin/python -m bench.store_thread --kind ct --compare-ref HEAD~3
    .venv/bin/python -m bench.store_thread --quick              # CI: it runs, 200 MR, 1 round

Each run stores into a new folder under ``bench/.work``, deleted only at
the end: ext4 makes new files slowly for a minute after many were deleted
(``bench.load.runner.Trash``). Never run it beside another benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.load import corpora, snapshot
from bench.load.corpora import SourceFile
from bench.load.procstats import cpu_times
from bench.load.receivers import free_port
from tests import corpus as test_corpus

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "bench" / ".work"
AE_TITLE = "STORETHREAD"
#: What a run reports, per store (microseconds, or switches).
MEASURES = ("cpu_us", "user_us", "sys_us", "voluntary_switches", "involuntary_switches")


def child(port: int, root: str, sop_classes: list[str]) -> None:
    """In the child process: serve one association in this thread, then print its CPU per store as JSON."""
    import logging
    import resource

    from fastscp.net.association import Association, ServiceSettings
    from fastscp.net.negotiation import AcceptancePolicy
    from fastscp.process import logs
    from fastscp.storage.area import Storage

    unread, _reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    logs.forward_to(unread)  # as in a worker: the action log's records go out in batches
    logging.getLogger().setLevel("INFO")
    storage = Storage(root, fsync=False, min_free_bytes=1 << 20)
    storage.prepare()
    settings = ServiceSettings(
        policy=AcceptancePolicy(ae_title=AE_TITLE, storage_sop_classes=frozenset(sop_classes),
                                max_pdu_size=262144),
        storage=storage, acse_timeout=30, dimse_timeout=30, max_object_size=1 << 32, max_command_set=65536,
        min_data_rate=0)
    with socket.create_server(("127.0.0.1", port)) as listener:
        print("listening", flush=True)
        listener.settimeout(60)
        conn, (host, peer_port) = listener.accept()
    records: list[object] = []
    association = Association(conn, f"{host}:{peer_port}", settings, records.append)
    before = resource.getrusage(resource.RUSAGE_THREAD)
    association.run()
    after = resource.getrusage(resource.RUSAGE_THREAD)
    n = max(1, len(records))
    user, system = (after.ru_utime - before.ru_utime) / n * 1e6, (after.ru_stime - before.ru_stime) / n * 1e6
    print(json.dumps({"stores": len(records), "cpu_us": user + system, "user_us": user, "sys_us": system,
                      "voluntary_switches": (after.ru_nvcsw - before.ru_nvcsw) / n,
                      "involuntary_switches": (after.ru_nivcsw - before.ru_nivcsw) / n}), flush=True)


def _storescu(port: int, files: list[SourceFile], config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["storescu", "-aec", AE_TITLE, "-xf", str(config), test_corpus.STORESCU_PROFILE, "-to", "30", "-ta", "30",
         "-td", "60", "127.0.0.1", str(port), *(f.path for f in files)],
        env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _sent(sender: subprocess.Popen[bytes], who: str) -> None:
    try:
        _out, err = sender.communicate(timeout=600)
    except BaseException:
        sender.kill()
        sender.wait()
        raise
    if sender.returncode:
        raise RuntimeError(f"storescu to {who} exited {sender.returncode}: {err.decode(errors='replace')[-2000:]}")


def run_fastscp(pythonpath: str | None, files: list[SourceFile], config: Path, folder: Path) -> dict[str, float]:
    """One run against the working tree's fastscp, or the one at ``pythonpath`` (a built snapshot)."""
    port = free_port()
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, str(REPO)])  # the snapshot's fastscp, our bench
    sop_classes = ",".join(sorted({f.sop_class_uid for f in files}))
    server = subprocess.Popen([sys.executable, "-m", "bench.store_thread", "--child", str(port), str(folder),
                               sop_classes],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "listening":
            raise RuntimeError("the child did not start listening")
        _sent(_storescu(port, files, config), "fastscp")
        result = json.loads(server.stdout.readline())
        server.wait(60)
    finally:
        server.kill()
        server.wait()
    if result["stores"] != len(files):
        raise RuntimeError(f"fastscp stored {result['stores']} of {len(files)}")
    return result


def run_storescp(files: list[SourceFile], config: Path, folder: Path) -> dict[str, float]:
    """One run against ``storescp +B`` without --fork: its whole CPU from /proc."""
    port = free_port()
    folder.mkdir(parents=True)
    server = subprocess.Popen(["storescp", "+B", "-pdu", "131072", "+xa", "-pm", "-aet", AE_TITLE, "-od",
                               str(folder), str(port)], env={**os.environ, "TCP_NODELAY": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):  # until it listens
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        before = cpu_times(server.pid)
        _sent(_storescu(port, files, config), "storescp")
        after = cpu_times(server.pid)
    finally:
        server.kill()
        server.wait()
    if before is None or after is None:
        raise RuntimeError("storescp's CPU could not be read")
    ticks = os.sysconf("SC_CLK_TCK")
    n = len(files)
    user, system = ((after[i] - before[i]) / ticks / n * 1e6 for i in (0, 1))  # utime, stime
    return {"stores": n, "cpu_us": user + system, "user_us": user, "sys_us": system}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.store_thread", description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=("mr", "ct"), default="mr", help="64x64 MR (default) or 512x512 CT")
    p.add_argument("--stores", type=int, default=0, help="corpus size (default 2,000 MR or 1,000 CT)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--compare-ref", metavar="GIT_REF", help="also fastscp as of this commit, interleaved")
    p.add_argument("--quick", action="store_true", help="200 MR, 1 round: a check that it runs (CI)")
    p.add_argument("--child", nargs=3, metavar=("PORT", "ROOT", "SOP_CLASSES"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(int(args.child[0]), args.child[1], args.child[2].split(","))
        return 0
    if args.quick:
        args.kind, args.stores, args.rounds = "mr", 200, 1
    corpus = corpora.build(args.kind, args.stores or {"mr": 2000, "ct": 1000}[args.kind])
    files = list(corpus.files)
    variants: dict[str, str | None] = {"fastscp": None}
    if args.compare_ref:
        variants[f"fastscp@{args.compare_ref}"] = str(snapshot.build(args.compare_ref))
    WORK.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="store-thread-", dir=WORK))
    results: dict[str, list[dict[str, float]]] = {name: [] for name in [*variants, "storescp+B"]}
    try:
        config = base / "storescu.cfg"
        config.write_text(test_corpus.storescu_config(files))  # type: ignore[arg-type]
        for r in range(args.rounds):
            for name, pythonpath in variants.items():
                results[name].append(run_fastscp(pythonpath, files, config, base / f"{r}-{name}"))
            results["storescp+B"].append(run_storescp(files, config, base / f"{r}-storescp"))
            print(f"round {r + 1}: " + ", ".join(f"{n} {runs[-1]['cpu_us']:.1f} us" for n, runs in results.items()),
                  flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(report(results, corpus.description, len(files)))
    return 0


def report(results: dict[str, list[dict[str, float]]], description: str, stores: int) -> str:
    """Medians per variant, and fastscp's CPU per store over storescp's (above 1: fastscp spends more)."""
    rounds = len(next(iter(results.values())))
    lines = [f"{description}: {stores} stores, one association, {rounds} rounds; per store, each column its "
             "own median (storescp's from 10 ms ticks)",
             "", "| receiver | CPU us | user us | system us | switches (vol/invol) | CPU x storescp+B |",
             "|---|---:|---:|---:|---:|---:|"]
    peer = statistics.median(run["cpu_us"] for run in results["storescp+B"])
    for name, runs in results.items():
        m = {key: statistics.median(run[key] for run in runs) for key in MEASURES if key in runs[0]}
        switches = (f"{m['voluntary_switches']:.2f}/{m['involuntary_switches']:.2f}"
                    if "voluntary_switches" in m else "-")
        lines.append(f"| {name} | {m['cpu_us']:.1f} | {m['user_us']:.1f} | {m['sys_us']:.1f} | {switches} | "
                     f"{m['cpu_us'] / peer:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
