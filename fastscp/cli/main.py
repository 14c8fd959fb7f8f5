"""Command line: ``fastscp serve|echo|send|config`` and the ``store_scp`` alias.

Options of ``serve`` override keys of the config file: each option names its
key (see :data:`fastscp.config.CLI_OPTIONS`), so there is one list of
settings, the config Structs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import msgspec

from fastscp import __version__
from fastscp.cli.common import run
from fastscp.config import CLI_OPTIONS, to_builtins


def _dest(option: str) -> str:
    return option.lstrip("-").replace("-", "_").lower()


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    for option, help_text in CLI_OPTIONS.values():
        if option.startswith("--"):
            parser.add_argument(option, help=help_text)
        else:
            parser.add_argument(_dest(option), nargs="?", metavar=option, help=help_text)
    parser.add_argument("--config", metavar="FILE", help="YAML config file (see config/fastscp.yaml)")


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    overrides: dict[str, object] = {}
    for key, (option, _help) in CLI_OPTIONS.items():
        value = getattr(args, _dest(option))
        if value is not None and key == "accepted_sop_classes":
            value = [v.strip() for v in value.split(",") if v.strip()]
        overrides[key] = value
    return overrides


def _serve(args: argparse.Namespace) -> int:
    from fastscp.cli.forward import load_checked
    from fastscp.process import logs
    from fastscp.runtime.children import serve
    from fastscp.runtime.supervisor import StartupError
    from fastscp.storage.files import FileModes

    overrides = _overrides(args)
    config = load_checked(args.config, overrides)
    # The index, its WAL and the log file hold patient data as the images do;
    # the storage area gives its own files their modes exactly.
    os.umask(FileModes.of(config.storage.file_mode, config.storage.dir_mode).umask())
    logging_ = config.logging
    logs.configure(logging_.level, logging_.format, logging_.file, logging_.max_bytes, logging_.backups)
    try:
        # SIGHUP reads the same file with the same command-line options again.
        return serve(config, reload=lambda: load_checked(args.config, overrides), config_file=args.config or "")
    except StartupError as exc:
        print(f"fastscp: {exc}", file=sys.stderr)
        return 2


def _config(args: argparse.Namespace) -> int:
    from fastscp.cli.forward import load_checked

    config = load_checked(args.config, _overrides(args))
    sys.stdout.write(msgspec.yaml.encode(to_builtins(config)).decode())
    return 0


def _client_tls(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The TLS context of ``--tls*`` (any of them turns TLS on), else None."""
    from fastscp.net.scu import tls_context

    files = (args.tls_ca_bundle, args.tls_certificate, args.tls_private_key)
    if not (args.tls or any(files) or args.tls_min_version):
        return None
    return tls_context(ca_bundle=args.tls_ca_bundle or "", certificate=args.tls_certificate or "",
                       private_key=args.tls_private_key or "", min_version=args.tls_min_version or "1.2")


def _echo(args: argparse.Namespace) -> int:
    from fastscp.net.scu import SCUError, echo

    try:
        status = echo(args.host, args.port, aet=args.aet, aec=args.aec, tls=_client_tls(args))
    except SCUError as exc:
        print(f"fastscp echo: {exc}", file=sys.stderr)
        return 1
    print(f"C-ECHO {args.aec}@{args.host}:{args.port}: status 0x{status:04X}")
    return 0 if status == 0 else 1


def _send(args: argparse.Namespace) -> int:
    from fastscp.net.scu import SCUError, send

    try:
        summary = send(args.host, args.port, args.paths, aet=args.aet, aec=args.aec, tls=_client_tls(args),
                       out=sys.stdout, progress=sys.stderr)
    except SCUError as exc:
        print(f"fastscp send: {exc}", file=sys.stderr)
        return 1
    if summary.error:
        print(f"fastscp send: {summary.error}", file=sys.stderr)
    print(summary)
    return 0 if summary.ok else 1


def _add_client_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--aet", default="FASTSCU", help="our (calling) AE title")
    sub.add_argument("--aec", default="ANY-SCP", help="the called AE title")
    sub.add_argument("--tls", action="store_true", help="DICOM TLS (implied by any --tls-* option)")
    sub.add_argument("--tls-ca-bundle", metavar="FILE",
                     help="PEM CA certificates the receiver's certificate is checked against "
                          "(default: the system's)")
    sub.add_argument("--tls-certificate", metavar="FILE",
                     help="our certificate (PEM), for a receiver that requires client certificates")
    sub.add_argument("--tls-private-key", metavar="FILE", help="the private key of --tls-certificate (PEM)")
    sub.add_argument("--tls-min-version", choices=("1.2", "1.3"), help="oldest TLS version to use (default 1.2)")


#: Modules that add their own subcommands: each has ``register(commands)``,
#: which adds a parser with ``set_defaults(func=...)`` to the subparsers.
COMMAND_MODULES: tuple[str, ...] = ("fastscp.cli.status", "fastscp.cli.images", "fastscp.cli.index",
                                     "fastscp.cli.service", "fastscp.cli.export", "fastscp.cli.forward")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastscp", description="High-throughput DICOM Storage SCP")
    parser.add_argument("--version", action="version", version=f"fastscp {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the Storage SCP")
    _add_serve_arguments(serve)
    serve.set_defaults(func=_serve)

    config = commands.add_parser("config", help="check a config and print the settings in force")
    _add_serve_arguments(config)
    config.set_defaults(func=_config)

    for name, func, help_text in (("echo", _echo, "send a C-ECHO"), ("send", _send, "send DICOM files with C-STORE")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("host")
        sub.add_argument("port", type=int)
        if name == "send":
            sub.add_argument("paths", nargs="+", metavar="FILE_OR_DIR")
        _add_client_arguments(sub)
        sub.set_defaults(func=func)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def store_scp_main(argv: list[str] | None = None) -> int:
    """``store_scp PORT AE_TITLE [options]``: the same as ``fastscp serve``."""
    return main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
