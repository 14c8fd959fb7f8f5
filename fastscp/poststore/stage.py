"""The post-store process: thumbnails and scan sheets, off the C-STORE path.

Workers hand each stored instance to it without waiting
(:mod:`fastscp.poststore.client`): while it lags, records wait in its queue
(:data:`QUEUE_LIMIT`), then in its sockets, then in each worker's bounded
backlog, then in files the workers write under the storage root
(``.incoming/poststore-backlog``), which it takes once its queue has room.
Only records no file could take are dropped, logged (a thumbnail can
always be made again with ``fastscp convert`` or ``fastscp scansheet``;
an acknowledged store must never wait).
It runs at low CPU priority (``server.derived_priority``), one record at a time, and while
stores keep arriving it waits for them to pause, up to :data:`MAX_DEFER` seconds behind. It makes:

- a JPEG thumbnail per image, in ``<root>/thumbnails/`` mirroring the layout,
  whose path it reports to the indexer;
- a scan sheet per study once the study has been quiet for
  ``scansheet.study_timeout`` seconds, remade when more images arrive;
- the post-receive hooks (:mod:`fastscp.hooks`) of each stored instance, of
  each association's end (workers report it here too) and of each quiet
  study; the supervisor sends reloaded hooks and takes their counts over
  a link of their own (:mod:`fastscp.hooks.link`).

With a shared index (``lake``), a study's sheet and study-complete hooks
are decided once across the nodes instead (:mod:`fastscp.poststore.jobs`).
"""

from __future__ import annotations

import collections
import logging
import os
import selectors
import signal
import socket
import time
from collections.abc import Sequence

import msgspec

from fastscp.config import HookConfig, ScansheetConfig, ThumbnailsConfig
from fastscp.dicom.fields import HeaderFields
from fastscp.hooks import link
from fastscp.hooks.actions import run_action
from fastscp.hooks.runner import Hooks
from fastscp.imaging.scansheet import QuietStudies, find_study_instances, make_scansheet
from fastscp.imaging.thumbnail import thumbnail_path, try_write_thumbnail
from fastscp.index.client import IndexerClient
from fastscp.index.database import Lake
from fastscp.index.records import POSTSTORE_DECODER, InstanceRecord, ThumbnailMade
from fastscp.poststore.client import BATCH_RECORDS, kept_folder
from fastscp.poststore.jobs import SharedStudies
from fastscp.process.ipc import accept_local, drain, listen, receive
from fastscp.process.kept import KeptFiles, write_kept
from fastscp.process.orphan import parent_gone
from fastscp.status import AssociationReport, PostStoreState
from fastscp.storage.files import FileModes
from fastscp.storage.layout import LayoutOptions, study_folder

log = logging.getLogger("fastscp.poststore")

#: Records waiting in the stage; beyond this it stops reading (they wait in its
#: sockets, then in the workers: :class:`fastscp.poststore.client.PostStoreClient`).
QUEUE_LIMIT = 20_000
#: A file of records a worker kept is taken while fewer wait (one file: 16 MB of records at most).
#: Not only once caught up: until it is taken, that worker's records wait behind it (in order).
TAKE_KEPT_BELOW = QUEUE_LIMIT // 2
#: PERF (issue 13, lever 4): the stage waits while stores keep arriving (a record came within
#: INGEST_QUIET seconds), until its oldest record has waited MAX_DEFER seconds; then it keeps pace
#: that far behind. SCHED_IDLE alone still cost mr-k4 ~9% of its images/s (5 interleaved pairs on
#: a fresh ext4): the stage runs in every idle moment of a CPU, between a worker's stores.
INGEST_QUIET = 0.2
MAX_DEFER = 10.0
#: At exit, seconds the records for the indexer (thumbnails made) may wait for it to read them; past
#: that, what it did not take is logged as not delivered (an indexer that stopped reading).
INDEXER_DELIVERY_WAIT = 20.0
#: How often, at most, the hooks' counts go to the supervisor (status page).
HOOKS_REPORT_INTERVAL = 0.5
#: On stop, how long running hook programs may take before they are killed.
HOOKS_STOP_GRACE = 10.0


