"""Per-association figures: counts, bytes, latency and size histograms, the closing log line.

Kept by the association and the message objects it runs (:mod:`fastscp.net.storescp`);
reported to the supervisor for the status page (:meth:`AssociationStats.report`).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from fastscp.status import LATENCY_BUCKETS, SIZE_BUCKETS, AssociationReport, AssociationState, Histogram


@dataclass
class AssociationStats:
    connection_id: int = 0
    worker: int = 0
    calling_ae_title: str = ""
    called_ae_title: str = ""
    peer_address: str = ""
    accepted: bool = False
    outcome: str = ""
    instances: int = 0
    failures: int = 0
    #: Resends of stored instances (acknowledged, not rewritten).
    duplicates: int = 0
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    started_epoch: float = field(default_factory=time.time)
    #: The connection closed before sending anything (a port probe).
    probe: bool = False
    #: Presentation contexts accepted at negotiation.
    contexts: int = 0
    by_modality: Counter[str] = field(default_factory=Counter)
    latency: Histogram = field(default_factory=lambda: Histogram.empty(LATENCY_BUCKETS))
    sizes: Histogram = field(default_factory=lambda: Histogram.empty(SIZE_BUCKETS))

    def report(self, ended: bool = False) -> AssociationReport:
        """The cumulative figures, for the supervisor (and the status page)."""
        elapsed = max(time.monotonic() - self.started, 1e-6)
        state = AssociationState(
            connection_id=self.connection_id, worker=self.worker, calling_ae_title=self.calling_ae_title,
            called_ae_title=self.called_ae_title, peer_address=self.peer_address, started=self.started_epoch,
            instances=self.instances, failures=self.failures, duplicates=self.duplicates, bytes=self.bytes,
            rate=self.instances / elapsed, ended=time.time() if ended else 0.0,
            outcome=self.outcome if self.accepted or not ended else f"rejected ({self.outcome})",
        )
        return AssociationReport(
            state=state, by_modality=dict(self.by_modality), store_latency_seconds=self.latency,
            object_size_bytes=self.sizes, ended=ended, probe=self.probe,
        )

    def log_line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        who = f"{self.calling_ae_title or '?'} ({self.peer_address}) -> {self.called_ae_title or '?'}"
        if not self.accepted:
            return f"association {who}: rejected ({self.outcome}) after {elapsed:.3f} s"
        mb = self.bytes / 1e6
        # A-ASSOCIATE-AC with every context refused: nothing can be exchanged.
        accepted = "accepted" if self.contexts else "accepted with every presentation context refused"
        return (
            f"association {who}: {accepted}, {self.outcome}; {self.instances} instances"
            f" ({self.failures} failed, {self.duplicates} duplicates), {mb:.2f} MB in {elapsed:.3f} s"
            f" ({self.instances / elapsed:.1f} img/s, {mb / elapsed:.2f} MB/s)"
        )
