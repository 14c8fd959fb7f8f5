"""The forwarding figures for the status page and /metrics, read from the queue file."""

from __future__ import annotations

import logging
import os
import sqlite3

from fastscp.forward.queue import Queue, QueueError
from fastscp.status import DestinationState

log = logging.getLogger("fastscp.forward")

#: Seconds between reads of the queue (a few small aggregate queries).
POLL_INTERVAL = 2.0


class ForwardStatus:
    """The supervisor's view of the forwarding queue, read at most every :data:`POLL_INTERVAL`."""

    def __init__(self, queue_path: str) -> None:
        self.queue_path = queue_path
        self._next = 0.0
        self._states: list[DestinationState] = []

    def poll(self, now: float, names: list[str]) -> list[DestinationState]:
        """``now``: a monotonic clock reading."""
        if now < self._next:
            return self._states
        self._next = now + POLL_INTERVAL
        if not os.path.exists(self.queue_path):
            return [DestinationState(name=name) for name in names]
        try:
            # A short wait: the supervisor's loop must not stall on the queue.
            queue = Queue(self.queue_path, create=False, timeout=0.2)
            try:
                self._states = queue.states(names)
            finally:
                queue.close()
        except (QueueError, sqlite3.Error) as exc:  # busy or being made: the last figures stay
            log.debug("forwarding queue not readable now: %s", exc)
        return self._states
