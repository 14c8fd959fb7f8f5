"""What the server is doing: the status snapshot the supervisor publishes.

The supervisor aggregates worker reports into one :class:`StatusSnapshot`
and sends it (msgpack, one SOCK_SEQPACKET message) to the monitor process
about twice a second; the monitor serves it as a page, JSON and Prometheus
metrics. Everything here is plain data.
"""

from __future__ import annotations

import bisect

import msgspec

#: Upper bounds of the store latency histogram (seconds, as Prometheus ``le``).
LATENCY_BUCKETS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
#: Upper bounds of the object size histogram (bytes).
SIZE_BUCKETS: tuple[float, ...] = (
    16e3, 64e3, 256e3, 1e6, 4e6, 16e6, 64e6, 256e6, 1e9, 4e9,
)


class Histogram(msgspec.Struct, kw_only=True):
    """A cumulative-free histogram: ``counts[i]`` observations fell in bucket i
    (``<= buckets[i]``, the last count is above every bound)."""

    buckets: tuple[float, ...]
    counts: list[int]
    sum: float = 0.0
    count: int = 0

    @classmethod
    def empty(cls, buckets: tuple[float, ...]) -> Histogram:
        return cls(buckets=buckets, counts=[0] * (len(buckets) + 1))

    def observe(self, value: float) -> None:
        # The first bucket whose bound is >= value; past the last bound, the last count.
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def merge(self, other: Histogram) -> None:
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.sum += other.sum
        self.count += other.count


class AssociationState(msgspec.Struct, kw_only=True):
    """One association, open or ended."""

    connection_id: int
    worker: int
    calling_ae_title: str = ""
    called_ae_title: str = ""
    peer_address: str = ""
    started: float = 0.0  # epoch seconds
    instances: int = 0
    failures: int = 0
    duplicates: int = 0
    bytes: int = 0
    #: Images/s over the association so far (open ones: current).
    rate: float = 0.0
    ended: float = 0.0  # 0 while open
    #: "released", "aborted by peer", "rejected (calling AE not recognized)" ...
    outcome: str = ""


class Totals(msgspec.Struct, kw_only=True):
    instances: int = 0
    bytes: int = 0
    failures: int = 0
    duplicates: int = 0
    associations: int = 0
    rejected: int = 0


class Rates(msgspec.Struct, kw_only=True):
    instances_per_s_1m: float = 0.0
    mb_per_s_1m: float = 0.0
    instances_per_s_5m: float = 0.0
    mb_per_s_5m: float = 0.0


class StorageState(msgspec.Struct, kw_only=True):
    root: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    min_free_bytes: int
    #: True while free space is below storage.min_free_bytes: stores get 0xA700.
    below_watermark: bool


class IndexState(msgspec.Struct, kw_only=True):
    path: str
    #: Instances stored by workers that the index has not committed yet.
    lag: int
    committed: int
    #: Files of records kept for the indexer beyond the workers' backlogs (.incoming/index-backlog).
    kept_files: int = 0


class WorkerState(msgspec.Struct, kw_only=True):
    index: int
    pid: int
    alive: bool
    open_associations: int
    started: float  # epoch seconds
    restarts: int = 0


class DestinationState(msgspec.Struct, kw_only=True):
    """One forwarding destination, from the forwarding queue (fastscp.forward.queue)."""

    name: str
    queued: int = 0
    in_flight: int = 0
    #: Sent and acknowledged (success or warning), since the queue was made.
    sent: int = 0
    #: Refused for good (not retried until ``fastscp forward retry``).
    failed: int = 0
    #: Sent again after the forwarder died while they were in flight, or after a send got no answer:
    #: the destination may hold them twice.
    resent: int = 0
    last_error: str = ""
    last_error_at: float = 0.0  # epoch seconds; 0: none
    #: Age of the oldest queued instance, seconds (0: none queued).
    oldest_queued_seconds: float = 0.0
class HookState(msgspec.Struct, kw_only=True):
    """One post-receive hook's counts since the post-store process started (config ``hooks``)."""

    name: str
    event: str
    #: Attempts started, retries included.
    runs: int = 0
    succeeded: int = 0
    #: Events given up on: the last attempt failed (non-zero exit, signal,
    #: timeout, not startable) and no retry was left.
    failed: int = 0
    #: Attempts that failed and were tried again.
    retried: int = 0
    #: Attempts killed at the hook's timeout.
    timed_out: int = 0
    #: Events dropped because the hook's queue was full.
    dropped: int = 0
    running: int = 0
    #: Waiting to start (retries waiting out their backoff included).
    queued: int = 0
    last_error: str = ""
    last_error_at: float = 0.0  # epoch seconds


