"""The test process's pynetdicom sockets are closed when their peer is gone (tests/conftest.py)."""

from __future__ import annotations

import queue
import socket
import time
from types import SimpleNamespace

from pynetdicom.transport import AssociationSocket


def test_a_socket_whose_peer_reset_it_is_closed() -> None:
    """After a reset, ``shutdown`` raises ENOTCONN; pynetdicom's own close then left the socket open
    for the garbage collector (a ResourceWarning pytest blames on another test)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname())
        theirs, _ = listener.accept()
    theirs.sendall(b"x")
    time.sleep(0.05)
    ours.sendall(b"unread")  # closed with data unread: the peer resets the connection
    time.sleep(0.05)
    theirs.close()
    time.sleep(0.05)
    association = SimpleNamespace(dul=SimpleNamespace(event_queue=queue.Queue()))  # what it reads of its own
    transport = AssociationSocket(association, client_socket=ours)  # type: ignore[arg-type]
    try:
        transport.close()
        assert ours.fileno() == -1
    finally:
        ours.close()
