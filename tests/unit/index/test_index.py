"""The DuckDB index on real files: schema, batches, resends, conflicts, migration, reconcile, reindex.

The records come from real DICOM files (synthetic series and pydicom's test
files) read back with :func:`fastscp.index.reindex.read_record`; every index is a
real DuckDB file in the test's temp folder.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import msgspec
import pytest

from fastscp.dicom.header import HeaderFields
from fastscp.dicom.part10 import dataset_hash
from fastscp.dicom.synthetic import write_series
from fastscp.index.batchtable import InstanceBatch
from fastscp.index.client import IndexerClient, indexer_address, kept_folder
from fastscp.index.database import SCHEMA_VERSION, TABLES, Index, IndexUnavailable
from fastscp.index.indexer import Indexer
from fastscp.index.records import BATCH_DECODER, ENCODER, DuplicateConflict, InstanceRecord, RecordBatch
from fastscp.index.reindex import FileState, Progress, plan, read_record, read_records, reindex, walk
from fastscp.process.ipc import listen
from fastscp.process.kept import kept_files, read_kept, write_kept
from fastscp.query.client import QueryClient
from fastscp.query.engine import run_query
from fastscp.query.messages import Condition as QueryCondition
from fastscp.query.messages import QueryRequest, SqlRequest, query_address
from fastscp.query.server import QueryServer
from fastscp.storage.files import TEMP_PREFIX, FileModes
from tests.dicomfiles import PYDICOM_DATA

#: pydicom test files in the storage fixture: two compressed, a UTF-8 and a Latin-1 name.
PYDICOM_FILES = ("test_files/CT_small.dcm", "test_files/MR_small.dcm", "test_files/JPEG2000.dcm",
                 "charset_files/chrX1.dcm", "charset_files/chrGerm.dcm")


def make_storage(root: Path) -> Path:
    """A storage folder: 4 CT of patient SYNA, 3 MR of SYNB, pydicom's files, and things to skip."""
    write_series(str(root / "SYNA"), 4, rows=16, columns=16, patient_id="SYNA")
    write_series(str(root / "SYNB"), 3, rows=16, columns=16, patient_id="SYNB", modality="MR",
                 sop_class="1.2.840.10008.5.1.4.1.1.4", seed=1)
    for name in PYDICOM_FILES:
        target = root / "pydicom" / Path(name).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PYDICOM_DATA / name, target)
    # Not instances: temp, quarantine and thumbnail folders, other files.
    for folder in (".incoming", ".quarantine", "thumbnails"):
        (root / folder).mkdir()
        shutil.copyfile(root / "SYNA" / "CT00001.dcm", root / folder / "x.dcm")
    (root / "SYNA" / "notes.txt").write_text("not DICOM")
    return root


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    return make_storage(tmp_path / "storage")


def records_of(root: Path) -> list[InstanceRecord]:
    failed: list[tuple[str, str]] = []
    records = read_records(str(root), sorted(walk(str(root))), failed=failed)
    assert failed == []
    return records


def rows(index: Index, sql: str, params: list[object] | None = None) -> list[tuple]:
    return index.con.execute(sql, params or []).fetchall()


# -- schema --------------------------------------------------------------------------------


def test_every_header_field_has_a_column() -> None:
    placed = {name for table in ("studies", "series", "instances") for name in TABLES[table]}
    assert set(HeaderFields.__struct_fields__) <= placed, "a new HeaderFields field needs a column and a migration"
    assert set(TABLES["duplicate_conflicts"]) == set(DuplicateConflict.__struct_fields__)


def test_walk_finds_instances_only(storage: Path) -> None:
    found = {state.path for state in walk(str(storage))}
    assert len(found) == 4 + 3 + len(PYDICOM_FILES)
    assert not any(p.startswith((".incoming", ".quarantine", "thumbnails")) for p in found)
    assert "SYNA/CT00001.dcm" in found


def test_read_record_reads_file_meta_and_header(storage: Path) -> None:
    path = storage / "pydicom" / "JPEG2000.dcm"
    info = path.stat()
    record = read_record(str(storage), FileState("pydicom/JPEG2000.dcm", info.st_size, info.st_mtime_ns))
    assert record.transfer_syntax_uid == "1.2.840.10008.1.2.4.91"
    assert record.header.patient_id == "8NM1" and record.header.modality == "NM"
    assert record.size == info.st_size and record.received_at == pytest.approx(info.st_mtime)
    assert record.content_hash == dataset_hash(str(path)) and len(record.content_hash) == len("blake3:") + 64
    size = (storage / "pydicom/chrGerm.dcm").stat().st_size
    latin1 = read_record(str(storage), FileState("pydicom/chrGerm.dcm", size, 0), content_hash=False)
    assert latin1.header.patient_name == "Äneas^Rüdiger" and latin1.content_hash == ""


# -- writes ----------------------------------------------------------------------------------


def test_batch_fills_patients_studies_series_and_instances(storage: Path, tmp_path: Path) -> None:
    index = Index(str(tmp_path / "index.duckdb"))
    records = records_of(storage)
    assert index.add(records) == len(records)
    assert index.count() == len(records)
    assert rows(index, "SELECT patient_id, patient_name FROM patients WHERE patient_id = 'SYNB'") == [
        ("SYNB", "Synthetic^Patient")]
    assert rows(index, "SELECT patient_name FROM patients WHERE patient_id = 'X1EXAMPLE'") == [
        ("Wang^XiaoDong=王^小東",)]
    counts = dict(rows(index, "SELECT p.patient_id, c.number_of_patient_related_instances FROM patient_counts c "
                              "JOIN patients p USING (patient_key)"))
    assert counts["SYNA"] == 4 and counts["SYNB"] == 3 and counts["1CT1"] == 1
    (study,) = rows(index, "SELECT number_of_study_related_series, number_of_study_related_instances, study_size "
                           "FROM study_counts JOIN studies USING (study_instance_uid) WHERE patient_id = 'SYNA'")
    assert study[:2] == (1, 4) and study[2] == sum((storage / "SYNA" / f"CT0000{n}.dcm").stat().st_size
                                                    for n in range(1, 5))
    assert rows(index, "SELECT count(*) FROM series") == [(len({r.header.series_instance_uid for r in records}),)]
    index.close()


