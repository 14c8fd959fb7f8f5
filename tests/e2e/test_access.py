"""Who may connect and how much: AE whitelists bound to addresses, called AE check,
per-AE limits, SOP class checks, timeouts, the free-space watermark, DICOM TLS,
and the log file."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE

from fastscp.config import AllowedAE
from fastscp.dicom.part10 import dataset_offset
from fastscp.dicom.synthetic import write_series
from fastscp.net.access import build_access_policy, peer_ip
from tests.conftest import dcmtk, wait_until
from tests.e2e.test_lifecycle import incoming
from tests.e2e.test_server import fastscp
from tests.rawscu import RawSCU

pytestmark = pytest.mark.dcmtk


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fastscp.yaml"
    path.write_text(text)
    return path


def associate(server, aet: str, aec: str | None = None):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", server.port, ae_title=aec or server.ae_title)


def rejection(server, aet: str, aec: str | None = None) -> tuple[int, int, int] | None:  # type: ignore[no-untyped-def]
    """(result, source, reason) of the A-ASSOCIATE-RJ the server answers, else None."""
    return RawSCU(server.port, CTImageStorage, ExplicitVRLittleEndian, aet=aet,
                  aec=aec or server.ae_title).rejection


@pytest.fixture
def ct_dataset(tmp_path: Path) -> tuple[str, bytes, Path]:
    (path,) = write_series(str(tmp_path / "ct"), 1, rows=64, columns=64)
    raw = Path(path).read_bytes()
    return str(pydicom.dcmread(path).SOPInstanceUID), raw[dataset_offset(raw):], Path(path)


def test_calling_ae_whitelist_bound_to_addresses(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = start_server(config=config(tmp_path, """
access:
  allowed_calling_aets:
    - ANYWHERE
    - {ae_title: LOOPBACK, hosts: [127.0.0.0/8]}
    - {ae_title: BY_NAME, hosts: [localhost]}
    - {ae_title: ELSEWHERE, hosts: [10.9.8.7, 192.0.2.0/24]}
