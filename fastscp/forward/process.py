"""The forwarder process: takes in stored instances, queues those the rules match, sends them.

How an acknowledged instance reaches the queue, whatever is killed:

* Each worker hands the forwarder the record of every instance it stored,
  after the C-STORE response (the same :class:`~fastscp.index.client.IndexerClient`
  it sends the indexer's records with: batched, never waiting, kept in the
  worker and retried while the forwarder is down or lags at
  ``server.derived_priority``, beyond a bound and at the worker's exit in
  files under the storage root, :func:`kept_folder`, which the forwarder
  takes). The forwarder matches the rules and writes the record and its
  destinations to the queue in one SQLite transaction.
* What a dead process held is found again by a reconcile with the index:
  at the forwarder's start (after the indexer's own reconcile has indexed
  what the workers of a dead server never delivered), the stored instances
  the index has from :data:`START_WINDOW` before the newest one the queue
  took in, that the queue has not seen, are read from their files and
  matched; every :data:`RECONCILE_INTERVAL` a shorter window is checked
  again (and that is how a forwarder run standalone, beside a server with
  no forwarding of its own, learns of new instances).

Run by the supervisor as a child, or standalone: ``fastscp forward run``
(:func:`forward_main`).
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable

import msgspec

from fastscp.config import Config, ConfigError, DestinationConfig, with_live_keys
from fastscp.dicom.fields import HeaderFields
from fastscp.forward.queue import SAME_RECEIPT, Queue, QueueError
from fastscp.forward.rules import compile_rules, destinations_for, needs_attribute_map
from fastscp.forward.sender import Destination
from fastscp.index.records import BATCH_DECODER, INSTANCE_COLUMNS, InstanceColumns, InstanceRecord
from fastscp.index.reindex import FileState, read_records
from fastscp.process import logs
from fastscp.process.ipc import accept_local, drain, listen, local_address
from fastscp.process.kept import KeptFiles
from fastscp.process.kept import kept_folder as process_kept_folder
from fastscp.process.orphan import parent_gone
from fastscp.query.client import LocalQueryClient, QueryClient
from fastscp.query.messages import ServerUnavailable, SqlRequest
from fastscp.storage.reserved import FORWARD_BACKLOG

log = logging.getLogger("fastscp.forward")

#: At the start, the reconcile looks this far behind the newest instance the queue took in (seconds):
#: what a dead server's workers acknowledged but never handed on is that recent.
START_WINDOW = 600.0
#: Then every RECONCILE_INTERVAL seconds, RECONCILE_WINDOW seconds behind the newest.
RECONCILE_INTERVAL = 60.0
RECONCILE_WINDOW = 180.0
#: How long the start's reconcile waits for the indexer's own reconcile and pending records.
INDEXER_WAIT = 120.0
#: Files read and matched per queue transaction in a reconcile.
RECONCILE_CHUNK = 500
#: Seconds between tidy-ups of the queue (old sent rows, old ``seen`` rows).
TIDY_INTERVAL = 300.0


def forward_address(index_path: str) -> str:
    """The abstract socket the forwarder of an index listens on for the workers' records."""
    return local_address("forward", index_path)


def kept_folder(root: str) -> str:
    """Where workers keep, in files, the records a lagging forwarder had no room for (under the storage root)."""
    return process_kept_folder(root, FORWARD_BACKLOG)


class ForwardError(Exception):
    """The forwarder can't run; the message says why."""


