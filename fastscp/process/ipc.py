"""Local sockets between fastscp's processes (Unix SOCK_SEQPACKET, one message each).

They live in the abstract namespace, named after the index file's absolute
path, so any process that knows the index (a worker, ``fastscp query``) can
find the server that owns it and a long storage path can't overflow
``sun_path``. Abstract sockets have no file permissions, so listeners accept
only peers of their own user (or root).
"""

from __future__ import annotations

import hashlib
import os
import selectors
import socket
import struct
import threading
from collections.abc import Callable, Iterator

_PEERCRED = struct.Struct("3i")


def local_address(kind: str, index_path: str) -> str:
    """The abstract socket name of one of a server's services ("indexer", "query", ...)."""
    digest = hashlib.sha1(os.path.abspath(index_path).encode()).hexdigest()[:16]
    return f"\0fastscp-{kind}-{digest}"


def listen(address: str, backlog: int = 128, *, blocking: bool = False) -> socket.socket:
    """A SOCK_SEQPACKET listener bound to ``address``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(address)
    sock.listen(backlog)
    sock.setblocking(blocking)
    return sock


def same_user(conn: socket.socket) -> bool:
    """True if the peer runs as our user (or root)."""
    try:
        _pid, uid, _gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except OSError:
        return False
    return uid in (os.getuid(), 0)


def accept_local(listener: socket.socket) -> socket.socket | None:
    """The next pending connection of our own user, non-blocking; None when there is none."""
    while True:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return None
        if same_user(conn):
            conn.setblocking(False)
            return conn
        conn.close()


#: Largest message :func:`receive` takes whole (a longer datagram is cut).
MAX_MESSAGE = 1 << 20
_buffers = threading.local()


def receive(conn: socket.socket) -> bytes | None:
    """The next message of a non-blocking connection: b"" if none waits, None at EOF.

    PERF: ``recv(1 MiB)`` allocates (and maps) 1 MiB for every ~1 KiB record;
    that was 21% of the indexer's time under a flood of records. One buffer
    per thread, and a copy of just the message, instead.
    """
    buffer = getattr(_buffers, "buffer", None)
    if buffer is None:
        buffer = _buffers.buffer = memoryview(bytearray(MAX_MESSAGE))
    try:
        n = conn.recv_into(buffer)
    except BlockingIOError:
        return b""
    except OSError:
        return None
    return bytes(buffer[:n]) if n else None



def drain(conn: socket.socket, selector: selectors.BaseSelector,
          more: Callable[[], bool] = lambda: True) -> Iterator[bytes]:
    """The messages waiting on a non-blocking connection registered with ``selector``, while ``more()``;
    at EOF the connection is unregistered and closed."""
    while more():
        data = receive(conn)
        if data == b"":
            return
        if data is None:
            selector.unregister(conn)
            conn.close()
            return
        yield data
