"""The study jobs of a shared index (fastscp.index.jobs) on a real PostgreSQL catalog: two nodes, one decision."""

from __future__ import annotations

import time
from collections.abc import Iterator

import duckdb
import pytest

from fastscp.index.database import _load_lake_extensions
from fastscp.index.jobs import StudyJobs
from tests.e2e.test_scaleout import postgres  # noqa: F401 (postgres: a fixture)


@pytest.fixture
def nodes(postgres) -> Iterator[tuple[StudyJobs, StudyJobs]]:  # type: ignore[no-untyped-def]  # noqa: F811
    made = []
    for name in ("node-a", "node-b"):
        con = duckdb.connect(":memory:")
        _load_lake_extensions(con)
        made.append(StudyJobs(con, postgres.catalog.removeprefix("postgres:"), name))
    yield made[0], made[1]
    for jobs in made:
        jobs.close()
        jobs.con.close()


def test_one_node_takes_a_quiet_study_once(nodes) -> None:  # type: ignore[no-untyped-def]
    a, b = nodes
    hostile = "1.2.3'; DROP TABLE fastscp_study_jobs; --"
    a.touch({"1.2.3": 100, hostile: 100}, 0.5)
    b.touch({"1.2.3": 200}, 0.5)  # the other half of the study, on the other node
    assert a.take(30) is None and b.take(30) is None, "not quiet yet"
    time.sleep(0.7)
    taken = [t for t in (a.take(30), b.take(30), a.take(30), b.take(30)) if t is not None]
    assert sorted(study for study, _version, _previous in taken) == sorted(["1.2.3", hostile])
    by_study = {study: version for study, version, _previous in taken}
    assert by_study["1.2.3"] == 2  # two touches
    assert a.take(30) is None and b.take(30) is None, "every due study is held"
    holder_of = {}
    for jobs in (a, b):
        for study in by_study:
            if jobs.renew(study, 30):
                holder_of[study] = jobs
    assert set(holder_of) == set(by_study), "each job has exactly one holder"
    for study, jobs in holder_of.items():
        other = b if jobs is a else a
        assert not other.finish(study, by_study[study], {}), "only the holder finishes"
        assert jobs.finish(study, by_study[study], {"node-a": 100, "node-b": 200})
    assert a.take(30) is None and b.take(30) is None, "done: not taken again"


def test_a_study_is_due_again_for_instances_its_job_did_not_read(nodes) -> None:  # type: ignore[no-untyped-def]
    a, b = nodes
    a.touch({"9.9": 1000}, 0.2)
    time.sleep(0.4)
    assert a.take(30) == ("9.9", 1, "")
    b.touch({"9.9": 50}, 0.2)  # more images while the job runs, which it read (node-b's index was ahead)...
    assert a.finish("9.9", 1, {"node-a": 1000, "node-b": 50})
    time.sleep(0.4)
    assert a.take(30) is None, "...so they are on the sheet already"
    b.touch({"9.9": 50}, 0.2)  # node-b's post-store stage lagging behind its indexer: nothing new
    time.sleep(0.4)
    assert a.take(30) is None
    a.touch({"9.9": 1500}, 0.2)  # new images
    time.sleep(0.4)
    assert b.take(30) == ("9.9", 3, "")
    b.touch({"9.9": 60}, 0.2)  # new images while that job runs, not read by it
    assert b.finish("9.9", 3, {"node-a": 1500, "node-b": 50})
    time.sleep(0.4)
    assert a.take(30) == ("9.9", 4, ""), "the sheet is made again"


def test_a_lapsed_lease_is_taken_over(nodes) -> None:  # type: ignore[no-untyped-def]
    a, b = nodes
    a.touch({"7.7": 1}, 0.1)
    time.sleep(0.3)
    assert a.take(1) == ("7.7", 1, "")
    assert b.take(1) is None, "held"
    time.sleep(1.3)  # node-a stops renewing: it died
    assert b.take(30) == ("7.7", 1, "node-a")
    assert not a.renew("7.7", 30) and not a.finish("7.7", 1, {"node-a": 1}), "node-a's lease is gone"
    a.release("7.7")  # a stale holder can't give back what it no longer holds
    assert b.renew("7.7", 30) and b.finish("7.7", 1, {"node-a": 1})


def test_a_stopping_node_gives_its_job_back(nodes) -> None:  # type: ignore[no-untyped-def]
    a, b = nodes
    a.touch({"5.5": 1}, 0.1)
    time.sleep(0.3)
    assert a.take(600) is not None
    a.release("5.5")
    assert b.take(30) == ("5.5", 1, "")
