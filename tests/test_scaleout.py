"""Scale-out: fastscp nodes sharing one index in DuckLake, its catalog in PostgreSQL.

Each test starts its own PostgreSQL cluster (Debian's postgresql package:
initdb into a temp folder as the unprivileged ``postgres`` user, listening
only on a Unix socket in that folder, stopped by PID) and real ``fastscp
serve`` nodes configured with ``database.catalog``; dcmtk's storescu sends,
and the answers come from the nodes' own query sockets and C-FIND.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastscp.cli import index as cli_index
from fastscp.dicom.synthetic import write_series
from fastscp.index.client import QueryClient
from fastscp.query.engine import QueryRequest, SqlRequest
from tests.conftest import Server, dcmtk, wait_until

pytestmark = pytest.mark.dcmtk

PG_BIN = Path("/usr/lib/postgresql/15/bin")


class PostgresCluster:
    """A throw-away PostgreSQL cluster on a Unix socket, run as ``postgres`` (initdb refuses root)."""

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists():
            raise RuntimeError(f"{PG_BIN}/initdb missing: run 'make setup' (installs Debian's postgresql)")
        # Under /tmp, not pytest's tmp_path: the postgres user must reach it.
        self.folder = Path(tempfile.mkdtemp(prefix="fastscp-pg-"))
        user = pwd.getpwnam("postgres")
        os.chown(self.folder, user.pw_uid, user.pw_gid)
        self.log = self.folder / "postgres.log"
        as_postgres = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
        subprocess.run([*as_postgres, str(PG_BIN / "initdb"), "-D", str(self.folder / "data"), "-U", "fastscp",
                        "--auth=trust", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
        self._log_file = open(self.log, "w")
        # setpriv execs: this PID is the postmaster's.
        self.process = subprocess.Popen(
            [*as_postgres, str(PG_BIN / "postgres"), "-D", str(self.folder / "data"), "-k", str(self.folder),
             "-c", "listen_addresses=", "-c", "max_connections=100"],
            stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: self.process.poll() is not None or self._ready(), 60, "PostgreSQL to start")
        assert self.process.poll() is None, self.log.read_text()
        self.psql("CREATE DATABASE lake")

    def _ready(self) -> bool:
        return subprocess.run([str(PG_BIN / "pg_isready"), "-h", str(self.folder), "-d", "postgres"],
                              capture_output=True).returncode == 0

    def psql(self, sql: str, database: str = "postgres") -> str:
        return subprocess.run([str(PG_BIN / "psql"), "-h", str(self.folder), "-U", "fastscp", "-d", database,
                               "-AtX", "-c", sql], check=True, capture_output=True, text=True, timeout=60).stdout

    @property
    def catalog(self) -> str:
        return f"postgres:dbname=lake host={self.folder} user=fastscp"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown: does not wait for clients
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log_file.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def postgres() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> list[Path]:  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("series")
    return [Path(p) for p in write_series(str(folder), 12, rows=32, columns=32, patient_id="LAKE1")]


def node_config(folder: Path, postgres: PostgresCluster, lake: Path, node: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "fastscp.yaml"
    config.write_text(f"server:\n  node: {node}\n"
                      f"database:\n  catalog: '{postgres.catalog}'\n  data_path: '{lake}'\n")
    return config


def sql_rows(server: Server, sql: str) -> list[tuple[object, ...]]:
    with QueryClient(str(server.index)).query(SqlRequest(sql=sql)) as result:
        return [tuple(row) for row in result]


def test_one_node_on_the_ducklake_index(postgres, series, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    lake = tmp_path / "lake"
    folder = tmp_path / "node-a"
    server = Server(folder, workers=1, config=node_config(folder, postgres, lake, "node-a"))
    try:
        dcmtk("storescu", "-aec", server.ae_title, "-xe", "127.0.0.1", str(server.port), *map(str, series))
        on_disk = {p.relative_to(server.storage).as_posix() for p in server.stored_files()}
        assert len(on_disk) == len(series)
        wait_until(lambda: len(sql_rows(server, "SELECT path FROM instances")) == len(series), 60,
                   "the stores to be indexed")
        # Every row names its node and its file (relative to that node's storage root).
        rows = sql_rows(server, "SELECT node, path FROM instances")
        assert sorted(rows) == sorted(("node-a", path) for path in on_disk)
        # The rows are in the lake (Parquet under data_path, catalog in PostgreSQL), not in a local file.
        assert list(lake.rglob("*.parquet"))
        assert not server.index.exists()
        assert "instances" in postgres.psql("SELECT table_name FROM ducklake_table", database="lake").split()
        # fastscp query (through the node's query socket) and C-FIND see them.
        assert cli_index.main(["query", "instances", "--index-db", str(server.index), "--json"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert len(out) == len(series) and all('"PatientID":"LAKE1"' in line for line in out)
        with QueryClient(str(server.index)).query(QueryRequest(level="IMAGE", keys=["Path"])) as result:
            assert {row[0] for row in result} == on_disk
        (study,) = findscu(server, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "PatientID=LAKE1",
                           "StudyInstanceUID", "NumberOfStudyRelatedInstances")
        assert study.StudyInstanceUID == study_uid(series[0])
        assert int(study.NumberOfStudyRelatedInstances) == len(series)
    finally:
        assert server.stop() == 0, server.log_text()


def study_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def findscu(server: Server, tmp_path: Path, model: str, *keys: str) -> list:  # type: ignore[type-arg]
    import pydicom

    out = tmp_path / f"rsp-{time.monotonic_ns()}"
    out.mkdir()
    argv = ["findscu", model, "-aec", server.ae_title, "-X", "-od", str(out)]
    for key in keys:
        argv += ["-k", key]
    dcmtk(*argv, "127.0.0.1", str(server.port))
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def test_a_catalog_needs_its_data_path_and_the_postgres_prefix(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fastscp.config import ConfigError, load_config

    for text, key in (("database:\n  catalog: 'postgres:dbname=lake'\n", "database.catalog"),
                      ("database:\n  catalog: 'dbname=lake'\n  data_path: /lake\n", "database.catalog"),
                      ("database:\n  data_path: /lake\n", "database.data_path")):
        path = tmp_path / "fastscp.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=f"{path}: {key}: "):
            load_config(str(path))
    path.write_text("server:\n  node: a1\ndatabase:\n  catalog: 'postgres:dbname=lake host=db1'\n"
                    "  data_path: /lake\n")
    assert load_config(str(path)).lake == ("dbname=lake host=db1", "/lake", "a1")
