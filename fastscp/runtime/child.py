"""One child process of the supervisor: start, readiness, restart with backoff, stop. Nothing here blocks the loop.

A :class:`Child` is driven by the supervisor's selector loop: it registers
its process sentinel and its end of the child's *channel* (a Unix
SOCK_SEQPACKET pair; :mod:`fastscp.runtime.messages`) with the loop's
selector, with a callable as the key's data, and the loop calls it when
that becomes readable. Time-driven work (the readiness deadline, a restart
that is due) is done by :meth:`Child.tick`, which the loop calls on every
turn; :meth:`Child.deadline` tells it how long it may sleep. So a child
that dies, crashes at once again and again, or never says it is ready
costs the loop no wait at all.

* **Start.** Fork; the child runs ``spec.target(channel, *spec.args())``
  (``spec.args`` is called at each start, so a restart gets the settings in
  force then).
* **Readiness.** A child with ``ready_timeout`` must send
  :class:`~fastscp.runtime.messages.Ready` within it (it opens something
  first: the index, a port); until then it is *starting*. One that sends
  :class:`~fastscp.runtime.messages.StartFailed` or misses the deadline is
  killed and restarted like one that died. Only the server's start waits for
  readiness (:meth:`Child.await_ready`), before the loop runs.
* **Restart.** A child that exits is started again after a delay that
  doubles with each exit soon after a start (:class:`Backoff`), so a child
  that can't run costs a few forks a minute, not a fork storm.
* **Stop.** By PID: ``spec.stop_signal``, then SIGKILL once ``stop_timeout``
  has passed; the wait is bounded.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from fastscp.process.priority import lower_priority, set_process_name
from fastscp.runtime.messages import ENCODER, MESSAGE_MAX, Ready, StartFailed

log = logging.getLogger("fastscp.supervisor")
_fork = multiprocessing.get_context("fork")


@dataclass(frozen=True)
class Backoff:
    """How long a child that exited waits for its restart.

    A child that ran at least ``stable`` seconds is restarted at once;
    after each exit sooner than that the delay doubles, from ``first`` up
    to ``most``.
    """

    first: float = 1.0
    most: float = 30.0
    stable: float = 10.0

    def delay(self, ran: float, quick_exits: int) -> float:
        """The delay after an exit ``ran`` seconds after the start, the ``quick_exits``-th in a row."""
        if ran >= self.stable:
            return 0.0
        return min(self.first * 2 ** max(quick_exits - 1, 0), self.most)


@dataclass(frozen=True)
class ChildSpec:
    """What a child runs and how it is kept running.

    Parameters
    ----------
    name
        For the log: "worker 0", "indexer", "post-store stage".
    target
        Runs in the forked child: ``target(channel, *args())``, or
        ``target(*args())`` when ``channel`` is False.
    args
        Called at each start: the target's arguments after the channel.
        Sockets among them are the child's: the supervisor's copies are
        closed once it has forked.
    about
        Appended to the "started" log line (", index /srv/index.duckdb").
    decoder
        Decodes what the child sends on its channel (None: it sends
        nothing). :class:`Ready` and :class:`StartFailed` must be in it when
        ``ready_timeout`` is set.
    ready_timeout
        Seconds the child has to send :class:`Ready`; 0: running once forked.
    restart
        Start it again when it exits (the monitor is not: the status page is
        down until the server restarts).
    death_signal
        What the child gets when the supervisor dies (SIGKILL: a crash
        leaves only what every start recovers from; SIGTERM for a child that
        finishes cleanly on its own).
    stop_signal, stop_timeout
        :meth:`Child.stop` sends ``stop_signal``, then SIGKILL after
        ``stop_timeout`` seconds.
    priority
        The child's CPU and I/O priority, one of
        :data:`~fastscp.process.priority.DERIVED_PRIORITIES` (derived work:
        ``server.derived_priority``); set in the child before its target runs.
    """

    name: str
    target: Callable[..., object]
    args: Callable[[], tuple[Any, ...]] = tuple
    about: str = ""
    channel: bool = True
    decoder: msgspec.msgpack.Decoder | None = None
    ready_timeout: float = 0.0
    restart: bool = True
    death_signal: int = signal.SIGKILL
    stop_signal: int = signal.SIGTERM
    stop_timeout: float = 30.0
    priority: str = "normal"

    @property
    def process_name(self) -> str:
        return "fastscp-" + self.name.replace(" ", "-")


def _run_in_child(bootstrap: Callable[..., None], spec: ChildSpec, close: socket.socket | None,
                  args: tuple[Any, ...]) -> None:
    if close is not None:
        close.close()  # the supervisor's end of our own channel
    set_process_name(spec.process_name)  # "fastscp-worker-" (15 bytes), "fastscp-indexer"...: per-role CPU in top
    lower_priority(spec.priority)
    bootstrap(spec.target, *args, death_signal=spec.death_signal)


def run_target(target: Callable[..., object], *args: Any, death_signal: int = signal.SIGKILL) -> None:
    """The plainest bootstrap: run the target (the supervisor's also closes its sockets, forwards logs...)."""
    target(*args)


@dataclass(eq=False)
class Child:
    """One child process, kept running by the supervisor's loop (see the module docstring).

    ``on_message(child, message)`` gets each decoded message other than
    readiness; ``on_exit(child)`` is called when the process has exited
    and returns what its exit cost, for the log ("2 open associations
    aborted"), or "". ``bootstrap(target, *args, death_signal=...)`` runs
    first in the forked child.
    """

    spec: ChildSpec
    selector: selectors.BaseSelector
    on_message: Callable[[Child, object], None] = lambda _child, _message: None
    on_exit: Callable[[Child], str] = lambda _child: ""
    bootstrap: Callable[..., None] = run_target
    backoff: Backoff = field(default_factory=Backoff)

    process: multiprocessing.process.BaseProcess | None = field(default=None, init=False)
    channel: socket.socket | None = field(default=None, init=False)
    #: "down", "starting" (waiting for Ready), "running", "stopping".
    state: str = field(default="down", init=False)
    #: What the child said with Ready ("http://...": the monitor's URL).
    detail: str = field(default="", init=False)
    #: Starts after the first.
    restarts: int = field(default=0, init=False)
    #: time.monotonic() of the latest start, and time.time() of it.
    started: float = field(default=0.0, init=False)
    started_epoch: float = field(default=0.0, init=False)
    #: The latest exit code (None: running, or never ran).
    exitcode: int | None = field(default=None, init=False)
    #: Why the latest start failed (StartFailed, or no Ready in time).
    failure: str = field(default="", init=False)
    _ready_by: float = field(default=0.0, init=False)
    _restart_at: float | None = field(default=None, init=False)
    _quick_exits: int = field(default=0, init=False)
    _retired: bool = field(default=False, init=False)
    #: The child closed its end of the channel.
    _eof: bool = field(default=False, init=False)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.state != "down"

    # -- start -----------------------------------------------------------------------

    def start(self) -> None:
        """Fork the child now; it is *starting* until it sends Ready (if it must), else *running*."""
        spec = self.spec
        parent = child = None
        if spec.channel:
            parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        args = spec.args()
        process = _fork.Process(target=_run_in_child, name=spec.process_name,
                                args=(self.bootstrap, spec, parent, (child, *args) if child is not None else args))
        try:
            process.start()
        finally:
            for handed in (child, *args):
                if isinstance(handed, socket.socket):
                    handed.close()
        if self.process is not None:
            self.restarts += 1
        self.process, self.channel = process, parent
        self.started, self.started_epoch = time.monotonic(), time.time()
        self.exitcode, self.failure, self.detail, self._eof = None, "", "", False
        self._restart_at = None
        self.selector.register(process.sentinel, selectors.EVENT_READ, self._exited)
        if parent is not None:
            self.selector.register(parent, selectors.EVENT_READ, self._readable)
        if spec.ready_timeout > 0:
            self.state = "starting"
            self._ready_by = self.started + spec.ready_timeout
        else:
            self.state = "running"
            log.info("%s started (pid %d)%s", spec.name, process.pid, spec.about)

    def await_ready(self) -> str:
        """Block until the child is ready (at the server's start only, before the loop runs).

        Returns "" when it is, else why not (it is stopped then, and not
        restarted: the caller raises StartupError with the reason).
        """
        self._retired = True  # a start that fails here is the server's start failing
        while self.state == "starting":
            assert self.process is not None
            timeout = self._ready_by - time.monotonic()
            if timeout <= 0:
                self.failure = f"{self.spec.name} did not start within {self.spec.ready_timeout:.0f} s"
                break
            watch: list[Any] = [self.process.sentinel]
            if self.channel is not None and not self._eof:
                watch.append(self.channel)
            readable = multiprocessing.connection.wait(watch, timeout)
            if self.channel is not None and not self._eof and (self.channel in readable or
                                                                self.process.sentinel in readable):
                self._readable()  # what it said before it exited comes first
            if self.process.sentinel in readable:
                self._exited()
        if self.state == "running":
            self._retired = False
            return ""
        self.kill()
        self.wait(time.monotonic() + 5)
        return self.failure or f"{self.spec.name} exited with code {self.exitcode} while starting"

    # -- events (called by the loop) --------------------------------------------------

    def _readable(self) -> None:
        channel = self.channel
        while channel is not None and channel is self.channel:
            try:
                data = channel.recv(MESSAGE_MAX, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                # EOF: the child is exiting; its sentinel tells when it is gone.
                self._eof = True
                self._unregister(channel)
                return
            decoder = self.spec.decoder
            if decoder is None:
                continue
            try:
                message = decoder.decode(data)
            except msgspec.DecodeError as exc:
                log.error("%s sent a message that is not one of its channel's: %s", self.spec.name, exc)
                continue
            if isinstance(message, Ready):
                if self.state == "starting":
                    self.state, self.detail = "running", message.detail
                    log.info("%s started (pid %d)%s%s", self.spec.name, self.pid, self.spec.about,
                             f" at {message.detail}" if message.detail else "")
            elif isinstance(message, StartFailed):
                self._not_ready(message.reason)
            else:
                self.on_message(self, message)

    def _not_ready(self, reason: str) -> None:
        self.failure = reason
        if self.state == "starting":
            self.kill()  # its sentinel then restarts it, as for any exit

    def _exited(self) -> None:
        process = self.process
        assert process is not None
        if self.channel is not None and not self._eof:
            self._readable()  # what it said before it exited (a worker's last reports) comes first
        # Reaps it (after the above: a PID is only signalled before it is reaped). The
        # sentinel says it is exiting: the wait is bounded and short.
        process.join(1)
        self.selector.unregister(process.sentinel)
        if self.channel is not None:
            self._unregister(self.channel)
            self.channel.close()
            self.channel = None
        was = self.state
        self.state, self.exitcode = "down", process.exitcode
        cost = self.on_exit(self)
        if self._retired or was == "stopping":
            return
        why = f"{self.spec.name} (pid {process.pid}) exited with code {process.exitcode}"
        if self.failure:
            why = f"{self.spec.name} (pid {process.pid}) could not start: {self.failure}"
        if cost:
            why += f"; {cost}"
        if not self.spec.restart:
            log.error("%s; it is not restarted: the server goes on without it until its own restart", why)
            return
        now = time.monotonic()
        ran = now - self.started
        self._quick_exits = self._quick_exits + 1 if ran < self.backoff.stable else 0
        delay = self.backoff.delay(ran, self._quick_exits)
        self._restart_at = now + delay
        log.error("%s; restarting it%s", why, f" in {delay:g} s" if delay else "")

    def _unregister(self, fileobj: socket.socket) -> None:
        try:
            self.selector.unregister(fileobj)
        except KeyError:
            pass

    def tick(self, now: float) -> None:
        """Do what is due: kill a child that missed its readiness deadline, start one whose backoff is over."""
        if self.state == "starting" and now >= self._ready_by:
            self._not_ready(f"{self.spec.name} did not start within {self.spec.ready_timeout:.0f} s")
        elif self.state == "down" and self._restart_at is not None and now >= self._restart_at and not self._retired:
            try:
                self.start()
            except OSError as exc:  # no fork (EAGAIN, ENOMEM): try again later
                self._quick_exits += 1
                delay = self.backoff.delay(0.0, self._quick_exits)
                self._restart_at = now + delay
                log.error("%s could not be started (%s); trying again in %.0f s", self.spec.name, exc, delay)

    def deadline(self) -> float | None:
        """When :meth:`tick` next has something to do (time.monotonic()), or None."""
        if self.state == "starting":
            return self._ready_by
        if self.state == "down" and not self._retired:
            return self._restart_at
        return None

    # -- talking to it -----------------------------------------------------------------

    def send(self, message: object, fds: list[int] | None = None) -> None:
        """Send a message (and file descriptors) on the channel; blocking: the child reads at once.

        Raises
        ------
        OSError
            The child is gone or going (BrokenPipeError when it has no channel now).
        """
        if self.channel is None:
            raise BrokenPipeError(f"{self.spec.name} is not running")
        data = ENCODER.encode(message)
        if fds:
            socket.send_fds(self.channel, [data], fds)
        else:
            self.channel.send(data)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the running child, by PID."""
        process = self.process
        # exitcode reaps a zombie first: a reaped PID may be another process's already.
        if process is not None and self.state != "down" and process.pid is not None and process.exitcode is None:
            try:
                os.kill(process.pid, signum)
            except ProcessLookupError:
                pass

    # -- stop --------------------------------------------------------------------------

    @property
    def retired(self) -> bool:
        """It is not restarted when it exits (:meth:`retire`)."""
        return self._retired

    def retire(self) -> None:
        """No restart from now on (the server is stopping)."""
        self._retired = True
        self._restart_at = None

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def terminate(self) -> None:
        """Ask it to stop (``spec.stop_signal``) and never restart it; :meth:`wait` for it."""
        self.retire()
        if self.state != "down":
            self.state = "stopping"
            self.signal(self.spec.stop_signal)

    def wait(self, deadline: float) -> bool:
        """Wait until it has exited, at most until ``deadline`` (time.monotonic()); then SIGKILL it.

        Returns True if it exited by itself.
        """
        process = self.process
        if process is None or self.state == "down":
            return True
        process.join(max(deadline - time.monotonic(), 0.0))
        exited = process.exitcode is not None
        if not exited:
            log.error("%s did not stop within %.0f s; killing it", self.spec.name, self.spec.stop_timeout)
            self.kill()
            process.join(5)
        if process.exitcode is not None:
            self._exited()
        return exited

    def stop(self) -> bool:
        """:meth:`terminate`, then :meth:`wait` up to ``spec.stop_timeout``; True if it stopped by itself."""
        self.terminate()
        return self.wait(time.monotonic() + self.spec.stop_timeout)
