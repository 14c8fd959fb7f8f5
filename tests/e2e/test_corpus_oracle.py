"""Oracle check of tests/corpus.py against dcmtk ``storescp +B``.

dcmtk's storescp in bit-preserving mode writes the received data set exactly
as it arrived, so it is the trusted receiver that tells us what an SCU
really puts on the wire.  These tests prove the corpus table both ways:

* every ``storescu_ok`` file arrives with identical data set bytes and the
  same transfer syntax when sent with ``corpus.storescu_command`` (batched:
  one storescu association per distinct ``storescu_args``);
* every other corpus file does *not* arrive unchanged from storescu (so the
  exclusions are real, not overly cautious);
* pynetdicom with ``STORE_SEND_CHUNKED_DATASET = True`` delivers every corpus
  file unchanged (one association, one context per (SOP class, TS) pair);
* corpus membership's "dcmtk can read it" rule agrees with dcmdump.

Matching received files to sources is by content ((data set bytes, TS)
multisets), so storescp's file naming and duplicate SOP Instance UIDs in the
corpus do not matter.
"""

from __future__ import annotations

import collections
import hashlib
import os
import shutil
import socket
import subprocess
import warnings

import pytest

try:  # tests/ as a package or as a rootdir-relative directory on sys.path
    from tests import corpus
    from tests.conftest import free_port, on_free_ports, stop_process, wait_for_port
except ImportError:  # pragma: no cover
    import corpus
    from conftest import free_port, on_free_ports, stop_process, wait_for_port

AE_TITLE = "FASTSCP"
DCMTK_TOOLS = ("storescp", "storescu", "dcmdump")
needs_dcmtk = pytest.mark.skipif(
    not all(shutil.which(t) for t in DCMTK_TOOLS), reason="dcmtk tools not installed"
)

CORPUS = corpus.corpus_files()
BATCHES = corpus.storescu_batches(CORPUS)


def _key(data: bytes, ts: str) -> tuple[str, int, str]:
    return hashlib.sha256(data).hexdigest(), len(data), ts


def _source_key(f: corpus.CorpusFile) -> tuple[str, int, str]:
    data, ts = corpus.dataset_bytes(f.path)
    assert ts == f.transfer_syntax_uid
    return _key(data, ts)


class Oracle:
    """A running ``storescp +B`` and the files it has written so far."""

    def __init__(self, proc: subprocess.Popen, port: int, outdir: str, log: str):
        self.proc, self.port, self.outdir, self.log = proc, port, outdir, log
        self._seen: set[str] = set()

    def take_new(self) -> list[tuple[str, tuple[str, int, str]]]:
        """(file name, key) of every file written since the last call."""
        names = set(os.listdir(self.outdir)) - self._seen
        self._seen |= names
        got = []
        for name in sorted(names):
            data, ts = corpus.dataset_bytes(os.path.join(self.outdir, name))
            got.append((name, _key(data, ts)))
        return got

    def log_tail(self) -> str:
        with open(self.log, errors="replace") as fh:
            return fh.read()[-3000:]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    if not all(shutil.which(t) for t in DCMTK_TOOLS):
        pytest.skip("dcmtk tools not installed")
    base = tmp_path_factory.mktemp("storescp_oracle")
    outdir = base / "received"
    outdir.mkdir()
    log = base / "storescp.log"
    argv = [
        "storescp",
        "+B",  # bit preserving: write the data set exactly as received
        "-pm",  # promiscuous: accept unknown SOP classes too
        "+xa",  # accept all transfer syntaxes dcmtk knows
        "+uf",  # unique file names (the corpus repeats SOP Instance UIDs)
        "-dhl",  # no reverse DNS lookups
        *("-aet", AE_TITLE),
        *("-ta", "10", "-td", "10"),  # bounded ACSE / DIMSE waits
        *("-od", str(outdir)),
    ]

    def start() -> tuple[subprocess.Popen, int]:
        port = free_port()
        with open(log, "w") as logfh:
            proc = subprocess.Popen(
                [*argv, str(port)],
                stdin=subprocess.DEVNULL,
                stdout=logfh,
                stderr=subprocess.STDOUT,
                env=corpus.storescu_env(),  # TCP_NODELAY=1 for storescp as well
            )
        try:
            wait_for_port(port, proc, log, timeout=10, ready="", what="storescp")
        except BaseException:
            stop_process(proc, 5)
            raise
        return proc, port

    proc, port = on_free_ports(start)
    try:
        yield Oracle(proc, port, str(outdir), str(log))
    finally:
        stop_process(proc, 5)


def _storescu(oracle: Oracle, files, extra=(), config=None) -> subprocess.CompletedProcess:
    argv = corpus.storescu_command(oracle.port, files, aec=AE_TITLE, extra=extra, config=config)
    return subprocess.run(
        argv, env=corpus.storescu_env(), capture_output=True, text=True, timeout=60
    )


@pytest.mark.dcmtk
@needs_dcmtk
@pytest.mark.parametrize("args", sorted(BATCHES), ids=lambda a: " ".join(a) or "default")
def test_storescu_delivers_byte_exact(oracle, args):
    files = BATCHES[args]
    oracle.take_new()
    result = _storescu(oracle, files)
    got = oracle.take_new()
    assert result.returncode == 0, result.stderr
    expected = collections.Counter(_source_key(f) for f in files)
    received = collections.Counter(key for _, key in got)
    missing = [f.name for f in files if _source_key(f) not in received]
    assert not missing, (
        f"{len(missing)}/{len(files)} files not received unchanged with {args}: {missing}\n"
        f"received TS: {collections.Counter(k[2] for _, k in got)}\n"
        f"storescu: {result.stderr[-2000:]}"
    )
    assert received == expected


