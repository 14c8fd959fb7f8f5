"""Forwarding: rules, the durable queue and the forwarder, against real receivers.

Destinations are dcmtk ``storescp`` in bit-preserving mode (+B, unique file
names so a duplicate shows as a second file), Orthanc, and pynetdicom SCPs
that answer with chosen statuses; each is started by the test on a free
port (tests.conftest.on_free_ports; the pynetdicom ones bind port 0), or, for
a destination that is down then up, on the port the test held meanwhile
(the closed_port fixture), and stopped by its PID.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from fastscp.cli.forward import load_checked
from fastscp.cli.main import main
from fastscp.config import ConfigError
from fastscp.dicom.part10 import read_file_meta
from fastscp.dicom.synthetic import write_series
from fastscp.forward.process import instance_records
from fastscp.forward.queue import Queue
from fastscp.forward.rules import compile_rules, destinations_for
from fastscp.index.records import BATCH_DECODER, ENCODER, InstanceRecord, RecordBatch
from fastscp.index.reindex import FileState, read_record
from fastscp.net.scu import _new_ae, associate
from fastscp.runtime.supervisor import public_config
from fastscp.status import DestinationState
from tests.conftest import Server, dcmtk, free_port, listens, on_free_ports, start_failed, stop_process, wait_until
from tests.e2e.test_access import pki, tls_config  # noqa: F401 (pki: a fixture of test_access)
from tests.unit.monitor.test_monitor import MonitorProcess, make_snapshot
from tests.unit.monitor.test_monitor_page import _chromium_present, _Page, chromium, monitor  # noqa: F401 (fixtures)

ROWS = 32  # small images: the test is about delivery, not bandwidth


# -- receivers --------------------------------------------------------------------------------


class Receiver:
    """A destination in its own process, stopped by its PID.

    It listens on ``port``, or with 0 on one of free_port(), chosen at its
    start (again if another process takes it first).
    """

    def __init__(self, folder: Path, port: int, ae_title: str) -> None:
        self.folder, self.port, self.ae_title = folder, port, ae_title
        self.process: subprocess.Popen | None = None
        #: Its output, beside the folder (which holds what it received).
        self.log = folder.with_name(folder.name + ".log")

    def _run(self, argv: Callable[[], list[str]], ready_within: float) -> None:
        """Start ``argv()`` (made for each try: it names self.port) and wait until :meth:`_ready`."""
        self.folder.mkdir(parents=True, exist_ok=True)
        given = self.port

        def start() -> None:
            self.port = given or free_port()
            command = argv()
            with open(self.log, "w") as out:
                self.process = subprocess.Popen(command, cwd=self.folder, stdout=out, stderr=subprocess.STDOUT,
                                                start_new_session=True, env=dict(os.environ, TCP_NODELAY="1"))
            try:
                wait_until(lambda: self._started(command[0]), ready_within, f"{command[0]} to answer")
            except BaseException:
                self.stop()
                raise

        on_free_ports(start)

    def _started(self, what: str) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise start_failed(what, self.process, self.log.read_text())
        return listens(self.process, self.port) and self._ready()

    def _ready(self) -> bool:
        return dcmtk("echoscu", "-to", "1", "-aec", self.ae_title, "127.0.0.1", str(self.port),
                     check=False).returncode == 0

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, 15)

    def files(self) -> Iterator[Path]:
        return (p for p in self.folder.rglob("*") if p.is_file())

    def received(self) -> dict[str, list[Path]]:
        """SOP Instance UID -> the Part 10 files received with it (more than one: a duplicate)."""
        found: dict[str, list[Path]] = collections.defaultdict(list)
        for path in self.files():
            head = path.read_bytes()[:4096]
            if head[128:132] == b"DICM":
                found[read_file_meta(head)[0][0x0003]].append(path)
        return found


class Storescp(Receiver):
    """dcmtk storescp, bit-preserving, one file per received C-STORE (+uf)."""

    def __init__(self, folder: Path, port: int, ae_title: str = "DEST") -> None:
        super().__init__(folder, port, ae_title)

    def start(self) -> Storescp:
        self._run(lambda: ["storescp", "+B", "+uf", "+xa", "-aet", self.ae_title, "-od", str(self.folder),
                           str(self.port)], 15)
        return self


class Orthanc(Receiver):
    """Orthanc with its own config, storage and index folders, on free ports."""

    def __init__(self, folder: Path, port: int, ae_title: str = "ORTHANC") -> None:
        super().__init__(folder, port, ae_title)

    def start(self) -> Orthanc:
        self._run(self._argv, 30)
        return self

    def _argv(self) -> list[str]:
        config = {"Name": "fastscp-forward-test", "StorageDirectory": str(self.folder / "storage"),
                  "IndexDirectory": str(self.folder / "index"), "DicomAet": self.ae_title, "DicomPort": self.port,
                  "HttpPort": free_port(), "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
                  "Plugins": [], "LuaScripts": [], "StorageCompression": False}
        (self.folder / "orthanc.json").write_text(json.dumps(config))
        return ["Orthanc", str(self.folder / "orthanc.json")]

    def files(self) -> Iterator[Path]:
        return (p for p in (self.folder / "storage").rglob("*") if p.is_file())


class StatusSCP:
    """A pynetdicom Storage SCP in this process that answers every C-STORE with ``status``, on a port it binds."""

    def __init__(self, status: int = 0, *, ae_title: str = "STATUS",
                 contexts: tuple[tuple[str, list[str]], ...] = ((CTImageStorage, [ExplicitVRLittleEndian]),)) -> None:
        self.status, self.ae_title = status, ae_title
        self.requests: list[tuple[str, str, bytes]] = []  # (SOP Instance UID, transfer syntax, data set)
        #: Seconds each C-STORE takes (a slow destination).
        self.delay = 0.0
        #: SOP Instance UIDs whose C-STORE aborts the association (an instance the destination chokes on).
        self.abort_on: set[str] = set()
        ae = AE(ae_title=ae_title)
        for sop_class, syntaxes in contexts:
            ae.add_supported_context(sop_class, syntaxes)
        self._lock = threading.Lock()

        def on_store(event: evt.Event) -> int:
            if self.delay:
                time.sleep(self.delay)
            uid = event.request.AffectedSOPInstanceUID
            with self._lock:
                self.requests.append((uid, str(event.context.transfer_syntax), bytes(event.request.DataSet.getvalue())))
            if uid in self.abort_on:
                event.assoc.abort()  # no response: the sender sees the association lost mid-send
            return self.status

        def on_accepted(_event: evt.Event) -> None:
            with self._lock:
                self.associations += 1

        self.associations = 0
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_ACCEPTED, on_accepted)])
        self.port: int = self.server.server_address[1]

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


@contextlib.contextmanager
def forward_queue(server: Server) -> Iterator[Queue | None]:
    """The server's forwarding queue, read as ``fastscp forward status`` does; None before the forwarder made it."""
    path = server.index.with_suffix(".forward.sqlite")
    if not path.exists():
        yield None
        return
    queue = Queue(str(path), create=False)
    try:
        yield queue
    finally:
        queue.close()


