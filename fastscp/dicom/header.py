"""DICOM header scan: encoded dataset bytes in, the indexed attributes out.

The scan runs in the compiled module ``fastscp.dicom._header_cext`` (built from
``fastscp/dicom/_header_cext.pyx``) unless the environment sets ``FASTSCP_NO_EXTENSIONS=1``
or the module is not built; then the pure-Python twin
``fastscp.dicom._header_py`` runs, with the same results.  :data:`BACKEND` tells
which one :func:`parse_header` uses.

Example
-------
>>> fields = parse_header(dataset_bytes, "1.2.840.10008.1.2.1")  # doctest: +SKIP
>>> fields.sop_instance_uid, fields.pixel_data_offset  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO, Final, NamedTuple

from fastscp.dicom._header_py import HeaderError, HeaderFields, IncompleteHeader
from fastscp.dicom._header_py import parse_header as parse_header_py
from fastscp.dicom.backend import NO_EXTENSIONS, compiled
from fastscp.dicom.part10 import META_READ, read_file_meta

__all__ = [
    "NO_EXTENSIONS",
    "BACKEND",
    "FileHeader",
    "HeaderError",
    "HeaderFields",
    "IncompleteHeader",
    "parse_header",
    "parse_header_cext",
    "parse_header_py",
    "read_header_from",
]

ParseHeader = Callable[..., HeaderFields]

#: The compiled scanner; None if not built or if FASTSCP_NO_EXTENSIONS=1 (then
#: it is not even imported).
parse_header_cext: ParseHeader | None = compiled("fastscp.dicom._header_cext", "parse_header")

#: "cext" or "py": the implementation behind :func:`parse_header`.
BACKEND: Final = "cext" if parse_header_cext is not None else "py"

_parse: ParseHeader = parse_header_cext or parse_header_py


def parse_header(
    data: bytes | bytearray | memoryview, transfer_syntax_uid: str, *, complete: bool = True
) -> HeaderFields:
    """Extract the indexed attributes from an encoded DICOM dataset.

    The scan reads top-level data elements up to Pixel Data (7FE0,0010), or
    Float / Double Float Pixel Data (7FE0,0008) / (7FE0,0009), skipping
    sequences and private elements, and converts the values that
    :class:`HeaderFields` keeps as pydicom would.

    Parameters
    ----------
    data : bytes, bytearray or memoryview
        The dataset as received in a C-STORE: no preamble and no File Meta
        Information, encoded in `transfer_syntax_uid`.  A memoryview must be
        C-contiguous.
    transfer_syntax_uid : str
        The presentation context's transfer syntax.  Implicit VR Little
        Endian, Explicit VR Big Endian and the deflated syntaxes are told
        apart; every other one (all encapsulated syntaxes) has an Explicit VR
        Little Endian dataset.
    complete : bool, optional
        False when `data` may be only the first part of the dataset (the
        rest still arriving): running out of bytes before Pixel Data then
        raises :class:`IncompleteHeader` instead of :class:`HeaderError`, and
        the end of `data` is never taken for the end of the dataset.

    Returns
    -------
    HeaderFields
        The attributes found; ``pixel_data_offset`` is the offset in `data`
        of the pixel data element's tag, None if there is none or the
        dataset is deflated.

    Raises
    ------
    IncompleteHeader
        `complete` is False and `data` ends before Pixel Data.
    HeaderError
        The data is malformed or truncated; the message says what and at
        which byte offset.

    Notes
    -----
    Where real-world data bends the standard, the scan reads it as pydicom
    does, so that an image dcmtk or pydicom would accept still gets indexed:

    * odd value lengths are followed as they are;
    * the first element decides between implicit and explicit VR when it
      contradicts the transfer syntax, and an element whose VR bytes are not
      letters is read as implicit VR (pydicom's ``assume_implicit_vr_switch``);
    * UN with undefined length is a sequence in Implicit VR Little Endian;
    * a misspelt Specific Character Set is corrected with pydicom's warning.

    It is stricter where pydicom guesses: a value running past the end of
    the data is an error, not a short value; an IS value that is not an
    integer ("1.5") is None, and so is a DS value that is not finite; a
    Specific Character Set naming a Python codec that does not read ASCII
    as ASCII falls back to the default repertoire.
    """
    return _parse(data, transfer_syntax_uid, complete=complete)


class FileHeader(NamedTuple):
    """A Part 10 file's header as :func:`read_header_from` read it."""

    fields: HeaderFields  # ``pixel_data_offset`` is relative to ``dataset_offset``
    meta: dict[int, str]  # the File Meta text elements (fastscp.dicom.part10.read_file_meta)
    transfer_syntax_uid: str
    dataset_offset: int  # where the data set starts in the file


def read_header_from(file: BinaryIO) -> FileHeader:
    """The header of a Part 10 file, read in growing steps, never its pixel data.

    The one incremental header reader for files (the network path scans its
    receive buffer instead). The first read is 64 KiB, which holds the whole
    header of most objects, CT and MR included; a longer header (a large
    SR, enhanced multi-frame) doubles what is held until the scan reaches
    Pixel Data or the end of the file, so even long headers take few reads.

    Parameters
    ----------
    file : binary file
        Open at its start, buffered (``open(path, "rb")``): a short read
        means the end of the file. Its position afterwards is unspecified.

    Raises
    ------
    ValueError
        Not a Part 10 file (:func:`fastscp.dicom.part10.read_file_meta`).
    HeaderError
        A header fastscp cannot parse (a subclass of ValueError).
    OSError
        The file can't be read.
    """
    data = file.read(META_READ)
    at_end = len(data) < META_READ  # the whole file is in `data`
    meta, start = read_file_meta(data)
    transfer_syntax = meta[0x0010]
    while True:
        try:
            fields = parse_header(memoryview(data)[start:], transfer_syntax, complete=at_end)
            return FileHeader(fields, meta, transfer_syntax, start)
        except IncompleteHeader:  # only raised while complete=False
            wanted = len(data)
            more = file.read(wanted)
            at_end = len(more) < wanted
            data += more
