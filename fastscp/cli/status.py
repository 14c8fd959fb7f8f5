"""``fastscp status``: what a running server is doing, asked of its monitor.

Fetches ``/status.json`` from the monitor (``monitor.listen``) and prints a
summary for a terminal, or the JSON itself with ``--json``. Registered in
:data:`fastscp.cli.main.COMMAND_MODULES`.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request

import msgspec

from fastscp.monitor.server import DEFAULT_LISTEN, ListenError, parse_listen
from fastscp.status import StatusSnapshot, human_bytes

#: Seconds to wait for the monitor's answer.
DEFAULT_TIMEOUT = 5.0
#: How many of the snapshot's recent associations the summary lists.
RECENT_SHOWN = 5
#: How many modalities, calling AEs and reject reasons a summary line lists.
COUNTS_SHOWN = 10


class StatusError(Exception):
    """The status can't be fetched; the message says from where and why."""


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``status`` to ``fastscp``'s subcommands."""
    parser = commands.add_parser(
        "status", help="show what a running server is doing (asks its monitor)",
        description="Fetch /status.json from the monitor of a running fastscp and print a summary.",
    )
    parser.add_argument("--json", action="store_true", help="print the full status as JSON")
    parser.add_argument("--url", help=f"the monitor's address (default http://{DEFAULT_LISTEN}, or monitor.listen "
                                      "of --config)")
    parser.add_argument("--config", metavar="FILE", help="take the address from monitor.listen of this config file")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"how long to wait for the monitor (default {DEFAULT_TIMEOUT:g})")
    parser.set_defaults(func=run)


def url_for_listen(listen: str) -> str:
    """The URL a client uses for ``monitor.listen``; a wildcard host means this machine.

    Raises
    ------
    ListenError
        ``listen`` is not ``HOST:PORT``.
    """
    host, port = parse_listen(listen)
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def monitor_url(config_path: str | None) -> str:
    """``monitor.listen`` of the config file as a URL (the default without a file).

    Raises
    ------
    fastscp.config.ConfigError
        The file can't be used (the CLI prints it and exits 2).
    StatusError
        The config turns the monitor off.
    """
    if config_path is None:
        return url_for_listen(DEFAULT_LISTEN)
    from fastscp.config import load_config

    section = getattr(load_config(config_path), "monitor", None)
    if section is not None and not getattr(section, "enabled", True):
        raise StatusError(f"{config_path}: monitor.enabled is false: the server runs no monitor to ask")
    listen = getattr(section, "listen", None) or DEFAULT_LISTEN
    try:
        return url_for_listen(listen)
    except ListenError as exc:
        raise StatusError(f"{config_path}: {exc}") from None


