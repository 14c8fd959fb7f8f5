"""Config decoding: defaults, the reference file, overrides, and one clear error per mistake."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import yaml

from fastscp.config import (
    Config,
    ConfigError,
    config_changes,
    layout_options,
    load_config,
    to_builtins,
    with_live_keys,
)
from fastscp.dicom.sopclasses import MODALITY_SOP_CLASSES, STORAGE_SOP_CLASSES, resolve_sop_classes
from fastscp.storage.layout import Accounts, LayoutOptions, PatientFolders
from tests.conftest import REPO

REFERENCE = REPO / "config" / "fastscp.yaml"


def test_reference_file_documents_exactly_the_defaults() -> None:
    assert yaml.safe_load(REFERENCE.read_text()) == to_builtins(Config())
    assert load_config(str(REFERENCE)) == Config()


def test_embedded_default_needs_no_file() -> None:
    config = load_config()
    assert (config.server.port, config.server.ae_title) == (11112, "FASTSCP")
    assert config.storage.directory == "./received"
    assert config.index_path == "./received/index.duckdb"
    assert config.storage.fsync == "always"
    assert set(config.sop_class_uids) == set(STORAGE_SOP_CLASSES.values())


def test_command_line_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("server:\n  port: 4242\n  ae_title: FROMFILE\nstorage:\n  fsync: never\n")
    config = load_config(str(path), {"server.port": 5000, "server.ae_title": None})
    assert (config.server.port, config.server.ae_title, config.storage.fsync) == (5000, "FROMFILE", "never")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("server:\n  port: 70000\n", "server.port: Expected `int` <= 65535 (got 70000)"),
        ("server:\n  max_pdu_size: -1\n", "server.max_pdu_size: Expected `int` >= 0 (got -1)"),
        ("server:\n  prot: 104\n", "unknown key 'server.prot'"),
        ("sever:\n  port: 104\n", "unknown key 'sever'"),
        ("server:\n  port: abc\n", "server.port: Expected `int`, got `str`"),
        ("server:\n  workers: -2\n", "server.workers: Expected `int` >= 0"),
        ("server:\n  max_associations: 0\n", "server.max_associations: Expected `int` >= 1"),
        ("server:\n  ae_title: ''\n", "server.ae_title: Expected `str` of length >= 1"),
        ("server:\n  ae_title: WAY_TOO_LONG_AE_TITLE\n", "server.ae_title: Expected `str` of length <= 16"),
        # PS3.8 9.3.1: no backslash, no control characters, not all spaces.
        ("server:\n  ae_title: 'A\\B'\n", "server.ae_title: Expected `str` matching regex"),
        ("server:\n  ae_title: '    '\n", "server.ae_title: Expected `str` matching regex"),
        ("server:\n  ae_title: \"A\\tB\"\n", "server.ae_title: Expected `str` matching regex"),
        ("access:\n  allowed_calling_aets: [OK, 'X\\Y']\n",
         "access.allowed_calling_aets[1]: Expected `str` matching regex"),
        ("access:\n  allowed_calling_aets: [OK, '   ']\n", "(got '   ')"),  # the list element's value
        ("server:\n  port: -1\n", "server.port: Expected `int` >= 0 (got -1)"),
        ("server:\n  max_pdu_size: 67108865\n", "server.max_pdu_size: Expected `int` <= 67108864 (got 67108865)"),
        (
            "storage:\n  naming: template\n  template: '{PatientNmae}/{SOPInstanceUID}'\n",
            "storage.template: {PatientNmae}: 'PatientNmae' is not a keyword",
        ),
        ("storage:\n  naming: template\n  template: '{PatientID:x}'\n", "storage.template: {PatientID:x}: width"),
        (
            "storage:\n  fsync: sometimes\n",
            "storage.fsync: Invalid enum value 'sometimes' (got 'sometimes'); use one of 'always', 'never'",
        ),
        ("storage:\n  naming: random\n", "storage.naming"),
        ("accepted_sop_classes: [CT, XYZ]\n", "accepted_sop_classes: unknown SOP class or modality 'XYZ'"),
        ("accepted_sop_classes: CT\n", "accepted_sop_classes: Expected `array`, got `str`"),
        ("- just\n- a list\n", "the top level must be a mapping"),
        ("storage:\n  file_mode: 640\n", "storage.file_mode: Expected `str`"),
        ("storage:\n  dir_mode: rwx\n", "storage.dir_mode: Expected `str` matching"),
        ("storage:\n  file_mode: '0440'\n", "storage.file_mode: '0440' leaves the owner"),
        ("storage:\n  file_mode: '0400'\n", "storage.file_mode: '0400' leaves the owner (fastscp) without read and "
                                            "write permission; use at least '0600'"),
        ("storage:\n  dir_mode: '0600'\n", "storage.dir_mode: '0600' leaves the owner (fastscp) without read and "
                                           "write and search permission; use at least '0700'"),
        ("storage:\n  file_mode: 640\n", "storage.file_mode: "),  # decimal 640: not a mode
        ("server: [1\n", "not valid YAML"),
    ],
)
def test_bad_values_name_the_key_and_the_file(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(f"{path}: ")
    assert expected in str(info.value)


def test_bad_command_line_value_names_the_option() -> None:
    with pytest.raises(ConfigError, match=r"^command-line option --max-pdu-size: server.max_pdu_size: "):
        load_config(None, {"server.max_pdu_size": -5})
    with pytest.raises(ConfigError, match=r"^command-line option --accept: accepted_sop_classes: .*'BOGUS'"):
        load_config(None, {"accepted_sop_classes": ["CT", "BOGUS"]})


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config("/nonexistent/nope.yaml")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--config", "{bad}"], "server.port: Expected `int` <= 65535 (got 70000)"),
        (["70000"], "command-line option PORT: server.port"),
        (["--max-pdu-size", "-10"], "command-line option --max-pdu-size"),
        (["--accept", "CT,NOPE"], "'NOPE'"),
        (["--fsync", "maybe"], "command-line option --fsync: storage.fsync"),
    ],
)
def test_serve_exits_non_zero_with_the_message(tmp_path: Path, argv: list[str], expected: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  port: 70000\n")
    argv = [a.replace("{bad}", str(bad)) for a in argv]
    result = subprocess.run([sys.executable, "-m", "fastscp.cli", "serve", *argv,
                             "--storage-dir", str(tmp_path / "r")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("fastscp: config error: ")
    assert expected in result.stderr
    assert not (tmp_path / "r").exists(), "nothing is created for a bad config"


def test_accept_entries_resolve() -> None:
    ct = "1.2.840.10008.5.1.4.1.1.2"
    assert ct in resolve_sop_classes(["CT"])
    assert resolve_sop_classes(["CT Image Storage"]) == (ct,)
    assert resolve_sop_classes(["CTImageStorage"]) == (ct,)
    # Short forms of the standard's names, as other products' configs write them.
    assert resolve_sop_classes(["US Image Storage"]) == ("1.2.840.10008.5.1.4.1.1.6.1",)
    assert resolve_sop_classes(["US Multi-frame Image Storage"]) == ("1.2.840.10008.5.1.4.1.1.3.1",)
    assert resolve_sop_classes(["NM Image Storage", "PET Image Storage", "SC Image Storage"]) == (
        "1.2.840.10008.5.1.4.1.1.20", "1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.7")
    assert resolve_sop_classes(["DX Image Storage"]) == ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1")
    assert resolve_sop_classes([ct, "1.2.3.4"]) == (ct, "1.2.3.4")
    for modality in ("CT", "MR", "US", "CR", "DX", "MG", "NM", "PT", "XA", "RF", "SC", "SR", "RT"):
        assert MODALITY_SOP_CLASSES[modality], modality
    assert "1.2.840.10008.5.1.4.1.1.88.67" in resolve_sop_classes(["SR"])  # X-Ray Radiation Dose SR
    assert "1.2.840.10008.5.1.4.1.1.481.1" in resolve_sop_classes(["RT"])  # RT Image


def test_bounds_are_inclusive() -> None:
    assert load_config(None, {"server.port": 0}).server.port == 0  # 0: any free port
    assert load_config(None, {"server.max_pdu_size": 64 * 1024 * 1024}).server.max_pdu_size == 64 * 1024 * 1024


def test_derived_values(tmp_path: Path) -> None:
    """workers 0 (one per CPU), an empty file (the defaults), --monitor off, and the layout options."""
    assert load_config(None, {"server.workers": 0}).worker_count == (os.cpu_count() or 1)
    assert load_config(None, {"server.workers": 3}).worker_count == 3
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n")
    assert load_config(str(empty)) == Config()
    assert load_config(None, {"monitor.listen": "off"}).monitor.enabled is False
    assert load_config(None, {"monitor.listen": "127.0.0.1:9000"}).monitor.listen == "127.0.0.1:9000"
    site = tmp_path / "site.yaml"
    site.write_text("storage:\n  naming: accounts\n  patient_folders:\n    top: patient_name\n"
                    "  accounts:\n    physicians:\n      cardio: [SMITH^JOHN]\n    guest: Gast\n")
    assert layout_options(load_config(str(site))) == LayoutOptions(
        naming="accounts", template=Config().storage.template, patient_folders=PatientFolders(top="patient_name"),
        accounts=Accounts(physicians={"cardio": ("SMITH^JOHN",)}, guest="Gast"))


def test_reload_splits_live_keys_from_restart_keys() -> None:
    running = Config()
    new = load_config(None, {"server.dimse_timeout": 7, "server.port": 4242, "accepted_sop_classes": ["CT"]})
    new = msgspec.structs.replace(new, access=msgspec.structs.replace(new.access, allowed_calling_aets=["A"]))
    live, restart = config_changes(running, new)
    assert live == ["accepted_sop_classes", "access.allowed_calling_aets", "server.dimse_timeout"]
    assert restart == ["server.port"]
    assert config_changes(running, Config()) == ([], [])
    applied = with_live_keys(running, new)
    assert (applied.server.dimse_timeout, applied.accepted_sop_classes) == (7, ["CT"])
    assert applied.access.allowed_calling_aets == ["A"]
    assert applied.server.port == running.server.port  # needs a restart: not taken


@pytest.mark.parametrize(("text", "expected"), [
    ("storage:\n  file_mode: 0600\n  dir_mode: 0700\n", ("0600", "0700")),  # YAML reads 0600 as a number
    ("storage:\n  file_mode: '0644'\n", ("0644", "0750")),
])
def test_modes_in_octal(tmp_path: Path, text: str, expected: tuple[str, str]) -> None:
    path = tmp_path / "modes.yaml"
    path.write_text(text)
    storage = load_config(str(path)).storage
    assert (storage.file_mode, storage.dir_mode) == expected


@pytest.mark.parametrize("catalog, shown", [
    ("postgres:dbname=lake host=/run/pg password=s3cret user=fastscp",
     "postgres:dbname=lake host=/run/pg password=(hidden) user=fastscp"),
    ("postgres:host=db password = 'with space' dbname=lake", "postgres:host=db password = (hidden) dbname=lake"),
    ("postgres:postgresql://fastscp:s3cret@db/lake", "postgres:postgresql://fastscp:(hidden)@db/lake"),
    ("postgres:dbname=lake host=/run/pg", "postgres:dbname=lake host=/run/pg"),
])
def test_the_status_page_hides_the_catalogs_password(tmp_path: Path, catalog: str, shown: str) -> None:
    """The status page shows the config (/status.json); a libpq string may carry a password."""
    from fastscp.runtime.supervisor import public_config

    config = load_config(None, {"storage.directory": str(tmp_path), "database.catalog": catalog,
                                "database.data_path": str(tmp_path / "lake")})
    assert public_config(config)["database"]["catalog"] == shown  # type: ignore[index]
