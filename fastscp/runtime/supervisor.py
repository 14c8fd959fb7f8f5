"""The supervisor: owns the listening socket, the worker pool and the indexer.

One thread, one selector loop. It accepts each connection, sets
TCP_NODELAY, and hands the socket to the least-busy worker over a Unix
SOCK_SEQPACKET pair. A connection is *pending* until its worker has read its
A-ASSOCIATE-RQ and asks for admission: pending connections have their own
budget (``server.max_pending_connections``, at most
``server.max_pending_per_address`` from one address; beyond it a new
connection is closed at once) and take no association slot, so idle sockets
can't lock senders out. Admission counts open associations across all
workers, so ``server.max_associations`` holds globally: one more gets
A-ASSOCIATE-RJ "local limit exceeded". A worker that dies is replaced (the
kernel closes its sockets, so its associations abort and no other is
touched). SIGTERM/SIGINT stop gracefully; a second one stops at once.

Every child (workers, the indexer, the post-store stage, the monitor) is a
:class:`~fastscp.runtime.child.Child`: the loop never waits for one. A
restart is a deadline (with a backoff that grows while a child keeps dying
at once), a restarted indexer's readiness is a message on its channel, and
the indexer pushes its state (for the status page) on the same channel.
What each child runs is passed in (:class:`Targets`; the server's are
composed in :mod:`fastscp.runtime.children`), so tests run the supervisor
with small fake children. To add a kind of
child, return its :class:`~fastscp.runtime.child.ChildSpec` from
:meth:`Supervisor.stages`.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import multiprocessing
import os
import pickle
import re
import selectors
import signal
import socket
import ssl
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from fastscp.config import Config, ConfigError, config_changes, layout_options, to_builtins, with_live_keys
from fastscp.dicom import header
from fastscp.dicom.sopclasses import RETRIEVE_SOP_CLASSES, STORAGE_COMMITMENT_PUSH
from fastscp.forward.process import forward_address
from fastscp.forward.status import ForwardStatus
from fastscp.hooks.link import HooksLink
from fastscp.imaging import frames as imaging
from fastscp.index.client import indexer_address
from fastscp.index.database import NodeAddress
from fastscp.index.uidfilter import UidFilter
from fastscp.monitor.book import StatusBook
from fastscp.net import scu
from fastscp.net.access import AccessConfigError, build_access_policy
from fastscp.net.association import ServiceSettings
from fastscp.net.commitscp import CommitmentService
from fastscp.net.fetch import fetch_settings
from fastscp.net.findscp import FIND_SOP_CLASSES
from fastscp.net.negotiation import (
    REJECTED_TRANSIENT,
    SOURCE_PROVIDER_PRESENTATION,
    AcceptancePolicy,
    encode_associate_rj,
    peek_ae_titles,
)
from fastscp.net.retrievescp import Destination, RetrieveService
from fastscp.poststore.client import poststore_address
from fastscp.process import logs
from fastscp.process.listen import bind_advice
from fastscp.process.orphan import die_with_parent
from fastscp.query.client import Locator, finder, lookup, node_addresses, selector
from fastscp.runtime.child import Backoff, Child, ChildSpec
from fastscp.runtime.messages import (
    ENCODER,
    FROM_INDEXER,
    FROM_WORKER,
    MESSAGE_MAX,
    READINESS,
    AdmissionReply,
    AdmissionRequest,
    Handoff,
    Reconfigure,
    Stop,
)
from fastscp.status import ENCODER as SNAPSHOT_ENCODER
from fastscp.status import AssociationReport, IndexerState, WorkerState
from fastscp.storage.area import Storage
from fastscp.storage.files import FileModes

log = logging.getLogger("fastscp.supervisor")
_fork = multiprocessing.get_context("fork")

#: How long a connection we are rejecting may take to send its A-ASSOCIATE-RQ.
REJECT_READ_TIMEOUT = 5.0
#: How often the status snapshot goes to the monitor.
SNAPSHOT_INTERVAL = 0.5
#: Longest sleep of the loop (signals, rejects and snapshots are checked at least this often).
LOOP_TICK = 0.5
#: server.associations_per_worker > 0: a worker past server.workers stops after this long without a connection.
SPARE_WORKER_IDLE = 60.0
#: Seconds the indexer has to open the index and bind its sockets (DuckDB replays its WAL first).
INDEXER_READY_TIMEOUT = 60.0
#: Seconds the monitor has to bind monitor.listen.
MONITOR_READY_TIMEOUT = 30.0


class StartupError(Exception):
    """The server can't start; the message says why and what to do."""


@dataclass(frozen=True)
class Targets:
    """What each child runs: ``target(channel, *args)`` (the post-store stage: ``target(*args)``).

    The server's are :data:`fastscp.runtime.children.TARGETS`; tests pass
    small fakes. ``stages`` registers more kinds of child (a forwarder, a
    hook runner): each is called with the supervisor when the server starts
    and returns its :class:`~fastscp.runtime.child.ChildSpec`, or None when
    the config turns it off; they start after the built-in ones, stop before
    them, and are restarted like them.
    """

    worker: Callable[..., object]
    indexer: Callable[..., object]
    poststore: Callable[..., object]
    monitor: Callable[..., object]
    stages: tuple[Callable[[Supervisor], ChildSpec | None], ...] = ()


