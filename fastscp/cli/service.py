"""``fastscp service install|start|stop|reload|status|uninstall``: fastscp under systemd.

``install`` writes the unit (``fastscp/data/fastscp.service``, its ``@NAME@``
values filled in from this installation and the config file), creates the
service's system user, its storage folders and a config file if there is
none, then enables the unit. ``uninstall`` disables and removes the unit and
keeps everything else: the stored images, the index, the config file, the
user. ``start``, ``stop``, ``reload`` call systemctl; ``status`` prints the
unit's state and the monitor's summary (:mod:`fastscp.cli.status`).

``--root DIR`` puts every file under DIR (an image being built, or a test's
temporary folder): the user goes into DIR/etc/passwd (``useradd --prefix``)
and the unit is enabled offline (``systemctl --root``). Registered in
:data:`fastscp.cli.main.COMMAND_MODULES`.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import pwd
import shutil
import stat
import subprocess
import sys
import sysconfig

from fastscp.config import Config, ConfigError, load_config
from fastscp.storage.files import BROWSABLE, FileModes, makedirs

UNIT_NAME = "fastscp.service"
UNIT_DIR = "/etc/systemd/system"
DEFAULT_CONFIG = "/etc/fastscp/fastscp.yaml"
DEFAULT_USER = "fastscp"
#: storage.directory of the config file install writes when there is none.
DEFAULT_STORAGE = "/var/lib/fastscp"
#: sd_booted(3): this folder exists only when systemd runs as PID 1.
SYSTEMD_RUNTIME = "/run/systemd/system"
#: The service's files are read by its group (the config file: the user the service runs as).
CONFIG_MODES = FileModes(0o640, 0o750)
#: Seconds systemd waits for a stop beyond server.shutdown_timeout: the index
#: commit and the post-store queue come after the associations have finished.
STOP_MARGIN = 60
#: Open files per association (socket, temp files, the stored files storage.area.PageRecycler holds, pipes) and per
#: pending connection, with room to spare.
FILES_PER_CONNECTION = 16
MIN_NOFILE = 65536
#: ProtectHome=yes hides these from the service: fastscp can't run from there.
HIDDEN_BY_PROTECT_HOME = ("/home", "/root", "/run/user")

#: The config file install writes when there is none: the service's own
#: values; every other key keeps its default (config/fastscp.yaml has them all).
DEFAULT_CONFIG_TEXT = f"""\
# fastscp as a service: written by `fastscp service install`, kept by
# `fastscp service uninstall`. Every key, its default and what it does:
# config/fastscp.yaml in fastscp's source. `fastscp config --config FILE`
# checks this file and prints the settings in force.
#
# `systemctl reload fastscp` applies the keys marked [live] there. After
# changing storage.directory, storage.sr_directory, database.path or
# logging.file, run `fastscp service install` again: the service may write
# only to the folders named in its unit.

server:
  # The registered DICOM port; the unit grants CAP_NET_BIND_SERVICE for it.
  port: 104

storage:
  directory: {DEFAULT_STORAGE}
