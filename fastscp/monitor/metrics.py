"""Prometheus metrics: a status snapshot rendered as text exposition format 0.0.4.

Pure data in, text out: the monitor calls :func:`render` for each scrape of
``/metrics``. The supervisor's snapshot already holds running totals, so
every counter here is the server's own count since it started (a restart
resets them, which Prometheus' ``rate()`` handles). Rates are left to
Prometheus: the snapshot's 1 min/5 min rates are for the status page.

Format reference: https://prometheus.io/docs/instrumenting/exposition_formats/
"""

from __future__ import annotations

import math
import time

from fastscp.status import Histogram, StatusSnapshot

#: The ``Content-Type`` of the text exposition format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def format_value(value: float) -> str:
    """A sample value or ``le`` bound as the format spells it.

    Whole numbers are written without a fraction (``1000000``, not
    ``1e+06``) so bucket bounds read as written in :mod:`fastscp.status`;
    infinities are ``+Inf``/``-Inf``.
    """
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def escape_label_value(value: str) -> str:
    r"""Escape a label value: backslash, double quote and line feed (``\\``, ``\"``, ``\n``)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    # HELP text escapes only backslash and line feed (no quotes around it).
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class _Exposition:
    """Accumulates metric families; each family is HELP, TYPE, then its samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        if labels:
            inner = ",".join(f'{key}="{escape_label_value(val)}"' for key, val in labels.items())
            self.lines.append(f"{name}{{{inner}}} {format_value(value)}")
        else:
            self.lines.append(f"{name} {format_value(value)}")

    def single(self, name: str, kind: str, help_text: str, value: float) -> None:
        self.family(name, kind, help_text)
        self.sample(name, value)

    def labelled(self, name: str, kind: str, help_text: str, label: str, values: dict[str, int]) -> None:
        self.family(name, kind, help_text)
        # Sorted so successive scrapes list series in the same order (diffable).
        for key in sorted(values):
            self.sample(name, values[key], {label: key})

    def histogram(self, name: str, help_text: str, histogram: Histogram) -> None:
        """``counts[i]`` is per bucket in the snapshot; the format wants running totals."""
        self.family(name, "histogram", help_text)
        cumulative = 0
        for bound, count in zip(histogram.buckets, histogram.counts, strict=False):
            cumulative += count
            self.sample(f"{name}_bucket", cumulative, {"le": format_value(bound)})
        # +Inf and _count from the bucket counts themselves, so they agree even
        # if a snapshot's ``count`` were ever out of step with its buckets.
        total = sum(histogram.counts)
        self.sample(f"{name}_bucket", total, {"le": "+Inf"})
        self.sample(f"{name}_sum", histogram.sum)
        self.sample(f"{name}_count", total)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


#: Forwarding, per destination (fastscp.status.DestinationState): (name, type, help, field).
_FORWARD_FAMILIES: tuple[tuple[str, str, str, str], ...] = (
    ("fastscp_forward_queued", "gauge", "Instances waiting to be forwarded, by destination.", "queued"),
    ("fastscp_forward_in_flight", "gauge", "Instances being sent now, by destination.", "in_flight"),
    ("fastscp_forward_sent_total", "counter", "Instances forwarded and acknowledged, by destination.", "sent"),
    ("fastscp_forward_failed", "gauge",
     "Instances refused for good and kept (fastscp forward retry|purge), by destination.", "failed"),
    ("fastscp_forward_resent_total", "counter",
     "Instances sent again after an interruption (the destination may hold them twice), by destination.",
     "resent"),
    ("fastscp_forward_oldest_queued_seconds", "gauge",
     "Age of the oldest instance waiting to be forwarded, by destination (0: none).", "oldest_queued_seconds"),
)
#: Per post-receive hook (config ``hooks``): HookState field, metric type, help.
_HOOK_FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("runs", "counter", "Post-receive hook attempts started, retries included."),
    ("succeeded", "counter", "Post-receive hook attempts that succeeded."),
    ("failed", "counter", "Events a post-receive hook gave up on (its last attempt failed)."),
    ("retried", "counter", "Post-receive hook attempts that failed and were tried again."),
    ("timed_out", "counter", "Post-receive hook programs killed at their timeout."),
    ("dropped", "counter", "Events dropped because a post-receive hook's queue was full."),
    ("running", "gauge", "Post-receive hook programs running now."),
    ("queued", "gauge", "Events waiting for a post-receive hook (retries included)."),
)

#: The post-store process's backlog (PostStoreState): name, type, help, field.
_POSTSTORE_FAMILIES: tuple[tuple[str, str, str, str], ...] = (
    ("fastscp_poststore_waiting", "gauge",
     "Stored instances waiting for the post-store process (thumbnails, scan sheets, hooks).", "waiting"),
    ("fastscp_poststore_oldest_seconds", "gauge",
     "Seconds the oldest instance waiting for the post-store process has waited.", "oldest_seconds"),
    ("fastscp_poststore_studies_waiting", "gauge",
     "Studies waiting for their scan sheet (quiet for scansheet.study_timeout).", "studies"),
    ("fastscp_thumbnails_made_total", "counter", "Thumbnails made since the post-store process started.",
     "thumbnails"),
    ("fastscp_poststore_kept_files", "gauge",
     "Files of records kept for the post-store process beyond the workers' backlogs (up to 16 MB each).",
     "kept_files"),
)

