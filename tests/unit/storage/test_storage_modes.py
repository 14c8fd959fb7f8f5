"""The permission bits of what the storage area makes (storage.file_mode, storage.dir_mode: patient
data, owner and group only), whatever the process umask; and what a name collision reports."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from msgspec.structs import replace

from fastscp.storage.area import PATIENT_DATA, FileModes, Storage
from fastscp.storage.layout import LayoutOptions
from fastscp.storage.policy import Outcome
from tests.unit.storage.test_storage_area import CT, HEADER, UID, IndexSays, area, receive, store


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask() -> Iterator[None]:
    """A umask that would take the group's bits away: the modes must not depend on it."""
    old = os.umask(0o077)
    yield
    os.umask(old)


def test_config_strings_give_the_modes_and_the_umask_for_files_made_by_others() -> None:
    assert FileModes.of("0640", "0750") == PATIENT_DATA == FileModes(0o640, 0o750)
    assert FileModes.of("660", "2770") == FileModes(0o660, 0o2770)
    # DuckDB's index and WAL, the log file: no bit that neither mode has.
    assert PATIENT_DATA.umask() == 0o027
    assert FileModes(0o600, 0o700).umask() == 0o077
    assert FileModes(0o664, 0o2775).umask() == 0o002


@pytest.mark.usefixtures("umask")
@pytest.mark.parametrize("modes", [None, FileModes(0o660, 0o770)], ids=["defaults", "configured"])
def test_files_and_folders_get_exactly_their_modes(tmp_path: Path, modes: FileModes | None) -> None:
    """By default files 0640 and folders 0750; configured modes exactly, not narrowed by the umask
    (each folder the layout makes, the temp file, the stored and the quarantined file)."""
    expected = modes or FileModes(0o640, 0o750)
    storage = Storage(str(tmp_path / "root"), **({} if modes is None else {"modes": modes}))
    storage.prepare()
    assert (mode(storage.incoming_dir), mode(storage.quarantine_dir)) == (expected.folder, expected.folder)
    spare = storage.spare()
    assert spare is not None and mode(spare.path) == expected.file
    path, outcome = store(storage, b"data")
    assert outcome is Outcome.STORED
    assert mode(path) == expected.file
    assert path.relative_to(storage.root).parts[0] == "P1"
    folder = path.parent
    while folder != Path(storage.root):
        assert mode(folder) == expected.folder, folder
        folder = folder.parent
    incoming = receive(storage, b"garbage", "1.2.3.9")
    kept = incoming.quarantine("1.2.3.9: cannot understand")
    assert kept is not None and mode(kept) == expected.file
    spare.discard()


def test_a_collision_reports_the_instance_that_holds_the_layout_name(tmp_path: Path) -> None:
    """Stored under a name of its own, resent, or found through the index: the result names the file
    that holds its layout name and that file's SOP Instance UID (the warning an operator reads)."""
    storage = area(tmp_path / "root", layout=LayoutOptions(naming="template", template="{PatientID}/same.dcm"))
    holder, _ = store(storage, b"first")
    other = "1.2.826.0.1.3680043.8.498.2"
    header = replace(HEADER, sop_instance_uid=other)

    def place(**kwargs: object) -> tuple[str, Outcome, str, str]:
        incoming = receive(storage, b"second", other)
        try:
            committed = storage.store(incoming, header, CT, other, **kwargs)  # type: ignore[arg-type]
        finally:
            incoming.close()
        return committed.path, committed.outcome, committed.collided_path, committed.collided_uid

    own, outcome, collided, uid = place()
    assert (outcome, collided, uid) == (Outcome.STORED, str(holder), UID) and own != str(holder)
    assert place() == (own, Outcome.IDENTICAL, str(holder), UID)
    # Stored earlier under another name (a flat layout then): the index finds it; still a collision here.
    os.unlink(own)
    earlier, _ = store(area(tmp_path / "root"), b"second", header, affected=other)
    assert place(locate=IndexSays(f"{other}.dcm")) == (str(earlier), Outcome.IDENTICAL, str(holder), UID)