#: In a new interpreter: open a writer's index, then write its first batch; prints the modules that batch
#: imported. The records are read before the index opens (reading imports what it needs).
FIRST_BATCH_IMPORTS = """
import sys
from fastscp.index.database import Index
from fastscp.index.reindex import FileState, read_record
storage, path = sys.argv[1], sys.argv[2]
records = [read_record(storage, FileState(name, 0, 0)) for name in ("SYNA/CT00001.dcm", "SYNB/MR00001.dcm")]
index = Index(path)
before = set(sys.modules)
assert index.add(records) == 2
print(" ".join(sorted(set(sys.modules) - before)))
index.close()
"""


def test_a_writers_first_batch_imports_nothing(storage: Path, tmp_path: Path) -> None:
    # DuckDB imports pyarrow.dataset and more the first time it is given an Arrow table: ~45 ms of CPU,
    # which the first batch, while the first stores still arrive, must not pay (Index opens with it done).
    imported = subprocess.run([sys.executable, "-c", FIRST_BATCH_IMPORTS, str(storage), str(tmp_path / "i.duckdb")],
                              capture_output=True, text=True, timeout=120, check=True).stdout.split()
    assert imported == []


def test_a_resend_replaces_its_row(storage: Path, tmp_path: Path) -> None:
    index = Index(str(tmp_path / "index.duckdb"))
    records = records_of(storage)
    index.add(records)
    first = records[0]
    resent = msgspec.structs.replace(first, size=first.size + 2, calling_ae_title="AGAIN")
    new_file = msgspec.structs.replace(first, path="elsewhere/new.dcm")
    # One batch with a resend and a new path; and the same path twice in one batch.
    assert index.add([resent, new_file, msgspec.structs.replace(resent, peer_address="last")]) == 2
    assert index.count() == len(records) + 1
    assert rows(index, "SELECT size, calling_ae_title, peer_address FROM instances WHERE path = ?", [first.path]) == [
        (first.size + 2, "AGAIN", "last")]
    index.close()


def test_an_instance_moved_to_another_series_leaves_no_empty_series(storage: Path, tmp_path: Path) -> None:
    index = Index(str(tmp_path / "index.duckdb"))
    (only,) = [r for r in records_of(storage) if r.header.patient_id == "1CT1"]
    index.add([only])
    moved = msgspec.structs.replace(only, header=msgspec.structs.replace(
        only.header, series_instance_uid="1.2.3.9", study_instance_uid="1.2.3", patient_id="NEW"))
    index.add([moved])
    assert index.needs_prune
    index.prune()
    assert rows(index, "SELECT series_instance_uid FROM series") == [("1.2.3.9",)]
    assert rows(index, "SELECT study_instance_uid, patient_id FROM studies") == [("1.2.3", "NEW")]
    assert rows(index, "SELECT patient_id FROM patients") == [("NEW",)]
    index.close()


def test_a_series_continued_after_a_restart_updates_its_parents(storage: Path, tmp_path: Path) -> None:
    # A new Index has written no parent rows yet: the plain INSERT of a known
    # series collides and the batch is written again with upserts.
    path = str(tmp_path / "index.duckdb")
    first, second, *_ = sorted((r for r in records_of(storage) if r.header.patient_id == "SYNA"),
                               key=lambda r: r.path)
    index = Index(path)
    index.add([first])
    assert not index.needs_prune, "new rows only: nothing can have moved"
    index.close()
    index = Index(path)
    renamed = msgspec.structs.replace(second, header=msgspec.structs.replace(
        second.header, series_description="RENAMED", study_description="RENAMED STUDY"))
    assert index.add([renamed]) == 1
    assert rows(index, "SELECT count(*), any_value(series_description) FROM series") == [(1, "RENAMED")]
    assert rows(index, "SELECT count(*), any_value(study_description) FROM studies") == [(1, "RENAMED STUDY")]
    assert index.count() == 2
    index.close()


def test_duplicate_conflicts_are_logged(tmp_path: Path) -> None:
    index = Index(str(tmp_path / "index.duckdb"))
    conflict = DuplicateConflict(sop_instance_uid="1.2.3.4", path="P/1.2.3.4.dcm", existing_hash="a" * 64,
                                 new_hash="b" * 64, policy="keep-both", outcome="kept-both",
                                 new_path="P/1.2.3.4.dup1.dcm", calling_ae_title="CT01", received_at=1_700_000_000.25)
    assert index.add([], [conflict]) == 0
    assert rows(index, "SELECT sop_instance_uid, policy, outcome, new_path, calling_ae_title, epoch_us(received_at) "
                       "FROM duplicate_conflicts") == [
        ("1.2.3.4", "keep-both", "kept-both", "P/1.2.3.4.dup1.dcm", "CT01", 1_700_000_000_250_000)]
    index.close()


def test_keep_newer_never_overwrites_a_newer_row(storage: Path, tmp_path: Path) -> None:
    index = Index(str(tmp_path / "index.duckdb"))
    record = records_of(storage)[0]
    from_worker = msgspec.structs.replace(record, received_at=record.received_at + 5, calling_ae_title="WORKER")
    index.add([from_worker])
    index.add([record], keep_newer=True)  # made from the file: older than the worker's row
    assert rows(index, "SELECT calling_ae_title FROM instances") == [("WORKER",)]
    newer_file = msgspec.structs.replace(record, received_at=record.received_at + 10, calling_ae_title="FILE")
    index.add([newer_file], keep_newer=True)
    assert rows(index, "SELECT calling_ae_title FROM instances") == [("FILE",)]
    index.close()


def test_remove_drops_rows_and_empty_parents(storage: Path, tmp_path: Path) -> None:
    index = Index(str(tmp_path / "index.duckdb"))
    records = records_of(storage)
    index.add(records)
    gone = [r.path for r in records if r.header.patient_id == "SYNB"]
    assert index.remove([*gone, "never/indexed.dcm"]) == 3
    assert index.count() == len(records) - 3
    assert rows(index, "SELECT count(*) FROM patients WHERE patient_id = 'SYNB'") == [(0,)]
    assert rows(index, "SELECT count(*) FROM series WHERE modality = 'MR' AND series_instance_uid IN "
                       "(SELECT series_instance_uid FROM instances)") == [(1,)]  # MR_small.dcm stays
    # The base attribute maps of the gone series go with them; each one left is used.
    assert rows(index, "SELECT count(*) FROM attribute_maps") == rows(
        index, "SELECT count(DISTINCT attributes_base) FROM instances")
    assert rows(index, "SELECT count(*) FROM attribute_maps WHERE id NOT IN (SELECT attributes_base FROM instances)"
                ) == [(0,)]
    index.remove([r.path for r in records if r.path not in gone])
    assert rows(index, "SELECT count(*) FROM attribute_maps") == [(0,)]
    index.close()


