"""The structural walk (fastscp.dicom.walk): both twins, the same cases, the same verdicts."""

from __future__ import annotations

import random
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from fastscp.dicom import header, walk
from fastscp.dicom._header_py import MAX_INFLATED as MAX_HEADER_INFLATED
from fastscp.dicom._walk_py import Walker as WalkerPy
from fastscp.dicom.backend import NO_EXTENSIONS
from fastscp.dicom.header import HeaderError, IncompleteHeader
from fastscp.dicom.synthetic import write_series
from tests import corpus
from tests.dicomfiles import (
    DEFLATED_LE,
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    UNDEFINED,
    Encoder,
    corpus_files,
    corpus_id,
    dataset_bytes,
    pad,
)
from tests.twins import compiled_twin

TWINS = ["cext", "py"]
MAX_INFLATED = 1 << 30
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
ENCODINGS = {EXPLICIT_LE: Encoder(True, False), IMPLICIT_LE: Encoder(False, False), EXPLICIT_BE: Encoder(True, True)}


def _compiled() -> Any:
    return compiled_twin(walk.WalkerCext, "fastscp.dicom._walk_cext")


@pytest.fixture(params=TWINS)
def twin(request: pytest.FixtureRequest) -> Any:
    return _compiled() if request.param == "cext" else WalkerPy


def test_backend_switch() -> None:
    assert walk.BACKEND == ("py" if NO_EXTENSIONS else "cext")


def _walk(twin: Any, data: bytes, ts: str) -> None:
    walk.walk_dataset(data, ts, MAX_INFLATED, twin)


def _fed_in_pieces(twin: Any, data: bytes, ts: str, seed: int) -> None:
    """The same walk, fed in random pieces the way the deflate path feeds it."""
    enc = ENCODINGS.get(ts, ENCODINGS[EXPLICIT_LE])
    w = twin(enc.explicit, enc.big)
    rng = random.Random(seed)
    pos, tail = 0, b""
    while pos < len(data):
        step = rng.randint(1, 40)
        buf = tail + data[pos : pos + step]
        pos += step
        tail = buf[w.feed(buf) :]
        assert len(tail) < 12
    w.finish()


def _verdict(fn: Any, *args: Any) -> str:
    try:
        fn(*args)
    except HeaderError as exc:
        return str(exc)
    return "ok"


def _header(enc: Encoder) -> bytes:
    return (enc.element(0x00080016, "UI", pad("1.2.840.10008.5.1.4.1.1.2", "UI"))
            + enc.element(0x00080018, "UI", pad("1.2.3.4", "UI"))
            + enc.element(0x00100010, "PN", pad("DOE^JANE")))


def _valid_cases() -> list[tuple[str, str, bytes]]:
    out = []
    for ts, enc in ENCODINGS.items():
        nested = enc.sequence(0x00081115, [enc.item(enc.element(0x00081150, "UI", pad("1.2", "UI"))),
                                           enc.item(enc.element(0x00081155, "UI", pad("1.3", "UI")), undefined=False)])
        defined = enc.sequence(0x00082112, [enc.item(enc.sequence(0x00081115, [enc.item(b"")], undefined=False),
                                                     undefined=False)], undefined=False)
        empty = enc.sequence(0x00400275, [], undefined=False)
        out.append((f"{ts}-sequences", ts, _header(enc) + nested + defined + empty
                    + enc.element(0x7FE00010, "OW", bytes(64))))
        out.append((f"{ts}-odd-length", ts, _header(enc) + enc.element(0x00091001, "LO", b"abc")))
        out.append((f"{ts}-empty", ts, b""))
    enc = ENCODINGS[EXPLICIT_LE]
    fragments = (enc.header(0x7FE00010, "OB", UNDEFINED) + enc.item(b"", undefined=False)
                 + enc.item(b"\xff\xd8" + bytes(100) + b"\xff\xd9", undefined=False)
                 + enc.tag(0xFFFEE0DD) + b"\0\0\0\0")
    out.append(("encapsulated", JPEG_BASELINE, _header(enc) + fragments))
    un = enc.header(0x00091010, "UN", UNDEFINED) + ENCODINGS[IMPLICIT_LE].item(
        ENCODINGS[IMPLICIT_LE].element(0x00100020, "LO", pad("ID"))) + enc.tag(0xFFFEE0DD) + b"\0\0\0\0"
    out.append(("un-sequence", EXPLICIT_LE, _header(enc) + un))
    # Implicit data on an explicit context: the first element switches, as in pydicom.
    out.append(("implicit-on-explicit", EXPLICIT_LE, _header(ENCODINGS[IMPLICIT_LE])))
    return out


