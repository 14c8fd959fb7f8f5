"""Index speed at 1M instances: batch inserts, the indexer end to end, query latency.

Run with ``pytest bench/test_bench_index.py --benchmark-only`` (builds a
1M-instance index first, ~30 s). Each insert benchmark reports rows/s
(printed, and ``extra_info["rows_per_s"]`` in ``--benchmark-json``); the
query benchmarks report their median latency.

The data: CT/MR/US/CR studies of 100 instances in 4 series, two studies per
patient, study dates over two years; records as a worker sends them.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import statistics
import time
from collections.abc import Iterator

import msgspec
import pytest
from pydicom.dataset import Dataset

from fastscp.dicom.header import HeaderFields
from fastscp.index.client import BATCH_RECORDS, indexer_address
from fastscp.index.database import Index
from fastscp.index.records import ENCODER, InstanceRecord, RecordBatch
from fastscp.query.cfind import STUDY_ROOT_FIND, find
from fastscp.query.client import LocalQueryClient, QueryClient
from fastscp.query.engine import run_query, run_stats
from fastscp.query.messages import Condition, QueryRequest, StatsRequest
from fastscp.runtime.children import indexer_process
from fastscp.runtime.messages import FROM_INDEXER, Ready

#: Rows of the big index (FASTSCP_BENCH_INDEX_ROWS for a quick try).
INSTANCES = int(os.environ.get("FASTSCP_BENCH_INDEX_ROWS", 1_000_000))
_BASE = HeaderFields(
    patient_sex="O", patient_birth_date="19700101", study_time="120000", study_description="CT CHEST",
    sop_class_uid="1.2.840.10008.5.1.4.1.1.2", rows=512, columns=512, bits_allocated=16, bits_stored=12,
    pixel_representation=0, samples_per_pixel=1, photometric_interpretation="MONOCHROME2", window_center=40.0,
    window_width=400.0, rescale_slope=1.0, rescale_intercept=-1024.0, pixel_data_offset=1480,
)
_MODALITIES = ("CT", "MR", "US", "CR")
_ROOT = "1.2.826.0.1.3680043.8.498"

# The attribute map of a CT image (HeaderFields.attributes): the 46 attributes
# of pydicom's CT_small.dcm that have no column, plus 54 more a current CT
# sends (dose, helical scan, reconstruction; values of their usual length):
# 99 attributes, ~2.3 KB of JSON; 7 differ from instance to instance (acquisition and
# content time, position, slice location, table position, tube current, exposure).
_CT_MAP = {
    "00080012": "20040119", "00080013": "072731", "00080014": "1.3.6.1.4.1.5962.3", "00080021": "19970430",
    "00080022": "19970430", "00080023": "19970430", "00080031": "112749", "00080032": "{time}",
    "00080033": "{time}", "00080070": "GE MEDICAL SYSTEMS", "00080080": "JFK IMAGING CENTER",
    "00080201": "-0500", "00081010": "CT01_OC0", "00081090": "RHAPSODE", "00101010": "000Y",
    "00101030": "0.000000", "00180010": "ISOVUE300/100", "00180022": "HELICAL MODE", "00180050": "5.000000",
    "00180060": "120", "00180088": "5.000000", "00180090": "480.000000", "00181020": "05",
    "00181040": "IV", "00181100": "338.671600", "00181110": "1099.3100585938", "00181111": "630.000000",
    "00181120": "0.000000", "00181130": "133.699997", "00181150": "1601", "00181151": "{ma}",
    "00181152": "{ma}", "00181160": "LARGE BOWTIE FIL", "00181190": "0.700000", "00181210": "STANDARD",
    "00185100": "FFS", "00200012": "2", "00200032": "-158.135803\\\\-179.035797\\\\{z}",
    "00200037": "1.000000\\\\0.000000\\\\0.000000\\\\0.000000\\\\1.000000\\\\0.000000",
    "00200052": "1.3.6.1.4.1.5962.1.4.1.1.20040119072730.12322", "00201040": "SN", "00201041": "{z}",
    "00204000": "Uncompressed", "00280030": "0.661468\\\\0.661468", "00280102": "11", "00280120": "-2000",
    "0008002A": "20040119112936.000000", "00080081": "1 Hospital Road, Springfield",
    "00081040": "RADIOLOGY", "00081070": "OPERATOR^ONE", "00101020": "1.75", "00181000": "46124",
    "00181012": "20040119", "00181030": "CHEST ABDOMEN PELVIS", "00181200": "20031101", "00181201": "083000",
    "00189004": "PRODUCT", "00189073": "5.25", "00189302": "SPIRAL", "00189303": "0.0",
    "00189305": "0.5", "00189306": "0.625", "00189307": "40.0", "00189309": "78.75",
    "00189310": "39.375", "00189311": "0.984375", "00189313": "0.0\\\\-25.0\\\\-150.0",
    "00189318": "0.0\\\\-25.0\\\\-150.0", "00189323": "SMART MA", "00189324": "0.35",
    "00189345": "12.7400", "00189351": "170", "00189352": "120\\\\170\\\\220", "00200100": "1",
    "00201002": "250", "00209128": "1", "00280301": "NO", "00281054": "HU",
    "00281055": "WINDOW1\\\\WINDOW2", "00282110": "00", "00321060": "CT CHEST ABDOMEN PELVIS WITH CONTRAST",
    "00400244": "20040119", "00400245": "072000", "00400253": "PPS0012345", "00400254": "CT CAP",
    "00181004": "DET-77", "00181050": "0.625", "00181140": "CW",
    "00181170": "72", "00185101": "PA", "00189319": "0.0", "00189320": "RANGE 1",
    "00189327": "{z}", "00189334": "NO", "00189335": "250.0", "00189341": "-1.0", "00189346": "1.0",
    "00200020": "L\\\\P", "00200062": "L",
}
_MAP_TEMPLATE = "{{" + ",".join(f'"{tag}":"{value}"' for tag, value in _CT_MAP.items()) + "}}"  # for str.format


def study_date(study: int) -> str:
    day = 1 + study % 28
    month = 1 + (study // 28) % 12
    year = 2023 + (study // 336) % 2
    return f"{year}{month:02d}{day:02d}"


def record(k: int) -> InstanceRecord:
    """Instance ``k``: 100 per study, 25 per series, 2 studies per patient."""
    study, series = k // 100, k // 25
    patient = study // 2
    header = msgspec.structs.replace(
        _BASE, patient_id=f"P{patient:06d}", patient_name=f"NAME{patient % 997}^GIVEN{patient}",
        study_instance_uid=f"{_ROOT}.1.{study}", study_date=study_date(study), accession_number=f"A{study}",
        series_instance_uid=f"{_ROOT}.2.{series}", series_number=series % 4 + 1, modality=_MODALITIES[study % 4],
        sop_instance_uid=f"{_ROOT}.3.{k}", instance_number=k % 25 + 1,
        attributes=_MAP_TEMPLATE.format(time=f"{112936 + k % 3600:06d}", z=f"{-75.7 - k % 25 * 5:.6f}",
                                        ma=170 + k % 60),
    )
    return InstanceRecord(
        path=f"P{patient:06d}/{header.study_date}_{header.study_instance_uid}/{header.series_number}_"
             f"{header.modality}/{header.sop_instance_uid}.dcm",
        size=525_000 + k % 1000, transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae_title=f"MOD{study % 7}",
        called_ae_title="FASTSCP", peer_address="10.0.0.5:40000", received_at=1_700_000_000.0 + k * 0.001,
        header=header, content_hash=f"{k:064x}",
    )


def records(start: int, count: int) -> list[InstanceRecord]:
    return [record(k) for k in range(start, start + count)]


def report(benchmark, label: str, rows: int) -> None:  # type: ignore[no-untyped-def]
    median = benchmark.stats.stats.median
    benchmark.extra_info["rows_per_s"] = round(rows / median)
    print(f"\n{label}: median {median * 1000:.1f} ms for {rows} rows = {rows / median:,.0f} rows/s")


@pytest.fixture(scope="module")
def big_index(tmp_path_factory) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A 1M-instance index file (its path), closed."""
    path = str(tmp_path_factory.mktemp("bench-index") / "index.duckdb")
    index = Index(path)
    started = time.perf_counter()
    for start in range(0, INSTANCES, 10_000):
        index.add(records(start, 10_000))
    index.prune()
    index.checkpoint()
    seconds = time.perf_counter() - started
    print(f"\nbuilt {INSTANCES:,} instances in {seconds:.1f} s ({INSTANCES / seconds:,.0f} rows/s, making records "
          "included)")
    index.close()
    yield path


