"""The index of a real server: no record lost to kill -9, queries while running and stopped, reindex.

Each test runs ``fastscp serve`` (tests/conftest.py) and sends real files with
dcmtk's storescu; "the index equals the files" compares every stored file's
path and size with the index's rows.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fastscp.cli import index as cli_index
from fastscp.dicom.synthetic import write_series
from fastscp.index.database import SCHEMA_VERSION, Index
from fastscp.query.client import LocalQueryClient, QueryClient
from fastscp.query.messages import QueryRequest, StatsRequest
from tests.conftest import dcmtk

pytestmark = pytest.mark.dcmtk


@pytest.fixture(scope="module")
def small_series(tmp_path_factory) -> list[Path]:  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("small")
    return [Path(p) for p in write_series(str(folder), 40, rows=32, columns=32, patient_id="KILL1")]


def wait_until(predicate, timeout: float = 30, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def indexer_pids(server) -> list[int]:  # type: ignore[no-untyped-def]
    return [int(pid) for pid in re.findall(r"indexer started \(pid (\d+)\)", server.log_text())]


def files_on_disk(server) -> dict[str, int]:  # type: ignore[no-untyped-def]
    return {p.relative_to(server.storage).as_posix(): p.stat().st_size for p in server.stored_files()}


def indexed_files(client) -> dict[str, int]:  # type: ignore[no-untyped-def]
    with client.query(QueryRequest(level="IMAGE", keys=["Path", "Bytes"], ordered=False)) as result:
        return {path: size for path, size in result}


def reconciled(server) -> bool:  # type: ignore[no-untyped-def]
    """The running indexer has finished its reconcile and holds no pending records."""
    try:
        state = QueryClient(str(server.index)).state()
    except (ConnectionError, OSError):
        return False
    return state.reconcile == "done" and state.pending == 0


def require_reconcile(server) -> None:  # type: ignore[no-untyped-def]
    """Fail unless the supervisor gives the indexer its storage root (see fastscp.runtime.children.indexer_process):
    without it nothing indexes the files whose records a killed process lost."""
    state = QueryClient(str(server.index)).state().reconcile
    assert state != "off", "the indexer runs without storage.root: no reconcile on start"


def index_equals_files(server) -> bool:  # type: ignore[no-untyped-def]
    return reconciled(server) and indexed_files(QueryClient(str(server.index))) == files_on_disk(server)


def kill_9(server) -> None:  # type: ignore[no-untyped-def]
    """kill -9 the whole server, and wait until its processes are gone (their file locks with them)."""
    children = server.children()
    server.kill_group()

    def gone(pid: int) -> bool:
        # Every thread, not only the leader: a process's files (and DuckDB's
        # lock) are released when its last thread exits, and the leader shows
        # "Z" while others may still be running.
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            return True
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                    if stat.read().rpartition(")")[2].split()[0] != "Z":
                        return False
            except (FileNotFoundError, ProcessLookupError):
                pass
        return True

    wait_until(lambda: all(gone(pid) for pid in children), what="the killed processes to exit")


def storescu(server, files: list[Path], **popen) -> subprocess.Popen:  # type: ignore[no-untyped-def]
    env = dict(os.environ, TCP_NODELAY="1")
    argv = ["storescu", "-aec", server.ae_title, "-xe", "127.0.0.1", str(server.port), *map(str, files)]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def test_kill_9_of_the_indexer_while_storing_loses_no_record(start_server, small_series) -> None:  # type: ignore[no-untyped-def]
    server = start_server(workers=2)
    require_reconcile(server)
    sender = storescu(server, small_series)
    wait_until(lambda: len(server.stored_files()) >= 10, what="the first stores")
    (first,) = indexer_pids(server)
    os.kill(first, signal.SIGKILL)
    output, _ = sender.communicate(timeout=120)
    assert sender.returncode == 0, output  # stores go on while the indexer is down
    wait_until(lambda: len(indexer_pids(server)) == 2, what="the supervisor to restart the indexer")
    wait_until(lambda: index_equals_files(server), what="the index to equal the files")
    assert len(files_on_disk(server)) == len(small_series)
    server.wait_for_log("reconcile:")


def test_kill_9_of_the_whole_server_loses_no_record(start_server, small_series, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Batches that are never due: every record is still in the indexer's
    # memory when the process group dies.
    config = tmp_path / "slow-batches.yaml"
    config.write_text("database:\n  batch_size: 100000\n  batch_interval: 3600\n")
    server = start_server(workers=2, config=config)
    require_reconcile(server)
    dcmtk("storescu", "-aec", server.ae_title, "-xe", "127.0.0.1", str(server.port), *map(str, small_series[:25]))
    # Every record was handed over before its C-STORE-RSP; none is committed.
    kill_9(server)
    restarted = start_server(workers=2, config=config, storage=server.storage)
    wait_until(lambda: index_equals_files(restarted), what="the index to equal the files")
    assert len(files_on_disk(restarted)) == 25
    restarted.wait_for_log("indexed 25 missing")


def test_rows_of_removed_files_are_dropped_on_start(start_server, small_series) -> None:  # type: ignore[no-untyped-def]
    server = start_server(workers=1)
    require_reconcile(server)
    dcmtk("storescu", "-aec", server.ae_title, "-xe", "127.0.0.1", str(server.port), *map(str, small_series[:3]))
    wait_until(lambda: index_equals_files(server), what="the stores to be indexed")
    assert server.stop() == 0
    gone = server.stored_files()[0]
    gone.unlink()
    restarted = start_server(workers=1, storage=server.storage)
    wait_until(lambda: index_equals_files(restarted), what="the index to equal the files")
    assert len(files_on_disk(restarted)) == 2
    restarted.wait_for_log("dropped 1 rows whose file is gone")


def test_query_and_stats_while_running_and_stopped(start_server, small_series, capsys) -> None:  # type: ignore[no-untyped-def]
    server = start_server(workers=1)
    dcmtk("storescu", "-aec", server.ae_title, "-xe", "127.0.0.1", str(server.port), *map(str, small_series[:5]))
    wait_until(lambda: len(indexed_files(QueryClient(str(server.index)))) == 5, what="the stores to be indexed")
    # While the server runs its indexer holds the file (no other process can
    # open it): these answers come through the query socket.
    assert cli_index.main(["query", "studies", "--index-db", str(server.index), "--json"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert '"PatientID":"KILL1"' in line and '"NumberOfStudyRelatedInstances":5' in line
    assert cli_index.main(["stats", "--index-db", str(server.index)]) == 0
    out = capsys.readouterr().out
    assert "server running (indexer pid" in out and re.search(r"instances\s+5\b", out)
    assert "STORESCU" in out  # by calling AE title
    assert server.stop() == 0
    assert cli_index.main(["query", "instances", "--index-db", str(server.index), "--modality", "CT"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1 + 5 and "KILL1" in out
    assert cli_index.main(["stats", "--index-db", str(server.index), "--json"]) == 0
    out = capsys.readouterr().out
    assert '"instances":5' in out and '"indexer":null' in out


def test_reindex_refuses_a_running_server_then_rebuilds_the_same_index(start_server, small_series,
                                                                        capsys) -> None:  # type: ignore[no-untyped-def]
    server = start_server(workers=1)
    dcmtk("storescu", "-aec", server.ae_title, "-xe", "127.0.0.1", str(server.port), *map(str, small_series[:6]))
    wait_until(lambda: len(indexed_files(QueryClient(str(server.index)))) == 6, what="the stores to be indexed")
    argv = ["reindex", "--storage-dir", str(server.storage), "--index-db", str(server.index)]
    assert cli_index.main(argv) == 1
    assert "a running fastscp server owns" in capsys.readouterr().err
    assert server.stop() == 0
    keys = ["Path", "SOPInstanceUID", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
            "TransferSyntaxUID", "CallingAETitle", "Bytes", "InstanceNumber", "Rows"]
    request = QueryRequest(level="IMAGE", keys=keys)
    with LocalQueryClient(str(server.index)) as client:
        before = [list(row) for row in client.query(request)]
    assert cli_index.main(argv) == 0
    captured = capsys.readouterr()
    assert "indexed 6 of 6 files" in captured.out
    assert "6/6 files" in captured.err and "ETA" in captured.err
    with LocalQueryClient(str(server.index)) as client:
        after = [list(row) for row in client.query(request)]
        stats = client.stats(StatsRequest())
    assert after == before and len(after) == 6
    assert (stats.instances, stats.series, stats.studies, stats.patients) == (6, 1, 1, 1)


def test_wal_mode_false_checkpoints_every_batch(start_server, small_series, tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "no-wal.yaml"
    config.write_text("database:\n  wal_mode: false\n")
    server = start_server(workers=1, config=config)
    dcmtk("storescu", "-aec", server.ae_title, "-xe", "127.0.0.1", str(server.port), *map(str, small_series[:4]))
    wait_until(lambda: QueryClient(str(server.index)).state().pending == 0
               and len(indexed_files(QueryClient(str(server.index)))) == 4, what="the batch to be committed")
    wal = Path(str(server.index) + ".wal")
    assert not wal.exists() or wal.stat().st_size == 0, "the batch must be in the data file"
    # Killed without a chance to flush anything: the data file alone has the rows.
    kill_9(server)
    if wal.exists():
        wal.unlink()
    with LocalQueryClient(str(server.index)) as client:
        assert len(indexed_files(client)) == 4


def test_a_v1_index_is_migrated_when_the_server_starts(start_server, small_series,
                                                      tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fastscp.index.reindex import FileState, read_record
    from tests.unit.index.test_index import make_v1_index

    storage = tmp_path / "received"
    stored = storage / "KILL1" / "a.dcm"
    stored.parent.mkdir(parents=True)
    stored.write_bytes(small_series[0].read_bytes())
    info = stored.stat()
    record = read_record(str(storage), FileState("KILL1/a.dcm", info.st_size, info.st_mtime_ns))
    make_v1_index(str(tmp_path / "index.duckdb"), [record])  # where conftest's Server puts it
    server = start_server(workers=1, storage=storage)
    server.wait_for_log(f"migrated from schema version 1 to {SCHEMA_VERSION}")
    with QueryClient(str(server.index)).query(QueryRequest(level="STUDY", keys=["PatientID", "StudyInstanceUID"],
                                                           )) as result:
        assert list(result) == [["KILL1", record.header.study_instance_uid]]
    assert server.stop() == 0
    index = Index(str(server.index), read_only=True)
    assert index.version == SCHEMA_VERSION and index.count() == 1
    index.close()


# -- an indexer that lags (server.derived_priority, issue 13 lever 4) ------------------------


def _stalled_indexer(start_server, tmp_path: Path, count: int, patient_id: str):  # type: ignore[no-untyped-def]
    """A server (one worker, no thumbnails) that answered ``count`` C-STOREs while its indexer was
    stopped (SIGSTOP), which it still is: (server, the indexer's PID)."""
    from fastscp.process.priority import process_name

    config = tmp_path / "fastscp.yaml"
    config.write_text("thumbnails:\n  enabled: false\nscansheet:\n  enabled: false\n")
    server = start_server(config=config, workers=1)
    server.wait_for_log("indexer started (pid")
    indexer = next(pid for pid in server.children() if process_name(pid) == "fastscp-indexer")
    series = write_series(str(tmp_path / patient_id), count, rows=16, columns=16, patient_id=patient_id)
    os.kill(indexer, signal.SIGSTOP)
    try:
        dcmtk("storescu", "-aec", server.ae_title, "-xe", "127.0.0.1", str(server.port), *series, timeout=120)
    except BaseException:
        os.kill(indexer, signal.SIGCONT)
        raise
    assert len(server.stored_files()) == count
    return server, indexer


def test_a_stalled_indexer_holds_up_no_store_and_then_indexes_every_record(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """While the indexer does not read (SIGSTOP: what SCHED_IDLE does to it under saturation), every
    C-STORE is answered; the worker keeps the records (in memory, beyond 32 MB in files) and the
    index gets every one once the indexer runs again. Before, the worker's send blocked once the
    indexer's socket held 10 messages, and held up its associations with it."""
    from tests.conftest import wait_until

    count = 1000
    server, indexer = _stalled_indexer(start_server, tmp_path, count, "IX1")
    os.kill(indexer, signal.SIGCONT)
    queries = QueryClient(str(server.index))
    wait_until(lambda: queries.stats().instances == count, timeout=120, what=f"{count} instances indexed")
    assert server.stop() == 0
    with LocalQueryClient(str(server.index)) as client:
        assert indexed_files(client) == {str(p.relative_to(server.storage)): p.stat().st_size
                                         for p in server.stored_files()}


def test_records_the_indexer_had_not_taken_are_indexed_before_it_exits(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The server stops while its indexer lags (SIGSTOP until the supervisor has asked it to stop): the
    worker puts what the indexer did not take in a file under .incoming at its exit, and the indexer
    indexes it before it exits. Before, the worker's unsent records were lost at its exit (the next
    start's reconcile found their files)."""
    from fastscp.index.client import kept_folder
    from tests.conftest import sigterm_pending, wait_until

    count = 600
    server, indexer = _stalled_indexer(start_server, tmp_path, count, "IX2")
    try:
        server.signal(signal.SIGTERM)  # the workers stop first, then the indexer
        wait_until(lambda: sigterm_pending(indexer), timeout=60, what="the indexer's SIGTERM")
    finally:
        os.kill(indexer, signal.SIGCONT)
    assert server.process.wait(60) == 0
    log = server.log_text()
    assert "indexer busy or down" in log and "indexer: took back " in log, log
    assert not os.listdir(kept_folder(str(server.storage)))
    with LocalQueryClient(str(server.index)) as client:
        assert len(indexed_files(client)) == count, log
