"""Queries: DICOM matching as SQL, the query builder, and ``fastscp query`` / ``stats`` on a stopped index."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from fastscp.cli import index as cli_index
from fastscp.index.database import Index
from fastscp.query.attributes import ATTRIBUTES, DEFAULT_KEYS
from fastscp.query.engine import build_query, match_sql, run_query, run_stats
from fastscp.query.messages import Condition, QueryError, QueryRequest, StatsRequest
from tests.unit.index.test_index import make_storage, records_of


def matching(vr: str, value: str, candidates: list[str | None]) -> list[str | None]:
    """The candidates that ``value`` matches, by running match_sql's SQL in DuckDB."""
    params: list[object] = []
    condition = match_sql("v", vr, value, params) or "TRUE"
    con = duckdb.connect()
    con.execute("CREATE TABLE t (v VARCHAR)")
    con.executemany("INSERT INTO t VALUES (?)", [[c] for c in candidates])
    found = [row[0] for row in con.execute(f"SELECT v FROM t WHERE {condition} ORDER BY v", params).fetchall()]
    con.close()
    return found


@pytest.mark.parametrize(("vr", "value", "candidates", "expected"), [
    # universal matching
    ("LO", "", ["A", ""], ["", "A"]),
    ("LO", "*", ["A", ""], ["", "A"]),
    # single value: exact, case-sensitive except PN
    ("LO", "ab", ["ab", "AB", "abc"], ["ab"]),
    ("PN", "doe^john", ["Doe^John", "Doe^Johnny"], ["Doe^John"]),
    # wildcards: * any run, ? one character; SQL's own % and _ are plain characters
    ("PN", "DOE*", ["Doe^John", "Smith^Doe"], ["Doe^John"]),
    ("SH", "A?C", ["ABC", "AC", "ABBC"], ["ABC"]),
    ("LO", "50%", ["50%", "500", "50"], ["50%"]),
    ("LO", "a_b*", ["a_bc", "axbc"], ["a_bc"]),
    ("LO", "back\\slash", ["back", "slash", "backslash"], ["back", "slash"]),  # a list: any of
    # UIDs: list matching, no wildcards
    ("UI", "1.2\\1.3", ["1.2", "1.3", "1.4"], ["1.2", "1.3"]),
    ("UI", "1.2*", ["1.2", "1.23"], []),
    # date and time ranges, inclusive; empty values never match a range
    ("DA", "20240101-20240131", ["20231231", "20240101", "20240131", "20240201", ""], ["20240101", "20240131"]),
    ("DA", "-20240101", ["20231231", "20240101", "20240102", ""], ["20231231", "20240101"]),
    ("DA", "20240101-", ["20231231", "20240101", "20240102", ""], ["20240101", "20240102"]),
    ("TM", "1200-1300", ["115959", "1200", "120000", "130059.999", "1301"], ["1200", "120000", "130059.999"]),
])
def test_match_sql(vr: str, value: str, candidates: list[str], expected: list[str]) -> None:
    assert matching(vr, value, candidates) == expected


def test_numbers_match_as_numbers() -> None:
    params: list[object] = []
    assert match_sql("x", "IS", "12", params) == "x = ?" and params == [12]
    assert match_sql("x", "IS", "twelve", []) == "FALSE"


def test_values_are_parameters_never_sql() -> None:
    evil = "x' OR '1'='1"
    built = build_query(QueryRequest(level="STUDY", conditions=[Condition("PatientName", evil + "*"),
                                                                Condition("AccessionNumber", evil)]))
    assert evil not in built.sql and "x'" not in built.sql
    assert evil in built.params and "x' OR '1'='1%" in built.params


@pytest.mark.parametrize(("request_", "message"), [
    (QueryRequest(level="STUDY", keys=["Nonsense"]), "unknown key 'Nonsense'"),
    (QueryRequest(level="STUDY", keys=["SOPInstanceUID"]), "key of the IMAGE level"),
    (QueryRequest(level="STUDY", conditions=[Condition("Nonsense", "1")]), "unknown key 'Nonsense'"),
    (QueryRequest(level="STUDY", conditions=[Condition("NumberOfStudyRelatedInstances", "1")]), "computed"),
])
def test_bad_requests_are_refused(request_: QueryRequest, message: str) -> None:
    with pytest.raises(QueryError, match=message):
        build_query(request_)