# Query targets in the middle of the data, whatever INSTANCES is.
_STUDY = INSTANCES // 200 // 4 * 4  # a CT study (study % 4 == 0)
QUERIES = {
    "study by PatientID": QueryRequest(level="STUDY", conditions=[Condition("PatientID", f"P{_STUDY // 2:06d}")]),
    "studies in a date range": QueryRequest(level="STUDY", conditions=[Condition("StudyDate", "20240301-20240307")]),
    "patients by name wildcard": QueryRequest(level="PATIENT", conditions=[Condition("PatientName", "name42^*")]),
    "series of a study": QueryRequest(level="SERIES",
                                      conditions=[Condition("StudyInstanceUID", f"{_ROOT}.1.{_STUDY}")]),
    "instances of a series": QueryRequest(
        level="IMAGE", conditions=[Condition("SeriesInstanceUID", f"{_ROOT}.2.{_STUDY * 4 + 1}")], ordered=False,
        keys=["SOPInstanceUID", "InstanceNumber", "Path"]),
    "CT studies of one day": QueryRequest(level="STUDY", conditions=[
        Condition("StudyDate", study_date(_STUDY)), Condition("ModalitiesInStudy", "CT")]),
}


@pytest.mark.parametrize("name", list(QUERIES))
def test_query_latency_at_1m(benchmark, big_index: str, name: str) -> None:  # type: ignore[no-untyped-def]
    index = Index(big_index, read_only=True)
    cursor = index.cursor()
    try:
        found = benchmark.pedantic(lambda: list(run_query(cursor, QUERIES[name])), rounds=30, warmup_rounds=2)
        assert found, name
        print(f"\n{name}: median {benchmark.stats.stats.median * 1000:.2f} ms, {len(found)} rows")
    finally:
        cursor.close()
        index.close()


