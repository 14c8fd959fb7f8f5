"""The supervisor's running account of associations, for the status snapshot.

Workers report each association's cumulative figures (about twice a second
while open, once when it ends); this book keeps the latest report of every
open association and folds ended ones into the totals.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter, deque

from fastscp import __version__
from fastscp.status import (
    LATENCY_BUCKETS,
    RECENT,
    SIZE_BUCKETS,
    AssociationReport,
    AssociationState,
    Histogram,
    IndexState,
    Rates,
    StatusSnapshot,
    StorageState,
    Totals,
    WorkerState,
)

#: At most this many modalities and calling AE titles in a snapshot.
TOP = 200
#: Longest rate window (5 min) at one sample per snapshot (0.5 s), plus slack.
_SAMPLES = 700


class StatusBook:
    def __init__(self) -> None:
        self.started = time.time()
        self.open: dict[int, AssociationReport] = {}
        self.recent: deque[AssociationState] = deque(maxlen=RECENT)
        self.totals = Totals()
        self.by_modality: Counter[str] = Counter()
        self.by_calling_ae: Counter[str] = Counter()
        self.rejects: Counter[str] = Counter()
        self.latency = Histogram.empty(LATENCY_BUCKETS)
        self.sizes = Histogram.empty(SIZE_BUCKETS)
        self._samples: deque[tuple[float, int, int]] = deque(maxlen=_SAMPLES)

    def report(self, report: AssociationReport) -> None:
        state = report.state
        if not report.ended:
            self.open[state.connection_id] = report
            return
        self.open.pop(state.connection_id, None)
        if report.probe:
            return
        self.recent.appendleft(state)
        if state.outcome.startswith("rejected"):
            self.reject(state.outcome.removeprefix("rejected (").removesuffix(")"))
            return
        t = self.totals
        t.associations += 1
        t.instances += state.instances
        t.bytes += state.bytes
        t.failures += state.failures
        t.duplicates += state.duplicates
        self.by_modality.update(report.by_modality)
        self.by_calling_ae[state.calling_ae_title] += state.instances
        self.latency.merge(report.store_latency_seconds)
        self.sizes.merge(report.object_size_bytes)

    def reject(self, reason: str) -> None:
        # Group "calling AE title 'X' is not allowed from Y" under its kind.
        self.totals.rejected += 1
        self.rejects[reason.split(":")[0]] += 1

    def ended(self, connection_id: int) -> None:
        """An association ended without its final report (its worker died)."""
        report = self.open.pop(connection_id, None)
        if report is not None:
            state = report.state
            self.recent.appendleft(
                AssociationState(**{**_fields(state), "ended": time.time(), "outcome": "aborted: worker died"})
            )

    def snapshot(self, *, ae_title: str, host: str, port: int, state: str, storage_root: str,
                 min_free_bytes: int, index_path: str, index_committed: int, index_lag: int,
                 workers: list[WorkerState], config: dict[str, object], index_kept_files: int = 0) -> StatusSnapshot:
        totals = Totals(**_fields(self.totals))
        by_modality = Counter(self.by_modality)
        by_calling_ae = Counter(self.by_calling_ae)
        latency, sizes = _copy(self.latency), _copy(self.sizes)
        for report in self.open.values():
            s = report.state
            totals.instances += s.instances
            totals.bytes += s.bytes
            totals.failures += s.failures
            totals.duplicates += s.duplicates
            by_modality.update(report.by_modality)
            by_calling_ae[s.calling_ae_title] += s.instances
            latency.merge(report.store_latency_seconds)
            sizes.merge(report.object_size_bytes)
        now = time.time()
        self._samples.append((now, totals.instances, totals.bytes))
        usage = shutil.disk_usage(storage_root)
        return StatusSnapshot(
            time=now, started=self.started, version=__version__, ae_title=ae_title, host=host, port=port,
            state=state, open=[r.state for r in self.open.values()], recent=list(self.recent), totals=totals,
            rates=Rates(
                instances_per_s_1m=self._rate(60, 1), mb_per_s_1m=self._rate(60, 2) / 1e6,
                instances_per_s_5m=self._rate(300, 1), mb_per_s_5m=self._rate(300, 2) / 1e6,
            ),
            # Bounded, so a snapshot always fits one message to the monitor.
            per_modality=dict(by_modality.most_common(TOP)), per_calling_ae=dict(by_calling_ae.most_common(TOP)),
            rejects=dict(self.rejects),
            storage=StorageState(
                root=storage_root, total_bytes=usage.total, used_bytes=usage.used, free_bytes=usage.free,
                min_free_bytes=min_free_bytes, below_watermark=usage.free < min_free_bytes,
            ),
            index=IndexState(path=index_path, committed=index_committed, lag=index_lag,
                             kept_files=index_kept_files),
            workers=workers, store_latency_seconds=latency, object_size_bytes=sizes, config=config,
        )

    def _rate(self, window: float, column: int) -> float:
        """Per-second increase of a sample column over the last ``window`` seconds."""
        if len(self._samples) < 2:
            return 0.0
        newest = self._samples[-1]
        oldest = next((s for s in self._samples if s[0] >= newest[0] - window), self._samples[0])
        span = newest[0] - oldest[0]
        return (newest[column] - oldest[column]) / span if span > 0 else 0.0


def _fields(struct: object) -> dict[str, object]:
    return {name: getattr(struct, name) for name in struct.__struct_fields__}  # type: ignore[attr-defined]


def _copy(histogram: Histogram) -> Histogram:
    return Histogram(buckets=histogram.buckets, counts=list(histogram.counts), sum=histogram.sum,
                     count=histogram.count)