def states(server: Server) -> dict[str, DestinationState]:
    with forward_queue(server) as queue:
        return {} if queue is None else {s.name: s for s in queue.states()}


def taken_in(server: Server) -> int:
    """Stored instances the forwarder has taken in (queued for its rules' destinations, or for none)."""
    with forward_queue(server) as queue:
        return 0 if queue is None else len(queue.known(0.0))


def forwarder_pid(server: Server) -> int:
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


def test_destination_down_then_up_every_image_arrives_byte_exact(tmp_path: Path, start_server, receivers,
                                                                 capsys, closed_port: int) -> None:
    port = closed_port  # nothing listens until the destination starts, nothing else takes it
    config = forwarding_config(tmp_path / "forward.yaml", {"pacs": destination(port, max_associations=2)},
                               [{"destinations": ["pacs"], "modalities": ["CT"]}])
    server = start_server(config=config, monitor="127.0.0.1:0")
    url = server.monitor_url()
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
    code, out = forward_cli(capsys, config, server, "status")
    assert code == 0, out
    line = next(line for line in out.splitlines() if line.startswith("pacs "))
    queued, in_flight, sent, failed = map(int, line.split()[1:5])
    assert (queued + in_flight, sent, failed) == (200, 0, 0) and "connection refused" in line, out
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
    # The status page and /metrics show the same figures (the supervisor reads the queue every 2 s).
    def published() -> dict:
        with urllib.request.urlopen(f"{url}/status.json", timeout=5) as answer:
            return json.loads(answer.read())["forwarding"]

    wait_until(lambda: published() and published()[0]["sent"] == 200, 15, "the snapshot's forwarding figures")
    assert published()[0] | {"last_error": "", "last_error_at": 0} == {
        "name": "pacs", "queued": 0, "in_flight": 0, "sent": 200, "failed": 0, "resent": 0, "last_error": "",
        "last_error_at": 0, "oldest_queued_seconds": 0.0}
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as answer:
        metrics = answer.read().decode()
    assert 'fastscp_forward_sent_total{destination="pacs"} 200' in metrics
    assert 'fastscp_forward_queued{destination="pacs"} 0' in metrics
    with urllib.request.urlopen(f"{url}/", timeout=5) as answer:
        assert 'id="forwarding"' in answer.read().decode()


