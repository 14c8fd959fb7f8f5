"""KeptFiles (fastscp.process.kept): how a lagging process (the indexer, the post-store stage) takes back
the files of records workers kept for it: oldest first, on its schedule, and what a folder it can't read
costs (one warning a minute, nothing taken, nothing lost). Real files in a real folder."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from fastscp.process.kept import CHECK_INTERVAL, RETRY_AFTER_ERROR, SET_ASIDE, KeptFiles, kept_files, write_kept
from fastscp.storage.files import TEMP_PREFIX


def test_files_are_taken_back_oldest_first_each_whole_and_removed(tmp_path: Path) -> None:
    folder = tmp_path / "backlog"
    folder.mkdir()
    first = write_kept(str(folder), [b"a", b"bb"])
    second = write_kept(str(folder), [b"ccc"])
    (folder / f"{TEMP_PREFIX}torn").write_bytes(b"\x05")  # a file still being written: never taken
    kept = KeptFiles(str(folder), "indexer")
    assert kept.count() == 2
    assert kept.take_oldest(100.0) == (first, [b"a", b"bb"])
    assert not os.path.exists(first)
    # Right after a file was taken, the next one is due at once.
    assert kept.take_oldest(100.0) == (second, [b"ccc"])
    assert kept.take_oldest(100.0) is None
    assert kept.count() == 0 and kept_files(str(folder)) == []


def test_a_clock_set_back_never_names_a_newer_file_before_an_older_one(tmp_path: Path) -> None:
    """Files are taken by name: one written before the clock went back an hour is still taken first, and a
    receiver's unread socket at its stop (``first``) still before both."""
    hour = 3600 * 10**9
    older = write_kept(str(tmp_path), [b"older"])
    ahead = Path(write_kept(str(tmp_path), [b"ahead"]))
    stamp, rest = ahead.name.split("-", 1)
    ahead = ahead.rename(ahead.with_name(f"{int(stamp) + hour:019d}-{rest}"))  # written an hour ahead
    newer = write_kept(str(tmp_path), [b"newer"])
    unread = write_kept(str(tmp_path), [b"unread"], first=True)  # before ``older``, not just before now
    assert kept_files(str(tmp_path)) == [os.path.basename(p) for p in (unread, older, ahead, newer)]
    kept = KeptFiles(str(tmp_path), "indexer")
    assert [kept.take_oldest(100.0, at_once=True)[1] for _ in range(4)] == [[b"unread"], [b"older"], [b"ahead"],
                                                                            [b"newer"]]


def test_an_empty_folder_is_looked_at_once_per_check_interval_unless_at_once(tmp_path: Path) -> None:
    kept = KeptFiles(str(tmp_path), "post-store")
    assert kept.take_oldest(10.0) is None  # looked: nothing there
    path = write_kept(str(tmp_path), [b"x"])
    assert kept.take_oldest(10.0 + CHECK_INTERVAL - 0.01) is None  # not due yet
    assert kept.take_oldest(10.0 + CHECK_INTERVAL - 0.01, at_once=True) == (path, [b"x"])
    path = write_kept(str(tmp_path), [b"y"])
    assert kept.take_oldest(10.0 + CHECK_INTERVAL) == (path, [b"y"])


def test_no_folder_is_no_files(tmp_path: Path) -> None:
    kept = KeptFiles(str(tmp_path / "never-made"), "indexer")
    assert kept.count() == 0
    assert kept.take_oldest(0.0) is None


def test_a_folder_that_cannot_be_read_warns_once_a_minute_and_counts_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "backlog"
    folder.write_bytes(b"")  # a file where the folder should be: listing it fails whoever we are
    kept = KeptFiles(str(folder), "indexer", "the next start's reconcile indexes their files")
    _unreadable(kept, caplog)
    assert kept.count() == 0


def test_a_file_that_cannot_be_read_is_set_aside_and_the_next_taken(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Tried again forever, it held up every file after it (and a worker that waits for its own file to
    go before it sends by the socket again: fastscp.process.sender)."""
    folder = tmp_path / "backlog"
    folder.mkdir()
    (folder / "0-1-0.records").mkdir()  # not a file: reading it fails with EISDIR whoever we are
    path = write_kept(str(folder), [b"z"])
    kept = KeptFiles(str(folder), "indexer", "the next start's reconcile indexes their files")
    with caplog.at_level(logging.WARNING, logger="fastscp.kept"):
        assert kept.take_oldest(1.0) is None
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning == (f"indexer: cannot take the records kept in {folder / '0-1-0.records'} (Is a directory): set "
                       "aside as 0-1-0.records.unreadable; the next start's reconcile indexes their files")
    assert (folder / "0-1-0.records.unreadable").is_dir()
    assert kept.count() == 1  # the set-aside one is not counted
    assert kept.take_oldest(1.0) == (path, [b"z"])  # at once, not after a minute
    assert kept.take_oldest(1.0) is None and kept_files(str(folder)) == []


def _in_the_way(*paths: Path) -> Callable[[], None]:
    """A ``before_removal`` that puts a folder holding a folder at each of ``paths`` (a kept file just read
    among them): removing or renaming onto it then fails, whoever we are (EISDIR, ENOTEMPTY)."""

    def replace() -> None:
        for path in paths:
            if path.is_file():
                path.unlink()
            (path / "in-the-way").mkdir(parents=True, exist_ok=True)

    return replace


def test_a_file_read_but_not_removed_is_set_aside_unused_and_the_next_taken(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Its messages are not given: the file would stay, and they would come again at every try."""
    first = Path(write_kept(str(tmp_path), [b"a"]))
    second = write_kept(str(tmp_path), [b"b"])
    kept = KeptFiles(str(tmp_path), "indexer")
    with caplog.at_level(logging.WARNING, logger="fastscp.kept"):
        assert kept.take_oldest(1.0, before_removal=_in_the_way(first)) is None
    (warning,) = [r.getMessage() for r in caplog.records]
    assert f"cannot take the records kept in {first} (Is a directory): set aside as {first.name}{SET_ASIDE}" in warning
    assert (tmp_path / f"{first.name}{SET_ASIDE}").is_dir()
    assert kept.take_oldest(1.0) == (second, [b"b"])  # at once, not after a minute


def test_a_file_neither_removed_nor_set_aside_is_said_once_and_tried_again_a_minute_later(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = Path(write_kept(str(tmp_path), [b"a"]))
    kept = KeptFiles(str(tmp_path), "indexer")
    with caplog.at_level(logging.WARNING, logger="fastscp.kept"):
        assert kept.take_oldest(1.0, before_removal=_in_the_way(first, tmp_path / f"{first.name}{SET_ASIDE}")) is None
        assert kept.take_oldest(1.0 + CHECK_INTERVAL) is None  # not tried again yet
        assert [r.getMessage() for r in caplog.records] == [
            f"indexer: cannot take the records kept in {tmp_path}: [Errno 21] Is a directory: '{first}'"]
        kept.take_oldest(1.0 + RETRY_AFTER_ERROR)  # tried again: said again
        assert len(caplog.records) == 2


def _unreadable(kept: KeptFiles, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="fastscp.kept"):
        assert kept.take_oldest(1.0) is None
        assert kept.take_oldest(1.0 + CHECK_INTERVAL) is None  # not tried again within the minute
        assert kept.take_oldest(1.0 + RETRY_AFTER_ERROR - 0.01) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"indexer: cannot take the records kept in {kept.folder}: ")
    assert warnings[0].endswith("; the next start's reconcile indexes their files")