@pytest.mark.parametrize("wal_mode", [True, False], ids=["wal", "checkpoint-per-batch"])
def test_wal_mode(storage: Path, tmp_path: Path, wal_mode: bool) -> None:
    path = tmp_path / "index.duckdb"
    index = Index(str(path), wal_mode=wal_mode)
    index.add(records_of(storage))
    wal = Path(str(path) + ".wal")
    wal_bytes = wal.stat().st_size if wal.exists() else 0
    assert (wal_bytes > 0) == wal_mode
    # What the indexer does when idle: the WAL goes into the data file.
    assert index.needs_checkpoint == wal_mode
    index.tidy()
    assert not index.needs_checkpoint
    assert not wal.exists() or wal.stat().st_size == 0
    index.close()


def test_study_instances_gives_full_headers(storage: Path, tmp_path: Path) -> None:
    index = Index(str(tmp_path / "index.duckdb"))
    records = records_of(storage)
    index.add(records)
    syna = sorted((r for r in records if r.header.patient_id == "SYNA"), key=lambda r: r.path)
    found = index.study_instances(syna[0].header.study_instance_uid)
    assert [(path, header) for path, header in found] == [(r.path, r.header) for r in syna]
    index.close()


# -- opening, versions, migration ---------------------------------------------------------------

#: The v1 schema (fastscp 0.1): one flat table of file facts and every header field.
_V1_FILE_COLUMNS = ("path VARCHAR PRIMARY KEY, size BIGINT, transfer_syntax_uid VARCHAR, calling_ae_title VARCHAR, "
                    "called_ae_title VARCHAR, peer_address VARCHAR, received_at TIMESTAMP")


def make_v1_index(path: str, records: list[InstanceRecord]) -> None:
    """An index file as fastscp 0.1 wrote it (schema version 1), holding ``records``."""
    sql_type = {str: "VARCHAR", int: "BIGINT", float: "DOUBLE"}
    hints = {name: field.type for name, field in zip(HeaderFields.__struct_fields__,
                                                       msgspec.structs.fields(HeaderFields), strict=True)}

    def base(annotation: object) -> type:
        args = [a for a in getattr(annotation, "__args__", (annotation,)) if a is not type(None)]
        return args[0]  # type: ignore[no-any-return]

    header_columns = ", ".join(f'"{name}" {sql_type[base(hints[name])]}' for name in HeaderFields.__struct_fields__)
    con = duckdb.connect(path)
    con.execute(f"CREATE TABLE instances ({_V1_FILE_COLUMNS}, {header_columns})")
    con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    con.execute("INSERT INTO schema_version VALUES (1)")
    header_marks = ", ".join(["?"] * len(HeaderFields.__struct_fields__))
    for r in records:
        values = [r.path, r.size, r.transfer_syntax_uid, r.calling_ae_title, r.called_ae_title, r.peer_address,
                  int(r.received_at * 1e6), *msgspec.structs.astuple(r.header)]
        con.execute(f"INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, make_timestamp(?), {header_marks})", values)
    con.close()


def migrated(storage: Path, tmp_path: Path, make: Callable[[str, list[InstanceRecord]], None]
             ) -> tuple[Index, list[InstanceRecord]]:
    """An old index made by ``make`` from the storage's records, opened (so migrated)."""
    path = str(tmp_path / "index.duckdb")
    records = records_of(storage)
    make(path, records)
    index = Index(path)
    assert index.version == SCHEMA_VERSION
    assert index.count() == len(records)
    return index, records


def test_migration_from_v1(storage: Path, tmp_path: Path) -> None:
    index, records = migrated(storage, tmp_path, make_v1_index)
    assert rows(index, "SELECT max(version) FROM schema_version") == [(SCHEMA_VERSION,)]
    assert rows(index, "SELECT count(*) FROM information_schema.tables WHERE table_name = 'instances_v1'") == [(0,)]
    by_path = {r.path: r for r in records}
    for path_, size, hash_, patient in rows(index, "SELECT path, size, content_hash, patient_id FROM instances"):
        assert (size, hash_, patient) == (by_path[path_].size, "", by_path[path_].header.patient_id)
    assert rows(index, "SELECT count(*) FROM studies") == [(len({r.header.study_instance_uid for r in records}),)]
    (syna,) = [r for r in records if r.path == "SYNA/CT00001.dcm"]
    assert index.study_instances(syna.header.study_instance_uid)[0][1] == syna.header
    index.close()


#: Columns that schema version 3 added (the studies' patient attributes; header fields).
_V3_COLUMNS = {"studies": ("patient_name", "patient_birth_date", "patient_sex"),
               "instances": ("image_type", "window_center_values", "window_width_values")}
#: Columns that schema version 4 added (the command's SOP Instance UID).
_V4_COLUMNS = {"instances": ("affected_sop_instance_uid",)}
#: Columns that schema version 5 added (the attribute map), beside its table and view.
_V5_COLUMNS = {"instances": ("attributes", "attributes_base")}