"""


class ServiceError(Exception):
    """A service command can't go on; the message says why and what to do."""


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``service`` and its actions to ``fastscp``'s subcommands."""
    parser = commands.add_parser(
        "service", help="run fastscp under systemd (install, start, stop, reload, status, uninstall)",
        description="Install fastscp as a systemd service and control it.",
    )
    actions = parser.add_subparsers(dest="action", required=True)
    install = actions.add_parser(
        "install", help="write and enable the unit; create the user, the folders and a config file if missing",
    )
    install.add_argument("--user", default=DEFAULT_USER,
                         help=f"system user (and group) the service runs as, created if missing "
                              f"(default {DEFAULT_USER})")
    install.add_argument("--no-systemctl", action="store_true",
                         help="write the files only; don't call systemctl (enable the unit yourself)")
    uninstall = actions.add_parser("uninstall", help="disable and remove the unit; keep the data, config and user")
    uninstall.add_argument("--no-systemctl", action="store_true", help="remove the unit file only")
    for sub in (install, uninstall):
        sub.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE",
                         help=f"the service's config file (default {DEFAULT_CONFIG})")
        sub.add_argument("--root", default="/", metavar="DIR",
                         help="install into this folder instead of / (an image being built)")
        sub.set_defaults(func=run)
    for name, help_text in (("start", "start the service"), ("stop", "stop the service (open associations finish)"),
                            ("reload", "make the service re-read its config file (SIGHUP)")):
        actions.add_parser(name, help=help_text).set_defaults(func=run)
    status = actions.add_parser("status", help="the service's state and the monitor's summary")
    status.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE",
                        help=f"the monitor's address is monitor.listen of this file (default {DEFAULT_CONFIG})")
    status.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``args.action``; a :class:`ServiceError` is one line on stderr and exit status 1."""
    try:
        if args.action == "install":
            install(args.root, args.config, args.user, systemctl=not args.no_systemctl)
            return 0
        if args.action == "uninstall":
            uninstall(args.root, args.config, systemctl=not args.no_systemctl)
            return 0
        if args.action == "status":
            return status(args.config)
        require_systemd(args.action)
        return _systemctl(args.action, UNIT_NAME)
    except ServiceError as exc:
        print(f"fastscp service {args.action}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        hint = " (run it as root)" if isinstance(exc, PermissionError) else ""
        again = "; what is done stays, and running it again keeps what exists" if args.action == "install" else ""
        print(f"fastscp service {args.action}: {where}{exc.strerror or exc}{hint}{again}", file=sys.stderr)
        return 1


# -- install / uninstall -----------------------------------------------------------------


def install(root: str, config_path: str, user: str, *, systemctl: bool = True) -> None:
    """Set fastscp up as a service under ``root``; prints what it did.

    Raises
    ------
    ServiceError
        Not possible as asked (the message says why).
    fastscp.config.ConfigError
        The existing config file can't be used.
    """
    _check_absolute("--config", config_path)
    executable = fastscp_executable()
    for path in _interpreter_paths(executable):
        hidden = next((d for d in HIDDEN_BY_PROTECT_HOME if _under(path, d)), None)
        if hidden:
            print(f"warning: {path} is under {hidden}, which the unit's ProtectHome=yes hides from the service: "
                  "it will not start. Install fastscp outside /home, /root and /run/user "
                  "(e.g. python3 -m venv /opt/fastscp) and run its `fastscp service install`.", file=sys.stderr)
            break
    uid, gid, group = _ensure_user(root, user)

    config_file = _under_root(root, config_path)
    if os.path.exists(config_file):
        print(f"config: {config_file} exists, kept")
        st = os.stat(config_file)
        if not (st.st_uid == uid and st.st_mode & 0o400 or st.st_gid == gid and st.st_mode & 0o040
                or st.st_mode & 0o004):
            print(f"warning: {user} can't read {config_file} (owner {st.st_uid}:{st.st_gid}, mode "
                  f"{stat.S_IMODE(st.st_mode):04o}): the service won't start; `chgrp {group} {config_file}` "
                  f"and `chmod g+r {config_file}`", file=sys.stderr)
    else:
        _write(config_file, DEFAULT_CONFIG_TEXT.encode(), CONFIG_MODES, gid=gid)
        print(f"config: wrote {config_file} (port 104, storage {DEFAULT_STORAGE})")
    config = load_config(config_file)

    modes = FileModes.of(config.storage.file_mode, config.storage.dir_mode)
    writable = writable_paths(config, config_file)
    for folder in writable:
        _ensure_folder(_under_root(root, folder), modes.folder, uid, gid, user)

    unit_file = _under_root(root, os.path.join(UNIT_DIR, UNIT_NAME))
    _write(unit_file, unit_text(config, executable, config_path, user, group, writable).encode(), BROWSABLE)
    print(f"unit: wrote {unit_file} (runs `{executable} serve --config {config_path}` as {user}:{group})")

    if not systemctl:
        print(f"systemctl not called (--no-systemctl): enable it with `systemctl daemon-reload && "
              f"systemctl enable --now {UNIT_NAME}`")
    elif _is_root(root) and systemd_running():
        _systemctl_checked("daemon-reload")
        _systemctl_checked("enable", UNIT_NAME)
        print(f"enabled {UNIT_NAME}: start it with `fastscp service start` (or `systemctl start fastscp`); "
              "a running service takes a changed unit at `systemctl restart fastscp`")
    else:
        _systemctl_checked(f"--root={root}", "enable", UNIT_NAME)
        where = "" if _is_root(root) else f" in {root}"
        print(f"enabled {UNIT_NAME}{where} offline ({_no_systemd_reason(root)}): it starts at the next boot")


def uninstall(root: str, config_path: str, *, systemctl: bool = True) -> None:
    """Stop, disable and remove the unit under ``root``; keep the data, the config and the user."""
    _check_absolute("--config", config_path)
    unit_file = _under_root(root, os.path.join(UNIT_DIR, UNIT_NAME))
    if not os.path.exists(unit_file):
        raise ServiceError(f"{unit_file} does not exist: fastscp is not installed as a service under {root}")
    if systemctl:
        if _is_root(root) and systemd_running():
            _systemctl_checked("disable", "--now", UNIT_NAME)
        else:
            _systemctl_checked(f"--root={root}", "disable", UNIT_NAME)
    os.unlink(unit_file)
    if systemctl and _is_root(root) and systemd_running():
        _systemctl_checked("daemon-reload")
    print(f"removed {unit_file}")
    config_file = _under_root(root, config_path)
    kept = [f"config {config_file}"]
    try:
        config = load_config(config_file)
    except ConfigError:
        pass  # the file may be gone or broken: uninstall names what it can
    else:
        kept += [f"storage {_under_root(root, config.storage.directory)}",
                 f"index {_under_root(root, config.index_path)}"]
        if config.storage.sr_directory:
            kept.append(f"SR storage {_under_root(root, config.storage.sr_directory)}")
    print("kept: " + "; ".join(kept) + "; and the service's user (remove it with userdel when nothing needs "
          "its files)")


def fastscp_executable() -> str:
    """The ``fastscp`` script of this installation (the venv's or the system's), as an absolute path."""
    candidate = os.path.join(sysconfig.get_path("scripts"), "fastscp")
    if not os.access(candidate, os.X_OK):
        candidate = shutil.which("fastscp") or ""
    if not candidate:
        raise ServiceError("cannot find the fastscp executable of this installation (not in "
                           f"{sysconfig.get_path('scripts')} nor on PATH): install fastscp with pip first")
    return os.path.abspath(candidate)


def writable_paths(config: Config, config_file: str) -> list[str]:
    """The folders the service writes (ReadWritePaths=): storage roots, the index's folder, the log's folder.

    Raises
    ------
    ServiceError
        A relative path: a service has no meaningful working directory.
    """
    paths = {("storage.directory", config.storage.directory)}
    if config.storage.sr_directory:
        paths.add(("storage.sr_directory", config.storage.sr_directory))
    if config.database.path:
        paths.add(("database.path", os.path.dirname(config.database.path)))
    if config.logging.file:
        paths.add(("logging.file", os.path.dirname(config.logging.file)))
    for key, path in sorted(paths):
        if not os.path.isabs(path):
            raise ServiceError(f"{config_file}: {key} is a relative path ({path!r}): a service needs absolute "
                               "paths; set it to e.g. " + (DEFAULT_STORAGE if key == "storage.directory"
                                                           else f"a folder under {DEFAULT_STORAGE}"))
    folders = sorted({os.path.normpath(p) for _key, p in paths})
    # A folder inside another one listed is covered by it.
    return [f for f in folders if not any(_under(f, other) and f != other for other in folders)]


def unit_text(config: Config, executable: str, config_path: str, user: str, group: str,
              writable: list[str]) -> str:
    """The unit file: the packaged template with this installation's values."""
    server = config.server
    values = {
        "USER": user,
        "GROUP": group,
        "EXEC": executable,
        "CONFIG": config_path,
        "STOP_TIMEOUT": str(int(server.shutdown_timeout + 0.999) + STOP_MARGIN),
        "NOFILE": str(max(MIN_NOFILE, FILES_PER_CONNECTION * (server.max_associations
                                                              + server.max_pending_connections))),
        "WRITABLE": " ".join(writable),
    }
    # systemd splits at spaces and expands % specifiers and $: refuse what a unit file would misread.
    for value in [user, group, executable, config_path, *writable]:
        if any(c.isspace() or c in "%$\"'\\" for c in value):
            raise ServiceError(f"{value!r} contains a space, quote, %, $ or backslash, which a unit file would "
                               "misread: use a name or path without them")
    text = unit_template()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    return text


