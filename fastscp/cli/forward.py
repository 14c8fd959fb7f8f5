"""``fastscp forward status|retry|purge|run``: the forwarding queue, and the forwarder run on its own.

The queue is a SQLite file (``forwarding.queue``, beside the index by
default) that these commands open directly, whether or not the server runs.
Registered in :data:`fastscp.cli.main.COMMAND_MODULES`.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import msgspec

from fastscp.config import Config, load_config
from fastscp.forward.queue import Queue, QueueError
from fastscp.forward.rules import compile_rules


def load_checked(path: str | None, overrides: dict[str, Any] | None = None) -> Config:
    """:func:`fastscp.config.load_config`, and the forwarding rules checked as the forwarder will use them.

    Raises
    ------
    fastscp.config.ConfigError
        A key that can't be used, named with its file.
    """
    config = load_config(path, overrides)
    compile_rules(config.forwarding, path or "the command line")
    return config


def _config(args: argparse.Namespace) -> Config:
    return load_checked(args.config, {"storage.directory": args.storage_dir, "database.path": args.index_db})


def _queue(args: argparse.Namespace) -> tuple[Config, Queue]:
    config = _config(args)
    return config, Queue(config.forward_queue_path, create=False)


def _age(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def status(args: argparse.Namespace) -> int:
    config, queue = _queue(args)
    try:
        states = queue.states(list(config.forwarding.destinations))
        failures = queue.failures(limit=args.failures) if args.failures else []
    finally:
        queue.close()
    if args.json:
        sys.stdout.write(msgspec.json.encode(states).decode() + "\n")
        return 0
    print(f"queue {config.forward_queue_path}")
    print(f"{'destination':<16} {'queued':>7} {'in flight':>9} {'sent':>8} {'failed':>7} {'resent':>7} "
          f"{'oldest':>8}  last error")
    for s in states:
        destination = config.forwarding.destinations.get(s.name)
        name = s.name if destination is not None else f"{s.name} (not configured)"
        error = "-"
        if s.last_error:  # peer-supplied text inside: repr() shows control characters escaped
            when = time.strftime("%Y-%m-%d %H:%M:%S ", time.localtime(s.last_error_at)) if s.last_error_at else ""
            error = f"{when}{s.last_error!r}"
        print(f"{name:<16} {s.queued:>7} {s.in_flight:>9} {s.sent:>8} {s.failed:>7} {s.resent:>7} "
              f"{_age(s.oldest_queued_seconds):>8}  {error}")
    for destination, path, error in failures:
        print(f"failed: {destination}: {path}: {error!r}")
    return 0


def retry(args: argparse.Namespace) -> int:
    _config_, queue = _queue(args)
    try:
        count = queue.retry(args.destination)
    finally:
        queue.close()
    print(f"{count} failed instances queued again" + (f" for {args.destination}" if args.destination else ""))
    return 0


def purge(args: argparse.Namespace) -> int:
    states = tuple(s for s in ("queued", "failed", "sent") if getattr(args, s) or args.all)
    if not states:
        print("fastscp forward purge: say what to delete: --failed, --sent, --queued or --all", file=sys.stderr)
        return 2
    _config_, queue = _queue(args)
    try:
        count = queue.purge(states, args.destination)
    finally:
        queue.close()
    print(f"{count} {'/'.join(states)} instances removed from the queue"
          + (f" of {args.destination}" if args.destination else ""))
    return 0


def run(args: argparse.Namespace) -> int:
    from fastscp.forward.process import forward_main
    from fastscp.process import logs

    overrides = {"storage.directory": args.storage_dir, "database.path": args.index_db}
    config = load_checked(args.config, overrides)
    logging_ = config.logging
    logs.configure(logging_.level, logging_.format, logging_.file, logging_.max_bytes, logging_.backups)
    forward_main(config, reload=lambda: load_checked(args.config, overrides), source=args.config or "")
    return 0


def _main(args: argparse.Namespace) -> int:
    try:
        return int(args.action(args))
    except QueueError as exc:
        print(f"fastscp forward: {exc}", file=sys.stderr)
        return 1


def register(commands: Any) -> None:
    """Add ``forward`` to the ``fastscp`` subcommands."""
    parser = commands.add_parser("forward", help="the forwarding queue: status, retry, purge; or run the forwarder",
                                 description="Inspect and manage the forwarding queue (forwarding.queue).")
    actions = parser.add_subparsers(dest="action_name", required=True)

    def add(name: str, action: Any, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=help_text)
        where = sub.add_argument_group("server (as fastscp serve takes them)")
        where.add_argument("--config", metavar="FILE", help="the server's YAML config file")
        where.add_argument("--storage-dir", metavar="DIR", help="storage.directory")
        where.add_argument("--index-db", metavar="FILE", help="database.path")
        sub.set_defaults(func=_main, action=action)
        return sub

    sub = add("status", status, "queued, in flight, sent, failed, resent, oldest queued and last error per destination")
    sub.add_argument("--json", action="store_true", help="print the figures as JSON")
    sub.add_argument("--failures", type=int, default=10, metavar="N", help="list the N newest failed instances")
    sub = add("retry", retry, "queue the failed instances again (a permanent refusal is never retried otherwise)")
    sub.add_argument("--destination", metavar="NAME", help="only this destination's")
    sub = add("purge", purge, "delete instances from the queue (their files stay)")
    sub.add_argument("--destination", metavar="NAME", help="only this destination's")
    sub.add_argument("--failed", action="store_true", help="the failed ones")
    sub.add_argument("--sent", action="store_true", help="the sent ones (their count stays in 'sent')")
    sub.add_argument("--queued", action="store_true", help="the ones still waiting (they will not be sent)")
    sub.add_argument("--all", action="store_true", help="all of them")
    add("run", run, "run the forwarder in the foreground, beside a server without forwarding of its own")