@pytest.mark.dcmtk
@needs_dcmtk
def test_storescu_config_file_sends_all_in_one_association(oracle, tmp_path):
    """-xf with one single-TS context per (SOP class, TS) pair: one storescu."""
    files = [f for f in CORPUS if f.storescu_ok]
    config = tmp_path / "storescu.cfg"
    config.write_text(corpus.storescu_config(files))
    oracle.take_new()
    result = _storescu(oracle, files, config=config)
    got = oracle.take_new()
    assert result.returncode == 0, result.stderr
    received = collections.Counter(key for _, key in got)
    missing = [f.name for f in files if _source_key(f) not in received]
    assert not missing, (missing, result.stderr[-2000:])
    assert received == collections.Counter(_source_key(f) for f in files)


@pytest.mark.dcmtk
@needs_dcmtk
def test_storescu_really_changes_the_excluded_files(oracle):
    """The storescu_ok=False corpus files are not delivered unchanged."""
    groups: dict[tuple[str, ...], list[corpus.CorpusFile]] = {}
    for f in CORPUS:
        if not f.storescu_ok:
            assert f.reason, f.name
            groups.setdefault(f.storescu_args, []).append(f)
    assert groups
    unexpectedly_exact = []
    for _args, files in sorted(groups.items()):
        oracle.take_new()
        # -nh: keep going after a failed C-STORE (storescu then exits 0)
        _storescu(oracle, files, extra=("-nh",))
        received = {key for _, key in oracle.take_new()}
        unexpectedly_exact += [f.name for f in files if _source_key(f) in received]
    assert not unexpectedly_exact, (
        f"storescu delivered these unchanged, mark them storescu_ok: {unexpectedly_exact}"
    )


@pytest.mark.dcmtk
@needs_dcmtk
def test_pynetdicom_chunked_delivers_every_corpus_file(oracle, monkeypatch):
    from pynetdicom import AE, _config

    from fastscp.net.scu import associate

    # send the file's data set bytes as they are instead of re-encoding
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    pairs = sorted({(f.sop_class_uid, f.transfer_syntax_uid) for f in CORPUS})
    assert len(pairs) <= 128
    ae = AE(ae_title="PYNETDICOM")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for sop_class, ts in pairs:
        ae.add_requested_context(sop_class, ts)
    oracle.take_new()
    failed = []
    assoc = associate(ae, "127.0.0.1", oracle.port, ae_title=AE_TITLE)
    try:
        assert assoc.is_established, oracle.log_tail()
        assert not assoc.rejected_contexts, assoc.rejected_contexts
        # Nagle + delayed ACK cost ~45 ms per C-STORE otherwise
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for msg_id, f in enumerate(CORPUS, start=1):
            if not assoc.is_established:
                failed.append((f.name, "association gone: " + oracle.log_tail()))
                break
            status = assoc.send_c_store(f.path, msg_id=msg_id)
            if status.get("Status") != 0x0000:
                failed.append((f.name, status.get("Status")))
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
    assert not failed, failed
    received = collections.Counter(key for _, key in oracle.take_new())
    expected = collections.Counter(_source_key(f) for f in CORPUS)
    missing = [f.name for f in CORPUS if _source_key(f) not in received]
    assert not missing, missing
    assert received == expected


@pytest.mark.dcmtk
@needs_dcmtk
def test_dcmtk_readability_rule_matches_dcmdump():
    paths = [f.path for f in CORPUS]
    r = subprocess.run(
        ["dcmdump", "-q", *paths],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
    )
    errors = [line for line in r.stderr.splitlines() if line.startswith(("E:", "F:"))]
    assert r.returncode == 0 and not errors, errors
    unreadable = [
        f
        for f in corpus.corpus_files(include_excluded=True)
        if f.reason.startswith("dcmtk cannot read it")
    ]
    assert unreadable
    for f in unreadable:
        r = subprocess.run(["dcmdump", "-q", f.path], capture_output=True, text=True, timeout=30)
        assert r.returncode != 0, f"dcmdump reads {f.name}, which corpus.py excludes"


def test_dataset_offset_matches_pynetdicom_split_dataset():
    """dataset_bytes() splits where pynetdicom's chunked sender does."""
    from pathlib import Path

    from pynetdicom.dsutils import split_dataset

    checked = 0
    for f in corpus.corpus_files(include_excluded=True):
        try:
            data, _ = corpus.dataset_bytes(f.path)
        except corpus.NotPart10Error:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd File Meta in excluded files
            _, offset = split_dataset(Path(f.path))
        assert os.path.getsize(f.path) - offset == len(data), f.name
        checked += 1
    assert checked >= len(CORPUS)


def test_corpus_shape():
    """Cheap sanity checks on corpus.py's decisions (no dcmtk needed)."""
    assert len(CORPUS) >= 100
    names = {f.name for f in CORPUS}
    assert "CT_small.dcm" in names and "MR_small_implicit.dcm" in names
    assert all(f.storescu_args for f in CORPUS)
    assert all(f.reason for f in CORPUS if not f.storescu_ok)
    assert not any(f.reason for f in CORPUS if f.storescu_ok)
    for f in CORPUS:
        assert f.storescu_args == (corpus.STORESCU_TS_OPTION[f.transfer_syntax_uid],)
    with pytest.raises(ValueError):
        corpus.storescu_command(104, [BATCHES[("-xe",)][0], BATCHES[("-xi",)][0]])