class PostStore:
    def __init__(self, root: str, layout: LayoutOptions, thumbnails: ThumbnailsConfig, scansheet: ScansheetConfig,
                 address: str, indexer: IndexerClient, modes: FileModes, hooks: Sequence[HookConfig] = (),
                 sr_root: str = "", hooks_link: socket.socket | None = None, lake: Lake | None = None,
                 job_lease: float = 60.0) -> None:
        self.root = root
        self.modes = modes
        self.layout = layout
        self.thumbnails = thumbnails
        self.scansheet = scansheet
        self.indexer = indexer
        self.listener = listen(address, 64)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        #: (when it was stored, or for a report received: epoch seconds; record), oldest first.
        self.queue: collections.deque[tuple[float, InstanceRecord | AssociationReport]] = collections.deque()
        self.quiet = QuietStudies(scansheet.study_timeout)
        #: Instances seen per study since its last sheet: (absolute path, header).
        self.studies: dict[str, list[tuple[str, HeaderFields]]] = collections.defaultdict(list)
        self.stopping = False
        self.made = 0
        self.hooks = Hooks(hooks, root, sr_root, layout, modes, run_action)
        self.selector.register(self.hooks, selectors.EVENT_READ)
        self.hooks_link = hooks_link
        self._next_report = 0.0
        self._reported: PostStoreState | None = None
        if hooks_link is not None:
            hooks_link.setblocking(False)
            self.selector.register(hooks_link, selectors.EVENT_READ)
        #: Messages that were not an InstanceRecord.
        self.undecodable = 0
        #: When the last record was queued (time.monotonic): stores still arriving (deferring).
        self._last_arrival = 0.0
        #: Records workers kept in files while this stage lagged (fastscp.poststore.client).
        self.kept = KeptFiles(kept_folder(root), "post-store")
        self.shared = SharedStudies(lake, root, layout, scansheet, job_lease, self.hooks, modes) if lake else None

    def run(self) -> None:
        while not (self.stopping and not self.queue):
            if self._orphaned():
                return
            self.step()
        if self._orphaned():
            return
        self._keep_unread()
        # Stopping: studies still settling get their sheet now, not never.
        for study in list(self.studies):
            self._scansheet(study)
        if self.shared is not None:
            self.shared.stop()
        self.hooks.stop(HOOKS_STOP_GRACE)
        if self.shared is not None:
            self.shared.close()
        self._report_hooks(force=True)
        log.info("post-store stopped; %d thumbnails made", self.made)

    def step(self) -> None:
        """One turn of :meth:`run`: receive what has come, then one record (unless stores keep
        arriving: :meth:`deferring`), the scan sheets due, the counts to the supervisor."""
        hooks_due = self.hooks.tick()
        deferring = self.deferring()
        timeout = INGEST_QUIET / 4 if deferring else 0 if self.queue else min(
            self.quiet.next_due_in() or 1.0, 1.0, 1.0 if hooks_due is None else hooks_due)
        for key, _events in self.selector.select(timeout):
            if key.fileobj is self.listener:
                self._accept()
            elif key.fileobj is self.hooks:
                self.hooks.dispatch()
            elif key.fileobj is self.hooks_link:
                self._reconfigure()
            else:
                self._receive(key.fileobj)  # type: ignore[arg-type]
        if self.queue and not deferring:
            self._process(self.queue.popleft()[1])
        if len(self.queue) < TAKE_KEPT_BELOW and not self.stopping:  # stopping: left to the next start
            self._take_kept()
        for study in self.quiet.pop_due():
            self._scansheet(study)
            self.hooks.study_complete(study)
        if self.shared is not None:
            self.shared.tick()
        self._report_hooks()

    def deferring(self) -> bool:
        """True while the records wait for the stores to pause: one arrived within
        :data:`INGEST_QUIET`, the oldest has waited less than :data:`MAX_DEFER`, the queue has room
        and the stage is not stopping."""
        if not self.queue or self.stopping or len(self.queue) >= QUEUE_LIMIT:
            return False
        return (time.monotonic() - self._last_arrival < INGEST_QUIET
                and time.time() - self.queue[0][0] < MAX_DEFER)

    def _reconfigure(self) -> None:
        assert self.hooks_link is not None
        while data := receive(self.hooks_link):
            message = link.DECODER.decode(data)
            if isinstance(message, link.HooksUpdate):
                self.hooks.configure(message.hooks)
        if data is None:  # the supervisor is gone: _orphaned() sees to the rest
            self.selector.unregister(self.hooks_link)
            self.hooks_link.close()
            self.hooks_link = None

    def state(self) -> PostStoreState:
        """The backlog: what waits, and for how long (the status page's post-store lag)."""
        oldest = max(time.time() - self.queue[0][0], 0.0) if self.queue else 0.0
        kept = self.kept.count()
        return PostStoreState(waiting=len(self.queue), oldest_seconds=round(oldest, 1), studies=len(self.studies),
                              thumbnails=self.made, kept_files=kept)

    def _report_hooks(self, force: bool = False) -> None:
        """The hooks' counts and the backlog to the supervisor, when they changed, at most every
        HOOKS_REPORT_INTERVAL."""
        now = time.monotonic()
        if self.hooks_link is None or (now < self._next_report and not force):
            return
        state = self.state()
        if not (self.hooks.changed or force or state != self._reported):
            return
        self._next_report = now + HOOKS_REPORT_INTERVAL
        try:
            self.hooks_link.send(link.ENCODER.encode(link.HooksReport(self.hooks.states(), state)))
            self._reported = state
        except OSError:
            pass  # busy: the next report carries the same counts

    def _orphaned(self) -> bool:
        """True (and the work dropped) once the supervisor is gone: nothing would stop us.

        Its death signal (SIGTERM) only sets ``stopping``; the queue could
        take minutes, and a restarted server may already be running.
        """
        if not parent_gone():
            return False
        log.warning("the supervisor is gone: post-store stops; %d queued records and %d studies left without "
                    "thumbnails or scan sheets (fastscp convert, fastscp scansheet); %d running hooks killed",
                    len(self.queue), len(self.studies), self.hooks.running)
        self.queue.clear()
        self.studies.clear()
        self.hooks.abandon()
        return True

    def _accept(self) -> None:
        while (conn := accept_local(self.listener)) is not None:
            self.selector.register(conn, selectors.EVENT_READ)

    def _receive(self, conn: socket.socket) -> None:
        # A full queue stops the reading: records wait in the socket, then in the workers (bounded memory).
        for data in drain(conn, self.selector, lambda: len(self.queue) < QUEUE_LIMIT):
            self._enqueue(data)

    def _enqueue(self, data: bytes) -> None:
        try:
            records = POSTSTORE_DECODER.decode(data)
            if isinstance(records, list) and len(records) > BATCH_RECORDS:
                # The queue's bound holds to one message: a worker sends BATCH_RECORDS at most.
                raise msgspec.DecodeError(f"{len(records)} records in one message, more than {BATCH_RECORDS}")
        except msgspec.DecodeError as exc:
            # Any process of our user can connect: a stray message is dropped, not fatal.
            self.undecodable += 1
            if self.undecodable in (1, 10, 100) or self.undecodable % 1000 == 0:
                log.warning("post-store: %d messages that are not a worker's instance records or association "
                            "reports dropped (%s)", self.undecodable, exc)
            return
        for record in records if isinstance(records, list) else (records,):
            self.queue.append((record.received_at if isinstance(record, InstanceRecord) else time.time(), record))
        self._last_arrival = time.monotonic()

    def _unread(self) -> list[bytes]:
        """Every message waiting in the workers' sockets (connections not yet accepted too)."""
        self._accept()
        return [data for key in list(self.selector.get_map().values())
                if key.fileobj not in (self.listener, self.hooks, self.hooks_link)
                for data in drain(key.fileobj, self.selector)]  # type: ignore[arg-type]

    def _keep_unread(self) -> None:
        """Stopping with the queue done: the records still in the workers' sockets go to a file, which
        the next start takes (:meth:`_take_kept`), instead of being lost with the sockets."""
        unread = self._unread()
        if not unread:
            return
        try:
            # Before the files workers wrote as they stopped: a worker's socket holds its oldest messages.
            path = write_kept(self.kept.folder, unread, self.modes, first=True)
        except OSError as exc:
            log.warning("post-store stopping: %d messages of records neither taken nor kept (%s): no thumbnails "
                        "for them (fastscp convert, fastscp scansheet)", len(unread), exc)
            return
        log.info("post-store stopping: %d messages of records not taken yet, kept in %s for the next start",
                 len(unread), path)

    def _take_kept(self) -> None:
        """Take the oldest file of records a worker kept while this stage lagged, if any.

        What its worker sent before the file may have come since this turn read the sockets (this
        process runs at idle priority: a turn can pause for seconds): it is queued first, so an
        association's report never comes before its records."""
        taken = self.kept.take_oldest(time.monotonic(), before_removal=lambda: self._queue_all(self._unread()))
        self._queue_all(taken[1] if taken is not None else [])

    def _queue_all(self, messages: list[bytes]) -> None:
        for data in messages:
            self._enqueue(data)

    def _process(self, record: InstanceRecord | AssociationReport) -> None:
        if isinstance(record, AssociationReport):
            self.hooks.association_ended(record)
            return
        path = record.path if os.path.isabs(record.path) else os.path.join(self.root, record.path)
        if self.thumbnails.enabled and not os.path.isabs(record.path):
            made = try_write_thumbnail(path, thumbnail_path(self.root, record.path), self.thumbnails.size,
                                       self.modes)
            if made is not None:
                self.made += 1
                self.indexer.send(ThumbnailMade(path=record.path, thumbnail_path=os.path.relpath(made, self.root)))
        study = record.header.study_instance_uid
        if self.scansheet.enabled and study and self.shared is None:
            self.studies[study].append((path, record.header))
        self.hooks.instance_stored(record)
        if study and (self.scansheet.enabled or self.hooks.wants_studies):
            if self.shared is None:
                self.quiet.touch(study)
            else:
                self.shared.touch(study, record.received_at)

    def _scansheet(self, study_uid: str) -> None:
        items = self.studies.pop(study_uid, [])
        if not items:
            return
        folder = study_folder(self.layout, os.path.relpath(items[0][0], self.root))
        if folder is not None:
            # The whole study as it is on disk: instances stored before a
            # restart, or in earlier bursts, belong on the sheet too.
            items = find_study_instances(os.path.join(self.root, folder), study_uid) or items
        try:
            _summary, png, _html = make_scansheet(self.root, self.layout, study_uid, items,
                                                  per_row=self.scansheet.thumbnails_per_series, modes=self.modes)
            log.info("scan sheet of study %s (%d instances): %s", study_uid, len(items), png)
        except (OSError, ValueError) as exc:
            log.warning("scan sheet of study %s not written: %s", study_uid, exc)