def instance_records(columns: InstanceColumns, with_attributes: bool) -> list[InstanceRecord]:
    """The records of a batch (:class:`~fastscp.index.records.InstanceColumns`), one per instance.

    ``with_attributes``: rebuild each attribute map from its series' base and
    its own entries (:func:`fastscp.index.records.split_maps`); else "{}".
    """
    if not columns.count:
        return []
    values = {name: columns.column(name) for name in INSTANCE_COLUMNS}
    header_fields = [f for f in InstanceRecord.__struct_fields__ if f != "header"]
    bases: dict[int, dict[str, str]] = {}
    records = []
    for n in range(columns.count):
        attributes = "{}"
        if with_attributes:
            base_id = values["attributes_base"][n]
            if base_id not in bases:
                bases[base_id] = json.loads(columns.maps.get(base_id, "{}"))
            merged = dict(bases[base_id])
            merged.update(json.loads(values["attributes"][n] or "{}"))
            attributes = json.dumps({k: v for k, v in merged.items() if v is not None}, separators=(",", ":"))
        header = HeaderFields(**{name: values[name][n] for name in HeaderFields.__struct_fields__
                                 if name != "attributes"}, attributes=attributes)
        records.append(InstanceRecord(header=header, **{name: values[name][n] for name in header_fields}))
    return records


