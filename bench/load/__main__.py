"""``python -m bench.load [--quick]``: end-to-end load of fastscp and its peers.

See ``bench/README.md``. Exit status: 0 when every run delivered every file
(byte-exact where the receiver promises it) and every receiver behaved;
1 otherwise; 2 on a usage or setup problem. Speed never fails a run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench.load import corpora, receivers, report, runner

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "results" / "load"


def _variant(text: str) -> tuple[str, str]:
    name, sep, options = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError("expected NAME=OPTIONS, e.g. fastscp-thumbs='--thumbnails on'")
    return name, options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="small corpora, one round, fewer scenarios: a correctness check for CI (< 2 min)")
    p.add_argument("--rounds", type=int, help="rounds (default: 3 full, 1 quick)")
    p.add_argument("--scenarios", help="comma-separated scenario names (default: all of the mode)")
    p.add_argument("--receivers", help="comma-separated receiver names to run (default: each scenario's)")
    p.add_argument("--fastscp-extra", default="", metavar="OPTIONS",
                   help="options appended to every `fastscp serve` command line, e.g. '--workers 2'")
    p.add_argument("--fastscp-variant", action="append", type=_variant, default=[], metavar="NAME=OPTIONS",
                   help="another fastscp receiver run wherever fastscp runs (repeatable)")
    p.add_argument("--fastscp-ref", metavar="GIT_REF",
                   help="run fastscp as of this commit (built in a temp folder), not the working tree")
    p.add_argument("--compare-ref", metavar="GIT_REF",
                   help="also run fastscp as of this commit, as receiver fastscp@GIT_REF, wherever fastscp runs "
                        "(same rounds, interleaved: before/after in one run)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    p.add_argument("--corpora", type=Path, default=corpora.ROOT, help=f"corpus cache (default {corpora.ROOT})")
    p.add_argument("--workdir", type=Path,
                   help=f"where receivers store files (default: a new folder in {runner.WORK_ROOT})")
    p.add_argument("--keep", action="store_true", help="keep every run's received files and logs")
    p.add_argument("--max-foreign", type=float, default=0.3, metavar="CORES",
                   help="before each run (full mode), wait while other processes use more (default 0.3)")
    p.add_argument("--quiet-wait", type=float, default=300, metavar="SECONDS",
                   help="longest wait for a quiet machine before a run (default 300)")
    p.add_argument("--rerun-noisy", type=float, default=0.5, metavar="CORES",
                   help="full mode: run again (once) a run during which other processes used more than this "
                        "many cores, and keep the quieter of the two (default 0.5; 0 = never)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="attach `py-spy record --subprocesses` to each fastscp receiver during the load; "
                        "raw profiles and summary.md go to DIR (py-spy competes for the CPUs)")
    p.add_argument("--profile-idle", action="store_true",
                   help="with --profile: sample waiting threads too (wall time, not CPU time)")
    p.add_argument("--list", action="store_true", help="list scenarios and receivers, then exit")
    return p


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    # Unwind (SystemExit) so every started receiver is stopped on the way out.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    plan = runner.plan(args.quick)
    rounds = args.rounds or plan.rounds
    fastscp_src = fastscp_commit = None
    if args.fastscp_ref and not args.list:
        from bench.load import snapshot

        fastscp_src = str(snapshot.build(args.fastscp_ref))
        fastscp_commit = f"{args.fastscp_ref} = {(Path(fastscp_src) / '.built').read_text().strip()[:12]}"
    known = receivers.default_receivers(tuple(shlex.split(args.fastscp_extra)), tuple(args.fastscp_variant),
                                        fastscp_src)
    variant_names = tuple(name for name, _ in args.fastscp_variant)
    if args.compare_ref and not args.list:
        from bench.load import snapshot

        compared = known["fastscp"]
        ref = dataclasses.replace(compared, name=f"fastscp@{args.compare_ref}",
                                  description=f"{compared.description}, as of {args.compare_ref}",
                                  pythonpath=str(snapshot.build(args.compare_ref)))
        known[ref.name] = ref
        variant_names += (ref.name,)
    scenarios = list(plan.scenarios)
    if args.scenarios:
        wanted = args.scenarios.split(",")
        unknown = set(wanted) - {s.name for s in scenarios}
        if unknown:
            print(f"unknown scenarios {sorted(unknown)}; this mode has {[s.name for s in scenarios]}",
                  file=sys.stderr)
            return 2
        scenarios = [s for s in scenarios if s.name in wanted]
    only = set(args.receivers.split(",")) if args.receivers else None
    if only is not None and args.compare_ref:
        only.add(f"fastscp@{args.compare_ref}")
    if only and only - set(known):
        print(f"unknown receivers {sorted(only - set(known))}; known: {sorted(known)}", file=sys.stderr)
        return 2
    if args.list:
        for s in scenarios:
            print(f"{s.name}: {s.corpus} K={s.k}{' nagle' if s.nagle else ''}"
                  f"{f' first {s.limit}' if s.limit else ''}: {', '.join(s.receivers)}")
        for r in known.values():
            print(f"  {r.name}: {r.description}")
        return 0
    for tool in ("storescu", "echoscu"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: install Debian's dcmtk (make setup)", file=sys.stderr)
            return 2
    if args.profile:
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(spy).exists():
            print("py-spy not found: pip install py-spy", file=sys.stderr)
            return 2
        args.profile = args.profile.resolve()  # receivers run in their own folders
        args.profile.mkdir(parents=True, exist_ok=True)

    started = datetime.datetime.now().astimezone()
    stamp = started.strftime("%Y%m%d-%H%M%S")
    mode = "quick" if args.quick else "full"
    t_start = time.monotonic()
    print(f"fastscp load benchmark, {mode} mode, {rounds} round(s)", flush=True)

    # Corpora and one storescu -xf config per corpus.
    from tests import corpus as test_corpus

    if args.workdir:
        base = args.workdir
        base.mkdir(parents=True, exist_ok=True)
    else:
        corpora.make_ignored_folder(runner.WORK_ROOT)
        base = Path(tempfile.mkdtemp(prefix=f"{stamp}-", dir=runner.WORK_ROOT))
    built: dict[str, corpora.Corpus] = {}
    configs: dict[str, Path] = {}
    for kind in dict.fromkeys(s.corpus for s in scenarios):
        t0 = time.monotonic()
        built[kind] = corpora.build(kind, plan.sizes[kind], args.corpora)
        configs[kind] = base / f"storescu-{kind}.cfg"
        configs[kind].write_text(test_corpus.storescu_config(list(built[kind].files)))  # type: ignore[arg-type]
        print(f"corpus {kind}: {built[kind].description} ({time.monotonic() - t0:.1f} s)", flush=True)

    skipped: list[str] = []
    runs: list[runner.Run] = []

    def log(text: str) -> None:
        print(text, flush=True)

    # The work root's trash, shared with later benchmarks (bench.store_thread's too): deleted only when the
    # disk needs the room, never at the end (the next benchmark's first minutes would make files slowly).
    trash = runner.Trash(base if args.workdir else runner.WORK_ROOT)
    if not args.quick:
        load = runner.wait_for_quiet(args.max_foreign, args.quiet_wait, log)
        log(f"other processes use {load:.2f} cores")
    for round_ in range(1, rounds + 1):
        for scenario in scenarios:
            names = [*scenario.receivers, *(variant_names if "fastscp" in scenario.receivers else ())]
            names = [n for n in names if only is None or n in only]
            for name in runner.rotate(names, round_ - 1):
                receiver = known[name]
                why = receiver.available()
                if why is None and receiver.max_associations and scenario.k > receiver.max_associations:
                    why = (f"K={scenario.k} exceeds the {receiver.max_associations} associations it serves "
                           "at once (no option for it)")
                if why:
                    note = f"{scenario.name} / {name}: {why}"
                    if note not in skipped:
                        skipped.append(note)
                    continue
                corpus = built[scenario.corpus]
                # Room for the received files, a thumbnail per image and the index.
                trash.make_room(2 * corpus.dataset_bytes, log)
                if not args.quick:
                    runner.wait_for_quiet(args.max_foreign, args.quiet_wait, log)
                py_spy = None
                if args.profile and receiver.kind == "fastscp":
                    raw = args.profile / f"{scenario.name}-{name}-r{round_}.txt"
                    py_spy = [spy, "record", "--subprocesses", "--format", "raw", "--rate", "250",
                              "--nonblocking", "-o", str(raw), *(["--idle"] if args.profile_idle else [])]
                workdir = base / f"r{round_}-{scenario.name}-{name}"
                run = runner.run_once(scenario, receiver, corpus, round_, workdir,
                                      config=configs[scenario.corpus], profile=test_corpus.STORESCU_PROFILE,
                                      keep=args.keep, py_spy=py_spy, trash=trash)
                if (not args.quick and args.rerun_noisy and run.foreign_cores > args.rerun_noisy
                        and not run.errors and not py_spy):
                    log(f"  {name}: other processes used {run.foreign_cores:.2f} cores during the run; again")
                    runner.wait_for_quiet(args.max_foreign, args.quiet_wait, log)
                    again = runner.run_once(scenario, receiver, corpus, round_, workdir,
                                            config=configs[scenario.corpus],
                                            profile=test_corpus.STORESCU_PROFILE, keep=args.keep, trash=trash)
                    kept, dropped = sorted((run, again), key=lambda r: (bool(r.errors), r.foreign_cores))
                    kept.notes.append(f"run twice (other load {dropped.foreign_cores:.2f} and "
                                      f"{kept.foreign_cores:.2f} cores); kept the quieter")
                    if dropped.errors:
                        kept.errors += [f"(other attempt) {e}" for e in dropped.errors]
                    run = kept
                runs.append(run)
                status = "OK" if not run.errors else "ERROR: " + " | ".join(e.splitlines()[0] for e in run.errors)
                worker = f" (worker {run.worker_peak_rss_mib:.0f})" if run.worker_peak_rss_mib else ""
                p50 = f"{run.p50_ms:.2f}" if run.p50_ms is not None else "-"
                by_process = " ".join(f"{k} {v:.2f}" for k, v in run.cpu_ms_by_process.items())
                derived = " ".join(f"{k} {'-' if v is None else f'{v:.1f}'}" for k, v in run.derived_s.items())
                log(f"[r{round_}] {scenario.name:<12} {name:<17} {run.images_per_s:8.1f} img/s "
                    f"{run.mb_per_s:7.1f} MB/s  p50 {p50} ms  CPU {run.cpu_ms_per_image:.2f} ms/img ({by_process}; "
                    f"{run.load_cpu_ms_per_image:.2f} in the load, senders {run.sender_cpu_ms_per_image:.2f})  "
                    f"RSS {run.peak_rss_mib:.0f}{worker} MiB, total {run.total_rss_mib:.0f} "
                    f"(PSS {run.total_pss_mib:.0f}) MiB  "
                    f"{run.exact}/{run.received}/{run.files}  other {run.foreign_cores:.2f}"
                    f"{f'  complete after (s): {derived}' if derived else ''}  {status}")

    if args.workdir:
        trash.empty()
    summary = runner.summarize(runs)
    ratio_table = runner.ratios(runs)
    result = {
        "mode": mode,
        "rounds": rounds,
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - t_start, 1),
        "environment": runner.environment_notes(fastscp_commit),
        "corpora": {k: c.description for k, c in built.items()},
        "scenarios": [{"name": s.name, "corpus": s.corpus, "k": s.k, "nagle": s.nagle, "limit": s.limit,
                       "receivers": list(s.receivers), "note": s.note} for s in scenarios],
        "receivers": {n: r.description for n, r in known.items()},
        "summary": summary,
        "ratios": ratio_table,
        "cpu_ratios": runner.ratios(runs, metric="cpu_ms_per_image"),
        "skipped": skipped,
        "errors": report.failed_runs(runs),
        "runs": [r.to_dict() for r in runs],
    }
    result["ratios_nofsync"] = runner.ratios(runs, subject="fastscp-nofsync")
    result["targets"] = report.targets(summary, {"fastscp": ratio_table, "fastscp-nofsync": result["ratios_nofsync"]})
    result["cpu_bounds"] = report.cpu_bounds(summary, os.cpu_count() or 1)
    paths = report.write(result, args.out, f"load-{mode}-{stamp}")
    for kind, path in paths.items():
        latest = args.out / f"latest-{mode}.{kind}"
        latest.unlink(missing_ok=True)
        shutil.copyfile(path, latest)
    print()
    print(report.markdown(result))
    if args.profile:
        summaries = [report.profile_summary(p) for p in sorted(args.profile.glob("*.txt"))]
        (args.profile / "summary.md").write_text("\n\n".join(summaries) + "\n")
        print(f"profiles: {args.profile}/summary.md")
    print("results: " + ", ".join(str(p) for p in paths.values()))
    print(f"took {time.monotonic() - t_start:.0f} s")
    if not args.workdir and not args.keep and not result["errors"]:
        trash.add(base)
    elif result["errors"]:
        print(f"received files and logs of failed runs kept in {base}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
