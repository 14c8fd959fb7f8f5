"""Type stub of the compiled DIMSE command set codec; the twin is ``fastscp/net/_dimse_py.py``.

The functions take and give what the twin's do: their types are the twin's.
"""

from fastscp.net._dimse_py import decode_command_set as decode_command_set
from fastscp.net._dimse_py import encode_response as encode_response
from fastscp.net._dimse_py import is_uid as is_uid

def _load_tables() -> None: ...  # (re)reads the twin's tables; ImportError if they don't fit
