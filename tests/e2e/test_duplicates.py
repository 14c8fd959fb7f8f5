"""Resends and conflicting resends with dcmtk storescu, for every storage.duplicates
policy; other instances that a layout names alike; the same instance under another
layout name; structured reports in their own root; two associations into one new study."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import duckdb
import pydicom
import pytest
from pydicom.uid import generate_uid

from fastscp.dicom.part10 import dataset_offset
from fastscp.dicom.synthetic import write_series
from fastscp.query.client import QueryClient
from fastscp.query.messages import QueryRequest
from fastscp.storage.area import dataset_hash
from tests.conftest import dcmtk, storescu_concurrently, wait_until
from tests.e2e.test_server import assert_same_dataset, by_instance
from tests.rawscu import RawSCU

pytestmark = pytest.mark.dcmtk


@pytest.fixture
def original_and_conflict(tmp_path: Path) -> tuple[Path, Path]:
    (original,) = write_series(str(tmp_path / "a"), 1, rows=64, columns=64)
    ds = pydicom.dcmread(original)
    ds.PixelData = bytes(len(ds.PixelData))  # other pixels, same SOP Instance UID
    conflict = tmp_path / "conflict.dcm"
    ds.save_as(conflict, enforce_file_format=True)
    return Path(original), conflict


def storescu(server, *files: Path | str, check: bool = True) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    options = [str(f) for f in files if str(f).startswith("-")]
    paths = [str(f) for f in files if not str(f).startswith("-")]
    return dcmtk("storescu", "-aec", server.ae_title, "-xe", *options, "127.0.0.1", str(server.port), *paths,
                 check=check)


def only_file(server) -> Path:  # type: ignore[no-untyped-def]
    (path,) = server.stored_files()
    return path


@pytest.mark.parametrize("policy", ["reject", "keep-first", "overwrite", "keep-both"])
def test_duplicate_policies(start_server, original_and_conflict, policy: str) -> None:  # type: ignore[no-untyped-def]
    original, conflict = original_and_conflict
    server = start_server("--duplicates", policy)
    storescu(server, original)
    stored = only_file(server)
    inode, mtime = stored.stat().st_ino, stored.stat().st_mtime_ns

    # A byte-identical resend: success, not rewritten, counted.
    storescu(server, original)
    assert server.stored_files() == [stored]
    assert (stored.stat().st_ino, stored.stat().st_mtime_ns) == (inode, mtime)
    wait_until(lambda: "1 instances (0 failed, 1 duplicates)" in server.log_text(), what="the resend's log line")

    # Other content under the same SOP Instance UID.
    result = storescu(server, conflict, "-v", check=False)
    wait_until(lambda: server.log_text().count("association STORESCU") == 3, what="the conflict's log line")
    log = server.log_text()
    assert "differs from the stored copy" in log and f"storage.duplicates={policy}" in log
    files = server.stored_files()
    if policy == "reject":
        assert result.returncode != 0 and "Status: 0x111" in (result.stdout + result.stderr)
        assert files == [stored]
        assert_same_dataset(original, stored)
    elif policy == "keep-first":
        assert result.returncode == 0
        assert files == [stored]
        assert_same_dataset(original, stored)
    elif policy == "overwrite":
        assert result.returncode == 0
        assert files == [stored]
        assert_same_dataset(conflict, stored)
    else:
        assert result.returncode == 0
        version = stored.with_name(stored.stem + ".v2.dcm")
        assert files == sorted([stored, version])
        assert_same_dataset(original, stored)
        assert_same_dataset(conflict, version)
    assert list((server.storage / ".incoming").iterdir()) == []
    assert server.stop() == 0
    # The conflict is in the index with both hashes; the instance row is the file's.
    con = duckdb.connect(str(server.index), read_only=True)
    ((existing, new, recorded_policy, outcome, path),) = con.execute(
        "SELECT existing_hash, new_hash, policy, outcome, path FROM duplicate_conflicts").fetchall()
    assert (existing, new) == (dataset_hash(str(original)), dataset_hash(str(conflict)))
    assert recorded_policy == policy and outcome == {"reject": "rejected", "keep-first": "kept-first",
                                                     "overwrite": "overwritten", "keep-both": "kept-both"}[policy]
    assert server.storage / path == stored
    rows = dict(con.execute("SELECT path, content_hash FROM instances").fetchall())
    assert {server.storage / p: h for p, h in rows.items()} == {f: dataset_hash(str(f)) for f in server.stored_files()}


def test_structured_reports_go_to_their_own_root(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sr_root = tmp_path / "reports"
    server = start_server("--config", str(_config(tmp_path, f"storage:\n  sr_directory: {sr_root}\n")))
    sr = Path(pydicom.data.get_testdata_file("test-SR.dcm"))
    (ct,) = map(Path, write_series(str(tmp_path / "ct"), 1, rows=64, columns=64))
    dcmtk("storescu", "-aec", server.ae_title, "-R", "-xe", "127.0.0.1", str(server.port), str(sr), str(ct))
    (report,) = list(sr_root.rglob("*.dcm"))
    assert_same_dataset(sr, report)
    (image,) = server.stored_files()
    assert_same_dataset(ct, image)


POLICIES = ["reject", "keep-first", "overwrite", "keep-both"]
#: Names instances by their numbers only: two instances can get one name.
BY_NUMBER = "{PatientID}/{SeriesNumber:03}/{InstanceNumber:04}.dcm"


@pytest.fixture
def two_instances_one_name(tmp_path: Path) -> tuple[Path, Path]:
    """Two instances with the same Patient ID, Series and Instance Number, other SOP Instance UIDs."""
    (first,) = map(Path, write_series(str(tmp_path / "a"), 1, rows=64, columns=64))
    ds = pydicom.dcmread(first)
    ds.SOPInstanceUID = generate_uid()
    ds.PixelData = bytes(len(ds.PixelData))
    second = tmp_path / "second.dcm"
    ds.save_as(second, enforce_file_format=True)
    return first, second


@pytest.mark.parametrize(("naming", "policy"), [*(("template", p) for p in POLICIES), ("accounts", "reject")])
def test_another_instance_under_a_taken_name_is_stored_under_its_own(  # type: ignore[no-untyped-def]
        start_server, tmp_path: Path, two_instances_one_name, naming: str, policy: str) -> None:
    first, second = two_instances_one_name
    server = start_server("--duplicates", policy, "--naming", naming,
                          config=_config(tmp_path, f"storage:\n  template: \"{BY_NUMBER}\"\n"))
    storescu(server, first)
    storescu(server, second)  # succeeds: it is not a duplicate, whatever the policy
    taken = only_file_named(server, "0001.dcm" if naming == "template" else "001-000-000001.dcm")
    uid = str(pydicom.dcmread(second, stop_before_pixels=True).SOPInstanceUID)
    files = server.stored_files()
    assert taken in files and len(files) == 2, files
    (own,) = set(files) - {taken}
    assert own.parent == taken.parent and own.suffix == ".dcm"
    assert re.fullmatch(re.escape(taken.stem) + r"\.u[0-9a-f]{10}", own.stem), own.name
    assert_same_dataset(first, taken)
    assert_same_dataset(second, own)
    log = server.wait_for_log("holds another instance")
    assert "differs from the stored copy" not in log
    # The line names both instances and both files (Committed.collided_path, .collided_uid).
    (line,) = [line for line in log.splitlines() if "holds another instance" in line]
    first_uid = str(pydicom.dcmread(first, stop_before_pixels=True).SOPInstanceUID)
    relative = {p: p.relative_to(server.storage).as_posix() for p in (taken, own)}
    assert (f"C-STORE {uid!r}" in line and f"{relative[taken]} holds another instance (SOP Instance UID "
            f"{first_uid!r}); stored as " in line and line.endswith(relative[own])), line
    # A resend of either finds its own file: identical, nothing new.
    storescu(server, second)
    storescu(server, first)
    wait_until(lambda: server.log_text().count("1 instances (0 failed, 1 duplicates)") == 2, what="the resends")
    assert server.stored_files() == sorted([taken, own])
    # The second's resend met the first at the taken name again: its line names the same file and instance.
    lines = [line for line in server.log_text().splitlines() if "holds another instance" in line]
    assert len(lines) == 2 and all(f"{relative[taken]} holds another instance (SOP Instance UID {first_uid!r}); "
                                   f"stored as {relative[own]}" in line for line in lines), lines
    assert server.stop() == 0
    con = duckdb.connect(str(server.index), read_only=True)
    rows = dict(con.execute("SELECT path, sop_instance_uid FROM instances").fetchall())
    assert rows == {taken.relative_to(server.storage).as_posix(): str(pydicom.dcmread(first).SOPInstanceUID),
                    own.relative_to(server.storage).as_posix(): uid}
    assert con.execute("SELECT count(*) FROM duplicate_conflicts").fetchall() == [(0,)]


def only_file_named(server, name: str) -> Path:  # type: ignore[no-untyped-def]
    (path,) = [p for p in server.stored_files() if p.name == name]
    return path


def indexed(server) -> int:  # type: ignore[no-untyped-def]
    """Instances the running server's index has committed (so its indexer knows them)."""
    with QueryClient(str(server.index)).query(QueryRequest(level="IMAGE", keys=["Path"], ordered=False)) as result:
        return len(list(result))


