"""``fastscp service``: the systemd unit, install/uninstall, and port 104 with only CAP_NET_BIND_SERVICE.

systemd is not PID 1 on the machines these tests run on, so the unit is
checked with ``systemd-analyze verify``, installed into a temporary root
(``--root``: the user goes into ROOT/etc/passwd, the unit is enabled
offline), and what the unit grants the server (an unprivileged user, one
capability) is reproduced with ``setpriv``.
"""

from __future__ import annotations

import errno
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastscp.cli.service import DEFAULT_STORAGE, SYSTEMD_RUNTIME, UNIT_DIR, UNIT_NAME
from fastscp.config import load_config
from fastscp.dicom.synthetic import write_series
from tests.conftest import REPO, dcmtk, wait_for_port
from tests.dicomfiles import dataset_bytes

WORKTREE = str(REPO)
ENV = {**os.environ, "PYTHONPATH": WORKTREE}
#: The unit's ExecStart: the fastscp script of the interpreter running these tests.
FASTSCP = os.path.join(os.path.dirname(sys.executable), "fastscp")
#: CAP_NET_BIND_SERVICE is capability 10 (linux/capability.h).
CAP_NET_BIND_SERVICE = 1 << 10


def fastscp(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastscp.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A machine's root to install into: /etc with empty user and group files (useradd --prefix fills them)."""
    machine = tmp_path / "root"
    (machine / "etc").mkdir(parents=True)
    for name in ("passwd", "group"):
        (machine / "etc" / name).touch()
    return machine


def passwd_entry(root: Path, user: str) -> tuple[int, int]:
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2]), int(fields[3])
    raise AssertionError(f"{user} is not in {root}/etc/passwd:\n{(root / 'etc/passwd').read_text()}")


def unit_settings(unit: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in unit.read_text().splitlines() if "=" in line and line[0] != "#")


def test_installed_unit_passes_systemd_analyze_verify(root: Path) -> None:
    result = fastscp("service", "install", "--root", str(root))
    assert result.returncode == 0, result.stderr
    unit = root / UNIT_DIR.lstrip("/") / UNIT_NAME
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # Exit 0 and not one warning (an unknown or misspelt directive is only a warning).
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify.stdout + verify.stderr


def test_install_then_uninstall_in_a_temporary_root(root: Path) -> None:
    result = fastscp("service", "install", "--root", str(root))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    # ProtectHome=yes hides /root and /home: an installation there is named as one that will not start.
    hidden = any(os.path.realpath(sys.executable).startswith(d + "/") for d in ("/home", "/root", "/run/user"))
    assert ("ProtectHome=yes hides" in result.stderr) == hidden, result.stderr

    uid, gid = passwd_entry(root, "fastscp")
    unit = root / UNIT_DIR.lstrip("/") / UNIT_NAME
    settings = unit_settings(unit)
    assert settings["ExecStart"] == f"{FASTSCP} serve --config /etc/fastscp/fastscp.yaml"
    assert os.access(FASTSCP, os.X_OK)
    assert (settings["User"], settings["Group"]) == ("fastscp", "fastscp")
    assert settings["AmbientCapabilities"] == settings["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert settings["ReadWritePaths"] == DEFAULT_STORAGE
    assert settings["Restart"] == "on-failure"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    # Above server.shutdown_timeout (30 s by default), so a graceful stop is never cut short.
    assert int(settings["TimeoutStopSec"]) > 30
    assert not re.search(r"@[A-Z_]+@", unit.read_text().split("\n[Unit]")[1])
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    wanted = root / UNIT_DIR.lstrip("/") / "multi-user.target.wants" / UNIT_NAME
    assert os.readlink(wanted) == f"{UNIT_DIR}/{UNIT_NAME}"

    # The config: root's, readable by the service's group only; port 104.
    config_file = root / "etc/fastscp/fastscp.yaml"
    st = config_file.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, gid, 0o640)
    config = load_config(str(config_file))
    assert config.server.port == 104
    assert config.storage.directory == DEFAULT_STORAGE
    # The storage folder: the service user's, mode storage.dir_mode.
    storage = root / DEFAULT_STORAGE.lstrip("/")
    st = storage.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, int(config.storage.dir_mode, 8))

    # A stored image and the index: uninstall keeps them and the config, and says so.
    image = storage / "P1" / "x.dcm"
    image.parent.mkdir()
    image.write_bytes(b"image")
    (storage / "index.duckdb").write_bytes(b"index")
    result = fastscp("service", "uninstall", "--root", str(root))
    assert result.returncode == 0, result.stderr
    assert not unit.exists() and not os.path.lexists(wanted)
    assert image.read_bytes() == b"image" and (storage / "index.duckdb").read_bytes() == b"index"
    assert config_file.exists()
    assert f"kept: config {config_file}; storage {storage}; index {storage / 'index.duckdb'}" in result.stdout

    # Uninstalling twice: a clear error, no traceback.
    again = fastscp("service", "uninstall", "--root", str(root))
    assert again.returncode == 1 and "is not installed as a service" in again.stderr
    assert "Traceback" not in again.stderr


