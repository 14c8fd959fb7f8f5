"""CPU time and peak memory of a process tree, from /proc (Linux only).

A receiver is a process tree: fastscp's supervisor, workers and indexer;
``storescp --fork`` and one child per association; Orthanc or pynetdicom
alone. :class:`TreeMonitor` samples the tree every ``interval`` seconds:

* CPU seconds: utime + stime + cutime + cstime of every process in the tree.
  A child that exits is folded into its parent's cutime/cstime when the
  parent reaps it; one that is reaped automatically (its parent ignores
  SIGCHLD) is not, so its last sampled time is added instead.
* Peak RSS: the largest VmHWM (the kernel's high-water mark of resident
  memory) seen per process; and the largest sum of VmRSS over the tree's
  live processes at one sample (pages a forked child shares with its parent
  count in both: an upper bound of the tree's memory), and of PSS (each
  shared page divided among its sharers), every :data:`PSS_EVERY` samples.
* CPU per role: :meth:`TreeMonitor.cpu_by_role` splits the CPU since
  :meth:`TreeMonitor.mark` by what a function makes of each process's PID
  and name (``/proc/PID/comm``: fastscp names its children by role); its
  kernel part (stime + cstime) on its own, if asked: what no faster code
  in the receiver's own processes would spare.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fastscp.process.priority import process_name

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PSS_EVERY = 5
_SIGCHLD_BIT = 1 << (17 - 1)


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from every thread that may have forked)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return found


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (zombies included)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children(p))
    return out


def cpu_times(pid: int) -> tuple[int, int, int, int] | None:
    """(utime, stime, reaped children's cutime, cstime) in clock ticks."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    # fields[0] is state (field 3): utime is field 14, cstime field 17.
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return utime, stime, cutime, cstime


def cpu_ticks(pid: int) -> tuple[int, int] | None:
    """(own utime+stime, reaped children's cutime+cstime) in clock ticks."""
    times = cpu_times(pid)
    return None if times is None else (times[0] + times[1], times[2] + times[3])


def _status(pid: int) -> dict[str, str]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                out[key] = value.strip()
    except OSError:
        pass
    return out


def vm_hwm_kib(pid: int) -> int:
    value = _status(pid).get("VmHWM", "0 kB").split()[0]
    return int(value)


def pss_kib(pid: int) -> int:
    """Proportional set size of ``pid`` (shared pages divided among their sharers), KiB; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) of ``pid`` in KiB; (0, 0) when it is gone."""
    status = _status(pid)
    return (int(status.get("VmHWM", "0 kB").split()[0]), int(status.get("VmRSS", "0 kB").split()[0]))


def ignores_sigchld(pid: int) -> bool:
    mask = _status(pid).get("SigIgn")
    return bool(mask) and bool(int(mask, 16) & _SIGCHLD_BIT)


def open_paths(pid: int) -> list[str]:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    out = []
    for fd in fds:
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return out


@dataclass
class _Seen:
    parent: int
    ticks: int = 0  # own + reaped children, last sample
    hwm_kib: int = 0
    autoreaped: bool = False  # its parent ignores SIGCHLD
    base: int = 0  # ticks at TreeMonitor.mark()
    kernel: int = 0  # of ticks, system time
    kernel_base: int = 0
    comm: str = ""


@dataclass
class TreeSnapshot:
    cpu_seconds: float
    pids: list[int]


@dataclass
class TreeMonitor:
    """Sample a process tree in a thread; see the module docstring."""

    root: int
    interval: float = 0.1
    seen: dict[int, _Seen] = field(default_factory=dict)
    #: The largest sum of VmRSS over the live processes of one sample, KiB; and of their PSS (read every
    #: PSS_EVERY samples: the kernel walks every mapping for it).
    peak_total_rss_kib: int = 0
    peak_total_pss_kib: int = 0
    _samples: int = 0
    _alive: set[int] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def sample(self) -> TreeSnapshot:
        """One pass over the tree; returns its CPU seconds so far."""
        with self._lock:
            pids: list[int] = []
            total_rss = 0
            todo = [(self.root, 0)]
            while todo:
                pid, parent = todo.pop()
                pids.append(pid)
                kids = children(pid)
                todo.extend((k, pid) for k in kids)
                entry = self.seen.get(pid)
                if entry is None:
                    entry = self.seen[pid] = _Seen(parent, autoreaped=bool(parent) and ignores_sigchld(parent))
                times = cpu_times(pid)
                if times is not None:
                    entry.ticks, entry.kernel = sum(times), times[1] + times[3]
                hwm, rss = memory_kib(pid)
                entry.hwm_kib = max(entry.hwm_kib, hwm)
                total_rss += rss
                entry.comm = process_name(pid) or entry.comm  # renamed after the fork: the latest name
            alive = self._alive = set(pids)
            self.peak_total_rss_kib = max(self.peak_total_rss_kib, total_rss)
            if self._samples % PSS_EVERY == 0:
                self.peak_total_pss_kib = max(self.peak_total_pss_kib, sum(pss_kib(p) for p in pids))
            self._samples += 1
            total = sum(self.seen[p].ticks for p in pids)
            # Children gone without being folded into a parent's cutime.
            total += sum(e.ticks for p, e in self.seen.items() if p not in alive and e.autoreaped)
            return TreeSnapshot(total / CLOCK_TICKS, pids)

    def mark(self) -> float:
        """Sample, and count :meth:`cpu_by_role` from here; returns the tree's CPU seconds so far."""
        snapshot = self.sample()
        with self._lock:
            for entry in self.seen.values():
                entry.base, entry.kernel_base = entry.ticks, entry.kernel
        return snapshot.cpu_seconds

    def cpu_by_role(self, role: Callable[[int, str], str], kernel: bool = False) -> dict[str, float]:
        """CPU seconds since :meth:`mark` per ``role(pid, comm)``, counted as :meth:`sample` counts the total
        (a child reaped by its parent is in the parent's); with ``kernel``, their system time only."""
        out: dict[str, float] = {}
        with self._lock:
            for pid, entry in self.seen.items():
                if pid in self._alive or entry.autoreaped:
                    name = role(pid, entry.comm)
                    spent = entry.kernel - entry.kernel_base if kernel else entry.ticks - entry.base
                    out[name] = out.get(name, 0.0) + spent / CLOCK_TICKS
        return out

    def start(self) -> TreeMonitor:
        self._thread = threading.Thread(target=self._run, name="tree-monitor", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:  # a process vanishing mid-read; next pass
                continue

    def stop(self) -> TreeSnapshot:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.sample()

    def peak_rss_mib(self, pids: set[int] | None = None) -> float:
        values = [e.hwm_kib for p, e in self.seen.items() if pids is None or p in pids]
        return max(values, default=0) / 1024


def system_busy_seconds() -> float:
    """CPU seconds all CPUs spent not idle since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    values = [int(x) for x in parts]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    # guest time is already counted in user/nice
    busy = sum(values[:8]) - idle
    return busy / CLOCK_TICKS


def foreign_load(window: float = 1.0) -> float:
    """Cores busy over ``window`` seconds, minus this process tree's use."""
    me = os.getpid()
    before_all = system_busy_seconds()
    before_me = sum(sum(cpu_ticks(p) or (0, 0)) for p in tree(me)) / CLOCK_TICKS
    t0 = time.monotonic()
    time.sleep(window)
    elapsed = time.monotonic() - t0
    after_all = system_busy_seconds()
    after_me = sum(sum(cpu_ticks(p) or (0, 0)) for p in tree(me)) / CLOCK_TICKS
    return max(0.0, (after_all - before_all) - (after_me - before_me)) / elapsed
