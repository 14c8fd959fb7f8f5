"""Hostile peers inside one association (issue 11): deadlines, bounded memory,
no leaks on error paths, large PDUs, no success for a malformed object.

Each test talks to a real server process: raw PDUs from tests.rawscu where a
stock client can't misbehave, pynetdicom and dcmtk where they can do it.
"""

from __future__ import annotations

import os
import random
import re
import select
import socket
import struct
import time
import warnings
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE

from fastscp.dicom.part10 import dataset_offset
from fastscp.dicom.synthetic import write_series
from fastscp.net import dimse
from fastscp.net.scu import associate
from tests.conftest import dcmtk, wait_until
from tests.dicomfiles import Encoder, pad
from tests.rawscu import RawSCU, associate_rq, p_data, raw_associate_rq, store_command

CT = str(CTImageStorage)
EXPLICIT = str(ExplicitVRLittleEndian)
DEFLATED = str(DeflatedExplicitVRLittleEndian)
A_ABORT = 0x07
ENC = Encoder(True, False)


def dataset(uid: str, pixel_data: bytes = bytes(512), declared: int | None = None) -> bytes:
    """A small CT data set (Explicit VR Little Endian); ``declared`` overrides Pixel Data's length."""
    return (ENC.element(0x00080016, "UI", pad(CT, "UI")) + ENC.element(0x00080018, "UI", pad(uid, "UI"))
            + ENC.element(0x00080060, "CS", pad("CT")) + ENC.element(0x00100010, "PN", pad("HOSTILE^PEER"))
            + ENC.element(0x00100020, "LO", pad("HOSTILE")) + ENC.element(0x0020000D, "UI", pad("1.2.3.1", "UI"))
            + ENC.element(0x0020000E, "UI", pad("1.2.3.2", "UI"))
            + ENC.header(0x7FE00010, "OW", len(pixel_data) if declared is None else declared) + pixel_data)


def deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    return path


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


def incoming(server) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(os.listdir(server.storage / ".incoming"))


def quarantined_reasons(server) -> list[str]:  # type: ignore[no-untyped-def]
    return [p.read_text() for p in sorted((server.storage / ".quarantine").glob("*.reason.txt"))]


def only_worker(server) -> int:  # type: ignore[no-untyped-def]
    (pid,) = server.worker_pids().values()
    return pid


def settle(server, fds_before: int) -> None:  # type: ignore[no-untyped-def]
    """Every association over: no temp file left, the worker's descriptors back where they were."""
    pid = only_worker(server)
    wait_until(lambda: incoming(server) == [] and open_fds(pid) <= fds_before, 20,
               what=f"empty .incoming ({incoming(server)}) and {fds_before} fds (now {open_fds(pid)})")


def baseline(server) -> int:  # type: ignore[no-untyped-def]
    """The worker's descriptors after one good store (lazy connections made)."""
    scu = RawSCU(server.port, CT, EXPLICIT)
    assert scu.store("1.2.3.100", dataset("1.2.3.100")) == dimse.SUCCESS
    scu.release()
    wait_until(lambda: incoming(server) == [], what="empty .incoming")
    time.sleep(0.3)
    return open_fds(only_worker(server))


# -- 1. deadlines ---------------------------------------------------------------------


