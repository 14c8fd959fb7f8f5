"""The shared index's upkeep and schema, on a real DuckLake with its catalog in PostgreSQL.

Each "node" is an :class:`~fastscp.index.database.Index` of its own (its own
DuckDB instance, as in its own indexer process) on one catalog database
(a fresh one per test) of a PostgreSQL cluster that the module starts.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastscp.dicom.header import HeaderFields
from fastscp.index.database import SCHEMA_VERSION, Index, IndexUnavailable, Lake, catalog_lock
from fastscp.index.lake import MAINTENANCE_LOCK, LakeMaintenance, data_files, maintain
from fastscp.index.records import InstanceRecord
from tests.cluster import PostgresCluster
from tests.conftest import REPO, wait_until


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture
def lake(postgres: PostgresCluster, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Lake]:
    """node-a's view of a new lake: its own catalog database and Parquet folder."""
    database = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50]
    postgres.psql(f"CREATE DATABASE {database}")
    yield Lake(postgres.catalog_of(database).removeprefix("postgres:"), str(tmp_path / "lake"), "node-a")


def node(lake: Lake, name: str, **options: object) -> Index:
    return Index(f"/nonexistent/{name}.duckdb", lake=lake._replace(node=name), **options)  # type: ignore[arg-type]


def records(prefix: str, count: int, *, series: int = 1, patient: str = "LAKE") -> list[InstanceRecord]:
    """``count`` instances of one study, over ``series`` series, at paths under ``prefix``."""
    study = f"1.2.826.0.1.3680043.10.1.{abs(hash(prefix)) % 10**8}"
    return [InstanceRecord(
        path=f"{prefix}/{n:05d}.dcm", size=1000 + n, transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_ae_title="CT1", called_ae_title="FASTSCP", peer_address="10.0.0.1", received_at=1.7e9 + n,
        header=HeaderFields(patient_id=patient, patient_name="Lake^Test", study_instance_uid=study,
                            series_instance_uid=f"{study}.{n % series}", series_number=n % series,
                            sop_instance_uid=f"{study}.{n % series}.{n}", modality="CT", instance_number=n,
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                            attributes=f'{{"00180050":"5.0","00200013":"{n}"}}'),
    ) for n in range(count)]


#: What a reader sees of node-a's rows (patient LAKE): through the tables and every view.
ANSWERS = (
    "SELECT path, size, sop_instance_uid, series_instance_uid, attributes_base FROM instances "
    "WHERE node = 'node-a' ORDER BY path",
    "SELECT path, CAST(attributes AS VARCHAR) FROM instance_attributes WHERE node = 'node-a' ORDER BY path",
    "SELECT * FROM studies WHERE patient_id = 'LAKE' ORDER BY study_instance_uid",
    "SELECT se.* FROM series se JOIN studies st USING (study_instance_uid) WHERE st.patient_id = 'LAKE' "
    "ORDER BY series_instance_uid",
    "SELECT * FROM patients WHERE patient_id = 'LAKE'",
    "SELECT * FROM study_counts JOIN studies USING (study_instance_uid) WHERE patient_id = 'LAKE'",
)


def answers(index: Index) -> list[list[tuple]]:
    return [index.con.execute(sql).fetchall() for sql in ANSWERS]


def instance_files(index: Index) -> int:
    return int(index.con.execute("SELECT count(*) FROM ducklake_list_files('lake', 'instances')").fetchall()[0][0])


def parquet_files(lake: Lake) -> int:
    return sum(1 for _ in Path(lake.data_path).rglob("*.parquet"))