"""))
    for allowed in ("ANYWHERE", "LOOPBACK", "BY_NAME"):
        assoc = associate(server, allowed)
        assert assoc.is_established, allowed
        assoc.release()
    # Unknown AE, and a known AE from the wrong address: "calling AE title not recognized".
    assert rejection(server, "STRANGER") == (1, 1, 3)
    assert rejection(server, "ELSEWHERE") == (1, 1, 3)
    # The workers log after they have answered (each forwards its own lines): wait for both.
    wait_until(lambda: "'ELSEWHERE' is not allowed from 127.0.0.1" in server.log_text(), what="the ELSEWHERE log")
    wait_until(lambda: "STRANGER (127.0.0.1:" in server.log_text(), what="the STRANGER log")
    assert "is not in access.allowed_calling_aets" in server.log_text()


def test_unresolvable_host_stops_start_up_naming_the_key(tmp_path: Path) -> None:
    path = config(tmp_path, "access:\n  allowed_calling_aets:\n    - {ae_title: X, hosts: [no-such-host.invalid]}\n")
    result = fastscp("serve", "0", "--config", str(path), "--storage-dir", str(tmp_path / "r"), "--monitor", "off")
    assert result.returncode == 2
    assert "access.allowed_calling_aets[0].hosts[0]: host 'no-such-host.invalid' does not resolve" in result.stderr


def test_called_ae_title_check(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = start_server(config=config(tmp_path, "access:\n  check_called_aet: true\n"))
    assert rejection(server, "SCU", aec="SOMEONE_ELSE") == (1, 1, 7)
    assoc = associate(server, "SCU")
    assert assoc.is_established
    assoc.release()


def test_per_calling_ae_limit_across_workers(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = start_server(config=config(tmp_path, "access:\n  max_associations_per_aet: 2\n"), workers=2)
    first, second = associate(server, "MODALITY"), associate(server, "MODALITY")
    assert first.is_established and second.is_established
    assert rejection(server, "MODALITY") == (2, 3, 2)
    other = associate(server, "OTHER")
    assert other.is_established, "the limit is per calling AE"
    other.release()
    first.release()
    wait_until(lambda: associate_and_release(server, "MODALITY"), what="the freed slot")
    second.release()
    wait_until(lambda: "access.max_associations_per_aet" in server.log_text(), what="the rejection log")


def associate_and_release(server, aet: str) -> bool:  # type: ignore[no-untyped-def]
    assoc = associate(server, aet)
    if assoc.is_established:
        assoc.release()
        return True
    return False


def test_data_set_of_another_sop_class_is_refused(server, ct_dataset) -> None:  # type: ignore[no-untyped-def]
    uid, data, _path = ct_dataset
    scu = RawSCU(server.port, MRImageStorage, ExplicitVRLittleEndian)
    assert scu.accepted
    assert scu.store(uid, data) == 0xA900  # a CT data set on an MR context
    scu.release()
    assert server.stored_files() == []
    assert incoming(server) == []


def test_stalled_peer_is_dropped_and_its_temp_file_removed(start_server, tmp_path: Path, ct_dataset) -> None:  # type: ignore[no-untyped-def]
    uid, data, _path = ct_dataset
    server = start_server(config=config(tmp_path, "server:\n  dimse_timeout: 1\n"))
    scu = RawSCU(server.port, CTImageStorage, ExplicitVRLittleEndian)
    scu.begin_store(uid)
    scu.send_data(data[:1000], last=False)
    wait_until(lambda: "timed out, aborted" in server.log_text(), timeout=20, what="the DIMSE timeout")
    assert incoming(server) == []
    assert server.stored_files() == []
    pdu_type, _ = scu.read_pdu()
    assert pdu_type == 0x07  # A-ABORT
    scu.close()


def test_free_space_watermark_refuses_then_resumes(start_server, small_disk, tmp_path: Path, ct_dataset) -> None:  # type: ignore[no-untyped-def]
    uid, data, _path = ct_dataset
    server = start_server(storage=small_disk / "received",
                          config=config(tmp_path, "storage:\n  min_free_bytes: 1500000\n"))
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * 2_000_000)  # leaves ~1 MB of 3 MB: below the watermark
    scu = RawSCU(server.port, CTImageStorage, ExplicitVRLittleEndian)
    assert scu.store(uid, data) == 0xA700
    assert server.stored_files() == [] and incoming(server) == []
    filler.unlink()
    assert scu.store(uid, data) == 0, "stores resume by themselves when space returns"
    scu.release()
    assert len(server.stored_files()) == 1


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path / "pki"
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=fastscp test CA", cwd=d)
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=fastscp test {name}", cwd=d)
        (d / f"{name}.ext").write_text(extension + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return d


def tls_config(tmp_path: Path, pki: Path, min_version: str = "1.2") -> Path:
    """A config for DICOM TLS with the test CA's server certificate, requiring client certificates."""
    return config(tmp_path, f"""
tls:
  enabled: true
  certificate: {pki / 'server.pem'}
  private_key: {pki / 'server.key'}
  ca_bundle: {pki / 'ca.pem'}
  require_client_certificate: true
  min_version: "{min_version}"
""")


def test_dicom_tls_with_client_certificates(start_server, tmp_path: Path, pki: Path, ct_dataset) -> None:  # type: ignore[no-untyped-def]
    _uid, _data, ct = ct_dataset
    server = start_server(config=tls_config(tmp_path, pki))
    tls = ["+tls", str(pki / "client.key"), str(pki / "client.pem"), "+cf", str(pki / "ca.pem")]
    dcmtk("echoscu", *tls, "-aec", server.ae_title, "127.0.0.1", str(server.port))
    dcmtk("storescu", *tls, "-aec", server.ae_title, "-xe", "127.0.0.1", str(server.port), str(ct))
    (stored,) = server.stored_files()
    assert stored.read_bytes()[dataset_offset(stored.read_bytes()):] == ct.read_bytes()[
        dataset_offset(ct.read_bytes()):]
    # No client certificate, or no TLS at all: no association.
    anonymous = dcmtk("echoscu", "+tla", "+cf", str(pki / "ca.pem"), "-aec", server.ae_title, "127.0.0.1",
                      str(server.port), check=False, timeout=60)
    assert anonymous.returncode != 0
    plain = dcmtk("echoscu", "-to", "5", "-ta", "5", "-aec", server.ae_title, "127.0.0.1", str(server.port),
                  check=False, timeout=60)
    assert plain.returncode != 0
    wait_until(lambda: server.log_text().count("TLS handshake failed") >= 2, what="the failed handshakes in the log")


