"""The supervisor's link to the post-store process, for the hooks.

One Unix SOCK_SEQPACKET pair per post-store process, made by the supervisor
when it starts one: the supervisor sends the hooks of a reloaded config
(:class:`HooksUpdate`, SIGHUP), the post-store process sends its hooks'
counts and its backlog (:class:`HooksReport`, about twice a second while
they change) for the status page and /metrics. Both ends are non-blocking; a message that
does not fit is dropped (the next report replaces it; a reload is logged).
"""

from __future__ import annotations

import logging
import socket

import msgspec

from fastscp.config import HookConfig
from fastscp.process.ipc import receive
from fastscp.status import HookState, PostStoreState

log = logging.getLogger("fastscp.hooks")


class HooksUpdate(msgspec.Struct, frozen=True, tag="hooks-update"):
    hooks: list[HookConfig]


class HooksReport(msgspec.Struct, frozen=True, tag="hooks-report"):
    hooks: list[HookState]
    #: The post-store process's backlog (the status page's "post-store lag").
    stage: PostStoreState | None = None


ENCODER = msgspec.msgpack.Encoder()
DECODER = msgspec.msgpack.Decoder(HooksUpdate | HooksReport)


class HooksLink:
    """The supervisor's end."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.latest: list[HookState] = []
        #: The post-store process's backlog as it last reported it.
        self.stage: PostStoreState | None = None

    def open(self) -> socket.socket:
        """A new pair for a post-store process about to start; returns its end (close it once it has forked)."""
        self.close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        self.sock = ours
        return theirs

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def update(self, hooks: list[HookConfig]) -> None:
        """Hand the post-store process a reloaded config's hooks."""
        if self.sock is None:
            log.warning("hooks changed, but no post-store process runs (thumbnails, scan sheets and hooks were all "
                        "off at start): restart fastscp to run them")
            return
        try:
            self.sock.send(ENCODER.encode(HooksUpdate(hooks)))
        except OSError as exc:
            log.error("the post-store process did not take the reloaded hooks (%s): restart fastscp to apply them", exc)

    def states(self) -> list[HookState]:
        """The hooks' counts as the post-store process last reported them."""
        while self.sock is not None:
            data = receive(self.sock)
            if not data:
                break  # none waiting; at EOF, a restarted post-store process gets a new pair
            message = DECODER.decode(data)
            if isinstance(message, HooksReport):
                self.latest, self.stage = message.hooks, message.stage
        return self.latest
