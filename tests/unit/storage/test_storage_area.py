"""The storage area's policy on a real folder (:meth:`Storage.store`, :meth:`Storage.out_of_space`):
link without overwrite, each duplicate policy, which UID names the file, the SR root, escape
attempts, the root's reserved names, and a disk that is really full (a small tmpfs)."""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from msgspec.structs import replace

from fastscp.config import load_config
from fastscp.dicom.header import HeaderFields
from fastscp.dicom.part10 import dataset_hash, file_meta, read_file_meta
from fastscp.index.reindex import walk
from fastscp.storage.area import (
    FREE_SPACE_MARGIN,
    HEADER_PREFIX_BYTES,
    RECYCLE_DEPTH,
    SR_SOP_CLASSES,
    IncomingFile,
    PageRecycler,
    Storage,
    own_name,
)
from fastscp.storage.layout import LAYOUTS, LayoutOptions, relative_path
from fastscp.storage.policy import DuplicatePolicy, Outcome
from fastscp.storage.reserved import FETCHED, INCOMING, NOT_INSTANCES, QUARANTINE, RESERVED
from tests.conftest import cached_bytes, mounted_tmpfs

CT = "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
EXPLICIT = "1.2.840.10008.1.2.1"
UID = "1.2.826.0.1.3680043.8.498.1"
HEADER = HeaderFields(patient_id="P1", study_instance_uid="1.2.3", study_date="20260101", series_number=1,
                      modality="CT", sop_instance_uid=UID)


def receive(storage: Storage, data: bytes, uid: str = UID, sop_class: str = CT) -> IncomingFile:
    incoming = storage.begin(sop_class, uid, EXPLICIT, "SCU")
    incoming.write(memoryview(data))
    return incoming


def store(storage: Storage, data: bytes, header: HeaderFields = HEADER, affected: str = UID,
          sop_class: str = CT, **kwargs: object) -> tuple[Path, Outcome]:
    incoming = receive(storage, data, affected, sop_class)
    try:
        committed = storage.store(incoming, header, sop_class, affected, **kwargs)  # type: ignore[arg-type]
    finally:
        incoming.close()
    return Path(committed.path), committed.outcome


def area(root: Path, **policy: object) -> Storage:
    policy.setdefault("layout", LayoutOptions(naming="flat"))
    storage = Storage(str(root), fsync=True, **policy)  # type: ignore[arg-type]
    storage.prepare()
    return storage


def leftovers(storage: Storage) -> list[str]:
    return os.listdir(storage.incoming_dir)


class IndexSays:
    """A :class:`~fastscp.storage.area.Locate`: the paths the index names for any UID asked, and whether
    its UID filter says it may hold them; the questions asked."""

    def __init__(self, *paths: str, holds: bool = True) -> None:
        self.paths, self.holds = paths, holds
        self.asked: list[tuple[str, ...]] = []

    def __call__(self, uids: tuple[str, ...]) -> tuple[str, ...]:
        self.asked.append(uids)
        return self.paths

    def may_hold(self, uids: tuple[str, ...]) -> bool:
        return self.holds


def test_the_link_into_place_never_replaces_another_instance(tmp_path: Path) -> None:
    """A layout name that holds another instance (another UID in its File Meta) is left as it is."""
    storage = area(tmp_path / "root", layout=LayoutOptions(naming="template", template="{PatientID}/same.dcm"))
    first, outcome = store(storage, b"first")
    assert outcome is Outcome.STORED and first == Path(storage.root, "P1", "same.dcm")
    other = "1.2.826.0.1.3680043.8.498.2"
    second, outcome = store(storage, b"second", replace(HEADER, sop_instance_uid=other), affected=other)
    assert outcome is Outcome.STORED and second != first and second.parent == first.parent
    assert first.read_bytes().endswith(b"first") and second.read_bytes().endswith(b"second")
    assert read_file_meta(second.read_bytes())[0][0x0003] == other
    assert leftovers(storage) == []