def _invalid_cases() -> list[tuple[str, str, bytes, str]]:
    out = []
    for ts, enc in ENCODINGS.items():
        head = _header(enc)
        # The case: Pixel Data declares 8192 bytes and carries 4192.
        short = enc.header(0x7FE00010, "OW", 8192) + bytes(4192)
        out.append((f"{ts}-short-pixel-data", ts, head + short, "value of (7FE0,0010)"))
        out.append((f"{ts}-cut-header", ts, head + enc.tag(0x00200013) + b"IS", "runs past the end"))
        out.append((f"{ts}-cut-tag", ts, head + b"\x20\x00", "tag at byte offset"))
        never = enc.header(0x00081115, "SQ", UNDEFINED) + enc.tag(0xFFFEE000) + b"\xff\xff\xff\xff" + _header(enc)
        out.append((f"{ts}-sequence-never-closes", ts, head + never, "data ends inside the undefined-length"))
        not_item = enc.header(0x00081115, "SQ", UNDEFINED) + enc.element(0x00100010, "PN", pad("X"))
        out.append((f"{ts}-element-in-sequence", ts, head + not_item, "expected an item"))
        stray = enc.tag(0xFFFEE00D) + b"\0\0\0\0"
        out.append((f"{ts}-stray-item-delimiter", ts, head + stray, "where a data element belongs"))
        overrun = enc.sequence(0x00081115, [enc.item(enc.element(0x00100010, "PN", pad("X"), length=200),
                                                     undefined=False)], undefined=False)
        if not enc.explicit:
            # Implicit VR: a defined-length sequence can't be told from a
            # value without a dictionary; its length is checked, not its items.
            continue
        out.append((f"{ts}-value-overruns-item", ts, head + overrun, "value of (0010,0010)"))
        item_past = enc.header(0x00081115, "SQ", 16) + enc.tag(0xFFFEE000) + (
            b"\x00\x00\x01\x00" if not enc.big else b"\x00\x01\x00\x00") + bytes(8)
        out.append((f"{ts}-item-overruns-sequence", ts, head + item_past, "item at byte offset"))
    for ts, enc in ENCODINGS.items():
        head = _header(enc)
        deep = b"".join(enc.header(0x00081115, "SQ", UNDEFINED) + enc.tag(0xFFFEE000) + b"\xff\xff\xff\xff"
                        for _ in range(40))
        out.append((f"{ts}-too-deep", ts, head + deep, "nested deeper"))
    enc = ENCODINGS[EXPLICIT_LE]
    # Letters, but no VR: the length field's size can't be known (PS3.5 6.2).
    unknown = enc.tag(0x00100010) + b"RN" + b"\x04\x00" + b"DOE "
    out.append(("unknown-vr", EXPLICIT_LE, _header(enc) + unknown, "unknown VR 'RN' of (0010,0010)"))
    open_fragments = enc.header(0x7FE00010, "OB", UNDEFINED) + enc.item(b"", undefined=False) + enc.item(bytes(10),
                                                                                                           False)
    out.append(("fragments-never-close", JPEG_BASELINE, _header(enc) + open_fragments, "data ends inside"))
    cut_fragment = enc.header(0x7FE00010, "OB", UNDEFINED) + enc.tag(0xFFFEE000) + b"\x00\x01\x00\x00" + bytes(10)
    out.append(("fragment-cut", JPEG_BASELINE, _header(enc) + cut_fragment, "value of (FFFE,E000)"))
    return out


