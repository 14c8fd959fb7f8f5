"""The workers' shared filter of indexed SOP Instance UIDs (fastscp.index.uidfilter): what the
indexer's UidIndex learns in one process (committed rows at start, records received, rows the
reconcile found) is seen by another process forked from the same parent, and nothing is ever
reported new that the index may hold."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import msgspec
import numpy as np

from fastscp.index.batchtable import InstanceBatch
from fastscp.index.database import Index
from fastscp.index.indexer import UidIndex
from fastscp.index.records import InstanceColumns
from fastscp.index.uidfilter import UidFilter
from tests.unit.index.test_index import make_storage, records_of

NEW = [f"1.2.826.0.1.3680043.8.498.{n}" for n in range(1000, 3000)]


def in_child(work) -> None:  # type: ignore[no-untyped-def]
    """Run ``work`` in a forked child (as the supervisor forks the indexer) and wait for it."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            work()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_what_the_indexer_learns_in_its_process_the_workers_see_in_theirs(tmp_path: Path) -> None:
    records = records_of(make_storage(tmp_path / "storage"))
    committed = msgspec.structs.replace(records[0], affected_sop_instance_uid="1.2.826.0.1.3680043.8.498.777")
    received, found = records[1], records[2]
    index = Index(str(tmp_path / "index.duckdb"))
    index.add([committed])
    index.close()
    shared = UidFilter()
    every = [committed.header.sop_instance_uid, committed.affected_sop_instance_uid,
             received.header.sop_instance_uid, found.header.sop_instance_uid]
    assert all(shared.may_hold([uid]) for uid in every + NEW), "before the committed rows are read: ask"

    def indexer() -> None:
        index = Index(str(tmp_path / "index.duckdb"))
        uids = UidIndex(shared)
        cursor = index.cursor()
        uids.load(cursor)
        cursor.close()
        uids.received(InstanceColumns.of([received]))
        uids.committed(InstanceBatch.of([found]).table(), found=True)
        index.close()

    in_child(indexer)
    assert shared.ready
    for uid in every:
        assert shared.may_hold([uid]), uid
        assert shared.may_hold([NEW[0], uid]), "any UID of the store that may be held: ask"
    new = [uid for uid in NEW if not shared.may_hold([uid])]
    assert len(new) == len(NEW), f"{len(NEW) - len(new)} new UIDs reported as maybe indexed"
    assert not shared.may_hold(["", NEW[0]]), "no UID (an empty Affected SOP Instance UID) is not a hit"


def test_received_records_stay_known_once_committed(tmp_path: Path) -> None:
    records = records_of(make_storage(tmp_path / "storage"))
    shared = UidFilter()
    index = Index(str(tmp_path / "index.duckdb"))
    uids = UidIndex(shared)
    cursor = index.cursor()
    uids.load(cursor)
    cursor.close()
    uids.received(InstanceColumns.of(records))
    index.add(records)
    uids.committed(InstanceBatch.of(records).table())
    index.close()
    assert all(shared.may_hold([r.header.sop_instance_uid]) for r in records)
    assert not any(shared.may_hold([uid]) for uid in NEW[:100])


def _minor_faults() -> int:
    return int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[7])


def test_a_worker_that_mapped_the_filter_in_reads_it_without_page_faults() -> None:
    """A forked child inherits the shared mapping but not its pages: without map_in, its first
    duplicate checks fault a page each (PERF, a worker's first thousands of stores)."""
    shared = UidFilter()
    shared.set_ready()

    def faults_of_the_checks(map_in: bool) -> None:
        # A collection in the child would write to every page of the parent's heap (copy-on-write
        # faults by the hundred in a long test session): none while the faults are counted.
        gc.disable()
        if map_in:
            shared.map_in()
        checks = [f"1.2.826.0.1.3680043.8.498.{n}" for n in range(5000, 6000)]
        before = _minor_faults()
        held = [uid for uid in checks if shared.may_hold([uid])]
        faults = _minor_faults() - before
        assert len(held) < 5, held
        # A thousand checks read ~1,600 of the 4,096 pages (~950 faults measured); the child's
        # writes to pages it shares with its parent fault a few dozen (~65 measured).
        assert (faults < 250) if map_in else (faults > 700), faults

    in_child(lambda: faults_of_the_checks(map_in=False))
    in_child(lambda: faults_of_the_checks(map_in=True))


def test_a_new_uid_is_asked_about_only_if_both_its_bits_are_set() -> None:
    """Each UID sets two bits; a new UID whose two bits are both set by others is asked about (a false
    positive), one with either bit clear is not. With 4.5% of the bits set, ~0.2% of new UIDs are
    asked about; if one bit were enough, ~9% would be, and each a question to the indexer."""
    shared = UidFilter()
    shared.set_ready()
    indexed = np.random.default_rng(13).integers(-(1 << 63), (1 << 63) - 1, size=3_000_000, dtype=np.int64)
    shared.add_hashes(indexed)
    asked = sum(shared.may_hold([uid]) for uid in NEW)
    assert asked < len(NEW) // 50, f"{asked} of {len(NEW)} new UIDs asked about"