def unit_template() -> str:
    """``fastscp/data/fastscp.service``, shipped in the package."""
    return importlib.resources.files("fastscp").joinpath("data", "fastscp.service").read_text(encoding="utf-8")


def _ensure_user(root: str, user: str) -> tuple[int, int, str]:
    """(uid, gid, group name) of ``user`` in ``root``; a system user and group are created if missing."""
    found = _lookup_user(root, user)
    if found is None:
        command = ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", DEFAULT_STORAGE,
                   "--shell", "/usr/sbin/nologin", user]
        if not _is_root(root):
            command[1:1] = ["--prefix", root]
        _run(command)
        found = _lookup_user(root, user)
        if found is None:
            raise ServiceError(f"`{' '.join(command)}` succeeded but user {user} is not in {root}etc/passwd")
        print(f"user: created system user {user}")
    else:
        print(f"user: {user} exists, kept")
    return found


def _lookup_user(root: str, user: str) -> tuple[int, int, str] | None:
    if _is_root(root):
        import grp

        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            return None
        try:
            group = grp.getgrgid(entry.pw_gid).gr_name
        except KeyError:
            group = str(entry.pw_gid)
        return entry.pw_uid, entry.pw_gid, group
    # Another root: its own files, not this machine's users.
    passwd = _colon_file(os.path.join(root, "etc/passwd"))
    if user not in passwd:
        return None
    uid, gid = int(passwd[user][1]), int(passwd[user][2])
    group = next((name for name, fields in _colon_file(os.path.join(root, "etc/group")).items()
                  if fields[1] == str(gid)), str(gid))
    return uid, gid, group


