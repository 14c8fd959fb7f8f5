"""Indexing from the files alone (fastscp/index/reindex.py), as a user finds it
in the index afterwards: ``fastscp reindex`` over leftovers of a killed run,
into a new folder, with structured reports inside the storage root; the
records reconcile makes (content hash, both UIDs); the progress line on a
pipe. Real files, real DuckDB, a real indexer thread."""

from __future__ import annotations

import io
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import blake3
import msgspec
import pydicom
import pytest

from fastscp.dicom.part10 import dataset_offset
from fastscp.dicom.synthetic import write_series
from fastscp.index.database import Index, IndexUnavailable
from fastscp.index.records import DuplicateConflict
from fastscp.index.reindex import Progress, plan, reindex
from fastscp.query.client import QueryClient
from fastscp.query.messages import QueryRequest
from tests.unit.index.test_index import RunningIndexer, make_storage, make_v4_index, records_of, rows, wait_until


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    return make_storage(tmp_path / "storage")


def _data_set_hash(path: Path) -> str:
    raw = path.read_bytes()
    return "blake3:" + blake3.blake3(raw[dataset_offset(raw):]).hexdigest()


def _indexed_paths(path: str) -> list[str]:
    index = Index(path, read_only=True)
    try:
        return sorted(row[0] for row in rows(index, "SELECT path FROM instances"))
    finally:
        index.close()


def test_reindex_after_a_killed_reindex_drops_what_that_one_left(storage: Path, tmp_path: Path) -> None:
    path = str(tmp_path / "index.duckdb")
    # A reindex killed half-way left its temp index, with the row of a file removed since.
    stale = Index(path + ".reindex")
    stale.add([msgspec.structs.replace(records_of(storage)[0], path="gone/file.dcm")])
    stale.close()
    result = reindex(str(storage), path, progress=io.StringIO())
    assert result.failed == [] and result.indexed == result.files
    assert _indexed_paths(path) == sorted(r.path for r in records_of(storage))
    assert not os.path.exists(path + ".reindex")


