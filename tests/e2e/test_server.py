"""End-to-end: a real fastscp server, real dcmtk and pynetdicom clients, real files."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE

from fastscp.dicom.part10 import dataset_offset
from fastscp.dicom.synthetic import write_series
from fastscp.net.scu import associate
from tests.conftest import dcmtk, storescu_concurrently, wait_until
from tests.rawscu import RawSCU

pytestmark = pytest.mark.dcmtk


def by_instance(paths: list[Path]) -> dict[str, Path]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID): p for p in paths}


def assert_same_dataset(source: Path, stored: Path) -> None:
    a, b = source.read_bytes(), stored.read_bytes()
    assert a[dataset_offset(a):] == b[dataset_offset(b):], f"{stored} differs from {source}"


def open_files(pid: int) -> set[str]:
    fd_dir = Path(f"/proc/{pid}/fd")
    return {os.readlink(fd_dir / fd) for fd in os.listdir(fd_dir)}


def fastscp(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastscp.cli", *argv], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory) -> list[Path]:  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("ct")
    return [Path(p) for p in write_series(str(folder), 24, rows=256, columns=256)]


def test_echo_with_dcmtk_and_fastscp_echo(server) -> None:  # type: ignore[no-untyped-def]
    dcmtk("echoscu", "-aec", server.ae_title, "127.0.0.1", str(server.port))
    result = fastscp("echo", "127.0.0.1", str(server.port), "--aec", server.ae_title)
    assert result.returncode == 0, result.stderr
    assert "status 0x0000" in result.stdout
    wait_until(lambda: "ECHOSCU (127.0.0.1:" in server.log_text(), what="the connection log line")


def test_storescu_series_is_stored_byte_exact_and_indexed(server, ct_series) -> None:  # type: ignore[no-untyped-def]
    dcmtk("storescu", "-aec", server.ae_title, "-xe", "127.0.0.1", str(server.port), *map(str, ct_series))
    stored = by_instance(server.stored_files())
    sources = by_instance(ct_series)
    assert stored.keys() == sources.keys()
    for uid, path in sources.items():
        assert_same_dataset(path, stored[uid])
        meta = pydicom.dcmread(stored[uid], stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert meta.SourceApplicationEntityTitle == "STORESCU"
    log = server.wait_for_log("STORESCU (127.0.0.1:", f"{len(ct_series)} instances (0 failed, 0 duplicates)")
    # Only the indexer process has the DuckDB file open; workers never do.
    holders = {pid for pid in server.children() if str(server.index) in open_files(pid)}
    (indexer_pid,) = re.findall(r"indexer started \(pid (\d+)\)", log)
    assert holders == {int(indexer_pid)}
    assert server.stop() == 0
    con = duckdb.connect(str(server.index), read_only=True)
    rows = con.execute(
        "SELECT sop_instance_uid, patient_id, modality, study_instance_uid, calling_ae_title, size,"
        " transfer_syntax_uid, path FROM instances"
    ).fetchall()
    assert sorted(r[0] for r in rows) == sorted(sources)
    for uid, patient, modality, study, calling, size, syntax, path in rows:
        assert (patient, modality, calling, syntax) == ("SYN0001", "CT", "STORESCU", ExplicitVRLittleEndian)
        assert size == stored[uid].stat().st_size
        assert server.storage / path == stored[uid]
        assert study == pydicom.dcmread(sources[uid], stop_before_pixels=True).StudyInstanceUID


def test_dcmtk_default_nagle_sender_does_not_stall(server, ct_series) -> None:  # type: ignore[no-untyped-def]
    # storescu without TCP_NODELAY=1 keeps Nagle on: an SCP without
    # TCP_QUICKACK stalls ~40 ms per image. No timing assertion here (see
    # bench/); every file must arrive, and the supervisor must set the options.
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    subprocess.run(["storescu", "-aec", server.ae_title, "127.0.0.1", str(server.port), *map(str, ct_series)],
                   check=True, env=env, capture_output=True, timeout=120)
    assert len(server.stored_files()) == len(ct_series)


def test_eight_concurrent_storescu_associations(server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    batches = [write_series(str(tmp_path / f"s{i}"), 6, rows=128, columns=128, seed=i, patient_id=f"P{i}")
               for i in range(8)]
    storescu_concurrently(server, batches, "-xe")
    stored = by_instance(server.stored_files())
    sources = by_instance([Path(p) for batch in batches for p in batch])
    assert stored.keys() == sources.keys()
    for uid, path in sources.items():
        assert_same_dataset(path, stored[uid])


def _associate(port: int, aec: str, aet: str):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    return associate(ae, "127.0.0.1", port, ae_title=aec)


def test_max_associations_holds_across_workers(start_server, ct_series) -> None:  # type: ignore[no-untyped-def]
    server = start_server("--max-associations", "2", workers=2)
    first = _associate(server.port, server.ae_title, "FIRST")
    second = _associate(server.port, server.ae_title, "SECOND")
    assert first.is_established and second.is_established
    third = RawSCU(server.port, CTImageStorage, ExplicitVRLittleEndian, aet="THIRD", aec=server.ae_title)
    # Rejected transient, service provider (presentation), local limit exceeded.
    assert third.rejection == (2, 3, 2)
    for assoc, path in ((first, ct_series[0]), (second, ct_series[1])):
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
        assoc.release()
    assert len(server.stored_files()) == 2
    wait_until(lambda: "THIRD (127.0.0.1:" in server.log_text(), what="the rejection log line")
    assert "local limit exceeded" in server.log_text()
    # The slots come back when associations end.
    deadline = time.monotonic() + 10
    while True:
        fourth = _associate(server.port, server.ae_title, "FOURTH")
        if fourth.is_established or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert fourth.is_established
    fourth.release()


def test_store_scp_console_script_with_accept_list(tmp_path, ct_series) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import wait_for_port

    log = tmp_path / "store_scp.log"
    script = Path(sys.executable).parent / "store_scp"
    with open(log, "w") as out:
        process = subprocess.Popen(  # port 0: it binds one, and logs it
            [str(script), "0", "MY_PACS", "--storage-dir", str(tmp_path / "received"),
             "--index-db", str(tmp_path / "pacs.db"), "--accept", "CT,MR,US", "--host", "127.0.0.1",
             "--monitor", "off"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        port = wait_for_port(0, process, log)
        ae = AE(ae_title="SENDER")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
        assoc = associate(ae, "127.0.0.1", port, ae_title="MY_PACS")
        assert assoc.is_established
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        assert accepted == {CTImageStorage}, "Secondary Capture is not in CT,MR,US"
        assert assoc.send_c_store(pydicom.dcmread(ct_series[0])).Status == 0
        assoc.release()
        assert (tmp_path / "pacs.db").exists()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0


def test_unparseable_dataset_gets_cannot_understand_and_is_quarantined(server) -> None:  # type: ignore[no-untyped-def]
    scu = RawSCU(server.port, CTImageStorage, ExplicitVRLittleEndian)
    assert scu.accepted
    # An element whose length runs far past the end of the data set.
    garbage = b"\x08\x00\x18\x00UI\xff\x7f" + b"1.2.3" * 10
    status = scu.store("1.2.3.4.5", garbage)
    assert status == 0xC000  # Cannot understand, as the README promises
    # The association and the server carry on.
    good = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    raw = Path(pydicom.data.get_testdata_file("CT_small.dcm")).read_bytes()
    assert scu.store(good.SOPInstanceUID, raw[dataset_offset(raw):]) == 0
    scu.release()
    assert [p.name for p in server.stored_files()] == [f"{good.SOPInstanceUID}.dcm"]
    quarantined = list((server.storage / ".quarantine").glob("*.dcm"))
    assert len(quarantined) == 1 and quarantined[0].read_bytes().endswith(garbage)
    reason = Path(f"{quarantined[0]}.reason.txt").read_text()
    assert reason.startswith("1.2.3.4.5: ") and reason.endswith("\n")
    # The empty temp file kept ready for a next C-STORE goes when the association ends.
    wait_until(lambda: list((server.storage / ".incoming").iterdir()) == [], what="an empty .incoming")


def test_peer_vanishing_mid_dataset_leaves_no_file(server) -> None:  # type: ignore[no-untyped-def]
    scu = RawSCU(server.port, CTImageStorage, ExplicitVRLittleEndian)
    scu.begin_store("1.2.3.4.6")
    scu.send_data(b"\x08\x00\x16\x00UI\x1a\x00" + b"1.2.840.10008.5.1.4.1.1.2\x00", last=False)
    scu.close()
    deadline = time.monotonic() + 10
    while "1 instances" not in server.log_text() and "0 instances" not in server.log_text():
        assert time.monotonic() < deadline, server.log_text()
        time.sleep(0.05)
    assert server.stored_files() == []
    assert list((server.storage / ".incoming").iterdir()) == []


def test_a_response_the_reactor_takes_goes_back_to_the_sender(server) -> None:  # type: ignore[no-untyped-def]
    # pynetdicom's reactor thread may take a response meant for a send_c_*()
    # (its pause races); fastscp.net.scu.associate puts it back on the queue.
    from pynetdicom.dimse_primitives import C_ECHO
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    assoc = associate(ae, "127.0.0.1", server.port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        response = C_ECHO()
        response.MessageIDBeingRespondedTo, response.AffectedSOPClassUID, response.Status = 7, Verification, 0
        assoc._serve_request(response, 1)  # what the reactor does with a message it takes
        assert assoc.dimse.get_msg(block=False) == (1, response)
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()


def test_quarantine_false_keeps_no_unparseable_data_set(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "fastscp.yaml"
    config.write_text("storage:\n  quarantine: false\n")
    server = start_server(config=config)
    scu = RawSCU(server.port, CTImageStorage, ExplicitVRLittleEndian)
    assert scu.store("1.2.3.4.5", b"\x08\x00\x18\x00UI\xff\x7f" + b"1.2.3" * 10) == 0xC000
    scu.release()
    assert server.stored_files() == []
    assert list((server.storage / ".quarantine").iterdir()) == []
    wait_until(lambda: list((server.storage / ".incoming").iterdir()) == [], what="an empty .incoming")