def _drop_v5(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("DROP VIEW instance_attributes")
    con.execute("DROP TABLE attribute_maps")


def _drop_columns(con: duckdb.DuckDBPyConnection, *dropped: dict[str, tuple[str, ...]]) -> None:
    for table in ("studies", "instances"):
        added = [name for columns in dropped for name in columns.get(table, ())]
        if not added:
            continue
        kept = {name: sql for name, sql in TABLES[table].items() if name not in added}
        key = "study_instance_uid" if table == "studies" else "path"
        columns = ", ".join(f'"{name}" {sql}{" PRIMARY KEY" if name == key else ""}' for name, sql in kept.items())
        con.execute(f"CREATE TABLE {table}_old ({columns})")
        con.execute(f"INSERT INTO {table}_old SELECT {', '.join(f'{chr(34)}{n}{chr(34)}' for n in kept)} FROM {table}")
        con.execute(f"DROP TABLE {table}")
        con.execute(f"ALTER TABLE {table}_old RENAME TO {table}")


def make_v4_index(path: str, records: list[InstanceRecord]) -> None:
    """An index file as schema version 4 had it: no attribute map."""
    Index(path).add(records)
    con = duckdb.connect(path)
    _drop_v5(con)
    _drop_columns(con, _V5_COLUMNS)
    con.execute("UPDATE schema_version SET version = 4")
    con.close()


def make_v3_index(path: str, records: list[InstanceRecord]) -> None:
    """An index file as schema version 3 had it: no attribute map, instances without the command's UID."""
    Index(path).add(records)
    con = duckdb.connect(path)
    _drop_v5(con)
    _drop_columns(con, _V4_COLUMNS, _V5_COLUMNS)
    con.execute("UPDATE schema_version SET version = 3")
    con.close()


def make_v2_index(path: str, records: list[InstanceRecord]) -> None:
    """An index file as schema version 2 had it: one ``patients`` row per Patient ID (the last stored wins)."""
    Index(path).add(records)
    con = duckdb.connect(path)
    con.execute("DROP VIEW patient_counts")
    con.execute("DROP VIEW patients")
    _drop_v5(con)
    _drop_columns(con, _V3_COLUMNS, _V4_COLUMNS, _V5_COLUMNS)
    con.execute("CREATE TABLE patients (patient_id VARCHAR PRIMARY KEY, patient_name VARCHAR, "
                "patient_birth_date VARCHAR, patient_sex VARCHAR)")
    for r in records:
        h = r.header
        con.execute("INSERT INTO patients VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE SET patient_name = "
                    "excluded.patient_name", [h.patient_id, h.patient_name, h.patient_birth_date, h.patient_sex])
    con.execute("CREATE VIEW patient_counts AS SELECT st.patient_id, count(*) AS number_of_patient_related_instances "
                "FROM instances i JOIN studies st ON st.study_instance_uid = i.study_instance_uid GROUP BY 1")
    con.execute("UPDATE schema_version SET version = 2")
    con.close()


def test_migration_from_v4(storage: Path, tmp_path: Path) -> None:
    index, records = migrated(storage, tmp_path, make_v4_index)
    # The old rows have no map (reindex reads it); new rows do.
    assert rows(index, "SELECT count(*) FROM instances WHERE attributes IS NULL") == [(len(records),)]
    (syna,) = [r for r in records if r.path == "SYNA/CT00001.dcm"]
    again = msgspec.structs.replace(syna, header=msgspec.structs.replace(syna.header, attributes='{"00180060":"120"}'))
    assert index.add([again]) == 1
    assert rows(index, "SELECT attributes->>'$.\"00180060\"' FROM instance_attributes WHERE path = ?",
                [syna.path]) == [("120",)]
    assert index.study_instances(syna.header.study_instance_uid)[0][1] == again.header
    index.close()


def test_migration_from_v2(storage: Path, tmp_path: Path) -> None:
    index, records = migrated(storage, tmp_path, make_v2_index)
    # Each study got its patient's v2 row; the new columns exist and are written from now on.
    assert rows(index, "SELECT DISTINCT patient_name FROM studies WHERE patient_id = 'SYNB'") == [
        ("Synthetic^Patient",)]
    assert rows(index, "SELECT count(*) FROM information_schema.tables WHERE table_name = 'patients' "
                       "AND table_type = 'VIEW'") == [(1,)]
    (syna,) = [r for r in records if r.path == "SYNA/CT00001.dcm"]
    again = msgspec.structs.replace(syna, header=msgspec.structs.replace(
        syna.header, patient_name="Renamed^Patient", image_type="ORIGINAL\\PRIMARY"))
    assert index.add([again]) == 1  # a resend: replaces its row, upserts its study
    assert rows(index, "SELECT patient_name FROM studies WHERE study_instance_uid = ?",
                [syna.header.study_instance_uid]) == [("Renamed^Patient",)]
    assert rows(index, "SELECT image_type FROM instances WHERE path = ?", [syna.path]) == [("ORIGINAL\\PRIMARY",)]
    assert rows(index, "SELECT number_of_patient_related_instances FROM patient_counts WHERE patient_key = 'SYNA'"
                ) == [(4,)]
    index.close()


def test_migration_from_v3_and_an_instance_found_by_either_uid(storage: Path, tmp_path: Path) -> None:
    index, records = migrated(storage, tmp_path, make_v3_index)
    assert rows(index, "SELECT max(version) FROM schema_version") == [(SCHEMA_VERSION,)] == [(5,)]
    assert rows(index, "SELECT DISTINCT affected_sop_instance_uid FROM instances") == [("",)]
    # The sender's command named the first instance by another UID than its data set's.
    first = msgspec.structs.replace(records[0], affected_sop_instance_uid="1.2.826.0.1.3680043.8.498.999")
    index.add([first])
    assert index.count() == len(records)

    def found(uid: str) -> list[list[object]]:
        request = QueryRequest(level="IMAGE", keys=["Path"], conditions=[QueryCondition("SOPInstanceUID", uid)])
        return list(run_query(index.cursor(), request))

    assert found(first.header.sop_instance_uid) == [[first.path]]
    assert found("1.2.826.0.1.3680043.8.498.999") == [[first.path]]
    assert found(records[1].header.sop_instance_uid) == [[records[1].path]]
    index.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "index.duckdb")
    Index(path).close()
    con = duckdb.connect(path)
    con.execute("INSERT INTO schema_version VALUES (99)")
    con.close()
    with pytest.raises(IndexUnavailable, match="version 99 is newer"):
        Index(path)
    with pytest.raises(IndexUnavailable, match="upgrade fastscp"):
        Index(path, read_only=True)


def test_read_only_open_of_a_file_another_process_writes(tmp_path: Path) -> None:
    path = str(tmp_path / "index.duckdb")
    Index(path).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, duckdb; c = duckdb.connect(sys.argv[1]); print('open', flush=True); "
         "sys.stdin.read()", path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        with pytest.raises(IndexUnavailable, match="open in another process"):
            Index(path, read_only=True)
    finally:
        holder.communicate("", timeout=30)


# -- reconcile and reindex ------------------------------------------------------------------------


