"""What the ``fastscp`` commands share: running a parsed command, and the options that find an index."""

from __future__ import annotations

import argparse
import sys

from fastscp.config import Config, ConfigError, load_config


def run(args: argparse.Namespace) -> int:
    """Run a parsed command: its exit status; 2 with the message for a config error."""
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"fastscp: config error: {exc}", file=sys.stderr)
        return 2


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    """``--index-db``, ``--storage-dir``, ``--config``: which index a command reads."""
    where = parser.add_argument_group("index (first given wins)")
    where.add_argument("--index-db", metavar="FILE", help="the DuckDB index file")
    where.add_argument("--storage-dir", metavar="DIR", help="the storage folder: its index.duckdb")
    where.add_argument("--config", metavar="FILE", help="the server's YAML config file")


def index_config(args: argparse.Namespace) -> Config:
    """The config ``fastscp serve`` with the same options would use."""
    return load_config(args.config, {"storage.directory": args.storage_dir, "database.path": args.index_db})


def index_paths(args: argparse.Namespace) -> tuple[str, str]:
    """(storage root, index file)."""
    config = index_config(args)
    return config.storage.directory, config.index_path