def test_reindex_of_an_index_whose_server_was_killed_leaves_no_old_log_beside_the_new_one(
        storage: Path, tmp_path: Path) -> None:
    path = str(tmp_path / "index.duckdb")
    # A server killed -9 leaves rows in the index's write-ahead log (here the row of a file removed since).
    code = ("import os, sys, msgspec\n"
            "from fastscp.index.database import Index\n"
            "from tests.unit.index.test_index import records_of\n"
            "from pathlib import Path\n"
            "index = Index(sys.argv[1])\n"
            "index.add([msgspec.structs.replace(records_of(Path(sys.argv[2]))[0], path='gone/file.dcm')])\n"
            "os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code, path, str(storage)], check=True, timeout=120)
    assert os.path.getsize(path + ".wal") > 0
    result = reindex(str(storage), path, progress=io.StringIO())
    assert not os.path.exists(path + ".wal")
    assert result.failed == [] and _indexed_paths(path) == sorted(r.path for r in records_of(storage))


def test_reindex_into_a_folder_not_made_yet_says_what_it_found(storage: Path, tmp_path: Path) -> None:
    path = str(tmp_path / "new" / "folder" / "index.duckdb")
    progress = io.StringIO()
    started = time.monotonic()
    result = reindex(str(storage), path, progress=progress, batch_size=4)
    assert 0 < result.seconds <= time.monotonic() - started  # `fastscp reindex` prints it
    assert result.failed == [] and result.indexed == result.files == len(records_of(storage))
    assert _indexed_paths(path) == sorted(r.path for r in records_of(storage))
    first, *_, last = progress.getvalue().splitlines()
    assert first.startswith(f"reindex: {result.files} files under {storage} (") and first.endswith(" s to list them)")
    listing = float(first.rsplit("(", 1)[1].split()[0])
    assert 0 <= listing <= result.seconds + 0.05  # rounded to a tenth
    # Batches end within the 5 s between lines on a pipe: the last line is drawn at the end all the same.
    assert last.startswith(f"indexed {result.files}/{result.files} files [{'#' * 24}] 100.0%")


@pytest.fixture
def odd_files(tmp_path: Path) -> Path:
    """A storage root: a file longer than the first read, one whose File Meta names another SOP Instance
    UID than its data set (kept as the C-STORE's Affected UID), one whose data set has none, one whose
    header alone is longer than the first read of a file (256 KiB), one longer than that without Pixel Data."""
    root = tmp_path / "odd"
    (big,) = write_series(str(root / "BIG"), 1, rows=512, columns=512)
    assert os.path.getsize(big) > 2 * 256 * 1024
    other, missing, huge = write_series(str(root / "UIDS"), 3, rows=8, columns=8, seed=2)
    ds = pydicom.dcmread(huge)  # a header longer than the first read: a big private value before Pixel Data
    ds.private_block(0x0009, "FASTSCP TEST", create=True).add_new(0x10, "OB", bytes(300 * 1024))
    ds.save_as(huge)
    (document,) = write_series(str(root / "DOC"), 1, rows=8, columns=8, seed=3)
    ds = pydicom.dcmread(document)  # no Pixel Data, a long value to the end: like an encapsulated PDF
    del ds.PixelData
    ds.EncapsulatedDocument = bytes(300 * 1024)
    ds.save_as(document)
    ds = pydicom.dcmread(other)
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.999"
    ds.file_meta.SourceApplicationEntityTitle = "MODALITY1"  # fastscp writes the calling AE title here
    ds.save_as(other)
    ds = pydicom.dcmread(missing)
    del ds.SOPInstanceUID
    ds.save_as(missing)
    return root


def _expected_rows(root: Path) -> list[tuple[str, str, str, str, str]]:
    """(path, SOP Instance UID, Affected SOP Instance UID if it differs, SHA-256 of the data set, calling AE
    title), from pydicom."""
    out = []
    for file in sorted(root.rglob("*.dcm")):
        ds = pydicom.dcmread(file, stop_before_pixels=True)
        meta_uid = str(ds.file_meta.MediaStorageSOPInstanceUID)
        uid = str(ds.get("SOPInstanceUID", "")) or meta_uid
        out.append((file.relative_to(root).as_posix(), uid, meta_uid if meta_uid != uid else "", _data_set_hash(file),
                    str(ds.file_meta.get("SourceApplicationEntityTitle", ""))))
    return out


def test_records_from_files_carry_both_uids_and_the_data_set_hash(odd_files: Path, tmp_path: Path) -> None:
    expected = _expected_rows(odd_files)
    assert {r[2] for r in expected} == {"", "1.2.3.999"} and {r[4] for r in expected} == {"", "MODALITY1"}
    assert len(expected) == 5
    # fastscp reindex ...
    path = str(tmp_path / "reindexed.duckdb")
    result = reindex(str(odd_files), path, progress=io.StringIO())
    assert result.failed == [] and result.indexed == 5
    index = Index(path, read_only=True)
    sql = ("SELECT path, sop_instance_uid, affected_sop_instance_uid, content_hash, calling_ae_title FROM instances "
           "ORDER BY path")
    assert rows(index, sql) == expected
    index.close()
    # ... and the indexer's reconcile on start give the same rows, hash included.
    path = str(tmp_path / "reconciled.duckdb")
    running = RunningIndexer(path, odd_files)
    try:
        queries = QueryClient(path)
        wait_until(lambda: queries.stats().indexer.reconcile == "done")  # type: ignore[union-attr]
        keys = ["Path", "SOPInstanceUID", "ContentHash"]
        with queries.query(QueryRequest(level="IMAGE", keys=keys)) as result:
            assert sorted(tuple(row) for row in result) == [(p, uid, digest) for p, uid, _, digest, _ae in expected]
    finally:
        running.stop()


def test_structured_reports_inside_the_storage_root_are_found_once(storage: Path, tmp_path: Path) -> None:
    sr_root = storage / "SR"  # storage.sr_directory inside the root: walked with it, relative paths
    sr_root.mkdir()
    shutil.copyfile(storage / "SYNA" / "CT00001.dcm", sr_root / "report.dcm")
    found = [state.path for state in plan(str(storage), {}, sr_root=str(sr_root)).missing]
    assert sorted(found) == sorted(r.path for r in records_of(storage))
    assert found.count("SR/report.dcm") == 1
    path = str(tmp_path / "index.duckdb")
    result = reindex(str(storage), path, sr_root=str(sr_root), progress=io.StringIO())
    assert result.files == result.indexed == len(found)
    assert _indexed_paths(path) == sorted(found)


def test_the_progress_line_on_a_terminal_is_redrawn_in_place() -> None:
    controller, terminal = os.openpty()
    with os.fdopen(controller, "rb", buffering=0) as reader, open(terminal, "w") as stream:
        bar = Progress(10, stream)
        bar.advance(4)
        bar.advance(6)  # drawn too if 0.1 s have passed
        bar.finish()
        out = b""
        while not out.endswith(b"\n") and select.select([reader], [], [], 5)[0]:
            out += reader.read(4096)
    # Carriage return, the line, erase to its end; a newline only when done (the terminal makes it \r\n).
    before, *lines, end = out.decode().split("\r")
    assert (before, end) == ("", "\n") and all(line.endswith("\x1b[K") for line in lines)
    assert lines[0].startswith("indexed 4/10 files [#########") and lines[-1].startswith("indexed 10/10 files [")


def test_the_progress_line_reaches_a_pipe_when_drawn_not_at_the_end() -> None:
    read_end, write_end = os.pipe()
    with os.fdopen(read_end, "rb") as reader, open(write_end, "w", buffering=1 << 16) as stream:
        bar = Progress(10, stream)
        bar.advance(4)  # the first advance draws at once; later ones every 5 s on a pipe
        assert select.select([reader], [], [], 5)[0], "the line is still in the writer's buffer"
        assert os.read(read_end, 4096).decode().startswith("indexed 4/10 files [#########")
        bar.advance(6)
        bar.finish()
        stream.close()
        # The second advance came within 5 s: not drawn; the end is, once.
        (last,) = reader.read().decode().splitlines()
        assert last.startswith("indexed 10/10 files [########################] 100.0%")


@pytest.mark.parametrize("total", [3, 7201, 20_000_001])  # seconds, hours, days (h = s // 3600 even then)
def test_the_eta_is_what_is_left_at_the_rate_so_far(total: int) -> None:
    before = time.monotonic()
    bar = Progress(total, io.StringIO())
    after = time.monotonic()
    time.sleep(1.0)
    bar.advance(1)
    line_from = time.monotonic()
    line = bar.line()
    line_to = time.monotonic()
    h, m, s = map(int, line.rsplit("ETA ", 1)[1].split(":"))
    # total - 1 files left at 1 file per `elapsed` seconds, as h:mm:ss rounded to the second.
    left = total - 1
    assert int(left * (line_from - after) + 0.5) <= 3600 * h + 60 * m + s <= int(left * (line_to - before) + 0.5), line
    assert m < 60 and s < 60
    assert line.startswith(f"indexed 1/{total} files [")


def test_an_unreadable_old_index_is_replaced_and_one_in_use_is_not(storage: Path, tmp_path: Path) -> None:
    path = str(tmp_path / "index.duckdb")
    Path(path).write_bytes(b"not an index" * 1000)
    result = reindex(str(storage), path, progress=io.StringIO())
    assert result.failed == [] and _indexed_paths(path) == sorted(r.path for r in records_of(storage))
    # Another process has it open (a server): refused, the index left as it is.
    with subprocess.Popen([sys.executable, "-c", "import sys, time; from fastscp.index.database import Index; "
                           "index = Index(sys.argv[1]); print('open', flush=True); time.sleep(120)", path],
                          stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "open\n"
            with pytest.raises(IndexUnavailable, match="another process"):
                reindex(str(storage), path, progress=io.StringIO())
        finally:
            holder.kill()
    assert not os.path.exists(path + ".reindex")
    assert _indexed_paths(path) == sorted(r.path for r in records_of(storage))


def test_symbolic_links_are_not_followed(storage: Path, tmp_path: Path) -> None:
    # Links inside the storage root to files and folders elsewhere are no stored instances.
    outside = tmp_path / "elsewhere"
    shutil.copytree(storage / "SYNA", outside)
    (storage / "SYNA" / "linked.dcm").symlink_to(outside / "CT00001.dcm")
    (storage / "linked-folder").symlink_to(outside, target_is_directory=True)
    expected = sorted(p.relative_to(storage).as_posix() for p in storage.rglob("*.dcm")
                      if not p.is_symlink() and p.parts[len(storage.parts)] not in {".incoming", ".quarantine",
                                                                                      "thumbnails", "linked-folder"})
    assert sorted(state.path for state in plan(str(storage), {}).missing) == expected
    path = str(tmp_path / "index.duckdb")
    reindex(str(storage), path, progress=io.StringIO())
    assert _indexed_paths(path) == expected


def _old_index_with_a_conflict(path: str, outcome: str, records: list) -> None:  # type: ignore[type-arg]
    """An index holding ``records`` and one duplicate conflict (a log the files can't rebuild)."""
    conflict = DuplicateConflict(sop_instance_uid="1.2", path="a.dcm", existing_hash="e", new_hash="n",
                                 policy="x", outcome=outcome, new_path="", calling_ae_title="X", received_at=1.0)
    old = Index(path)
    old.add(records, [conflict])
    old.close()


def test_the_conflicts_of_an_index_of_an_older_schema_are_carried_over(storage: Path, tmp_path: Path) -> None:
    path = str(tmp_path / "index.duckdb")
    _old_index_with_a_conflict(path, "kept-first", [])
    make_v4_index(path, records_of(storage))
    reindex(str(storage), path, progress=io.StringIO())
    index = Index(path, read_only=True)
    assert rows(index, "SELECT sop_instance_uid, existing_hash, new_hash, outcome FROM duplicate_conflicts") == [
        ("1.2", "e", "n", "kept-first")]
    index.close()


def test_reindex_while_another_process_reads_the_old_index(storage: Path, tmp_path: Path) -> None:
    # `fastscp query` on a stopped server's index opens it read-only: reindex reads it alongside (for its
    # conflicts) and replaces it.
    path = str(tmp_path / "index.duckdb")
    _old_index_with_a_conflict(path, "rejected", records_of(storage)[:2])
    with subprocess.Popen([sys.executable, "-c", "import sys, time; from fastscp.index.database import Index; "
                           "index = Index(sys.argv[1], read_only=True); print('open', flush=True); "
                           "time.sleep(120)", path], stdout=subprocess.PIPE, text=True) as reader:
        try:
            assert reader.stdout is not None and reader.stdout.readline() == "open\n"
            result = reindex(str(storage), path, progress=io.StringIO())
        finally:
            reader.kill()
    assert result.failed == [] and _indexed_paths(path) == sorted(r.path for r in records_of(storage))
    index = Index(path, read_only=True)
    assert rows(index, "SELECT sop_instance_uid, outcome FROM duplicate_conflicts") == [("1.2", "rejected")]
    index.close()


def test_a_file_cut_short_inside_a_long_header_is_reported_not_indexed(odd_files: Path, tmp_path: Path) -> None:
    (huge,) = [p for p in odd_files.rglob("*.dcm") if p.stat().st_size > 300 * 1024 and "UIDS" in p.parts]
    huge.write_bytes(huge.read_bytes()[:290 * 1024])  # inside the private value, past the first read
    result = reindex(str(odd_files), str(tmp_path / "index.duckdb"), progress=io.StringIO())
    assert result.indexed == 4
    ((path, reason),) = result.failed
    # What `fastscp reindex` prints: the element and why, not that the first read was short.
    assert path == huge.relative_to(odd_files).as_posix()
    assert re.fullmatch(r"value of \(0009,1010\) at byte offset \d+ \(length 307200\) runs past the end of the data "
                        r"\(\d+ bytes\)", reason), reason