def test_tls_config_errors_name_the_key(tmp_path: Path) -> None:
    path = config(tmp_path, f"tls:\n  enabled: true\n  certificate: {tmp_path / 'missing.pem'}\n  private_key: x\n")
    result = fastscp("serve", "0", "--config", str(path), "--storage-dir", str(tmp_path / "r"), "--monitor", "off")
    assert result.returncode == 2
    assert f"tls.certificate: {tmp_path / 'missing.pem'}: no such file" in result.stderr


def test_log_file_with_json_lines(start_server, tmp_path: Path, ct_dataset) -> None:  # type: ignore[no-untyped-def]
    _uid, _data, ct = ct_dataset
    log_file = tmp_path / "fastscp.log"
    server = start_server("--log-file", str(log_file), config=config(tmp_path, "logging:\n  format: json\n"))
    dcmtk("storescu", "-aec", server.ae_title, "-xe", "127.0.0.1", str(server.port), str(ct))
    assert server.stop() == 0
    entries = [json.loads(line) for line in log_file.read_text().splitlines()]
    loggers = {e["logger"] for e in entries}
    assert {"fastscp.supervisor", "fastscp.association", "fastscp.action", "fastscp.indexer"} <= loggers
    (action,) = [e for e in entries if e["logger"] == "fastscp.action"]
    assert action["message"].startswith("stored ") and "from STORESCU" in action["message"]
    assert action["process"].startswith("fastscp-worker-")
    (connection,) = [e for e in entries if e["logger"] == "fastscp.association"]
    assert "STORESCU (127.0.0.1:" in connection["message"] and "1 instances" in connection["message"]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["time"]) for e in entries)


def test_ipv4_mapped_peer_addresses_match_ipv4_networks() -> None:
    """A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d; they match the IPv4 rules."""
    policy = build_access_policy(["ANY", AllowedAE(ae_title="LAN", hosts=["10.1.0.0/16", "::1"])])
    assert policy.check("LAN", "::ffff:10.1.2.3") == ""
    assert policy.check("LAN", "10.1.2.3") == ""
    assert policy.check("LAN", "::1") == ""
    assert policy.check("LAN", "::ffff:10.2.0.1") == "calling AE title 'LAN' is not allowed from ::ffff:10.2.0.1"
    assert policy.check("LAN", "::ffff:a02:1") != ""  # the same address written in hex: still 10.2.0.1
    assert policy.check("ANY", "::ffff:192.0.2.1") == ""
    assert "not in access.allowed_calling_aets" in policy.check("OTHER", "::ffff:10.1.2.3")


def test_access_policy_edges() -> None:
    """A network written with host bits; a peer that is not an IP address; bracketed IPv6 peers."""
    policy = build_access_policy([AllowedAE(ae_title="LAN", hosts=["10.1.2.3/16"])])
    assert policy.check("LAN", "10.1.200.1") == ""
    assert policy.check("LAN", "not-an-ip") == "peer address 'not-an-ip' is not an IP address"
    assert peer_ip("[::1]:5000") == "::1" and peer_ip("[::ffff:10.1.2.3]:104") == "::ffff:10.1.2.3"
    assert peer_ip("10.1.2.3:104") == "10.1.2.3"
    by_name = build_access_policy([AllowedAE(ae_title="HERE", hosts=["localhost"])])  # resolved once, now
    assert by_name.check("HERE", "127.0.0.1") == "" and by_name.check("HERE", "10.0.0.1") != ""