class Forwarder:
    def __init__(self, config: Config, reload: Callable[[], Config] | None = None, source: str = "") -> None:
        self.source = source or "the command line"
        self.rules = compile_rules(config.forwarding, self.source)
        self.config = config
        self._reload_config = reload
        self.reload_requested = False
        self.stopping = threading.Event()
        self.root = os.path.abspath(config.storage.directory)
        #: Records the workers kept in files while this process lagged or was down.
        self.kept = KeptFiles(kept_folder(self.root), "forwarder",
                              "the forwarder's reconcile at its next start finds the instances of its last 10 minutes")
        self.queue_path = config.forward_queue_path
        self.queue = Queue(self.queue_path)
        self.address = forward_address(config.index_path)
        try:
            self.listener = listen(self.address, 64)
        except OSError as exc:
            self.queue.close()
            raise ForwardError(f"cannot listen for stored instances ({exc.strerror}): another forwarder runs for "
                               f"the index {config.index_path} (the server's own, or `fastscp forward run`)") from None
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.destinations: dict[str, Destination] = {}
        self._reconcile_due = 0.0
        self._reconciler: threading.Thread | None = None
        self._next_tidy = 0.0
        self._retry_seen = self.queue.retry_requested()
        #: When forwarding began: the reconcile never looks further back.
        self.since = time.time()

    @property
    def ae_title(self) -> str:
        return self.config.forwarding.ae_title or self.config.server.ae_title

    # -- running -----------------------------------------------------------------------------

    def run(self) -> None:
        resent = self.queue.recover()
        for name, count in resent.items():
            log.warning("forwarding to %s: %d instances were in flight when the forwarder stopped; sending them "
                        "again (the destination may get them twice)", name, count)
        self.since = self.queue.start_mark(time.time())
        self._start_destinations(self.config.forwarding.destinations)
        log.info("forwarder started (pid %d): %d rules, destinations %s; queue %s", os.getpid(), len(self.rules),
                 ", ".join(f"{n} ({d.ae_title}@{d.host}:{d.port})" for n, d in
                           self.config.forwarding.destinations.items()) or "none", self.queue_path)
        self._start_reconcile(START_WINDOW, wait_for_indexer=True)
        while not self.stopping.is_set():
            if parent_gone():
                log.warning("the supervisor is gone: the forwarder stops (the queue keeps what is not sent)")
                break
            if self.reload_requested:
                self.reload_requested = False
                self._reload()
            for key, _events in self.selector.select(timeout=0.5):
                if key.fileobj is self.listener:
                    self._accept()
                else:
                    self._receive(key.fileobj)  # type: ignore[arg-type]
            self._take_kept(time.monotonic())
            now = time.time()
            if now >= self._reconcile_due and (self._reconciler is None or not self._reconciler.is_alive()):
                self._start_reconcile(RECONCILE_WINDOW, wait_for_indexer=False)
            if now >= self._next_tidy:
                self._next_tidy = now + TIDY_INTERVAL
                self.queue.tidy(now)
            requested = self.queue.retry_requested()
            if requested != self._retry_seen:
                self._retry_seen = requested
                for destination in self.destinations.values():
                    destination.clear_backoff()
        self._stop()

    def _accept(self) -> None:
        while (conn := accept_local(self.listener)) is not None:
            self.selector.register(conn, selectors.EVENT_READ)

    def _receive(self, conn: socket.socket) -> None:
        for data in drain(conn, self.selector):
            self._take_message(data)

    def _take_kept(self, now: float, at_once: bool = False) -> bool:
        """The oldest file of records a worker kept while this process lagged, if one is due (``at_once``:
        whatever the schedule); True if one was taken."""
        taken = self.kept.take_oldest(now, at_once=at_once)
        for data in taken[1] if taken is not None else ():
            self._take_message(data)
        return taken is not None

    def _take_message(self, data: bytes) -> None:
        try:
            batch = BATCH_DECODER.decode(data)
        except msgspec.DecodeError as exc:
            log.error("forwarder: a record message could not be decoded (%s); dropped", exc)
            return
        self.take(instance_records(batch.instances, needs_attribute_map(self.rules)))

    def take(self, records: list[InstanceRecord]) -> int:
        """Queue the records for the destinations their rules name; returns the pairs queued."""
        queued = self.queue.take((record, destinations_for(self.rules, record)) for record in records)
        if queued:
            for destination in self.destinations.values():
                destination.wake.set()
        return queued

    def _stop(self) -> None:
        self.stopping.set()
        # What the workers sent and kept before their stop: in the queue now, not left to the next
        # start's reconcile (a worker stops before this process, and kept its last records in a file).
        self._accept()  # a worker's, not accepted while this process lagged
        for key in list(self.selector.get_map().values()):
            if key.fileobj is not self.listener:
                self._receive(key.fileobj)  # type: ignore[arg-type]
        while self._take_kept(time.monotonic(), at_once=True):
            pass
        for destination in self.destinations.values():
            destination.wake.set()
        deadline = time.monotonic() + 5
        for destination in self.destinations.values():
            for thread in destination.threads:
                thread.join(max(0.0, deadline - time.monotonic()))
        for destination in self.destinations.values():
            destination.abort()
            for thread in destination.threads:
                thread.join(2)
        self.listener.close()
        self.queue.close()
        log.info("forwarder stopped")

    # -- destinations and reload -----------------------------------------------------------------

    def _start_destinations(self, wanted: dict[str, DestinationConfig]) -> None:
        for name, config in wanted.items():
            current = self.destinations.get(name)
            if current is not None and current.config == config and current.forwarding == self.config.forwarding:
                continue
            if current is not None:
                current.retire()
            destination = Destination(name, config, self.config.forwarding, self.queue_path, self.root,
                                      self.ae_title, self.stopping)
            destination.start()
            self.destinations[name] = destination
        for name in [n for n in self.destinations if n not in wanted]:
            self.destinations.pop(name).retire()

    def _reload(self) -> None:
        """SIGHUP: the forwarding rules and destinations of the config file, now (LIVE_KEYS)."""
        if self._reload_config is None:
            return
        try:
            new = self._reload_config()
            rules = compile_rules(new.forwarding, self.source)
        except ConfigError as exc:
            log.error("forwarder: config reload refused, the running rules stay: %s", exc)
            return
        self.config = with_live_keys(self.config, new)
        logs.set_level(self.config.logging.level)
        self.rules = rules
        self._start_destinations(self.config.forwarding.destinations)
        log.info("forwarder: config reloaded: %d rules, destinations %s", len(rules),
                 ", ".join(self.config.forwarding.destinations) or "none")

    # -- reconcile with the index ------------------------------------------------------------------

    def _start_reconcile(self, window: float, wait_for_indexer: bool) -> None:
        self._reconcile_due = time.time() + RECONCILE_INTERVAL
        self._reconciler = threading.Thread(target=self._reconcile_safely, args=(window, wait_for_indexer),
                                            name="forward-reconcile", daemon=True)
        self._reconciler.start()

    def _reconcile_safely(self, window: float, wait_for_indexer: bool) -> None:
        try:
            found = self.reconcile(window, wait_for_indexer)
            if found:
                log.info("forwarder reconcile: %d stored instances the queue had not taken in, queued %d for "
                         "forwarding", *found)
        except Exception as exc:  # the next interval tries again
            log.warning("forwarder reconcile with the index failed: %s", exc)

    def reconcile(self, window: float, wait_for_indexer: bool) -> tuple[int, int] | None:
        """Take in the stored instances of the last ``window`` seconds that the queue has not seen.

        Returns (instances found, pairs queued), or None if none were missing.
        """
        queue = Queue(self.queue_path)
        try:
            since = max(self.since, (queue.high_water() or time.time()) - window)
            if wait_for_indexer:
                self._wait_for_indexer()
            rows = self._indexed_since(since)
            known = queue.known(since - SAME_RECEIPT)
            missing = []
            for path, received_us in rows:
                seen = known.get(path)
                if seen is not None and abs(seen[0] - received_us / 1e6) <= SAME_RECEIPT:
                    continue
                try:
                    info = os.stat(os.path.join(self.root, path))
                except OSError:
                    continue  # removed since: nothing to send
                missing.append(FileState(path, info.st_size, info.st_mtime_ns))
            if not missing:
                return None
            queued = 0
            for start in range(0, len(missing), RECONCILE_CHUNK):
                if self.stopping.is_set():
                    break
                records = read_records(self.root, missing[start:start + RECONCILE_CHUNK])
                queued += queue.take((r, destinations_for(self.rules, r)) for r in records)
            for destination in self.destinations.values():
                destination.wake.set()
            return len(missing), queued
        finally:
            queue.close()

    def _wait_for_indexer(self) -> None:
        """Until the server's indexer has reconciled and committed what it held (bounded); no server: at once."""
        client = QueryClient(self.config.index_path, timeout=5)
        deadline = time.monotonic() + INDEXER_WAIT
        target = None
        while time.monotonic() < deadline and not self.stopping.is_set():
            try:
                state = client.state()
            except (OSError, ConnectionError):
                if not client.available():
                    return  # no server: the file is read as it is
                time.sleep(0.5)
                continue
            if state.reconcile != "running":
                if target is None:
                    target = state.committed + state.pending
                if state.pending == 0 or state.committed >= target:
                    return
            time.sleep(0.2)
        log.warning("forwarder: the indexer did not finish its reconcile within %.0f s; reconciling with what "
                    "it has", INDEXER_WAIT)

    def _indexed_since(self, since: float) -> list[tuple[str, int]]:
        # An integer of ours, never a peer's value, in the SQL text.
        sql = (f"SELECT path, epoch_us(received_at) FROM instances "
               f"WHERE received_at >= make_timestamp({int(since * 1e6)}::BIGINT)")
        client: QueryClient | LocalQueryClient = QueryClient(self.config.index_path)
        if not client.available():
            try:
                client = LocalQueryClient(self.config.index_path)
            except Exception as exc:
                log.debug("forwarder reconcile: no index to read (%s)", exc)
                return []
        try:
            with client.query(SqlRequest(sql=sql)) as result:
                return [(str(path), int(us)) for path, us in result]
        except ServerUnavailable:
            return []
        finally:
            client.close()


def forward_main(config: Config, reload: Callable[[], Config] | None = None, source: str = "") -> None:
    """Entry point of the forwarder process: as the server's child, or standalone (``fastscp forward run``).

    Parameters
    ----------
    config : Config
        The config in force; its ``forwarding`` section says what to send where.
    reload : callable, optional
        Reads the config again from its sources; SIGHUP calls it (the rules
        and destinations change at once, the queue file needs a restart).
    source : str
        The config file, for messages.

    Raises
    ------
    ConfigError
        A rule that can't be used (naming the key and ``source``).
    SystemExit
        Exit status 1: the queue can't be opened, or another forwarder runs for the index (logged).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forwarder = Forwarder(config, reload, source)
    except (ForwardError, QueueError) as exc:
        log.error("forwarder not started: %s", exc)
        raise SystemExit(1) from None

    def stop(_signum: int, _frame: object) -> None:
        forwarder.stopping.set()

    def hangup(_signum: int, _frame: object) -> None:
        forwarder.reload_requested = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, hangup)
    forwarder.run()