def test_plan_finds_missing_changed_and_gone(storage: Path, tmp_path: Path) -> None:
    index = Index(str(tmp_path / "index.duckdb"))
    records = records_of(storage)
    index.add(records)
    indexed = index.file_states()
    assert plan(str(storage), indexed) == (len(records), [], [], [])
    (storage / "SYNA" / "CT00001.dcm").unlink()
    changed = storage / "SYNA" / "CT00002.dcm"
    changed.write_bytes(changed.read_bytes() + b"\0\0")
    shutil.copyfile(storage / "SYNA" / "CT00003.dcm", storage / "SYNA" / "copy.dcm")
    todo = plan(str(storage), indexed)
    assert [s.path for s in todo.missing] == ["SYNA/copy.dcm"]
    assert [s.path for s in todo.changed] == ["SYNA/CT00002.dcm"]
    assert todo.gone == ["SYNA/CT00001.dcm"]
    index.close()


def test_plan_finds_a_file_of_the_same_size_written_after_its_row(storage: Path, tmp_path: Path) -> None:
    """Other content of the same size (a resend under storage.duplicates=overwrite) is re-read."""
    index = Index(str(tmp_path / "index.duckdb"))
    index.add(records_of(storage))
    indexed = index.file_states()
    rewritten = storage / "SYNA" / "CT00002.dcm"
    other = bytearray(rewritten.read_bytes())
    other[-1] ^= 0xFF  # its last pixel: other content, the same size (other files' UIDs differ in length)
    before = rewritten.stat().st_mtime_ns
    rewritten.write_bytes(other)
    os.utime(rewritten, ns=(before + 2_000_000_000, before + 2_000_000_000))  # 2 s after the row was made
    todo = plan(str(storage), indexed)
    assert (todo.missing, [s.path for s in todo.changed], todo.gone) == ([], ["SYNA/CT00002.dcm"], [])
    # Not newer than its row (the same second): left alone.
    os.utime(rewritten, ns=(before, before))
    assert plan(str(storage), indexed).changed == []
    index.close()


def test_reindex_builds_the_index_from_files_and_keeps_conflicts(storage: Path, tmp_path: Path) -> None:
    path = str(tmp_path / "index.duckdb")
    old = Index(path)
    conflict = DuplicateConflict(sop_instance_uid="1.2", path="a.dcm", existing_hash="", new_hash="", policy="reject",
                                 outcome="rejected", new_path="", calling_ae_title="X", received_at=1.0)
    old.add([], [conflict])
    old.close()
    (storage / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI")
    progress = io.StringIO()
    result = reindex(str(storage), path, progress=progress)
    assert result.files == 4 + 3 + len(PYDICOM_FILES) + 1
    assert result.indexed == result.files - 1
    assert [name for name, _reason in result.failed] == ["broken.dcm"]
    assert f"{result.files}/{result.files} files" in progress.getvalue()
    index = Index(path, read_only=True)
    assert index.count() == result.indexed
    assert rows(index, "SELECT policy FROM duplicate_conflicts") == [("reject",)]
    index.close()
    assert not os.path.exists(path + ".reindex")


@pytest.mark.parametrize("make", [make_v1_index, make_v2_index, make_v3_index, make_v4_index],
                         ids=["v1", "v2", "v3", "v4"])
def test_reindex_replaces_an_index_of_an_older_schema(storage: Path, tmp_path: Path, make) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "index.duckdb")
    make(path, records_of(storage))
    result = reindex(str(storage), path, progress=io.StringIO())
    index = Index(path, read_only=True)
    assert index.version == SCHEMA_VERSION and index.count() == result.indexed == result.files
    # every file's attribute map is read again (an older index had none)
    assert rows(index, "SELECT count(*) FROM instance_attributes WHERE attributes IS NULL") == [(0,)]
    assert rows(index, "SELECT count(*) FROM instance_attributes WHERE attributes->>'$.\"00080070\"' <> ''")[0][0] > 0
    index.close()


def test_progress_line_shows_count_rate_and_eta() -> None:
    out = io.StringIO()
    bar = Progress(200, out)
    bar.advance(50)
    line = bar.line()
    assert line.startswith("indexed 50/200 files") and "files/s" in line and "ETA 0:" in line and "25.0%" in line


# -- the indexer in this process: batches, queries while batching, reconcile ----------------------


class RunningIndexer:
    """An :class:`Indexer` on its own thread (the process entry point needs signals)."""

    def __init__(self, path: str, storage: Path | None = None, batch_size: int = 1000,
                 batch_interval: float = 0.05) -> None:
        self.path = path
        index = Index(path)
        self.indexer = Indexer(index, indexer_address(path), batch_size, batch_interval,
                               storage_root=str(storage) if storage else None)
        self.indexer.services = [QueryServer(index, query_address(path), self.indexer.state)]
        self.thread = threading.Thread(target=self.indexer.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.indexer.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()


def wait_until(predicate, timeout: float = 20) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_indexer_batches_records_and_answers_queries(storage: Path, tmp_path: Path) -> None:
    path = str(tmp_path / "index.duckdb")
    running = RunningIndexer(path)
    kept = tmp_path / "kept"
    client = IndexerClient(indexer_address(path), kept_folder=str(kept))  # a worker's
    queries = QueryClient(path)
    try:
        records = records_of(storage)
        for record in records:
            client.send(record)
        assert client.flush() == 0  # delivered now, not after the batch's interval
        wait_until(lambda: queries.stats().instances == len(records))
        stats = queries.stats()
        assert stats.indexer is not None and stats.indexer.committed == len(records)
        with queries.query(QueryRequest(level="PATIENT", keys=["PatientID"])) as result:
            assert {row[0] for row in result} >= {"SYNA", "SYNB", "1CT1"}
    finally:
        client.close()
        running.stop()
    assert not kept.exists(), "all delivered: nothing kept at close"


def test_long_attribute_maps_travel_in_messages_that_fit(storage: Path, tmp_path: Path) -> None:
    """32 instances of 32 series with 70k-character maps: ~2 MB in one batch, far past a datagram's limit."""
    path = str(tmp_path / "index.duckdb")
    running = RunningIndexer(path)
    client = IndexerClient(indexer_address(path))
    queries = QueryClient(path)
    template = records_of(storage)[0]

    def record(n: int, comments: str) -> InstanceRecord:
        header = msgspec.structs.replace(template.header, series_instance_uid=f"1.2.3.{n}",
                                         sop_instance_uid=f"1.2.4.{n}", attributes='{"00204000":"' + comments + '"}')
        return msgspec.structs.replace(template, path=f"long/{n}.dcm", header=header)

    try:
        for n in range(32):  # two in one message are too long, each alone is not
            client.send(record(n, f"{n:05d}" + "x" * 70_000))
        client.send(record(99, "€" * 60_000))  # 180 kB of UTF-8 alone: goes without its map
        wait_until(lambda: queries.stats().instances == 33)
        assert client.pending == 0
        with queries.query(SqlRequest(sql="SELECT path, length(attributes->>'$.\"00204000\"') FROM "
                                          "instance_attributes ORDER BY path")) as result:
            lengths = dict(result)
        assert lengths == {**{f"long/{n}.dcm": 70_005 for n in range(32)}, "long/99.dcm": None}
    finally:
        client.close()
        running.stop()


def test_indexer_client_keeps_records_until_the_indexer_is_back(storage: Path, tmp_path: Path) -> None:
    path = str(tmp_path / "index.duckdb")
    client = IndexerClient(indexer_address(path))
    records = records_of(storage)
    client.send(records[0])  # nobody listens yet
    assert client.pending == 1
    assert client.flush() == 1  # sealed into a message, kept
    running = RunningIndexer(path)
    try:
        # No further send: the client's retry thread delivers it.
        wait_until(lambda: client.pending == 0)
        wait_until(lambda: QueryClient(path).stats().instances == 1)
    finally:
        client.close()
        running.stop()


def test_indexer_reconciles_the_files_on_start(storage: Path, tmp_path: Path) -> None:
    path = str(tmp_path / "index.duckdb")
    index = Index(path)
    records = records_of(storage)
    index.add(records[:5])
    index.add([msgspec.structs.replace(records[0], path="gone/file.dcm")])
    index.close()
    running = RunningIndexer(path, storage)
    try:
        queries = QueryClient(path)
        wait_until(lambda: queries.stats().indexer.reconcile == "done")  # type: ignore[union-attr]
        with queries.query(QueryRequest(level="IMAGE", keys=["Path"])) as result:
            assert sorted(row[0] for row in result) == sorted(r.path for r in records)
    finally:
        running.stop()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another user")
def test_query_socket_refuses_other_users(tmp_path: Path) -> None:
    path = str(tmp_path / "index.duckdb")
    running = RunningIndexer(path)
    try:
        # A child that becomes "nobody" connects: abstract sockets have no file
        # permissions, so the indexer checks the peer's credentials itself.
        code = ("import os, sys; from fastscp.query.client import QueryClient; os.setuid(65534)\n"
                "try:\n    QueryClient(sys.argv[1]).stats()\nexcept ConnectionError:\n    sys.exit(3)")
        denied = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=60)
        assert denied.returncode == 3, denied.stderr
        assert QueryClient(path).stats().instances == 0  # our own user is served
    finally:
        running.stop()