@pytest.mark.parametrize("name,ts,data", _valid_cases(), ids=[c[0] for c in _valid_cases()])
def test_well_formed_data_sets_pass(twin: Any, name: str, ts: str, data: bytes) -> None:
    _walk(twin, data, ts)
    for seed in range(5):
        _fed_in_pieces(twin, data, ts, seed)


@pytest.mark.parametrize("name,ts,data,message", _invalid_cases(), ids=[c[0] for c in _invalid_cases()])
def test_malformed_data_sets_fail_with_the_reason(twin: Any, name: str, ts: str, data: bytes, message: str) -> None:
    whole = _verdict(_walk, twin, data, ts)
    assert message in whole, whole
    # Fed in pieces: the same verdict, the same text (the data's size, which
    # a piece-wise walk knows only up to the failing piece, aside).
    for seed in range(5):
        assert _verdict(_fed_in_pieces, twin, data, ts, seed).split(" of the data (")[0] == whole.split(
            " of the data (")[0]


@pytest.mark.parametrize("name,ts,data,message", _invalid_cases(), ids=[c[0] for c in _invalid_cases()])
def test_twins_give_the_same_text(name: str, ts: str, data: bytes, message: str) -> None:
    assert _verdict(_walk, _compiled(), data, ts) == _verdict(_walk, WalkerPy, data, ts)


def test_the_whole_corpus_walks(twin: Any) -> None:
    """Every file dcmtk reads to its end (tests.corpus, checked against dcmdump
    by test_corpus_oracle) walks; pydicom's truncated files fail, with why."""
    valid = corpus.corpus_files()
    assert len(valid) > 100
    for item in valid:
        data, ts = corpus.dataset_bytes(item.path)
        assert _verdict(_walk, twin, data, ts) == "ok", item.path
    failures = {}
    for path in corpus_files():
        data, ts = dataset_bytes(path)
        verdict = _verdict(_walk, twin, data, ts)
        if verdict != "ok":
            failures[corpus_id(path)] = verdict.split(" at byte")[0]
    assert failures == {
        "test_files/MR_truncated.dcm": "value of (7FE0,0010)",
        "test_files/dicomdirtests/DICOMDIR-nooffset": "item",
        "test_files/rtplan_truncated.dcm": "value of (300A,00B0)",
    }


