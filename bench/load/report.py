"""Results as JSON, a markdown table and a PNG chart."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from bench.load.runner import Run

#: Targets of issue 13, reported (never asserted), from the run's medians: (receiver, scenario, peer,
#: minimum ratio receiver / peer in images/s). "*": every scenario the peer ran in.
RATIO_TARGETS: tuple[tuple[str, str, str, float], ...] = (
    ("fastscp-nofsync", "ct-k1", "storescp+B", 1.0),
    ("fastscp-nofsync", "ct-k4", "storescp+B", 1.0),
    ("fastscp-nofsync", "mr-k4", "storescp+B", 1.0),
    ("fastscp-nofsync", "mixed-k4", "storescp+B", 1.0),
    ("fastscp-nofsync", "*", "orthanc", 2.0),
    ("fastscp", "ct-k1", "storescp+B", 0.6),
    ("fastscp", "ct-k4", "storescp+B", 0.8),
)
#: 16 associations do not collapse: images/s at k16 at least this share of k4's.
SCALING_TARGETS: tuple[tuple[str, str, float], ...] = (("ct-k16", "ct-k4", 0.9), ("mr-k16", "mr-k4", 0.9))
#: The total RSS of all fastscp processes at K=16, at most this many MB.
TOTAL_RSS_MB = (("ct-k16", "mr-k16"), 1000.0)
RSS_TARGET = ("large-k1", 200.0)  # fastscp worker peak RSS with the 1 GiB object, MB
_MIB = 1.048576  # MB per MiB


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "–"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def targets(summary: dict, ratio_tables: dict[str, dict]) -> list[dict]:
    """Each target of issue 13: what the run measured (medians) and whether that meets it.

    ``ratio_tables``: :func:`bench.load.runner.ratios` per subject receiver ("fastscp", "fastscp-nofsync").
    """
    out = []

    def add(target: str, measured: float | None, met: bool | None, digits: int = 2) -> None:
        out.append({"target": target, "measured": None if measured is None else round(measured, digits),
                    "met": met})

    for subject, scenario, peer, minimum in RATIO_TARGETS:
        table = ratio_tables.get(subject, {})
        names = sorted(s for s in table if peer in table[s]) if scenario == "*" else [scenario]
        for name in names or [scenario]:
            ratio = table.get(name, {}).get(peer, {}).get("median")
            add(f"{name}: {subject} ≥ {minimum:g}x {peer} (images/s)", ratio,
                None if ratio is None else ratio >= minimum)
    for receiver in ("fastscp", "fastscp-nofsync"):
        for wide, narrow, minimum in SCALING_TARGETS:
            high = summary.get(wide, {}).get(receiver, {}).get("images_per_s")
            low = summary.get(narrow, {}).get(receiver, {}).get("images_per_s")
            ratio = high / low if high and low else None
            add(f"{receiver}: {wide} ≥ {minimum:g}x {narrow} (images/s)", ratio,
                None if ratio is None else ratio >= minimum)
    scenarios, limit = TOTAL_RSS_MB
    for scenario in scenarios:
        entry = summary.get(scenario, {}).get("fastscp", {})
        for kind, how in (("rss", "sum of RSS: shared pages in each"), ("pss", "sum of PSS: shared pages divided")):
            mib = entry.get(f"total_{kind}_mib")
            mb = None if mib is None else mib * _MIB
            add(f"{scenario}: total {kind.upper()} of all fastscp processes ≤ {limit:g} MB ({how})", mb,
                None if mb is None else mb <= limit, 0)
    scenario, limit = RSS_TARGET
    mib = summary.get(scenario, {}).get("fastscp", {}).get("worker_peak_rss_mib")
    mb = None if mib is None else mib * _MIB
    add(f"{scenario}: fastscp worker peak RSS < {limit:g} MB", mb, None if mb is None else mb < limit, 0)
    for scenario, by_receiver in summary.items():
        for receiver, entry in by_receiver.items():
            derived = entry.get("derived_s") or {}
            if not derived:
                continue
            slowest = max((t for t in derived.values() if t is not None), default=None)
            complete = all(t is not None for t in derived.values())
            add(f"{scenario}: {receiver}'s index, thumbnails and scan sheets complete after the burst, nothing "
                f"lost (seconds after the last image)", slowest,
                complete and not entry["failed_rounds"], 1)
    return out


#: The share of the CPUs a run must keep busy for the scaling bound of :func:`cpu_bounds` to hold.
SATURATED = 0.9


def cores_busy(entry: dict) -> float | None:
    """CPUs the receiver and its senders kept busy during a load: their CPU per image times images/s."""
    mine, senders, rate = (entry.get(k) for k in ("load_cpu_ms_per_image", "sender_cpu_ms_per_image", "images_per_s"))
    return (mine + senders) * rate / 1e3 if mine is not None and senders is not None and rate else None


def cpu_bounds(summary: dict, cpus: int) -> list[dict]:
    """What the CPUs allow, for each ratio and scaling target the run can say it of (medians).

    Where the load keeps the ``cpus`` busy, images/s is the CPUs over the CPU per image of the receiver
    and its senders (:func:`load_budget_table`). Two bounds follow from that:

    * A ratio against a peer, for faster user code alone: with no user time at all, its kernel time as
      measured, and senders as cheap as the cheaper of the two runs', the subject would take at most
      ``cpus / (kernel + senders)`` images/s; over the peer's rate, the most the ratio can be.
    * k16 against k4, for any receiver code: the senders' CPU per image grows from ``s4`` to ``s16``
      while a receiver's need not, so one spending ``r`` per image at both shows at most
      ``(r + s4) / (r + s16)``: the cheaper the receiver, the lower. The bound is that with the
      subject's own k4 ``r``, and ``needs_ms`` the ``r`` at which it reaches the target. It holds only
      where the k4 run kept the CPUs busy (:data:`SATURATED`): one that waited for the disk (fsync)
      can gain from more associations; there ``reachable`` is None.
    """
    out = []
    for subject, scenario, peer, minimum in RATIO_TARGETS:
        names = sorted(s for s in summary if peer in summary[s]) if scenario == "*" else [scenario]
        for name in names:
            mine, theirs = summary.get(name, {}).get(subject, {}), summary.get(name, {}).get(peer, {})
            kernel, rate = mine.get("load_kernel_ms_per_image"), theirs.get("images_per_s")
            senders = [v for v in (mine.get("sender_cpu_ms_per_image"), theirs.get("sender_cpu_ms_per_image")) if v]
            if not kernel or not rate or not senders:
                continue
            bound = cpus / (kernel + min(senders)) * 1e3 / rate
            out.append({"target": f"{name}: {subject} ≥ {minimum:g}x {peer} (images/s)", "bound": round(bound, 2),
                        "reachable": bound >= minimum,
                        "how": f"no user time: {cpus} CPUs / ({kernel:.3f} ms kernel + {min(senders):.3f} ms senders)"})
    for receiver in ("fastscp", "fastscp-nofsync"):
        for wide, narrow, minimum in SCALING_TARGETS:
            low, high = summary.get(narrow, {}).get(receiver, {}), summary.get(wide, {}).get(receiver, {})
            r, rate = low.get("load_cpu_ms_per_image"), low.get("images_per_s")
            s_low, s_high = low.get("sender_cpu_ms_per_image"), high.get("sender_cpu_ms_per_image")
            if not r or not rate or not s_low or not s_high:
                continue
            bound = (r + s_low) / (r + s_high)
            needs = max((minimum * s_high - s_low) / (1 - minimum), 0.0)
            busy = cores_busy(low)
            how = (f"senders {s_low:.3f} -> {s_high:.3f} ms; receiver {r:.3f} ms at {narrow}, "
                   f"{needs:.3f} needed")
            saturated = busy >= SATURATED * cpus
            if not saturated:
                how = f"no bound: {busy:.2f} of {cpus} CPUs busy at {narrow} ({how})"
            out.append({"target": f"{receiver}: {wide} ≥ {minimum:g}x {narrow} (images/s)", "bound": round(bound, 2),
                        "reachable": bound >= minimum if saturated else None, "needs_ms": round(needs, 3),
                        "how": how})
    return out


def markdown(result: dict) -> str:
    summary, ratio_table = result["summary"], result["ratios"]
    env = result["environment"]
    lines = [
        f"# fastscp load benchmark ({result['mode']} mode, {result['rounds']} rounds, medians)",
        "",
        f"{result['started']}; fastscp {env['fastscp']}; {env['storescp']}; {env['orthanc']}; "
        f"pynetdicom {env['pynetdicom']}; Python {env['python']}; {env['cpus']} CPUs, loopback.",
        "",
        "Sender: dcmtk storescu, K concurrent associations, each sending a slice of the corpus "
        "unchanged (one presentation context per SOP class and transfer syntax), TCP_NODELAY=1 unless the "
        "scenario says Nagle. img/s: the files over the time from starting the K storescu processes until the "
        "last exited (their start-up and association included). Latency: storescu's time from sending a "
        "C-STORE-RQ to its response. CPU: the "
        "receiver's process tree (children included). RSS: the largest VmHWM of one receiver process "
        "(for fastscp: its largest worker, and the whole tree). CPU comes from /proc clock ticks (10 ms per "
        "process), so it is coarse for short runs. Files: byte-exact / received / sent. ×fastscp: fastscp "
        "images/s ÷ this receiver's, same round, median over rounds.",
        "",
        "Corpora:",
        "",
    ]
    for name, description in result["corpora"].items():
        lines.append(f"- `{name}`: {description}")
    lines.append("")
    for scenario in result["scenarios"]:
        name = scenario["name"]
        if name not in summary:
            continue
        title = f"## {name}: {scenario['corpus']}, K={scenario['k']}"
        if scenario.get("limit"):
            title += f", first {scenario['limit']} files"
        if scenario.get("note"):
            title += f" ({scenario['note']})"
        lines += [title, "",
                  "| receiver | img/s | MB/s | p50 ms | p99 ms | CPU ms/img | peak RSS MiB | files | ×fastscp |",
                  "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
        rows = sorted(summary[name].items(), key=lambda kv: -(kv[1]["images_per_s"] or 0))
        for receiver, s in rows:
            ratio = ratio_table.get(name, {}).get(receiver, {}).get("median")
            rss = s["peak_rss_mib"]
            rss_text = _fmt(rss)
            if s.get("worker_peak_rss_mib") is not None:
                rss_text = f"{_fmt(s['worker_peak_rss_mib'])} (tree {_fmt(rss)})"
            files = f"{s['exact_min']}/{s['received_min']}/{s['files']}"
            failed = f" ({s['failed_rounds']} failed)" if s["failed_rounds"] else ""
            lines.append(
                f"| {receiver}{failed} | {_fmt(s['images_per_s'])} | {_fmt(s['mb_per_s'])} | "
                f"{_fmt(s['p50_ms'], 2)} | {_fmt(s['p99_ms'], 2)} | {_fmt(s['cpu_ms_per_image'], 2)} | "
                f"{rss_text} | {files} | {'' if receiver == 'fastscp' else (_fmt(ratio, 2) + 'x' if ratio else '–')} |"
            )
        lines.append("")
    lines += process_tables(result)
    lines += ["## Targets (reported, not asserted)", "", "| target | measured | met |", "|---|---:|---|"]
    for t in result["targets"]:
        met = {True: "yes", False: "**no**", None: "–"}[t["met"]]
        lines.append(f"| {t['target']} | {'–' if t['measured'] is None else t['measured']} | {met} |")
    lines.append("")
    if result.get("cpu_bounds"):
        lines += ["## What the CPUs allow", "",
                  "The most each target's ratio can be on these CPUs where the load keeps them busy "
                  "(`report.cpu_bounds`): against a peer, by faster user code alone (no user time at all, the "
                  "kernel time as measured, the cheaper run's senders); k16 against k4, by any receiver "
                  "spending its k4 CPU per image at both (the senders' grows; a cheaper receiver shows less).",
                  "",
                  "| target | at most | reachable | from |", "|---|---:|---|---|"]
        for b in result["cpu_bounds"]:
            reachable = {True: "yes", False: "**no**", None: "–"}[b["reachable"]]
            lines.append(f"| {b['target']} | {b['bound']} | {reachable} | {b['how']} |")
        lines.append("")
    if result["skipped"]:
        lines += ["## Skipped", ""] + [f"- {s}" for s in result["skipped"]] + [""]
    noisy = [r for r in result["runs"] if r["foreign_cores"] > 0.3]
    lines += [f"Other processes used > 0.3 cores during {len(noisy)} of {len(result['runs'])} runs "
              "(see `foreign_cores` in the JSON)."]
    if result["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in result["errors"]]
    return "\n".join(lines) + "\n"


#: The columns of the per-process CPU table, in order.
PROCESS_COLUMNS = ("workers", "indexer", "post-store", "supervisor", "monitor", "forwarder", "other")


def _by_role_head(title: str, note: str, more: tuple[str, ...]) -> list[str]:
    """The head of a table of a row per scenario and receiver: a column per fastscp process role, then ``more``."""
    return [title, "", note, "", "| scenario | receiver | " + " | ".join((*PROCESS_COLUMNS, *more)) + " |",
            "|---|---|" + "---:|" * (len(PROCESS_COLUMNS) + len(more))]


def _by_role_cells(by_process: dict) -> str:
    return " | ".join(_fmt(by_process.get(c), 2) if by_process.get(c) is not None else "–" for c in PROCESS_COLUMNS)


def process_tables(result: dict) -> list[str]:
    """CPU per image of each fastscp process beside storescp's, the total RSS, and the burst's catch-up."""
    summary = result["summary"]
    lines = _by_role_head(
        "## CPU per image by process (ms, medians)",
        "fastscp's processes by role (`/proc/PID/comm`), over the load and, for a burst, its catch-up; "
        "storescp: the listener and its forked children. Total RSS: the largest sum of RSS over the "
        "receiver's processes at one moment (pages shared after a fork count in each); PSS: the same with each "
        "shared page divided among its sharers.",
        ("total", "storescp+B", "storescp", "total RSS (PSS) MiB"))
    for scenario in result["scenarios"]:
        name = scenario["name"]
        by_receiver = summary.get(name, {})
        peers = [by_receiver.get(p, {}).get("cpu_ms_per_image") for p in ("storescp+B", "storescp")]
        for receiver, entry in by_receiver.items():
            by_process = entry.get("cpu_ms_by_process") or {}
            if not receiver.startswith("fastscp") or not by_process:
                continue
            lines.append(f"| {name} | {receiver} | {_by_role_cells(by_process)}" +
                         f" | {_fmt(entry['cpu_ms_per_image'], 2)} | " +
                         " | ".join(_fmt(p, 2) for p in peers) +
                         f" | {_fmt(entry.get('total_rss_mib'))} ({_fmt(entry.get('total_pss_mib'))}) |")
    lines.append("")
    lines += load_budget_table(result)
    bursts = [(s["name"], r, e) for s in result["scenarios"] for r, e in summary.get(s["name"], {}).items()
              if e.get("derived_s")]
    if bursts:
        lines += ["## After a burst: derived work complete (seconds after the last image was answered)", "",
                  "| scenario | receiver | images | img/s | index | thumbnails | scan sheets | all there |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for name, receiver, e in bursts:
            d = e["derived_s"]
            lines.append(f"| {name} | {receiver} | {e['files']} | {_fmt(e['images_per_s'])} | "
                         + " | ".join(_fmt(d.get(k)) for k in ("index", "thumbnails", "scan sheets"))
                         + f" | {'**no**' if e['failed_rounds'] else 'yes'} |")
        lines.append("")
    return lines


def load_budget_table(result: dict) -> list[str]:
    """CPU per image until the last storescu exited, the receiver's by role and the senders': on a machine
    whose CPUs the load keeps busy, images/s is about the CPUs over their sum (the last column)."""
    lines = _by_role_head(
        "## CPU per image during the load (ms, medians)",
        "From starting the storescu senders until the last exited: what the receiver's processes (fastscp's "
        "by role) and the storescu senders spent while they shared the CPUs; fastscp's derived work after "
        "that (above) is not in it. Kernel: of the receiver's, its system time: where the load keeps the CPUs "
        "busy and the senders spend no less, a receiver whose kernel time alone is more than a peer's whole "
        "CPU per image cannot reach the peer's rate by faster code of its own. Cores busy: (receiver + "
        "senders) x images/s.",
        ("receiver", "kernel", "senders", "both", "img/s", "cores busy"))
    summary = result["summary"]
    for scenario in result["scenarios"]:
        name = scenario["name"]
        for receiver, entry in summary.get(name, {}).items():
            mine, senders = entry.get("load_cpu_ms_per_image"), entry.get("sender_cpu_ms_per_image")
            if mine is None or senders is None:
                continue  # a result of an older bench
            by_process = entry.get("load_cpu_ms_by_process") or {}  # storescp's and Orthanc's: none of these
            lines.append(f"| {name} | {receiver} | {_by_role_cells(by_process)}" +
                         f" | {_fmt(mine, 2)} | {_fmt(entry.get('load_kernel_ms_per_image'), 2)} | "
                         f"{_fmt(senders, 2)} | {_fmt(mine + senders, 2)} | "
                         f"{_fmt(entry.get('images_per_s'))} | {_fmt(cores_busy(entry), 2)} |")
    lines.append("")
    return lines


def chart(result: dict, path: Path) -> str | None:
    """Grouped bars: images/s and CPU ms per image by scenario and receiver."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no chart: matplotlib is not installed (pip install matplotlib)"
    summary = result["summary"]
    scenarios = [s["name"] for s in result["scenarios"] if s["name"] in summary]
    receivers: list[str] = []
    for s in scenarios:
        for r in summary[s]:
            if r not in receivers:
                receivers.append(r)
    fig, axes = plt.subplots(2, 1, figsize=(max(10, 1.3 * len(scenarios) + 3), 9), sharex=True)
    width = 0.8 / max(1, len(receivers))
    cmap = plt.get_cmap("tab10")
    for row, (metric, label) in enumerate((("images_per_s", "images/s (log)"),
                                           ("cpu_ms_per_image", "receiver CPU ms / image (log)"))):
        ax = axes[row]
        for i, receiver in enumerate(receivers):
            xs, ys = [], []
            for j, s in enumerate(scenarios):
                value = summary[s].get(receiver, {}).get(metric)
                if value:
                    xs.append(j + (i - (len(receivers) - 1) / 2) * width)
                    ys.append(value)
            ax.bar(xs, ys, width, label=receiver, color=cmap(i % 10))
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(axis="y", which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(8, len(receivers)), fontsize=8,
               bbox_to_anchor=(0.5, 0.965))
    fig.suptitle(f"fastscp load benchmark, {result['mode']} mode, medians of {result['rounds']} round(s) "
                 f"({result['started']})", fontsize=11)
    axes[1].set_xticks(range(len(scenarios)))
    axes[1].set_xticklabels(scenarios, rotation=30, ha="right")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write(result: dict, out: Path, stem: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str))
    paths["md"].write_text(markdown(result))
    problem = chart(result, paths["png"])
    if problem:
        result["skipped"].append(problem)
        del paths["png"]
    return paths


