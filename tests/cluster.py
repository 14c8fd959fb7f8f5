"""Several fastscp nodes for tests and the node benchmark: PostgreSQL, HAProxy, network namespaces.

* :class:`PostgresCluster`: a throw-away PostgreSQL cluster (Debian's
  package), the catalog of a shared index.
* :class:`HAProxy`: Debian's HAProxy in front of the nodes, configured from
  the shipped example.
* :class:`Network`: network namespaces made for one test, a hub and one per
  node, each node with its own address; deleted with everything in them.

Every process is started in its own session and stopped by its PID.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from tests.conftest import REPO, free_port, on_free_ports, stop_process, wait_for_port, wait_until

PG_BIN = Path("/usr/lib/postgresql/15/bin")
EXAMPLE_HAPROXY_CFG = REPO / "config" / "haproxy.cfg.example"
PG_PORT = 5432


class PostgresCluster:
    """A throw-away PostgreSQL cluster, run as ``postgres`` (initdb refuses root), with a database ``lake``.

    It listens on a Unix socket in its folder, and on ``address`` (TCP,
    port 5432, trusting that /24) when one is given: the address of a
    network namespace the caller made (:class:`Network`), where it must be
    started.
    """

    def __init__(self, address: str = "") -> None:
        if not (PG_BIN / "initdb").exists():
            raise RuntimeError(f"{PG_BIN}/initdb missing: run 'make setup' (installs Debian's postgresql)")
        self.address = address
        # Under /tmp, not pytest's tmp_path: the postgres user must reach it.
        self.folder = Path(tempfile.mkdtemp(prefix="fastscp-pg-"))
        user = pwd.getpwnam("postgres")
        os.chown(self.folder, user.pw_uid, user.pw_gid)
        self.log = self.folder / "postgres.log"
        as_postgres = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
        data = self.folder / "data"
        subprocess.run([*as_postgres, str(PG_BIN / "initdb"), "-D", str(data), "-U", "fastscp",
                        "--auth=trust", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
        if address:
            network = address.rsplit(".", 1)[0] + ".0/24"
            with open(data / "pg_hba.conf", "a") as hba:
                hba.write(f"host all all {network} trust\n")
        self._log_file = open(self.log, "w")
        # setpriv execs: this PID is the postmaster's.
        self.process = subprocess.Popen(
            [*as_postgres, str(PG_BIN / "postgres"), "-D", str(data), "-k", str(self.folder),
             "-c", f"listen_addresses={address}", "-c", f"port={PG_PORT}", "-c", "max_connections=100"],
            stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(lambda: self.process.poll() is not None or self._ready(), 60, "PostgreSQL to start")
            assert self.process.poll() is None, self.log.read_text()
            self.psql("CREATE DATABASE lake")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        return subprocess.run([str(PG_BIN / "pg_isready"), "-h", str(self.folder), "-p", str(PG_PORT),
                               "-d", "postgres"], capture_output=True).returncode == 0

    def psql(self, sql: str, database: str = "postgres") -> str:
        return subprocess.run([str(PG_BIN / "psql"), "-h", str(self.folder), "-p", str(PG_PORT), "-U", "fastscp",
                               "-d", database, "-AtX", "-c", sql], check=True, capture_output=True, text=True,
                              timeout=60).stdout

    def catalog_of(self, database: str) -> str:
        """``database.catalog`` for a database of this cluster."""
        host = f"host={self.address}" if self.address else f"host={self.folder}"
        return f"postgres:dbname={database} {host} port={PG_PORT} user=fastscp"

    @property
    def catalog(self) -> str:
        return self.catalog_of("lake")

    def __enter__(self) -> PostgresCluster:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown: does not wait for clients
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log_file.close()
        shutil.rmtree(self.folder, ignore_errors=True)


class Node(Protocol):
    """A fastscp node as HAProxy needs it (tests.conftest.Server)."""

    host: str
    port: int


class HAProxy:
    """Debian's HAProxy in TCP mode in front of ``nodes`` ((name, node, monitor port)), health-checking /healthz.

    The shipped example with its servers replaced by these nodes, bound to
    ``bind`` (a free port: another one if it was taken before HAProxy bound
    it), no syslog, and a stats socket to ask which nodes are up.
    """

    def __init__(self, folder: Path, nodes: list[tuple[str, Node, int]], bind: str = "127.0.0.1") -> None:
        self.host = bind
        self.socket = folder / "haproxy.sock"
        self.log = folder / "haproxy.log"
        on_free_ports(lambda: self._start(folder / "haproxy.cfg", nodes))
        try:
            wait_until(lambda: self.up() == {name for name, _, _ in nodes}, 30, "HAProxy to see every node up")
        except BaseException:
            self.stop()
            raise

    def _start(self, config: Path, nodes: list[tuple[str, Node, int]]) -> None:
        self.port = free_port(self.host)  # in the calling thread's namespace
        lines = []
        for line in EXAMPLE_HAPROXY_CFG.read_text().splitlines():
            words = line.split()
            if words[:1] in (["log"], ["server"]) or words == ["option", "tcplog"]:
                continue
            if words[:1] == ["bind"]:
                line = f"    bind {self.host}:{self.port}"
            lines.append(line)
            if words == ["global"]:
                lines.append(f"    stats socket {self.socket} mode 600 level admin")
        lines += [f"    server {name} {node.host}:{node.port} check port {monitor}" for name, node, monitor in nodes]
        config.write_text("\n".join(lines) + "\n")
        self._log_file = open(self.log, "w")
        self.process = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=self._log_file,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # It binds its frontend at once, or exits saying why: a connection (passed on to a node) tells which.
            wait_for_port(self.port, self.process, self.log, host=self.host, ready="", what="haproxy")
        except BaseException:
            self.stop()
            raise

    def up(self) -> set[str]:
        """The names of the servers HAProxy sends to now."""
        if self.process.poll() is not None:
            raise AssertionError(f"haproxy exited with {self.process.returncode}:\n{self.log.read_text()}")
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(5)
                sock.connect(str(self.socket))
                sock.sendall(b"show servers state fastscp\n")
                text = b""
                while chunk := sock.recv(65536):
                    text += chunk
        except OSError:
            return set()
        # Columns: be_id be_name srv_id srv_name srv_addr srv_op_state ... (2: running)
        rows = [line.split() for line in text.decode().splitlines()[1:] if line and not line.startswith("#")]
        return {row[3] for row in rows if len(row) > 5 and row[5] == "2"}

    def stop(self) -> None:
        try:
            stop_process(self.process, 30)
        finally:
            self._log_file.close()


# -- network namespaces -------------------------------------------------------------------

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


class Network:
    """Network namespaces made for one test: ``hub`` and one per node, each node with its own address.

    The hub holds a bridge (``SUBNET``.1) with one veth pair to each node's
    namespace (``SUBNET``.2, .3, ...; its end is ``eth0`` there). Nothing
    changes in the caller's namespace: the addresses exist only in these
    namespaces, whose names carry this process's PID. :meth:`inside` runs a
    block in one of them (processes started there stay there);
    :meth:`delete` deletes every namespace made, with the veths in them, and
    checks that none is left.

    Raises RuntimeError, saying what is missing, where namespaces can't be
    made (not root, no CAP_SYS_ADMIN and CAP_NET_ADMIN, no iproute2).
    """

    SUBNET = "10.231.7"

    def __init__(self, nodes: list[str]) -> None:
        self.prefix = f"fs{os.getpid()}"
        self.hub = f"{self.prefix}-hub"
        self.made: list[str] = []
        self.addresses: dict[str, str] = {self.hub: f"{self.SUBNET}.1"}
        try:
            self._add(self.hub)
            self._ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            self._ip("-n", self.hub, "addr", "add", f"{self.SUBNET}.1/24", "dev", "br0")
            self._ip("-n", self.hub, "link", "set", "br0", "up")
            for number, node in enumerate(nodes, start=2):
                name = self.namespace(node)
                self._add(name)
                veth = f"v{number}"
                self._ip("-n", self.hub, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
                self._ip("-n", self.hub, "link", "set", veth, "master", "br0", "up")
                self.addresses[name] = f"{self.SUBNET}.{number}"
                self._ip("-n", name, "addr", "add", f"{self.addresses[name]}/24", "dev", "eth0")
                self._ip("-n", name, "link", "set", "eth0", "up")
        except BaseException:
            self.delete()
            raise

    def namespace(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    def address(self, node: str) -> str:
        return self.addresses[self.namespace(node)]

    def _add(self, name: str) -> None:
        try:
            self._ip("netns", "add", name)
        except RuntimeError as exc:
            raise RuntimeError(
                f"network namespaces are not available here ({exc}); this test makes its own (ip netns add, "
                "veth pairs, a bridge): run it as root with CAP_SYS_ADMIN and CAP_NET_ADMIN, as CI does") from None
        self.made.append(name)
        self._ip("-n", name, "link", "set", "lo", "up")

    @staticmethod
    def _ip(*argv: str) -> None:
        try:
            result = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            raise RuntimeError("ip (iproute2) not found: run 'make setup'") from None
        if result.returncode:
            raise RuntimeError(f"ip {' '.join(argv)}: {result.stderr.strip()}")

    @contextlib.contextmanager
    def inside(self, name: str) -> Iterator[None]:
        """The block runs in namespace ``name`` (the hub, or a node's); back in the caller's after it."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(f"/run/netns/{name}", os.O_RDONLY)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(own)

    def delete(self) -> None:
        """Delete every namespace made, and check that none is left.

        A namespace lives on while a process is in it (with its veth and
        addresses): the processes the test left in them (none, if it
        stopped what it started) are killed first, and named in the error.
        """
        errors = []
        for name in reversed(self.made):
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                                  timeout=30).stdout.split()
            for pid in map(int, pids):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if pids:
                errors.append(f"processes {pids} were still running in {name}")
            try:
                self._ip("netns", "delete", name)
            except RuntimeError as exc:
                errors.append(str(exc))
        left = [name for name in os.listdir("/run/netns") if name.startswith(self.prefix + "-")] \
            if os.path.isdir("/run/netns") else []
        self.made = []
        if errors or left:
            raise RuntimeError(f"network namespaces: {'; '.join(errors)}; left behind: {left}")
