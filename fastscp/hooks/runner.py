"""Runs the hooks of the post-store process: programs and built-in actions, counted and logged.

Everything happens in the post-store process's own loop (one thread): a
hook program is started with ``subprocess.Popen`` and an argv list (never a
shell), in a session of its own, its standard input and output are
non-blocking pipes in a selector of its own (which the loop waits on: an
epoll fd is itself pollable), and its exit is seen through a pidfd (or,
without one, polled). So a slow or hanging hook holds up nothing
but its own hook's queue, and never a C-STORE: the workers only hand the
post-store process a message.

A hook program that outlives its timeout gets SIGTERM to its process
group, then SIGKILL after :data:`KILL_GRACE`; the group is signalled only
while its leader is unreaped (a zombie at most), so its PID, the group's ID,
can't have been reused.

Hook programs inherit the post-store process's CPU priority (server.derived_priority):
storing comes first. A timeout is wall-clock time.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Sequence

import msgspec

from fastscp.config import HookConfig
from fastscp.hooks.events import Event, Matcher, Tracker, document, environment, instance_event
from fastscp.index.records import InstanceRecord
from fastscp.status import AssociationReport, HookState
from fastscp.storage.files import FileModes
from fastscp.storage.layout import LayoutOptions

log = logging.getLogger("fastscp.hooks")

#: ``run_action(hook, event, modes) -> what it wrote``: a built-in action (fastscp.hooks.actions).
RunAction = Callable[[HookConfig, Event, FileModes], str]

#: Seconds from SIGTERM (at the timeout) to SIGKILL.
KILL_GRACE = 2.0
#: Events waiting per hook; beyond, new ones are dropped (counted, logged).
QUEUE_LIMIT = 10_000
#: Bytes of a hook's output (stdout and stderr together) kept for its log line.
OUTPUT_TAIL = 1024
#: How often a running hook is polled where pidfds are not available.
POLL_INTERVAL = 0.1


@dataclasses.dataclass
class _Job:
    event: Event
    attempt: int = 1
    not_before: float = 0.0


@dataclasses.dataclass(eq=False)
class _Run:
    hook: _Hook
    job: _Job
    process: subprocess.Popen[bytes]
    started: float  # monotonic
    stdin: memoryview
    output: bytearray = dataclasses.field(default_factory=bytearray)
    pidfd: int = -1
    terminated: float = 0.0  # monotonic time of the SIGTERM at the timeout; 0: not timed out
    killed: bool = False


class _Hook:
    def __init__(self, config: HookConfig) -> None:
        self.config = config
        self.matcher = Matcher(config)
        self.queue: collections.deque[_Job] = collections.deque()
        self.retrying: list[_Job] = []
        self.running: set[_Run] = set()
        self.state = HookState(name=config.name, event=config.event)
        self.removed = False

    def update(self, config: HookConfig) -> None:
        self.removed = False  # removed by an earlier reload, back before its last run ended
        self.config = config
        self.matcher = Matcher(config)
        self.state.event = config.event


class Hooks:
    """The hooks of the config (``hooks``), fed events by the post-store stage.

    Parameters
    ----------
    configs : list of HookConfig
    root, sr_root : str
        The storage roots (storage.directory, storage.sr_directory).
    layout : LayoutOptions
        For the study folder of a study-complete event.
    modes : FileModes
        What the built-in actions give the files and folders they make.
    run_action : callable
        Runs a built-in action (:func:`fastscp.hooks.actions.run_action`,
        passed in by the post-store stage, which owns the imaging it needs).

    The caller's loop waits on this object (:meth:`fileno`) and calls
    :meth:`dispatch` when it is readable, and :meth:`tick` at least when
    that said.
    """

    def __init__(self, configs: Sequence[HookConfig], root: str, sr_root: str, layout: LayoutOptions,
                 modes: FileModes, run_action: RunAction) -> None:
        self.root = root
        self.run_action = run_action
        self.sr_root = sr_root
        self.modes = modes
        #: The hooks' pipes and pidfds, each with the callable to run when it is ready.
        self.selector = selectors.DefaultSelector()
        self.stopping = False
        self.tracker = Tracker(root, layout)
        #: False where a shared index's study jobs make the study-complete events (fastscp.poststore.jobs).
        self.track_studies = True
        self.hooks: dict[str, _Hook] = {}
        self.changed = True  # counts changed since states() was last read
        self.configure(configs)

    # -- configuration ----------------------------------------------------------------

    def configure(self, configs: Sequence[HookConfig]) -> None:
        """Put ``configs`` in force (start-up, SIGHUP).

        A hook kept by name keeps its counts and queue; a removed hook's
        queued events are dropped, its running programs finish.
        """
        wanted = {config.name: config for config in configs}
        had = any(not hook.removed for hook in self.hooks.values())
        for name, hook in list(self.hooks.items()):
            if name in wanted:
                hook.update(wanted[name])
                continue
            hook.removed = True
            dropped = len(hook.queue) + len(hook.retrying)
            hook.queue.clear()
            hook.retrying.clear()
            if dropped:
                log.warning("hook %s removed from the config: %d queued events dropped", name, dropped)
            if not hook.running:
                del self.hooks[name]
        for name, config in wanted.items():
            if name not in self.hooks:
                self.hooks[name] = _Hook(config)
        self.changed = True
        if configs:
            log.info("hooks in force: %s", ", ".join(f"{c.name} ({c.event}: {_what(c)})" for c in configs))
        elif had:
            log.info("no hooks in force")

    def _active(self, event: str) -> list[_Hook]:
        return [h for h in self.hooks.values() if not h.removed and h.config.event == event]

    @property
    def wants_studies(self) -> bool:
        """True if a study-complete hook is configured: the stage must time the studies."""
        return bool(self._active("study-complete"))

    # -- events -----------------------------------------------------------------------

    def instance_stored(self, record: InstanceRecord) -> None:
        associations = self._active("association-ended")
        studies = self._active("study-complete") if self.track_studies else []
        if associations or studies:
            self.tracker.stored(record, bool(associations), bool(studies))
        stored = self._active("instance-stored")
        if stored:
            self._submit(stored, instance_event(record, self.root, self.sr_root))

    def association_ended(self, report: AssociationReport) -> None:
        hooks = self._active("association-ended")
        event = self.tracker.association_ended(report) if hooks else None
        if event is not None:
            self._submit(hooks, event)

    def study_complete(self, study_uid: str, event: Event | None = None) -> Event | None:
        """A quiet study's event (this node's instances of it, or ``event``, made from a shared index's rows):
        returned when a hook takes it (:meth:`holds` says when its runs are over)."""
        hooks = self._active("study-complete")
        if event is None and hooks:
            event = self.tracker.study_complete(study_uid)
        return event if event is not None and self._submit(hooks, event) else None

    def holds(self, event: Event) -> bool:
        """True while a run for ``event`` waits, runs or is to be retried."""
        return any(job.event is event for hook in self.hooks.values()
                   for job in (*hook.queue, *hook.retrying, *(run.job for run in hook.running)))

    def _submit(self, hooks: list[_Hook], event: Event) -> int:
        """Queue ``event`` for each hook it matches; the number that took it."""
        taken = 0
        for hook in hooks:
            if not hook.matcher(event):
                continue
            if len(hook.queue) >= QUEUE_LIMIT:
                hook.state.dropped += 1
                if hook.state.dropped in (1, 10, 100) or hook.state.dropped % 1000 == 0:
                    log.warning("hook %s: %d events waiting, the limit: %d events dropped so far (%s)",
                                hook.config.name, len(hook.queue), hook.state.dropped, event.subject)
                continue
            hook.queue.append(_Job(event))
            self.changed = True
            taken += 1
        return taken

    # -- running ------------------------------------------------------------------------

    def fileno(self) -> int:
        """Readable when a hook's pipe or pidfd is ready (then call :meth:`dispatch`)."""
        return self.selector.fileno()

    def dispatch(self, timeout: float = 0) -> None:
        for key, _events in self.selector.select(timeout):
            # One callback may have closed another's pipe (a run that ended).
            try:
                still = self.selector.get_key(key.fileobj) is key
            except (KeyError, ValueError):
                still = False
            if still:
                key.data()

    def tick(self) -> float | None:
        """Start what may start, enforce timeouts; seconds until this should run again (None: nothing pending)."""
        now = time.monotonic()
        due: list[float] = []
        for hook in list(self.hooks.values()):
            for run in list(hook.running):
                self._watch(run, now, due)
            if hook.removed or self.stopping:
                if hook.removed and not hook.running:
                    del self.hooks[hook.config.name]
                continue
            for job in [j for j in hook.retrying if j.not_before <= now]:
                hook.retrying.remove(job)
                hook.queue.appendleft(job)
            due.extend(j.not_before - now for j in hook.retrying)
            if hook.config.action:
                # Built-in actions run here, in this process: one per tick keeps the loop receiving.
                if hook.queue:
                    self._act(hook, hook.queue.popleft())
                    due.append(0.0)
                continue
            while hook.queue and len(hook.running) < hook.config.max_concurrent:
                self._start(hook, hook.queue.popleft())
        return max(0.0, min(due)) if due else None

    def _watch(self, run: _Run, now: float, due: list[float]) -> None:
        config = run.hook.config
        if run.pidfd < 0 and self._exited(run):
            return
        if not run.terminated and now - run.started >= config.timeout:
            run.terminated = now
            run.hook.state.timed_out += 1
            self._signal(run, signal.SIGTERM)
        elif run.terminated and not run.killed and now - run.terminated >= KILL_GRACE:
            run.killed = True
            self._signal(run, signal.SIGKILL)
        if run.pidfd < 0:
            due.append(POLL_INTERVAL)
        if not run.terminated:
            due.append(run.started + config.timeout - now)
        elif not run.killed:
            due.append(run.terminated + KILL_GRACE - now)

    @staticmethod
    def _signal(run: _Run, signum: int) -> None:
        # Only while the leader is unreaped (see the module docstring).
        try:
            os.killpg(run.process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def _start(self, hook: _Hook, job: _Job) -> None:
        config = hook.config
        hook.state.runs += 1
        self.changed = True
        try:
            process = subprocess.Popen(
                config.program, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env=environment(job.event, config.name, job.attempt), close_fds=True, start_new_session=True,
            )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            self._done(hook, job, 0.0, f"could not start {config.program[0]!r}: {exc}", b"")
            return
        assert process.stdin is not None and process.stdout is not None
        run = _Run(hook, job, process, time.monotonic(), memoryview(document(job.event, config.name, job.attempt)))
        hook.running.add(run)
        os.set_blocking(process.stdout.fileno(), False)
        os.set_blocking(process.stdin.fileno(), False)
        self.selector.register(process.stdout, selectors.EVENT_READ, functools.partial(self._read, run))
        self._write(run)
        if run.stdin:
            self.selector.register(process.stdin, selectors.EVENT_WRITE, functools.partial(self._write, run))
        try:
            run.pidfd = os.pidfd_open(process.pid)
        except (AttributeError, OSError):
            run.pidfd = -1  # polled in tick()
        else:
            self.selector.register(run.pidfd, selectors.EVENT_READ, functools.partial(self._exited, run))

    def _write(self, run: _Run) -> None:
        stdin = run.process.stdin
        assert stdin is not None
        try:
            while run.stdin:
                run.stdin = run.stdin[os.write(stdin.fileno(), run.stdin):]
        except BlockingIOError:
            return
        except OSError:
            run.stdin = memoryview(b"")  # it closed its input (or exited): it needs no more of it
        if _registered(self.selector, stdin):
            self.selector.unregister(stdin)
        stdin.close()

    def _read(self, run: _Run) -> None:
        stdout = run.process.stdout
        assert stdout is not None
        while True:
            try:
                chunk = os.read(stdout.fileno(), 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.selector.unregister(stdout)
                stdout.close()
                return
            run.output += chunk
            del run.output[:-OUTPUT_TAIL]

    def _exited(self, run: _Run) -> bool:
        """Finish ``run`` if its program has exited; True if it had."""
        try:
            if os.waitid(os.P_PID, run.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                return False
        except ChildProcessError:
            pass  # reaped already: wait() below knows
        if run.terminated or run.killed:
            # What it started may still run; the zombie leader keeps the group's ID ours.
            self._signal(run, signal.SIGKILL)
        returncode = run.process.wait()
        if run.pidfd >= 0:
            self.selector.unregister(run.pidfd)
            os.close(run.pidfd)
        stdout, stdin = run.process.stdout, run.process.stdin
        if stdout is not None and not stdout.closed:
            self._read(run)  # what it wrote last
            if not stdout.closed:  # a child of its own still holds the pipe: not waited for
                self.selector.unregister(stdout)
                stdout.close()
        if stdin is not None and not stdin.closed:
            if _registered(self.selector, stdin):
                self.selector.unregister(stdin)
            stdin.close()
        run.hook.running.discard(run)
        elapsed = time.monotonic() - run.started
        if run.terminated:
            error = f"timed out after {run.hook.config.timeout:g} s: killed"
        elif returncode < 0:
            error = f"killed by signal {-returncode} ({_signal_name(-returncode)})"
        elif returncode:
            error = f"exit status {returncode}"
        else:
            error = ""
        self._done(run.hook, run.job, elapsed, error, bytes(run.output))
        return True

    def _act(self, hook: _Hook, job: _Job) -> None:
        hook.state.runs += 1
        started = time.monotonic()
        try:
            made = self.run_action(hook.config, job.event, self.modes)
        except Exception as exc:  # a file no renderer expected must not stop the post-store process
            self._done(hook, job, time.monotonic() - started, f"{type(exc).__name__}: {exc}", b"")
        else:
            self._done(hook, job, time.monotonic() - started, "", made.encode())

    def _done(self, hook: _Hook, job: _Job, elapsed: float, error: str, output: bytes) -> None:
        self.changed = True
        config, state = hook.config, hook.state
        tail = output.decode("utf-8", "replace").strip()
        said = f"; output: {tail}" if tail else ""
        what = f"hook {config.name} ({job.event.kind}, attempt {job.attempt}) for {job.event.subject}"
        if not error:
            state.succeeded += 1
            log.info("%s: done in %.2f s%s", what, elapsed, said)
            return
        retry = job.attempt <= config.retries and not hook.removed and not self.stopping
        if retry:
            state.retried += 1
            delay = config.retry_backoff * 2 ** (job.attempt - 1)
            hook.retrying.append(_Job(job.event, job.attempt + 1, time.monotonic() + delay))
            then = f"; retry {job.attempt} of {config.retries} in {delay:g} s"
        else:
            state.failed += 1
            then = f"; given up after {job.attempt} attempts" if job.attempt > 1 else ""
        state.last_error = f"{error}{said}"[:500]
        state.last_error_at = time.time()
        log.warning("%s: failed after %.2f s: %s%s%s", what, elapsed, error, said, then)

    # -- status and stopping ------------------------------------------------------------

    def states(self) -> list[HookState]:
        """Each configured hook's counts, now."""
        self.changed = False
        out = []
        for hook in self.hooks.values():
            if not hook.removed:
                hook.state.running = len(hook.running)
                hook.state.queued = len(hook.queue) + len(hook.retrying)
                out.append(msgspec.structs.replace(hook.state))
        return out

    @property
    def running(self) -> int:
        return sum(len(h.running) for h in self.hooks.values())

    def stop(self, grace: float) -> None:
        """Drop what has not started; running programs get ``grace`` s (or their timeout), then are killed."""
        self.stopping = True
        dropped = 0
        for hook in self.hooks.values():
            dropped += len(hook.queue) + len(hook.retrying)
            hook.queue.clear()
            hook.retrying.clear()
        if dropped:
            log.warning("stopping: %d hook runs not started are dropped", dropped)
        deadline = time.monotonic() + grace
        give_up = deadline + KILL_GRACE + 5
        while self.running and time.monotonic() < give_up:
            if time.monotonic() >= deadline:
                for hook in self.hooks.values():
                    for run in hook.running:
                        if not run.killed:
                            run.killed = True
                            log.warning("stopping: hook %s (pid %d) still runs: killed", hook.config.name,
                                        run.process.pid)
                            self._signal(run, signal.SIGKILL)
            wait = self.tick()
            self.dispatch(min(wait if wait is not None else 0.1, 0.1))

    def abandon(self) -> None:
        """Kill every running program at once (the supervisor is gone)."""
        self.stopping = True
        for hook in self.hooks.values():
            hook.queue.clear()
            hook.retrying.clear()
            for run in list(hook.running):
                run.killed = True
                self._signal(run, signal.SIGKILL)
                for _ in range(100):  # SIGKILL can't be ignored: it is gone within moments
                    if self._exited(run):
                        break
                    time.sleep(0.01)


def _registered(selector: selectors.BaseSelector, fileobj: object) -> bool:
    try:
        selector.get_key(fileobj)
    except KeyError:
        return False
    return True


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "?"


def _what(config: HookConfig) -> str:
    return f"the {config.action} action" if config.action else " ".join(config.program)