@pytest.mark.parametrize(("policy", "outcome", "kept"), [
    (DuplicatePolicy.KEEP_FIRST, Outcome.KEPT_FIRST, b"first"),
    (DuplicatePolicy.REJECT, Outcome.REJECTED, b"first"),
    (DuplicatePolicy.OVERWRITE, Outcome.OVERWRITTEN, b"second"),
    (DuplicatePolicy.KEEP_BOTH, Outcome.KEPT_BOTH, b"first"),
])
def test_each_duplicate_policy(tmp_path: Path, policy: DuplicatePolicy, outcome: Outcome, kept: bytes) -> None:
    storage = area(tmp_path / "root", duplicates=policy)
    path, first = store(storage, b"first")
    assert first is Outcome.STORED
    inode = path.stat().st_ino
    # The same bytes again: a resend, whatever the policy; nothing is rewritten.
    assert store(storage, b"first") == (path, Outcome.IDENTICAL) and path.stat().st_ino == inode
    where, second = store(storage, b"second")
    assert second is outcome and path.read_bytes().endswith(kept)
    if policy is DuplicatePolicy.KEEP_BOTH:
        assert where == path.with_name(f"{UID}.v2.dcm") and where.read_bytes().endswith(b"second")
    else:
        assert where == path and sorted(os.listdir(storage.root)) == sorted([INCOMING, QUARANTINE, path.name])
    assert leftovers(storage) == []


def test_the_policy_reads_its_config_values_and_reloads(tmp_path: Path) -> None:
    """storage.duplicates keeps its YAML values; a reload that changes nothing keeps the same area."""
    config_file = tmp_path / "fastscp.yaml"
    config_file.write_text(f"storage:\n  directory: {tmp_path / 'root'}\n  duplicates: keep-both\n")
    config = load_config(str(config_file))
    assert config.storage.duplicates is DuplicatePolicy.KEEP_BOTH
    storage = area(tmp_path / "root", duplicates=config.storage.duplicates, min_free_bytes=5)
    assert storage.reconfigured(duplicates=DuplicatePolicy.KEEP_BOTH, min_free_bytes=5) is storage
    changed = storage.reconfigured(duplicates=DuplicatePolicy("reject"), min_free_bytes=0)
    assert (changed.duplicates, changed.min_free_bytes, changed.root) == (DuplicatePolicy.REJECT, 0, storage.root)
    assert (storage.duplicates, storage.min_free_bytes) == (DuplicatePolicy.KEEP_BOTH, 5)


def test_a_duplicate_stored_under_another_name_is_found_through_the_index(tmp_path: Path) -> None:
    """Its layout fields changed (a corrected Patient ID): the index says where the UID is stored."""
    storage = area(tmp_path / "root", layout=LayoutOptions(naming="hierarchical"),
                   duplicates=DuplicatePolicy.REJECT)
    path, _ = store(storage, b"first")
    index = IndexSays(storage.relative(str(path)))
    where, outcome = store(storage, b"second", replace(HEADER, patient_id="P2"), locate=index)
    assert (where, outcome) == (path, Outcome.REJECTED) and index.asked == [(UID,)]
    assert not Path(storage.root, "P2").exists() and leftovers(storage) == []


def test_the_index_is_not_asked_about_an_instance_it_surely_does_not_hold(tmp_path: Path) -> None:
    """Its UID filter says no (a new instance: nearly every store): no question, and no look at the
    file system before the link; what the index would have named is not consulted."""
    storage = area(tmp_path / "root", layout=LayoutOptions(naming="hierarchical"),
                   duplicates=DuplicatePolicy.REJECT)
    path, _ = store(storage, b"first")
    index = IndexSays(storage.relative(str(path)), holds=False)
    where, outcome = store(storage, b"second", replace(HEADER, patient_id="P2"), locate=index)
    assert outcome is Outcome.STORED and index.asked == []
    assert where == Path(storage.root, relative_path(storage.layout, replace(HEADER, patient_id="P2")))
    assert where.read_bytes().endswith(b"second") and leftovers(storage) == []


