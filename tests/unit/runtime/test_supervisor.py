"""The supervisor and its child-process type with small fake children: restarts, readiness, stop, accept.

The fakes are real forked processes (the targets below); the supervisor runs
as its own process (``_SCRIPT``) with them in place of the indexer, the
post-store stage or the workers, and real workers where a test needs
associations answered.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastscp.process.orphan import die_with_parent
from fastscp.runtime.child import Backoff, Child, ChildSpec
from fastscp.runtime.messages import ENCODER, READINESS, Ready
from tests.conftest import REPO, wait_for_port, wait_until
from tests.rawscu import RawSCU

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
#: The backoff the supervisor under test uses: 0.5, 1, 2, 2... s after quick exits.
BACKOFF = Backoff(first=0.5, most=2.0, stable=10.0)
_PYTEST_PID = os.getpid()

# -- fake children (each a real forked process) ----------------------------------------------


def _note(kind: str) -> int:
    """Append "kind pid time" to $FASTSCP_FAKE_LOG; returns how many starts of ``kind`` came before."""
    path = os.environ["FASTSCP_FAKE_LOG"]
    before = sum(1 for line in Path(path).read_text().splitlines() if line.split()[0] == kind) \
        if os.path.exists(path) else 0
    with open(path, "a") as f:
        f.write(f"{kind} {os.getpid()} {time.time()}\n")
    return before


def _forever() -> None:
    while True:
        time.sleep(1)


def idle(*_args: object) -> None:
    """A child that does nothing until it is signalled (a post-store stage)."""
    _forever()


def indexer_ready(channel, *_args: object) -> None:  # type: ignore[no-untyped-def]
    """An indexer that opens at once and then idles."""
    _note("indexer")
    channel.send(ENCODER.encode(Ready()))
    _forever()


def indexer_ready_once(channel, *_args: object) -> None:  # type: ignore[no-untyped-def]
    """Ready at its first start, dies soon after; every restart hangs without ever saying Ready."""
    if _note("indexer") == 0:
        channel.send(ENCODER.encode(Ready()))
        time.sleep(1.0)
        os._exit(3)
    _forever()


def extra_stage(_supervisor: object) -> ChildSpec:
    """A kind of child registered in Targets.stages, as a forwarder would be."""
    return ChildSpec("extra", extra_child, channel=False)


def extra_child() -> None:
    _note("extra")
    time.sleep(0.3)
    os._exit(4)


def crashing_worker(_control, index: int, *_args: object) -> None:  # type: ignore[no-untyped-def]
    """A worker that dies as soon as it starts, every time."""
    _note(f"worker{index}")
    os._exit(3)


def stubborn(channel) -> None:  # type: ignore[no-untyped-def]
    """Ignores SIGTERM, then says it is ready."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    channel.send(ENCODER.encode(Ready()))
    _forever()


def polite(channel) -> None:  # type: ignore[no-untyped-def]
    channel.send(ENCODER.encode(Ready()))
    _forever()


def mute(_channel) -> None:  # type: ignore[no-untyped-def]
    """Never says it is ready."""
    _forever()


# -- the supervisor as a process, with fakes ---------------------------------------------------

_SCRIPT = """
import dataclasses, json, sys
from fastscp.config import load_config
from fastscp.process import logs
from fastscp.runtime import supervisor
from fastscp.runtime.children import TARGETS
from tests.unit.runtime import test_supervisor as fakes

port, root, workers, targets, ready_timeout, overrides = sys.argv[1:7]
targets, overrides = json.loads(targets), json.loads(overrides)
stages = tuple(getattr(fakes, name) for name in targets.pop("stages", []))
supervisor.INDEXER_READY_TIMEOUT = float(ready_timeout)
supervisor.SPARE_WORKER_IDLE = float(overrides.pop("spare_worker_idle", supervisor.SPARE_WORKER_IDLE))
config = load_config(None, {"server.port": int(port), "server.host": "127.0.0.1", "storage.directory": root,
                            "server.workers": int(workers), "monitor.listen": "off", **overrides})
logs.configure("INFO")
targets = dataclasses.replace(TARGETS, stages=stages, **{kind: getattr(fakes, name) for kind, name in targets.items()})
sys.exit(supervisor.Supervisor(config, targets, backoff=fakes.BACKOFF).run())
"""


