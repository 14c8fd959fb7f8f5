"""fastscp.storage.area on a real folder: the commit's root backstop, keep-both versions, quarantine."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from fastscp.dicom.part10 import file_meta
from fastscp.storage.area import HEADER_PREFIX_BYTES, IncomingFile, Storage, TempFile, own_name
from fastscp.storage.reserved import INDEX_BACKLOG, POSTSTORE_BACKLOG

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


def receive(storage: Storage, data: bytes, uid: str = "1.2.3") -> IncomingFile:
    incoming = storage.begin(CT, uid, EXPLICIT, "SCU")
    incoming.write(memoryview(data))
    return incoming


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    storage = Storage(str(tmp_path / "root"), fsync=False)
    storage.prepare()
    return storage


def leftovers(storage: Storage) -> list[str]:
    return os.listdir(storage.incoming_dir)


@pytest.mark.parametrize("relative", ["../outside.dcm", "a/../../outside.dcm", "/etc/outside.dcm", ".."])
def test_commit_refuses_a_path_that_leaves_the_root(storage: Storage, tmp_path: Path, relative: str) -> None:
    """The backstop behind the layouts' own sanitising: nothing is written outside the root."""
    incoming = receive(storage, b"data")
    with pytest.raises(PermissionError, match="leaves the storage root"):
        incoming.commit(relative)
    assert leftovers(storage) == []
    assert not (tmp_path / "outside.dcm").exists() and not Path("/etc/outside.dcm").exists()
    # A sibling folder whose name merely starts like the root's is outside too.
    incoming = receive(storage, b"data")
    with pytest.raises(PermissionError):
        incoming.commit("../root2/x.dcm")
    assert not (tmp_path / "root2").exists() and leftovers(storage) == []


def test_keep_both_numbers_every_further_version(storage: Storage) -> None:
    first = receive(storage, b"first").commit("p/x.dcm", "keep-both")
    assert first.outcome == "stored"
    paths = [first.path]
    for content in (b"second", b"third", b"fourth"):
        committed = receive(storage, content).commit("p/x.dcm", "keep-both")
        assert (committed.outcome, committed.existing_path) == ("kept-both", first.path)
        paths.append(committed.path)
    folder = os.path.join(storage.root, "p")
    assert [os.path.basename(p) for p in paths] == ["x.dcm", "x.v2.dcm", "x.v3.dcm", "x.v4.dcm"]
    assert sorted(os.listdir(folder)) == ["x.dcm", "x.v2.dcm", "x.v3.dcm", "x.v4.dcm"]
    for path, content in zip(paths, (b"first", b"second", b"third", b"fourth"), strict=True):
        assert Path(path).read_bytes().endswith(content)
    # A resend of the first content is the first file: no new version.
    assert receive(storage, b"first").commit("p/x.dcm", "keep-both").outcome == "identical"
    assert len(os.listdir(folder)) == 4 and leftovers(storage) == []


def test_quarantine_keeps_the_file_and_its_reason(storage: Storage) -> None:
    incoming = receive(storage, b"unparseable")
    target = incoming.quarantine("1.2.3: element length runs past the end")
    assert target is not None and os.path.dirname(target) == storage.quarantine_dir
    assert Path(target).read_bytes().endswith(b"unparseable")
    assert Path(target + ".reason.txt").read_text() == "1.2.3: element length runs past the end\n"
    assert leftovers(storage) == []


def test_quarantine_false_keeps_nothing(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "root"), fsync=False, quarantine=False)
    storage.prepare()
    assert receive(storage, b"unparseable").quarantine("why") is None
    assert os.listdir(storage.quarantine_dir) == [] and leftovers(storage) == []


def test_no_descriptor_is_left_open(tmp_path: Path) -> None:
    """Stores, a folder fsync, a conflicting resend (the existing file is hashed), discards: no fd leaks."""
    storage = Storage(str(tmp_path / "root"), fsync=True)
    storage.prepare()
    before = sorted(os.listdir("/proc/self/fd"))
    for i in range(5):
        incoming = receive(storage, b"content %d" % i)
        assert incoming.commit(f"p/{i}.dcm").outcome == "stored"
        incoming.close()
    conflict = receive(storage, b"other content")
    assert conflict.commit("p/0.dcm", "reject").outcome == "rejected"
    conflict.discard()
    receive(storage, b"dropped").discard()
    assert receive(storage, b"unparseable").quarantine("why") is not None
    spare = storage.spare()
    assert spare is not None
    spare.discard()
    assert sorted(os.listdir("/proc/self/fd")) == before
    assert leftovers(storage) == []