def test_the_layout_name_and_a_hundred_own_names_are_tried(tmp_path: Path) -> None:
    """The layout name, then MAX_NAMES (100) own names (``.u<tag>``, ``.u<tag>-2`` ... ``-100``): all
    holding other instances, the store fails (EEXIST, nothing left behind); the last one free, it is used."""
    storage = area(tmp_path / "root", layout=LayoutOptions(naming="template", template="{PatientID}/same.dcm"))
    other = file_meta(CT, "1.2.826.0.1.3680043.8.498.99", EXPLICIT, "SCU")
    final = os.path.join(storage.root, "P1", "same.dcm")
    names = [final, *(own_name(final, UID, attempt) for attempt in range(100))]
    assert names[1].endswith(".u" + hashlib.sha256(UID.encode()).hexdigest()[:10] + ".dcm")
    assert names[-1].endswith("-100.dcm") and len(set(names)) == 101
    os.makedirs(os.path.dirname(final))
    for name in names:
        Path(name).write_bytes(other)
    with pytest.raises(OSError, match="100 names after") as raised:
        store(storage, b"data")
    assert raised.value.errno == errno.EEXIST and leftovers(storage) == []
    os.unlink(names[-1])
    where, outcome = store(storage, b"data")
    assert (str(where), outcome) == (names[-1], Outcome.STORED)


def test_a_path_the_index_names_whose_file_is_gone_is_no_duplicate(tmp_path: Path) -> None:
    """The index can lag behind an operator who removed a file (reconciled later): a path it names
    that holds no file is not where the instance is; it is stored at its layout name."""
    storage = area(tmp_path / "root", layout=LayoutOptions(naming="hierarchical"),
                   duplicates=DuplicatePolicy.REJECT)
    where, outcome = store(storage, b"data", locate=IndexSays("P1/removed.dcm"))
    assert outcome is Outcome.STORED and where == Path(storage.root, relative_path(storage.layout, HEADER))
    assert where.read_bytes().endswith(b"data") and leftovers(storage) == []


def test_the_command_uid_names_the_file_and_both_uids_are_duplicates(tmp_path: Path) -> None:
    """The File Meta (and so the name) carries the command's Affected SOP Instance UID; a data set
    whose own UID differs is a duplicate by either."""
    storage = area(tmp_path / "root")
    affected = "1.2.826.0.1.3680043.8.498.77"
    path, outcome = store(storage, b"first", HEADER, affected=affected)
    assert outcome is Outcome.STORED and path.name == f"{affected}.dcm"
    assert read_file_meta(path.read_bytes())[0][0x0003] == affected
    # Sent again under the data set's own UID: the same instance.
    again, outcome = store(storage, b"first", HEADER, affected=affected)
    assert (again, outcome) == (path, Outcome.IDENTICAL)


def test_structured_reports_go_to_the_sr_root(tmp_path: Path) -> None:
    assert SR in SR_SOP_CLASSES
    storage = area(tmp_path / "root", sr_root=str(tmp_path / "sr"))
    path, outcome = store(storage, b"report", sop_class=SR)
    assert outcome is Outcome.STORED and path.parent == tmp_path / "sr"
    assert storage.relative(str(path)) == str(path)  # recorded absolute: outside the root
    image, _ = store(storage, b"image", replace(HEADER, sop_instance_uid="1.2.3.9"), affected="1.2.3.9")
    assert image.parent == Path(storage.root)


@pytest.mark.parametrize("naming", sorted(LAYOUTS))
@pytest.mark.parametrize("value", ["..", "../../etc", "/etc/passwd", "a/../../..", "..\\..", ".incoming", "thumbnails"])
def test_hostile_header_values_stay_below_the_root(tmp_path: Path, naming: str, value: str) -> None:
    """Every layout, every text field a sender controls: the file lands below the root and outside
    the root's reserved names."""
    template = "{PatientID}/{StudyID}/{SOPInstanceUID}.dcm"
    storage = area(tmp_path / "root", layout=LayoutOptions(naming=naming, template=template))
    fields = {name: value for name, kind in HeaderFields.__annotations__.items() if kind == "str"}
    header = HeaderFields(**{**fields, "sop_instance_uid": UID})  # type: ignore[arg-type]
    path, outcome = store(storage, b"data", header)
    assert outcome is Outcome.STORED
    relative = path.relative_to(storage.root)  # raises if outside
    assert relative.parts[0].lower() not in RESERVED and ".." not in relative.parts
    assert leftovers(storage) == []


def test_the_commit_backstop_refuses_a_path_outside_the_root(tmp_path: Path) -> None:
    """Behind the layouts' sanitising: a relative path that leaves the root is refused, the temp file removed."""
    storage = area(tmp_path / "root")
    incoming = receive(storage, b"data")
    with pytest.raises(PermissionError, match="leaves the storage root"):
        incoming.commit("../escaped.dcm")
    assert leftovers(storage) == [] and not (tmp_path / "escaped.dcm").exists()


