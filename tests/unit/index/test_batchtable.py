"""Instance records on their way to the index: run-length coded columns (records.InstanceColumns) through
msgpack, gathered in a batchtable.InstanceBatch, expanded into one Arrow table; the parent rows of a batch."""

from __future__ import annotations

import datetime
import json

import msgspec
import pytest

from fastscp.dicom.header import HeaderFields
from fastscp.index.batchtable import SCHEMA, InstanceBatch, distinct_rows, last_per_path
from fastscp.index.records import (
    BATCH_DECODER,
    ENCODER,
    INSTANCE_COLUMNS,
    KNOWN_BASE_CHARS,
    KNOWN_SERIES,
    InstanceRecord,
    RecordBatch,
    ThumbnailMade,
    map_id,
    split_maps,
)


def instance(n: int, *, series: int = 0, **header: object) -> InstanceRecord:
    fields = {"patient_id": "P1", "patient_name": "Doe^Jane", "study_instance_uid": "1.2.1",
              "series_instance_uid": f"1.2.1.{series}", "series_number": series or None, "modality": "CT",
              "sop_instance_uid": f"1.2.1.{series}.{n}", "instance_number": n, "window_center": 40.0, **header}
    return InstanceRecord(path=f"P1/1.2.1/{series}/{n}.dcm", size=1000 + n, transfer_syntax_uid="1.2.840.10008.1.2.1",
                          calling_ae_title="CT01", called_ae_title="FASTSCP", peer_address="127.0.0.1:4000",
                          received_at=1_700_000_000.25 + n, header=HeaderFields(**fields), content_hash=f"{n:064x}")


def merge_patch(base: dict[str, object], patch: dict[str, object]) -> dict[str, object]:
    """RFC 7386 on flat objects: what DuckDB's json_merge_patch (the instance_attributes view) does."""
    merged = {**base, **patch}
    return {key: value for key, value in merged.items() if value is not None}


def expected_rows(records: list[InstanceRecord]) -> list[dict[str, object]]:
    """The oracle: each record's fields, one dict per record (received_at as a UTC timestamp).

    The attribute map is the first map of the record's series in the batch
    (``attributes_base``, its id) and the record's own entries over it
    (``attributes``, parsed here: compare with :func:`parsed`).
    """
    rows = []
    first: dict[str, str] = {}
    for record in records:
        row = {**msgspec.structs.asdict(record), **msgspec.structs.asdict(record.header)}
        row.pop("header")
        row["received_at"] = datetime.datetime(1970, 1, 1) + datetime.timedelta(seconds=record.received_at)
        base = first.setdefault(record.header.series_instance_uid, record.header.attributes)
        own, whole = json.loads(base), json.loads(record.header.attributes)
        row["attributes"] = {key: value for key, value in whole.items() if own.get(key) != value} | {
            key: None for key in own if key not in whole}
        row["attributes_base"] = map_id(base)
        rows.append({name: row[name] for name in INSTANCE_COLUMNS})
    return rows


