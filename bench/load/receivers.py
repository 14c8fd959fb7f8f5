"""The receivers under load: how each is started, made ready, stopped and read.

Every receiver runs as a process tree in its own session (so it is stopped
as a group), listens on a free port on 127.0.0.1, writes into a fresh
folder, and is ready once dcmtk ``echoscu`` gets a C-ECHO answer.

``TCP_NODELAY`` in the environment: Debian's dcmtk (storescu, storescp, and
Orthanc, which uses dcmtk's network layer) leaves Nagle's algorithm on unless
``TCP_NODELAY=1`` is set; then each C-STORE-RSP of storescp or Orthanc waits
~40 ms for the sender's delayed ACK, whatever the sender does. The ``-stock``
receivers run with the environment as a user has it (no ``TCP_NODELAY``);
the others with ``TCP_NODELAY=1``, their best case. fastscp and pynetdicom
ignore the variable (fastscp sets TCP_NODELAY and TCP_QUICKACK itself).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

AE_TITLE = "BENCHSCP"
PYTHON = sys.executable


class ReceiverError(RuntimeError):
    """A receiver that did not start, answer or stop as it should."""


@dataclass(frozen=True)
class Receiver:
    name: str
    kind: str  # fastscp | storescp | orthanc | pynetdicom
    description: str
    #: Must store every data set byte-exact (else: only the file count is checked).
    strict: bool
    #: TCP_NODELAY=1 in its environment (matters for dcmtk-based receivers only).
    nodelay_env: bool = True
    args: tuple[str, ...] = ()
    #: Associations it serves at once, when fixed and lower than any K we use.
    max_associations: int | None = None
    #: Put first on PYTHONPATH (fastscp from another source tree, see --fastscp-ref).
    pythonpath: str | None = None

    def available(self) -> str | None:
        """None if it can run here, else why not."""
        exe = {"storescp": "storescp", "orthanc": "Orthanc"}.get(self.kind)
        if exe and shutil.which(exe) is None:
            package = "dcmtk" if self.kind == "storescp" else "orthanc"
            return f"{exe} not installed (Debian package {package})"
        return None


def default_receivers(fastscp_extra: tuple[str, ...] = (),
                      fastscp_variants: tuple[tuple[str, str], ...] = (),
                      fastscp_src: str | None = None) -> dict[str, Receiver]:
    """Every receiver the runner knows, by name.

    ``fastscp_extra`` is appended to every fastscp command line (e.g.
    thumbnail options once they exist); ``fastscp_variants`` adds
    ``(name, "serve options")`` receivers; ``fastscp_src`` runs fastscp from
    that source tree instead of the installed one.
    """
    extra = tuple(fastscp_extra)
    receivers = [
        Receiver("fastscp", "fastscp", "fastscp serve, index on, fsync always (the default)", True,
                 args=("--fsync", "always", *extra)),
        Receiver("fastscp-nofsync", "fastscp", "fastscp serve, index on, fsync never", True,
                 args=("--fsync", "never", *extra)),
        Receiver("storescp", "storescp", "dcmtk storescp --fork +xa (re-encodes), TCP_NODELAY=1", False,
                 args=("--fork", "+xa", "-pm")),
        Receiver("storescp+B", "storescp", "dcmtk storescp --fork +B -pdu 131072 (bit-preserving), TCP_NODELAY=1",
                 True, args=("--fork", "+B", "-pdu", "131072", "+xa", "-pm")),
        Receiver("storescp+B-stock", "storescp", "as storescp+B, without TCP_NODELAY (as installed)", True,
                 nodelay_env=False, args=("--fork", "+B", "-pdu", "131072", "+xa", "-pm")),
        Receiver("orthanc", "orthanc", "Orthanc, SQLite index, default config, TCP_NODELAY=1", False),
        Receiver("orthanc-stock", "orthanc", "Orthanc as orthanc, without TCP_NODELAY (as installed)", False,
                 nodelay_env=False),
        Receiver("pynetdicom", "pynetdicom", "pynetdicom's storescp app (python -m pynetdicom storescp)", False,
                 # AE.maximum_associations is 10 and the app has no option for it.
                 max_associations=10),
    ]
    for name, options in fastscp_variants:
        receivers.append(Receiver(name, "fastscp", f"fastscp serve {options}", True,
                                  args=(*shlex.split(options), *extra)))
    if fastscp_src:
        receivers = [dataclasses.replace(r, pythonpath=fastscp_src) if r.kind == "fastscp" else r
                     for r in receivers]
    return {r.name: r for r in receivers}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def receiver_env(nodelay: bool, pythonpath: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TCP_NODELAY", None)
    if nodelay:
        env["TCP_NODELAY"] = "1"
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    return env


@dataclass
class Running:
    """A started receiver."""

    receiver: Receiver
    workdir: Path
    port: int
    storage: Path
    process: subprocess.Popen
    log: Path
    index_path: Path | None = None
    notes: list[str] = field(default_factory=list)
    _log_file: object = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 60) -> int | None:
        """Stop the receiver; fastscp gracefully (its exit code counts), the
        others with SIGTERM to the group. Returns the exit code."""
        code: int | None = None
        try:
            if self.receiver.kind == "fastscp":
                self.process.send_signal(signal.SIGTERM)
                code = self.process.wait(timeout)
            else:
                os.killpg(self.process.pid, signal.SIGTERM)
                code = self.process.wait(min(timeout, 15))
        except subprocess.TimeoutExpired:
            self.notes.append(f"did not stop within {timeout:.0f} s: killed")
        except ProcessLookupError:
            pass
        finally:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                pass
            if self._log_file is not None:
                self._log_file.close()  # type: ignore[attr-defined]
        return code

    def received_files(self) -> tuple[list[str], list[str]]:
        """(Part 10 files, other files) under the storage folder, dot-folders
        (fastscp's .incoming/.quarantine) left out."""
        dicom, other = [], []
        for dirpath, dirnames, filenames in os.walk(self.storage):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    magic = f.read(132)[128:]
                (dicom if magic == b"DICM" else other).append(path)
        return dicom, other

    def status(self) -> dict | None:
        """fastscp's /status.json (its monitor's URL from the log), or None while it can't be read."""
        # From the log's head: the URL is logged once at start, and a burst's action lines (10,000
        # CT: ~2.5 MB) pushed it out of any tail, so the wait for derived work never ended.
        try:
            with open(self.log, errors="replace") as log:
                head = log.read(1 << 18)
        except OSError:
            return None
        found = re.findall(r"status page (http://[^\s;,]+)", head)
        if not found:
            return None
        try:
            with urllib.request.urlopen(found[-1] + "/status.json", timeout=5) as response:
                return json.loads(response.read())
        except (OSError, ValueError):
            return None

    def quarantined(self) -> int:
        folder = self.storage / ".quarantine"
        if not folder.is_dir():
            return 0
        return sum(1 for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".txt"))

    def index_count(self) -> int | None:
        """Rows in fastscp's index after it stopped (None: no index / unreadable)."""
        if self.index_path is None or not self.index_path.exists():
            return None
        # With the fastscp that wrote it (its schema may differ from this tree's).
        code = ("import sys\n"
                "try:\n    from fastscp.index.database import Index\n"
                "except ImportError:  # a commit from before the subpackages (--fastscp-ref)\n"
                "    from fastscp.index import Index\n"
                "index = Index(sys.argv[1], read_only=True)\nprint(index.count())\n")
        out = subprocess.run([PYTHON, "-c", code, str(self.index_path)], capture_output=True, text=True,
                             env=receiver_env(False, self.receiver.pythonpath), timeout=120,
                             cwd=self.workdir)  # not the repo: '' comes first on sys.path
        if out.returncode:
            raise ReceiverError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed")
        return int(out.stdout.strip())