def fetch_status(url: str, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """The body of ``URL/status.json``.

    Raises
    ------
    StatusError
        Unreachable, an HTTP error, or no snapshot yet; the message names the URL.
    """
    target = url.rstrip("/") + "/status.json"
    where = "the monitor's address is monitor.listen in the server's config; pass --config FILE or --url URL"
    try:
        with urllib.request.urlopen(target, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 503:
            raise StatusError(f"{target}: the server has not published its status yet (starting?); "
                              "try again in a second") from None
        raise StatusError(f"{target}: HTTP {exc.code} {exc.reason} (is this fastscp's monitor? {where})") from None
    except urllib.error.URLError as exc:
        reason = exc.reason.strerror if isinstance(exc.reason, OSError) and exc.reason.strerror else exc.reason
        raise StatusError(f"cannot reach the monitor at {target}: {reason}. Is fastscp serve running "
                          f"with the monitor on? ({where})") from None
    except (TimeoutError, OSError) as exc:
        raise StatusError(f"cannot reach the monitor at {target}: {exc} ({where})") from None


def run(args: argparse.Namespace) -> int:
    """``fastscp status``: 0 with the status printed, 1 if it can't be had."""
    try:
        url = args.url or monitor_url(args.config)
        body = fetch_status(url, args.timeout)
        try:
            snapshot = msgspec.json.decode(body, type=StatusSnapshot)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise StatusError(f"{url}: not a fastscp status ({exc}); is this fastscp's monitor?") from None
    except StatusError as exc:
        print(f"fastscp status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(msgspec.json.format(body, indent=2).decode() + "\n")
    else:
        sys.stdout.write(summary(snapshot))
    return 0


# -- the summary ---------------------------------------------------------------------------


def summary(s: StatusSnapshot) -> str:
    """The snapshot as text for a terminal (values from the network are made printable)."""
    t, r, st = s.totals, s.rates, s.storage
    alive = sum(1 for w in s.workers if w.alive)
    lines = [
        f"{_safe(s.ae_title)} (fastscp {_safe(s.version)}) on {_safe(s.host)}:{s.port}: {_safe(s.state)}, "
        f"up {_duration(s.time - s.started)}; status of {_clock(s.time)}",
    ]
    rows = [
        ("Stored", f"{t.instances:,} instances, {human_bytes(t.bytes)} received; {t.failures:,} failed, "
                   f"{t.duplicates:,} duplicates"),
        ("Rates", f"{r.instances_per_s_1m:.1f} instances/s, {r.mb_per_s_1m:.1f} MB/s over 1 min; "
                  f"{r.instances_per_s_5m:.1f} instances/s, {r.mb_per_s_5m:.1f} MB/s over 5 min"),
        ("Associations", f"{len(s.open)} open, {t.associations:,} ended, {t.rejected:,} rejected"),
        ("Storage", f"{_safe(st.root)}: {human_bytes(st.free_bytes)} free of {human_bytes(st.total_bytes)}, "
                    f"minimum {human_bytes(st.min_free_bytes)}"),
    ]
    if st.below_watermark:
        rows.append(("WARNING", "storage is below its free-space watermark (storage.min_free_bytes): "
                                "new objects are refused with 0xA700 (Out of resources)"))
    if s.state != "running":
        rows.append(("WARNING", f"the server is {_safe(s.state)}: no new associations"))
    rows += [
        ("Index", f"{_safe(s.index.path)}: {s.index.committed:,} committed, lag {s.index.lag:,}"),
        *([("Post-store", f"{s.poststore.waiting:,} waiting (oldest {s.poststore.oldest_seconds:.1f} s), "
                          f"{s.poststore.studies:,} studies before their scan sheet, {s.poststore.thumbnails:,} "
                          f"thumbnails made")] if s.poststore else []),
        ("Workers", f"{alive} of {len(s.workers)} running, {sum(w.restarts for w in s.workers)} restarts"),
        ("By modality", _counts(s.per_modality)),
        ("By calling AE", _counts(s.per_calling_ae)),
        ("Rejected", _counts(s.rejects)),
    ]
    rows += [(f"Hook {_safe(h.name)}", f"{h.event}: {h.runs:,} runs, {h.succeeded:,} succeeded, {h.failed:,} failed, "
                                       f"{h.retried:,} retried, {h.timed_out:,} timed out; {h.running} running, "
                                       f"{h.queued:,} queued"
              + (f"; last error at {_clock(h.last_error_at)}: {_safe(h.last_error)}" if h.last_error else ""))
             for h in s.hooks]
    width = max(len(label) for label, _ in rows)
    lines += [f"{label:<{width}}  {value}" for label, value in rows]
    if s.open:
        lines += ["", f"Open associations ({len(s.open)})"]
        lines += _table(
            ("CALLING AE", "ADDRESS", "STARTED", "INSTANCES", "RECEIVED", "RATE"),
            [(_safe(a.calling_ae_title), _safe(a.peer_address), _clock(a.started), f"{a.instances:,}",
              human_bytes(a.bytes), f"{a.rate:.1f}/s") for a in sorted(s.open, key=lambda a: a.started)],
            right={3, 4, 5},
        )
    if s.recent:
        lines += ["", f"Recent associations (newest {min(RECENT_SHOWN, len(s.recent))} of {len(s.recent)})"]
        lines += _table(
            ("CALLING AE", "ADDRESS", "ENDED", "INSTANCES", "RECEIVED", "OUTCOME"),
            [(_safe(a.calling_ae_title), _safe(a.peer_address), _clock(a.ended), f"{a.instances:,}",
              human_bytes(a.bytes), _safe(a.outcome)) for a in s.recent[:RECENT_SHOWN]],
            right={3, 4},
        )
    return "\n".join(lines) + "\n"


def _safe(text: str) -> str:
    # AE titles and outcomes come from the network: an escape sequence must
    # not reach the terminal, so control characters are shown as \x1b etc.
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _counts(counts: dict[str, int]) -> str:
    if not counts:
        return "none"
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    shown = ", ".join(f"{_safe(key)} {n:,}" for key, n in ranked[:COUNTS_SHOWN])
    return shown + (f", and {len(ranked) - COUNTS_SHOWN} more" if len(ranked) > COUNTS_SHOWN else "")


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    return [
        "  " + "  ".join(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row))
        .rstrip()
        for row in (header, *rows)
    ]


def _duration(seconds: float) -> str:
    s = max(0, int(seconds))
    m, h, d = s // 60, s // 3600, s // 86400
    if s < 60:
        return f"{s} s"
    if h < 1:
        return f"{m} min {s % 60:02d} s"
    if d < 1:
        return f"{h} h {m % 60:02d} min"
    return f"{d} d {h % 24} h"


def _clock(epoch: float) -> str:
    if not epoch:
        return "-"
    local = time.localtime(epoch)
    same_day = time.localtime()[:3] == local[:3]
    return time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S", local)