@pytest.mark.parametrize("policy", POLICIES)
def test_the_same_instance_under_another_layout_name_is_a_duplicate(  # type: ignore[no-untyped-def]
        start_server, tmp_path: Path, original_and_conflict, policy: str) -> None:
    original, conflict = original_and_conflict
    # The sender corrected the Patient ID (and changed the pixels): the layout names it elsewhere.
    ds = pydicom.dcmread(conflict)
    ds.PatientID = "CORRECTED"
    ds.save_as(conflict, enforce_file_format=True)
    server = start_server("--duplicates", policy, "--naming", "template",
                          config=_config(tmp_path, 'storage:\n  template: "{PatientID}/{SOPInstanceUID}.dcm"\n'))
    storescu(server, original)
    stored = only_file(server)
    wait_until(lambda: indexed(server) == 1, what="the first copy in the index")
    result = storescu(server, conflict, "-v", check=False)
    log = server.wait_for_log("differs from the stored copy", f"storage.duplicates={policy}")
    assert "holds another instance" not in log
    files = server.stored_files()
    if policy == "reject":
        assert result.returncode != 0 and "Status: 0x111" in (result.stdout + result.stderr)
    else:
        assert result.returncode == 0, result.stdout + result.stderr
    if policy == "keep-both":
        moved = server.storage / "CORRECTED" / stored.name
        assert files == sorted([stored, moved])
        assert_same_dataset(original, stored)
        assert_same_dataset(conflict, moved)
    else:
        assert files == [stored], "no second copy under the new name"
        assert_same_dataset(conflict if policy == "overwrite" else original, stored)


