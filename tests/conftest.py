"""Fixtures: a real fastscp server process on 127.0.0.1, and dcmtk tools."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

#: The project folder, and where tests leave files for people to look at.
REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "tests" / "artifacts"
DCMTK_TOOLS = ("storescu", "echoscu", "storescp", "dcmdump")
#: What a process we start prints when a port it should listen on is taken: strerror(EADDRINUSE)
#: ("Address already in use": fastscp, dcmtk, HAProxy), Orthanc's own words for its HTTP port.
PORT_TAKEN_MARK = "already in use"
#: Starts of a process, each on fresh ports, before a taken port fails the test.
PORT_ATTEMPTS = 5
#: What the supervisor logs once it accepts associations, with the port it bound.
LISTENING = re.compile(r"fastscp listening on \S+:(\d+) as ")

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now. Its socket is closed before the caller's process binds it, so another
    process can take it in between: start that process with :func:`on_free_ports`, or let it bind port 0
    (a port that must stay unused: the ``closed_port`` fixture)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class PortTaken(RuntimeError):
    """A process we started exited because a port it should listen on was taken."""


def start_failed(what: str, process: subprocess.Popen, output: str) -> RuntimeError:
    """The error for ``process`` that exited while starting; :class:`PortTaken` if its ``output`` says why."""
    error = PortTaken if PORT_TAKEN_MARK in output else RuntimeError
    return error(f"{what} exited with {process.returncode}:\n{output}")


def on_free_ports(start: Callable[[], T], attempts: int = PORT_ATTEMPTS) -> T:
    """``start()``, again while it raises :class:`PortTaken`; the last try's error if each one does.

    :func:`free_port` closes its socket before the process binds the port, so another process can
    take it in between. ``start`` picks its ports with free_port() on each call (a port that another
    server's config already names is tried again as it is), starts the process and waits until it
    listens; when the process exits saying a port is taken (:func:`start_failed`), it cleans up and
    raises :class:`PortTaken`.
    """
    for _ in range(attempts - 1):
        try:
            return start()
        except PortTaken:
            time.sleep(0.2)  # a port held by a passing connection (no new choice) may be free again
    return start()


def listens(process: subprocess.Popen, port: int) -> bool:
    """``process``, or a process it started, holds a socket listening on TCP ``port`` (Linux /proc).

    A connection to the port is not proof: it also succeeds when another
    process took the port and ours is about to exit. Where /proc does not
    show another user's descriptors (no CAP_SYS_PTRACE), the connection is
    all there is to go by: True.
    """
    try:
        sockets = _listening_sockets(Path(f"/proc/{process.pid}/net"), port)
        return bool(sockets) and any(_link(fd) in sockets for pid in _family(process.pid)
                                     for fd in Path(f"/proc/{pid}/fd").iterdir())
    except PermissionError:
        return True
    except (FileNotFoundError, ProcessLookupError):  # it has exited
        return False


def _listening_sockets(net: Path, port: int) -> set[str]:
    """``socket:[inode]`` of the sockets listening on ``port`` in the network namespace of ``net``."""
    found = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = (net / table).read_text().splitlines()[1:]
        except FileNotFoundError:  # no IPv6 in this kernel; a process gone shows in the other
            continue
        # Fields: sl, local address (hex IP:port), remote address, state (0A: LISTEN), ..., inode (10th).
        found |= {f"socket:[{fields[9]}]" for fields in map(str.split, rows)
                  if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port}
    return found


def _link(path: Path) -> str:
    try:
        return os.readlink(path)
    except FileNotFoundError:  # closed while we looked
        return ""


def _family(pid: int) -> list[int]:
    """``pid`` and its descendants (a server may listen in a child: HAProxy's master-worker mode)."""
    family, i = [pid], 0
    while i < len(family):
        for task in Path(f"/proc/{family[i]}/task").glob("*/children"):
            try:
                family += [int(child) for child in task.read_text().split()]
            except FileNotFoundError:
                pass
        i += 1
    return family


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 30,
                  host: str = "127.0.0.1", ready: str = "fastscp listening", what: str = "server") -> int:
    """Wait until ``process`` has logged ``ready``, listens on ``port`` and accepts a connection; the port.

    ``port`` 0: the port the fastscp supervisor logs that it bound (it was started with port 0).
    Raises :class:`PortTaken` if the process exited because a port was taken, RuntimeError else.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise start_failed(what, process, log.read_text())
        text = log.read_text()
        bound = port or next((int(found) for found in LISTENING.findall(text)), 0)
        if ready in text and bound and listens(process, bound):
            with socket.socket() as s:
                if s.connect_ex((host, bound)) == 0:
                    return bound
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port or 'a port'} within {timeout} s:\n{log.read_text()}")


def stop_process(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM to ``process``, and SIGKILL if it has not exited within ``grace`` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def sigterm_pending(pid: int) -> bool:
    """SIGTERM is pending for ``pid`` (/proc/PID/status ShdPnd): sent to a process stopped with SIGSTOP."""
    pending = re.search(r"^ShdPnd:\s*([0-9a-f]+)", Path(f"/proc/{pid}/status").read_text(), re.M)
    return pending is not None and bool(int(pending.group(1), 16) & 1 << (signal.SIGTERM - 1))


def wait_until(predicate, timeout: float = 15, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def receive_messages(conn: socket.socket, seconds: float, count: int | None = None) -> list[bytes]:
    """The messages (a SOCK_SEQPACKET connection's) arriving on ``conn`` within ``seconds``, until its
    peer closes it; at most ``count``."""
    messages: list[bytes] = []
    deadline = time.monotonic() + seconds
    while (count is None or len(messages) < count) and (left := deadline - time.monotonic()) > 0:
        conn.settimeout(left)
        try:
            message = conn.recv(1 << 20)
        except TimeoutError:
            break
        if not message:
            break
        messages.append(message)
    return messages


class Server:
    """``fastscp serve`` in a subprocess; always stopped by the fixture.

    It listens on ``host`` (127.0.0.1; another address in a network
    namespace of the test's, where it is then started: tests/cluster.py).
    """

    def __init__(self, tmp: Path, *args: str, ae_title: str = "FASTSCP", workers: int = 2,
                 config: Path | None = None, storage: Path | None = None,
                 env: dict[str, str] | None = None, monitor: str = "off", host: str = "127.0.0.1") -> None:
        self.host = host
        self.ae_title = ae_title
        self.storage = storage or tmp / "received"
        self.index = tmp / "index.duckdb"
        options = ["--host", host, "--storage-dir", str(self.storage), "--index-db", str(self.index),
                   "--workers", str(workers), "--monitor", monitor, *args]
        if config is not None:
            options += ["--config", str(config)]
        # The DICOM port is chosen here, not by the server (port 0): the nodes of a shared index
        # publish their configured port to each other.
        on_free_ports(lambda: self._start(tmp, options, {**os.environ, **(env or {})}))

    def _start(self, tmp: Path, options: list[str], env: dict[str, str]) -> None:
        self.port = free_port(self.host)
        self.log = tmp / f"server-{self.port}.log"
        self._log_file = open(self.log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fastscp.cli", "serve", str(self.port), self.ae_title, *options],
            stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            wait_for_port(self.port, self.process, self.log, host=self.host)
        except BaseException:
            self.kill_group()  # one that hangs in its start is not left running
            self._log_file.close()
            raise

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, wait; SIGKILL the whole group if it hangs. Returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
            raise AssertionError(f"server did not stop within {timeout} s:\n{self.log_text()}") from None
        finally:
            self._log_file.close()

    def kill_group(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)

    def log_text(self) -> str:
        return self.log.read_text()

    def monitor_url(self) -> str:
        """The status page's address, with the port the monitor bound (``monitor="127.0.0.1:0"``)."""
        (url,) = re.findall(r"status page (http://[^\s;]+)", self.log_text())
        return url

    def monitor_port(self) -> int:
        return int(self.monitor_url().rpartition(":")[2])

    def wait_for_log(self, *texts: str, timeout: float = 15) -> str:
        """The log once it holds every one of ``texts``.

        Child processes forward INFO records in batches (fastscp.process.logs), so a
        line can reach the log a moment after the action that logged it.
        """
        wait_until(lambda: all(text in self.log_text() for text in texts), timeout, what=f"log lines {texts}")
        return self.log_text()

    def worker_pids(self) -> dict[int, int]:
        """Worker index -> PID, from the start-up log lines (the latest per index)."""
        return {int(i): int(p) for i, p in re.findall(r"worker (\d+) started \(pid (\d+)\)", self.log_text())}

    def children(self) -> list[int]:
        """PIDs of the supervisor's child processes (workers and indexer)."""
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def stored_files(self) -> list[Path]:
        """Final files under the storage root (not temp, quarantine or index files)."""
        return sorted(
            p for p in self.storage.rglob("*.dcm")
            if ".incoming" not in p.parts and ".quarantine" not in p.parts
        )


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator:
    """Factory: ``start_server(*args, **kw)`` -> a running :class:`Server`."""
    servers: list[Server] = []

    def start(*args: str, **kwargs) -> Server:  # type: ignore[no-untyped-def]
        server = Server(tmp_path, *args, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.process.poll() is None:
            try:
                server.stop(timeout=60)
            except AssertionError:
                pass
        server.kill_group()
        server._log_file.close()


@pytest.fixture
def server(start_server) -> Server:  # type: ignore[no-untyped-def]
    return start_server()


def _held_port(listening: bool) -> Iterator[int]:
    """A port on 127.0.0.1 that a socket of the test holds for the test's time, listening or not.

    The socket has SO_REUSEADDR: while it does not listen, a server that sets it too (dcmtk, Orthanc,
    fastscp, pynetdicom) can still bind the port and listen (Linux), and nothing else can take it.
    """
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        if listening:
            holder.listen(1)
        yield holder.getsockname()[1]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another process's socket listens on."""
    yield from _held_port(listening=True)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 where a connection is refused until the test starts a server on it: bound by
    a socket that does not listen, so no other process can take it meanwhile (a port of free_port() could
    be). A destination that is down, then up, is started on it (see :func:`_held_port`)."""
    yield from _held_port(listening=False)


def mounted_tmpfs(tmp_path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted with ``options`` (``size=3m``) for the test's time: a disk that fills up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def cached_bytes(path: Path) -> int:
    """The bytes of ``path`` in the page cache (util-linux ``fincore``)."""
    return int(subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                              check=True, capture_output=True, text=True).stdout)


@pytest.fixture
def page_cache(tmp_path: Path) -> Path:
    """``tmp_path``, on a file system whose clean pages can be given back (not tmpfs)."""
    probe = tmp_path / "probe"
    probe.write_bytes(bytes(8192))
    fd = os.open(probe, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # not give_back_pages: a fault there must fail
    finally:
        os.close(fd)
    if cached_bytes(probe):
        pytest.skip(f"{tmp_path}'s file system keeps its pages (tmpfs?)")
    probe.unlink()
    return tmp_path


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MB tmpfs: a disk that fills up."""
    yield from mounted_tmpfs(tmp_path, "size=3m")


def _close_even_if_reset(self) -> None:  # type: ignore[no-untyped-def]
    """pynetdicom.transport.AssociationSocket._shutdown_socket, closing the socket even when
    ``shutdown`` raises."""
    sock = self.socket
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # the peer reset the connection (it was killed): ENOTCONN
    sock.close()


@pytest.fixture(scope="session", autouse=True)
def _pynetdicom_closes_its_sockets() -> Iterator[None]:
    """pynetdicom 3.0's AssociationSocket skips ``close`` when ``shutdown`` raises, as it does once the
    peer has reset the connection (a server killed under an open association). The socket is left to
    the garbage collector, whose ResourceWarning pytest reports against whichever test runs then
    (test_crash's SIGUSR1 case failed CI so). The test process's pynetdicom peers close it instead."""
    from pynetdicom.transport import AssociationSocket

    original = AssociationSocket._shutdown_socket
    AssociationSocket._shutdown_socket = _close_even_if_reset  # type: ignore[method-assign]
    yield
    AssociationSocket._shutdown_socket = original  # type: ignore[method-assign]


@pytest.fixture(scope="session", autouse=True)
def _dcmtk_present() -> None:
    missing = [tool for tool in DCMTK_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.exit(f"dcmtk tools missing: {missing}; run 'make setup' (installs Debian's dcmtk)", 2)


def dcmtk(*argv: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """Run a dcmtk tool with Nagle off (dcmtk leaves it on unless TCP_NODELAY=1)."""
    env = dict(os.environ, TCP_NODELAY="1")
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{argv[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def storescu_concurrently(server: Server, batches: list[list[str]], *options: str) -> None:
    """One storescu process per batch, all at once (Nagle off); each must succeed."""
    argv = ["storescu", "-aec", server.ae_title, *options, "127.0.0.1", str(server.port)]
    env = dict(os.environ, TCP_NODELAY="1")
    processes = [subprocess.Popen([*argv, *batch], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for batch in batches]
    for process in processes:
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, output