def test_a_dripped_associate_request_ends_at_the_acse_deadline(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # One byte every 0.5 s never trips a 2 s per-read timeout; the request as a whole must.
    server = start_server(workers=1, config=config(tmp_path, "server:\n  acse_timeout: 2\n"))
    rq = associate_rq([(CT, [EXPLICIT])])
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        ended = None
        for byte in rq:
            try:
                sock.sendall(bytes((byte,)))
            except OSError:
                ended = time.monotonic() - started
                break
            if _readable(sock):  # an A-ABORT, or the close
                ended = time.monotonic() - started
                break
            time.sleep(0.5)
            if time.monotonic() - started > 10:
                break
    assert ended is not None and ended < 5, f"association request still open after {time.monotonic() - started:.1f} s"
    assert "A-ASSOCIATE-RQ not complete within server.acse_timeout" in server.wait_for_log("timed out")


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def test_a_dripped_data_set_is_aborted_at_the_minimum_rate(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = start_server(workers=1, config=config(
        tmp_path, "server:\n  dimse_timeout: 2\nlimits:\n  min_data_rate: 1000\n"))
    fds = baseline(server)
    scu = RawSCU(server.port, CT, EXPLICIT)
    data = dataset("1.2.3.4", bytes(4000))
    scu.begin_store("1.2.3.4")
    scu.send_data(data[:500], last=False)
    # A PDU announcing the rest, then one byte every 0.4 s: each read succeeds
    # well within dimse_timeout, the message never makes progress.
    rest = p_data(1, data[500:], command=False, last=True)
    started = time.monotonic()
    verdict = None
    for byte in rest:
        try:
            scu.sock.sendall(bytes((byte,)))
        except OSError:
            verdict = A_ABORT
            break
        if _readable(scu.sock):
            verdict = scu.ended_by_server(1)
            break
        time.sleep(0.4)
        if time.monotonic() - started > 12:
            break
    elapsed = time.monotonic() - started
    assert verdict is not None and elapsed < 8, f"still receiving after {elapsed:.1f} s"
    scu.close()
    assert "message slower than limits.min_data_rate" in server.wait_for_log("timed out, aborted")
    settle(server, fds)
    assert len(server.stored_files()) == 1  # the baseline's


# -- 2. bounded memory ---------------------------------------------------------------------


def test_command_fragments_never_marked_last_are_bounded(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(workers=1)
    fds = baseline(server)
    worker = only_worker(server)
    before = peak_rss_mib(worker)
    scu = RawSCU(server.port, CT, EXPLICIT)
    fragment = p_data(1, bytes(16384), command=True, last=False)
    sent = 0
    try:
        while sent < 32 * 1024 * 1024:
            scu.sock.sendall(fragment)
            sent += 16384
    except OSError:
        pass
    assert sent < 32 * 1024 * 1024, "the worker took 32 MiB of command fragments"
    assert scu.ended_by_server(5) in (A_ABORT, 0)
    scu.close()
    assert "command set longer than limits.max_command_set (65536)" in server.wait_for_log("limit exceeded")
    assert peak_rss_mib(worker) - before < 16
    settle(server, fds)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A deflated CT data set whose private OB value inflates to 128 MiB of zeros (~130 KB sent)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [packer.compress(dataset("1.2.3.5")[:-524])]  # without its Pixel Data
    out.append(packer.compress(ENC.header(0x00091010, "OB", 128 << 20)))
    zeros = bytes(1 << 20)
    for _ in range(128):
        out.append(packer.compress(zeros))
    out.append(packer.compress(ENC.header(0x7FE00010, "OW", 512) + bytes(512)))
    out.append(packer.flush())
    return b"".join(out)


@pytest.mark.parametrize("limits,reason", [
    ("limits:\n  max_object_size: 33554432\n", "inflates past 33554432 bytes"),
    ("", "header inflates past 67108864 bytes"),
], ids=["max_object_size", "default-limits"])
def test_a_deflate_bomb_costs_bounded_memory(start_server, tmp_path: Path, bomb: bytes,  # type: ignore[no-untyped-def]
                                            limits: str, reason: str) -> None:
    server = start_server(workers=1, config=config(tmp_path, limits or "{}\n"))
    fds = baseline(server)
    worker = only_worker(server)
    before = peak_rss_mib(worker)
    scu = RawSCU(server.port, CT, DEFLATED)
    assert scu.accepted
    status = scu.store("1.2.3.5", bomb)
    scu.release()
    # It inflates to 128 MiB: the worker's peak grows by the 64 MiB header cap at most.
    assert peak_rss_mib(worker) - before < 80, f"peak RSS {before:.0f} -> {peak_rss_mib(worker):.0f} MiB"
    assert status == dimse.CANNOT_UNDERSTAND
    (why,) = quarantined_reasons(server)
    assert reason in why
    settle(server, fds)
    assert len(server.stored_files()) == 1  # the baseline's


# -- 3. leaks on error paths --------------------------------------------------------------


def test_invalid_or_missing_uid_gets_a_failure_and_leaks_nothing(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(workers=1)
    fds = baseline(server)
    for attempt in range(30):
        scu = RawSCU(server.port, CT, EXPLICIT)
        uid = (b"1.2.3.\xe9" + str(attempt).encode(), None, b"1.2.x", b"1." * 40)[attempt % 4]
        scu.sock.sendall(p_data(1, store_command(CT, uid), command=True, last=True))
        scu.send_data(dataset(f"1.2.3.{attempt}"), last=True)
        assert scu.read_status() == dimse.INVALID_OBJECT_INSTANCE, uid
        scu.release()
    settle(server, fds)
    assert len(server.stored_files()) == 1  # the baseline's
    assert "internal error" not in server.log_text()


def test_a_new_command_while_a_data_set_arrives_orphans_nothing(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(workers=1)
    fds = baseline(server)
    for attempt in range(10):
        scu = RawSCU(server.port, CT, EXPLICIT)
        scu.begin_store(f"1.2.3.{attempt}")
        scu.send_data(dataset(f"1.2.3.{attempt}")[:300], last=False)
        scu.begin_store(f"1.2.4.{attempt}")
        scu.send_data(dataset(f"1.2.4.{attempt}"), last=True)
        assert scu.ended_by_server(10) == A_ABORT
        scu.close()
    assert "command set while a data set is still arriving" in server.wait_for_log("protocol error")
    settle(server, fds)
    assert len(server.stored_files()) == 1


def test_an_object_over_max_object_size_is_aborted_and_removed(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = start_server(workers=1, config=config(tmp_path, "limits:\n  max_object_size: 1048576\n"))
    fds = baseline(server)
    scu = RawSCU(server.port, CT, EXPLICIT)
    scu.begin_store("1.2.3.6")
    try:
        scu.send_data(dataset("1.2.3.6", bytes(2 << 20)), last=True)
    except OSError:
        pass
    assert scu.ended_by_server(10) in (A_ABORT, 0)
    scu.close()
    assert "data set larger than limits.max_object_size (1048576)" in server.wait_for_log("limit exceeded")
    settle(server, fds)
    assert len(server.stored_files()) == 1


# -- 4. large PDUs --------------------------------------------------------------------------


def test_max_pdu_size_0_takes_a_12_mb_store_in_one_pdu_from_pynetdicom(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = start_server("--max-pdu-size", "0", workers=1)
    (path,) = write_series(str(tmp_path / "big"), 1, rows=2048, columns=3072)
    ds = pydicom.dcmread(path)
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CT, EXPLICIT)
    assoc = associate(ae, "127.0.0.1", server.port, ae_title=server.ae_title, max_pdu=0)
    assert assoc.is_established
    # The server announced 0 ("no limit"): pynetdicom sends the data set as one PDU.
    assert assoc.acceptor.maximum_length == 0
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0
    (stored,) = server.stored_files()
    a, b = Path(path).read_bytes(), stored.read_bytes()
    assert a[-len(ds.PixelData):] == b[-len(ds.PixelData):] and len(b) > 12_000_000


def test_the_largest_associate_request_within_the_limits_is_accepted(start_server) -> None:  # type: ignore[no-untyped-def]
    """128 contexts of 32 transfer syntaxes with 64-character UIDs (~250 KB; negotiation.proposal_over_limits)."""
    server = start_server(workers=1)
    syntaxes = [EXPLICIT] + [f"1.2.826.0.1.3680043.9.9999.{i + 1}".ljust(64, "1") for i in range(31)]
    rq = associate_rq([(CT, syntaxes)] * 128)
    assert len(rq) > 240 * 1024
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(rq)
        answer = sock.recv(1)
    assert answer == b"\x02", "no A-ASSOCIATE-AC"
    dcmtk("echoscu", "-aec", server.ae_title, "127.0.0.1", str(server.port))


def test_an_associate_request_proposing_too_much_is_rejected_at_once(start_server) -> None:  # type: ignore[no-untyped-def]
    """30,000 presentation contexts in 540 KB: pynetdicom spent seconds of the worker's CPU on such a
    request (every other association of the worker waiting for its GIL) and accepted it. Now it is
    read whole (up to 1 MiB), then answered with an A-ASSOCIATE-RJ (permanent, local limit exceeded)
    before anything is decoded, and the log says why."""
    server = start_server(workers=1)
    rq = raw_associate_rq([((2 * i + 1) % 256, "1", ["1"]) for i in range(30_000)], aet="FLOOD")
    assert 512 * 1024 < len(rq) < 1024 * 1024
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(rq)
        answer = sock.recv(10, socket.MSG_WAITALL)
    assert answer == bytes([3, 0, 0, 0, 0, 4, 0, 1, 3, 2]), answer
    server.wait_for_log("local limit exceeded: more than 128 presentation contexts proposed")
    dcmtk("echoscu", "-aec", server.ae_title, "127.0.0.1", str(server.port))


# -- 5. no success for a malformed object ------------------------------------------------


@pytest.mark.parametrize("backend", ["cext", "py"])
def test_short_pixel_data_is_quarantined_not_acknowledged(start_server, backend: str) -> None:  # type: ignore[no-untyped-def]
    server = start_server(workers=1, env={"FASTSCP_NO_EXTENSIONS": "1"} if backend == "py" else {})
    scu = RawSCU(server.port, CT, EXPLICIT)
    # The object: Pixel Data declares 8,192 bytes and carries 4,192.
    assert scu.store("1.2.3.7", dataset("1.2.3.7", bytes(4192), declared=8192)) == dimse.CANNOT_UNDERSTAND
    scu.release()
    assert server.stored_files() == []
    (why,) = quarantined_reasons(server)
    assert why.startswith("1.2.3.7: value of (7FE0,0010)") and "(length 8192) runs past the end" in why
    (kept,) = (server.storage / ".quarantine").glob("*.dcm")
    assert kept.read_bytes().endswith(bytes(4192))


# -- the fuzz test -------------------------------------------------------------------------

FUZZ_RUNS = int(os.environ.get("FASTSCP_FUZZ_RUNS", "100"))
FUZZ_SEED = int(os.environ.get("FASTSCP_FUZZ_SEED", "11"))


def _session(uid: str) -> list[bytes]:
    """A valid session, PDU by PDU: associate, one C-STORE, release."""
    return [associate_rq([(CT, [EXPLICIT])]), p_data(1, store_command(CT, uid.encode()), command=True, last=True),
            p_data(1, dataset(uid, bytes(range(256)) * 2), command=False, last=True),
            struct.pack(">BxI", 0x05, 4) + bytes(4)]


def _mutate(rng: random.Random, pdus: list[bytes]) -> bytes:
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        pdus = _mutate_once(rng, pdus)
    return b"".join(pdus)


def _mutate_once(rng: random.Random, pdus: list[bytes]) -> list[bytes]:
    pdus = list(pdus)
    target = rng.randrange(len(pdus))
    data = bytearray(pdus[target]) or bytearray(rng.randbytes(8))  # an earlier mutation emptied it
    kind = rng.randrange(6)
    if kind == 0:  # flip bytes
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # a length field anywhere (PDU, PDV, element) gets a random value
        at = rng.randrange(max(len(data) - 4, 1))
        data[at : at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", rng.randbytes(4)])
    elif kind == 2:  # truncate
        del data[rng.randrange(len(data)) :]
    elif kind == 3:  # delete or insert a run
        at = rng.randrange(len(data))
        if rng.random() < 0.5:
            del data[at : at + rng.randint(1, 16)]
        else:
            data[at:at] = rng.randbytes(rng.randint(1, 16))
    elif kind == 4:  # repeat a PDU
        pdus.insert(target, bytes(data))
    else:  # data set element lengths: shrink or grow Pixel Data's declared length
        at = data.find(b"\xe0\x7f\x10\x00OW")
        if at >= 0:
            data[at + 8 : at + 12] = struct.pack("<I", rng.choice([0, 2, 510, 514, 4096, 0xFFFFFFFF]))
        else:
            data[rng.randrange(len(data))] = rng.randrange(256)
    pdus[target] = bytes(data)
    return pdus


def _run(port: int, session: bytes) -> list[tuple[int, bytes]]:
    """Send a session raw; return the PDUs the server sent back (bounded wait)."""
    out = []
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(session)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                data += chunk
        except OSError:  # reset by the server's abort, or our 5 s bound
            pass
    pos = 0
    while len(data) - pos >= 6:
        pdu_type, length = struct.unpack_from(">BxI", data, pos)
        if len(data) - pos - 6 < length:
            break  # cut off by the abort
        out.append((pdu_type, data[pos + 6 : pos + 6 + length]))
        pos += 6 + length
    return out


def _store_statuses(pdus: list[tuple[int, bytes]]) -> list[int]:
    """The C-STORE-RSP statuses among the server's PDUs (command fragments reassembled:
    a mutated Maximum Length Received can make the server fragment them)."""
    statuses, command = [], b""
    for pdu_type, body in pdus:
        pos = 0
        while pdu_type == 0x04 and len(body) - pos >= 6:
            length, control = struct.unpack_from(">I", body, pos)[0], body[pos + 5]
            fragment = body[pos + 6 : pos + 4 + length]
            pos += 4 + length
            if control & 1:
                command += fragment
                if control & 2:
                    decoded = dimse.decode_command_set(command)
                    command = b""
                    if decoded.get("CommandField") == dimse.C_STORE_RSP:
                        statuses.append(int(decoded["Status"]))
    return statuses


@pytest.mark.parametrize("backend", ["cext", "py"])
def test_fuzzed_sessions_leave_the_server_healthy(start_server, tmp_path: Path, backend: str) -> None:  # type: ignore[no-untyped-def]
    """Seeded mutations of a valid session (FASTSCP_FUZZ_RUNS, default 100; `make fuzz` runs more)."""
    server = start_server(workers=1, config=config(tmp_path, "server:\n  acse_timeout: 2\n  dimse_timeout: 2\n"),
                          env={"FASTSCP_NO_EXTENSIONS": "1"} if backend == "py" else {})
    fds = baseline(server)
    rng = random.Random(FUZZ_SEED)
    successes = 0
    for run in range(FUZZ_RUNS):
        uid = f"1.2.3.9.{run}"
        session = _session(uid)
        mutated = _mutate(rng, session)
        statuses = _store_statuses(_run(server.port, mutated))
        successes += statuses.count(dimse.SUCCESS)
    assert server.process.poll() is None
    dcmtk("echoscu", "-aec", server.ae_title, "127.0.0.1", str(server.port))
    settle(server, fds)
    assert "internal error" not in server.log_text()
    # Whatever was acknowledged is whole: pydicom reads every element of it,
    # and so does the other twin of the walk.
    from fastscp.dicom.walk import WalkerPy, walk_dataset  # here: this file also runs against the code before it

    stored = server.stored_files()
    for path in stored:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            ds.walk(lambda _ds, element: element.value)
        raw = path.read_bytes()
        walk_dataset(raw[dataset_offset(raw) :], str(ds.file_meta.TransferSyntaxUID), 1 << 30, WalkerPy)
    assert successes == len(stored) - 1
