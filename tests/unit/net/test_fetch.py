"""Files fetched from another node of a shared index (fastscp.net.fetch) are gone once the requester has
its answer: a C-GET's or C-MOVE's final response, the end of the study browser's zip. The other node is
a free port nobody listens on (it is down): the private folder is made before the fetch fails."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from fastscp.config import TLSConfig
from fastscp.index.database import NodeAddress
from fastscp.monitor.browser import ZIP_AHEAD, _ChunkWriter, _write_zip
from fastscp.net import dimse
from fastscp.net.fetch import FetchSettings, RemoteFiles
from fastscp.net.retrievescp import PENDING, UNABLE_TO_PERFORM, suboperations
from fastscp.query.retrieve import Instance
from fastscp.storage.reserved import FETCHED
from tests.dicomfiles import EXPLICIT_LE

CT = "1.2.840.10008.5.1.4.1.1.2"


def settings(incoming: Path, down_port: int) -> FetchSettings:
    """A node-a whose node-b (``down_port``: nothing listens there) is down."""
    down = NodeAddress("node-b", "127.0.0.1", down_port, "NODEB", False, str(incoming.parent / "b"), False)
    return FetchSettings("node-a", "NODEA", lambda: {"node-b": down}, str(incoming), 5.0, TLSConfig())


def instances(n: int) -> list[Instance]:
    return [Instance(f"1.2.3.{i}", CT, EXPLICIT_LE, f"b/{i}.dcm", "node-b", "1.2.3", "1.2.3.9", "SENDER")
            for i in range(n)]


def fetched_folders(incoming: Path) -> list[str]:
    return sorted(p.name for p in incoming.iterdir() if p.name.startswith(FETCHED))


def test_the_fetched_files_are_gone_when_the_final_response_is_given(tmp_path: Path, closed_port: int) -> None:
    incoming = tmp_path / ".incoming"
    incoming.mkdir()
    found = instances(3)
    files = RemoteFiles(settings(incoming, closed_port), found)
    stored: list[Instance] = []
    seen: list[tuple[int, list[str]]] = []
    responses = suboperations(found, lambda i: stored.append(i) or dimse.SUCCESS, lambda: False, EXPLICIT_LE,
                              "C-GET from 'TEST'", files)
    for response in responses:  # the folder as the requester would find it on each answer
        seen.append((response.status, fetched_folders(incoming)))
    assert stored == []  # the node is down: nothing to send
    assert [status for status, _ in seen] == [PENDING, PENDING, UNABLE_TO_PERFORM]
    assert seen[0][1] != []  # made for the first fetch, and kept while the request runs
    assert seen[-1][1] == []


def test_the_fetched_files_are_gone_when_the_zip_ends(tmp_path: Path, closed_port: int) -> None:
    incoming = tmp_path / ".incoming"
    incoming.mkdir()
    found = instances(2)
    at_end: list[list[str]] = []

    class Watched(_ChunkWriter):
        def finish(self, last: None | BaseException) -> None:
            at_end.append(fetched_folders(incoming))
            super().finish(last)

    async def download() -> bytes:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes | None | BaseException] = asyncio.Queue()
        ahead = threading.Semaphore(ZIP_AHEAD)
        out = Watched(loop, queue, ahead, threading.Event())
        thread = threading.Thread(target=_write_zip, args=(out, [(i.path, None, i) for i in found],
                                                           "1.2.3", settings(incoming, closed_port)))
        thread.start()
        data = b""
        while (item := await asyncio.wait_for(queue.get(), 60)) is not None:
            assert isinstance(item, bytes), item
            data += item
            ahead.release()
        thread.join(60)
        return data

    data = asyncio.run(download())
    assert b"fastscp-missing.txt" in data and data.count(b"node 'node-b' at 127.0.0.1") >= 2
    assert at_end == [[]]