@pytest.mark.parametrize("policy", POLICIES)
def test_an_instance_is_found_by_the_command_uid_and_the_data_set_uid(  # type: ignore[no-untyped-def]
        start_server, tmp_path: Path, policy: str) -> None:
    """The sender's command names the instance X, its data set says Y: a resend under Y is the same
    instance, and the same bytes: acknowledged, not stored again, whatever the policy."""
    server = start_server("--duplicates", policy)
    (path,) = write_series(str(tmp_path / "ct"), 1, rows=32, columns=32)
    ds = pydicom.dcmread(path)
    raw = Path(path).read_bytes()
    data, dataset_uid = raw[dataset_offset(raw):], str(ds.SOPInstanceUID)
    command_uid = generate_uid()
    scu = RawSCU(server.port, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
    assert scu.store(command_uid, data) == 0
    wait_until(lambda: indexed(server) == 1, what="the first copy in the index")
    assert scu.store(dataset_uid, data) == 0  # named by its data set's UID this time: another path
    scu.release()
    (stored,) = server.stored_files()
    assert pydicom.dcmread(stored).file_meta.MediaStorageSOPInstanceUID == command_uid
    server.wait_for_log("1 duplicates)")
    assert server.stop() == 0
    con = duckdb.connect(str(server.index), read_only=True)
    assert con.execute("SELECT sop_instance_uid, affected_sop_instance_uid FROM instances").fetchall() == [
        (dataset_uid, command_uid)]


def test_stores_do_not_wait_for_busy_query_threads(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Clients holding every query thread (here: connected, silent) must not delay the
    C-STORE's "where is this instance?" question to the indexer."""
    import socket
    import time

    from fastscp.query.messages import query_address
    from fastscp.query.server import QUERY_THREADS

    idle = []
    for _ in range(QUERY_THREADS + 1):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(query_address(str(server.index)))
        idle.append(sock)
    try:
        (path,) = write_series(str(tmp_path / "ct"), 1, rows=32, columns=32)
        ds = pydicom.dcmread(path)
        raw = Path(path).read_bytes()
        scu = RawSCU(server.port, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        started = time.monotonic()
        assert scu.store(str(ds.SOPInstanceUID), raw[dataset_offset(raw):]) == 0
        assert time.monotonic() - started < 1.5, "the store waited for a query thread"
        scu.release()
    finally:
        for sock in idle:
            sock.close()
    assert "can't say where SOP instances are stored" not in server.log_text()


def test_default_policy_keeps_the_first_copy_and_answers_success(  # type: ignore[no-untyped-def]
        server, original_and_conflict) -> None:
    original, conflict = original_and_conflict
    storescu(server, original)
    stored = only_file(server)
    result = storescu(server, conflict, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert server.stored_files() == [stored]
    assert_same_dataset(original, stored)
    server.wait_for_log("differs from the stored copy", "storage.duplicates=keep-first: kept-first")


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fastscp.yaml"
    path.write_text(text)
    return path


def test_two_associations_into_one_new_study_at_once(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    series = write_series(str(tmp_path / "one"), 40, rows=64, columns=64)
    storescu_concurrently(server, [series[0::2], series[1::2]], "-xe")
    stored = by_instance(server.stored_files())
    sources = by_instance([Path(p) for p in series])
    assert stored.keys() == sources.keys()
    assert len({p.parent for p in stored.values()}) == 1, "one series folder"
    for uid, source in sources.items():
        assert_same_dataset(source, stored[uid])
