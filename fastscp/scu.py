"""C-ECHO and C-STORE service class users (``fastscp echo`` and ``fastscp send``), on pynetdicom."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pydicom
from pynetdicom import AE, Association, _config
from pynetdicom.sop_class import Verification

from fastscp.dimse import STATUS_NAMES

#: PS3.8 allows at most 128 presentation contexts in one A-ASSOCIATE-RQ.
MAX_CONTEXTS = 128


class SCUError(Exception):
    """The peer could not be reached or refused the association."""


def associate(ae: AE, host: str, port: int, **kwargs: Any) -> Association:
    """``ae.associate(host, port, **kwargs)``, with pynetdicom's reactor kept off our responses.

    pynetdicom pauses the association's reactor thread before a
    ``send_c_*()`` waits for its response, but the pause can race: the
    reactor may look paused while on its way out of the wait, take the
    response off the queue as an "unexpected" message, and leave the send
    waiting for the DIMSE timeout. A fast SCP makes it show (fastscp answers
    before it hashes). Responses the reactor takes go back on the queue.
    """
    assoc = ae.associate(host, port, **kwargs)
    serve = assoc._serve_request

    def serve_requests_only(message: Any, context_id: int) -> None:
        if message.is_valid_response and not message.is_valid_request:
            assoc.dimse.msg_queue.put((context_id, message))
        else:
            serve(message, context_id)

    assoc._serve_request = serve_requests_only  # type: ignore[method-assign]
    return assoc


def echo(host: str, port: int, *, aet: str = "FASTSCU", aec: str = "ANY-SCP", timeout: float = 30) -> int:
    """Send one C-ECHO; returns its status (0 is success)."""
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = associate(ae, host, port, ae_title=aec)
    if not assoc.is_established:
        raise SCUError(f"no association with {aec} at {host}:{port} ({_why(assoc)})")
    try:
        status = assoc.send_c_echo()
        if "Status" not in status:
            raise SCUError("no C-ECHO response (timed out or aborted)")
        return int(status.Status)
    finally:
        assoc.release()


@dataclass(frozen=True)
class Outgoing:
    path: str
    sop_class_uid: str
    transfer_syntax_uid: str


def iter_files(paths: Iterable[str]) -> Iterator[str]:
    """Files named, and every file below the folders named, in a stable order."""
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield os.path.join(root, name)
        else:
            yield path


def _describe(path: str) -> Outgoing | None:
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
        return Outgoing(path, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
    except Exception:
        return None


def _batches(files: list[Outgoing]) -> Iterator[list[Outgoing]]:
    """Split so that no association needs more than MAX_CONTEXTS contexts."""
    batch: list[Outgoing] = []
    contexts: set[tuple[str, str]] = set()
    for item in files:
        key = (item.sop_class_uid, item.transfer_syntax_uid)
        if key not in contexts and len(contexts) == MAX_CONTEXTS:
            yield batch
            batch, contexts = [], set()
        contexts.add(key)
        batch.append(item)
    if batch:
        yield batch


def send(host: str, port: int, paths: Iterable[str], *, aet: str = "FASTSCU", aec: str = "ANY-SCP",
         timeout: float = 60, out=sys.stdout) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """C-STORE every DICOM file named (folders recursively), unchanged.

    Each file travels in its own transfer syntax and its data set bytes are
    sent as they are on disk (pynetdicom's chunked send), never re-encoded.

    Returns
    -------
    tuple of int
        (stored, failed). Files that are not DICOM Part 10 count as failed.
    """
    _config.STORE_SEND_CHUNKED_DATASET = True
    files, failed = [], 0
    for path in iter_files(paths):
        item = _describe(path)
        if item is None:
            print(f"skipped {path}: not a DICOM Part 10 file", file=out)
            failed += 1
        else:
            files.append(item)
    stored = 0
    for batch in _batches(files):
        ae = AE(ae_title=aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        for sop_class, syntax in dict.fromkeys((f.sop_class_uid, f.transfer_syntax_uid) for f in batch):
            ae.add_requested_context(sop_class, [syntax])
        assoc = associate(ae, host, port, ae_title=aec, max_pdu=0)
        if not assoc.is_established:
            raise SCUError(f"no association with {aec} at {host}:{port} ({_why(assoc)})")
        try:
            for item in batch:
                status = assoc.send_c_store(item.path)
                code = int(status.Status) if "Status" in status else None
                if code == 0:
                    stored += 1
                    continue
                failed += 1
                why = STATUS_NAMES.get(code, f"0x{code:04X}") if code is not None else "no response"
                comment = f": {status.ErrorComment}" if "ErrorComment" in status else ""
                print(f"failed {item.path}: {why}{comment}", file=out)
                if code is None:
                    raise SCUError("association lost")
        finally:
            if assoc.is_established:
                assoc.release()
    return stored, failed


def _why(assoc) -> str:  # type: ignore[no-untyped-def]
    if assoc.is_rejected and assoc.acceptor.primitive is not None:
        p = assoc.acceptor.primitive
        from fastscp.negotiation import REJECT_REASONS
        return "rejected: " + REJECT_REASONS.get((p.result_source, p.diagnostic), str(p.diagnostic))
    return "refused or unreachable" if not assoc.is_aborted else "aborted"