def test_maintenance_merges_small_files_while_another_node_writes(lake: Lake) -> None:
    a, b = node(lake, "node-a"), node(lake, "node-b")
    try:
        mine = records("a", 480, series=4)
        for start in range(0, len(mine), 12):  # 40 commits of 12 rows: each writes Parquet files
            a.add(mine[start:start + 12])
        before, files_before = answers(a), data_files(a.con)
        assert files_before >= 40

        # node-b keeps committing small batches of new instances the whole time.
        written: list[tuple[float, int]] = []
        errors: list[BaseException] = []
        stop = threading.Event()

        def write() -> None:
            try:
                n = 0
                while not stop.is_set() or n < 3:
                    batch = records(f"b{n}", 12, patient="LAKE-B")
                    b.add(batch)
                    written.append((time.monotonic(), len(batch)))
                    n += 1
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        writer = threading.Thread(target=write)
        writer.start()
        try:
            wait_until(lambda: len(written) >= 2 or bool(errors), 60, "node-b to commit")
            service = LakeMaintenance(a, interval=3600)
            service.start()
            runs: list[tuple[float, float]] = []
            try:
                done = service.run_once()
                assert done is not None
                runs.append((time.monotonic() - done.seconds, time.monotonic()))
                # Again (node-b's new files to merge) until one of node-b's commits ended while a run
                # was under way: a run may be shorter than a commit on a quick machine.
                while not any(start < t < end for start, end in runs for t, _ in written) and len(runs) < 10:
                    again = service.run_once()
                    assert again is not None
                    runs.append((time.monotonic() - again.seconds, time.monotonic()))
            finally:
                service.close()
            wait_until(lambda: any(t > runs[-1][1] for t, _ in written) or bool(errors), 60, "node-b to go on")
        finally:
            stop.set()
            writer.join(120)
        assert not errors, errors
        assert done.merged > done.merged_into > 0, done
        assert done.files_after < done.files_before
        # node-b was not held up: it committed while a run was under way, and after.
        assert any(start < t < end for start, end in runs for t, _ in written), (runs, written)
        # Every row is still there, and every query answers as before.
        assert answers(a) == before
        assert answers(b) == before
        assert b.con.execute("SELECT count(*) FROM instances WHERE node = 'node-b'").fetchall() == [
            (sum(count for _, count in written),)]

        # With node-b quiet, a second run merges what it wrote too; with nothing kept, the files
        # a merge replaced are deleted, so the folder holds just the files the lake reads.
        again = maintain(a.con, keep="0 seconds")
        assert again.files_after < again.files_before
        assert again.expired_snapshots > 0 and again.deleted_files > 0
        assert parquet_files(lake) == again.files_after == data_files(b.con)
        assert answers(a) == before
    finally:
        a.close()
        b.close()


