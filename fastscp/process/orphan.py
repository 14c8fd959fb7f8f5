"""Child processes die with the supervisor.

An orphan would keep serving without a supervisor: an indexer keeps the
DuckDB lock and its sockets, so the next start fails. Each child asks the
kernel for a signal when its parent dies (``prctl(PR_SET_PDEATHSIG)``)
right after the fork; loops that could outlast that signal's handling
check :func:`parent_gone`.
"""

from __future__ import annotations

import ctypes
import os

#: prctl(2) option: the signal a process gets when its parent dies.
PR_SET_PDEATHSIG = 1

#: The supervisor's PID, in a child set up by die_with_parent; 0 elsewhere.
_parent = 0


def die_with_parent(parent: int, signum: int) -> None:
    """In a forked child: get ``signum`` when the process ``parent`` dies; exit now if it already has.

    The kernel sends the signal when the *thread* that forked us exits: the
    supervisor forks from its only thread. A parent that died before the
    prctl is seen by ``getppid()``, which then names the reaper instead.
    """
    global _parent
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signum), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    _parent = parent
    if os.getppid() != parent:
        os._exit(1)


def parent_gone() -> bool:
    """True in a child whose supervisor has died (never outside one)."""
    return _parent != 0 and os.getppid() != _parent
