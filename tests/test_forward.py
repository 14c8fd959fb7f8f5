"""Forwarding: rules, the durable queue and the forwarder, against real receivers.

Destinations are dcmtk ``storescp`` in bit-preserving mode (+B, unique file
names so a duplicate shows as a second file), Orthanc, and pynetdicom SCPs
that answer with chosen statuses; each is started by the test on a free
port and stopped by its PID.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from fastscp.dicom.part10 import read_file_meta
from fastscp.dicom.synthetic import write_series
from fastscp.forward.queue import Queue
from fastscp.status import DestinationState
from tests.conftest import Server, dcmtk, free_port, wait_until

ROWS = 32  # small images: the test is about delivery, not bandwidth


# -- receivers --------------------------------------------------------------------------------


class Storescp:
    """dcmtk storescp, bit-preserving, one file per received C-STORE (+uf)."""

    def __init__(self, folder: Path, port: int, ae_title: str = "DEST") -> None:
        self.folder, self.port, self.ae_title = folder, port, ae_title
        self.process: subprocess.Popen | None = None

    def start(self) -> Storescp:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["storescp", "+B", "+uf", "+xa", "-aet", self.ae_title, "-od", str(self.folder), str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env=dict(os.environ, TCP_NODELAY="1"))
        wait_until(lambda: dcmtk("echoscu", "-to", "1", "-aec", self.ae_title, "127.0.0.1", str(self.port),
                                 check=False).returncode == 0, 15, "storescp to answer C-ECHO")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(5)

    def received(self) -> dict[str, list[Path]]:
        """SOP Instance UID -> the files received with it (more than one: a duplicate)."""
        found: dict[str, list[Path]] = collections.defaultdict(list)
        for path in self.folder.iterdir():
            if path.is_file():
                meta, _ = read_file_meta(path.read_bytes()[:4096])
                found[meta[0x0003]].append(path)
        return found


class Orthanc:
    """Orthanc with its own config, storage and index folders, on free ports."""

    def __init__(self, folder: Path, port: int, ae_title: str = "ORTHANC") -> None:
        self.folder, self.port, self.ae_title = folder, port, ae_title
        self.process: subprocess.Popen | None = None

    def start(self) -> Orthanc:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {"Name": "fastscp-forward-test", "StorageDirectory": str(self.folder / "storage"),
                  "IndexDirectory": str(self.folder / "index"), "DicomAet": self.ae_title, "DicomPort": self.port,
                  "HttpPort": free_port(), "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
                  "Plugins": [], "LuaScripts": [], "StorageCompression": False}
        (self.folder / "orthanc.json").write_text(yaml.safe_dump(config))  # JSON is YAML; Orthanc reads JSON
        import json
        (self.folder / "orthanc.json").write_text(json.dumps(config))
        self.process = subprocess.Popen(["Orthanc", str(self.folder / "orthanc.json")], cwd=self.folder,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: dcmtk("echoscu", "-to", "1", "-aec", self.ae_title, "127.0.0.1", str(self.port),
                                 check=False).returncode == 0, 30, "Orthanc to answer C-ECHO")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(5)

    def received(self) -> dict[str, list[Path]]:
        found: dict[str, list[Path]] = collections.defaultdict(list)
        for path in (self.folder / "storage").rglob("*"):
            if path.is_file() and not path.name.endswith((".json", ".db")):
                data = path.read_bytes()
                if data[128:132] == b"DICM":
                    meta, _ = read_file_meta(data[:4096])
                    found[meta[0x0003]].append(path)
        return found


class StatusSCP:
    """A pynetdicom Storage SCP in this process that answers every C-STORE with ``status``."""

    def __init__(self, port: int, status: int = 0, *, ae_title: str = "STATUS",
                 contexts: tuple[tuple[str, list[str]], ...] = ((CTImageStorage, [ExplicitVRLittleEndian]),)) -> None:
        self.port, self.status, self.ae_title = port, status, ae_title
        self.requests: list[tuple[str, str, bytes]] = []  # (SOP Instance UID, transfer syntax, data set)
        #: Seconds each C-STORE takes (a slow destination).
        self.delay = 0.0
        ae = AE(ae_title=ae_title)
        for sop_class, syntaxes in contexts:
            ae.add_supported_context(sop_class, syntaxes)
        self._lock = threading.Lock()

        def on_store(event: evt.Event) -> int:
            if self.delay:
                time.sleep(self.delay)
            with self._lock:
                self.requests.append((event.request.AffectedSOPInstanceUID, str(event.context.transfer_syntax),
                                      bytes(event.request.DataSet.getvalue())))
            return self.status

        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def stop(self) -> None:
        self.server.shutdown()


# -- fastscp with forwarding ------------------------------------------------------------------


def forwarding_config(path: Path, destinations: dict[str, dict], rules: list[dict], **extra: object) -> Path:
    section = {"retry_initial": 0.3, "retry_max": 1.0, "batch_size": 40, "destinations": destinations,
               "rules": rules, **extra}
    path.write_text(yaml.safe_dump({"forwarding": section}))
    return path


def destination(port: int, ae_title: str = "DEST", **extra: object) -> dict:
    return {"ae_title": ae_title, "host": "127.0.0.1", "port": port, "timeout": 10, **extra}


def states(server: Server) -> dict[str, DestinationState]:
    path = server.index.with_suffix(".forward.sqlite")
    if not path.exists():
        return {}
    queue = Queue(str(path), create=False)
    try:
        return {s.name: s for s in queue.states()}
    finally:
        queue.close()


def forwarder_pid(server: Server) -> int:
    import re
    return int(re.findall(r"forwarder started \(pid (\d+)\), queue", server.log_text())[-1])


def data_set(path: Path) -> bytes:
    """The data set of a Part 10 file (what follows the File Meta Information)."""
    data = path.read_bytes()
    _meta, offset = read_file_meta(data)
    return data[offset:]


def send(server: Server, files: list[str]) -> None:
    dcmtk("storescu", "-aec", server.ae_title, "127.0.0.1", str(server.port), *files)


@pytest.fixture
def receivers() -> Iterator[list]:
    started: list = []
    yield started
    for receiver in started:
        receiver.stop()


def assert_byte_exact(server: Server, received: dict[str, list[Path]], *, exclude: set[str] = frozenset()) -> int:
    """Every stored file arrived, its data set byte for byte; returns the duplicates (extra copies)."""
    stored = {read_file_meta(p.read_bytes()[:4096])[0][0x0003]: p for p in server.stored_files()}
    stored = {uid: p for uid, p in stored.items() if uid not in exclude}
    missing = set(stored) - set(received)
    assert not missing, f"{len(missing)} of {len(stored)} stored instances never reached the destination"
    for uid, path in stored.items():
        for copy in received[uid]:
            assert data_set(copy) == data_set(path), f"{uid}: the forwarded data set differs from the stored one"
    return sum(len(copies) - 1 for copies in received.values())


# -- tests ------------------------------------------------------------------------------------


def test_destination_down_then_up_every_image_arrives_byte_exact(tmp_path: Path, start_server, receivers) -> None:
    port = free_port()
    config = forwarding_config(tmp_path / "forward.yaml", {"pacs": destination(port, max_associations=2)},
                               [{"destinations": ["pacs"], "modalities": ["CT"]}])
    server = start_server(config=config)
    ct = write_series(str(tmp_path / "ct"), 200, rows=ROWS, columns=ROWS)
    mr = write_series(str(tmp_path / "mr"), 5, rows=ROWS, columns=ROWS, modality="MR", seed=1)
    send(server, ct + mr)
    # Down: all 200 CT wait in the queue, with why; the MR match no rule.
    def waiting() -> int:
        state = states(server).get("pacs", DestinationState(name=""))
        return state.queued + state.in_flight  # in flight: an association being tried

    wait_until(lambda: waiting() == 200, 20, "200 queued")
    wait_until(lambda: "connection refused" in states(server)["pacs"].last_error, 10, "the refusal recorded")
    assert states(server)["pacs"].oldest_queued_seconds > 0
    status = subprocess.run([sys.executable, "-m", "fastscp.cli", "forward", "status", "--config", str(config),
                             "--index-db", str(server.index)], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    line = next(line for line in status.stdout.splitlines() if line.startswith("pacs "))
    queued, in_flight, sent, failed = map(int, line.split()[1:5])
    assert (queued + in_flight, sent, failed) == (200, 0, 0) and "connection refused" in line, status.stdout
    dest = Storescp(tmp_path / "dest", port)
    receivers.append(dest.start())
    wait_until(lambda: states(server)["pacs"].sent == 200, 60, "200 sent")
    final = states(server)["pacs"]
    assert (final.queued, final.in_flight, final.failed, final.resent) == (0, 0, 0, 0)
    received = dest.received()
    mr_uids = {read_file_meta(Path(p).read_bytes()[:4096])[0][0x0003] for p in mr}
    assert not mr_uids & set(received), "an instance no rule matches was forwarded"
    assert assert_byte_exact(server, received, exclude=mr_uids) == 0
    assert len(received) == 200


class Standalone:
    """``fastscp forward run`` beside a server without forwarding of its own."""

    def __init__(self, tmp: Path, config: Path, server: Server) -> None:
        self.log = tmp / f"forwarder-{time.monotonic_ns()}.log"
        self._log = open(self.log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fastscp.cli", "forward", "run", "--config", str(config), "--storage-dir",
             str(server.storage), "--index-db", str(server.index)],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: "forwarder started" in self.log.read_text(), 30, "the forwarder to start")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self._log.close()


def test_reconcile_queues_what_the_forwarder_never_took_in(tmp_path: Path, start_server, receivers) -> None:
    """The start's reconcile with the index: instances stored while no forwarder ran are forwarded
    (what a kill -9 of a worker or of the forwarder leaves), once each; older ones are not."""
    port = free_port()
    config = forwarding_config(tmp_path / "forward.yaml", {"pacs": destination(port)},
                               [{"destinations": ["pacs"]}])
    server = start_server()  # no forwarding of its own: nothing is handed to a forwarder
    before = write_series(str(tmp_path / "before"), 3, rows=ROWS, columns=ROWS, seed=3)
    send(server, before)  # stored before forwarding began: never forwarded (not the archive)
    time.sleep(0.5)
    forwarder = Standalone(tmp_path, config, server)
    receivers.append(forwarder)
    forwarder.stop()
    files = write_series(str(tmp_path / "ct"), 30, rows=ROWS, columns=ROWS)
    send(server, files)
    dest = Storescp(tmp_path / "dest", port)
    receivers.append(dest.start())
    forwarder = Standalone(tmp_path, config, server)
    receivers.append(forwarder)
    wait_until(lambda: states(server).get("pacs", DestinationState(name="")).sent == 30, 60, "30 sent")
    assert "30 stored instances the queue had not taken in" in forwarder.log.read_text()
    before_uids = {read_file_meta(Path(p).read_bytes()[:4096])[0][0x0003] for p in before}
    received = dest.received()
    assert not before_uids & set(received)
    assert assert_byte_exact(server, received, exclude=before_uids) == 0


def test_kill9_forwarder_midway_loses_nothing_and_counts_resends(tmp_path: Path, start_server, receivers) -> None:
    port = free_port()
    dest = StatusSCP(port, ae_title="DEST")
    receivers.append(dest)
    config = forwarding_config(tmp_path / "forward.yaml", {"pacs": destination(port)},
                               [{"destinations": ["pacs"]}], batch_size=10)
    server = start_server(config=config)
    dest.delay = 0.02  # 200 images take 4 s or more: time to kill in the middle
    files = write_series(str(tmp_path / "ct"), 200, rows=ROWS, columns=ROWS)
    send(server, files)
    wait_until(lambda: len(dest.requests) >= 40, 30, "forwarding under way")
    killed = forwarder_pid(server)
    os.kill(killed, signal.SIGKILL)
    at_kill = len(dest.requests)
    assert at_kill < 200, "everything was sent before the kill: the test did not kill mid-way"
    wait_until(lambda: forwarder_pid(server) != killed, 20, "the forwarder restarted")
    wait_until(lambda: states(server).get("pacs", DestinationState(name="")).sent >= 200, 60, "200 sent")
    final = states(server)["pacs"]
    assert (final.queued, final.in_flight, final.failed) == (0, 0, 0)
    by_uid = collections.Counter(uid for uid, _ts, _data in dest.requests)
    stored = {read_file_meta(p.read_bytes()[:4096])[0][0x0003]: p for p in server.stored_files()}
    assert set(by_uid) == set(stored), "an acknowledged instance never reached the destination"
    duplicates = sum(n - 1 for n in by_uid.values())
    # At least once: what was in flight at the kill went again, and was counted.
    assert final.resent >= duplicates
    assert final.resent <= 10  # one association's batch at most
    for uid, _ts, data in dest.requests:
        assert data == data_set(stored[uid])


def test_kill9_whole_server_midway_loses_nothing(tmp_path: Path, start_server, receivers) -> None:
    port = free_port()
    dest = StatusSCP(port, ae_title="DEST")
    dest.delay = 0.01
    receivers.append(dest)
    config = forwarding_config(tmp_path / "forward.yaml", {"pacs": destination(port)},
                               [{"destinations": ["pacs"]}], batch_size=10)
    server = start_server(config=config)
    files = write_series(str(tmp_path / "ct"), 200, rows=ROWS, columns=ROWS)
    sender = subprocess.Popen(["storescu", "-aec", server.ae_title, "127.0.0.1", str(server.port), *files],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, TCP_NODELAY="1"))
    # While instances still arrive and are forwarded: some acknowledged ones have not reached the forwarder.
    wait_until(lambda: len(server.stored_files()) >= 60, 30, "storing under way")
    os.killpg(server.process.pid, signal.SIGKILL)  # every process of the server at once
    server.process.wait(10)
    sender.wait(60)
    server = start_server(config=config, storage=server.storage)
    stored = {read_file_meta(p.read_bytes()[:4096])[0][0x0003]: p for p in server.stored_files()}
    assert 60 <= len(stored)
    if len(stored) < 200:  # what storescu did not get acknowledged, it sends again now
        send(server, files)
        stored = {read_file_meta(p.read_bytes()[:4096])[0][0x0003]: p for p in server.stored_files()}
    assert len(stored) == 200
    wait_until(lambda: set(uid for uid, _ts, _d in dest.requests) >= set(stored), 60, "every stored instance sent")
    wait_until(lambda: states(server)["pacs"].queued + states(server)["pacs"].in_flight == 0, 30, "the queue empty")
    for uid, _ts, data in dest.requests:
        assert data == data_set(stored[uid])
    duplicates = len(dest.requests) - len(set(uid for uid, _ts, _d in dest.requests))
    assert states(server)["pacs"].resent >= duplicates