# -- py-spy profiles -----------------------------------------------------------------------

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(file: str) -> str:
    """``.../fastscp/storage/area.py`` -> ``storage/area.py``: the package names the stage."""
    parts = Path(file).parts
    return "/".join(parts[-2:]) if len(parts) > 1 else file


def profile_summary(raw: Path, top: int = 15, marker: str = "Association.run") -> str:
    """Where the time goes, from ``py-spy record --idle --format raw``.

    Samples whose stack holds ``marker`` (fastscp's association threads) are
    summarised apart from the rest (supervisor, indexer, idle threads): the
    share of their samples per function, self (the function's own line was
    running, C calls such as ``recv_into`` or ``os.fsync`` included) and
    inclusive. With ``--idle`` the shares are of wall time, waits included.
    """
    groups: dict[str, tuple[Counter[str], Counter[str]]] = {
        "association threads": (Counter(), Counter()), "other threads": (Counter(), Counter())}
    totals: Counter[str] = Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        count = int(count_text)
        names = []
        for frame in frames:
            m = _FRAME.match(frame)
            names.append(f"{m['func']} ({_short(m['file'])})" if m else frame)
        group = "association threads" if any(marker in n for n in names) else "other threads"
        totals[group] += count
        self_counts, incl_counts = groups[group]
        self_counts[names[-1]] += count
        for name in set(names):
            incl_counts[name] += count
    lines = [f"### {raw.stem}"]
    for group, (self_counts, incl_counts) in groups.items():
        total = totals[group]
        if not total:
            continue
        lines += ["", f"{group}: {total} samples", "", "| function | self % | inclusive % |", "|---|---:|---:|"]
        for name, count in self_counts.most_common(top):
            lines.append(f"| `{name}` | {100 * count / total:.1f} | {100 * incl_counts[name] / total:.1f} |")
    return "\n".join(lines)


def failed_runs(runs: list[Run]) -> list[str]:
    return [f"round {r.round} {r.scenario} {r.receiver}: {e}" for r in runs for e in r.errors]