def test_default_keys_are_known() -> None:
    for keys in DEFAULT_KEYS.values():
        assert set(keys) <= set(ATTRIBUTES)


@pytest.fixture(scope="module")
def index_path(tmp_path_factory) -> str:  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("query")
    storage = make_storage(folder / "storage")
    path = str(folder / "index.duckdb")
    index = Index(path)
    index.add(records_of(storage))
    index.close()
    return path


def query(index_path: str, request: QueryRequest) -> list[list[object]]:
    index = Index(index_path, read_only=True)
    try:
        return [list(row) for row in run_query(index.cursor(), request)]
    finally:
        index.close()


def test_lower_level_conditions_keep_rows_with_a_matching_descendant(index_path: str) -> None:
    patients = query(index_path, QueryRequest(level="PATIENT", keys=["PatientID"],
                                              conditions=[Condition("Modality", "MR")]))
    assert sorted(row[0] for row in patients) == ["4MR1", "SYNB"]
    studies = query(index_path, QueryRequest(level="STUDY", keys=["PatientID"], conditions=[
        Condition("Modality", "CT"), Condition("SOPClassUID", "1.2.840.10008.5.1.4.1.1.2")]))
    assert sorted(row[0] for row in studies) == ["1CT1", "SYNA"]


def test_limit_and_order(index_path: str) -> None:
    rows = query(index_path, QueryRequest(level="IMAGE", keys=["PatientID", "InstanceNumber"],
                                          conditions=[Condition("PatientID", "SYNA")], limit=3))
    assert rows == [["SYNA", 1], ["SYNA", 2], ["SYNA", 3]]
    studies = query(index_path, QueryRequest(level="STUDY", keys=["StudyDate", "NumberOfStudyRelatedSeries"]))
    dates = [row[0] for row in studies]
    assert dates == sorted(dates, reverse=True) and all(row[1] == 1 for row in studies)


def test_stats(index_path: str) -> None:
    index = Index(index_path, read_only=True)
    stats = run_stats(index.cursor(), StatsRequest())
    index.close()
    assert stats.instances == 12 and stats.patients == 7 and stats.indexer is None
    assert {c.name: c.instances for c in stats.by_modality} == {"CT": 5, "MR": 4, "NM": 1, "OT": 2}
    assert sum(c.instances for c in stats.by_day) == 12
    assert stats.bytes == sum(c.bytes for c in stats.by_calling_ae_title)