def test_only_the_header_prefix_stays_in_memory(storage: Storage) -> None:
    data = bytes(range(256)) * (HEADER_PREFIX_BYTES // 128)  # twice the prefix
    incoming = receive(storage, data[:1000])
    incoming.write(memoryview(data[1000:]))
    assert bytes(incoming.prefix) == data[:HEADER_PREFIX_BYTES] and incoming.dataset_length == len(data)
    incoming.discard()


def test_temp_names_skip_those_a_killed_process_with_our_pid_left(storage: Storage) -> None:
    """Temp files are named by PID and a count; a name taken (a stale file of a process that had our PID)
    is passed over, and its file left alone."""
    first = TempFile(storage.incoming_dir)
    pid, number = Path(first.path).stem.split("-")
    assert int(pid) == os.getpid()
    stale = [Path(storage.incoming_dir, f"{pid}-{int(number) + step}.part") for step in (1, 2)]
    for path in stale:
        path.write_bytes(b"a dead process's")
    second = TempFile(storage.incoming_dir)
    assert Path(second.path).name == f"{pid}-{int(number) + 3}.part"
    assert [path.read_bytes() for path in stale] == [b"a dead process's"] * 2
    first.discard()
    second.discard()


def test_a_forked_child_names_its_temp_files_by_its_own_pid(storage: Storage) -> None:
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        temp = TempFile(storage.incoming_dir)
        os.write(write, Path(temp.path).name.encode())
        temp.discard()
        os._exit(0)
    os.close(write)
    name = os.read(read, 200).decode()
    os.close(read)
    assert os.waitpid(child, 0)[1] == 0
    assert name.startswith(f"{child}-") and name.endswith(".part")


def test_prepare_removes_what_a_killed_process_left(storage: Storage) -> None:
    for name in ("a.part", "b.part"):
        Path(storage.incoming_dir, name).write_bytes(b"half a data set")
    Path(storage.incoming_dir, "keep.txt").write_text("not ours")
    # Records kept for the post-store stage and for the indexer: whole files stay, torn ones go.
    backlogs = [Path(storage.incoming_dir, name) for name in (POSTSTORE_BACKLOG, INDEX_BACKLOG)]
    for kept in backlogs:
        kept.mkdir()
        (kept / "1-2-0.records").write_bytes(b"whole")
        (kept / ".tmp-2-3-1.records").write_bytes(b"half")
    assert storage.prepare() == 4
    assert sorted(os.listdir(storage.incoming_dir)) == sorted(["keep.txt", POSTSTORE_BACKLOG, INDEX_BACKLOG])
    assert all(os.listdir(kept) == ["1-2-0.records"] for kept in backlogs)


def test_a_commit_that_fails_leaves_no_temp_file(storage: Storage) -> None:
    Path(storage.root, "p").write_text("a file where the folder should be")
    incoming = receive(storage, b"data")
    with pytest.raises(OSError):
        incoming.commit("p/x.dcm")
    assert leftovers(storage) == [] and Path(storage.root, "p").read_text().startswith("a file")


def test_a_quarantine_that_fails_leaves_no_temp_file(storage: Storage) -> None:
    os.rmdir(storage.quarantine_dir)
    assert receive(storage, b"unparseable").quarantine("why") is None
    assert leftovers(storage) == [] and not os.path.exists(storage.quarantine_dir)


def test_prepare_makes_the_structured_report_root(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "root"), sr_root=str(tmp_path / "sr"))
    storage.prepare()
    assert (tmp_path / "sr").is_dir() and Path(storage.incoming_dir).is_dir() and Path(storage.quarantine_dir).is_dir()


def test_own_name_keeps_folder_and_extension() -> None:
    tag = own_name("p/x.dcm", "1.2", 0).split(".")[1]
    assert own_name("p/x.dcm", "1.2", 0) == f"p/x.{tag}.dcm" and own_name("p/x.dcm", "1.2", 1) == f"p/x.{tag}-2.dcm"
    assert own_name("a.b/c", "1.2", 0) == f"a.b/c.{tag}"  # a dot in a folder is not an extension
    assert own_name("p/x.dcm", "1.3", 0) != own_name("p/x.dcm", "1.2", 0)


def test_a_write_error_gives_the_space_back_at_once(storage: Storage) -> None:
    """A full disk (/dev/full answers every write with ENOSPC): the temp file goes at the first error."""
    temp = TempFile(storage.incoming_dir)
    os.close(temp.fd)
    temp.fd = os.open("/dev/full", os.O_WRONLY | os.O_CLOEXEC)
    incoming = storage.begin(CT, "1.2.3", EXPLICIT, "SCU", temp)
    incoming.write(memoryview(b"data"))  # the File Meta goes with the first bytes
    assert incoming.error is not None and incoming.error.errno == errno.ENOSPC
    assert leftovers(storage) == []
    incoming.write(memoryview(b"more data"))  # drained, not written
    assert incoming.dataset_length == 13 and leftovers(storage) == []
    incoming.discard()


def test_the_file_meta_goes_first_however_the_data_set_arrives(storage: Storage) -> None:
    """Written with the data set's first bytes (one system call): by write(), by the data path
    (target(): it writes the head), or at commit when no byte came (an empty data set)."""
    meta = file_meta(CT, "1.2.3", EXPLICIT, "SCU")
    incoming = storage.begin(CT, "1.2.3", EXPLICIT, "SCU")
    incoming.write(memoryview(b"ab"))
    incoming.write(memoryview(b"cd"))
    assert Path(incoming.temp_path).read_bytes() == meta + b"abcd"
    incoming.discard()
    incoming = storage.begin(CT, "1.2.4", EXPLICIT, "SCU")
    fd, _prefix, _room, head = incoming.target()
    assert head == file_meta(CT, "1.2.4", EXPLICIT, "SCU") and incoming.target()[3] == b""  # handed over once
    os.write(fd, head + b"xyz")  # as the data path does
    incoming.streamed(3, "")
    committed = incoming.commit("a/one.dcm", sop_instance_uids=("1.2.4",))
    assert Path(committed.path).read_bytes() == head + b"xyz"
    incoming.close()
    incoming = storage.begin(CT, "1.2.5", EXPLICIT, "SCU")
    committed = incoming.commit("a/empty.dcm", sop_instance_uids=("1.2.5",))
    assert Path(committed.path).read_bytes() == file_meta(CT, "1.2.5", EXPLICIT, "SCU")
    incoming.close()
    assert leftovers(storage) == []
