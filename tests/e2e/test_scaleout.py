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
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from fastscp.cli import index as cli_index
from fastscp.dicom.synthetic import write_series
from fastscp.query.client import QueryClient
from fastscp.query.messages import QueryRequest, SqlRequest
from tests.conftest import REPO, Server, dcmtk, free_port, wait_until
from tests.e2e.test_cfind import findscu

pytestmark = pytest.mark.dcmtk

PG_BIN = Path("/usr/lib/postgresql/15/bin")
EXAMPLE_HAPROXY_CFG = REPO / "config" / "haproxy.cfg.example"


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
    config = node_config(folder, postgres, lake, "node-a")
    server = Server(folder, workers=1, config=config)
    try:
        dcmtk("storescu", "-aec", server.ae_title, "-xe", "127.0.0.1", str(server.port), *map(str, series))
        on_disk = {p.relative_to(server.storage).as_posix() for p in server.stored_files()}
        assert len(on_disk) == len(series)
        wait_until(lambda: len(sql_rows(server, "SELECT path FROM instances")) == len(series), 60,
                   "the stores to be indexed")
        # Every row names its node and its file (relative to that node's storage root).
        rows = sql_rows(server, "SELECT node, path FROM instances")
        assert sorted(rows) == sorted(("node-a", path) for path in on_disk)
        # The rows are in the lake (catalog in PostgreSQL; DuckLake keeps small
        # commits in the catalog until a checkpoint writes them to Parquet), not in a local file.
        assert not server.index.exists()
        assert "instances" in postgres.psql("SELECT table_name FROM ducklake_table", database="lake").split()
        # fastscp query (through the node's query socket) and C-FIND see them.
        assert cli_index.main(["query", "instances", "--index-db", str(server.index), "--json"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert len(out) == len(series) and all('"PatientID":"LAKE1"' in line for line in out)
        assert cli_index.main(["stats", "--index-db", str(server.index), "--json"]) == 0
        assert f'"instances":{len(series)},' in capsys.readouterr().out
        with QueryClient(str(server.index)).query(QueryRequest(level="IMAGE", keys=["Path"])) as result:
            assert {row[0] for row in result} == on_disk
        (study,) = findscu(server, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "PatientID=LAKE1",
                           "StudyInstanceUID", "NumberOfStudyRelatedInstances")
        assert study.StudyInstanceUID == study_uid(series[0])
        assert int(study.NumberOfStudyRelatedInstances) == len(series)
    finally:
        assert server.stop() == 0, server.log_text()
    # With no node running, fastscp query with the node's config reads the lake read-only.
    capsys.readouterr()
    assert cli_index.main(["query", "instances", "--config", str(config), "--index-db", str(server.index),
                           "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(series)
    # reindex rebuilds an index file: it refuses a node of the shared index (its start reconciles).
    assert cli_index.main(["reindex", "--config", str(config), "--storage-dir", str(server.storage)]) == 1
    assert "database.catalog: reindex rebuilds an index file" in capsys.readouterr().err
    assert not server.index.exists()


def study_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


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


class HAProxy:
    """Debian's HAProxy in TCP mode in front of ``nodes`` (Server objects), health-checking each /healthz."""

    def __init__(self, folder: Path, nodes: list[tuple[str, Server, int]]) -> None:
        self.port = free_port()
        self.socket = folder / "haproxy.sock"
        config = folder / "haproxy.cfg"
        # The shipped example, on loopback ports: its servers replaced by
        # these nodes, no syslog, and a stats socket to ask which are up.
        lines = []
        for line in EXAMPLE_HAPROXY_CFG.read_text().splitlines():
            words = line.split()
            if words[:1] in (["log"], ["server"]) or words == ["option", "tcplog"]:
                continue
            if words[:1] == ["bind"]:
                line = f"    bind 127.0.0.1:{self.port}"
            lines.append(line)
            if words == ["global"]:
                lines.append(f"    stats socket {self.socket} mode 600 level admin")
        lines += [f"    server {name} 127.0.0.1:{node.port} check port {monitor}" for name, node, monitor in nodes]
        config.write_text("\n".join(lines) + "\n")
        self.log = folder / "haproxy.log"
        self._log_file = open(self.log, "w")
        self.process = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=self._log_file,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: self.up() == {name for name, _, _ in nodes}, 30, "HAProxy to see every node up")

    def up(self) -> set[str]:
        """The names of the servers HAProxy sends to now."""
        if self.process.poll() is not None:
            raise AssertionError(f"haproxy exited with {self.process.returncode}:\n{self.log.read_text()}")
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(5)
                sock.connect(str(self.socket))
                sock.sendall(b"show servers state fastscp\n")
                text = b""
                while chunk := sock.recv(65536):
                    text += chunk
        except OSError:
            return set()
        # Columns: be_id be_name srv_id srv_name srv_addr srv_op_state ... (2: running)
        rows = [line.split() for line in text.decode().splitlines()[1:] if line and not line.startswith("#")]
        return {row[3] for row in rows if len(row) > 5 and row[5] == "2"}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        self._log_file.close()


def stop_all(proxy: HAProxy | None, servers: Iterable[Server]) -> None:
    """Stop HAProxy, then every node still running (SIGTERM; its process group killed after)."""
    if proxy is not None:
        proxy.stop()
    for server in servers:
        if server.process.poll() is None:
            server.stop()
        server.kill_group()
        server._log_file.close()


def indexed_on(server: Server, node: str) -> set[str]:
    return {row[0] for row in sql_rows(server, f"SELECT path FROM instances WHERE node = '{node}'")}  # type: ignore[misc]


def files_of(server: Server) -> set[str]:
    return {p.relative_to(server.storage).as_posix() for p in server.stored_files()}


def test_three_nodes_behind_haproxy_lose_nothing_to_kill_9(postgres, tmp_path) -> None:  # type: ignore[no-untyped-def]
    lake = tmp_path / "lake"
    batches = [[str(p) for p in write_series(str(tmp_path / f"series{n}"), 20, rows=32, columns=32,
                                             patient_id=f"HA{n}", seed=n)] for n in range(6)]
    uids = {uid for batch in batches for uid in map(sop_uid, batch)}
    names = ["node-a", "node-b", "node-c"]
    nodes: dict[str, Server] = {}
    monitors: dict[str, int] = {}
    proxy = None
    try:
        for name in names:
            folder = tmp_path / name
            monitors[name] = free_port()
            nodes[name] = Server(folder, workers=1, config=node_config(folder, postgres, lake, name),
                                 monitor=f"127.0.0.1:{monitors[name]}")
        proxy = HAProxy(tmp_path, [(name, nodes[name], monitors[name]) for name in names])
        env = dict(os.environ, TCP_NODELAY="1")
        argv = ["storescu", "-aec", "FASTSCP", "-xe", "127.0.0.1", str(proxy.port)]
        senders = {n: subprocess.Popen([*argv, *batch], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                   for n, batch in enumerate(batches)}
        victim = nodes["node-b"]
        wait_until(lambda: len(victim.stored_files()) >= 3, 60, "node-b to store its first files")
        victim.kill_group()
        victim._log_file.close()
        failed = []
        for n, sender in senders.items():
            sender.communicate(timeout=120)
            if sender.returncode != 0:
                failed.append(n)
        assert failed, "no association was on the killed node: the test proved nothing"
        wait_until(lambda: "node-b" not in proxy.up(), 30, "HAProxy to take node-b out")
        # The modality sends again what was not acknowledged (storescu: the whole batch).
        for n in failed:
            dcmtk(*argv, *batches[n])
        live = [nodes["node-a"], nodes["node-c"]]

        def counted(server: Server) -> int:
            return int(sql_rows(server, "SELECT count(DISTINCT sop_instance_uid) FROM instances")[0][0])  # type: ignore[call-overload]

        # Queries from every live node count every instance (nothing acknowledged is lost).
        for server in live:
            wait_until(lambda server=server: counted(server) == len(uids), 60, "every instance in the index")
        for name in ("node-a", "node-c"):
            wait_until(lambda name=name: indexed_on(nodes[name], name) == files_of(nodes[name]), 60,
                       f"{name}'s rows to equal its files")
        # The killed node restarts on its storage and reconciles: its rows equal its files again.
        restarted = Server(tmp_path / "node-b", workers=1, storage=victim.storage,
                           config=tmp_path / "node-b" / "fastscp.yaml", monitor=f"127.0.0.1:{monitors['node-b']}")
        nodes["node-b"] = restarted
        wait_until(lambda: indexed_on(restarted, "node-b") == files_of(restarted), 60, "node-b to reconcile")
        assert files_of(restarted), "node-b stored nothing before it was killed"
        wait_until(lambda: proxy.up() == set(names), 30, "HAProxy to take node-b back")
        for server in nodes.values():
            assert counted(server) == len(uids)
            rows = sql_rows(server, "SELECT node, count(*) FROM instances GROUP BY node")
            assert sum(int(count) for _, count in rows) == sum(len(files_of(s)) for s in nodes.values())  # type: ignore[call-overload]
            (study,) = findscu(server, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "PatientID=HA0",
                               "NumberOfStudyRelatedInstances")
            assert int(study.NumberOfStudyRelatedInstances) >= 20
    finally:
        stop_all(proxy, nodes.values())


def sop_uid(path: str) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_nodes_started_together_store_one_study_split_between_them(postgres, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # A new catalog: the nodes race to make DuckLake's tables and the schema.
    # Then each node receives a third of one series at the same time: the
    # index holds one study and one series, of every instance.
    lake = tmp_path / "lake"
    files = write_series(str(tmp_path / "series"), 30, rows=16, columns=16, patient_id="SPLIT")
    names = ["node-a", "node-b", "node-c"]
    started: dict[str, Server] = {}
    errors: list[BaseException] = []

    def start(name: str) -> None:
        try:
            started[name] = Server(tmp_path / name, workers=1,
                                   config=node_config(tmp_path / name, postgres, lake, name))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(name,)) for name in names]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, errors
        env = dict(os.environ, TCP_NODELAY="1")
        senders = [subprocess.Popen(["storescu", "-aec", "FASTSCP", "127.0.0.1", str(started[name].port),
                                     *files[k::3]], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                   for k, name in enumerate(names)]
        for sender in senders:
            output, _ = sender.communicate(timeout=120)
            assert sender.returncode == 0, output
        for name, server in started.items():
            wait_until(lambda server=server: sql_rows(server, "SELECT count(*) FROM instances") == [(30,)], 60,
                       f"{name} to count every instance")
            assert sorted(sql_rows(server, "SELECT node, count(*) FROM instances GROUP BY node")) == [
                (other, 10) for other in names]
            assert sql_rows(server, "SELECT count(*) FROM studies") == [(1,)]
            assert sql_rows(server, "SELECT count(*) FROM series") == [(1,)]
            (study,) = findscu(server, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "PatientID=SPLIT",
                               "NumberOfStudyRelatedInstances", "NumberOfStudyRelatedSeries")
            assert int(study.NumberOfStudyRelatedInstances) == 30
            assert int(study.NumberOfStudyRelatedSeries) == 1
    finally:
        stop_all(None, started.values())


def test_a_node_writes_replaces_and_reconciles_only_its_own_rows(postgres, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fastscp.index.database import Index, Lake
    from fastscp.index.reindex import read_records, walk

    root = tmp_path / "storage"
    write_series(str(root), 36, rows=16, columns=16, patient_id="OWN")
    failed: list[tuple[str, str]] = []
    records = read_records(str(root), sorted(walk(str(root))), failed=failed)
    assert failed == [] and len(records) == 36
    catalog = postgres.catalog.removeprefix("postgres:")
    a = Index(str(tmp_path / "a.duckdb"), lake=Lake(catalog, str(tmp_path / "lake"), "node-a"))
    b = Index(str(tmp_path / "b.duckdb"), lake=Lake(catalog, str(tmp_path / "lake"), "node-b"))
    try:
        def per_node(index: Index) -> list[tuple[object, ...]]:
            return index.con.execute("SELECT node, count(*) FROM instances GROUP BY 1 ORDER BY 1").fetchall()

        # Three commits of 12 (more than DuckLake inlines): three Parquet files per table.
        for start in range(0, 36, 12):
            a.add(records[start:start + 12])
        b.add(records)  # the same paths, on another node
        assert per_node(b) == [("node-a", 36), ("node-b", 36)]
        a.add(records[:5])  # a resend to node-a replaces node-a's rows, never node-b's
        assert per_node(a) == [("node-a", 36), ("node-b", 36)]
        assert a.remove([records[0].path]) == 1
        assert per_node(b) == [("node-a", 35), ("node-b", 36)]
        assert set(a.file_states()) == {r.path for r in records[1:]}
        assert set(b.file_states()) == {r.path for r in records}
        assert a.con.execute("SELECT count(*) FROM studies").fetchall() == [(1,)]
        assert a.con.execute("SELECT count(*) FROM series").fetchall() == [(1,)]
        assert len(a.study_instances(records[0].header.study_instance_uid)) == 35

        def files() -> int:
            return len(a.con.execute("SELECT * FROM ducklake_list_files('lake', 'instances')").fetchall())

        before = files()
        assert before >= 3
        assert a.checkpoint()  # DuckLake's merge of the small files
        assert files() < before
        # ...which also drops snapshots, and the files only they used, after an hour.
        assert a.con.execute("SELECT option_name, value FROM ducklake_options('lake') WHERE option_name "
                             "LIKE '%older_than' ORDER BY 1").fetchall() == [
            ("delete_older_than", "1 hour"), ("expire_older_than", "1 hour")]
        assert per_node(b) == [("node-a", 35), ("node-b", 36)]
    finally:
        a.close()
        b.close()


def test_haproxy_takes_a_draining_node_out(postgres, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import urllib.error
    import urllib.request

    import pydicom
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    from fastscp.dicom.part10 import dataset_offset
    from tests.rawscu import RawSCU

    lake = tmp_path / "lake"
    (held,) = write_series(str(tmp_path / "held"), 1, rows=32, columns=32, patient_id="DRAIN")
    others = write_series(str(tmp_path / "others"), 5, rows=32, columns=32, patient_id="OTHERS", seed=1)
    names = ["node-a", "node-b"]
    nodes: dict[str, Server] = {}
    monitors = {name: free_port() for name in names}
    proxy = None
    try:
        for name in names:
            nodes[name] = Server(tmp_path / name, workers=1,
                                 config=node_config(tmp_path / name, postgres, lake, name),
                                 monitor=f"127.0.0.1:{monitors[name]}")
        proxy = HAProxy(tmp_path, [(name, nodes[name], monitors[name]) for name in names])
        draining = nodes["node-a"]
        raw = Path(held).read_bytes()
        data = raw[dataset_offset(raw):]
        scu = RawSCU(draining.port, CTImageStorage, ExplicitVRLittleEndian)
        scu.begin_store(str(pydicom.dcmread(held, stop_before_pixels=True).SOPInstanceUID))
        scu.send_data(data[: len(data) // 2], last=False)
        draining.signal(signal.SIGTERM)
        # While its association finishes, node-a's /healthz says why it is out, and HAProxy sends elsewhere.
        wait_until(lambda: "node-a" not in proxy.up(), 30, "HAProxy to take the draining node out")
        assert draining.process.poll() is None, "node-a must wait for its open association"
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(f"http://127.0.0.1:{monitors['node-a']}/healthz", timeout=5)
        assert answer.value.code == 503 and b"stopping" in answer.value.read()
        dcmtk("storescu", "-aec", "FASTSCP", "127.0.0.1", str(proxy.port), *others)
        scu.send_data(data[len(data) // 2:], last=True)
        assert scu.read_status() == 0
        scu.release()
        assert draining.process.wait(30) == 0
        assert len(nodes["node-b"].stored_files()) == len(others)
        # node-a's last store reached the shared index before it stopped.
        wait_until(lambda: sql_rows(nodes["node-b"], "SELECT node, count(*) FROM instances GROUP BY 1 ORDER BY 1")
                   == [("node-a", 1), ("node-b", len(others))], 60, "both nodes' rows")
    finally:
        stop_all(proxy, nodes.values())
