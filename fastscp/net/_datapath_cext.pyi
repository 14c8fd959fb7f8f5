"""Type stub of the compiled receive loop; the twin is ``fastscp/net/_datapath_py.py``."""

from fastscp.net.pdu import PDUStream

class DataPath:
    stream: PDUStream
    max_command_set: int
    context_id: int
    last: bool
    length: int
    content_hash: str
    command: bytes
    def __init__(self, stream: PDUStream, max_command_set: int) -> None: ...
    @property
    def errno(self) -> int: ...
    @property
    def fragment(self) -> memoryview: ...
    def to_file(self, fd: int, limit: int, prefix: bytearray, prefix_room: int, hash: bool = True,
                head: bytes = b"") -> None: ...
    def pump(self) -> int: ...