class FakeServer:
    def __init__(self, tmp: Path, targets: dict[str, object], *, workers: int = 1, ready_timeout: float = 60,
                 overrides: dict[str, object] | None = None) -> None:
        #: The supervisor binds port 0 (no other process can take it first); its port once :meth:`listening`.
        self.port = 0
        self.log = tmp / "supervisor.log"
        self.fakes = tmp / "fakes.log"
        self._out = open(self.log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SCRIPT, "0", str(tmp / "received"), str(workers),
             json.dumps(targets), str(ready_timeout), json.dumps(overrides or {})],
            stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=REPO, env={**os.environ, "FASTSCP_FAKE_LOG": str(self.fakes)})

    def starts(self, kind: str) -> list[tuple[int, float]]:
        """(pid, time) of each start of a fake ``kind``."""
        if not self.fakes.exists():
            return []
        return [(int(pid), float(at)) for k, pid, at in
                (line.split() for line in self.fakes.read_text().splitlines()) if k == kind]

    def log_text(self) -> str:
        return self.log.read_text()

    def listening(self) -> None:
        """Wait until it accepts associations, and learn its port."""
        self.port = wait_for_port(0, self.process, self.log)

    def stop(self, timeout: float = 30) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self._out.close()


@pytest.fixture
def fake_server(tmp_path):  # type: ignore[no-untyped-def]
    servers: list[FakeServer] = []

    def start(targets: dict[str, object], **kwargs) -> FakeServer:  # type: ignore[no-untyped-def]
        server = FakeServer(tmp_path, targets, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


def _gaps(starts: list[tuple[int, float]]) -> list[float]:
    return [b[1] - a[1] for a, b in zip(starts, starts[1:], strict=False)]


def test_a_child_that_dies_is_restarted_with_growing_backoff_and_the_storm_is_bounded(fake_server) -> None:  # type: ignore[no-untyped-def]
    server = fake_server({"worker": "crashing_worker", "indexer": "indexer_ready", "poststore": "idle",
                          "stages": ["extra_stage"]})
    window = 6.5
    wait_until(lambda: server.starts("worker0"), timeout=30, what="the first worker start")
    time.sleep(window)
    starts = server.starts("worker0")
    gaps = _gaps(starts)
    # 0.5, 1, 2, 2 s (BACKOFF) after exits at once: 4-5 starts in the window, where a restart
    # without backoff would fork hundreds.
    assert 3 <= len(starts) <= 7, starts
    assert gaps[0] >= BACKOFF.first * 0.9, gaps
    assert gaps[1] >= 2 * BACKOFF.first * 0.9 and gaps[1] > gaps[0], gaps
    assert all(gap <= BACKOFF.most + 1.5 for gap in gaps), gaps
    assert len({pid for pid, _ in starts}) == len(starts)
    log = server.log_text()
    assert "worker 0 (pid" in log and "exited with code 3" in log and "restarting it in 1 s" in log
    # A child registered in Targets.stages is run and kept running the same way.
    extra = server.starts("extra")
    assert 3 <= len(extra) <= 7 and all(gap >= BACKOFF.first * 0.9 for gap in _gaps(extra)), extra
    assert "extra started (pid" in log and "extra (pid" in log and "exited with code 4" in log
    assert server.stop() == 0


def test_accept_goes_on_while_the_indexer_restarts_and_never_becomes_ready(fake_server) -> None:  # type: ignore[no-untyped-def]
    """Real workers; the indexer dies after its start and its restarts hang without Ready (killed at 3 s)."""
    server = fake_server({"indexer": "indexer_ready_once", "poststore": "idle"}, workers=2, ready_timeout=3)
    server.listening()
    wait_until(lambda: len(server.starts("indexer")) >= 2, timeout=15, what="the indexer's restart")
    # From here the indexer is starting (and is killed at its deadline, then restarted):
    # every association is still answered at once.
    deadline = time.monotonic() + 5
    answered = 0
    while time.monotonic() < deadline:
        started = time.monotonic()
        scu = RawSCU(server.port, VERIFICATION, IMPLICIT_VR_LITTLE_ENDIAN, timeout=2)
        assert scu.accepted, scu.response_type
        assert time.monotonic() - started < 1.0
        scu.release()
        scu.close()
        answered += 1
        time.sleep(0.2)
    assert answered >= 10
    wait_until(lambda: "indexer did not start within 3 s" in server.log_text(), timeout=15,
               what="the never-ready indexer killed at its deadline")
    wait_until(lambda: len(server.starts("indexer")) >= 3, timeout=15, what="another restart of the indexer")
    assert "indexer started (pid" in server.log_text()
    assert server.stop() == 0


def _started_workers(log: str) -> list[int]:
    return sorted({int(line.split("worker ", 1)[1].split()[0]) for line in log.splitlines()
                   if "started (pid" in line and "worker " in line})


def test_one_association_per_worker_grows_the_pool_and_stops_idle_spares(fake_server) -> None:  # type: ignore[no-untyped-def]
    """server.associations_per_worker: 1 with real workers: each open association gets a process of its own."""
    server = fake_server({"indexer": "indexer_ready", "poststore": "idle"}, workers=1,
                         overrides={"server.associations_per_worker": 1, "spare_worker_idle": 1.0})
    server.listening()
    assert _started_workers(server.log_text()) == [0]
    held = []
    try:
        for _ in range(3):
            scu = RawSCU(server.port, VERIFICATION, IMPLICIT_VR_LITTLE_ENDIAN, timeout=5)
            assert scu.accepted, scu.response_type
            held.append(scu)
        # Three associations open at once: worker 0 and two more, forked as they came.
        assert _started_workers(server.log_text()) == [0, 1, 2]
    finally:
        for scu in held:
            scu.release()
            scu.close()
    # Idle past SPARE_WORKER_IDLE: the two spares stop; worker 0 (server.workers) stays.
    wait_until(lambda: server.log_text().count("stopping it (server.associations_per_worker)") == 2, timeout=20,
               what="the idle spare workers to stop")
    assert "worker 0 idle" not in server.log_text()
    # The next association goes to worker 0, free again: nothing new is forked, nothing is restarted.
    scu = RawSCU(server.port, VERIFICATION, IMPLICIT_VR_LITTLE_ENDIAN, timeout=5)
    assert scu.accepted, scu.response_type
    scu.release()
    scu.close()
    time.sleep(0.5)
    log = server.log_text()
    assert _started_workers(log) == [0, 1, 2], log
    assert "restarting it" not in log, log
    assert server.stop() == 0


# -- the child-process type on its own ---------------------------------------------------------


def _bootstrap(target, *args, death_signal: int = signal.SIGKILL) -> None:  # type: ignore[no-untyped-def]
    die_with_parent(_PYTEST_PID, signal.SIGKILL)  # nothing outlives the test run
    target(*args)


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


def _child(spec: ChildSpec, backoff: Backoff = BACKOFF) -> Child:
    return Child(spec, selectors.DefaultSelector(), bootstrap=_bootstrap, backoff=backoff)


def test_stop_kills_by_pid_within_the_deadline() -> None:
    child = _child(ChildSpec("stubborn", stubborn, decoder=READINESS, ready_timeout=10, stop_timeout=1.0))
    child.start()
    assert child.await_ready() == ""
    pid = child.pid
    assert pid is not None
    started = time.monotonic()
    assert child.stop() is False  # it ignored SIGTERM: killed
    assert time.monotonic() - started < 1.0 + 3.0
    assert _gone(pid) and child.state == "down"


def test_stop_of_a_child_that_obeys_sigterm_returns_at_once() -> None:
    child = _child(ChildSpec("polite", polite, decoder=READINESS, ready_timeout=10, stop_timeout=20))
    child.start()
    assert child.await_ready() == ""
    started = time.monotonic()
    assert child.stop() is True
    assert time.monotonic() - started < 5


def test_a_child_that_never_says_ready_is_killed_at_its_deadline_and_restarted_without_blocking() -> None:
    child = _child(ChildSpec("mute", mute, decoder=READINESS, ready_timeout=0.5))
    child.start()
    pids = [child.pid]
    longest = 0.0
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            turn = time.monotonic()
            due = child.deadline()
            for key, _events in child.selector.select(0.5 if due is None else min(max(due - turn, 0), 0.5)):
                key.data()
            child.tick(time.monotonic())
            longest = max(longest, time.monotonic() - turn)
            if child.pid != pids[-1]:
                pids.append(child.pid)
        # Killed at 0.5 s, restarted 0.5 s later, killed at 0.5 s, restarted 1 s later...
        assert 2 <= len(pids) <= 4, pids
        assert all(_gone(pid) for pid in pids[:-1] if pid is not None)
        assert longest < 0.6 + 0.5  # no turn of the loop waits for the child
    finally:
        child.retire()
        child.kill()
        child.wait(time.monotonic() + 5)


def test_backoff_doubles_after_quick_exits_and_resets_after_a_stable_run() -> None:
    backoff = Backoff(first=1.0, most=30.0, stable=10.0)
    assert [backoff.delay(0.1, n) for n in (1, 2, 3, 4, 5, 6, 7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff.delay(10.0, 5) == 0.0