def test_install_keeps_an_existing_config_and_follows_it(root: Path) -> None:
    config_file = root / "etc/fastscp/pacs.yaml"
    config_file.parent.mkdir(parents=True)
    config_file.write_text("server:\n  port: 104\n  shutdown_timeout: 300\n"
                           "storage:\n  directory: /srv/pacs\n  sr_directory: /srv/sr\n  dir_mode: '0700'\n"
                           "logging:\n  file: /var/log/fastscp/fastscp.log\n")
    before = config_file.read_bytes()
    result = fastscp("service", "install", "--root", str(root), "--config", "/etc/fastscp/pacs.yaml",
                     "--user", "dicom")
    assert result.returncode == 0, result.stderr
    assert config_file.read_bytes() == before
    uid, gid = passwd_entry(root, "dicom")
    settings = unit_settings(root / UNIT_DIR.lstrip("/") / UNIT_NAME)
    assert settings["ExecStart"] == f"{FASTSCP} serve --config /etc/fastscp/pacs.yaml"
    assert (settings["User"], settings["Group"]) == ("dicom", "dicom")
    assert settings["ReadWritePaths"] == "/srv/pacs /srv/sr /var/log/fastscp"
    assert int(settings["TimeoutStopSec"]) > 300
    for folder in ("srv/pacs", "srv/sr", "var/log/fastscp"):
        st = (root / folder).stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, 0o700), folder


def test_install_refuses_a_relative_storage_directory(root: Path) -> None:
    config_file = root / "etc/fastscp/fastscp.yaml"
    config_file.parent.mkdir(parents=True)
    config_file.write_text("storage:\n  directory: ./received\n")
    result = fastscp("service", "install", "--root", str(root), "--no-systemctl")
    assert result.returncode == 1
    assert "storage.directory is a relative path ('./received')" in result.stderr
    assert str(config_file) in result.stderr and "Traceback" not in result.stderr
    assert not (root / UNIT_DIR.lstrip("/") / UNIT_NAME).exists()


def test_install_reports_a_file_in_the_way_without_a_traceback(root: Path) -> None:
    (root / "etc/systemd").write_text("not a folder")
    result = fastscp("service", "install", "--root", str(root), "--no-systemctl")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"fastscp service install: {root}/etc/systemd/system: Not a directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_install_warns_when_the_service_cannot_read_the_config(root: Path) -> None:
    config_file = root / "etc/fastscp/fastscp.yaml"
    config_file.parent.mkdir(parents=True)
    config_file.write_text("storage:\n  directory: /srv/pacs\n")
    config_file.chmod(0o600)
    result = fastscp("service", "install", "--root", str(root), "--no-systemctl")
    assert result.returncode == 0, result.stderr
    assert f"warning: fastscp can't read {config_file}" in result.stderr
    config_file.chmod(0o644)
    result = fastscp("service", "install", "--root", str(root), "--no-systemctl")
    assert result.returncode == 0 and "can't read" not in result.stderr, result.stderr


@pytest.mark.parametrize("action", ["start", "stop", "reload", "status"])
def test_control_without_systemd_is_a_clear_error(action: str) -> None:
    argv = [sys.executable, "-m", "fastscp.cli", "service", action]
    if os.path.isdir(SYSTEMD_RUNTIME):
        # A host booted with systemd: hide it in a private mount namespace.
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount -t tmpfs tmpfs /run/systemd && exec "$@"', "sh", *argv]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=ENV)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"fastscp service {action}: systemd is not running on this machine (PID 1 is ")
    assert "fastscp serve --config /etc/fastscp/fastscp.yaml" in result.stderr


# -- port 104 with only CAP_NET_BIND_SERVICE ----------------------------------------------


def _blocked_ancestor(path: str, uid: int) -> str | None:
    """The first folder above ``path`` that ``uid`` (not root, no groups) can't search, if any."""
    parts = Path(path).parts
    for i in range(1, len(parts)):
        folder = os.path.join(*parts[:i])
        st = os.stat(folder)
        bit = stat.S_IXUSR if st.st_uid == uid else stat.S_IXOTH
        if not st.st_mode & bit:
            return folder
    return None


def _reach(folder: str, top: str, stage: str) -> str:
    """Shell commands that make ``top`` (a folder in ``folder``) reachable, in this mount namespace only.

    ``top`` is bind-mounted at ``stage``, an empty world-searchable tmpfs
    replaces ``folder``, and ``top`` is mounted back at its place: the same
    files at the same paths, nothing else of ``folder`` visible, the machine's
    own mounts untouched.
    """
    return (f"mount --bind {top} {stage} && mount -t tmpfs -o mode=0755 tmpfs {folder} && "
            f"mkdir {top} && mount --bind {stage} {top} && ")


@pytest.fixture
def service_dir() -> Iterator[Path]:
    """A folder outside /root (tmp_path is root's, 0700) for the unprivileged server's config and storage."""
    folder = Path(tempfile.mkdtemp(prefix="fastscp-service-"))
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder)