def test_deflated_walk_and_bomb(twin: Any) -> None:
    enc = ENCODINGS[EXPLICIT_LE]
    plain = _header(enc) + enc.element(0x7FE00010, "OW", bytes(1 << 20))
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = packer.compress(plain) + packer.flush()
    _walk(twin, deflated, DEFLATED_LE)
    # The bomb: 1 MB of deflate that inflates to ~1 GiB is refused at
    # the inflated-size limit, in bounded memory, without inflating it all.
    with pytest.raises(HeaderError, match="inflates past 1048576 bytes"):
        walk.walk_dataset(deflated, DEFLATED_LE, 1 << 20, twin)
    with pytest.raises(HeaderError, match="truncated"):
        _walk(twin, deflated[: len(deflated) // 2], DEFLATED_LE)
    with pytest.raises(HeaderError, match="not valid deflate"):
        _walk(twin, b"\xff" * 100, DEFLATED_LE)
    short = _header(enc) + enc.header(0x7FE00010, "OW", 8192) + bytes(4192)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with pytest.raises(HeaderError, match=r"inflated data: value of \(7FE0,0010\)"):
        _walk(twin, packer.compress(short) + packer.flush(), DEFLATED_LE)


def test_walk_of_a_ct_costs_microseconds(tmp_path: Path) -> None:
    """On the hot path: a 512x512 CT walks in microseconds (compiled), values untouched."""
    data, ts = dataset_bytes(write_series(str(tmp_path), 1)[0])
    compiled = _compiled()
    rounds = 2000
    start = time.perf_counter()
    for _ in range(rounds):
        walk.walk_dataset(data, ts, MAX_INFLATED, compiled)
    per_walk = (time.perf_counter() - start) / rounds
    # A generous bound for a shared 2-core VM; measured ~0.5 us here.
    assert per_walk < 100e-6, f"{per_walk * 1e6:.1f} us per walk"
    # What the server does for it: the first 64 KiB only (~1 us here).
    start = time.perf_counter()
    for _ in range(rounds):
        assert walk.walk_from_prefix(data[:65536], ts, len(data), compiled)
    per_walk = (time.perf_counter() - start) / rounds
    assert per_walk < 100e-6, f"{per_walk * 1e6:.1f} us per walk from the prefix"


@pytest.mark.parametrize("backend", TWINS)
def test_deflated_header_scan_is_bounded(backend: str) -> None:
    """The header scan inflates a deflated data set in doubling chunks up to
    Pixel Data, and no further than MAX_INFLATED (a bomb without Pixel Data)."""
    if backend == "cext" and header.parse_header_cext is None:
        _compiled()  # skips or fails as for the walker
    parse = header.parse_header_cext if backend == "cext" else header.parse_header_py
    enc = ENCODINGS[EXPLICIT_LE]
    private = enc.element(0x00091010, "OB", bytes(300_000))
    plain = _header(enc) + private + enc.element(0x00200013, "IS", pad("7")) + enc.element(0x7FE00010, "OW",
                                                                                            bytes(1 << 20))
    deflated = _deflate(plain)
    fields = parse(deflated, DEFLATED_LE)
    assert (fields.sop_instance_uid, fields.instance_number) == ("1.2.3.4", 7)
    # Cut before Pixel Data: incomplete, or an error when said complete.
    with pytest.raises(IncompleteHeader):
        parse(deflated[:100], DEFLATED_LE, complete=False)
    bomb = _deflate(_header(enc) + enc.element(0x00091010, "OB", bytes(MAX_HEADER_INFLATED + (1 << 20))))
    with pytest.raises(HeaderError, match=f"header inflates past {MAX_HEADER_INFLATED} bytes"):
        parse(bomb, DEFLATED_LE)


def _deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


def test_walk_from_the_prefix_alone(twin: Any, tmp_path: Path) -> None:
    """A data set whose first 64 KiB end inside a value running exactly to
    its end (an image's Pixel Data) is walked from them alone; otherwise the
    caller must walk it all (False), and a prefix that shows it malformed raises."""
    data, ts = dataset_bytes(write_series(str(tmp_path), 1)[0])
    prefix = data[:65536]
    assert walk.walk_from_prefix(prefix, ts, len(data), twin) is True
    enc = ENCODINGS[EXPLICIT_LE]
    head = _header(enc)
    cases = {
        "pixel-data-short": head + enc.header(0x7FE00010, "OW", 600_000) + bytes(500_000),
        "bytes-after-pixel-data": head + enc.header(0x7FE00010, "OW", 100_000) + bytes(100_006),
    }
    for name, bad in cases.items():
        assert walk.walk_from_prefix(bad[:65536], EXPLICIT_LE, len(bad), twin) is False, name
        assert _verdict(_walk, twin, bad, EXPLICIT_LE) != "ok", name
    unclosed = head + enc.header(0x00081115, "SQ", UNDEFINED) + enc.tag(0xFFFEE000) + b"\xff\xff\xff\xff" + (
        enc.header(0x7FE00010, "OW", 100_000) + bytes(100_000))
    with pytest.raises(HeaderError, match="data ends inside the undefined-length"):
        walk.walk_from_prefix(unclosed[:65536], EXPLICIT_LE, len(unclosed), twin)
    assert walk.walk_from_prefix(_deflate(data)[:65536], DEFLATED_LE, len(data), twin) is False