def test_stats_latency_at_1m(benchmark, big_index: str) -> None:  # type: ignore[no-untyped-def]
    index = Index(big_index, read_only=True)
    cursor = index.cursor()
    try:
        stats = benchmark.pedantic(lambda: run_stats(cursor, StatsRequest()), rounds=10, warmup_rounds=1)
        assert stats.instances >= INSTANCES
        print(f"\nstats: median {benchmark.stats.stats.median * 1000:.1f} ms")
    finally:
        cursor.close()
        index.close()


def test_c_find_study_level_at_1m(benchmark, big_index: str) -> None:  # type: ignore[no-untyped-def]
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientName = "NAME42^*"
    ds.add_new(0x00080020, "DA", "")
    ds["StudyDate"]._value = "20230101-"  # a range, as decoded from the wire (pydicom's setter refuses it)
    ds.StudyInstanceUID = ""
    ds.ModalitiesInStudy = ""
    ds.NumberOfStudyRelatedInstances = ""
    with LocalQueryClient(big_index) as client:
        found = benchmark.pedantic(lambda: list(find(STUDY_ROOT_FIND, ds, client)), rounds=20, warmup_rounds=2)
    assert found
    print(f"\nC-FIND STUDY level: median {benchmark.stats.stats.median * 1000:.2f} ms, {len(found)} matches")


# -- writes (after the queries: they grow the big index) --------------------------------------


@pytest.mark.parametrize("batch", [1000, 10_000])
def test_insert_batch_into_1m(benchmark, big_index: str, batch: int) -> None:  # type: ignore[no-untyped-def]
    """Index.add of one batch of new instances (new studies included) into the 1M index."""
    index = Index(big_index)
    counter = iter(range(INSTANCES, INSTANCES * 10, batch))
    try:
        benchmark.pedantic(index.add, setup=lambda: ((records(next(counter), batch),), {}), rounds=15,
                           warmup_rounds=1)
        report(benchmark, f"Index.add, batch {batch}", batch)
    finally:
        index.close()


def _send(address: str, start: int, count: int, go) -> None:  # type: ignore[no-untyped-def]
    # The messages a worker's IndexerClient sends (RecordBatch of
    # BATCH_RECORDS, a base attribute map per series kept between them),
    # made before the start: the clock measures the indexer.
    known: dict = {}
    messages = [ENCODER.encode(RecordBatch.of(records(first, min(BATCH_RECORDS, start + count - first)), known))
                for first in range(start, start + count, BATCH_RECORDS)]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(address)
    go.wait()
    for message in messages:
        sock.send(message)
    sock.close()


@pytest.mark.parametrize("total", [200_000, 1_000_000], ids=["200k", "1M"])
def test_indexer_sustained_rate(benchmark, tmp_path, total: int) -> None:  # type: ignore[no-untyped-def]
    """Two sender processes (workers) flood the indexer process (batch_size 1000, interval 0.2 s) with records.

    The indexer runs as the server runs it: its own process, started by
    ``indexer_process`` (GC and interpreter tuning included). 1M records cross
    DuckDB's checkpoint threshold (index.CHECKPOINT_WAL_BYTES) about twice,
    so that rate includes the checkpoints a busy indexer can't defer.
    """
    senders = 2
    rates = []
    fork = multiprocessing.get_context("fork")

    def run_once() -> None:
        path = str(tmp_path / f"sustained-{len(rates)}.duckdb")
        channel, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        indexer = fork.Process(target=indexer_process,
                               args=(child_end, path, True, indexer_address(path), 1000, 0.2))
        indexer.start()
        child_end.close()
        channel.settimeout(60)
        assert isinstance(FROM_INDEXER.decode(channel.recv(65536)), Ready)
        go = fork.Barrier(senders + 1)
        processes = [fork.Process(target=_send, args=(indexer_address(path), n * total // senders,
                                                      total // senders, go)) for n in range(senders)]
        for process in processes:
            process.start()
        go.wait()
        started = time.perf_counter()
        client = QueryClient(path)
        while client.state().committed < total:
            time.sleep(0.005)
        rates.append(total / (time.perf_counter() - started))
        for process in processes:
            process.join()
        indexer.terminate()  # SIGTERM: the indexer's own orderly stop
        indexer.join(60)
        channel.close()
        assert indexer.exitcode == 0

    benchmark.pedantic(run_once, rounds=3)
    benchmark.extra_info["rows_per_s"] = round(statistics.median(rates))
    print(f"\nindexer end to end, {total:,} records from {senders} senders: median {statistics.median(rates):,.0f} "
          f"rows/s (rounds: {', '.join(f'{rate:,.0f}' for rate in rates)})")
