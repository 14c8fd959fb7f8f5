"""What a child process is called and how much CPU and disk it may take from the others.

Derived work (the index, thumbnails, scan sheets, hooks, forwarding) must not
take the workers' CPU while they store: its priority comes from
``server.derived_priority`` (:data:`DERIVED_PRIORITIES`). The I/O class is
set too; only the BFQ (and the old CFQ) I/O schedulers honour it, others
ignore it, and it costs one system call.

The process name (``/proc/PID/comm``, what ``top`` and ``ps -o comm`` show)
names the child's role, so its CPU can be told from the others'
(bench/load reports CPU per role).
"""

from __future__ import annotations

import ctypes
import os
import platform

#: server.derived_priority: "idle": runs only when a CPU would otherwise be
#: idle (SCHED_IDLE) and in the idle I/O class; "low": nice 19 and the
#: lowest best-effort I/O level (a share of the CPU even under full load);
#: "normal": as the workers.
DERIVED_PRIORITIES = ("idle", "low", "normal")

#: prctl(2) option: the calling thread's name (the process's, for its main thread); 15 bytes at most.
PR_SET_NAME = 15
COMM_MAX = 15

#: ioprio_set(2)/ioprio_get(2) system call numbers; other machines get no I/O class.
_IOPRIO_SYSCALLS = {"x86_64": (251, 252), "aarch64": (30, 31), "i686": (289, 290)}
IOPRIO_WHO_PROCESS = 1
IOPRIO_CLASS_SHIFT = 13
IOPRIO_CLASS_BE, IOPRIO_CLASS_IDLE = 2, 3

_libc = ctypes.CDLL(None, use_errno=True)


def set_process_name(name: str) -> None:
    """Name the calling process (its main thread, and the threads it starts afterwards) ``name[:15]``."""
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:COMM_MAX]), 0, 0, 0)


def process_name(pid: int) -> str:
    """``/proc/PID/comm``: what :func:`set_process_name` set ("" when the process is gone)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _ioprio(value: int | None, pid: int = 0) -> int:
    """ioprio_set (``value``) or ioprio_get (None) of ``pid``; -1 where the machine has no such call."""
    numbers = _IOPRIO_SYSCALLS.get(platform.machine())
    if numbers is None:
        return -1
    if value is None:
        return int(_libc.syscall(numbers[1], IOPRIO_WHO_PROCESS, pid))
    return int(_libc.syscall(numbers[0], IOPRIO_WHO_PROCESS, pid, value))


def io_priority(pid: int = 0) -> tuple[int, int]:
    """(I/O class, level) of ``pid`` (0: this process): class 1 real-time, 2 best-effort, 3 idle,
    0 none set; (-1, -1) where it can't be read."""
    value = _ioprio(None, pid)
    if value < 0:
        return -1, -1
    return value >> IOPRIO_CLASS_SHIFT, value & ((1 << IOPRIO_CLASS_SHIFT) - 1)


def lower_priority(level: str) -> str:
    """Give the calling process ``level`` (one of :data:`DERIVED_PRIORITIES`); returns what was set, for the log.

    Threads and programs it starts afterwards inherit it. Nothing fails:
    a system that refuses one setting keeps the process as it was there.
    """
    if level == "normal":
        return "normal priority"
    done = []
    cpu_idle = False
    if level == "idle":
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            cpu_idle = True
            done.append("SCHED_IDLE")
        except (AttributeError, OSError):
            pass
    if not cpu_idle:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 19)
            done.append("nice 19")
        except OSError:
            pass
    io_class, io_level = (IOPRIO_CLASS_IDLE, 0) if level == "idle" else (IOPRIO_CLASS_BE, 7)
    if _ioprio((io_class << IOPRIO_CLASS_SHIFT) | io_level) == 0:
        done.append("I/O idle" if io_class == IOPRIO_CLASS_IDLE else "I/O best-effort 7")
    return ", ".join(done) or "normal priority (not lowered: refused)"