def _colon_file(path: str) -> dict[str, list[str]]:
    try:
        with open(path, encoding="utf-8") as f:
            rows = [line.rstrip("\n").split(":") for line in f if line.strip() and not line.startswith("#")]
    except FileNotFoundError:
        return {}
    return {row[0]: row[1:] for row in rows if len(row) >= 3}


def _ensure_folder(folder: str, mode: int, uid: int, gid: int, user: str) -> None:
    if os.path.isdir(folder):
        owner = os.stat(folder).st_uid
        if owner != uid:
            print(f"warning: {folder} exists and belongs to uid {owner}, not {user}: the service can't write "
                  f"to it unless its permissions allow; `chown -R {user}: {folder}` if it is the service's",
                  file=sys.stderr)
        else:
            print(f"folder: {folder} exists, kept")
        return
    makedirs(os.path.dirname(folder), 0o755)  # /var/lib and such: the usual
    makedirs(folder, mode)
    os.chown(folder, uid, gid)
    print(f"folder: created {folder} ({user}, mode {mode:04o})")


def _write(path: str, data: bytes, modes: FileModes, gid: int = 0) -> None:
    from fastscp.storage.files import write_atomic

    folder = os.path.dirname(path)
    fresh = not os.path.isdir(folder)
    write_atomic(path, data, modes=modes)
    os.chown(path, 0, gid)
    if fresh and gid:
        os.chown(folder, 0, gid)  # /etc/fastscp: root's, readable by the service's group


def _interpreter_paths(executable: str) -> list[str]:
    """The files the service runs: the script, and the interpreter of its ``#!`` line with its real home."""
    paths = [os.path.realpath(executable)]
    try:
        with open(executable, "rb") as f:
            first = f.readline(4096)
    except OSError:
        return paths
    if first.startswith(b"#!"):
        interpreter = first[2:].split()[0].decode(errors="replace") if first[2:].split() else ""
        if interpreter:
            paths += [interpreter, os.path.realpath(interpreter)]
    return paths


# -- start / stop / reload / status ------------------------------------------------------


def status(config_path: str) -> int:
    """The unit's state from systemctl, then the monitor's summary (0: running and the monitor answers)."""
    from fastscp.cli import status as cli_status

    require_systemd("status")
    state = _systemctl("status", "--no-pager", "--lines=0", UNIT_NAME)
    if state != 0:
        return state  # systemctl's own: 3 = not running, 4 = no such unit
    print()
    return cli_status.run(argparse.Namespace(url=None, config=config_path if os.path.exists(config_path) else None,
                                             timeout=cli_status.DEFAULT_TIMEOUT, json=False))


def systemd_running() -> bool:
    """Whether systemd is this machine's init (sd_booted)."""
    return os.path.isdir(SYSTEMD_RUNTIME)


def require_systemd(action: str) -> None:
    """Raise :class:`ServiceError` naming the reason when systemd can't be asked."""
    if not systemd_running():
        raise ServiceError(f"systemd is not running on this machine ({_no_systemd_reason('/')}), and "
                           f"`fastscp service {action}` needs it. Run the server directly: "
                           f"fastscp serve --config {DEFAULT_CONFIG}")
    if shutil.which("systemctl") is None:
        raise ServiceError("systemctl is not on PATH")


def _no_systemd_reason(root: str) -> str:
    if not _is_root(root):
        return f"{root} is not this machine's root"
    try:
        with open("/proc/1/comm", encoding="utf-8") as f:
            init = f.read().strip()
    except OSError:
        init = "unknown"
    return f"PID 1 is {init!r}, not systemd; {SYSTEMD_RUNTIME} does not exist"


def _systemctl(*args: str) -> int:
    """systemctl's exit status; its output goes straight to ours."""
    try:
        return subprocess.run(["systemctl", *args], check=False).returncode
    except FileNotFoundError:
        raise ServiceError("systemctl is not on PATH (is this a systemd machine?)") from None


def _systemctl_checked(*args: str) -> None:
    _run(["systemctl", *args])


def _run(command: list[str]) -> None:
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True)
    except FileNotFoundError:
        raise ServiceError(f"{command[0]} is not on PATH: it is needed to {' '.join(command[1:3])}") from None
    if done.returncode != 0:
        raise ServiceError(f"`{' '.join(command)}` failed (exit {done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()}")


# -- paths ---------------------------------------------------------------------------------


def _is_root(root: str) -> bool:
    return os.path.realpath(root) == "/"


def _under_root(root: str, path: str) -> str:
    return path if _is_root(root) else os.path.join(root, path.lstrip("/"))


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _check_absolute(option: str, path: str) -> None:
    if not os.path.isabs(path):
        raise ServiceError(f"{option} {path!r} must be an absolute path (the unit names it)")