def poststore_main(root: str, layout: LayoutOptions, thumbnails: ThumbnailsConfig, scansheet: ScansheetConfig,
                   address: str, indexer_address: str, modes: FileModes, hooks: Sequence[HookConfig] = (),
                   sr_root: str = "", hooks_link: socket.socket | None = None,
                   lake: tuple[str, str, str] | None = None, job_lease: float = 60.0) -> None:
    """Entry point of the post-store process (``lake``: the shared index's (catalog, data path, node))."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Receiving comes first: the supervisor starts this process at
    # server.derived_priority (SCHED_IDLE: it runs on otherwise idle CPU and
    # catches up when the stores pause). PERF: at nice 10 thumbnails still
    # cost ct-k4 35% of its images/s (488 -> 315, bench.load).
    indexer = IndexerClient(indexer_address)
    stage = PostStore(root, layout, thumbnails, scansheet, address, indexer, modes, hooks, sr_root, hooks_link,
                      Lake(*lake) if lake else None, job_lease)

    def stop(_signum: int, _frame: object) -> None:
        stage.stopping = True

    signal.signal(signal.SIGTERM, stop)
    stage.run()
    deliver_at_exit(indexer)


def deliver_at_exit(indexer: IndexerClient) -> None:
    """The stage's last records for the indexer (thumbnails made). The supervisor stops the indexer
    after this process: it still reads, if slowly (its last batches). Without the supervisor the
    indexer is going too, and nothing would restart it: no wait."""
    indexer.close(wait=0.0 if parent_gone() else INDEXER_DELIVERY_WAIT)