def test_one_node_at_a_time_and_a_dead_nodes_lock_is_released(lake: Lake, tmp_path: Path) -> None:
    a, b = node(lake, "node-a"), node(lake, "node-b")
    try:
        a.add(records("a", 24))
        a.add(records("a2", 24))
        service = LakeMaintenance(b, interval=3600)
        service.start()
        try:
            with catalog_lock(a.con, MAINTENANCE_LOCK) as held:
                assert held
                assert service.run_once() is None  # node-a is at it: node-b skips this round
            assert service.run_once() is not None
            # A node killed while it holds the lock: PostgreSQL ends its session, and the lock.
            holder = subprocess.Popen(
                [sys.executable, "-c", HOLD_THE_LOCK, lake.catalog, lake.data_path], cwd=REPO,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                assert holder.stdout is not None
                assert holder.stdout.readline().strip() == "held", holder.stdout.read()
                assert service.run_once() is None
            finally:
                holder.kill()
                holder.communicate(timeout=30)
            wait_until(lambda: service.run_once() is not None, 30, "the dead node's lock to go")
        finally:
            service.close()
    finally:
        a.close()
        b.close()


HOLD_THE_LOCK = """
import sys, time
from fastscp.index.database import Index, Lake, catalog_lock
from fastscp.index.lake import MAINTENANCE_LOCK
index = Index("/nonexistent/c.duckdb", lake=Lake(sys.argv[1], sys.argv[2], "node-c"))
with catalog_lock(index.con, MAINTENANCE_LOCK) as held:
    print("held" if held else "not held", flush=True)
    time.sleep(600)
"""


def test_the_scheduled_maintenance_runs_and_logs_its_counts(lake: Lake, caplog: pytest.LogCaptureFixture) -> None:
    a = node(lake, "node-a")
    try:
        for start in range(0, 60, 12):
            a.add(records("a", 60)[start:start + 12])
        files = instance_files(a)
        assert files == 5
        caplog.set_level(logging.INFO, logger="fastscp.index")
        service = LakeMaintenance(a, interval=0.2)
        service.start()
        try:
            wait_until(lambda: "maintenance by node node-a" in caplog.text, 30, "a scheduled run")
        finally:
            service.close()
        assert "merged 5 into 1" in caplog.text and "snapshots expired" in caplog.text, caplog.text
        assert instance_files(a) == 1
    finally:
        a.close()


def downgrade_to_v4(index: Index) -> None:
    """What fastscp's schema 4 lacked, taken away (as a lake written by that version would be)."""
    con = index.con
    con.execute("DROP VIEW instance_attributes")
    con.execute("DROP TABLE attribute_maps")
    con.execute("ALTER TABLE instances DROP COLUMN attributes_base")
    con.execute("DELETE FROM schema_version")
    con.execute("INSERT INTO schema_version VALUES (4)")


def test_an_older_lake_is_migrated_once_by_one_of_the_nodes_that_start(
        lake: Lake, caplog: pytest.LogCaptureFixture) -> None:
    old = node(lake, "node-a")
    try:
        old.add(records("a", 30))
        downgrade_to_v4(old)
        before = old.con.execute("SELECT node, path, sop_instance_uid FROM instances ORDER BY path").fetchall()
    finally:
        old.close()
    with pytest.raises(IndexUnavailable, match="start a node of this fastscp once"):
        node(lake, "reader", read_only=True)

    caplog.set_level(logging.INFO, logger="fastscp.index")
    opened: dict[str, Index] = {}
    errors: list[BaseException] = []

    def start(name: str) -> None:
        try:
            opened[name] = node(lake, name)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(name,)) for name in ("node-a", "node-b", "node-c")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    try:
        assert not errors, errors
        assert caplog.text.count("migrated from schema version 4 to") == 1, caplog.text
        for index in opened.values():
            assert index.version == SCHEMA_VERSION
            assert index.con.execute("SELECT node, path, sop_instance_uid FROM instances "
                                     "ORDER BY path").fetchall() == before
        # What version 5 added works: base attribute maps, and the view that joins them.
        b = opened["node-b"]
        b.add(records("b", 12))
        rows = b.con.execute("SELECT CAST(attributes AS VARCHAR) FROM instance_attributes WHERE node = 'node-b' "
                             "ORDER BY path LIMIT 1").fetchall()
        assert rows == [('{"00180050":"5.0","00200013":"0"}',)]
        # The rows from before have the new column, NULL.
        assert b.con.execute("SELECT count(*) FROM instances WHERE node = 'node-a' "
                             "AND attributes_base IS NULL").fetchall() == [(len(before),)]
        assert b.con.execute("SELECT max(version) FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    finally:
        for index in opened.values():
            index.close()


def test_a_lake_of_a_newer_fastscp_is_refused(lake: Lake) -> None:
    index = node(lake, "node-a")
    try:
        index.con.execute("INSERT INTO schema_version VALUES (?)", [SCHEMA_VERSION + 1])
    finally:
        index.close()
    with pytest.raises(IndexUnavailable, match=f"index schema version {SCHEMA_VERSION + 1} is newer than this "
                                               "fastscp supports .*upgrade fastscp on this node"):
        node(lake, "node-b")


def test_thumbnails_ride_in_the_batch_and_a_node_replaces_only_its_own(lake: Lake) -> None:
    """A thumbnail is written in its batch's transaction; made again, it replaces its node's row and
    never another node's of the same relative path."""
    from fastscp.index.records import ThumbnailMade

    a, b = node(lake, "node-a"), node(lake, "node-b")
    try:
        made = records("THUMBS", 2)
        for index in (a, b):
            index.add(made, thumbnails=[ThumbnailMade(path=made[0].path, thumbnail_path="thumbnails/1.jpg")])
        a.add([], thumbnails=[ThumbnailMade(path=made[0].path, thumbnail_path="thumbnails/2.jpg")])
        assert a.con.execute("SELECT node, path, thumbnail_path FROM thumbnails ORDER BY node").fetchall() == [
            ("node-a", made[0].path, "thumbnails/2.jpg"), ("node-b", made[0].path, "thumbnails/1.jpg")]
    finally:
        a.close()
        b.close()