def test_queries_on_a_big_index_use_their_own_cursor(storage: Path, tmp_path: Path) -> None:
    index = Index(str(tmp_path / "index.duckdb"))
    index.add(records_of(storage))
    cursor = index.cursor()
    result = run_query(cursor, QueryRequest(level="SERIES", keys=["SeriesInstanceUID"]))
    index.add([msgspec.structs.replace(records_of(storage)[0], path="more/x.dcm")])  # writes go on meanwhile
    assert len(list(result)) >= 3
    cursor.close()
    index.close()


def test_files_outside_the_root_are_indexed_by_absolute_path(storage: Path, tmp_path: Path) -> None:
    sr_root = tmp_path / "sr"  # storage.sr_directory, outside the storage root
    (sr_root / "P").mkdir(parents=True)
    shutil.copyfile(storage / "SYNA" / "CT00001.dcm", sr_root / "P" / "report.dcm")
    found = {state.path for state in plan(str(storage), {}, sr_root=str(sr_root)).missing}
    assert str(sr_root / "P" / "report.dcm") in found and "SYNA/CT00001.dcm" in found
    path = str(tmp_path / "index.duckdb")
    result = reindex(str(storage), path, sr_root=str(sr_root), progress=io.StringIO())
    assert result.failed == [] and result.indexed == 4 + 3 + len(PYDICOM_FILES) + 1
    index = Index(path, read_only=True)
    assert rows(index, "SELECT count(*) FROM instances WHERE path = ?", [str(sr_root / "P" / "report.dcm")]) == [(1,)]
    index.close()


def test_thumbnails_are_recorded_and_queried(storage: Path, tmp_path: Path) -> None:
    from fastscp.index.records import ThumbnailMade

    index = Index(str(tmp_path / "index.duckdb"))
    records = records_of(storage)
    # A thumbnail may be reported before its instance's batch is committed.
    index.add([], thumbnails=[ThumbnailMade(path=records[0].path, thumbnail_path="thumbnails/a.jpg")])
    index.add(records, thumbnails=[ThumbnailMade(path=records[0].path, thumbnail_path="thumbnails/b.jpg")])
    result = run_query(index.cursor(), QueryRequest(level="IMAGE", keys=["Path", "ThumbnailPath"],
                                                    conditions=[QueryCondition("Path", records[0].path)]))
    assert list(result) == [[records[0].path, "thumbnails/b.jpg"]]
    index.remove([records[0].path])
    assert rows(index, "SELECT count(*) FROM thumbnails") == [(0,)]
    index.close()


def test_indexer_state_is_cheap_to_ask(tmp_path: Path) -> None:
    path = str(tmp_path / "index.duckdb")
    running = RunningIndexer(path)
    try:
        state = QueryClient(path).state()
        assert state.pid == os.getpid() and state.pending == 0 and state.reconcile == "off"
    finally:
        running.stop()


def test_uid_index_knows_received_and_committed_uids(storage: Path, tmp_path: Path) -> None:
    from fastscp.index.batchtable import InstanceBatch
    from fastscp.index.indexer import UidIndex
    from fastscp.index.records import InstanceColumns

    records = records_of(storage)
    first = msgspec.structs.replace(records[0], affected_sop_instance_uid="1.2.826.0.1.3680043.8.498.777")
    index = Index(str(tmp_path / "index.duckdb"))
    index.add([first])
    uids = UidIndex()
    assert uids.lookup(["1.2.3"]) == ([], True), "not loaded yet: DuckDB must be asked"
    cursor = index.cursor()
    uids.load(cursor)
    cursor.close()
    assert uids.lookup(["1.2.3"]) == ([], False)
    for uid in (first.header.sop_instance_uid, first.affected_sop_instance_uid):
        assert uids.lookup([uid]) == ([], True)
        assert Index.paths_of(index.cursor(), [uid]) == [first.path]
    # Received, not committed: known exactly, with its path.
    second = records[1]
    uids.received(InstanceColumns.of([second]))
    assert uids.lookup([second.header.sop_instance_uid]) == ([second.path], False)
    index.add([second])
    uids.committed(InstanceBatch.of([second]).table())
    assert uids.lookup([second.header.sop_instance_uid]) == ([], True)
    assert Index.paths_of(index.cursor(), [second.header.sop_instance_uid]) == [second.path]
    index.close()