class Standalone(Receiver):
    """``fastscp forward run`` beside a server without forwarding of its own."""

    def __init__(self, tmp: Path, config: Path, server: Server) -> None:
        super().__init__(tmp, 0, "")
        self.log = tmp / f"forwarder-{time.monotonic_ns()}.log"
        self._log = open(self.log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fastscp.cli", "forward", "run", "--config", str(config), "--storage-dir",
             str(server.storage), "--index-db", str(server.index)],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: "forwarder started" in self.log.read_text(), 30, "the forwarder to start")

    def stop(self) -> None:
        super().stop()
        self._log.close()


def test_reconcile_queues_what_the_forwarder_never_took_in(tmp_path: Path, start_server, receivers,
                                                           closed_port: int) -> None:
    """The start's reconcile with the index: instances stored while no forwarder ran are forwarded
    (what a kill -9 of a worker or of the forwarder leaves), once each; older ones are not."""
    port = closed_port  # nothing listens until the destination starts, nothing else takes it
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
    dest = StatusSCP(ae_title="DEST")
    receivers.append(dest)
    config = forwarding_config(tmp_path / "forward.yaml", {"pacs": destination(dest.port)},
                               [{"destinations": ["pacs"]}], batch_size=10)
    server = start_server(config=config)
    dest.delay = 0.02  # 100 images take 2 s or more: time to kill in the middle
    files = write_series(str(tmp_path / "ct"), 100, rows=ROWS, columns=ROWS)
    send(server, files)
    wait_until(lambda: len(dest.requests) >= 30, 30, "forwarding under way")
    killed = forwarder_pid(server)
    os.kill(killed, signal.SIGKILL)
    at_kill = len(dest.requests)
    assert at_kill < 100, "everything was sent before the kill: the test did not kill mid-way"
    wait_until(lambda: forwarder_pid(server) != killed, 20, "the forwarder restarted")
    wait_until(lambda: states(server).get("pacs", DestinationState(name="")).sent >= 100, 60, "100 sent")
    final = states(server)["pacs"]
    assert (final.queued, final.in_flight, final.failed) == (0, 0, 0)
    by_uid = collections.Counter(uid for uid, _ts, _data in dest.requests)
    stored = {read_file_meta(p.read_bytes()[:4096])[0][0x0003]: p for p in server.stored_files()}
    assert set(by_uid) == set(stored), "an acknowledged instance never reached the destination"
    duplicates = sum(n - 1 for n in by_uid.values())
    # At least once: what was in flight at the kill went again, and was counted.
    assert final.resent >= duplicates
    assert final.resent <= 10  # one association's batch at most
    assert dest.associations <= len(dest.requests) / 3  # several instances per association (batch_size 10)
    for uid, _ts, data in dest.requests:
        assert data == data_set(stored[uid])


# The destination (pynetdicom's AE, in this process) may leave the socket of the forwarder killed
# mid-association for the garbage collector: its ResourceWarning is not ours (CI, a loaded machine).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_kill9_whole_server_midway_loses_nothing(tmp_path: Path, start_server, receivers) -> None:
    dest = StatusSCP(ae_title="DEST")
    dest.delay = 0.01
    receivers.append(dest)
    config = forwarding_config(tmp_path / "forward.yaml", {"pacs": destination(dest.port)},
                               [{"destinations": ["pacs"]}], batch_size=10)
    server = start_server(config=config)
    files = write_series(str(tmp_path / "ct"), 120, rows=ROWS, columns=ROWS)
    sender = subprocess.Popen(["storescu", "-aec", server.ae_title, "127.0.0.1", str(server.port), *files],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=dict(os.environ, TCP_NODELAY="1"))
    # While instances still arrive and are forwarded: some acknowledged ones have not reached the forwarder.
    wait_until(lambda: len(server.stored_files()) >= 40, 30, "storing under way")
    os.killpg(server.process.pid, signal.SIGKILL)  # every process of the server at once
    server.process.wait(10)
    sender.wait(60)
    server = start_server(config=config, storage=server.storage)
    stored = {read_file_meta(p.read_bytes()[:4096])[0][0x0003]: p for p in server.stored_files()}
    assert 40 <= len(stored)
    if len(stored) < 120:  # what storescu did not get acknowledged, it sends again now
        send(server, files)
        stored = {read_file_meta(p.read_bytes()[:4096])[0][0x0003]: p for p in server.stored_files()}
    assert len(stored) == 120
    wait_until(lambda: set(uid for uid, _ts, _d in dest.requests) >= set(stored), 60, "every stored instance sent")
    wait_until(lambda: states(server)["pacs"].queued + states(server)["pacs"].in_flight == 0, 30, "the queue empty")
    for uid, _ts, data in dest.requests:
        assert data == data_set(stored[uid])
    duplicates = len(dest.requests) - len(set(uid for uid, _ts, _d in dest.requests))
    assert states(server)["pacs"].resent >= duplicates