def render(snapshot: StatusSnapshot, now: float | None = None) -> str:
    """The snapshot as Prometheus text exposition format 0.0.4.

    Parameters
    ----------
    snapshot : StatusSnapshot
        The latest snapshot from the supervisor.
    now : float, optional
        Epoch seconds for ``fastscp_status_age_seconds``; default: the clock.

    Returns
    -------
    str
        Every metric family with HELP and TYPE lines, ending in a newline.
    """
    out = _Exposition()
    totals = snapshot.totals
    out.single("fastscp_instances_stored_total", "counter",
               "Instances received and answered with Success (duplicates included).", totals.instances)
    out.single("fastscp_bytes_received_total", "counter",
               "Bytes of data set fragments received (P-DATA-TF).", totals.bytes)
    out.single("fastscp_store_failures_total", "counter",
               "C-STORE requests answered with a failure status (0xA700, 0xA900, 0xC000, ...).", totals.failures)
    out.single("fastscp_duplicates_total", "counter",
               "Instances whose SOP Instance UID was already stored (acknowledged, not stored again).",
               totals.duplicates)
    out.single("fastscp_associations_total", "counter",
               "Associations accepted and ended (released or aborted).", totals.associations)
    out.labelled("fastscp_associations_rejected_total", "counter",
                 "Associations rejected (A-ASSOCIATE-RJ), by reason.", "reason", snapshot.rejects)
    out.labelled("fastscp_instances_by_modality_total", "counter",
                 "Instances stored, by Modality (0008,0060).", "modality", snapshot.per_modality)
    out.labelled("fastscp_instances_by_calling_ae_total", "counter",
                 "Instances stored, by calling AE title.", "calling_ae", snapshot.per_calling_ae)

    out.single("fastscp_open_associations", "gauge", "Associations open now.", len(snapshot.open))
    out.single("fastscp_pending_connections", "gauge",
               "Connections waiting for their A-ASSOCIATE-RQ (no association slot yet).",
               snapshot.pending_connections)
    out.labelled("fastscp_connections_dropped_total", "counter",
                 "Connections closed before association, by the setting that closed them.", "reason",
                 snapshot.dropped_connections)
    storage = snapshot.storage
    out.single("fastscp_storage_total_bytes", "gauge",
               "Size of the filesystem holding storage.directory.", storage.total_bytes)
    out.single("fastscp_storage_used_bytes", "gauge",
               "Bytes used on the filesystem holding storage.directory.", storage.used_bytes)
    out.single("fastscp_storage_free_bytes", "gauge",
               "Bytes free on the filesystem holding storage.directory.", storage.free_bytes)
    out.single("fastscp_storage_min_free_bytes", "gauge",
               "The free-space watermark (storage.min_free_bytes).", storage.min_free_bytes)
    out.single("fastscp_storage_below_watermark", "gauge",
               "1 while free space is below storage.min_free_bytes: stores get 0xA700 Out of resources.",
               storage.below_watermark)
    out.single("fastscp_index_lag", "gauge",
               "Instances stored but not yet committed to the index.", snapshot.index.lag)
    out.single("fastscp_index_committed_total", "counter",
               "Instances committed to the index.", snapshot.index.committed)
    out.single("fastscp_index_kept_files", "gauge",
               "Files of records kept for the indexer beyond the workers' backlogs (up to 32 MB each).",
               snapshot.index.kept_files)
    if snapshot.poststore is not None:
        for name, kind, help_text, field in _POSTSTORE_FAMILIES:
            out.single(name, kind, help_text, getattr(snapshot.poststore, field))
    out.single("fastscp_workers", "gauge", "Worker processes.", len(snapshot.workers))
    out.single("fastscp_workers_alive", "gauge", "Worker processes running.",
               sum(1 for w in snapshot.workers if w.alive))
    out.single("fastscp_worker_restarts_total", "counter", "Worker processes restarted after dying.",
               sum(w.restarts for w in snapshot.workers))
    out.family("fastscp_worker_open_associations", "gauge", "Associations open now, by worker.")
    for worker in sorted(snapshot.workers, key=lambda w: w.index):
        out.sample("fastscp_worker_open_associations", worker.open_associations, {"worker": str(worker.index)})
    out.single("fastscp_uptime_seconds", "gauge", "Seconds since the server started.",
               max(0.0, snapshot.time - snapshot.started))
    out.single("fastscp_stopping", "gauge", "1 while the server is stopping (no new associations).",
               snapshot.state != "running")
    # How old the published figures are: a scrape can't tell otherwise that
    # the supervisor stopped sending while the monitor kept answering.
    out.single("fastscp_status_age_seconds", "gauge", "Seconds since the supervisor published these figures.",
               max(0.0, (time.time() if now is None else now) - snapshot.time))
    out.family("fastscp_info", "gauge", "Version and AE title of this server (always 1).")
    out.sample("fastscp_info", 1, {"version": snapshot.version, "ae_title": snapshot.ae_title})

    for name, kind, help_text, field in _FORWARD_FAMILIES:
        out.family(name, kind, help_text)
        for destination in snapshot.forwarding:
            out.sample(name, getattr(destination, field), {"destination": destination.name})
    for field, kind, help_text in _HOOK_FAMILIES:
        out.family(f"fastscp_hook_{field}" + ("_total" if kind == "counter" else ""), kind, help_text)
        for hook in snapshot.hooks:
            out.sample(f"fastscp_hook_{field}" + ("_total" if kind == "counter" else ""), getattr(hook, field),
                       {"hook": hook.name, "event": hook.event})

    out.histogram("fastscp_store_latency_seconds",
                  "Seconds from a C-STORE request to its response (receiving, writing, fsync).",
                  snapshot.store_latency_seconds)
    out.histogram("fastscp_object_size_bytes",
                  "Size of stored instances in bytes (File Meta Information and data set).",
                  snapshot.object_size_bytes)
    return out.text()
