"""DIMSE and upper-layer hot paths: fastscp's data phase against pynetdicom's.

Run with ``pytest bench/test_bench_dimse.py --benchmark-only``. fastscp runs
the data transfer phase itself (``fastscp/net/association.py``, ``fastscp/net/dimse.py``);
each benchmark measures the pynetdicom code it replaced in the same run and
reports the speed-up (printed, and ``extra_info["x_vs_pynetdicom"]`` in
``--benchmark-json``).

* C-STORE-RQ command set -> values: :func:`fastscp.net.dimse.decode_command_set`
  vs ``pynetdicom.dsutils.decode`` plus reading the fields a Storage SCP uses
  (pydicom converts values lazily, so decoding alone is not the whole cost;
  it is measured too, for information).
* C-STORE-RSP -> bytes: :func:`fastscp.net.dimse.encode_response` vs pynetdicom's
  ``C_STORE`` primitive -> ``C_STORE_RSP.primitive_to_message`` ->
  ``dsutils.encode``; and the same to P-DATA-TF PDUs on the wire
  (:func:`fastscp.net.pdu.p_data_tf` vs ``encode_msg`` +
  ``P_DATA_TF.from_primitive().encode()``, what ``DIMSEServiceProvider.send_msg``
  does).
* The compiled codec against its pure-Python twin (``fastscp/net/_dimse_cext.pyx``,
  ``fastscp/net/_dimse_py.py``): the decode and encode above run once per
  twin (``[py]``, ``[cext]``), each against pynetdicom, and the cext case
  also reports its speed-up over the py case (``extra_info["x_vs_py"]``);
  likewise ``is_uid`` of a 62-character SOP Instance UID (a regex in the twin).
* P-DATA-TF parsing: a 512x512 CT data set (~0.5 MiB) in PDUs of 16 KiB
  (most senders' maximum) and 256 KiB (fastscp's default), from a buffer:
  fastscp's data path as its pure-Python twin runs it (``DataPathPy.pump``:
  the compiled loop reads a socket's descriptor, not a buffer) vs pynetdicom's
  ``P_DATA_TF().decode`` + ``to_primitive`` + ``DIMSEMessage.decode_msg``.
  Both write the fragments to a ``BytesIO``, as pynetdicom does.
"""

from __future__ import annotations

import statistics
import struct
import timeit
from collections.abc import Callable
from io import BytesIO

import pytest
from pydicom.uid import CTImageStorage
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import P_DATA_TF

from fastscp.net import dimse
from fastscp.net.datapath import FRAGMENT, DataPathPy
from fastscp.net.pdu import PDUStream, PeerClosed, p_data_tf

SOP_INSTANCE = "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345"
#: As the association passes it: a str decoded from the request (a pydicom UID, a str
#: subclass, would take the compiled codec's fall-back to the twin).
CT = str(CTImageStorage)
CONTEXT_ID = 1
#: Seconds per call of the peer (pynetdicom) by group; filled as tests run.
PEERS: dict[str, float] = {}
#: Seconds per call of the pure-Python twin (the compiled one's peer) by group; filled as tests run.
TWIN_PY: dict[str, float] = {}
TWINS = ["py", "cext"]


# -- encoded fixtures ---------------------------------------------------------------------

def c_store_rq_command_set() -> bytes:
    """The C-STORE-RQ command set pynetdicom's SCU sends (Implicit VR LE):
    (0000,0000) UL group length, (0000,0002) UI CT Image Storage,
    (0000,0100) US 0x0001, (0000,0110) US 7, (0000,0700) US 2 (low priority),
    (0000,0800) US 0x0000 (data set present), (0000,1000) UI SOP_INSTANCE."""
    primitive = C_STORE()
    primitive.MessageID = 7
    primitive.AffectedSOPClassUID = CTImageStorage
    primitive.AffectedSOPInstanceUID = SOP_INSTANCE
    primitive.Priority = 2
    primitive.DataSet = BytesIO(b"\x00" * 8)
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return encode(message.command_set, True, True)


