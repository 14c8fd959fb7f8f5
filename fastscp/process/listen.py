"""Why a listening socket could not be bound, in words that lead to the fix.

The DICOM port (``server.port``) and the status page (``monitor.listen``)
fail the same ways; only the key to change differs.
"""

from __future__ import annotations

import errno

#: Ports below this need root or CAP_NET_BIND_SERVICE (Linux's ip_unprivileged_port_start default).
FIRST_UNPRIVILEGED_PORT = 1024


def bind_advice(exc: OSError, port: int, key: str, off: str = "") -> str:
    """What to do about ``exc`` from ``bind()`` of ``port``, set by the config key ``key``.

    Parameters
    ----------
    exc : OSError
        The error of ``bind()``.
    port : int
        The port we tried.
    key : str
        The config key that chose it, e.g. ``server.port``.
    off : str, optional
        How to do without the listener, e.g. ``monitor.enabled: false``.
    """
    if exc.errno in (errno.EACCES, errno.EPERM) and 0 < port < FIRST_UNPRIVILEGED_PORT:
        return (f"port {port} is below {FIRST_UNPRIVILEGED_PORT}: binding it needs root or the CAP_NET_BIND_SERVICE "
                "capability (systemd: AmbientCapabilities=CAP_NET_BIND_SERVICE); or set "
                f"{key} to a port from {FIRST_UNPRIVILEGED_PORT} up")
    if exc.errno == errno.EADDRINUSE:
        return (f"another process (another fastscp or DICOM receiver?) listens on this port: stop it, or set {key} "
                f"to a free port{', or turn it off with ' + off if off else ''}")
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"the address is not one of this machine's: check {key}"
    return f"check {key}"