def parsed(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    return [{**row, "attributes": json.loads(row["attributes"])} for row in rows]  # type: ignore[arg-type]


def through_the_wire(records: list[InstanceRecord]) -> RecordBatch:
    return BATCH_DECODER.decode(ENCODER.encode(RecordBatch.of(records)))


def test_shared_values_travel_once_and_come_back_per_instance() -> None:
    # Two series, an instance with a null series number among them: runs, plain columns and nulls.
    records = [instance(n, series=n // 5) for n in range(12)]
    batch = through_the_wire(records).instances
    by_name = dict(zip(INSTANCE_COLUMNS, batch.values, strict=True))
    assert by_name["patient_id"] == ["P1"] and by_name["series_instance_uid"] == ["1.2.1.0", "1.2.1.1", "1.2.1.2"]
    assert len(by_name["path"]) == 12  # every value differs: no runs
    gathered = InstanceBatch()
    gathered.add(batch)
    assert parsed(gathered.table().to_pylist()) == expected_rows(records)


def test_batches_of_either_coding_gather_in_order() -> None:
    first = [instance(n, series=1) for n in range(6)]  # runs
    second = [instance(n, series=n + 10) for n in range(6, 9)]  # series columns plain
    gathered = InstanceBatch()
    for records in (first, second, []):
        gathered.add(through_the_wire(records).instances)
    assert gathered.count == 9
    table = gathered.table()
    assert table.schema == SCHEMA
    assert parsed(table.to_pylist()) == expected_rows(first + second)
    assert InstanceBatch.of(first + second).table().equals(table)


def test_other_records_ride_along_in_order() -> None:
    made = [ThumbnailMade(path="a.dcm", thumbnail_path="thumbnails/a.jpg"),
            ThumbnailMade(path="b.dcm", thumbnail_path="thumbnails/b.jpg")]
    batch = through_the_wire([made[0], instance(1), made[1]])
    assert batch.others == made and batch.instances.count == 1


def test_an_empty_batch_makes_an_empty_table() -> None:
    table = InstanceBatch().table()
    assert table.num_rows == 0 and table.schema == SCHEMA
    assert distinct_rows(table, ("series_instance_uid", "modality")) == {}


def test_last_per_path_keeps_the_last_copy_in_order() -> None:
    records = [instance(1), instance(2), msgspec.structs.replace(instance(1), size=7), instance(3)]
    table = last_per_path(InstanceBatch.of(records).table())
    assert [(row["path"], row["size"]) for row in table.to_pylist()] == [
        ("P1/1.2.1/0/2.dcm", 1002), ("P1/1.2.1/0/1.dcm", 7), ("P1/1.2.1/0/3.dcm", 1003)]
    unique = InstanceBatch.of(records[:2]).table()
    assert last_per_path(unique) is unique


@pytest.mark.parametrize("order", ["ab", "aba", "abba"])
def test_distinct_rows_give_the_last_row_of_each_key(order: str) -> None:
    # Series "a" changes its description half-way: its last row wins. Series "b" has no
    # Series Number (null): nulls compare as changes, which must not matter.
    description = {"a": iter(["FIRST", "LAST", "LAST"]), "b": iter([""] * 3)}
    records = [instance(n, series=ord(key), series_description=next(description[key]),
                        series_number=None if key == "b" else 1)
               for n, key in enumerate(order)]
    rows = distinct_rows(InstanceBatch.of(records).table(), ("series_instance_uid", "series_number",
                                                             "series_description"))
    oracle = {}
    for record in records:
        oracle[record.header.series_instance_uid] = (record.header.series_instance_uid, record.header.series_number,
                                                     record.header.series_description)
    assert rows == oracle


def test_attribute_maps_travel_as_a_base_per_series_and_each_instance_s_own_entries() -> None:
    maps = ['{"00180050":"5","00200032":"1\\\\2\\\\3","00080080":"A \\"B\\"","00181151":"170"}',
            '{"00180050":"5","00200032":"1\\\\2\\\\8","00080080":"A \\"B\\"","00181151":"170"}',
            '{"00180050":"5","00080080":"A \\"B\\"","00181151":"170","00201041":"-8"}',
            '{}']
    records = [instance(n, series=n // 3, attributes=text) for n, text in enumerate(maps + maps[:1])]
    batch = through_the_wire(records).instances
    assert len(batch.maps) == 2  # one base per series
    gathered = InstanceBatch()
    gathered.add(batch)
    rows = gathered.table().to_pylist()
    assert parsed(rows) == expected_rows(records)
    assert [row["attributes"] for row in rows[:3]] == ["{}", '{"00200032":"1\\\\2\\\\8"}',
                                                      '{"00201041":"-8","00200032":null}']
    for record, row in zip(records, rows, strict=True):  # base + own entries = the instance's map
        whole = merge_patch(json.loads(gathered.maps[row["attributes_base"]]), json.loads(row["attributes"]))
        assert whole == json.loads(record.header.attributes)
    deltas, ids, bases = split_maps([], [])
    assert (deltas, ids, bases) == ([], [], {})


def test_a_sender_keeps_one_base_per_series_and_every_message_carries_it() -> None:
    """With a sender's ``known`` bases, later messages of a series refer to its first base (the indexer writes
    its text once) and still carry that text; each instance's map is its base plus its own entries."""
    maps = ['{"00180050":"5","00200032":"1\\\\2\\\\3","00181151":"170"}',
            '{"00180050":"5","00200032":"1\\\\2\\\\8","00181151":"170"}',
            '{"00180050":"5","00181151":"171","00201041":"-8"}']
    known: dict = {}
    messages = []
    for n, text in enumerate(maps):  # one message per instance: each was its own base before
        records = [instance(n, series=1, attributes=text)]
        messages.append((records, BATCH_DECODER.decode(ENCODER.encode(RecordBatch.of(records, known))).instances))
    first = map_id(maps[0])
    for records, columns in messages:
        assert columns.maps == {first: maps[0]}
        gathered = InstanceBatch()
        gathered.add(columns)
        (row,) = gathered.table().to_pylist()
        assert row["attributes_base"] == first
        whole = merge_patch(json.loads(gathered.maps[first]), json.loads(row["attributes"]))
        assert whole == json.loads(records[0].header.attributes)
    # Without known bases each message's first map is its base, as before.
    assert RecordBatch.of([instance(2, series=1, attributes=maps[2])]).instances.maps == {map_id(maps[2]): maps[2]}


def test_known_bases_are_bounded() -> None:
    known: dict = {}
    long_map = '{"00100010":"' + "x" * KNOWN_BASE_CHARS + '"}'
    split_maps([long_map], ["1.2.3"], known)
    assert known == {}, "a long base is not kept: every message of its series would carry it"
    split_maps(['{"00180050":"5"}'] * (KNOWN_SERIES + 1), [f"1.2.{n}" for n in range(KNOWN_SERIES + 1)], known)
    assert 0 < len(known) <= KNOWN_SERIES
