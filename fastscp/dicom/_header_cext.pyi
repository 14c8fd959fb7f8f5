"""Type stub of the compiled header scanner; the twin is ``fastscp/dicom/_header_py.py``."""

from fastscp.dicom._header_py import HeaderFields

def parse_header(
    data: bytes | bytearray | memoryview, transfer_syntax_uid: str, *, complete: bool = True
) -> HeaderFields: ...