def test_cli_query_table_and_json(index_path: str, capsys) -> None:  # type: ignore[no-untyped-def]
    assert cli_index.main(["query", "studies", "--index-db", index_path, "--patient-name", "synth*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["PatientID", "PatientName", "StudyDate"]
    assert len(lines) == 3 and {line.split()[0] for line in lines[1:]} == {"SYNA", "SYNB"}
    # columns line up: each starts where its header does
    start = lines[0].index("StudyDate")
    assert all(line[start:start + 8] == "20260101" for line in lines[1:])
    assert cli_index.main(["query", "series", "--index-db", index_path, "--modality", "MR", "--json",
                           "--keys", "PatientID,Modality,NumberOfSeriesRelatedInstances"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(rows, key=lambda r: r["PatientID"]) == [
        {"PatientID": "4MR1", "Modality": "MR", "NumberOfSeriesRelatedInstances": 1},
        {"PatientID": "SYNB", "Modality": "MR", "NumberOfSeriesRelatedInstances": 3}]


CT1_STUDY = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
MR4_STUDY = "1.3.6.1.4.1.5962.1.2.4.20040826185059.5457"


@pytest.mark.parametrize(("argv", "patient_ids"), [
    (["studies", "--date", "20260101", "--accession", "ACC*"], ["SYNA", "SYNB"]),
    (["studies", "--date", "20040101-20040131"], ["1CT1"]),
    (["studies", "--date", "20040826-"], ["4MR1", "8NM1", "SYNA", "SYNB"]),
    (["studies", "--date", "-20251231", "--accession", "ACC*"], []),
    (["studies", "--accession", "ACC0001"], ["SYNA", "SYNB"]),
    (["patients", "--date", "-20040201"], ["1CT1"]),
    (["instances", "--study-uid", CT1_STUDY], ["1CT1"]),
    (["instances", "--study-uid", f"{CT1_STUDY}\\{MR4_STUDY}"], ["1CT1", "4MR1"]),
    (["instances", "--study-uid", f"{CT1_STUDY}\\{MR4_STUDY}", "--limit", "1"], None),
    (["instances", "--patient-id", "SYNA"], ["SYNA"] * 4),
    (["instances", "--patient-id", "SYNA", "--limit", "2"], ["SYNA"] * 2),
])
def test_cli_filters(index_path: str, argv: list[str], patient_ids: list[str] | None,
                     capsys) -> None:  # type: ignore[no-untyped-def]
    assert cli_index.main(["query", *argv, "--index-db", index_path, "--json", "--keys", "PatientID"]) == 0
    found = sorted(json.loads(line)["PatientID"] for line in capsys.readouterr().out.splitlines())
    if patient_ids is None:  # --limit 1 of two: either one, but only one
        assert found in (["1CT1"], ["4MR1"])
    else:
        assert found == patient_ids


def test_cli_refuses_a_bad_date_and_a_missing_index(index_path: str, tmp_path: Path,
                                                    capsys) -> None:  # type: ignore[no-untyped-def]
    assert cli_index.main(["query", "studies", "--index-db", index_path, "--date", "2024-01-01"]) == 2
    assert "--date '2024-01-01': use YYYYMMDD" in capsys.readouterr().err
    assert cli_index.main(["stats", "--storage-dir", str(tmp_path / "nothing")]) == 1
    assert "no such index file" in capsys.readouterr().err


def test_cli_index_chosen_by_storage_dir_and_config(index_path: str, tmp_path: Path,
                                                    capsys) -> None:  # type: ignore[no-untyped-def]
    storage = Path(index_path).parent
    assert cli_index.main(["stats", "--storage-dir", str(storage), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["instances"] == 12
    config = tmp_path / "site.yaml"
    config.write_text(f"storage:\n  directory: {tmp_path}\ndatabase:\n  path: {index_path}\n")
    assert cli_index.main(["stats", "--config", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["patients"] == 7


def test_attribute_map_keys_read_the_instance_over_its_series_base(tmp_path: Path) -> None:
    """An instance's own entries win over its series' base map; a null entry is an attribute it lacks."""
    import msgspec

    from tests.unit.index.test_batchtable import instance

    maps = ['{"00080080":"Base Hospital","00180050":"5","00201041":"-10"}',
            '{"00080080":"Base Hospital","00180050":"2.5","00201041":"-12.5"}',
            '{"00180050":"5","00201041":"-15"}']  # no Institution Name
    records = [instance(n, series=1, attributes=text) for n, text in enumerate(maps)]
    index = Index(str(tmp_path / "index.duckdb"))
    index.add(records)
    cursor = index.cursor()

    def images(*conditions: Condition) -> list[list[object]]:
        request = QueryRequest(level="IMAGE", conditions=list(conditions),
                               keys=["InstanceNumber", "InstitutionName", "SliceThickness"])
        return list(run_query(cursor, request))

    assert images() == [[0, "Base Hospital", "5"], [1, "Base Hospital", "2.5"], [2, None, "5"]]
    assert [row[0] for row in images(Condition("SliceThickness", "5"))] == [0, 2]
    assert [row[0] for row in images(Condition("InstitutionName", "Base*"))] == [0, 1]
    assert [row[0] for row in images(Condition("SliceLocation", "-12.5"))] == [1]
    # The newest instance (received last) that has a value answers for the series.
    series = list(run_query(cursor, QueryRequest(level="SERIES", keys=["InstitutionName", "SliceThickness"])))
    assert series == [["Base Hospital", "5"]]
    later = msgspec.structs.replace(records[1], received_at=records[2].received_at + 1)
    index.add([later])
    series = list(run_query(cursor, QueryRequest(level="SERIES", keys=["InstitutionName", "SliceThickness"])))
    assert series == [["Base Hospital", "2.5"]]
    with pytest.raises(QueryError, match="unknown key 'ReferencedImageSequence'"):
        build_query(QueryRequest(level="IMAGE", keys=["ReferencedImageSequence"]))
    cursor.close()
    index.close()
