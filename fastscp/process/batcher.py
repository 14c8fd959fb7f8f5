"""Batch and flush: items gathered under one lock and handed on together, by size, urgency or time.

One owner of the pattern that sends many small things between processes:
log records forwarded to the supervisor (:class:`fastscp.process.logs.ForwardHandler`)
and records sent to the indexer, the post-store stage and the forwarder
(:class:`fastscp.process.sender.Sender`).
One message per item made the receiver's wake-ups the bottleneck in both
(see their PERF notes); a batch waits at most ``interval`` for company.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["MAX_MESSAGE_BYTES", "Batcher", "fitting"]

T = TypeVar("T")

#: Bytes per message at most: a Unix datagram longer than the socket's send
#: buffer (net.core.wmem_default, 208 KiB on Linux) is refused (EMSGSIZE),
#: and the attribute maps of 32 instances of 32 series can be longer.
MAX_MESSAGE_BYTES = 128 * 1024


def fitting(items: list[T], encode: Callable[[list[T]], bytes],
            max_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[bytes, list[T]]]:
    """``items`` as messages of ``max_bytes`` at most: (message, its items), in order. A batch too
    long is halved until each part fits; a single item still too long is returned as it is (its
    sender decides)."""
    data = encode(items)
    if len(data) <= max_bytes or len(items) <= 1:
        return [(data, items)]
    half = len(items) // 2
    return fitting(items[:half], encode, max_bytes) + fitting(items[half:], encode, max_bytes)


class Batcher(Generic[T]):
    """Gathers items and hands them to ``deliver`` as one list.

    A batch goes at once when it holds ``max_items`` items, or items of
    ``max_cost`` (the sum of what :meth:`add` was told; 0: no bound), or an
    urgent item; otherwise a background thread (started with the first item)
    delivers it ``interval`` seconds after its first item arrived.

    ``deliver(items)`` runs with :attr:`lock` held, so deliveries never
    interleave; it returns True when all is delivered, False when its owner
    keeps something for later (the peer is down): then the thread calls it
    again every ``retry_interval`` seconds, with the items gathered since
    (perhaps none), until it returns True. Thread-safe.
    """

    def __init__(self, deliver: Callable[[list[T]], bool], *, interval: float, max_items: int,
                 max_cost: int = 0, retry_interval: float | None = None, name: str = "fastscp-batcher") -> None:
        self._deliver = deliver
        self.interval = interval
        self.max_items = max_items
        self.max_cost = max_cost
        self.retry_interval = interval if retry_interval is None else retry_interval
        self.name = name
        #: Held while items are added and while ``deliver`` runs; an owner may
        #: hold it to read its own state consistently (:meth:`flush_locked`).
        self.lock = threading.Lock()
        self._wake = threading.Condition(self.lock)
        self._items: list[T] = []
        self._cost = 0
        #: When the batch's first item arrived, and when the last delivery was tried (time.monotonic).
        self._since = self._tried = 0.0
        #: What the thread's wait ends at (time.monotonic; inf: it waits for something to be due).
        self._waiting_until = math.inf
        #: The last delivery left something for a retry.
        self._behind = False
        self._thread: threading.Thread | None = None
        self._closed = False

    def add(self, item: T, cost: int = 0, urgent: bool = False) -> None:
        """Gather ``item``; deliver now if the batch is full or ``urgent``, or once closed."""
        with self.lock:
            items = self._items
            items.append(item)
            if len(items) == 1:
                self._since = time.monotonic()
            self._cost += cost
            if (urgent or self._closed or len(items) >= self.max_items
                    or (self.max_cost and self._cost >= self.max_cost)):
                self.flush_locked()
            else:
                self._due_changed()

    def flush(self) -> None:
        """Deliver what waits (and retry what the owner kept), now."""
        with self.lock:
            self.flush_locked()

    def flush_locked(self) -> None:
        """:meth:`flush` for a caller that holds :attr:`lock`."""
        if self._items or self._behind:
            items, self._items, self._cost = self._items, [], 0
            self._behind = not self._deliver(items)
            self._tried = time.monotonic()
            self._due_changed()

    def _due(self) -> float | None:
        """When the thread delivers next: a retry its interval after the last try, a batch its
        interval after its first item; None: nothing waits."""
        if self._behind:
            return self._tried + self.retry_interval
        return self._since + self.interval if self._items else None

    def _due_changed(self) -> None:
        """Wake the thread if something is due before its wait ends (not at each item: a wake-up is
        a system call, and the GIL handed over); start it at the first need."""
        due = self._due()
        if due is None or self._closed:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        elif due < self._waiting_until:
            self._wake.notify()

    @property
    def waiting(self) -> int:
        """Items gathered and not yet handed to ``deliver`` (read it holding :attr:`lock`)."""
        return len(self._items)

    def _run(self) -> None:
        with self.lock:
            while not self._closed:
                # The wait is to the time something is due, not for an interval from a wake-up: the
                # first item of a batch that follows a full one went alone at once (a batch of one each time).
                due = self._due()
                left = math.inf if due is None else due - time.monotonic()
                if left > 0:
                    self._waiting_until = due if due is not None else math.inf
                    self._wake.wait(None if due is None else left)
                    self._waiting_until = math.inf
                    continue
                self.flush_locked()

    def close(self) -> None:
        """Stop the thread (what waits stays; :meth:`flush` still delivers it, and an item added
        from now on is delivered at once)."""
        with self.lock:
            self._closed = True
            self._wake.notify_all()