def ct_pdus(max_pdu: int, dataset_length: int = 512 * 512 * 2 + 1024) -> bytes:
    """P-DATA-TF PDUs of at most ``max_pdu`` bytes carrying one data set
    (one PDV each, none marked last: the middle of a C-STORE)."""
    room = max_pdu - 6  # PDV item length field + context ID + control header
    payload = bytes(range(256)) * (dataset_length // 256 + 1)
    out = bytearray()
    for start in range(0, dataset_length, room):
        chunk = payload[start : min(start + room, dataset_length)]
        out += struct.pack(">BxI", 0x04, len(chunk) + 6)
        out += struct.pack(">IBB", len(chunk) + 2, CONTEXT_ID, 0x00)
        out += chunk
    return bytes(out)


class _BufferSocket:
    """recv_into from a bytes buffer, as the kernel copies from a socket."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def recv_into(self, view: memoryview) -> int:
        n = min(len(view), len(self.data) - self.pos)
        view[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n

    def setsockopt(self, *args: object) -> None:
        pass


# -- helpers ---------------------------------------------------------------------------------

def _median_seconds(func: Callable[[], object]) -> float:
    number = max(1, int(0.05 / max(timeit.timeit(func, number=1), 1e-7)))
    return statistics.median(timeit.repeat(func, number=number, repeat=7)) / number


def _report(benchmark, capsys: pytest.CaptureFixture, group: str, peer: Callable[[], object] | None,
            twin: str = "", twin_py: Callable[[], object] | None = None) -> None:
    """Print and record the speed-up over pynetdicom (``peer``) and, for the ``twin`` "cext",
    over the pure-Python twin (``twin_py``)."""
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing measured
        return
    mine = benchmark.stats.stats.median
    line = f"{group}: fastscp{f' {twin}' if twin else ''} {mine * 1e6:.2f} us"
    if peer is not None:
        theirs = PEERS.get(group)
        if theirs is None:  # the peer's test did not run (-k): measure it here
            theirs = PEERS[group] = _median_seconds(peer)
        ratio = theirs / mine
        benchmark.extra_info["x_vs_pynetdicom"] = round(ratio, 1)
        line += f", pynetdicom {theirs * 1e6:.2f} us: {ratio:.1f}x"
    if twin == "py":
        TWIN_PY[group] = mine
    elif twin == "cext" and twin_py is not None:
        py = TWIN_PY.get(group)
        if py is None:  # the py case did not run (-k): measure it here
            py = TWIN_PY[group] = _median_seconds(twin_py)
        benchmark.extra_info["x_vs_py"] = round(py / mine, 1)
        line += f"; py twin {py * 1e6:.2f} us: {py / mine:.1f}x"
    with capsys.disabled():
        print(f"\n  {line}")


def _twin(name: str, twin: str) -> Callable[..., object]:
    """``dimse.<name>_<twin>``: the compiled codec's function or the pure-Python twin's."""
    func = getattr(dimse, f"{name}_{twin}")
    if func is None:
        pytest.fail("fastscp.net._dimse_cext is not built")
    return func


def _peer(benchmark, group: str, func: Callable[[], object]) -> object:
    benchmark.group = group
    result = benchmark(func)
    if benchmark.stats is not None:
        PEERS[group] = benchmark.stats.stats.median
    return result


# -- C-STORE-RQ command set ----------------------------------------------------------------

RQ = c_store_rq_command_set()
RQ_GROUP = "C-STORE-RQ command set decode"
FIELDS = ("CommandField", "MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority",
          "CommandDataSetType")


def _pynetdicom_decode_rq() -> list[object]:
    ds = decode(BytesIO(RQ), True, True)
    return [ds.get(keyword) for keyword in FIELDS]


def test_decode_rq_pynetdicom(benchmark) -> None:
    """The peer: decode, then read the fields a Storage SCP needs."""
    values = _peer(benchmark, RQ_GROUP, _pynetdicom_decode_rq)
    assert values[0] == dimse.C_STORE_RQ and values[3] == SOP_INSTANCE


def test_decode_rq_pynetdicom_lazy(benchmark) -> None:
    """For information: pynetdicom's decode alone (values still undecoded)."""
    benchmark.group = RQ_GROUP
    benchmark(decode, BytesIO(RQ), True, True)


@pytest.mark.parametrize("twin", TWINS)
def test_decode_rq_fastscp(benchmark, capsys, twin: str) -> None:
    decode_command_set = _twin("decode_command_set", twin)
    benchmark.group = RQ_GROUP
    request = benchmark(decode_command_set, RQ)
    assert [request.get(k) for k in FIELDS] == _pynetdicom_decode_rq()
    _report(benchmark, capsys, RQ_GROUP, _pynetdicom_decode_rq, twin, lambda: dimse.decode_command_set_py(RQ))


# -- C-STORE-RSP -------------------------------------------------------------------------------

RSP_GROUP = "C-STORE-RSP command set encode"
WIRE_GROUP = "C-STORE-RSP to P-DATA-TF bytes"
PEER_MAX_PDU = 16384


def _pynetdicom_rsp_message() -> C_STORE_RSP:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 7
    primitive.AffectedSOPClassUID = CTImageStorage
    primitive.AffectedSOPInstanceUID = SOP_INSTANCE
    primitive.Status = 0x0000
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    return message


def _pynetdicom_encode_rsp() -> bytes:
    return encode(_pynetdicom_rsp_message().command_set, True, True)


def _pynetdicom_rsp_wire() -> bytes:
    out = bytearray()
    for p_data in _pynetdicom_rsp_message().encode_msg(CONTEXT_ID, PEER_MAX_PDU):
        pdu = P_DATA_TF()
        pdu.from_primitive(p_data)
        out += pdu.encode()
    return bytes(out)


def _fastscp_encode_rsp(encode_response: Callable[..., bytes] = dimse.encode_response) -> bytes:
    return encode_response(dimse.C_STORE_RSP, CT, 7, dimse.SUCCESS, SOP_INSTANCE)


def _fastscp_rsp_wire() -> bytes:
    return p_data_tf(CONTEXT_ID, _fastscp_encode_rsp(), PEER_MAX_PDU)


def test_encode_rsp_pynetdicom(benchmark) -> None:
    _peer(benchmark, RSP_GROUP, _pynetdicom_encode_rsp)


@pytest.mark.parametrize("twin", TWINS)
def test_encode_rsp_fastscp(benchmark, capsys, twin: str) -> None:
    encode_response = _twin("encode_response", twin)
    benchmark.group = RSP_GROUP
    encoded = benchmark(_fastscp_encode_rsp, encode_response)
    theirs = decode(BytesIO(_pynetdicom_encode_rsp()), True, True)
    ours = decode(BytesIO(encoded), True, True)
    for keyword in ("CommandField", "MessageIDBeingRespondedTo", "AffectedSOPClassUID",
                    "AffectedSOPInstanceUID", "Status", "CommandDataSetType", "CommandGroupLength"):
        assert ours.get(keyword) == theirs.get(keyword), keyword
    _report(benchmark, capsys, RSP_GROUP, _pynetdicom_encode_rsp, twin,
            lambda: _fastscp_encode_rsp(dimse.encode_response_py))


def test_rsp_wire_pynetdicom(benchmark) -> None:
    _peer(benchmark, WIRE_GROUP, _pynetdicom_rsp_wire)


def test_rsp_wire_fastscp(benchmark, capsys) -> None:
    benchmark.group = WIRE_GROUP
    wire = benchmark(_fastscp_rsp_wire)
    pdu = P_DATA_TF()
    pdu.decode(wire)
    (item,) = pdu.presentation_data_value_items
    data = item.presentation_data_value
    assert item.presentation_context_id == CONTEXT_ID and data[0] == 0x03  # command, last fragment
    assert data[1:] == _fastscp_encode_rsp()
    _report(benchmark, capsys, WIRE_GROUP, _pynetdicom_rsp_wire)


# -- is_uid ----------------------------------------------------------------------------------------

UID_GROUP = "is_uid of a 62-character SOP Instance UID"


@pytest.mark.parametrize("twin", TWINS)
def test_is_uid(benchmark, capsys, twin: str) -> None:
    """Three per C-STORE: the SOP Instance UID when it begins, both UIDs again when it is answered."""
    is_uid = _twin("is_uid", twin)
    benchmark.group = UID_GROUP
    assert benchmark(is_uid, SOP_INSTANCE) is True
    _report(benchmark, capsys, UID_GROUP, None, twin, lambda: dimse.is_uid_py(SOP_INSTANCE))


# -- P-DATA-TF parsing ----------------------------------------------------------------------------

PDU_SIZES = {"16KiB": 16384, "256KiB": 262144}


def _pynetdicom_parse(buffer: bytes) -> int:
    message = C_STORE_RQ()
    message.command_set = decode(BytesIO(RQ), True, True)
    message.data_set = BytesIO()
    pos, end = 0, len(buffer)
    while pos < end:
        # pynetdicom's DUL reads the 6-byte header, then the rest of the PDU.
        length = struct.unpack_from(">I", buffer, pos + 2)[0]
        pdu = P_DATA_TF()
        pdu.decode(buffer[pos : pos + 6 + length])
        pos += 6 + length
        message.decode_msg(pdu.to_primitive())
    return message.data_set.tell()


def _fastscp_parse(buffer: bytes, max_pdu: int) -> int:
    stream = PDUStream(_BufferSocket(buffer), max_pdu)  # type: ignore[arg-type]
    path = DataPathPy(stream, 1 << 16)
    sink = BytesIO()
    try:
        while True:
            assert path.pump() == FRAGMENT
            sink.write(path.fragment)
    except PeerClosed:  # the buffer's end
        return sink.tell()


@pytest.mark.parametrize("size", list(PDU_SIZES))
def test_parse_pynetdicom(benchmark, size: str) -> None:
    buffer = ct_pdus(PDU_SIZES[size])
    received = _peer(benchmark, f"P-DATA-TF parse, CT in {size} PDUs", lambda: _pynetdicom_parse(buffer))
    assert received == 512 * 512 * 2 + 1024


@pytest.mark.parametrize("size", list(PDU_SIZES))
def test_parse_fastscp(benchmark, capsys, size: str) -> None:
    group = f"P-DATA-TF parse, CT in {size} PDUs"
    buffer = ct_pdus(PDU_SIZES[size])
    benchmark.group = group
    received = benchmark(_fastscp_parse, buffer, PDU_SIZES[size])
    assert received == _pynetdicom_parse(buffer) == 512 * 512 * 2 + 1024
    _report(benchmark, capsys, group, lambda: _pynetdicom_parse(buffer))
