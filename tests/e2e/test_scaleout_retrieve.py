"""Retrieval in a scale-out setup: two nodes on one DuckLake index, each with its own storage folder.

A study is split between the nodes (storescu to each); dcmtk getscu and
movescu (dcmtk storescp as the move destination) against ONE node retrieve
the whole study byte-identical, and the study browser's zip on that node
holds every file byte for byte: the other node's files are fetched from it
with C-GET (fastscp.net.fetch). With the other node down, its instances are
failed sub-operations (counted, listed) in bounded time; with its storage
marked shared, they are read where they are.
"""

from __future__ import annotations

import io
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelMove

from fastscp.dicom.synthetic import write_series
from tests.conftest import Server, dcmtk, wait_until
from tests.dicomfiles import EXPLICIT_LE
from tests.e2e.test_retrieve import (
    DEST,
    by_sop_instance,
    counts,
    pynetdicom_get,
    pynetdicom_move,
    storescp,  # noqa: F401  (the move destination fixture)
    uid_of,
)
from tests.e2e.test_scaleout import node_config, postgres, sql_rows, stop_all  # noqa: F401  (postgres: fixture)
from tests.unit.query.test_find import identifier

pytestmark = pytest.mark.dcmtk


def start_node(tmp_path: Path, postgres, lake: Path, name: str, destination: int,  # type: ignore[no-untyped-def]  # noqa: F811
               *, shared: bool = False, storage: Path | None = None) -> Server:
    """A node with its status page (the study browser) on a port it picks: Server.monitor_url()."""
    folder = tmp_path / name
    config = node_config(folder, postgres, lake, name)
    config.write_text(config.read_text() + f"retrieve:\n  move_destinations:\n    {DEST}: "
                      f"{{host: 127.0.0.1, port: {destination}}}\n" + ("storage:\n  shared: true\n" if shared else ""))
    return Server(folder, workers=1, config=config, monitor="127.0.0.1:0", storage=storage)


def relative_files(server: Server) -> dict[str, bytes]:
    return {p.relative_to(server.storage).as_posix(): p.read_bytes() for p in server.stored_files()}


def download(node: Server, study: str) -> zipfile.ZipFile:
    with urllib.request.urlopen(f"{node.monitor_url()}/studies/{study}.zip", timeout=60) as response:
        return zipfile.ZipFile(io.BytesIO(response.read()))


