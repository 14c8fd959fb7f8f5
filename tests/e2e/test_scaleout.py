"""Scale-out: fastscp nodes sharing one index in DuckLake, its catalog in PostgreSQL.

Each test starts its own PostgreSQL cluster (Debian's postgresql package:
initdb into a temp folder as the unprivileged ``postgres`` user, listening
on a Unix socket in that folder, stopped by PID) and real ``fastscp
serve`` nodes configured with ``database.catalog``; dcmtk's storescu sends,
and the answers come from the nodes' own query sockets and C-FIND. The
kill -9 test runs in network namespaces it makes (tests/cluster.py
``Network``): each node in its own, with its own address, PostgreSQL (on
TCP), HAProxy and the senders in a hub namespace bridged to them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from fastscp.cli import index as cli_index
from fastscp.dicom.synthetic import write_series
from fastscp.query.client import QueryClient
from fastscp.query.messages import QueryRequest, SqlRequest
from tests.cluster import HAProxy, Network, PostgresCluster
from tests.conftest import Server, dcmtk, wait_until
from tests.e2e.test_cfind import findscu

pytestmark = pytest.mark.dcmtk

NODES = ["node-a", "node-b", "node-c"]


@pytest.fixture
def postgres() -> Iterator[PostgresCluster]:
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> list[Path]:  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("series")
    return [Path(p) for p in write_series(str(folder), 12, rows=32, columns=32, patient_id="LAKE1")]


def node_config(folder: Path, postgres: PostgresCluster, lake: Path, node: str, database: str = "") -> Path:
    """A node's config file; ``database``: more keys of its database section (YAML lines)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "fastscp.yaml"
    config.write_text(f"server:\n  node: {node}\n"
                      f"database:\n  catalog: '{postgres.catalog}'\n  data_path: '{lake}'\n{database}")
    return config


def sql_rows(server: Server, sql: str) -> list[tuple[object, ...]]:
    with QueryClient(str(server.index)).query(SqlRequest(sql=sql)) as result:
        return [tuple(row) for row in result]


