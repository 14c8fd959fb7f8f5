"""Which SOP Instance UIDs the index may hold, readable by every worker without asking the indexer.

Every C-STORE asks the indexer "where is this instance stored?" before its
response (the duplicate check of :mod:`fastscp.storage.area`, through
:class:`fastscp.query.client.Locator`). Nearly always the answer is
"nowhere": a new instance. :class:`UidFilter` lets a worker know that
without the round trip: a Bloom filter of the UIDs the indexer holds, in
memory shared by the supervisor's children.

- The supervisor makes it (an anonymous shared mapping) before it forks the
  indexer and the workers; they inherit the same pages. A restarted indexer
  is forked from the supervisor too, so the bits outlive it.
- The indexer sets a UID's bits wherever :class:`~fastscp.index.indexer.UidIndex`
  learns of it (committed rows at start, each record received, rows the
  reconcile adds), under that index's lock: one writer at a time.
- A worker asks the indexer only if every bit of a UID is set (the UID is
  indexed, on its way, or a false positive), or while the first indexer has
  not read the committed rows yet. Bits are never cleared: a deleted
  instance costs a question, never a missed duplicate.
- A record reaches the indexer after its C-STORE-RSP, so two copies of one
  instance arriving at the same moment may both be stored as new: the same
  window the question to the indexer had.

Bit positions come from Python's ``hash`` of the UID, which a forked child
shares with its parent (PYTHONHASHSEED is read once, at the interpreter's
start). The supervisor writes the hash of a probe string into the header; a
process whose hash differs (not forked from it) never trusts the filter.

PERF: the question costs a send and a receive per C-STORE in the worker and
in the indexer, and its wait for the indexer's answer was half of an
association thread's wall time under 4 storescu associations of 512x512 CT
(py-spy, 2 cores): ``Locator._ask`` 52% of the samples.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterable

import numpy as np

#: Bits of the filter: 16 MiB, shared. Two bits per UID: 1 in 4,500 new UIDs
#: asks the indexer at a million indexed instances, 1 in 50 at ten million.
BITS = 1 << 27
_MASK = BITS - 1
#: Header: the probe's hash (8 bytes), then 1 once the first indexer has read the committed rows.
_HEADER = 16
_PROBE = "fastscp uid filter: the hash of this string is the same in every process forked from the supervisor"
_READY_AT = 8
#: Bytes of the shared mapping: the header, then the bits.
SIZE = _HEADER + BITS // 8


def _positions(h: int) -> tuple[int, int]:
    # Bits 0-26 and 32-58 of the hash: two independent positions.
    return h & _MASK, (h >> 32) & _MASK


class UidFilter:
    """A Bloom filter of SOP Instance UIDs in memory shared across fork (see the module docstring)."""

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, SIZE)  # anonymous, MAP_SHARED: inherited by fork
        struct.pack_into("<q", self._map, 0, hash(_PROBE))
        self._array = np.frombuffer(self._map, dtype=np.uint8, offset=_HEADER)  # for whole columns
        self._bits = memoryview(self._map)[_HEADER:]  # for one UID: plain ints, no numpy scalars
        #: :attr:`ready` and :attr:`usable` were both true here, so they stay true: the bits are never
        #: cleared, and a forked child computes its parent's hashes (PERF: not read at each store).
        self._trusted = False

    @property
    def usable(self) -> bool:
        """This process computes the supervisor's hashes (it was forked from it)."""
        return struct.unpack_from("<q", self._map, 0)[0] == hash(_PROBE)

    @property
    def ready(self) -> bool:
        """The committed rows are in (set by the first indexer's :meth:`set_ready`, kept across restarts)."""
        return self._map[_READY_AT] == 1

    def set_ready(self) -> None:
        self._map[_READY_AT] = 1

    def add(self, uids: Iterable[str]) -> None:
        """Set the bits of ``uids`` ("" is no UID). Callers serialise their calls (one writer at a time)."""
        bits = self._bits
        for uid in uids:
            if uid:
                for at in _positions(hash(uid)):
                    bits[at >> 3] |= 1 << (at & 7)

    def add_hashes(self, hashes: np.ndarray) -> None:
        """Set the bits of UIDs given as their ``hash`` values (int64; the committed rows at start)."""
        for shift in (0, 32):
            at = (hashes >> shift) & _MASK
            np.bitwise_or.at(self._array, at >> 3, np.left_shift(1, at & 7).astype(np.uint8))

    def map_in(self) -> None:
        """Map every page of the filter into this process now (a worker, at its start).

        PERF: a forked child inherits the shared mapping but not its page
        table entries, so each of its 4,096 pages cost a minor fault (~2 us)
        the first time a duplicate check read it: about one per store over a
        worker's first few thousand stores. Reading a byte of each page here
        takes ~8 ms, once. The pages are shared: each process's RSS counts
        them, its PSS a share.
        """
        self._array[:: mmap.PAGESIZE].max()

    def may_hold(self, uids: Iterable[str]) -> bool:
        """False only if none of ``uids`` is indexed or on its way to the index: no need to ask."""
        if not self._trusted:
            if not (self.ready and self.usable):
                return True
            self._trusted = True
        bits = self._bits
        for uid in uids:
            if uid:
                first, second = _positions(hash(uid))
                if bits[first >> 3] & (1 << (first & 7)) and bits[second >> 3] & (1 << (second & 7)):
                    return True
        return False
