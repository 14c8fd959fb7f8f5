"""Fixed per-store costs of the association thread (issue 13, lever 5): each step as it is against the
step it replaced, in the same run.

Run with ``pytest bench/test_bench_store.py --benchmark-only``. Each is a
system call or two on its own (microseconds), but each is also a moment the
thread lets go of the GIL, where another association of the same worker
takes it: under several associations a store waits at every one of them.

* The C-STORE-RSP: one write to the non-blocking descriptor
  (:meth:`fastscp.net.association.Association.send`) against ``sendall`` on
  a socket with a timeout (CPython polls before it sends).
* The content hash of a data set that fits in the header prefix: hashed in
  memory (:func:`fastscp.dicom.part10.content_hash`) against read back from
  the temp file (:func:`~fastscp.dicom.part10.dataset_content_hash`).
* The free-space watermark: measured at most every 0.1 s while far above it
  (:meth:`fastscp.storage.area.Storage.out_of_space`) against a statvfs per
  store.
* The temp file made ahead: its mode looked at once per folder
  (:class:`fastscp.storage.area.TempFile`) against an fchmod per file.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fastscp.dicom.part10 import content_hash, dataset_content_hash
from fastscp.net import dimse
from fastscp.net.association import Association, ServiceSettings
from fastscp.net.negotiation import AcceptancePolicy
from fastscp.net.pdu import p_data_tf
from fastscp.storage.area import Storage, TempFile

CT = "1.2.840.10008.5.1.4.1.1.2"
UID = "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345"
#: Seconds per call of the step replaced, by group; filled as tests run.
BEFORE: dict[str, float] = {}


def _report(benchmark, capsys: pytest.CaptureFixture, group: str) -> None:  # type: ignore[no-untyped-def]
    if benchmark.stats is None or group not in BEFORE:  # --benchmark-disable, or -k left the other out
        return
    now, before = benchmark.stats.stats.median, BEFORE[group]
    benchmark.extra_info["x_vs_before"] = round(before / now, 2)
    with capsys.disabled():
        print(f"\n  {group}: {now * 1e6:.2f} us, before {before * 1e6:.2f} us: {before / now:.2f}x")


def _before(benchmark, group: str, func: Callable[[], object]) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = group
    benchmark(func)
    if benchmark.stats is not None:
        BEFORE[group] = benchmark.stats.stats.median


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Storage:
    storage = Storage(str(tmp_path_factory.mktemp("store")), fsync=False, min_free_bytes=1 << 20)
    storage.prepare()
    return storage


# -- the C-STORE-RSP ------------------------------------------------------------------------

RSP_GROUP = "C-STORE-RSP sent"
RSP = dimse.encode_response(dimse.C_STORE_RSP, CT, 7, dimse.SUCCESS, UID)


@pytest.fixture
def connected(storage: Storage) -> Iterator[tuple[Association, socket.socket]]:
    """An association's socket with a timeout (as in data transfer), its peer drained by a thread."""
    ours, theirs = socket.socketpair()
    ours.settimeout(30)
    policy = AcceptancePolicy(ae_title="FASTSCP", storage_sop_classes=frozenset({CT}), max_pdu_size=16384)
    settings = ServiceSettings(policy=policy, storage=storage, acse_timeout=30, dimse_timeout=30,
                               max_object_size=1 << 20, max_command_set=4096, min_data_rate=0)

    def drain() -> None:
        while theirs.recv(1 << 20):
            pass

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    yield Association(ours, "127.0.0.1:11112", settings, lambda record: None), ours
    ours.close()
    reader.join(10)
    theirs.close()


def test_rsp_sendall(benchmark, connected) -> None:  # type: ignore[no-untyped-def]
    _association, sock = connected
    _before(benchmark, RSP_GROUP, lambda: sock.sendall(p_data_tf(1, RSP, 0)))


def test_rsp_one_write(benchmark, capsys, connected) -> None:  # type: ignore[no-untyped-def]
    association, _sock = connected
    benchmark.group = RSP_GROUP
    benchmark(association.send, 1, RSP)
    _report(benchmark, capsys, RSP_GROUP)




# -- the content hash of a small data set ----------------------------------------------------

HASH_GROUP = "content hash, 9 KB data set"
DATA_SET = os.urandom(9000)


def test_hash_read_back(benchmark, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "file"
    path.write_bytes(bytes(300) + DATA_SET)
    fd = os.open(path, os.O_RDONLY)
    try:
        _before(benchmark, HASH_GROUP, lambda: dataset_content_hash(fd, 300, 300 + len(DATA_SET)))
    finally:
        os.close(fd)


def test_hash_in_memory(benchmark, capsys) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = HASH_GROUP
    prefix = bytearray(DATA_SET)
    assert benchmark(content_hash, prefix) == _read_back_hash()
    _report(benchmark, capsys, HASH_GROUP)


def _read_back_hash() -> str:
    with tempfile.TemporaryFile() as f:
        f.write(DATA_SET)
        f.flush()
        return dataset_content_hash(f.fileno(), 0)


# -- the free-space watermark ---------------------------------------------------------------

SPACE_GROUP = "free-space watermark"


def test_space_statvfs_each_store(benchmark, storage: Storage) -> None:  # type: ignore[no-untyped-def]
    def check() -> bool:
        return storage.free_bytes() < storage.min_free_bytes

    _before(benchmark, SPACE_GROUP, check)


def test_space_measured_now_and_then(benchmark, capsys, storage: Storage) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = SPACE_GROUP
    assert benchmark(storage.out_of_space) == ""
    _report(benchmark, capsys, SPACE_GROUP)


# -- the temp file made ahead ----------------------------------------------------------------

TEMP_GROUP = "temp file made ahead (made and removed)"


def test_temp_fchmod_each(benchmark, storage: Storage) -> None:  # type: ignore[no-untyped-def]
    folder = storage.incoming_dir

    def make() -> None:
        path = os.path.join(folder, "bench-before.part")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        os.fchmod(fd, 0o640)
        os.close(fd)
        os.unlink(path)

    _before(benchmark, TEMP_GROUP, make)


def test_temp_mode_looked_at_once(benchmark, capsys, storage: Storage) -> None:  # type: ignore[no-untyped-def]
    def make() -> None:
        TempFile(storage.incoming_dir, 0o640).discard()

    benchmark.group = TEMP_GROUP
    benchmark(make)
    _report(benchmark, capsys, TEMP_GROUP)