def _orthanc_config(workdir: Path, storage: Path, port: int) -> Path:
    http_port = free_port()
    config = {
        "Name": "fastscp-bench",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(workdir / "orthanc-index"),
        "DicomAet": AE_TITLE,
        "DicomPort": port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
        "LuaScripts": [],
    }
    path = workdir / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def start(receiver: Receiver, workdir: Path, ready_timeout: float = 60, fastscp_config: str = "") -> Running:
    """Start ``receiver`` in ``workdir`` (created) and wait until it answers C-ECHO.

    ``fastscp_config``: YAML text given to a fastscp receiver as its ``--config`` file.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    storage = workdir / "storage"
    storage.mkdir()
    port = free_port()
    index_path = None
    if receiver.kind == "fastscp":
        index_path = workdir / "index.duckdb"
        argv = [PYTHON, "-m", "fastscp.cli", "serve", str(port), AE_TITLE, "--host", "127.0.0.1",
                "--storage-dir", str(storage), "--index-db", str(index_path),
                # an ephemeral status-page port: overlapping runs must not collide on 8080
                "--monitor", "127.0.0.1:0", *receiver.args]
        if fastscp_config:
            (workdir / "fastscp.yaml").write_text(fastscp_config)
            argv += ["--config", str(workdir / "fastscp.yaml")]
    elif receiver.kind == "storescp":
        argv = ["storescp", *receiver.args, "-aet", AE_TITLE, "-od", str(storage), str(port)]
    elif receiver.kind == "orthanc":
        argv = ["Orthanc", str(_orthanc_config(workdir, storage, port))]
    elif receiver.kind == "pynetdicom":
        argv = [PYTHON, "-m", "pynetdicom", "storescp", str(port), "-aet", AE_TITLE, "-od", str(storage),
                *receiver.args]
    else:
        raise ValueError(f"unknown receiver kind {receiver.kind!r}")
    log = workdir / "receiver.log"
    log_file = open(log, "w")
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                               start_new_session=True, env=receiver_env(receiver.nodelay_env, receiver.pythonpath),
                               cwd=workdir)
    running = Running(receiver, workdir, port, storage, process, log, index_path, _log_file=log_file)
    try:
        _wait_ready(running, ready_timeout)
    except BaseException:
        running.stop(timeout=10)
        raise
    return running


def _wait_ready(running: Running, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    env = receiver_env(True)
    while time.monotonic() < deadline:
        if running.process.poll() is not None:
            raise ReceiverError(f"{running.receiver.name} exited with {running.process.returncode} while starting:\n"
                                f"{running.log_tail()}")
        echo = subprocess.run(["echoscu", "-to", "2", "-ta", "2", "-td", "2", "-aec", AE_TITLE,
                               "127.0.0.1", str(running.port)],
                              capture_output=True, text=True, env=env, timeout=10)
        if echo.returncode == 0:
            return
        time.sleep(0.05)
    raise ReceiverError(f"{running.receiver.name} did not answer C-ECHO on port {running.port} "
                        f"within {timeout:.0f} s:\n{running.log_tail()}")
