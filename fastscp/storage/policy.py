"""The storage area's policies and outcomes, as enums.

Their values are the config's (``storage.duplicates``) and what the logs,
the action log and the index's ``duplicate_conflicts`` table show, so a
member is its string wherever it is written (:class:`enum.StrEnum`).
"""

from __future__ import annotations

import enum


class DuplicatePolicy(enum.StrEnum):
    """``storage.duplicates``: a SOP Instance UID stored already arrives again with other data set bytes."""

    #: Keep the stored file, acknowledge with Success (the sender moves on).
    KEEP_FIRST = "keep-first"
    #: Keep the stored file, answer 0x0111 Duplicate SOP instance.
    REJECT = "reject"
    #: Replace the stored file (atomically, by rename).
    OVERWRITE = "overwrite"
    #: Keep both: the new one as ``<name>.v2.dcm``, ``.v3`` ...
    KEEP_BOTH = "keep-both"


class Outcome(enum.StrEnum):
    """Where a received data set ended up (:class:`fastscp.storage.area.Committed`)."""

    #: A new file at a free name.
    STORED = "stored"
    #: A resend of the same data set bytes: the stored file stays, nothing is written.
    IDENTICAL = "identical"
    #: The last four: the same SOP Instance UID with other bytes, per :class:`DuplicatePolicy`.
    OVERWRITTEN = "overwritten"
    KEPT_BOTH = "kept-both"
    KEPT_FIRST = "kept-first"
    REJECTED = "rejected"

    @property
    def wrote(self) -> bool:
        """A new directory entry was made (its folder is fsynced; the index gets a record)."""
        return self in _WROTE

    @property
    def acknowledged_duplicate(self) -> bool:
        """Answered with Success, the stored data set kept as it was: counted as a duplicate, no new record."""
        return self in _KEPT


_WROTE = frozenset({Outcome.STORED, Outcome.OVERWRITTEN, Outcome.KEPT_BOTH})
_KEPT = frozenset({Outcome.IDENTICAL, Outcome.KEPT_FIRST})