def test_refused_presentation_contexts_are_logged(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server("--accept", "CT")
    scu = RawSCU(server.port, MRImageStorage, ExplicitVRLittleEndian, aet="MRSCU")
    assert scu.accepted  # A-ASSOCIATE-AC, its only context refused
    scu.release()
    log = server.wait_for_log("presentation contexts refused", "-> FASTSCP")
    assert "association 'MRSCU' (127.0.0.1:" in log
    assert "MR Image Storage (1.2.840.10008.5.1.4.1.1.4): abstract syntax not supported" in log
    (line,) = [entry for entry in log.splitlines() if "association MRSCU" in entry and "-> FASTSCP" in entry]
    assert "accepted with every presentation context refused" in line


def test_free_space_watermark_refusal_is_logged(start_server, tmp_path: Path, ct_dataset) -> None:  # type: ignore[no-untyped-def]
    uid, data, _path = ct_dataset
    server = start_server(config=config(tmp_path, "storage:\n  min_free_bytes: 1000000000000000000\n"))
    assert "below storage.min_free_bytes" in server.log_text(), "a start-up warning"
    scu = RawSCU(server.port, CTImageStorage, ExplicitVRLittleEndian)
    assert scu.store(uid, data) == 0xA700
    scu.release()
    log = server.wait_for_log("refused with 0xA700", "fastscp.action: refused")
    assert re.search(rf"WARNING .*C-STORE '{re.escape(uid)}' from 'RAWSCU' refused with 0xA700: free space", log)
    assert server.stored_files() == []


def test_stored_files_and_folders_are_owner_and_group_only(start_server, tmp_path: Path, ct_dataset) -> None:  # type: ignore[no-untyped-def]
    uid, data, _path = ct_dataset
    server = start_server()
    scu = RawSCU(server.port, CTImageStorage, ExplicitVRLittleEndian)
    assert scu.store(uid, data) == 0
    scu.release()
    (stored,) = server.stored_files()
    assert stored.stat().st_mode & 0o777 == 0o640
    folders = [p for p in stored.relative_to(server.storage).parents if p != Path(".")]
    assert folders and all((server.storage / p).stat().st_mode & 0o777 == 0o750 for p in folders)
    assert (server.storage / ".incoming").stat().st_mode & 0o777 == 0o750
    assert server.stop() == 0  # the next server uses the same index file

    other = tmp_path / "other"
    other.mkdir()
    server = start_server(storage=other / "received",
                          config=config(other, "storage:\n  file_mode: '0600'\n  dir_mode: 0700\n"))
    scu = RawSCU(server.port, CTImageStorage, ExplicitVRLittleEndian)
    assert scu.store(uid, data) == 0
    scu.release()
    (stored,) = server.stored_files()
    assert stored.stat().st_mode & 0o777 == 0o600
    assert stored.parent.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("modes", [("", 0o640), ("storage:\n  file_mode: '0600'\n  dir_mode: '0700'\n", 0o600)],
                         ids=["default", "0600"])
def test_the_index_and_the_log_file_are_no_more_open_than_the_images(start_server, tmp_path: Path, ct_dataset,
                                                                      modes) -> None:  # type: ignore[no-untyped-def]
    """They hold patient names too: DuckDB and the log handler create them under a umask from the storage modes."""
    text, expected = modes
    uid, data, _path = ct_dataset
    log_file = tmp_path / "fastscp.log"
    server = start_server(config=config(tmp_path, f"{text}logging:\n  file: {log_file}\n"))
    scu = RawSCU(server.port, CTImageStorage, ExplicitVRLittleEndian)
    assert scu.store(uid, data) == 0
    scu.release()
    assert server.stop() == 0
    assert {oct(p.stat().st_mode & 0o777) for p in (server.index, log_file)} == {oct(expected)}
