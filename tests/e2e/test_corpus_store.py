"""pydicom's test corpus through fastscp: every valid storage object, in its own
transfer syntax, stored with data set bytes identical to the source's.

``tests/corpus.py`` says which files are valid Part 10 storage objects and how
storescu must be driven to send a file unchanged (proved against dcmtk's
bit-preserving storescp by ``test_corpus_oracle.py``). The corpus reuses some
SOP Instance UIDs, so files are sent in rounds of distinct UIDs, and the
storage is emptied between rounds.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from fastscp.net.scu import associate, send
from tests import corpus

pytestmark = pytest.mark.dcmtk
CORPUS = corpus.corpus_files()


def rounds(files: list[corpus.CorpusFile], uid: Callable[[corpus.CorpusFile], str]) -> list[list[corpus.CorpusFile]]:
    """Split files into rounds in which no SOP Instance UID repeats: neither ``uid`` nor the data
    set's (fastscp treats either as the instance's, so a repeat would be a duplicate)."""

    def uids(f: corpus.CorpusFile) -> set[str]:
        return {uid(f), f.sop_instance_uid}

    out: list[list[corpus.CorpusFile]] = []
    for f in files:
        for group in out:
            if all(not uids(g) & uids(f) for g in group):
                group.append(f)
                break
        else:
            out.append([f])
    return out


def check_round(server, files: list[corpus.CorpusFile], uid: Callable[[corpus.CorpusFile], str]) -> None:  # type: ignore[no-untyped-def]
    stored = {p.stem: p for p in server.stored_files()}
    assert sorted(stored) == sorted(uid(f) for f in files), server.log_text()[-3000:]
    for f in files:
        path = stored[uid(f)]
        got, got_ts = corpus.dataset_bytes(path)
        want, want_ts = corpus.dataset_bytes(f.path)
        assert got_ts == want_ts == f.transfer_syntax_uid, f.name
        assert got == want, f"{f.name}: stored data set differs from the source"
        meta = pydicom.filereader.read_file_meta_info(path)
        assert meta.MediaStorageSOPClassUID == f.sop_class_uid, f.name
        assert meta.MediaStorageSOPInstanceUID == uid(f), f.name
        path.unlink()


def test_corpus_is_large_and_covers_every_transfer_syntax() -> None:
    # Guards the tests below against silently shrinking to nothing.
    syntaxes = {f.transfer_syntax_uid for f in CORPUS}
    assert len(CORPUS) >= 140
    assert {
        "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5",
    } <= syntaxes
    assert sum(f.storescu_ok for f in CORPUS) >= 110


def test_every_corpus_file_via_pynetdicom_is_stored_byte_exact(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server("--naming", "flat", "--fsync", "never")
    uid = lambda f: f.meta_sop_instance_uid  # noqa: E731 - pynetdicom sends the File Meta's UID
    for group in rounds(CORPUS, uid):
        sent = send("127.0.0.1", server.port, [f.path for f in group], aec=server.ae_title, out=None)
        assert (sent.stored, sent.failed, sent.refused) == (len(group), 0, 0), sent.error
        check_round(server, group, uid)


def test_storescu_sends_corpus_files_in_their_own_transfer_syntax(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = start_server("--naming", "flat", "--fsync", "never")
    ok = [f for f in CORPUS if f.storescu_ok]
    uid = lambda f: f.sop_instance_uid  # noqa: E731 - storescu sends the data set's UID
    for number, group in enumerate(rounds(ok, uid)):
        config = tmp_path / f"storescu-{number}.cfg"
        config.write_text(corpus.storescu_config(group))
        argv = corpus.storescu_command(server.port, group, aec=server.ae_title, config=config)
        result = subprocess.run(argv, env=corpus.storescu_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        check_round(server, group, uid)


def test_sender_preferred_transfer_syntax_wins(server) -> None:  # type: ignore[no-untyped-def]
    from pynetdicom import AE

    ae = AE(ae_title="PREFS")
    ct = "1.2.840.10008.5.1.4.1.1.2"
    jpeg_ls, explicit, implicit = "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
    ae.add_requested_context(ct, [jpeg_ls, explicit, implicit])
    ae.add_requested_context(ct, [implicit, explicit])
    ae.add_requested_context(ct, ["1.2.3.4.5.6", implicit])
    assoc = associate(ae, "127.0.0.1", server.port, ae_title=server.ae_title)
    assert assoc.is_established
    assert [str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts] == [jpeg_ls, implicit, implicit]
    assoc.release()