def forward_cli(capsys: pytest.CaptureFixture[str], config: Path, server: Server, *argv: str) -> tuple[int, str]:
    """``fastscp forward ...`` (its main, in this process): exit code and output."""
    capsys.readouterr()
    code = main(["forward", *argv, "--config", str(config), "--storage-dir", str(server.storage),
                 "--index-db", str(server.index)])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_permanent_refusals_are_recorded_and_not_retried_transient_ones_are(tmp_path: Path, start_server,
                                                                            receivers, capsys) -> None:
    refuse = StatusSCP(0xA900, ae_title="REFUSE")  # CT only: Secondary Capture's context is refused
    hostile = Dataset()  # a long Error Comment with a line break and markup in it
    hostile.Status, hostile.ErrorComment = 0xA900, "\n<b>" + "x" * 58
    refuse.status = hostile  # type: ignore[assignment]
    busy = StatusSCP(0xA700, ae_title="BUSY")
    receivers += [refuse, busy]
    config = forwarding_config(tmp_path / "forward.yaml",
                               {"refuse": destination(refuse.port, "REFUSE"), "busy": destination(busy.port, "BUSY")},
                               [{"destinations": ["refuse"]}, {"destinations": ["busy"], "modalities": ["CT"]}])
    server = start_server(config=config)
    ct = write_series(str(tmp_path / "ct"), 4, rows=ROWS, columns=ROWS)
    sc = write_series(str(tmp_path / "sc"), 2, rows=ROWS, columns=ROWS, modality="OT",
                      sop_class=SecondaryCaptureImageStorage, seed=2)
    send(server, ct + sc)
    wait_until(lambda: states(server).get("refuse", DestinationState(name="")).failed == 6, 30, "6 refused")
    # Out of resources is transient: each CT is tried again, with backoff.
    wait_until(lambda: len(busy.requests) >= 12, 30, "retries of 0xA700")
    assert states(server)["busy"].failed == 0 and "0xA700" in states(server)["busy"].last_error
    busy.status = 0
    wait_until(lambda: states(server)["busy"].sent == 4, 30, "sent once the destination has room")
    time.sleep(2.5)  # several retry_max periods: a permanent refusal is not tried again
    assert len(refuse.requests) == 4  # the CT; Secondary Capture never got a context
    refused = states(server)["refuse"]
    assert (refused.failed, refused.queued, refused.in_flight, refused.sent) == (6, 0, 0, 0)
    code, out = forward_cli(capsys, config, server, "status")
    assert code == 0, out
    failures = [line for line in out.splitlines() if line.startswith("failed: refuse: ")]
    assert len(failures) == 6
    assert sum("0xA900 Data set does not match SOP class" in line for line in failures) == 4
    refused_line = next(line for line in failures if "0xA900" in line)
    assert "\\\\n<b>xxx" in refused_line  # the peer's line break escaped
    assert sum("SOP class not accepted by the destination" in line for line in failures) == 2
    # retry: queued again at once; the destination now stores the CT, still refuses Secondary Capture.
    refuse.status = 0
    code, out = forward_cli(capsys, config, server, "retry", "--destination", "refuse")
    assert code == 0 and "6 failed instances queued again" in out, out
    wait_until(lambda: states(server)["refuse"].sent == 4 and states(server)["refuse"].failed == 2, 30, "retried")
    assert len(refuse.requests) == 8
    code, out = forward_cli(capsys, config, server, "purge", "--failed")
    assert code == 0 and "2 failed instances removed" in out, out
    assert states(server)["refuse"].failed == 0


def test_converted_only_when_the_destination_refuses_the_stored_transfer_syntax(tmp_path: Path, start_server,
                                                                               receivers) -> None:
    implicit_only = ((CTImageStorage, [ImplicitVRLittleEndian]),)
    convert = StatusSCP(ae_title="CONVERT", contexts=implicit_only)
    strict = StatusSCP(ae_title="STRICT", contexts=implicit_only)
    receivers += [convert, strict]
    config = forwarding_config(tmp_path / "forward.yaml",
                               {"convert": destination(convert.port, "CONVERT"),
                                "strict": destination(strict.port, "STRICT", transfer_syntaxes=[])},
                               [{"destinations": ["convert", "strict"]}])
    server = start_server(config=config)
    files = write_series(str(tmp_path / "ct"), 3, rows=ROWS, columns=ROWS)
    send(server, files)
    wait_until(lambda: states(server).get("convert", DestinationState(name="")).sent == 3, 30, "3 converted")
    wait_until(lambda: states(server).get("strict", DestinationState(name="")).failed == 3, 30, "3 refused")
    assert strict.requests == []
    assert "transfer syntax not accepted" in states(server)["strict"].last_error
    originals = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in files}
    for uid, syntax, data in convert.requests:
        assert syntax == ImplicitVRLittleEndian
        received = pydicom.dcmread(io.BytesIO(data), force=True)  # a bare Implicit VR Little Endian data set
        assert received.PixelData == originals[uid].PixelData and received.PatientID == originals[uid].PatientID