def test_reserved_names_have_one_owner() -> None:
    """The layout's reserved top folders and the walks' skipped folders come from storage.reserved."""
    assert NOT_INSTANCES <= RESERVED and {INCOMING, QUARANTINE, "thumbnails", "scansheets"} <= NOT_INSTANCES
    for name in sorted(RESERVED):
        header = HeaderFields(patient_id=name.upper(), sop_instance_uid=UID)
        top = relative_path(LayoutOptions(naming="template", template="{PatientID}/x.dcm"), header).split("/")[0]
        assert top.lower() not in RESERVED, name


# -- a disk that is full ----------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs with 16 inodes: blocks and inodes both run out."""
    yield from mounted_tmpfs(tmp_path, "size=1m,nr_inodes=16")


def test_a_full_disk_fails_the_write_and_gives_the_space_back(tiny_disk: Path) -> None:
    storage = area(tiny_disk / "root")
    incoming = receive(storage, b"x" * (2 << 20))  # twice the disk
    assert incoming.error is not None and incoming.error.errno == errno.ENOSPC
    assert leftovers(storage) == []  # removed at the first failed write
    incoming.write(memoryview(b"more"))  # drained, not written
    incoming.discard()
    # The space is back: the next data set fits.
    path, outcome = store(storage, b"fits")
    assert outcome is Outcome.STORED and path.read_bytes() == file_meta(CT, UID, EXPLICIT, "SCU") + b"fits"


def test_no_inode_left_for_a_temp_file(tiny_disk: Path) -> None:
    storage = area(tiny_disk / "root")
    spares = []
    while (spare := storage.spare()) is not None:
        spares.append(spare)
        assert len(spares) < 100, "the tmpfs was not limited"
    with pytest.raises(OSError) as raised:
        storage.begin(CT, UID, EXPLICIT, "SCU")
    assert raised.value.errno == errno.ENOSPC
    for spare in spares:
        spare.discard()
    assert leftovers(storage) == []


def test_the_free_space_watermark(tiny_disk: Path) -> None:
    storage = area(tiny_disk / "root", min_free_bytes=2 << 20)
    assert storage.out_of_space() == f"free space {storage.free_bytes() // 1_000_000} MB below storage.min_free_bytes"
    assert area(tiny_disk / "root", min_free_bytes=4096).out_of_space() == ""
    assert area(tiny_disk / "root").out_of_space() == ""  # 0: off


@pytest.fixture(params=["size=1m", "size=600m"])
def sized_disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 1 MiB, or of 600 MiB (more than FREE_SPACE_MARGIN)."""
    yield from mounted_tmpfs(tmp_path, request.param)


def test_near_the_watermark_every_store_measures_the_free_space(sized_disk: Path) -> None:
    """Within FREE_SPACE_MARGIN of storage.min_free_bytes (a watermark of a few KB or of ~600 MB, 256 KB
    below the free space) the free space is measured at every store: a file written between two stores
    is seen by the second."""
    storage = area(sized_disk / "root")
    storage.min_free_bytes = storage.free_bytes() - (256 << 10)
    assert storage.out_of_space() == ""
    (sized_disk / "filler").write_bytes(bytes(512 << 10))
    assert storage.out_of_space().endswith("MB below storage.min_free_bytes")


@pytest.mark.parametrize("size", [9000, HEADER_PREFIX_BYTES, HEADER_PREFIX_BYTES + 1, 300_000])
def test_the_content_hash_is_the_stored_data_sets_whether_held_in_memory_or_read_back(tmp_path: Path,
                                                                                       size: int) -> None:
    """Up to the header prefix the data set is hashed where it is held in memory; beyond, read back from
    the file: either way the hash of the stored file's data set."""
    storage = area(tmp_path / "root")
    incoming = receive(storage, os.urandom(size))
    assert len(incoming.prefix) == min(size, HEADER_PREFIX_BYTES)
    committed = incoming.commit("a.dcm")
    try:
        assert incoming.content_hash == dataset_hash(committed.path)
    finally:
        incoming.close()