def test_one_node_on_the_ducklake_index(postgres, series, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    lake = tmp_path / "lake"
    folder = tmp_path / "node-a"
    config = node_config(folder, postgres, lake, "node-a", "  maintenance_interval: 1\n")
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
        # The indexer maintains the lake on its schedule (database.maintenance_interval), and says what it did.
        server.wait_for_log("maintenance by node node-a: ", "snapshots expired", timeout=60)
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


def stop_all(proxy: HAProxy | None, servers: Iterable[Server]) -> None:
    """Stop HAProxy, then every node still running (SIGTERM; its process group killed after)."""
    if proxy is not None:
        proxy.stop()
    for server in servers:
        if server.process.poll() is None:
            server.stop()
        server.kill_group()
        server._log_file.close()


def files_of(server: Server) -> set[str]:
    return {p.relative_to(server.storage).as_posix() for p in server.stored_files()}


@pytest.fixture
def network() -> Iterator[tuple[Network, PostgresCluster]]:
    """:data:`NODES`' namespaces and the hub, PostgreSQL listening in the hub; all deleted after the test."""
    net = Network(NODES)
    try:
        with net.inside(net.hub):
            postgres = PostgresCluster(address=net.addresses[net.hub])
        with postgres:
            yield net, postgres
    finally:
        net.delete()


def test_three_nodes_in_network_namespaces_lose_nothing_to_kill_9(network, tmp_path) -> None:  # type: ignore[no-untyped-def]
    net, postgres = network
    lake = tmp_path / "lake"
    batches = [[str(p) for p in write_series(str(tmp_path / f"series{n}"), 20, rows=32, columns=32,
                                             patient_id=f"HA{n}", seed=n)] for n in range(6)]
    uids = {uid for batch in batches for uid in map(sop_uid, batch)}
    nodes: dict[str, Server] = {}
    monitors: dict[str, int] = {}
    proxy = None

    def start(name: str) -> Server:
        address = net.address(name)
        with net.inside(net.namespace(name)):
            # The first start picks the monitor's port; a restart keeps it (HAProxy checks it).
            server = Server(tmp_path / name, workers=1, storage=tmp_path / name / "received", host=address,
                            config=node_config(tmp_path / name, postgres, lake, name),
                            monitor=f"{address}:{monitors.get(name, 0)}")
        monitors.setdefault(name, server.monitor_port())
        return server

    def on(name: str, sql: str) -> list[tuple[object, ...]]:
        """A query to a node's own query socket (an abstract socket: in the node's namespace)."""
        with net.inside(net.namespace(name)):
            return sql_rows(nodes[name], sql)

    def uids_in_index(name: str) -> set[str]:
        return {row[0] for row in on(name, "SELECT DISTINCT sop_instance_uid FROM instances")}  # type: ignore[misc]

    def uids_stored(names: Iterable[str]) -> set[str]:
        return {sop_uid(str(path)) for name in names for path in nodes[name].stored_files()}

    def indexed(name: str) -> set[str]:
        return {row[0] for row in on(name, f"SELECT path FROM instances WHERE node = '{name}'")}  # type: ignore[misc]

    try:
        for name in NODES:
            nodes[name] = start(name)
        with net.inside(net.hub):
            # Each node has its own address, and only the hub's bridge joins them.
            assert len({server.host for server in nodes.values()} | {postgres.address}) == len(NODES) + 1
            proxy = HAProxy(tmp_path, [(name, nodes[name], monitors[name]) for name in NODES],
                            bind=net.addresses[net.hub])
            env = dict(os.environ, TCP_NODELAY="1")
            argv = ["storescu", "-aec", "FASTSCP", "-xe", proxy.host, str(proxy.port)]
            senders = {n: subprocess.Popen([*argv, *batch], env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT) for n, batch in enumerate(batches)}
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
        live = ["node-a", "node-c"]
        # Nothing acknowledged is lost: every instance is in some node's storage. Those the
        # live nodes hold are in the index now; an instance acknowledged only by node-b
        # (a whole batch it took before the kill, that its indexer had not yet committed) is
        # on node-b's disk, and comes into the index when node-b restarts and reconciles.
        assert uids_stored(NODES) == uids
        held = uids_stored(live)
        for name in live:
            wait_until(lambda name=name: uids_in_index(name) >= held, 60, "the live nodes' instances in the index")
            wait_until(lambda name=name: indexed(name) == files_of(nodes[name]), 60,
                       f"{name}'s rows to equal its files")
        # The killed node restarts on its storage and reconciles: its rows equal its files again.
        nodes["node-b"] = start("node-b")
        wait_until(lambda: indexed("node-b") == files_of(nodes["node-b"]), 60, "node-b to reconcile")
        wait_until(lambda: uids_in_index("node-a") == uids, 60, "every instance in the index")
        assert files_of(nodes["node-b"]), "node-b stored nothing before it was killed"
        with net.inside(net.hub):
            wait_until(lambda: proxy.up() == set(NODES), 30, "HAProxy to take node-b back")
            for name, server in nodes.items():
                assert uids_in_index(name) == uids
                rows = on(name, "SELECT node, count(*) FROM instances GROUP BY node")
                assert sum(int(count) for _, count in rows) == sum(len(files_of(s)) for s in nodes.values())  # type: ignore[call-overload]
                # C-FIND from the hub, over the bridge to the node's address.
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

        # DuckLake's own CHECKPOINT (run by hand: fastscp runs its steps, fastscp.index.lake) keeps
        # snapshots, and the files only they read, for an hour.
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
    proxy = None
    try:
        for name in names:
            nodes[name] = Server(tmp_path / name, workers=1,
                                 config=node_config(tmp_path / name, postgres, lake, name), monitor="127.0.0.1:0")
        proxy = HAProxy(tmp_path, [(name, nodes[name], nodes[name].monitor_port()) for name in names])
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
            urllib.request.urlopen(f"{draining.monitor_url()}/healthz", timeout=5)
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
