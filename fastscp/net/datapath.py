"""The data transfer phase's receive loop: compiled, or its pure-Python twin.

``fastscp.net._datapath_cext`` (built from ``fastscp/net/_datapath_cext.pyx``)
runs unless ``FASTSCP_NO_EXTENSIONS=1`` or it is not built; then
``fastscp.net._datapath_py``, with the same events and errors. A TLS
association always runs the twin: its bytes come through the ``ssl`` module,
not straight from the socket. See :mod:`fastscp.net._datapath_py` for the loop.
"""

from __future__ import annotations

import ssl
from typing import Any, Final

from fastscp.dicom.backend import compiled
from fastscp.net._datapath_py import COMMAND, DATA_SET, FRAGMENT, OTHER_PDU, PROGRESS, WRITE_FAILED
from fastscp.net._datapath_py import DataPath as DataPathPy
from fastscp.net.pdu import PDUStream

__all__ = ["BACKEND", "COMMAND", "DATA_SET", "FRAGMENT", "OTHER_PDU", "PROGRESS", "WRITE_FAILED", "DataPathCext",
           "DataPathPy", "data_path"]

#: The compiled loop; None if not built or FASTSCP_NO_EXTENSIONS=1 (then not even imported).
DataPathCext: Any = compiled("fastscp.net._datapath_cext", "DataPath")
#: "cext" or "py": the implementation :func:`data_path` gives a plain TCP association.
BACKEND: Final = "cext" if DataPathCext is not None else "py"


def data_path(stream: PDUStream, max_command_set: int) -> Any:
    """The receive loop for ``stream``'s association (:class:`DataPathPy`'s interface)."""
    if DataPathCext is None or isinstance(stream.sock, ssl.SSLSocket):
        return DataPathPy(stream, max_command_set)
    return DataPathCext(stream, max_command_set)
