"""Sending queued instances to one destination with C-STORE (pynetdicom as the SCU).

Each file goes as it is stored: its own transfer syntax, its data set bytes
as on disk (pynetdicom's chunked send, never re-encoded). Only when the
destination refuses that transfer syntax is a file in an uncompressed one
read and converted to one the destination's ``transfer_syntaxes`` offer.
Several instances travel on one association (``forwarding.batch_size``).

What a destination answers decides what happens to each instance:

- success or a warning (0xB000...): sent;
- a permanent refusal (its SOP class or transfer syntax not accepted, a
  status of 0xA9xx "Data set does not match SOP class", 0xCxxx "Cannot
  understand", 0x0122 "SOP class not supported" or any other failure not
  listed below): failed, with the status and why, never retried on its own;
- a transient failure (0xA7xx "Out of resources", 0x0110 "Processing
  failure", 0x0213 "Resource limitation", no response): retried with
  exponential backoff;
- no association (connection refused, rejected, aborted): the destination
  waits out its own exponential backoff, the instances stay queued.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import ssl
import threading
import time

import pydicom
from pydicom.uid import UID
from pynetdicom import Association

from fastscp.config import DestinationConfig, ForwardingConfig
from fastscp.forward.queue import Item, Queue
from fastscp.net.dimse import is_warning, status_name

# The SCU of `fastscp send`: its requestor AE (keeps why a connect failed), its reasons for a refused context.
from fastscp.net.scu import _CONTEXT_REFUSED, MAX_CONTEXTS, _new_ae, _why, associate, tls_context

log = logging.getLogger("fastscp.forward")

#: Failure statuses worth another try later (PS3.4 B.2.3, C.4.2.1.5, PS3.7 C).
TRANSIENT_STATUSES = frozenset({0x0110, 0x0213})
#: Transfer syntaxes whose data set pynetdicom can re-encode (no pixel data is decoded).
CONVERTIBLE_SOURCES = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"})


def transient(status: int) -> bool:
    return status in TRANSIENT_STATUSES or status >> 8 == 0xA7


def backoff(failures: int, initial: float, most: float) -> float:
    """Seconds to wait after ``failures`` failures in a row (1, 2, 4... times ``initial``, at most ``most``)."""
    return min(most, initial * 2 ** min(max(failures - 1, 0), 30))


class Destination:
    """The sending side of one destination: ``max_associations`` threads share its queue and its backoff."""

    def __init__(self, name: str, config: DestinationConfig, forwarding: ForwardingConfig, queue_path: str,
                 root: str, ae_title: str, stopping: threading.Event) -> None:
        self.name = name
        self.config = config
        self.forwarding = forwarding
        self.queue_path = queue_path
        self.root = root
        self.ae_title = ae_title
        self.stopping = stopping
        self._lock = threading.Lock()
        #: Associations that failed in a row, and when the next may be tried.
        self.failures = 0
        self.retry_at = 0.0
        self.wake = threading.Event()
        self.threads: list[threading.Thread] = []
        self._associations: set[Association] = set()
        #: Set when the destination was removed or changed (SIGHUP): its threads finish their batch and end.
        self.retired = threading.Event()
        self._tls: ssl.SSLContext | None = None
        if config.tls.enabled:
            tls = config.tls
            self._tls = tls_context(ca_bundle=tls.ca_bundle, certificate=tls.certificate,
                                    private_key=tls.private_key, min_version=tls.min_version)

    def start(self) -> None:
        for n in range(self.config.max_associations):
            thread = threading.Thread(target=self._run, name=f"forward-{self.name}-{n}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def retire(self) -> None:
        self.retired.set()
        self.wake.set()

    def abort(self) -> None:
        """Stopping now: abort the open associations (their instances stay in flight, then queued again)."""
        with self._lock:
            associations = list(self._associations)
        for assoc in associations:
            assoc.abort()

    def clear_backoff(self) -> None:
        with self._lock:
            self.failures, self.retry_at = 0, 0.0
        self.wake.set()

    def _done(self) -> bool:
        return self.stopping.is_set() or self.retired.is_set()

    def _run(self) -> None:
        queue = Queue(self.queue_path)
        try:
            while not self._done():
                with self._lock:
                    wait = self.retry_at - time.time()
                if wait > 0:
                    self.wake.wait(min(wait, 1.0))
                    self.wake.clear()
                    continue
                try:
                    items = queue.claim(self.name, self.forwarding.batch_size)
                except sqlite3.Error as exc:  # locked for longer than its timeout (a long purge): later
                    log.warning("forwarding to %s: the queue is busy (%s); trying again", self.name, exc)
                    self.wake.wait(1.0)
                    continue
                if not items:
                    due = queue.next_due(self.name)
                    self.wake.wait(1.0 if due is None else min(1.0, max(0.05, due - time.time())))
                    self.wake.clear()
                    continue
                try:
                    self._send(queue, items)
                except Exception as exc:  # never leave them in flight while we live
                    log.exception("forwarding to %s: unexpected error", self.name)
                    queue.release(items, f"internal error: {exc}")
                    self._association_failed(f"internal error: {exc}")
        finally:
            queue.close()

    def _association_failed(self, error: str) -> None:
        with self._lock:
            self.failures += 1
            delay = backoff(self.failures, self.forwarding.retry_initial, self.forwarding.retry_max)
            self.retry_at = time.time() + delay
            failures = self.failures
        if failures in (1, 2, 5) or failures % 20 == 0:
            log.warning("forwarding to %s (%s@%s:%d): %s; retrying in %.1f s (%d failures in a row)", self.name,
                        self.config.ae_title, self.config.host, self.config.port, error, delay, failures)

    def _send(self, queue: Queue, items: list[Item]) -> None:
        config = self.config
        fallbacks = config.fallback_syntaxes
        ae = _new_ae(self.ae_title, config.timeout)
        contexts: dict[tuple[str, tuple[str, ...]], None] = {}
        for item in items:
            contexts[(item.sop_class_uid, (item.transfer_syntax_uid,))] = None
            others = tuple(ts for ts in fallbacks if ts != item.transfer_syntax_uid)
            if others and item.transfer_syntax_uid in CONVERTIBLE_SOURCES:
                contexts[(item.sop_class_uid, others)] = None
        taken = list(contexts)[:MAX_CONTEXTS]
        for sop_class, syntaxes in taken:
            ae.add_requested_context(sop_class, list(syntaxes))
        offered = {(sop, ts[0]) for sop, ts in taken if len(ts) == 1}
        later = [i for i in items if (i.sop_class_uid, i.transfer_syntax_uid) not in offered]
        items = [i for i in items if (i.sop_class_uid, i.transfer_syntax_uid) in offered]
        if later:
            queue.release(later)  # more contexts than one association takes: the next one
        assoc = associate(ae, config.host, config.port, ae_title=config.ae_title,
                          tls_args=(self._tls, config.host) if self._tls is not None else None, max_pdu=0)
        if not assoc.is_established:
            if assoc.rejected_contexts and not assoc.accepted_contexts and not assoc.is_rejected:
                # It took none of them (pynetdicom then aborts): each instance is refused for good.
                self._refused(queue, items, assoc)
                return
            error = f"no association with {config.ae_title} at {config.host}:{config.port} ({_why(assoc)})"
            queue.release(items, error)
            self._association_failed(error)
            return
        with self._lock:
            self._associations.add(assoc)
        try:
            rest = self._store_all(queue, assoc, items)
        finally:
            with self._lock:
                self._associations.discard(assoc)
            if assoc.is_established:
                assoc.release()
        if rest:
            error = "association lost (aborted by the destination, or no response within its timeout)"
            queue.release(rest, error)
            self._association_failed(error)

    def _refused(self, queue: Queue, items: list[Item], assoc: Association) -> None:
        results = {(c.abstract_syntax, c.transfer_syntax[0]): c.result for c in assoc.rejected_contexts}
        for item in items:
            result = results.get((item.sop_class_uid, item.transfer_syntax_uid), 3)
            why = _CONTEXT_REFUSED.get(result, _CONTEXT_REFUSED[3]).replace("receiver", "destination")
            if result == 4:
                why += f" ({UID(item.transfer_syntax_uid).name}), and none it takes fits"
            queue.failed(item, None, why)

    def _store_all(self, queue: Queue, assoc: Association, items: list[Item]) -> list[Item]:
        """Send each item; returns those not tried because the association was lost."""
        accepted = {(c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.accepted_contexts}
        accepted_classes = {c.abstract_syntax for c in assoc.accepted_contexts}
        for n, item in enumerate(items):
            if not assoc.is_established or self.stopping.is_set():
                return items[n:]
            path = os.path.join(self.root, item.path)
            if not os.path.exists(path):
                queue.failed(item, None, "the stored file is gone")
                continue
            exact = (item.sop_class_uid, item.transfer_syntax_uid) in accepted
            if not exact and item.sop_class_uid not in accepted_classes:
                queue.failed(item, None, _CONTEXT_REFUSED[3].replace("receiver", "destination"))
                continue
            try:
                if exact:
                    status = assoc.send_c_store(path)  # the bytes as stored (STORE_SEND_CHUNKED_DATASET)
                else:
                    dataset = pydicom.dcmread(path) if item.transfer_syntax_uid in CONVERTIBLE_SOURCES else None
                    if dataset is None:
                        raise ValueError("not convertible")
                    status = assoc.send_c_store(dataset)  # pynetdicom converts to the accepted syntax
            except ValueError:
                queue.failed(item, None, f"refused: transfer syntax not accepted by the destination "
                                         f"({UID(item.transfer_syntax_uid).name}), and none it takes fits")
                continue
            except OSError as exc:
                queue.later(item, None, f"cannot read the stored file: {exc.strerror or exc}",
                            time.time() + self._item_backoff(item))
                continue
            code = int(status.Status) if "Status" in status else None
            if code is None:
                # It may have been stored: it goes again (at least once), counted as resent, after its
                # backoff, so an instance the destination chokes on can't make it abort over and over.
                queue.later(item, None, "no response (association lost, or the DIMSE timeout)",
                            time.time() + self._item_backoff(item), resent=True)
                if not assoc.is_established:
                    return items[n + 1:]  # the rest goes back as it was
                continue
            with self._lock:  # the destination answers: its backoff starts again from retry_initial
                self.failures = 0
            # Peer-supplied text: repr() shows control characters escaped; the queue keeps 200 characters of it.
            comment = (f": {str(status.ErrorComment)[:200]!r}" if "ErrorComment" in status and status.ErrorComment
                       else "")
            what = f"0x{code:04X} {status_name(code)}{comment}"
            if code == 0 or is_warning(code):
                queue.sent(item, code)
            elif transient(code):
                queue.later(item, code, what, time.time() + self._item_backoff(item))
            else:
                log.warning("forwarding %s to %s: refused for good: %s", item.path, self.name, what)
                queue.failed(item, code, what)
        return []

    def _item_backoff(self, item: Item) -> float:
        return backoff(item.attempts + 1, self.forwarding.retry_initial, self.forwarding.retry_max)