def test_transaction_commits_or_rolls_back_and_unregisters(tmp_path: Path) -> None:
    import pyarrow as pa

    index = Index(str(tmp_path / "index.duckdb"))
    table = pa.table({"path": ["a.dcm"], "thumbnail_path": ["thumbnails/a.jpg"]})
    with pytest.raises(RuntimeError, match="the block's own error"):
        with index.transaction("made") as con:
            con.register("made", table)
            con.execute("INSERT INTO thumbnails SELECT * FROM made")
            raise RuntimeError("the block's own error")
    assert rows(index, "SELECT count(*) FROM thumbnails") == [(0,)]
    with pytest.raises(duckdb.CatalogException):
        index.con.execute("SELECT * FROM made")  # unregistered after a rollback
    with index.transaction("made") as con:
        con.register("made", table)
        con.execute("INSERT INTO thumbnails SELECT * FROM made")
    with pytest.raises(duckdb.CatalogException):
        index.con.execute("SELECT * FROM made")  # and after a commit
    index.close()
    reopened = Index(str(tmp_path / "index.duckdb"), read_only=True)
    assert rows(reopened, "SELECT * FROM thumbnails") == [("a.dcm", "thumbnails/a.jpg")]
    reopened.close()


def test_a_base_map_is_written_once_and_again_after_it_was_pruned(storage: Path, tmp_path: Path) -> None:
    """The index skips the INSERT of a base attribute map it wrote (a sender keeps one base per series),
    but not after a prune dropped it: each instance's whole map is always there to read."""
    import json

    from fastscp.index.batchtable import InstanceBatch
    from fastscp.index.records import RecordBatch

    template = records_of(storage)[0]
    maps = ['{"00180050":"5","00201041":"-1"}', '{"00180050":"5","00201041":"-2"}', '{"00180050":"5"}']

    def record(n: int) -> InstanceRecord:
        header = msgspec.structs.replace(template.header, sop_instance_uid=f"1.2.3.{n}", attributes=maps[n])
        return msgspec.structs.replace(template, path=f"S/{n}.dcm", header=header)

    index = Index(str(tmp_path / "index.duckdb"))
    known: dict = {}  # a sender's bases (IndexerClient)

    def send(n: int) -> None:
        batch = InstanceBatch()
        batch.add(RecordBatch.of([record(n)], known).instances)
        index.add_table(batch.table(), maps=batch.maps)

    def whole_map(n: int) -> dict[str, str]:
        (text,) = rows(index, "SELECT CAST(attributes AS VARCHAR) FROM instance_attributes WHERE path = ?",
                       [f"S/{n}.dcm"])[0]
        return json.loads(text)  # type: ignore[no-any-return]

    send(0)
    send(1)
    assert rows(index, "SELECT count(*) FROM attribute_maps") == [(1,)]
    assert whole_map(1) == json.loads(maps[1])
    assert index.remove(["S/0.dcm", "S/1.dcm"]) == 2
    assert rows(index, "SELECT count(*) FROM attribute_maps") == [(0,)]
    send(2)  # the same base, dropped by the prune: written again
    assert whole_map(2) == json.loads(maps[2])
    index.close()


def test_the_indexer_runs_duckdb_on_one_thread(tmp_path: Path) -> None:
    """indexer.INDEXER_THREADS: DuckDB's worker threads cost the indexer CPU per batch (see its PERF note)."""
    from fastscp.index.indexer import INDEXER_THREADS

    path = str(tmp_path / "index.duckdb")
    index = Index(path)
    indexer = Indexer(index, indexer_address(path), 10, 0.1)
    try:
        assert rows(index, "SELECT current_setting('threads')") == [(INDEXER_THREADS,)]
    finally:
        indexer._close_sockets()
        index.close()


def test_new_rows_land_in_their_columns_whatever_the_file_s_column_order(storage: Path, tmp_path: Path) -> None:
    """A migration appends columns at the end, so a file's column order need not be TABLES'; a batch
    of new instances is inserted by the file's order (Index._insert)."""
    path = str(tmp_path / "index.duckdb")
    made = Index(path)
    for name in ("size", "content_hash", "sop_instance_uid"):  # as if a migration had added them
        made.con.execute(f"ALTER TABLE instances DROP COLUMN {name}")
        made.con.execute(f"ALTER TABLE instances ADD COLUMN {name} {TABLES['instances'][name]}")
    made.close()
    index = Index(path)
    assert [row[0] for row in rows(index, "DESCRIBE instances")][-3:] == ["size", "content_hash", "sop_instance_uid"]
    records = records_of(storage)
    assert index.add(records) == len(records)
    for record in records:
        assert rows(index, "SELECT size, content_hash, sop_instance_uid FROM instances WHERE path = ?",
                    [record.path]) == [(record.size, record.content_hash, record.header.sop_instance_uid)]
        (found,) = [header for p, header in index.study_instances(record.header.study_instance_uid)
                    if p == record.path]
        assert found == record.header
    index.close()


# -- an indexer that lags (server.derived_priority): kept records ---------------------------


def _paths_in(messages: list[bytes]) -> list[str]:
    """The instance paths of encoded record messages, in order."""
    batch = InstanceBatch()
    for data in messages:
        batch.add(BATCH_DECODER.decode(data).instances)
    return batch.table().column("path").to_pylist() if batch.count else []