@dataclass(eq=False)
class WorkerSlot:
    """Worker ``index``: its child process (restarted in place) and the connections handed to it."""

    index: int
    child: Child = field(init=False)
    #: Connection IDs handed to it and not ended (pending and admitted ones).
    open: set[int] = field(default_factory=set)
    #: When its last connection ended (time.monotonic()); None while it has one.
    idle_since: float | None = None


@dataclass
class PendingReject:
    sock: socket.socket
    peer: str
    deadline: float
    data: bytearray = field(default_factory=bytearray)


def _peer(address: tuple) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def set_low_latency(sock: socket.socket) -> None:
    """TCP_NODELAY for our small responses; TCP_QUICKACK so a peer with Nagle
    on is ACKed at once (the worker re-arms it on every read)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if hasattr(socket, "TCP_QUICKACK"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


class Supervisor:
    """Serves ``config`` with the children ``targets`` names (see the module docstring).

    ``reload`` reads the config again from its sources (SIGHUP); None:
    reloads are refused. ``backoff`` sets the restart delays of every child.
    """

    def __init__(self, config: Config, targets: Targets, reload: Callable[[], Config] | None = None,
                 config_file: str = "", *, backoff: Backoff | None = None) -> None:
        self.config = config
        self.targets = targets
        self.backoff = backoff or Backoff()
        #: Reads the config again from where it came from (SIGHUP); None: reloads are refused.
        self._load_config = reload
        self._config_file = config_file or "the command line"
        self.reload_requested = False
        #: logging.level, shared with the children: they take it on SIGHUP.
        self._log_level = _fork.RawValue("i", logging.getLevelName(config.logging.level))
        server = config.server
        self.storage = Storage(
            config.storage.directory,
            fsync=config.storage.fsync == "always",
            quarantine=config.storage.quarantine,
            sr_root=config.storage.sr_directory,
            modes=FileModes.of(config.storage.file_mode, config.storage.dir_mode),
            layout=layout_options(config),
            duplicates=config.storage.duplicates,
            min_free_bytes=config.storage.min_free_bytes,
        )
        #: Which UIDs the index may hold: written by the indexer, read by the workers' duplicate checks.
        self.uid_filter = UidFilter()
        # The keys a reload may change are set by live_settings, here and on SIGHUP.
        self.settings = live_settings(ServiceSettings(
            policy=AcceptancePolicy(
                ae_title=server.ae_title,
                storage_sop_classes=frozenset(),
                max_pdu_size=0,
                query_sop_classes=FIND_SOP_CLASSES | RETRIEVE_SOP_CLASSES | {STORAGE_COMMITMENT_PUSH},
            ),
            storage=self.storage,
            acse_timeout=0.0,
            dimse_timeout=0.0,
            tls=tls_context(config) if config.tls.enabled else None,
            poststore_address=(
                poststore_address(config.index_path)
                if config.thumbnails.enabled or config.scansheet.enabled or config.hooks else ""
            ),
            find=finder(config.index_path, retrieve_ae_title=server.ae_title),
            max_object_size=config.limits.max_object_size,
            max_command_set=config.limits.max_command_set,
            min_data_rate=config.limits.min_data_rate,
            locate=Locator(config.index_path, self.uid_filter),
            forward_address=forward_address(config.index_path) if config.forwarding.destinations else "",
            retrieve=(retrieve := retrieve_service(config, self.storage.root)),
            commitment=CommitmentService(lookup(config.index_path, self.storage.root), server.ae_title,
                                         dict(retrieve.move_destinations)),
        ), config)
        self._forward_status = ForwardStatus(config.forward_queue_path)
        #: Reloaded hooks to the post-store process, their counts back.
        self.hooks_link = HooksLink()
        self.book = StatusBook()
        #: Admitted associations: connection ID -> calling AE title.
        self.admitted: dict[int, str] = {}
        self.per_ae: Counter[str] = Counter()
        #: Connections waiting for their A-ASSOCIATE-RQ: connection ID -> peer IP.
        self.pending: dict[int, str] = {}
        self.pending_per_address: Counter[str] = Counter()
        self.drops = logs.DropLog(log)
        #: Connections closed before association, by the setting that closed them.
        self.dropped: Counter[str] = Counter()
        self._next_snapshot = 0.0
        #: What the indexer last told us (it sends its state about once a second).
        self.index_state = IndexerState(pid=0, pending=0, committed=0, reconcile="")
        self.stopping = False
        # Children forward their log records here; only we write output.
        self._log_r, self._log_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.address = indexer_address(config.index_path)
        self.selector = selectors.DefaultSelector()
        self.workers: dict[int, WorkerSlot] = {}
        #: The children beside the workers, by name, in start order (:meth:`stages`).
        self.children: dict[str, Child] = {}
        self.rejects: dict[socket.socket, PendingReject] = {}
        self.listener: socket.socket | None = None
        self.next_connection = 1
        self.signals = 0
        self._port = config.server.port
        self._wake_r, self._wake_w = socket.socketpair()
        #: Children check that they still have this parent (die_with_parent).
        self.pid = os.getpid()

    # -- start ----------------------------------------------------------------

    def _bind(self) -> socket.socket:
        server = self.config.server
        try:
            info = socket.getaddrinfo(server.host, server.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise StartupError(f"server.host {server.host!r}: cannot resolve: {exc}") from None
        family, _type, _proto, _canon, sockaddr = info[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            sock.close()
            raise StartupError(
                f"server.port: cannot listen on {server.host}:{server.port}: {exc.strerror}; "
                + bind_advice(exc, server.port, "server.port (or PORT)")
            ) from None
        sock.listen(256)
        sock.setblocking(False)
        return sock

    def stages(self) -> list[ChildSpec]:
        """The children beside the workers, in start order (they stop in the reverse order).

        A new kind of child (a forwarder, a hook runner) registers a
        function that makes its spec in :attr:`Targets.stages`.
        """
        config, targets, db = self.config, self.targets, self.config.database
        specs = []
        if config.monitor.enabled:
            specs.append(ChildSpec(
                # The config: the study browser.
                "monitor", targets.monitor, lambda: (self.config.monitor.listen, self.config), decoder=READINESS,
                ready_timeout=MONITOR_READY_TIMEOUT, restart=False, stop_timeout=10,
                death_signal=signal.SIGTERM))  # its SIGTERM stops it at once, cleanly
        specs.append(ChildSpec(
            "indexer", targets.indexer, lambda: (
                self.config.index_path, db.wal_mode, self.address, db.batch_size,
                db.batch_interval, self.storage.root, self.storage.sr_root, self.config.lake,
                db.maintenance_interval, node_address(self.config, self.storage.root), self.uid_filter),
            about=f", index {config.index_path}", decoder=FROM_INDEXER, ready_timeout=INDEXER_READY_TIMEOUT,
            # SIGTERM: it commits what it holds, then exits. At server.derived_priority: workers
            # never wait for it (IndexerClient keeps what it cannot take yet).
            stop_timeout=30, priority=config.server.derived_priority))
        if self.settings.poststore_address:
            specs.append(ChildSpec(
                "post-store stage", targets.poststore, lambda: (
                    self.storage.root, self.storage.layout, self.config.thumbnails, self.config.scansheet,
                    self.settings.poststore_address, self.address, self.storage.modes, self.config.hooks,
                    self.storage.sr_root, self.hooks_link.open(),  # a new link for each start
                    self.config.lake, self.config.database.job_lease),
                about=(f": thumbnails {'on' if config.thumbnails.enabled else 'off'}, "
                       f"scan sheets {'on' if config.scansheet.enabled else 'off'}"),
                channel=False, stop_timeout=60,  # SIGTERM: it finishes its queue and pending scan sheets
                death_signal=signal.SIGTERM,  # it stops after the image in hand (poststore_main sees it is orphaned)
                priority=config.server.derived_priority))
        return specs + [spec for make in targets.stages if (spec := make(self)) is not None]

    def _make_child(self, spec: ChildSpec, on_message: Callable[[Child, object], None] | None = None,
                    on_exit: Callable[[Child], str] | None = None) -> Child:
        return Child(spec, self.selector, on_message=on_message or self._stage_message,
                     on_exit=on_exit or (lambda _child: ""), bootstrap=self._child, backoff=self.backoff)

    def _add_worker(self, index: int) -> WorkerSlot:
        slot = WorkerSlot(index)
        slot.child = self._make_child(
            ChildSpec(f"worker {index}", self.targets.worker,
                      lambda: (index, self.settings, self.address, self.config.server.shutdown_timeout),
                      decoder=FROM_WORKER),
            on_message=lambda _child, message: self._worker_message(slot, message),
            on_exit=lambda _child: self._worker_exited(slot),
        )
        self.workers[index] = slot
        slot.child.start()
        return slot

    def _all_children(self) -> list[Child]:
        return [*self.children.values(), *(slot.child for slot in self.workers.values())]

    def _child(self, target, *args, death_signal: int = signal.SIGKILL) -> None:  # type: ignore[no-untyped-def]
        # First, before anything can block: a child dies with the supervisor.
        # Workers and the indexer get SIGKILL: a crash leaves only what every
        # start recovers from (temp files, records its reconcile indexes), and
        # the DuckDB lock and the sockets are free for a restart at once.
        die_with_parent(self.pid, death_signal)
        # A forked child must not keep the supervisor's sockets open: a client
        # connection or the listener held here would outlive the supervisor's
        # close. Close every one except what the child was given.
        keep = {a.fileno() for a in args if isinstance(a, socket.socket)}
        for key in list(self.selector.get_map().values()):
            fileobj = key.fileobj
            if isinstance(fileobj, socket.socket) and fileobj.fileno() not in keep:
                fileobj.close()
        for sock in (self.listener, self._wake_r, self._wake_w, self._log_r, self.hooks_link.sock, *self.rejects):
            if sock is not None and sock.fileno() not in keep:
                sock.close()
        signal.set_wakeup_fd(-1)
        # A child restarted while we serve would inherit our stop handlers: it
        # starts with the defaults, and its target sets its own.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        # SIGHUP from the supervisor means "logging.level changed" (a terminal's hangup too: harmless).
        signal.signal(signal.SIGHUP, self._follow_log_level)
        logs.forward_to(self._log_w)
        try:
            target(*args)
        finally:
            logs.flush()

    def run(self) -> int:
        """Serve until stopped; returns the process exit code."""
        # Before any child is forked: from the fork to its own handler, a child has this one.
        signal.signal(signal.SIGHUP, self._on_hangup)
        removed = self.storage.prepare()
        if removed:
            log.warning("removed %d incomplete temp files left by an earlier run", removed)
        free, watermark = self.storage.free_bytes(), self.config.storage.min_free_bytes
        if free < watermark:
            log.warning("storage %s: %d MB free, below storage.min_free_bytes (%d MB): every C-STORE gets 0xA700 "
                        "Out of resources until space is freed", self.storage.root, free // 1_000_000,
                        watermark // 1_000_000)
        self.listener = self._bind()
        self.selector.register(self._log_r, selectors.EVENT_READ, "log")
        try:
            for spec in self.stages():
                child = self.children[spec.name] = self._make_child(spec)
                child.start()
                # Only here does the supervisor wait for a child: before it accepts anything.
                failure = child.await_ready() if spec.ready_timeout else ""
                if failure:
                    raise StartupError(failure)  # it names the setting and what to do
            for index in range(self.config.worker_count):
                self._add_worker(index)
        except StartupError:
            # Leave nothing running behind: an orphaned indexer would keep the
            # DuckDB file locked.
            for slot in self.workers.values():
                slot.child.retire()
                slot.child.kill()
            for child in reversed(self.children.values()):
                child.stop()
            for slot in self.workers.values():
                slot.child.wait(time.monotonic() + 5)
            logs.receive(self._log_r)
            raise
        self.selector.register(self.listener, selectors.EVENT_READ, "listen")
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, "signal")
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        host, port = self.listener.getsockname()[:2]
        self._port = port
        log.info(
            "fastscp listening on %s:%d as %s with %d workers, max %d associations; "
            "storage %s, index %s; header scan backend: %s; JPEG: %s %s; TLS %s; status page %s",
            host, port, self.config.server.ae_title, len(self.workers),
            self.config.server.max_associations, self.storage.root, self.config.index_path, header.BACKEND,
            imaging.PILLOW_FLAVOUR, imaging.PILLOW_VERSION,
            "on" if self.settings.tls else "off", self.monitor_url or "off",
        )
        try:
            return self._loop()
        finally:
            signal.set_wakeup_fd(-1)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals += 1

    def _on_hangup(self, _signum: int, _frame: object) -> None:
        self.reload_requested = True

    def _follow_log_level(self, _signum: int, _frame: object) -> None:
        """In a child: take the supervisor's logging.level (it sends SIGHUP after a reload)."""
        logs.set_level(logging.getLevelName(self._log_level.value))

    # -- the loop --------------------------------------------------------------

    @property
    def open_associations(self) -> int:
        return sum(len(w.open) for w in self.workers.values())

    def _loop(self) -> int:
        while True:
            if self.signals:
                return self._shutdown()
            if self.reload_requested:
                self.reload_requested = False
                self._reload()
            for key, _events in self.selector.select(timeout=self._timeout()):
                tag = key.data
                if callable(tag):  # a child's channel or exit (Child)
                    tag()
                elif tag == "listen":
                    self._accept()
                elif tag == "reject":
                    self._reject_step(self.rejects[key.fileobj])  # type: ignore[index]
                else:
                    self._housekeeping(tag)
            now = time.monotonic()
            for child in self._all_children():
                child.tick(now)
            if self.config.server.associations_per_worker:
                self._stop_spare_workers(now)
            self._expire_rejects()
            self.drops.flush()
            self._publish()

    def _housekeeping(self, tag: str) -> None:
        if tag == "signal":
            try:
                self._wake_r.recv(512)
            except BlockingIOError:
                pass
        elif tag == "log":
            logs.receive(self._log_r)

    def _timeout(self) -> float:
        """How long the loop may sleep: until the next child deadline, at most LOOP_TICK."""
        deadlines = [d for d in (child.deadline() for child in self._all_children()) if d is not None]
        if not deadlines:
            return LOOP_TICK
        return min(max(min(deadlines) - time.monotonic(), 0.0), LOOP_TICK)

    def _accept(self) -> None:
        assert self.listener is not None
        while True:
            try:
                sock, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: keep serving the open ones
                log.error("accept failed: %s", exc)
                return
            peer = _peer(address)
            full = self._pending_full(address[0])
            if full:
                self._drop(sock, address[0], *full)
                continue
            try:
                set_low_latency(sock)
            except OSError:
                pass
            running = [w for w in self.workers.values() if w.child.state == "running" and not w.child.retired]
            if not running:
                self._begin_reject(sock, peer)
                continue
            worker = self._worker_for_connection(running)
            connection_id = self.next_connection
            self.next_connection += 1
            try:
                worker.child.send(Handoff(connection_id=connection_id, peer_address=peer), [sock.fileno()])
                worker.open.add(connection_id)
                worker.idle_since = None
                self.pending[connection_id] = address[0]
                self.pending_per_address[address[0]] += 1
            except OSError as exc:
                log.error("could not hand %s to worker %d: %s", peer, worker.index, exc)
            finally:
                sock.close()

    def _worker_for_connection(self, running: list[WorkerSlot]) -> WorkerSlot:
        """The least busy running worker; with server.associations_per_worker, one under it, forked if none is.

        A new worker is forked and handed the connection at once: it reads
        its channel when it is up. Past server.max_associations processes,
        the least busy one takes it over its limit (admission still caps
        the associations).
        """
        limit = self.config.server.associations_per_worker
        under = [w for w in running if not limit or len(w.open) < limit]
        if limit and not under and len(self.workers) < self.config.server.max_associations:
            return self._add_worker(max(self.workers, default=-1) + 1)
        return min(under or running, key=lambda w: len(w.open))

    def _stop_spare_workers(self, now: float) -> None:
        """Workers forked past server.workers (associations_per_worker) stop once idle for SPARE_WORKER_IDLE."""
        for index, slot in list(self.workers.items()):
            if index < self.config.worker_count:
                continue
            if slot.child.state == "down" and slot.child.retired:
                del self.workers[index]  # stopped (below) and reaped
            elif not slot.open and slot.idle_since is not None and now - slot.idle_since >= SPARE_WORKER_IDLE:
                log.info("%s idle for %.0f s: stopping it (server.associations_per_worker)", slot.child.spec.name,
                         now - slot.idle_since)
                slot.child.retire()  # handed nothing more, not restarted
                slot.idle_since = None
                try:
                    slot.child.send(Stop(now=False))
                except OSError:
                    slot.child.kill()

    def _pending_full(self, ip: str) -> tuple[str, str] | None:
        """(the key, why) a new connection from ``ip`` can't wait for its A-ASSOCIATE-RQ, or None."""
        server = self.config.server
        if self.pending_per_address[ip] >= server.max_pending_per_address:
            key = "server.max_pending_per_address"
            return key, (f"{self.pending_per_address[ip]} connections from this address are waiting for their"
                         f" A-ASSOCIATE-RQ ({key})")
        waiting = len(self.pending) + len(self.rejects)
        if waiting >= server.max_pending_connections:
            key = "server.max_pending_connections"
            return key, f"{waiting} connections are waiting for their A-ASSOCIATE-RQ ({key})"
        return None

    def _drop(self, sock: socket.socket, ip: str, key: str, reason: str) -> None:
        # RST, not FIN: a flood leaves no TIME_WAIT sockets behind here.
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        sock.close()
        self.dropped[key] += 1
        self.drops.note(ip, reason)

    def _end_pending(self, connection_id: int) -> None:
        ip = self.pending.pop(connection_id, None)
        if ip is not None:
            self.pending_per_address[ip] -= 1
            if self.pending_per_address[ip] <= 0:
                del self.pending_per_address[ip]

    def _worker_message(self, worker: WorkerSlot, message: object) -> None:
        if isinstance(message, AssociationReport):
            self.book.report(message)
            if message.ended:
                connection_id = message.state.connection_id
                # A probe the peer closed is no news; one we timed out is a drop.
                if message.probe and "timed out" in message.state.outcome:
                    ip = self.pending.get(connection_id)
                    if ip is not None:
                        self.dropped["server.acse_timeout"] += 1
                        self.drops.note(ip, "no A-ASSOCIATE-RQ within server.acse_timeout")
                self._release(worker, connection_id)
        elif isinstance(message, AdmissionRequest):
            self._admit(worker, message)

    def _stage_message(self, _child: Child, message: object) -> None:
        if isinstance(message, IndexerState):
            self.index_state = message

    def _admit(self, worker: WorkerSlot, request: AdmissionRequest) -> None:
        """An A-ASSOCIATE-RQ was read and accepted by negotiation: its
        connection stops being pending and takes an association slot, within
        server.max_associations and access.max_associations_per_aet (across
        all workers)."""
        self._end_pending(request.connection_id)
        limit = self.config.access.max_associations_per_aet
        most = self.config.server.max_associations
        ae = request.calling_ae_title
        if len(self.admitted) >= most:
            reply = AdmissionReply(
                connection_id=request.connection_id, admitted=False,
                reason=f"{len(self.admitted)} of {most} associations open (server.max_associations)",
            )
        elif limit and self.per_ae[ae] >= limit:
            reply = AdmissionReply(
                connection_id=request.connection_id, admitted=False,
                reason=f"{self.per_ae[ae]} of {limit} associations open for {ae!r} (access.max_associations_per_aet)",
            )
        else:
            self.per_ae[ae] += 1
            self.admitted[request.connection_id] = ae
            reply = AdmissionReply(connection_id=request.connection_id, admitted=True)
        try:
            worker.child.send(reply)
        except OSError:
            pass

    def _release(self, worker: WorkerSlot, connection_id: int) -> None:
        worker.open.discard(connection_id)
        if not worker.open:
            worker.idle_since = time.monotonic()
        self._end_pending(connection_id)
        ae = self.admitted.pop(connection_id, None)
        if ae is not None:
            self.per_ae[ae] -= 1
            if self.per_ae[ae] <= 0:
                del self.per_ae[ae]

    def _worker_exited(self, worker: WorkerSlot) -> str:
        """Its associations are aborted (the kernel closed their sockets): free their slots."""
        aborted = len(worker.open)
        for connection_id in list(worker.open):
            self.book.ended(connection_id)
            self._release(worker, connection_id)
        return f"{aborted} open associations aborted"

    # -- SIGHUP: reload the config ----------------------------------------------------

    def _reload(self) -> None:
        """Read the config again; put its live keys (config.LIVE_KEYS) in force, name the others.

        A config that does not load, or whose live part can't be used, is
        refused as a whole with one error line: the running config stays.
        """
        if self._load_config is None:
            log.error("config reload (SIGHUP) refused: this server was not started from a config source")
            return
        try:
            new = self._load_config()
            settings = live_settings(self.settings, new)
        except ConfigError as exc:  # it names the file
            log.error("config reload (SIGHUP) refused, the running config stays: %s", exc)
            return
        except StartupError as exc:
            log.error("config reload (SIGHUP) refused, the running config stays: %s: %s", self._config_file, exc)
            return
        changed = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)
                   if getattr(settings, f.name) is not getattr(self.settings, f.name)}
        message = Reconfigure(settings=pickle.dumps(changed), shutdown_timeout=new.server.shutdown_timeout)
        size = len(ENCODER.encode(message))
        if size > MESSAGE_MAX:
            log.error("config reload (SIGHUP) refused, the running config stays: the live settings take %d bytes, "
                      "more than a worker takes (%d; a long access.allowed_calling_aets?): restart to apply them",
                      size, MESSAGE_MAX)
            return
        live, restart = config_changes(self.config, new)
        self.config = with_live_keys(self.config, new)
        self.settings = settings  # for workers started from now on
        if "hooks" in live:
            self.hooks_link.update(self.config.hooks)
        for worker in self.workers.values():
            if worker.child.state == "down":
                continue  # its restart gets the new settings
            try:
                worker.child.send(message)
            except OSError as exc:  # it is dying: its replacement gets the new settings
                log.warning("worker %d did not take the reloaded config: %s", worker.index, exc)
        level = logging.getLevelName(self.config.logging.level)
        if level != self._log_level.value:
            self._log_level.value = level
            logs.set_level(self.config.logging.level)
            for child in self._all_children():
                if child is not self.children.get("forwarder"):  # it gets its own SIGHUP below
                    child.signal(signal.SIGHUP)
        self._reload_forwarder()
        log.info("config reloaded (SIGHUP): %s", f"{', '.join(live)} in force for new associations" if live
                 else "no key that applies live changed")
        if restart:
            log.warning("config reload (SIGHUP): %s changed but need a restart to take effect", ", ".join(restart))

    # -- rejecting while no worker runs ------------------------------------------

    def _begin_reject(self, sock: socket.socket, peer: str) -> None:
        sock.setblocking(False)
        self.rejects[sock] = PendingReject(sock, peer, time.monotonic() + REJECT_READ_TIMEOUT)
        self.selector.register(sock, selectors.EVENT_READ, "reject")

    def _reject_step(self, pending: PendingReject) -> None:
        try:
            chunk = pending.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        pending.data += chunk
        have_pdu = len(pending.data) >= 6 and len(pending.data) >= 6 + int.from_bytes(pending.data[2:6], "big")
        if chunk and not have_pdu and len(pending.data) < 65536:
            return
        called, calling = peek_ae_titles(bytes(pending.data))
        try:
            pending.sock.setblocking(True)
            pending.sock.settimeout(1.0)
            pending.sock.sendall(encode_associate_rj(REJECTED_TRANSIENT, SOURCE_PROVIDER_PRESENTATION, 2))
        except OSError:
            pass
        self.book.reject("local limit exceeded")
        log.warning(
            "association %s (%s) -> %s: rejected (local limit exceeded: no worker is running)",
            calling or "?", pending.peer, called or "?",
        )
        self._drop_reject(pending)

    def _drop_reject(self, pending: PendingReject) -> None:
        self.selector.unregister(pending.sock)
        del self.rejects[pending.sock]
        pending.sock.close()

    def _expire_rejects(self) -> None:
        now = time.monotonic()
        for pending in [p for p in self.rejects.values() if p.deadline < now]:
            self._drop_reject(pending)

    # -- stopping --------------------------------------------------------------------

    def _shutdown(self) -> int:
        assert self.listener is not None
        self.stopping = True
        self.selector.unregister(self.listener)
        self.listener.close()
        for pending in list(self.rejects.values()):
            self._drop_reject(pending)
        log.info(
            "stopping: no new associations; waiting up to %.0f s for %d open ones (signal again to stop now)",
            self.config.server.shutdown_timeout, self.open_associations,
        )
        for child in self._all_children():
            child.retire()  # nothing is restarted from now on
        for worker in self.workers.values():
            try:
                worker.child.send(Stop(now=False))
            except OSError:
                pass
        deadline = time.monotonic() + self.config.server.shutdown_timeout + 10
        handled = self.signals
        while any(w.child.alive for w in self.workers.values()):
            if self.signals > handled or time.monotonic() > deadline:
                log.warning("stopping now: aborting open associations")
                for worker in self.workers.values():
                    worker.child.kill()
                break
            for key, _events in self.selector.select(timeout=0.2):
                if callable(key.data):
                    key.data()
                elif isinstance(key.data, str):
                    self._housekeeping(key.data)
            self._publish()
        for worker in self.workers.values():
            worker.child.wait(time.monotonic() + 5)
        # A killed worker may leave temp files; never a file at a final path.
        self.storage.prepare()
        # In the reverse order of their start: the post-store stage's thumbnail
        # records go to the indexer; the monitor shows the stop to the end.
        for child in reversed(self.children.values()):
            child.stop()
        logs.receive(self._log_r)
        log.info("fastscp stopped")
        return 0

    def _reload_forwarder(self) -> None:
        """The forwarder reads the rules and destinations again itself (forward_main)."""
        forwarder = self.children.get("forwarder")
        if forwarder is not None:
            forwarder.signal(signal.SIGHUP)
        elif self.config.forwarding.destinations:
            log.warning("config reload (SIGHUP): forwarding.destinations: forwarding was off at start (no "
                        "destinations); restart to turn it on")

    # -- status ----------------------------------------------------------------------

    @property
    def monitor_url(self) -> str:
        monitor = self.children.get("monitor")
        return monitor.detail if monitor is not None else ""

    def _publish(self) -> None:
        """Send a status snapshot to the monitor, at most every SNAPSHOT_INTERVAL."""
        now = time.monotonic()
        monitor = self.children.get("monitor")
        if monitor is None or monitor.state != "running" or monitor.channel is None or now < self._next_snapshot:
            return
        self._next_snapshot = now + SNAPSHOT_INTERVAL
        server = self.config.server
        snapshot = self.book.snapshot(
            ae_title=server.ae_title, host=server.host, port=self._port,
            state="stopping" if self.stopping else "running",
            storage_root=self.storage.root, min_free_bytes=self.config.storage.min_free_bytes,
            index_path=self.config.index_path,
            index_committed=self.index_state.committed, index_lag=self.index_state.pending,
            index_kept_files=self.index_state.kept_files,
            workers=[
                WorkerState(index=w.index, pid=w.child.pid or 0, alive=w.child.alive,
                            # Admitted ones: a connection still pending is no association yet.
                            open_associations=sum(1 for c in w.open if c in self.admitted),
                            started=w.child.started_epoch, restarts=w.child.restarts)
                for w in self.workers.values()
            ],
            config=public_config(self.config),
        )
        snapshot.pending_connections = len(self.pending)
        snapshot.dropped_connections = dict(self.dropped)
        if "forwarder" in self.children:
            snapshot.forwarding = self._forward_status.poll(now, list(self.config.forwarding.destinations))
        snapshot.hooks = self.hooks_link.states()
        snapshot.poststore = self.hooks_link.stage if self.settings.poststore_address else None
        try:
            monitor.channel.send(SNAPSHOT_ENCODER.encode(snapshot), socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            pass  # the monitor is busy: it gets the next one
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                log.warning("status snapshot too large (%s); skipped", exc)
            # else it is exiting: its sentinel tells the loop

def tls_context(config: Config) -> ssl.SSLContext:
    """The server-side TLS context of ``tls``; StartupError names the bad key."""
    tls = config.tls
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    for key, path in (("tls.certificate", tls.certificate), ("tls.private_key", tls.private_key)):
        if not path:
            raise StartupError(f"{key} is empty; tls.enabled needs a certificate and its private key (PEM)")
        if not os.path.isfile(path):
            raise StartupError(f"{key}: {path}: no such file")
    try:
        context.load_cert_chain(tls.certificate, tls.private_key)
    except (ssl.SSLError, OSError) as exc:
        raise StartupError(f"tls.certificate/tls.private_key: cannot load {tls.certificate}: {exc}") from None
    if tls.ca_bundle:
        try:
            context.load_verify_locations(tls.ca_bundle)
        except (ssl.SSLError, OSError) as exc:
            raise StartupError(f"tls.ca_bundle: cannot load {tls.ca_bundle}: {exc}") from None
    if tls.require_client_certificate:
        if not tls.ca_bundle:
            raise StartupError("tls.require_client_certificate needs tls.ca_bundle to check client certificates")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def retrieve_service(config: Config, storage_root: str) -> RetrieveService:
    """C-MOVE and C-GET from the config (retrieve.*); StartupError names the bad key."""
    tls = config.tls
    client_tls = None
    if any(d.tls for d in config.retrieve.move_destinations.values()):
        try:
            client_tls = scu.tls_context(ca_bundle=tls.ca_bundle, certificate=tls.certificate,
                                         private_key=tls.private_key, min_version=tls.min_version)
        except scu.SCUError as exc:
            raise StartupError(f"retrieve.move_destinations (tls: true) uses the tls.* files: {exc}") from None
    remote = fetch_settings(config, storage_root, node_addresses(config.index_path, config.retrieve.node_timeout))
    return RetrieveService(
        select=selector(config.index_path, storage_root, limit=config.retrieve.max_instances,
                        node=remote.node if remote else ""),
        ae_title=config.server.ae_title,
        move_destinations={ae: Destination(d.host, d.port, client_tls if d.tls else None)
                           for ae, d in config.retrieve.move_destinations.items()},
        remote=remote,
    )


def node_address(config: Config, storage_root: str) -> NodeAddress | None:
    """Where the other nodes of a shared index fetch this node's files (None: an index file, one node).

    server.advertise_host, else server.host unless it is a wildcard, else this host's name.
    """
    lake = config.lake
    if lake is None:
        return None
    server = config.server
    host = server.advertise_host or (server.host if server.host not in ("", "0.0.0.0", "::") else socket.getfqdn())
    return NodeAddress(lake[2], host, server.port, server.ae_title, config.tls.enabled, os.path.realpath(storage_root),
                       config.storage.shared)


def public_config(config: Config) -> dict[str, object]:
    """The config for the status page: file paths of keys are shown, nothing secret is in it."""
    data = to_builtins(config)
    tls = data.get("tls")
    if isinstance(tls, dict) and tls.get("private_key"):
        tls["private_key"] = "(hidden)"
    for destination in data["forwarding"]["destinations"].values():  # type: ignore[union-attr]
        if destination["tls"]["private_key"]:
            destination["tls"]["private_key"] = "(hidden)"
    database = data["database"]
    # A libpq string may carry the catalog's password (password=... or postgresql://user:secret@host).
    database["catalog"] = re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)|(://[^:/@\s]+:)[^@\s]+@",  # type: ignore[index]
                                 lambda m: f"{m[1]}(hidden)" if m[1] else f"{m[3]}(hidden)@", database["catalog"])  # type: ignore[index]
    monitor = data.get("monitor")
    for key in ("password", "token"):
        if isinstance(monitor, dict) and monitor.get(key):
            monitor[key] = "(hidden)"
    return data


