"""Scale-out: a study split over two nodes of one DuckLake index is one study.

Real ``fastscp serve`` nodes on one index (PostgreSQL catalog started by the
test, tests/e2e/test_scaleout.py), dcmtk's storescu sending half of one
series to each: the study-complete hook configured on both runs once, on
the node that holds the study's job, and the scan sheet covers every
instance; when the holder is killed (kill -9) while its hook runs, the
other node takes the job over when the lease runs out, and the hook
completes once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fastscp.dicom.synthetic import write_series
from tests.conftest import Server, wait_until
from tests.e2e.test_scaleout import PostgresCluster, node_config, postgres, stop_all  # noqa: F401 (postgres: a fixture)

pytestmark = pytest.mark.dcmtk

STUDY_TIMEOUT = 4
#: Writes "<node> <pid>" to OUT/started and its input to OUT/doc-<pid>.json; holds (sleeps) if OUT/hold
#: exists (the first run takes it away); then writes "<node> <instances> <study UID>" to OUT/done.
HOOK = """#!/bin/sh
out={out}
echo "$1 $$" >> "$out/started"
cat > "$out/doc-$$.json"
if [ -e "$out/hold" ]; then rm -f "$out/hold"; sleep 600; fi
echo "$1 $FASTSCP_INSTANCES $FASTSCP_STUDY_INSTANCE_UID" >> "$out/done"
"""


def jobs_node(tmp_path: Path, cluster: PostgresCluster, name: str, hook: Path, extra: str = "") -> Server:
    folder = tmp_path / name
    config = node_config(folder, cluster, tmp_path / "lake", name)
    config.write_text(config.read_text() + extra
                      + f"scansheet:\n  study_timeout: {STUDY_TIMEOUT}\n"
                      + f"hooks:\n  - {{name: done, event: study-complete, program: [{hook}, {name}], timeout: 600}}\n")
    server = Server(folder, workers=1, config=config)
    # The post-store process takes the workers' records once it listens (it logs its hooks then).
    server.wait_for_log("hooks in force")
    return server


def hook_script(tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "hook-out"
    out.mkdir()
    path = tmp_path / "hook.sh"
    path.write_text(HOOK.format(out=out))
    path.chmod(0o755)
    return path, out


def lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def send_split(nodes: list[Server], files: list[str]) -> None:
    """Half of the files to each node, at the same time (one study, two nodes)."""
    env = dict(os.environ, TCP_NODELAY="1")
    senders = [subprocess.Popen(["storescu", "-aec", "FASTSCP", "127.0.0.1", str(node.port), *files[k::2]], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for k, node in enumerate(nodes)]
    for sender in senders:
        output, _ = sender.communicate(timeout=120)
        assert sender.returncode == 0, output


def job_row(cluster: PostgresCluster, study: str) -> list[str]:
    return cluster.psql("SELECT version, done_version, coalesce(holder, ''), coalesce(done_by, '') FROM "
                         f"fastscp_study_jobs WHERE study_instance_uid = '{study}'", database="lake").strip().split("|")


def kill_hooks(out: Path) -> None:
    """Hook programs a failed test left running (each in a session of its own), by PID."""
    for _node, pid in lines(out / "started"):
        try:
            os.killpg(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_split_study_is_completed_once_with_every_instance_on_its_sheet(postgres, tmp_path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    hook, out = hook_script(tmp_path)
    files = write_series(str(tmp_path / "series"), 12, rows=32, columns=32, patient_id="JOBS")
    nodes: list[Server] = []
    try:
        nodes = [jobs_node(tmp_path, postgres, name, hook) for name in ("node-a", "node-b")]
        send_split(nodes, files)
        assert [len(node.stored_files()) for node in nodes] == [6, 6]
        wait_until(lambda: len(lines(out / "done")) >= 1, 90, "the study-complete hook to run")
        ((holder, instances, study),) = lines(out / "done")
        assert instances == "12", "the event counts the instances of both nodes"
        wait_until(lambda: job_row(postgres, study)[1:3] == [job_row(postgres, study)[0], ""], 30,
                   "the job to be finished")
        assert job_row(postgres, study)[3] == holder
        # Another node deciding on its own would run it within the study's timeout plus a poll.
        time.sleep(STUDY_TIMEOUT + 3)
        assert len(lines(out / "done")) == 1 and len(lines(out / "started")) == 1, lines(out / "done")
        # Its document lists every instance, at the path of the node that stored it.
        ((_, pid),) = lines(out / "started")
        document = json.loads((out / f"doc-{pid}.json").read_text())["study"]
        stored = {p.resolve() for node in nodes for p in node.stored_files()}
        assert document["stored_count"] == 12 and {Path(p).resolve() for p in document["stored"]} == stored
        # One scan sheet, on the holder, of all 12 instances, every tile an image (both nodes' files read).
        sheets = [p for node in nodes for p in node.storage.rglob("scansheet.html")]
        (sheet,) = sheets
        assert sheet.is_relative_to(nodes[0 if holder == "node-a" else 1].storage)
        page = sheet.read_text()
        assert "12 in 1 series" in page
        assert page.count("<img ") == 8 and "no image" not in page
    finally:
        stop_all(None, nodes)
        kill_hooks(out)


def test_the_job_of_a_killed_node_is_taken_over_and_runs_once(postgres, tmp_path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    hook, out = hook_script(tmp_path)
    (out / "hold").touch()  # the first run holds the job until it is killed
    files = write_series(str(tmp_path / "series"), 12, rows=32, columns=32, patient_id="TAKEOVER")
    nodes: dict[str, Server] = {}
    try:
        for name in ("node-a", "node-b"):
            nodes[name] = jobs_node(tmp_path, postgres, name, hook, extra="  job_lease: 6\n")
        send_split(list(nodes.values()), files)
        wait_until(lambda: len(lines(out / "started")) == 1 and not (out / "hold").exists(), 90,
                   "the first node to take the study's job and run its hook")
        ((holder, pid),) = lines(out / "started")
        # The holder's host dies: the node and the hook it runs.
        nodes[holder].kill_group()
        os.killpg(int(pid), signal.SIGKILL)
        (other,) = set(nodes) - {holder}
        wait_until(lambda: len(lines(out / "done")) >= 1, 90, "the other node to take the job over")
        assert lines(out / "done")[0][:2] == [other, "12"]
        assert f"taken over from {holder}, whose lease ran out" in nodes[other].wait_for_log("taken over")
        time.sleep(STUDY_TIMEOUT + 3)
        assert len(lines(out / "done")) == 1, lines(out / "done")
        assert [node for node, _pid in lines(out / "started")] == [holder, other]
    finally:
        stop_all(None, nodes.values())
        kill_hooks(out)
