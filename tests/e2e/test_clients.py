"""``fastscp send`` and ``fastscp echo`` against a real server: a report line per
file, refused SOP classes, non-DICOM files, closed ports, progress on a
terminal, DICOM TLS."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import MRImageStorage

from fastscp.dicom.synthetic import write_series
from tests.e2e.test_access import pki, tls_config  # noqa: F401  (pki: the test CA fixture)
from tests.e2e.test_server import assert_same_dataset, by_instance, fastscp

pytestmark = pytest.mark.dcmtk


def _send(server, *paths: str | Path, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    return fastscp("send", "127.0.0.1", str(server.port), *map(str, paths), "--aec", server.ae_title, *extra)


def _line(stdout: str, path: str | Path) -> str:
    (line,) = [line for line in stdout.splitlines() if line.startswith(f"{path}: ")]
    return line


def test_a_refused_sop_class_does_not_stop_the_others(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = start_server("--accept", "CT")
    folder = tmp_path / "study"
    # Sorted first, so the refused files come before the ones that can be stored.
    mr = write_series(str(folder / "a_mr"), 2, rows=16, columns=16, modality="MR", sop_class=MRImageStorage)
    ct = write_series(str(folder / "b_ct"), 3, rows=16, columns=16)
    (folder / "b_ct" / "notes.txt").write_text("not DICOM\n")

    result = _send(server, folder)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, "a refused file means not everything was stored"
    for path in mr:
        assert _line(result.stdout, path) == (f"{path}: MR Image Storage: "
                                              "refused: SOP class not accepted by the receiver")
    for path in ct:
        assert _line(result.stdout, path) == f"{path}: CT Image Storage: stored (0x0000 Success)"
    assert _line(result.stdout, folder / "b_ct" / "notes.txt").endswith(": skipped: not DICOM")
    assert "stored 3, failed 0, refused 2, skipped 1 (not DICOM)" in result.stdout
    stored = by_instance(server.stored_files())
    assert len(stored) == 3
    for path in ct:
        assert_same_dataset(Path(path), stored[str(pydicom.dcmread(path).SOPInstanceUID)])


def test_skipped_non_dicom_files_are_not_failures(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = start_server()
    ct = write_series(str(tmp_path / "ct"), 2, rows=16, columns=16)
    (tmp_path / "ct" / "DICOMDIR.txt").write_text("an index, not an image\n")
    (tmp_path / "ct" / "empty").write_bytes(b"")
    result = _send(server, tmp_path / "ct")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stored 2, failed 0, refused 0, skipped 2 (not DICOM)" in result.stdout
    assert len(server.stored_files()) == len(ct)


def test_a_named_file_that_does_not_exist_is_no_such_file(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = start_server()
    (ct,) = write_series(str(tmp_path / "ct"), 1, rows=16, columns=16)
    not_dicom = tmp_path / "named.txt"
    not_dicom.write_text("hello\n")
    missing = tmp_path / "nonexistent.dcm"
    result = _send(server, missing, not_dicom, ct)
    assert result.returncode == 1
    assert _line(result.stdout, missing) == f"{missing}: failed: no such file"
    assert _line(result.stdout, not_dicom) == f"{not_dicom}: failed: not a DICOM Part 10 file"
    assert _line(result.stdout, ct) == f"{ct}: CT Image Storage: stored (0x0000 Success)"
    assert "stored 1, failed 2, refused 0, skipped 0" in result.stdout
    (stored,) = server.stored_files()
    assert_same_dataset(Path(ct), stored)


def test_a_closed_port_is_connection_refused(tmp_path: Path, closed_port: int) -> None:
    port = closed_port
    (ct,) = write_series(str(tmp_path / "ct"), 1, rows=16, columns=16)
    for argv in (("echo", "127.0.0.1", str(port)), ("send", "127.0.0.1", str(port), ct)):
        result = fastscp(*argv)
        assert result.returncode == 1, result
        assert f"at 127.0.0.1:{port} (connection refused)" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert "stored 0, failed 1, refused 0, skipped 0" in result.stdout


def _run_in_pty(argv: list[str], timeout: float = 120) -> tuple[int, str]:
    """Run with stdout and stderr on a pseudo-terminal; returns (exit status, all output)."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
    os.close(terminal)
    output = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # EIO: every writer has closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            elif process.poll() is not None:
                break
        return process.wait(timeout=max(deadline - time.monotonic(), 1)), output.decode()
    finally:
        os.close(controller)
        if process.poll() is None:
            process.kill()
            process.wait()


