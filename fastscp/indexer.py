"""The indexer process: owns the DuckDB file, receives records, commits in batches.

Workers connect to a Unix SOCK_SEQPACKET socket (abstract namespace, so a long
storage path can't overflow ``sun_path``); each message is one msgpack
:class:`~fastscp.records.InstanceRecord`. A batch is committed when it holds
``database.batch_size`` records or its oldest record is
``database.batch_interval`` seconds old.
"""

from __future__ import annotations

import hashlib
import logging
import os
import selectors
import signal
import socket
import time
from multiprocessing.connection import Connection

from fastscp.index import Index
from fastscp.records import DECODER, InstanceRecord

log = logging.getLogger("fastscp.indexer")


def indexer_address(index_path: str) -> str:
    """The abstract socket name the indexer of an index file listens on.

    Derived from the file's absolute path, so any process that knows the
    index (a worker, ``fastscp query``) can find the server that owns it.
    """
    digest = hashlib.sha1(os.path.abspath(index_path).encode()).hexdigest()[:16]
    return f"\0fastscp-indexer-{digest}"


class Indexer:
    def __init__(self, index: Index, address: str, batch_size: int, batch_interval: float) -> None:
        self.index = index
        self.batch_size = batch_size
        self.batch_interval = batch_interval
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(address)
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.pending: list[InstanceRecord] = []
        self.oldest = 0.0
        self.stopping = False
        self.committed = 0

    def run(self) -> None:
        while True:
            timeout = self.batch_interval if self.pending else 1.0
            for key, _events in self.selector.select(timeout):
                if key.fileobj is self.listener:
                    self._accept()
                else:
                    self._receive(key.fileobj)  # type: ignore[arg-type]
            if self.pending and (
                len(self.pending) >= self.batch_size
                or time.monotonic() - self.oldest >= self.batch_interval
            ):
                self.commit()
            clients = len(self.selector.get_map()) - 1
            if self.stopping and clients == 0:
                break
        self.commit()
        self.index.close()

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        self.selector.register(conn, selectors.EVENT_READ)

    def _receive(self, conn: socket.socket) -> None:
        while True:
            try:
                data = conn.recv(1 << 20)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.selector.unregister(conn)
                conn.close()
                return
            try:
                record = DECODER.decode(data)
            except Exception as exc:  # a bad message must not stop indexing
                log.error("undecodable message from a worker dropped: %s", exc)
                continue
            if isinstance(record, InstanceRecord):
                if not self.pending:
                    self.oldest = time.monotonic()
                self.pending.append(record)
                if len(self.pending) >= self.batch_size:
                    self.commit()

    def commit(self) -> None:
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        try:
            self.committed += self.index.add(batch)
        except Exception:
            # Keep the batch: it is retried with the next one.
            log.exception("index commit of %d records failed; will retry", len(batch))
            self.pending = batch + self.pending
            time.sleep(0.5)


def indexer_main(db_path: str, wal_mode: bool, address: str, batch_size: int,
                 batch_interval: float, ready: Connection) -> None:
    """Entry point of the indexer process; reports "ready" or the error on ``ready``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(db_path)), exist_ok=True)
        indexer = Indexer(Index(db_path, wal_mode=wal_mode), address, batch_size, batch_interval)
    except Exception as exc:
        ready.send(f"cannot open the index {db_path}: {exc}")
        return

    def stop(_signum: int, _frame: object) -> None:
        indexer.stopping = True

    signal.signal(signal.SIGTERM, stop)
    ready.send("ready")
    ready.close()
    indexer.run()
    log.info("indexer stopped; %d records committed", indexer.committed)