def test_sighup_puts_changed_rules_in_force(tmp_path: Path, start_server, receivers) -> None:
    dest = StatusSCP(ae_title="DEST", contexts=((CTImageStorage, [ExplicitVRLittleEndian]),
                                                ("1.2.840.10008.5.1.4.1.1.4", [ExplicitVRLittleEndian])))
    receivers.append(dest)
    config = forwarding_config(tmp_path / "forward.yaml", {"pacs": destination(dest.port)},
                               [{"destinations": ["pacs"], "modalities": ["CT"]}])
    server = start_server(config=config)
    mr = write_series(str(tmp_path / "mr1"), 2, rows=ROWS, columns=ROWS, modality="MR",
                      sop_class="1.2.840.10008.5.1.4.1.1.4", seed=4)
    send(server, mr)
    # The rules apply when the forwarder takes an instance in, which may come after storescu ends: the
    # first series must be taken in under the CT rule before the rules change, else the new rule sends it.
    wait_until(lambda: taken_in(server) == 2, 30, "the first MR series taken in")
    # A rule that can't be used is refused with its key and file; the running rules stay.
    bad = yaml.safe_load(config.read_text())
    bad["forwarding"]["rules"][0]["fields"] = {"NoSuchKeyword": "x"}
    config.write_text(yaml.safe_dump(bad))
    server.signal(signal.SIGHUP)
    server.wait_for_log(f"{config}: forwarding.rules[0].fields.NoSuchKeyword: not a header field")
    good = yaml.safe_load(config.read_text())
    good["forwarding"]["rules"][0] = {"destinations": ["pacs"], "fields": {"Modality": "MR",
                                                                         "PatientID": "SYN*"}}
    config.write_text(yaml.safe_dump(good))
    server.signal(signal.SIGHUP)
    server.wait_for_log("forwarder: config reloaded: 1 rules")
    mr2 = write_series(str(tmp_path / "mr2"), 2, rows=ROWS, columns=ROWS, modality="MR",
                       sop_class="1.2.840.10008.5.1.4.1.1.4", seed=5)
    ct = write_series(str(tmp_path / "ct"), 2, rows=ROWS, columns=ROWS)
    send(server, mr2 + ct)
    wait_until(lambda: states(server).get("pacs", DestinationState(name="")).sent == 2, 30, "2 sent")
    time.sleep(1)
    uids = lambda paths: {pydicom.dcmread(p).SOPInstanceUID for p in paths}  # noqa: E731
    assert {uid for uid, _ts, _data in dest.requests} == uids(mr2)
    # One forwarder per index: a second one, run by hand, says so and ends.
    second = subprocess.run([sys.executable, "-m", "fastscp.cli", "forward", "run", "--config", str(config),
                             "--storage-dir", str(server.storage), "--index-db", str(server.index)],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 1 and "another forwarder runs for the index" in second.stderr, second.stderr


@pytest.mark.parametrize(("rule", "destinations", "message"), [
    ({"destinations": ["nowhere"]}, {}, "forwarding.rules[0].destinations[0]: no destination 'nowhere'"),
    ({"destinations": ["pacs"], "sop_classes": ["No Such Storage"]}, None, "forwarding.rules[0].sop_classes:"),
    ({"destinations": ["pacs"], "fields": {"PixelData": "x"}}, None,
     "forwarding.rules[0].fields.PixelData: not a header field"),
    ({"destinations": ["pacs"]}, {"pacs": {"ae_title": "P", "host": "h", "port": 104,
                                           "transfer_syntaxes": ["JPEGBaseline8Bit"]}},
     "forwarding.destinations.pacs.transfer_syntaxes[0]: 'JPEGBaseline8Bit' is not one a file can be converted to"),
    ({"destinations": ["pacs"], "modality": ["CT"]}, None, "unknown key 'forwarding.rules[0].modality'"),
    ({"destinations": ["pacs"]}, "ae_title", "forwarding.ae_title: 'FAR_TOO_LONG_AE_TITLE' is not an AE title"),
])
def test_bad_rules_are_refused_at_load_naming_key_and_file(tmp_path: Path, rule: dict, destinations: dict | str | None,
                                                           message: str) -> None:
    extra = {}
    if destinations == "ae_title":
        destinations, extra = None, {"ae_title": "FAR_TOO_LONG_AE_TITLE"}
    if destinations is None:
        destinations = {"pacs": {"ae_title": "P", "host": "h", "port": 104}}
    config = forwarding_config(tmp_path / "bad.yaml", destinations, [rule], **extra)
    with pytest.raises(ConfigError) as refused:
        load_checked(str(config))
    assert str(refused.value).startswith(f"{config}: ") and message in str(refused.value)


def test_orthanc_destination_down_then_up(tmp_path: Path, start_server, receivers, closed_port: int) -> None:
    port = closed_port  # nothing listens until the destination starts, nothing else takes it
    config = forwarding_config(tmp_path / "forward.yaml", {"orthanc": destination(port, "ORTHANC")},
                               [{"destinations": ["orthanc"], "sop_classes": ["CT"]}])
    server = start_server(config=config)
    files = write_series(str(tmp_path / "ct"), 40, rows=ROWS, columns=ROWS)
    send(server, files)
    wait_until(lambda: "connection refused" in states(server).get("orthanc", DestinationState(name="")).last_error,
               20, "the refusal recorded")
    orthanc = Orthanc(tmp_path / "orthanc", port)
    receivers.append(orthanc.start())
    wait_until(lambda: states(server)["orthanc"].sent == 40, 60, "40 sent")
    assert assert_byte_exact(server, orthanc.received()) == 0


def test_tls_destination_with_client_certificate(tmp_path: Path, start_server, pki: Path) -> None:  # noqa: F811
    """Forwarding to another fastscp that requires DICOM TLS with client certificates."""
    receiver_dir = tmp_path / "receiver"
    receiver_dir.mkdir()
    receiver = start_server("--index-db", str(receiver_dir / "index.duckdb"), ae_title="TLSDEST",
                            storage=receiver_dir / "received", config=tls_config(receiver_dir, pki))
    tls = {"enabled": True, "ca_bundle": str(pki / "ca.pem"), "certificate": str(pki / "client.pem"),
           "private_key": str(pki / "client.key")}
    config = forwarding_config(tmp_path / "forward.yaml",
                               {"secure": destination(receiver.port, "TLSDEST", tls=tls)},
                               [{"destinations": ["secure"]}])
    server = start_server(config=config)
    files = write_series(str(tmp_path / "ct"), 3, rows=ROWS, columns=ROWS)
    send(server, files)
    wait_until(lambda: states(server).get("secure", DestinationState(name="")).sent == 3, 30, "3 sent over TLS")
    received = {read_file_meta(p.read_bytes()[:4096])[0][0x0003]: [p] for p in receiver.stored_files()}
    assert assert_byte_exact(server, received) == 0 and len(received) == 3


# -- rules, on records read from real files -----------------------------------------------------


def records_of(paths: list[str], calling_ae: str = "CT1") -> list[InstanceRecord]:
    out = []
    for path in paths:
        info = os.stat(path)
        record = read_record("/", FileState(os.path.abspath(path).lstrip("/"), info.st_size, info.st_mtime_ns))
        out.append(msgspec.structs.replace(record, calling_ae_title=calling_ae))
    return out


def rules_of(tmp_path: Path, rules: list[dict]) -> tuple:
    config = forwarding_config(tmp_path / f"rules-{len(list(tmp_path.iterdir()))}.yaml",
                               {name: destination(104, "X") for name in ("a", "b")}, rules)
    return compile_rules(load_checked(str(config)).forwarding, str(config))


def test_rules_match_on_calling_ae_modality_sop_class_and_any_indexed_field(tmp_path: Path) -> None:
    ct = records_of(write_series(str(tmp_path / "ct"), 1, rows=ROWS, columns=ROWS), "CT1")[0]
    sc = records_of(write_series(str(tmp_path / "sc"), 1, rows=ROWS, columns=ROWS, modality="OT",
                                 sop_class=SecondaryCaptureImageStorage, seed=1), "WS1")[0]

    def where(rule: dict, record: InstanceRecord) -> list[str]:
        return destinations_for(rules_of(tmp_path, [{"destinations": ["a"], **rule}]), record)

    assert where({}, ct) == ["a"]
    assert where({"calling_ae_titles": ["WS1"]}, ct) == [] and where({"calling_ae_titles": ["WS1"]}, sc) == ["a"]
    assert where({"modalities": ["ct"]}, ct) == ["a"] and where({"modalities": ["MR"]}, ct) == []
    assert where({"sop_classes": ["SC"]}, sc) == ["a"]
    assert where({"sop_classes": ["SecondaryCaptureImageStorage"]}, ct) == []
    assert where({"sop_classes": ["CT Image Storage"]}, ct) == ["a"]
    # Header fields: columns and the attribute map (HighBit), with the C-FIND rules.
    assert where({"fields": {"PatientName": "synthetic^PATIENT"}}, ct) == ["a"]  # names: any case
    assert where({"fields": {"StudyDescription": "*study"}}, ct) == ["a"]
    assert where({"fields": {"StudyDescription": "*STUDY"}}, ct) == []  # other text: case counts
    assert where({"fields": {"AccessionNumber": "X\\ACC0001"}}, ct) == ["a"]  # alternatives
    assert where({"fields": {"HighBit": "11"}}, ct) == ["a"] and where({"fields": {"HighBit": "12"}}, ct) == []
    assert where({"fields": {"WindowCenter": "40.0"}}, ct) == ["a"]  # numbers as numbers
    assert where({"fields": {"CallingAETitle": "CT?"}}, ct) == ["a"]
    assert where({"fields": {"Manufacturer": "ACME"}}, ct) == []  # absent: no match
    assert where({"modalities": ["CT"], "fields": {"PatientID": "OTHER"}}, ct) == []  # every condition
    # Several rules naming one destination: queued once.
    both = rules_of(tmp_path, [{"destinations": ["a", "b"]}, {"destinations": ["b"], "modalities": ["CT"]}])
    assert destinations_for(both, ct) == ["a", "b"]


def test_records_from_the_workers_wire_keep_their_attribute_map(tmp_path: Path) -> None:
    """What a worker sends (RecordBatch, maps shared per series) is what the forwarder matches on."""
    records = records_of(write_series(str(tmp_path / "ct"), 3, rows=ROWS, columns=ROWS))
    batch = BATCH_DECODER.decode(ENCODER.encode(RecordBatch.of(records)))
    rebuilt = instance_records(batch.instances, with_attributes=True)
    assert [json.loads(r.header.attributes) for r in rebuilt] == [json.loads(r.header.attributes) for r in records]
    assert [msgspec.structs.replace(r, header=msgspec.structs.replace(r.header, attributes="")) for r in rebuilt] == [
        msgspec.structs.replace(r, header=msgspec.structs.replace(r.header, attributes="")) for r in records]


def test_the_status_page_hides_a_destinations_private_key(tmp_path: Path) -> None:
    tls = {"enabled": True, "certificate": "/etc/fastscp/ours.pem", "private_key": "/etc/fastscp/ours.key"}
    config = forwarding_config(tmp_path / "c.yaml", {"pacs": destination(104, tls=tls)}, [])
    shown = public_config(load_checked(str(config)))["forwarding"]["destinations"]["pacs"]["tls"]  # type: ignore[index]
    assert shown["private_key"] == "(hidden)" and shown["certificate"] == "/etc/fastscp/ours.pem"


def test_the_sender_turns_nagle_off(receivers) -> None:
    """Else each C-STORE's data set waits for the receiver's delayed ACK (20 img/s to dcmtk storescp)."""
    scp = StatusSCP()
    receivers.append(scp)
    ae = _new_ae("FASTSCU", 10)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = associate(ae, "127.0.0.1", scp.port, ae_title="STATUS")
    try:
        assert assoc.is_established
        assert assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        assoc.release()


@pytest.mark.usefixtures("_chromium_present")
def test_the_status_page_shows_forwarding_per_destination(monitor: MonitorProcess,  # noqa: F811
                                                          tmp_path: Path) -> None:
    snapshot = make_snapshot()
    snapshot.forwarding = [
        DestinationState(name="pacs", queued=1234, in_flight=40, sent=98765, failed=3, resent=2,
                         last_error="<img src=x onerror=alert(1)>", last_error_at=time.time(),
                         oldest_queued_seconds=125.0),
        DestinationState(name="archive", sent=7),
    ]
    monitor.publish(snapshot)
    dom = chromium(tmp_path, monitor.url + "/", "--dump-dom")
    page = _Page(dom)
    assert "hidden" not in dom.split('id="forwarding-section"')[1].split(">")[0]
    text = page.text["forwarding"]
    assert re.search(r"pacs\s+1,234\s+40\s+98,765\s+3\s+2\s+2 min", text), text
    assert re.search(r"archive\s+0\s+0\s+7\s+0\s+0\s+\u2014\s+\u2014", text), text
    assert "<img src=x onerror=alert(1)>" in text and "img" not in page.tags  # peer text stays text
    # Forwarding off: no section.
    monitor.publish(make_snapshot())
    dom = chromium(tmp_path, monitor.url + "/", "--dump-dom")
    assert "hidden" in dom.split('id="forwarding-section"')[1].split(">")[0]


def test_an_instance_that_aborts_the_association_backs_off_and_does_not_block_the_rest(
        tmp_path: Path, start_server, receivers) -> None:
    dest = StatusSCP(ae_title="DEST")
    receivers.append(dest)
    config = forwarding_config(tmp_path / "forward.yaml", {"pacs": destination(dest.port)},
                               [{"destinations": ["pacs"]}], retry_initial=0.3, retry_max=30.0)
    server = start_server(config=config)
    files = write_series(str(tmp_path / "ct"), 4, rows=ROWS, columns=ROWS)
    poison = pydicom.dcmread(files[0]).SOPInstanceUID
    dest.abort_on.add(poison)
    send(server, files[:1])
    wait_until(lambda: len(dest.requests) >= 1, 20, "the first try")
    started = time.monotonic()
    send(server, files[1:])
    wait_until(lambda: states(server)["pacs"].sent == 3, 30, "the others sent")
    time.sleep(max(0.0, 4.0 - (time.monotonic() - started)))
    tries = sum(uid == poison for uid, _ts, _data in dest.requests)
    # Exponential backoff: tries at about 0, 0.3, 0.9, 2.1 s (then 4.5): not one every retry_initial.
    assert 2 <= tries <= 5, tries
    state = states(server)["pacs"]
    # Each unanswered try may have been stored: each is counted as a resend.
    assert state.queued == 1 and state.resent == tries and "no response" in state.last_error


def _connected_then_stopped(server: Server, tmp_path: Path) -> int:
    """The forwarder, once it has taken in a first instance (its connection from the worker accepted: an
    unaccepted one queues as many messages as the listener's backlog, 64, not 10), stopped (SIGSTOP);
    returns its PID."""
    forwarder = forwarder_pid(server)
    send(server, write_series(str(tmp_path / "first"), 1, rows=8, columns=8, patient_id="FW19"))
    wait_until(lambda: taken_in(server) == 1, 30, "the forwarder to take the first instance in")
    os.kill(forwarder, signal.SIGSTOP)
    return forwarder


def test_a_stalled_forwarder_never_holds_up_the_stores_and_takes_every_record(tmp_path: Path, start_server,
                                                                               closed_port: int) -> None:
    """The forwarder runs at server.derived_priority: under a burst it may not read for seconds (SIGSTOP
    here, as in test_poststore). The workers answer every C-STORE meanwhile and keep its records; it takes
    each once it runs again. Before, the workers' client waited on the forwarder's full socket after a
    response, and the next C-STORE was not answered."""
    config = forwarding_config(tmp_path / "forward.yaml", {"pacs": destination(closed_port)},
                               [{"destinations": ["pacs"]}])
    server = start_server(config=config, workers=1)
    count = 1200  # ~38 messages of 32 records, ~6 KB each: more than the socket's buffer (~200 KB) takes
    series = write_series(str(tmp_path / "ct"), count, rows=8, columns=8, patient_id="FW20")
    forwarder = _connected_then_stopped(server, tmp_path)
    try:
        # -to/-td: storescu gives up on a response that does not come within 20 s.
        dcmtk("storescu", "-to", "20", "-td", "20", "-aec", server.ae_title, "127.0.0.1", str(server.port),
              *series, timeout=120)
        assert len(server.stored_files()) == count + 1
    finally:
        os.kill(forwarder, signal.SIGCONT)
    wait_until(lambda: taken_in(server) == count + 1, 30, f"the forwarder to take {count} instances in")
    assert "records dropped" not in server.log_text()
    assert server.stop() == 0


def test_records_kept_for_a_stalled_forwarder_at_stop_are_queued_before_it_exits(
        tmp_path: Path, start_server, closed_port: int) -> None:
    """The server stops while its forwarder does not read: the worker keeps what it still holds in a file
    under .incoming at its exit; the forwarder, stopping after the workers, queues what its sockets hold
    and that file, not leaving them to the next start's reconcile (its last 10 minutes only)."""
    from fastscp.forward.process import kept_folder
    from tests.conftest import sigterm_pending

    config = forwarding_config(tmp_path / "forward.yaml", {"pacs": destination(closed_port)},
                               [{"destinations": ["pacs"]}])
    server = start_server(config=config, workers=1)
    count = 1200  # more than the socket takes, as above
    series = write_series(str(tmp_path / "ct"), count, rows=8, columns=8, patient_id="FW21")
    kept = Path(kept_folder(str(server.storage)))
    forwarder = _connected_then_stopped(server, tmp_path)
    try:
        send(server, series)
        server.signal(signal.SIGTERM)  # the workers stop first, then the forwarder
        wait_until(lambda: sigterm_pending(forwarder), timeout=60, what="the forwarder's SIGTERM")
        assert kept.is_dir() and list(kept.iterdir()), "the worker kept nothing in a file at its exit"
    finally:
        os.kill(forwarder, signal.SIGCONT)
    assert server.process.wait(60) == 0
    assert taken_in(server) == count + 1
    assert not list(kept.iterdir())
    assert "forwarder: took back" in server.log_text()
