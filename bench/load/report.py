"""Results as JSON, a markdown table and a PNG chart."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from bench.load.runner import Run

#: Targets from the issue, reported (never asserted): (scenario, peer, minimum
#: ratio fastscp / peer in images/s).
RATIO_TARGETS: tuple[tuple[str, str, float], ...] = (
    ("ct-k1", "storescp+B", 1.0),
    ("ct-k1", "orthanc", 2.0),
    ("ct-k4", "storescp+B", 1.0),
    ("ct-k4", "orthanc", 2.0),
    ("mr-k4", "storescp", 1.0),
    ("mr-k4", "storescp+B", 1.0),
)
RSS_TARGET = ("large-k1", 200.0)  # fastscp worker peak RSS, MiB


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "–"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def targets(summary: dict, ratio_table: dict) -> list[dict]:
    out = []
    for scenario, peer, minimum in RATIO_TARGETS:
        ratio = ratio_table.get(scenario, {}).get(peer, {}).get("median")
        out.append({"target": f"{scenario}: fastscp ≥ {minimum:g}x {peer} (images/s)",
                    "measured": None if ratio is None else round(ratio, 2),
                    "met": None if ratio is None else ratio >= minimum})
    scenario, limit = RSS_TARGET
    rss = summary.get(scenario, {}).get("fastscp", {}).get("worker_peak_rss_mib")
    out.append({"target": f"{scenario}: fastscp worker peak RSS < {limit:g} MiB",
                "measured": None if rss is None else round(rss, 1),
                "met": None if rss is None else rss < limit})
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
        "scenario says Nagle. Latency: storescu's time from sending a C-STORE-RQ to its response. CPU: the "
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
    lines += ["## Targets (reported, not asserted)", "", "| target | measured | met |", "|---|---:|---|"]
    for t in result["targets"]:
        met = {True: "yes", False: "**no**", None: "–"}[t["met"]]
        lines.append(f"| {t['target']} | {'–' if t['measured'] is None else t['measured']} | {met} |")
    lines.append("")
    if result["skipped"]:
        lines += ["## Skipped", ""] + [f"- {s}" for s in result["skipped"]] + [""]
    noisy = [r for r in result["runs"] if r["foreign_cores"] > 0.3]
    lines += [f"Other processes used > 0.3 cores during {len(noisy)} of {len(result['runs'])} runs "
              "(see `foreign_cores` in the JSON)."]
    if result["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in result["errors"]]
    return "\n".join(lines) + "\n"


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