def _port_104_free() -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", 104))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                pytest.fail("127.0.0.1:104 is taken by another process: this test needs it free")
            raise


def _serve_as(user: pwd.struct_passwd, caps: str, config: Path, log: Path, stage: Path) -> subprocess.Popen:
    """``fastscp serve`` as ``user`` with exactly the capabilities ``caps`` (setpriv syntax), like the unit."""
    setpriv = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
               f"--inh-caps=-all{caps}", f"--ambient-caps=-all{caps}", f"--bounding-set=-all{caps}",
               "--no-new-privs", sys.executable, "-m", "fastscp.cli", "serve", "--config", str(config)]
    tops: dict[str, str] = {}  # top folder -> the folder it is under that the user can't search
    for path in (os.path.realpath(sys.executable), os.path.realpath(sys.base_prefix), sys.prefix, WORKTREE):
        blocked = _blocked_ancestor(path, user.pw_uid)
        if blocked:
            tops[os.path.join(blocked, Path(path).relative_to(blocked).parts[0])] = blocked
    mounts = ""
    for i, (top, blocked) in enumerate(sorted(tops.items())):
        (stage / str(i)).mkdir(exist_ok=True)
        mounts += _reach(blocked, top, str(stage / str(i)))
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mounts + 'exec "$@"', "sh", *setpriv]
    with open(log, "w") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=ENV)


def test_unprivileged_user_with_only_cap_net_bind_service_serves_port_104(service_dir: Path, root: Path) -> None:
    """What the installed unit grants, reproduced with setpriv: its capabilities (AmbientCapabilities=,
    CapabilityBoundingSet=: CAP_NET_BIND_SERVICE only) and NoNewPrivileges=, as user ``nobody`` with no
    supplementary groups (the unit's own user exists only in the temporary root). It binds 127.0.0.1:104 and
    stores files byte for byte.

    The interpreter here lives under /root (0700), which ``nobody`` can't enter; rather than change the
    machine, the server runs in a private mount namespace where /root is an empty 0755 tmpfs with only
    the interpreter's folder bound back at its path (``_reach``). Without the capability the same start fails
    and names CAP_NET_BIND_SERVICE. The server is stopped by its PID.
    """
    nobody = pwd.getpwnam("nobody")
    storage = service_dir / "storage"
    storage.mkdir(mode=0o750)
    os.chown(storage, nobody.pw_uid, nobody.pw_gid)
    stage = service_dir / "stage"
    stage.mkdir()
    config = service_dir / "fastscp.yaml"
    config.write_text(f"server:\n  host: 127.0.0.1\n  port: 104\n  workers: 1\n"
                      f"storage:\n  directory: {storage}\n"
                      "monitor:\n  enabled: false\nthumbnails:\n  enabled: false\nscansheet:\n  enabled: false\n")
    _port_104_free()
    assert fastscp("service", "install", "--root", str(root), "--no-systemctl").returncode == 0
    settings = unit_settings(root / UNIT_DIR.lstrip("/") / UNIT_NAME)
    assert settings["CapabilityBoundingSet"] == settings["AmbientCapabilities"]
    assert settings["NoNewPrivileges"] == "yes"
    caps = "".join(",+" + cap.lower().removeprefix("cap_") for cap in settings["AmbientCapabilities"].split())

    # Without the capability: refused, and the message names the fix.
    log = service_dir / "no-cap.log"
    process = _serve_as(nobody, "", config, log, stage)
    try:
        assert process.wait(60) == 2, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert "port 104 is below 1024" in log.read_text() and "CAP_NET_BIND_SERVICE" in log.read_text()

    log = service_dir / "server.log"
    process = _serve_as(nobody, caps, config, log, stage)
    try:
        wait_for_port(104, process, log, timeout=60)
        status = dict(line.split(":\t", 1) for line in Path(f"/proc/{process.pid}/status").read_text().splitlines()
                      if ":\t" in line)
        assert status["Uid"].split()[:2] == [str(nobody.pw_uid)] * 2
        assert status["Groups"].strip() == ""
        for caps in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
            assert int(status[caps], 16) == CAP_NET_BIND_SERVICE, (caps, status[caps])
        assert status["NoNewPrivs"].strip() == "1"

        sources = write_series(str(service_dir / "sent"), 2, rows=64, columns=64)
        dcmtk("echoscu", "-aec", "FASTSCP", "127.0.0.1", "104")
        dcmtk("storescu", "-aec", "FASTSCP", "-xe", "127.0.0.1", "104", *sources)
        stored = sorted(p for p in storage.rglob("*.dcm") if ".incoming" not in p.parts)
        assert len(stored) == 2, log.read_text()
        sent = {dataset_bytes(p)[0] for p in sources}
        assert {dataset_bytes(p)[0] for p in stored} == sent
        for path in stored:
            assert path.stat().st_uid == nobody.pw_uid
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