def test_progress_on_a_terminal_plain_output_when_piped(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = start_server()
    files = write_series(str(tmp_path / "ct"), 6, rows=64, columns=64)
    argv = [sys.executable, "-m", "fastscp.cli", "send", "127.0.0.1", str(server.port), str(tmp_path / "ct"),
            "--aec", server.ae_title]
    status, output = _run_in_pty(argv)
    assert status == 0, output
    progress = re.findall(r"\r(\d+)/6 files, ([\d.]+ \w+) of ([\d.]+ \w+), ([\d.]+ \w+)/s", output)
    assert progress, output
    assert progress[-1][0] == "6", "the last progress line counts every file"
    assert "stored 6, failed 0" in output

    piped = fastscp(*argv[3:])
    assert piped.returncode == 0, piped.stderr
    assert "\r" not in piped.stdout + piped.stderr and "\x1b" not in piped.stdout + piped.stderr
    assert "files, " not in piped.stderr
    assert len(piped.stdout.splitlines()) == len(files) + 1  # a line per file and the summary


def test_echo_and_send_over_tls(start_server, tmp_path: Path, pki: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    server = start_server(config=tls_config(tmp_path, pki, min_version="1.3"))
    tls = ("--tls-ca-bundle", str(pki / "ca.pem"), "--tls-certificate", str(pki / "client.pem"),
           "--tls-private-key", str(pki / "client.key"))
    echo = fastscp("echo", "127.0.0.1", str(server.port), "--aec", server.ae_title, *tls)
    assert echo.returncode == 0, echo.stderr
    assert "status 0x0000" in echo.stdout
    ct = write_series(str(tmp_path / "ct"), 3, rows=32, columns=32)
    sent = _send(server, tmp_path / "ct", extra=(*tls, "--tls-min-version", "1.3"))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    stored = by_instance(server.stored_files())
    for path in ct:
        assert_same_dataset(Path(path), stored[str(pydicom.dcmread(path).SOPInstanceUID)])

    # Without our certificate the receiver refuses the handshake; without TLS there is no association.
    anonymous = fastscp("echo", "127.0.0.1", str(server.port), "--aec", server.ae_title,
                        "--tls-ca-bundle", str(pki / "ca.pem"))
    assert anonymous.returncode == 1 and "Traceback" not in anonymous.stderr, anonymous.stderr
    # A receiver whose certificate our CA bundle does not vouch for: no association.
    untrusted = fastscp("echo", "127.0.0.1", str(server.port), "--aec", server.ae_title, "--tls")
    assert untrusted.returncode == 1
    assert "TLS handshake failed: CERTIFICATE_VERIFY_FAILED" in untrusted.stderr, untrusted.stderr


def test_more_than_128_contexts_take_several_associations(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fastscp.dicom.sopclasses import STORAGE_SOP_CLASSES
    from fastscp.net.scu import MAX_CONTEXTS

    server = start_server(workers=1)
    classes = sorted(set(STORAGE_SOP_CLASSES.values()))[: MAX_CONTEXTS + 2]
    files = [path for i, uid in enumerate(classes)
             for path in write_series(str(tmp_path / f"{i:03d}"), 1, rows=4, columns=4, sop_class=uid)]
    result = _send(server, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"stored {MAX_CONTEXTS + 2}, failed 0, refused 0" in result.stdout
    log = server.wait_for_log("2 instances (0 failed")
    assert len(re.findall(r"association FASTSCU \(127\.0\.0\.1:\d+\) -> FASTSCP: accepted", log)) == 2
    assert f"; {MAX_CONTEXTS} instances (0 failed" in log
    stored = by_instance(server.stored_files())
    for path in files:
        assert_same_dataset(Path(path), stored[str(pydicom.dcmread(path).SOPInstanceUID)])


def test_a_failure_status_is_reported_by_its_name(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = start_server()
    good, bad = write_series(str(tmp_path / "ct"), 2, rows=8, columns=8)
    ds = pydicom.dcmread(bad)
    ds.SOPClassUID = MRImageStorage  # the File Meta (and so the context) still says CT
    ds.save_as(bad)
    result = _send(server, good, bad)
    assert result.returncode == 1
    assert _line(result.stdout, bad).startswith(f"{bad}: CT Image Storage: failed: 0xA900 Data set does not match "
                                                "SOP class")
    assert "stored 1, failed 1, refused 0, skipped 0" in result.stdout


def test_a_missing_tls_file_names_the_option(tmp_path: Path, closed_port: int) -> None:
    result = fastscp("echo", "127.0.0.1", str(closed_port), "--tls-ca-bundle", str(tmp_path / "missing.pem"))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"--tls-ca-bundle: cannot load {tmp_path / 'missing.pem'}" in result.stderr