def test_a_worker_client_never_waits_for_an_indexer_that_does_not_read(storage: Path, tmp_path: Path) -> None:
    """A worker's client (with a kept folder) sends without waiting: what the full socket does not take
    stays in memory up to its bound, then goes to files; at close the rest does too. Every record ends
    up once, in the socket or in a file. Before, a full socket held the client's lock, and with it
    every association of the worker."""
    path = str(tmp_path / "index.duckdb")
    listener = listen(indexer_address(path), blocking=True)
    folder = tmp_path / "kept"
    modes = FileModes(file=0o640, folder=0o750)
    client = IndexerClient(indexer_address(path), kept_folder=str(folder), modes=modes, backlog_bytes=8 * 1024)
    sent = _worker_records(storage, 20_000)  # ~50 bytes each in a message of its series: ~1 MB, past the socket's
    sender = threading.Thread(target=lambda: [client.send(record) for record in sent], daemon=True)
    try:
        sender.start()
        conn, _ = listener.accept()  # connected at the first batch, never read until the end
        sender.join(60)
        assert not sender.is_alive(), "a send waited for the indexer"
        client.close()
        conn.setblocking(False)
        received: list[bytes] = []
        with conn, contextlib.suppress(BlockingIOError):
            while data := conn.recv(1 << 20):
                received.append(data)
        files = [str(folder / name) for name in kept_files(str(folder))]
        assert len(files) >= 2, "the bound was passed: files while sending, and one at close"
        kept = [m for f in files for m in read_kept(f)]
        assert sorted(_paths_in(received) + _paths_in(kept)) == sorted(r.path for r in sent)
        _assert_kept_at_the_bound(files, 8 * 1024)
        assert {stat.S_IMODE(os.stat(f).st_mode) for f in files} == {0o640}
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o750
        assert not [n for n in os.listdir(folder) if n.startswith(TEMP_PREFIX)]
    finally:
        client.close()
        listener.close()


def _assert_kept_at_the_bound(files: list[str], bound: int) -> None:
    """No file holds more than the backlog's bound, and each but the last (at close) was written once
    the next message would have passed it, not before."""
    held = [sum(map(len, read_kept(f))) for f in files]
    largest = max(len(m) for f in files for m in read_kept(f))
    assert all(size <= bound for size in held), held
    assert all(size > bound - largest for size in held[:-1]), (held, largest)


def _worker_records(storage: Path, count: int) -> list[InstanceRecord]:
    """``count`` records of one series, each its own path and SOP Instance UID."""
    template = records_of(storage)[0]
    return [msgspec.structs.replace(template, path=f"S/{n}.dcm",
                                    header=msgspec.structs.replace(template.header, sop_instance_uid=f"1.2.9.{n}"))
            for n in range(count)]


def test_a_worker_client_sends_what_waited_once_the_indexer_reads_again(storage: Path, tmp_path: Path) -> None:
    """Records its full socket did not take reach an indexer that reads again, with no further send,
    flush or close (the retry thread); none went to a file within the bound."""
    path = str(tmp_path / "index.duckdb")
    listener = listen(indexer_address(path), blocking=True)
    folder = tmp_path / "kept"
    client = IndexerClient(indexer_address(path), kept_folder=str(folder))
    sent = _worker_records(storage, 20_000)  # ~1 MB of messages: past the socket's ~200 KB
    try:
        sender = threading.Thread(target=lambda: [client.send(record) for record in sent], daemon=True)
        sender.start()
        conn, _ = listener.accept()
        received: list[str] = []
        with conn:
            sender.join(60)
            assert not sender.is_alive()
            assert client.pending > 0, "the socket took everything: nothing tested"
            conn.settimeout(0.5)
            deadline = time.monotonic() + 30
            while len(received) < len(sent) and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    received += _paths_in([conn.recv(1 << 20)])
        assert sorted(received) == sorted(r.path for r in sent)
        assert client.pending == 0
        assert not folder.exists()
    finally:
        client.close()
        listener.close()


def test_a_worker_client_keeps_records_in_files_while_the_indexer_is_down(
        storage: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No indexer listens (it is restarting): past the bound the records go to files then, not only at
    close, each once; "unreachable" is logged once, not per try."""
    path = str(tmp_path / "index.duckdb")
    folder = tmp_path / "kept"
    client = IndexerClient(indexer_address(path), kept_folder=str(folder), backlog_bytes=8 * 1024)
    sent = _worker_records(storage, 5000)
    try:
        with caplog.at_level("WARNING", logger="fastscp.indexclient"):
            for record in sent:
                client.send(record)
            while_running = kept_files(str(folder))
            client.close()
        assert len(while_running) >= 2
        files = [str(folder / name) for name in kept_files(str(folder))]
        _assert_kept_at_the_bound(files, 8 * 1024)
        assert sorted(_paths_in([m for f in files for m in read_kept(f)])) == sorted(r.path for r in sent)
        assert sum("unreachable" in r.getMessage() for r in caplog.records) == 1
    finally:
        client.close()


def test_the_indexer_takes_kept_records_once_idle_and_all_of_them_at_stop(tmp_path: Path, storage: Path) -> None:
    """Files of kept records (a worker's, while the indexer lagged) are indexed and removed: while it runs,
    once nothing waits, and before it stops."""
    root = tmp_path / "root"
    root.mkdir()
    path = str(tmp_path / "index.duckdb")
    folder = kept_folder(str(root))
    records = records_of(storage)
    running = RunningIndexer(path, root)
    queries = QueryClient(path)
    try:
        wait_until(lambda: queries.stats().indexer.reconcile == "done")  # type: ignore[union-attr]
        os.makedirs(folder)
        write_kept(folder, [ENCODER.encode(RecordBatch.of(records[:3])), ENCODER.encode(RecordBatch.of(records[3:5]))])
        wait_until(lambda: queries.stats().instances == 5)
        wait_until(lambda: kept_files(folder) == [])
        write_kept(folder, [ENCODER.encode(RecordBatch.of(records[5:]))])  # taken now or as it stops
    finally:
        running.stop()
    assert kept_files(folder) == []
    index = Index(path)
    try:
        assert sorted(p for (p,) in rows(index, "SELECT path FROM instances")) == sorted(r.path for r in records)
    finally:
        index.close()


def test_the_indexer_state_counts_kept_files_not_those_being_written(tmp_path: Path) -> None:
    """The status page's index lag (status.IndexerState.kept_files)."""
    root = tmp_path / "root"
    folder = kept_folder(str(root))
    indexer = Indexer(Index(str(tmp_path / "index.duckdb")), indexer_address(str(tmp_path / "index.duckdb")), 10, 0.1,
                      storage_root=str(root))
    try:
        assert indexer.state().kept_files == 0  # no folder yet
        os.makedirs(folder)
        write_kept(folder, [b"one"])
        write_kept(folder, [b"two", b"three"])
        Path(folder, f"{TEMP_PREFIX}1-2-3.records").write_bytes(b"being written")
        assert indexer.state().kept_files == 2
    finally:
        indexer._close_sockets()
        indexer.index.close()
