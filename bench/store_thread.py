"""``python -m bench.store_thread``: one association's thread, its CPU per C-STORE, against storescp's.

The load runner (``bench.load``) measures whole receivers. This isolates
what issue 13's compiled C-STORE path has to shrink: the CPU of the one
thread that serves an association. One dcmtk ``storescu`` sends a corpus
over loopback TCP to an :class:`~fastscp.net.association.Association` run
in a child process's main thread (``bench/store_thread_child.py``), as a worker runs it, without the worker:
no indexer or post-store stage (its records are dropped), its log records
forwarded to a socket nobody reads (as a worker's go to the supervisor),
``fsync`` never. The child reports its thread's user and system time
(``getrusage(RUSAGE_THREAD)``) and context switches. ``storescp +B`` without
``--fork`` (one process, so all of its CPU is the association's) gets the
same load, its CPU read from /proc (10 ms ticks: use a corpus of 1,000 or
more). Rounds interleave the variants; the report gives medians.

    .venv/bin/python -m bench.store_thread                      # 2,000 64x64 MR, 5 rounds
    .venv/bin/python -m bench.store_thread --kind ct --compare-ref HEAD~3
    .venv/bin/python -m bench.store_thread --steps              # and where the time goes
    .venv/bin/python -m bench.store_thread --quick              # CI: it runs, 200 MR, 1 round

``--steps`` adds as many runs again, apart from the rounds, that time each
step of a C-STORE (``store_thread_child.STEPS``; wall time while the
thread runs it): the map of what the compiled path has to take over.

Each run stores into a new folder under ``bench/.work``, kept after the
end (``bench.load.runner.Trash``: deleted only when the disk needs the
room, then a pause): ext4 makes new files slowly for a minute after many
were deleted, and so the next run would. Never run it beside another
benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.load import corpora, snapshot
from bench.load.corpora import SourceFile
from bench.load.procstats import cpu_times
from bench.load.receivers import default_receivers, free_port, receiver_env
from bench.load.runner import WORK_ROOT, Trash
from bench.store_thread_child import AE_TITLE, STEPS
from tests import corpus as test_corpus

REPO = Path(__file__).resolve().parents[1]
#: What a run reports, per store (microseconds, or switches).
MEASURES = ("cpu_us", "user_us", "sys_us", "voluntary_switches", "involuntary_switches")


def _storescu(port: int, files: list[SourceFile], config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["storescu", "-aec", AE_TITLE, "-xf", str(config), test_corpus.STORESCU_PROFILE, "-to", "30", "-ta", "30",
         "-td", "60", "127.0.0.1", str(port), *(f.path for f in files)],
        env=receiver_env(nodelay=True), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _sent(sender: subprocess.Popen[bytes], who: str) -> None:
    try:
        _out, err = sender.communicate(timeout=600)
    except BaseException:
        sender.kill()
        sender.wait()
        raise
    if sender.returncode:
        raise RuntimeError(f"storescu to {who} exited {sender.returncode}: {err.decode(errors='replace')[-2000:]}")


def run_fastscp(pythonpath: str | None, files: list[SourceFile], config: Path, folder: Path,
                steps: bool = False) -> dict[str, Any]:
    """One run against the working tree's fastscp, or the one at ``pythonpath`` (a built snapshot);
    ``steps``: the time of each step per store too (the working tree's child)."""
    port = free_port()
    tree = pythonpath or str(REPO)
    # Not run from the repository: the folder ``-m`` runs from comes before PYTHONPATH, and it would
    # import the working tree's fastscp for a snapshot. The snapshot first, then this bench (a namespace
    # package: the child module is found here, and it imports nothing else of bench).
    env = receiver_env(nodelay=True, pythonpath=os.pathsep.join(dict.fromkeys([tree, str(REPO)])))
    sop_classes = ",".join(sorted({f.sop_class_uid for f in files}))
    server = subprocess.Popen([sys.executable, "-m", "bench.store_thread_child", str(port), str(folder), sop_classes,
                               *(["steps"] if steps else [])],
                              cwd=folder.parent, env=env, stdout=subprocess.PIPE, text=True)
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
    if Path(result["fastscp"]).resolve() != Path(tree).resolve():
        raise RuntimeError(f"the child ran fastscp from {result['fastscp']}, not {tree}")
    if result["stores"] != len(files):
        raise RuntimeError(f"fastscp stored {result['stores']} of {len(files)}")
    return result


def run_storescp(files: list[SourceFile], config: Path, folder: Path) -> dict[str, float]:
    """One run against ``storescp +B`` without --fork: its whole CPU from /proc."""
    port = free_port()
    folder.mkdir(parents=True)
    peer = default_receivers()["storescp+B"]  # bench.load's, its best settings, but one process
    server = subprocess.Popen(["storescp", *(a for a in peer.args if a != "--fork"), "-aet", AE_TITLE, "-od",
                               str(folder), str(port)], env=receiver_env(peer.nodelay_env),
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
    p.add_argument("--steps", action="store_true",
                   help="then as many runs timing each step of a C-STORE (store_thread_child.STEPS)")
    p.add_argument("--quick", action="store_true", help="200 MR, 1 round: a check that it runs (CI)")
    args = p.parse_args(argv)
    if args.quick:
        args.kind, args.stores, args.rounds, args.steps = "mr", 200, 1, True
    corpus = corpora.build(args.kind, args.stores or {"mr": 2000, "ct": 1000}[args.kind])
    files = list(corpus.files)
    variants: dict[str, str | None] = {"fastscp": None}
    if args.compare_ref:
        variants[f"fastscp@{args.compare_ref}"] = str(snapshot.build(args.compare_ref))
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    trash = Trash(WORK_ROOT)
    # Room for every run's files (each variant and storescp, each round, and the steps' runs).
    trash.make_room(corpus.dataset_bytes * (len(variants) + 2) * args.rounds, print)
    base = Path(tempfile.mkdtemp(prefix="store-thread-", dir=WORK_ROOT))
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
        # Apart from the rounds above: the timing of each step costs CPU of its own.
        timed = [run_fastscp(None, files, config, base / f"steps-{r}", steps=True)["steps"]
                 for r in range(args.rounds if args.steps else 0)]
    finally:
        trash.add(base)  # not deleted: the next run would make its files slowly (Trash)
    print(report(results, corpus.description, len(files)))
    if timed:
        print(steps_report(timed))
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


def steps_report(timed: list[dict[str, float]]) -> str:
    """Each step's time per store (medians of the runs), a step within another indented below it."""
    depths = {name: depth for _module, name, depth in STEPS}
    lines = [f"Time per store of each step, working tree ({len(timed)} runs apart from the rounds, medians; "
             "wall time while the thread runs it, the timing's own included)", "",
             "| step | us per store |", "|---|---:|"]
    for name in timed[0]:
        lines.append(f"| {'. ' * depths[name]}{name} | {statistics.median(run[name] for run in timed):.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
