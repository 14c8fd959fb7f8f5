"""The server composed: what each child process of the supervisor runs, and :func:`serve`.

Each target is called in the forked child as ``target(channel, *args)``
(:class:`fastscp.runtime.child.ChildSpec`); ``channel`` is the child's end of
its socket pair with the supervisor. The supervisor takes them as a
:class:`~fastscp.runtime.supervisor.Targets` (:data:`TARGETS` here), so
tests run it with small fake children.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable

from fastscp.config import Config
from fastscp.forward.process import forward_main
from fastscp.index.database import Index, Lake, NodeAddress
from fastscp.index.indexer import Indexer, tune_gc
from fastscp.index.lake import LakeMaintenance
from fastscp.index.uidfilter import UidFilter
from fastscp.poststore.stage import poststore_main
from fastscp.query.server import query_services
from fastscp.runtime.child import ChildSpec
from fastscp.runtime.messages import ENCODER, Ready, StartFailed
from fastscp.runtime.supervisor import Supervisor, Targets
from fastscp.runtime.worker import worker_main

log = logging.getLogger("fastscp.indexer")

#: How often the indexer tells the supervisor its state (committed and pending records: the status page).
STATE_INTERVAL = 1.0


def indexer_process(channel: socket.socket, db_path: str, wal_mode: bool, address: str, batch_size: int,
                    batch_interval: float, storage_root: str | None = None, sr_root: str = "",
                    lake: tuple[str, str, str] | None = None, maintenance_interval: float = 0.0,
                    node: NodeAddress | None = None, uid_filter: UidFilter | None = None) -> None:
    """The indexer process: the record loop with the query servers as its services.

    Sends :class:`Ready` once the index is open and every socket bound, or
    :class:`StartFailed` with the reason; then its
    :class:`~fastscp.status.IndexerState` every :data:`STATE_INTERVAL`.
    ``storage_root`` (and ``sr_root``, ``storage.sr_directory``): reconcile
    the index with the files under it (in the background, after Ready);
    None skips the reconcile. ``lake``: the shared index (``Config.lake``), maintained every
    ``maintenance_interval`` seconds (``database.maintenance_interval``; 0: never) by one node at a time.
    ``node``: in a shared index, where the other nodes fetch this node's files (registered before Ready).
    ``uid_filter``: the supervisor's :class:`~fastscp.index.uidfilter.UidFilter`, kept up to date here.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tune_gc()
    try:
        os.makedirs(os.path.dirname(os.path.abspath(db_path)), exist_ok=True)
        index = Index(db_path, wal_mode=wal_mode, lake=Lake(*lake) if lake else None)
        try:
            indexer = Indexer(index, address, batch_size, batch_interval, storage_root=storage_root, sr_root=sr_root,
                              shared=uid_filter)
            indexer.services = list(query_services(indexer, db_path))
            if index.lake and maintenance_interval:
                indexer.services.append(LakeMaintenance(index, maintenance_interval))
        except BaseException:
            index.close()
            raise
    except Exception as exc:
        channel.send(ENCODER.encode(StartFailed(
            f"cannot open the index {db_path}: {exc} (is another fastscp using this database.path? "
            "DuckDB allows one process)")))
        return

    if node is not None:
        try:
            index.register_node(node)
        except Exception as exc:  # noqa: BLE001 - storing goes on; only the other nodes' fetches need it
            log.error("the shared index did not take this node's address (%s): other nodes can't fetch its files "
                      "until it restarts", exc)

    def stop(_signum: int, _frame: object) -> None:
        indexer.stop()

    signal.signal(signal.SIGTERM, stop)
    channel.send(ENCODER.encode(Ready()))
    threading.Thread(target=_push_state, args=(channel, indexer), name="fastscp-state", daemon=True).start()
    indexer.run()
    log.info("indexer stopped; %d instances committed", indexer.committed)
    gc.unfreeze()


def _push_state(channel: socket.socket, indexer: Indexer) -> None:
    stopped = threading.Event()
    while not stopped.wait(STATE_INTERVAL):
        try:
            channel.send(ENCODER.encode(indexer.state()), socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            pass  # the supervisor is busy: it gets the next one
        except OSError:
            return  # the supervisor is gone


class _Readiness:
    """The ``ready`` of :func:`fastscp.monitor.server.monitor_main` (its ``("ready", url)`` or
    ``("error", why)``) as :class:`Ready` or :class:`StartFailed` on the channel."""

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel

    def send(self, outcome: tuple[str, str]) -> None:
        kind, text = outcome
        self.channel.send(ENCODER.encode(Ready(text) if kind == "ready" else StartFailed(text)))

    def close(self) -> None:
        """The channel stays open: the snapshots come on it."""


def monitor_process(channel: socket.socket, listen: str, config: Config | None = None) -> None:
    """The monitor process: status snapshots come on the channel; it says Ready with its URL."""
    from fastscp.monitor.server import monitor_main  # its HTTP stack loads in this process only

    monitor_main(listen, channel, _Readiness(channel), config)  # type: ignore[arg-type]


def forwarder_stage(supervisor: Supervisor) -> ChildSpec | None:
    """The forwarder (:mod:`fastscp.forward`), when forwarding has destinations: workers hand it each
    stored instance (``ServiceSettings.forward_address``); it reads its rules again itself on SIGHUP."""
    if not supervisor.settings.forward_address:
        return None
    return ChildSpec(
        "forwarder", forward_main, lambda: (supervisor.config, supervisor._load_config, supervisor._config_file),
        about=f", queue {supervisor.config.forward_queue_path}", channel=False,
        stop_timeout=15,  # SIGTERM: it ends the C-STOREs in hand; the queue keeps the rest
        death_signal=signal.SIGTERM, priority=supervisor.config.server.derived_priority)


#: What the server's children run. A new kind of child is one more entry in ``stages``: a function
#: ``(supervisor) -> ChildSpec | None`` (:class:`~fastscp.runtime.supervisor.Targets`).
TARGETS = Targets(worker=worker_main, indexer=indexer_process, poststore=poststore_main, monitor=monitor_process,
                  stages=(forwarder_stage,))


def serve(config: Config, reload: Callable[[], Config] | None = None, config_file: str = "") -> int:
    """Run the server in the foreground; returns the exit code.

    ``reload`` reads the config again from its sources (``config_file`` and
    the command-line options it started with); SIGHUP calls it.

    Raises
    ------
    fastscp.runtime.supervisor.StartupError
        The server can't start (the message says why and what to do).
    """
    return Supervisor(config, TARGETS, reload, config_file).run()