def test_a_new_watermark_is_measured_against_at_once(tmp_path: Path) -> None:
    """Far above the watermark the free space is not measured at every store; a reload that raises the
    watermark (storage.min_free_bytes is live) is measured against at the next store all the same."""
    storage = area(tmp_path / "root", min_free_bytes=1)
    assert storage.free_bytes() > 1 + FREE_SPACE_MARGIN, "the test needs a disk with some room"
    assert storage.out_of_space() == ""
    raised = storage.reconfigured(duplicates=storage.duplicates, min_free_bytes=1 << 62)
    assert raised.out_of_space().endswith("MB below storage.min_free_bytes")


def test_reserved_names_are_reserved_at_the_top_only(tmp_path: Path) -> None:
    """A stored instance's folder deeper down may have such a name (a template's
    {SeriesDescription} of "thumbnails"): reindex and reconcile still find the files in it."""
    storage = area(tmp_path / "root", layout=LayoutOptions(naming="template",
                                                          template="{PatientID}/{SeriesDescription}/{SOPInstanceUID}"))
    path, _ = store(storage, b"data", replace(HEADER, series_description="thumbnails"))
    assert path.parent.name == "thumbnails" and path.parent.parent.name == "P1"
    Path(storage.root, "thumbnails", "P1").mkdir(parents=True)
    Path(storage.root, "thumbnails", "P1", "not-an-instance.dcm").write_bytes(b"a thumbnail's folder")
    assert [state.path for state in walk(storage.root)] == [f"P1/thumbnails/{UID}.dcm"]


def test_prepare_removes_what_a_killed_process_left_in_incoming(tmp_path: Path) -> None:
    """Temp files of unfinished stores and the private folders of files fetched from other nodes (a shared
    index) go at start; anything else in .incoming stays."""
    storage = area(tmp_path / "root")
    incoming = Path(storage.incoming_dir)
    (incoming / "x.part").write_bytes(b"half a data set")
    fetched = incoming / f"{FETCHED}k2j4"
    fetched.mkdir()
    (fetched / "1.dcm").write_bytes(b"another node's file")
    (incoming / "kept.txt").write_bytes(b"not ours")
    assert storage.prepare() == 1
    assert sorted(os.listdir(incoming)) == ["kept.txt"]


def test_a_page_recycler_gives_back_a_files_pages_once_written_out_and_closes_it(page_cache: Path) -> None:
    """storage.fsync never: a stored file's descriptor, taken by an association's recycler, stays open
    (its writeback started) until RECYCLE_DEPTH more files came; then its pages, clean by then, go
    back to the kernel and it is closed. At the association's end the rest are closed too."""
    data = os.urandom(256 << 10)
    paths = [page_cache / f"{n}.dcm" for n in range(RECYCLE_DEPTH + 2)]
    fds = []
    for path in paths:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        os.write(fd, data)
        fds.append(fd)
    pages = PageRecycler()
    for fd in fds[:RECYCLE_DEPTH]:
        pages.take(fd)
    assert all(os.fstat(fd) for fd in fds[:RECYCLE_DEPTH])  # all still open
    os.fsync(fds[0])  # written out: the writeback the recycler started may take longer than this test
    pages.take(fds[RECYCLE_DEPTH])
    with pytest.raises(OSError) as closed:
        os.fstat(fds[0])
    assert closed.value.errno == errno.EBADF
    assert cached_bytes(paths[0]) == 0
    assert cached_bytes(paths[1]) > 0  # not yet its turn: still cached
    pages.close()
    for fd in fds[1:RECYCLE_DEPTH + 1]:
        with pytest.raises(OSError):
            os.fstat(fd)
    os.close(fds[-1])  # never taken: still open
    assert [path.read_bytes() == data for path in paths] == [True] * len(paths)


def test_with_fsync_a_stored_files_pages_go_back_at_its_commit(page_cache: Path) -> None:
    """storage.fsync always: once fsynced the file's pages are clean, and the next data set's."""
    data = os.urandom(256 << 10)
    path, outcome = store(area(page_cache / "root"), data)
    assert outcome is Outcome.STORED
    assert cached_bytes(path) == 0
    assert path.read_bytes().endswith(data)


def test_only_storage_without_fsync_recycles_pages(tmp_path: Path) -> None:
    """With storage.fsync the commit gives the pages back after its fsync; no recycler then."""
    assert Storage(str(tmp_path), fsync=True).page_recycler() is None
    assert isinstance(Storage(str(tmp_path), fsync=False).page_recycler(), PageRecycler)
