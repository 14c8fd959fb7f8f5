"""A shared index's study work in the post-store stage: each study's sheet and hooks decided once, across nodes.

On one node the stage times its studies itself (``QuietStudies``). When the
index is shared (``database.catalog``), a study whose associations landed
on several nodes is still one study. Each node's stage touches the study's
job in the catalog database for the instances it stores
(:class:`fastscp.index.jobs.StudyJobs`, batched: at most every
:data:`TOUCH_INTERVAL`, at once for a study new to it). Once the study has
been quiet for ``scansheet.study_timeout`` on every node, one node takes
the job, reads the study's rows of every node from the shared index, makes
the scan sheet and submits the study-complete event to its hooks; it renews
its lease (``database.job_lease``) until their runs are over, then finishes
the job. A node that dies stops renewing, and another node takes the job
when the lease has run out; one that stops gives back the jobs it had not
finished.

The scan sheet is written on the node that ran the job, in its own storage
(the study's folder of its layout, else ``scansheets/``). It lists every
instance of the study; its thumbnails come from the files themselves, read
at ``<the node's storage.directory>/<path>`` (each node registers its
storage root in the catalog): that works where the nodes share their storage
(the same paths everywhere); other nodes' files that can't be read are
"no image" tiles.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time

import duckdb

from fastscp.config import ScansheetConfig
from fastscp.hooks.events import Event, Tracker
from fastscp.hooks.runner import Hooks
from fastscp.imaging.scansheet import make_scansheet
from fastscp.index.database import Index, IndexUnavailable, Lake
from fastscp.index.jobs import StudyJobs, receipt_us
from fastscp.index.records import InstanceRecord
from fastscp.storage.files import FileModes
from fastscp.storage.layout import LayoutOptions

log = logging.getLogger("fastscp.jobs")

#: Touches of studies already known go to the catalog at most this often (seconds).
TOUCH_INTERVAL = 1.0
#: How often a node asks for a quiet study's job (seconds).
POLL_INTERVAL = 1.0
#: How often the jobs held are checked: their hooks' runs over? lease to renew? (seconds).
CHECK_INTERVAL = 0.5
#: After the catalog failed, the next attempt (seconds).
RETRY_INTERVAL = 5.0
#: Jobs taken per poll: each makes a sheet in this loop, which must keep receiving.
TAKE_PER_POLL = 8
#: Jobs a node holds at once (their hooks running); beyond, the others take the due ones.
MAX_HELD = 64
#: Studies waiting for their touch (the catalog unreachable); beyond, new ones are dropped (logged).
MAX_PENDING = 100_000
#: Studies remembered as touched lately (so that a new one is touched at once).
MAX_RECENT = 10_000
#: How often finished jobs older than KEEP_DONE are deleted (seconds).
PRUNE_INTERVAL = 3600.0


@dataclasses.dataclass
class _Held:
    version: int
    #: node -> the latest receipt (us) of its rows the job read.
    read: dict[str, int]
    #: Its study-complete event, while hooks run it.
    event: Event
    renew_at: float


class SharedStudies:
    """The study jobs of one node (see the module docstring), driven by the post-store loop's :meth:`tick`."""

    def __init__(self, lake: Lake, root: str, layout: LayoutOptions, scansheet: ScansheetConfig, lease: float,
                 hooks: Hooks, modes: FileModes) -> None:
        self.lake = lake
        self.node = lake.node
        self.root = root
        self.layout = layout
        self.scansheet = scansheet
        self.lease = lease
        self.hooks = hooks
        hooks.track_studies = False  # the events come from the shared index's rows
        self.modes = modes
        #: Studies to touch: study -> the latest receipt (us) of its instances stored here.
        self.pending: dict[str, int] = {}
        self.recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.urgent = False
        self.held: dict[str, _Held] = {}
        self.dropped = 0
        self.failures = 0
        self._index: Index | None = None
        self._jobs: StudyJobs | None = None
        self._retry_at = 0.0
        self._next_touch = 0.0
        self._next_poll = 0.0
        self._next_check = 0.0
        self._next_prune = 0.0
        self._stopping = False
        self._started = False

    # -- the stage's side ----------------------------------------------------------------

    def touch(self, study: str, received_at: float) -> None:
        """An instance of ``study`` was stored on this node (received at ``received_at``, seconds since the epoch)."""
        if study in self.recent:
            self.recent.move_to_end(study)
        else:
            self.urgent = True
            self.recent[study] = None
            if len(self.recent) > MAX_RECENT:
                self.recent.popitem(last=False)
        received = receipt_us(received_at)
        if study in self.pending:
            self.pending[study] = max(self.pending[study], received)
            return
        if len(self.pending) >= MAX_PENDING:
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.warning("study jobs: %d studies wait for the catalog; %d touches dropped (their sheets and "
                            "study-complete hooks may not come)", len(self.pending), self.dropped)
            return
        self.pending[study] = received

    def tick(self) -> None:
        """Touch, renew, finish and take jobs as due; call it at least every second."""
        now = time.monotonic()
        # Cheap when nothing is due: the stage calls it after every record.
        touch = self.pending and (self.urgent or now >= self._next_touch)
        check = self.held and now >= self._next_check
        poll = now >= self._next_poll and not self._stopping
        if not (touch or check or poll):
            return
        jobs = self._connect(now)
        if jobs is None:
            return
        try:
            if touch:
                jobs.touch(self.pending, self.scansheet.study_timeout)
                self.pending.clear()
                self.urgent = False
                self._next_touch = now + TOUCH_INTERVAL
            self._next_check = now + CHECK_INTERVAL
            for study, held in list(self.held.items()) if check else ():
                if not self.hooks.holds(held.event):
                    del self.held[study]
                    self._finish(jobs, study, held.version, held.read)
                elif now >= held.renew_at:
                    held.renew_at = now + self.lease / 3
                    if not jobs.renew(study, self.lease):
                        log.warning("study %s: this node's lease on its job ran out and another node took it; "
                                    "its hooks may run there too", study)
            if poll:
                self._next_poll = now + POLL_INTERVAL
                for _ in range(TAKE_PER_POLL):
                    if len(self.held) >= MAX_HELD or (taken := jobs.take(self.lease)) is None:
                        break
                    self._run(jobs, *taken)
                else:
                    self._next_poll = now  # more may be due
            if now >= self._next_prune:
                self._next_prune = now + PRUNE_INTERVAL
                jobs.prune()
        except duckdb.Error as exc:
            self._failed(now, exc)

    def stop(self) -> None:
        """Before the hooks stop: touches out, jobs whose runs are over finished, no new job taken."""
        self._stopping = True
        self.urgent = True
        self._next_check = 0.0
        self.tick()

    def close(self) -> None:
        """After the hooks stopped: the jobs still held go back (their runs were dropped or killed)."""
        jobs = self._connect(time.monotonic()) if self.held else self._jobs
        for study in list(self.held):
            try:
                if jobs is not None:
                    jobs.release(study)
                    log.info("study %s: its job given back (this node stops)", study)
            except duckdb.Error as exc:
                log.warning("study %s: its job not given back (%s); another node takes it when the lease "
                            "runs out", study, self._reason(exc))
        self.held.clear()
        if self.pending:
            log.warning("study jobs: %d studies not touched in the catalog (unreachable)", len(self.pending))
        self._disconnect()

    # -- the job --------------------------------------------------------------------------

    def _run(self, jobs: StudyJobs, study: str, version: int, previous: str) -> None:
        if previous:
            log.warning("study %s: its job taken over from %s, whose lease ran out", study, previous)
        assert self._index is not None
        rows = self._index.study_rows(study, every_node=True)
        read: dict[str, int] = {}
        for node, _path, _ae, received, _header in rows:
            read[node] = max(read.get(node, -1), received)
        nodes = sorted(read)
        log.info("study %s: job taken (version %d; %d instances on %s)", study, version, len(rows),
                 ", ".join(nodes) or "no node")
        if not rows:
            self._finish(jobs, study, version, read)
            return
        # This node's rows first: its first instance names the study's folder here.
        rows.sort(key=lambda row: row[0] != self.node)
        others = ({name: address.storage_directory for name, address in self._index.node_addresses().items()}
                  if any(node != self.node for node in nodes) else {})
        items, records = [], []
        for node, path, calling_ae, _received, header in rows:
            mine = node == self.node or os.path.isabs(path)
            full = path if os.path.isabs(path) else os.path.join(self.root if mine else others.get(node, self.root),
                                                                  path)
            items.append((full, header))
            records.append(InstanceRecord(path=path if mine else full, size=0, transfer_syntax_uid="",
                                          calling_ae_title=calling_ae, called_ae_title="", peer_address="",
                                          received_at=0.0, header=header))
        if self.scansheet.enabled:
            try:
                _summary, png, _page = make_scansheet(self.root, self.layout, study, items,
                                                      per_row=self.scansheet.thumbnails_per_series, modes=self.modes)
                log.info("scan sheet of study %s (%d instances, %d nodes): %s", study, len(items), len(nodes), png)
            except (OSError, ValueError) as exc:
                log.warning("scan sheet of study %s not written: %s", study, exc)
        event = None
        if self.hooks.wants_studies:
            tracker = Tracker(self.root, self.layout)
            for record in records:
                tracker.stored(record, associations=False, studies=True)
            event = self.hooks.study_complete(study, tracker.study_complete(study))
        if event is None:
            self._finish(jobs, study, version, read)
        else:
            self.held[study] = _Held(version, read, event, time.monotonic() + self.lease / 3)

    def _finish(self, jobs: StudyJobs, study: str, version: int, read: dict[str, int]) -> None:
        if jobs.finish(study, version, read):
            log.info("study %s: job done (version %d)", study, version)
        else:
            log.warning("study %s: job done here, but its lease had run out and another node took it", study)

    # -- the catalog ----------------------------------------------------------------------

    def _connect(self, now: float) -> StudyJobs | None:
        if self._jobs is not None:
            return self._jobs
        if now < self._retry_at:
            return None
        try:
            index = Index("", read_only=True, lake=self.lake)
            try:
                jobs = StudyJobs(index.con, self.lake.catalog, self.node)
                if not self._started:
                    # Held by this node's previous post-store process (killed, restarted): nothing runs them now.
                    if released := jobs.release_all():
                        log.info("study jobs: %d jobs held by this node before it restarted given back", released)
                    self._started = True
            except BaseException:
                index.close()
                raise
        except (IndexUnavailable, duckdb.Error) as exc:
            self._failed(now, exc)
            return None
        if self.failures:
            log.info("study jobs: the catalog answers again")
        self.failures = 0
        self._index, self._jobs = index, jobs
        return jobs

    def _reason(self, exc: BaseException) -> str:
        # Never the connection string (it may hold a password).
        return str(exc).splitlines()[0].replace(self.lake.catalog, "<database.catalog>") if str(exc) else repr(exc)

    def _failed(self, now: float, exc: BaseException) -> None:
        """The catalog failed: start again from a new connection after RETRY_INTERVAL (what was pending stays)."""
        self.failures += 1
        if self.failures in (1, 10, 100) or self.failures % 1000 == 0:
            log.warning("study jobs: the catalog failed (%d times in a row): %s; retrying every %g s",
                        self.failures, self._reason(exc), RETRY_INTERVAL)
        self._retry_at = now + RETRY_INTERVAL
        self._disconnect()

    def _disconnect(self) -> None:
        if self._jobs is not None:
            self._jobs.close()
        if self._index is not None:
            self._index.close()
        self._index = self._jobs = None
