"""SIGHUP reloads the config: live keys apply to new associations, open ones carry on."""

from __future__ import annotations

import re
import signal
import socket
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from fastscp.config import LIVE_KEYS, config_changes, load_config, with_live_keys
from fastscp.dicom.part10 import dataset_offset
from fastscp.dicom.synthetic import write_series
from fastscp.net.scu import associate
from tests.conftest import REPO, dcmtk, wait_until
from tests.rawscu import RawSCU

pytestmark = pytest.mark.dcmtk


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory) -> tuple[str, bytes]:  # type: ignore[no-untyped-def]
    (path,) = write_series(str(tmp_path_factory.mktemp("reload")), 1, rows=128, columns=128)
    raw = Path(path).read_bytes()
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID), raw[dataset_offset(raw):]


def site_config(path: Path, allowed: list[str], *, extra: str = "") -> Path:
    path.write_text("access:\n  allowed_calling_aets: [" + ", ".join(allowed) + "]\n" + extra)
    return path


def echo(server, aet: str) -> bool:  # type: ignore[no-untyped-def]
    result = dcmtk("echoscu", "-aet", aet, "-aec", server.ae_title, "127.0.0.1", str(server.port), check=False)
    return result.returncode == 0


def reload(server, count: int) -> str:  # type: ignore[no-untyped-def]
    """SIGHUP; the log once the ``count``-th reload has been answered."""
    server.signal(signal.SIGHUP)
    wait_until(lambda: server.log_text().count("config reload") >= count, what=f"reload {count} in the log")
    assert server.process.poll() is None, server.log_text()
    return server.log_text()