class PostStoreState(msgspec.Struct, frozen=True, kw_only=True):
    """The post-store process's backlog (thumbnails, scan sheets, hooks): it runs at
    ``server.derived_priority`` and catches up after a burst."""

    #: Records received and not yet processed.
    waiting: int = 0
    #: Seconds the oldest of them has waited (0: none waits).
    oldest_seconds: float = 0.0
    #: Studies waiting for their scan sheet (quiet for scansheet.study_timeout).
    studies: int = 0
    #: Thumbnails made since the process started.
    thumbnails: int = 0
    #: Files of records kept for it, beyond the workers' backlogs (.incoming/poststore-backlog: up to
    #: 16 MB, ~12,000 records, each).
    kept_files: int = 0


class StatusSnapshot(msgspec.Struct, kw_only=True):
    time: float
    started: float
    version: str
    ae_title: str
    host: str
    port: int
    state: str  # "running" | "stopping"
    open: list[AssociationState]
    recent: list[AssociationState]  # newest first, at most RECENT
    totals: Totals
    rates: Rates
    #: Instances stored, by Modality and by calling AE title (the 200 largest).
    per_modality: dict[str, int]
    per_calling_ae: dict[str, int]
    #: Rejected associations by reason ("local limit exceeded", ...).
    rejects: dict[str, int]
    storage: StorageState
    index: IndexState
    workers: list[WorkerState]
    store_latency_seconds: Histogram
    object_size_bytes: Histogram
    #: The config in force, secrets hidden.
    config: dict[str, object]
    #: Connections waiting for their A-ASSOCIATE-RQ (not associations yet).
    pending_connections: int = 0
    #: Connections closed before association, by the setting that closed
    #: them (server.max_pending_per_address, ...).
    dropped_connections: dict[str, int] = msgspec.field(default_factory=dict)
    #: Forwarding, per destination (empty: forwarding is off).
    forwarding: list[DestinationState] = msgspec.field(default_factory=list)
    #: Post-receive hooks (config ``hooks``), as the post-store process last reported them.
    hooks: list[HookState] = msgspec.field(default_factory=list)
    #: The post-store process's backlog, as it last reported it (None: it does not run).
    poststore: PostStoreState | None = None


#: How many ended associations the snapshot lists.
RECENT = 50


class AssociationReport(msgspec.Struct, frozen=True, kw_only=True, tag="report"):
    """A worker's cumulative figures for one association (``ended`` when it has).

    Sent about twice a second while it is open, and once when it ends; the
    supervisor keeps the latest one and frees its slot on ``ended``.
    """

    state: AssociationState
    by_modality: dict[str, int]
    store_latency_seconds: Histogram
    object_size_bytes: Histogram
    ended: bool = False
    #: The connection closed before any PDU (a port probe): not counted.
    probe: bool = False


class IndexerState(msgspec.Struct, frozen=True, kw_only=True, tag="state"):
    """The running indexer: pushed to the supervisor about once a second, and part of the stats it answers."""

    pid: int
    #: Records received and not committed yet.
    pending: int
    #: Instances committed since the indexer started (not their thumbnail or conflict records).
    committed: int
    #: "running", "done", "failed" or "off" (no storage root given).
    reconcile: str
    #: Files of records workers kept for it while it lagged (.incoming/index-backlog: up to 32 MB each).
    kept_files: int = 0

ENCODER = msgspec.msgpack.Encoder()
DECODER = msgspec.msgpack.Decoder(StatusSnapshot)
JSON_ENCODER = msgspec.json.Encoder()


_SI_UNITS = ("B", "kB", "MB", "GB", "TB", "PB")


def human_bytes(count: int | float | None) -> str:
    """A byte count in SI units with three significant digits: 1536 -> '1.54 kB', 631_000_000 -> '631 MB'.

    The one convention of every size fastscp shows: the status page (its
    script's ``bytes()`` in :mod:`fastscp.monitor.page` writes the same
    text), ``fastscp status`` and ``fastscp send``; disks are sold and
    ``df -H`` counts in powers of 1000.
    """
    value = float(count or 0)
    unit = 0
    while abs(value) >= 1000 and unit < len(_SI_UNITS) - 1:
        value /= 1000
        unit += 1
    if unit == 0:
        return f"{value:.0f} B"
    return f"{value:.{2 if value < 10 else 1 if value < 100 else 0}f} {_SI_UNITS[unit]}"