def test_a_study_split_between_two_nodes_is_retrieved_whole_from_one(postgres, storescp, tmp_path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    lake = tmp_path / "lake"
    dest = storescp()
    files = write_series(str(tmp_path / "series"), 12, rows=32, columns=32, patient_id="SPLITR")
    study, series = uid_of(files[0], "StudyInstanceUID"), uid_of(files[0], "SeriesInstanceUID")
    expected = by_sop_instance(files)
    on_b = {uid_of(p, "SOPInstanceUID") for p in files[1::2]}
    nodes: dict[str, Server] = {}
    try:
        for name in ("node-a", "node-b"):
            nodes[name] = start_node(tmp_path, postgres, lake, name, dest.port)
        a, b = nodes["node-a"], nodes["node-b"]
        # Interleaved: every other instance of the one series on each node.
        dcmtk("storescu", "-aec", "FASTSCP", "127.0.0.1", str(a.port), *files[0::2])
        dcmtk("storescu", "-aec", "FASTSCP", "127.0.0.1", str(b.port), *files[1::2])
        for server in (a, b):
            wait_until(lambda server=server: sql_rows(server, "SELECT count(*) FROM instances") == [(12,)], 60,
                       "both nodes' rows in the shared index")
        assert sorted(sql_rows(a, "SELECT node, count(*) FROM instances GROUP BY 1")) == [("node-a", 6),
                                                                                       ("node-b", 6)]
        stored = {**relative_files(a), **relative_files(b)}
        assert len(stored) == 12

        # getscu (C-GET) against node-a only: every instance, byte for byte.
        out = tmp_path / "got"
        out.mkdir()
        dcmtk("getscu", "-S", "-aec", "FASTSCP", "+B", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
              "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(a.port))
        assert by_sop_instance(sorted(out.iterdir())) == expected
        # movescu (C-MOVE) to storescp, against node-a only: the same.
        dcmtk("movescu", "-S", "-aet", "MOVESCU", "-aec", "FASTSCP", "-aem", DEST, "-k", "QueryRetrieveLevel=STUDY",
              "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(a.port))
        assert by_sop_instance(dest.stored()) == expected
        # The study browser's zip on node-a: every file, named by its layout path, the stored file byte for byte.
        archive = download(a, study)
        assert {name: archive.read(name) for name in archive.namelist()} == stored
        # node-a fetched node-b's files into a private folder, and removed it.
        assert "fetched" not in " ".join(p.name for p in (a.storage / ".incoming").iterdir())
        b.wait_for_log("C-GET from 'FASTSCP': 6 completed")  # node-b served node-a's fetches

        # node-b down: its instances fail (counted, listed), node-a's arrive, and nothing hangs.
        b.kill_group()
        b._log_file.close()
        started = time.monotonic()
        received: dict[str, tuple[str, bytes]] = {}
        statuses = pynetdicom_get(a, StudyRootQueryRetrieveInformationModelGet,
                                  identifier("SERIES", StudyInstanceUID=study, SeriesInstanceUID=series),
                                  [("1.2.840.10008.5.1.4.1.1.2", [EXPLICIT_LE])], received)
        final = statuses[-1]
        assert final.Status == 0xB000 and counts(final) == (6, 6, 0, None), final
        assert sorted(final.identifier.FailedSOPInstanceUIDList) == sorted(on_b)
        assert {uid: data for uid, (_ts, data) in received.items()} == {
            uid: data for uid, data in expected.items() if uid not in on_b}
        moved = pynetdicom_move(a, StudyRootQueryRetrieveInformationModelMove,
                                identifier("STUDY", StudyInstanceUID=study))
        assert moved[-1].Status == 0xB000 and counts(moved[-1]) == (6, 6, 0, None)
        assert time.monotonic() - started < 60
        archive = download(a, study)
        assert set(archive.namelist()) == set(relative_files(a)) | {"fastscp-missing.txt"}
        assert archive.read("fastscp-missing.txt").decode().count("node-b") >= 6
        assert not [p for p in (a.storage / ".incoming").iterdir() if p.name.startswith("fetched-")]

        # node-b again, its storage marked shared (every node mounts it at the same path), then down again:
        # node-a reads node-b's files where they are.
        nodes["node-b"] = b = start_node(tmp_path, postgres, lake, "node-b", dest.port, shared=True,
                                         storage=b.storage)
        wait_until(lambda: sql_rows(a, "SELECT count(*) FROM node_addresses WHERE node = 'node-b' "
                                       "AND shared_storage") == [(1,)], 60, "node-b's address again")
        b.kill_group()
        b._log_file.close()
        out = tmp_path / "got-shared"
        out.mkdir()
        dcmtk("getscu", "-S", "-aec", "FASTSCP", "+B", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
              "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(a.port))
        assert by_sop_instance(sorted(out.iterdir())) == expected
        archive = download(a, study)
        assert {name: archive.read(name) for name in archive.namelist()} == stored
    finally:
        stop_all(None, nodes.values())


def test_a_node_asked_by_another_node_serves_its_own_files_only(postgres, storescp, tmp_path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """A C-GET whose calling AE title is the nodes' own (another node fetching) is never passed on: no loop."""
    lake = tmp_path / "lake"
    dest = storescp()
    files = write_series(str(tmp_path / "series"), 4, rows=16, columns=16, patient_id="LOOP")
    study = uid_of(files[0], "StudyInstanceUID")
    nodes: dict[str, Server] = {}
    try:
        for name in ("node-a", "node-b"):
            nodes[name] = start_node(tmp_path, postgres, lake, name, dest.port)
        a, b = nodes["node-a"], nodes["node-b"]
        dcmtk("storescu", "-aec", "FASTSCP", "127.0.0.1", str(b.port), *files)
        wait_until(lambda: sql_rows(a, "SELECT count(*) FROM instances") == [(4,)], 60, "node-b's rows")
        received: dict[str, tuple[str, bytes]] = {}
        # As node-b would ask node-a (calling AE title FASTSCP): node-a has none of them on its disk.
        from pynetdicom import AE, build_role, evt

        def on_store(event) -> int:  # type: ignore[no-untyped-def]
            received[str(event.request.AffectedSOPInstanceUID)] = ("", b"")
            return 0

        ae = AE(ae_title="FASTSCP")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", [EXPLICIT_LE])
        assoc = ae.associate("127.0.0.1", a.port, ae_title="FASTSCP",
                             ext_neg=[build_role("1.2.840.10008.5.1.4.1.1.2", scp_role=True)],
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
        assert assoc.is_established
        try:
            statuses = [status for status, _ in assoc.send_c_get(identifier("STUDY", StudyInstanceUID=study),
                                                                  StudyRootQueryRetrieveInformationModelGet)]
        finally:
            assoc.release()
        assert statuses[-1].Status == 0xA702 and counts(statuses[-1]) == (0, 4, 0, None)
        assert received == {}
        assert "a request of another node is served from this node's files only" in a.wait_for_log(
            "served from this node's files only")
    finally:
        stop_all(None, nodes.values())