def test_sighup_applies_access_lists_to_new_associations_and_open_ones_carry_on(start_server, tmp_path,
                                                                               ct_file) -> None:  # type: ignore[no-untyped-def]
    uid, data = ct_file
    config = site_config(tmp_path / "site.yaml", ["OPENAE"])
    server = start_server(config=config, workers=2)
    assert not echo(server, "NEWAE")
    # Open before the reload; its AE is taken off the list by it.
    open_one = RawSCU(server.port, CTImageStorage, ExplicitVRLittleEndian, aet="OPENAE")
    assert open_one.accepted
    open_one.begin_store(uid)
    open_one.send_data(data[: len(data) // 2], last=False)

    site_config(config, ["NEWAE"], extra="storage:\n  naming: flat\nserver:\n  max_associations: 5\n")
    log = reload(server, 1)
    assert "config reloaded (SIGHUP): access.allowed_calling_aets, server.max_associations in force" in log
    assert "config reload (SIGHUP): storage.naming changed but need a restart to take effect" in log
    assert echo(server, "NEWAE"), server.log_text()
    assert not echo(server, "OPENAE"), "a new association of a removed AE title is refused"
    # The open association finishes its object and stores more under its old settings.
    open_one.send_data(data[len(data) // 2:], last=True)
    assert open_one.read_status() == 0
    open_one.release()
    (stored,) = server.stored_files()
    assert stored.read_bytes()[dataset_offset(stored.read_bytes()):] == data
    assert stored.parent != server.storage, "storage.naming needs a restart: still hierarchical, not flat"
    assert server.stop() == 0


def test_a_bad_config_on_reload_is_refused_and_the_old_one_stays(start_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = site_config(tmp_path / "site.yaml", ["OLDAE"])
    server = start_server(config=config, workers=1)
    site_config(config, ["NEWAE"], extra="server:\n  prot: 104\n")
    log = reload(server, 1)
    refused = [line for line in log.splitlines() if "config reload (SIGHUP) refused" in line]
    assert len(refused) == 1, log
    assert f"{config}: unknown key 'server.prot'" in refused[0]
    assert echo(server, "OLDAE") and not echo(server, "NEWAE"), "the old config stays"
    # A value that loads but can't be used (a host name that does not resolve) is refused too.
    config.write_text("access:\n  allowed_calling_aets:\n    - ae_title: NEWAE\n"
                      "      hosts: [no-such-host.invalid]\n")
    log = reload(server, 2)
    refused = [line for line in log.splitlines() if "config reload (SIGHUP) refused" in line]
    assert len(refused) == 2, log
    assert f"{config}: access.allowed_calling_aets[0].hosts[0]: host 'no-such-host.invalid'" in refused[1]
    assert echo(server, "OLDAE") and not echo(server, "NEWAE")
    # And a good one afterwards is taken.
    site_config(config, ["NEWAE"])
    reload(server, 3)
    assert echo(server, "NEWAE") and not echo(server, "OLDAE")
    assert server.stop() == 0


def test_sighup_changes_the_log_level_of_the_workers(start_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "site.yaml"
    config.write_text("logging:\n  level: INFO\n")
    server = start_server(config=config, workers=1, monitor="127.0.0.1:0")
    server.wait_for_log("monitor started", "post-store stage started")
    children = server.children()
    assert len(children) == 4, children
    config.write_text("logging:\n  level: DEBUG\n")
    assert "logging.level in force" in reload(server, 1)
    # Every child takes the level (SIGHUP) and keeps running.
    time.sleep(0.5)
    assert server.children() == children
    # A connection that closes before any PDU is logged by the worker at DEBUG only.
    with socket.create_connection(("127.0.0.1", server.port)):
        pass
    server.wait_for_log("closed before any PDU")
    assert server.stop() == 0


def test_every_config_key_is_live_or_named_for_a_restart() -> None:
    running = load_config(None, {})
    new = load_config(None, {"server.max_associations": 3, "storage.naming": "flat", "access.check_called_aet": True,
                             "logging.level": "DEBUG", "server.port": 104})
    live, restart = config_changes(running, new)
    assert live == ["access.check_called_aet", "logging.level", "server.max_associations"]
    assert restart == ["server.port", "storage.naming"]
    in_force = with_live_keys(running, new)
    assert config_changes(in_force, new) == ([], restart)
    assert in_force.server.port == running.server.port and in_force.server.max_associations == 3
    assert all(key.split(".")[0] in running.__struct_fields__ for key in LIVE_KEYS)


def test_the_reference_config_marks_exactly_the_live_keys() -> None:
    """config/fastscp.yaml says [live] in the comment right above each key of LIVE_KEYS, and nowhere else."""
    marked: set[str] = set()
    section = ""
    comment: list[str] = []
    reference = REPO / "config" / "fastscp.yaml"
    for line in reference.read_text().splitlines():
        if line.lstrip().startswith("#"):
            comment.append(line)
            continue
        key = re.match(r"^( {0,2})([a-z_]+):", line)
        if key:
            name = key.group(2) if not key.group(1) else f"{section}.{key.group(2)}"
            if not key.group(1):
                section = name
            if any("[live]" in c for c in comment):
                marked.add(name)
        comment = []
    assert marked == LIVE_KEYS


def test_sighup_changes_limits_for_new_associations(start_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "site.yaml"
    config.write_text("server:\n  max_associations: 4\n  max_pdu_size: 65536\n")
    server = start_server(config=config, workers=1)
    first = RawSCU(server.port, CTImageStorage, ExplicitVRLittleEndian)
    second = RawSCU(server.port, CTImageStorage, ExplicitVRLittleEndian)
    assert first.accepted and second.accepted
    config.write_text("server:\n  max_associations: 1\n  max_pdu_size: 32768\n")
    assert "server.max_associations, server.max_pdu_size in force" in reload(server, 1)
    third = RawSCU(server.port, CTImageStorage, ExplicitVRLittleEndian)
    assert third.rejection == (2, 3, 2), "A-ASSOCIATE-RJ transient, local limit exceeded"
    # The two open before the reload go on.
    for scu in (first, second):
        scu.release()

    def admitted() -> bool:
        scu = RawSCU(server.port, CTImageStorage, ExplicitVRLittleEndian)
        if scu.accepted:
            scu.release()
            return True
        scu.close()
        return False

    wait_until(admitted, what="a free slot")
    ae = AE(ae_title="RELOADSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = associate(ae, "127.0.0.1", server.port, ae_title=server.ae_title)
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 32768, "the new Maximum Length Received"
    assoc.release()
    assert server.stop() == 0
