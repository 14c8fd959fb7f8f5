"""The one batch-and-flush sender (fastscp.process.batcher.Batcher), with its real thread and clock.

Its two users have their own tests: test_log_forwarding.py (ForwardHandler)
and test_index_server.py / test_index.py (IndexerClient).
"""

from __future__ import annotations

import threading
import time

from fastscp.process.batcher import Batcher
from tests.conftest import wait_until


class Receiver:
    """A deliver callback that records each call; ``accept`` says what it returns."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, list[int]]] = []
        self.accept = True

    def __call__(self, items: list[int]) -> bool:
        self.calls.append((time.monotonic(), list(items)))
        return self.accept

    @property
    def batches(self) -> list[list[int]]:
        return [items for _at, items in self.calls]


def test_items_wait_for_the_interval_and_travel_together() -> None:
    receiver = Receiver()
    batcher = Batcher(receiver, interval=0.3, max_items=100, name="test-batcher")
    started = time.monotonic()
    for n in range(5):
        batcher.add(n)
    assert receiver.calls == []  # nothing yet: they wait for company
    wait_until(lambda: receiver.calls, timeout=10, what="the timed delivery")
    assert receiver.batches == [[0, 1, 2, 3, 4]]
    assert receiver.calls[0][0] - started >= 0.25
    batcher.close()


def test_the_first_item_after_a_full_batch_waits_its_own_interval() -> None:
    """The thread still waits out the full batch's interval when the next batch's first item wakes it:
    that item must not go alone at once (it did: a batch of 1, then one of max_items - 1, each time)."""
    receiver = Receiver()
    batcher = Batcher(receiver, interval=1.0, max_items=3, name="test-batcher")
    batcher.add(0)  # the thread starts and waits for the interval
    wait_until(lambda: batcher._wake._waiters, timeout=10, what="the thread waiting")  # type: ignore[attr-defined]
    batcher.add(1)
    batcher.add(2)  # full: goes now, while the thread still waits
    assert receiver.batches == [[0, 1, 2]]
    started = time.monotonic()
    batcher.add(3)
    time.sleep(0.3)
    assert receiver.batches == [[0, 1, 2]], "the next batch's first item went alone"
    batcher.add(4)
    wait_until(lambda: len(receiver.calls) == 2, timeout=10, what="the timed delivery")
    assert receiver.batches == [[0, 1, 2], [3, 4]]
    assert receiver.calls[1][0] - started >= 0.9  # its own interval, from its first item
    batcher.close()


def test_an_urgent_item_the_owner_keeps_is_retried_though_no_other_came() -> None:
    """The first item, urgent, and the peer down: the thread starts for the retry (it started only for
    a batch that waits, so a worker's first association report stayed kept until an image came)."""
    receiver = Receiver()
    receiver.accept = False
    batcher = Batcher(receiver, interval=60, max_items=100, retry_interval=0.1)
    batcher.add(1, urgent=True)
    receiver.accept = True
    wait_until(lambda: len(receiver.calls) >= 2, timeout=10, what="the retry")
    assert receiver.batches[:2] == [[1], []]
    batcher.close()


def test_an_item_after_a_retry_that_someone_else_settled_waits_its_interval_not_the_retrys() -> None:
    """The thread waits for a retry (1 s); a flush of the owner's delivers what was kept meanwhile; the
    next item is due in its own interval (0.05 s), before the retry the thread was waiting for."""
    receiver = Receiver()
    receiver.accept = False
    batcher = Batcher(receiver, interval=0.05, max_items=100, retry_interval=1.0)
    batcher.add(1, urgent=True)  # kept: the thread waits 1 s for the retry
    wait_until(lambda: batcher._waiting_until < float("inf"), timeout=10, what="the retry's wait")  # type: ignore[attr-defined]
    receiver.accept = True
    batcher.flush()  # the peer is back: the owner retried itself
    started = time.monotonic()
    batcher.add(2)
    wait_until(lambda: [2] in receiver.batches, timeout=10, what="the item's delivery")
    assert receiver.calls[-1][0] - started < 0.7, "it waited for the retry that was no longer due"
    batcher.close()


def test_a_full_batch_an_expensive_one_or_an_urgent_item_goes_at_once() -> None:
    receiver = Receiver()
    batcher = Batcher(receiver, interval=60, max_items=3, max_cost=100)
    for n in range(4):
        batcher.add(n)
    assert receiver.batches == [[0, 1, 2]]  # by count; 3 waits
    batcher.add(4, cost=99)
    assert receiver.batches == [[0, 1, 2]]
    batcher.add(5, cost=1)  # the cost bound reached
    assert receiver.batches == [[0, 1, 2], [3, 4, 5]]
    batcher.add(6)
    batcher.add(7, urgent=True)  # and what waited goes with it
    assert receiver.batches == [[0, 1, 2], [3, 4, 5], [6, 7]]
    batcher.add(8)
    batcher.flush()
    batcher.flush()  # nothing waits: no empty delivery
    assert receiver.batches[-1] == [8] and len(receiver.calls) == 4
    batcher.close()


def test_what_the_owner_keeps_is_retried_until_delivered() -> None:
    receiver = Receiver()
    receiver.accept = False  # the peer is down
    batcher = Batcher(receiver, interval=0.05, max_items=100, retry_interval=0.2)
    batcher.add(1)
    wait_until(lambda: len(receiver.calls) >= 3, timeout=10, what="the retries")
    assert receiver.batches[:3] == [[1], [], []]  # retries carry only what arrived since
    gaps = [b - a for (a, _), (b, _) in zip(receiver.calls, receiver.calls[1:], strict=False)][:2]
    assert all(gap >= 0.15 for gap in gaps), gaps  # every retry_interval, not every interval
    receiver.accept = True  # the peer is back
    batcher.add(2)
    wait_until(lambda: [2] in receiver.batches, timeout=10, what="the delivery after the peer is back")
    count = len(receiver.calls)
    time.sleep(0.5)
    assert len(receiver.calls) == count  # delivered: the thread idles
    batcher.close()


def test_close_stops_the_thread_and_what_comes_after_goes_at_once() -> None:
    """Association threads may outlive a worker's stop: their records still reach deliver (the owner
    sends, keeps or counts them); none waits in a closed batcher."""
    receiver = Receiver()
    batcher = Batcher(receiver, interval=0.05, max_items=100, name="test-batcher-close")
    batcher.add(1)
    wait_until(lambda: receiver.calls, timeout=10, what="the first delivery")
    batcher.close()
    wait_until(lambda: not any(t.name == "test-batcher-close" for t in threading.enumerate()), timeout=10,
               what="the thread to end")
    batcher.add(2)  # no thread: it goes at once
    assert receiver.batches == [[1], [2]]
    batcher.flush()  # nothing waits: no empty delivery
    assert receiver.batches == [[1], [2]]