def live_settings(settings: ServiceSettings, config: Config) -> ServiceSettings:
    """``settings`` with what :data:`fastscp.config.LIVE_KEYS` set taken from ``config`` (a reload).

    Raises
    ------
    StartupError
        An access rule that can't be used (a host name that does not resolve).
    """
    try:
        access = build_access_policy(config.access.allowed_calling_aets)
    except AccessConfigError as exc:
        raise StartupError(str(exc)) from None
    policy = dataclasses.replace(settings.policy, storage_sop_classes=frozenset(config.sop_class_uids),
                                 max_pdu_size=config.server.max_pdu_size,
                                 check_called_aet=config.access.check_called_aet, access=access)
    if policy == settings.policy:
        policy = settings.policy
    replaced = {
        "policy": policy,
        "storage": settings.storage.reconfigured(duplicates=config.storage.duplicates,
                                                 min_free_bytes=config.storage.min_free_bytes),
        "acse_timeout": config.server.acse_timeout,
        "dimse_timeout": config.server.dimse_timeout,
        "action_log": config.logging.actions,
        "max_object_size": config.limits.max_object_size,
        "max_command_set": config.limits.max_command_set,
        "min_data_rate": config.limits.min_data_rate,
    }
    # Unchanged values stay the same objects: the reload hands workers only what changed.
    return dataclasses.replace(settings, **{k: v for k, v in replaced.items() if v != getattr(settings, k)})
