"""Association negotiation: an A-ASSOCIATE-RQ negotiated afresh (pynetdicom decodes it and
negotiates each presentation context) against one the worker remembers
(:class:`fastscp.net.negotiation.AcceptedRequests`: a modality sends the same request at every
association, some at every image; the modalities of one make and the senders of one PACS send the
same request but for their Calling AE Title).

Run with ``pytest bench/test_bench_negotiation.py --benchmark-only``. Requests of 12 presentation
contexts (the load benchmark's mixed corpus) and of 120 (about what dcmtk's ``storescu`` proposes
without ``-xf``: its storage SOP classes, three transfer syntaxes each); the remembered case
reports its speed-up over the fresh one (printed, and ``extra_info["x_vs_fresh"]``).
"""

from __future__ import annotations

import pytest

from fastscp.dicom.sopclasses import STORAGE_SOP_CLASSES
from fastscp.net.negotiation import ACCEPTED, AcceptancePolicy, negotiate
from tests.rawscu import associate_rq

SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.90"]
POLICY = AcceptancePolicy(ae_title="FASTSCP", storage_sop_classes=frozenset(STORAGE_SOP_CLASSES.values()),
                          max_pdu_size=262144)
#: Seconds per fresh negotiation by number of contexts; filled as tests run.
FRESH: dict[int, float] = {}


def _request(contexts: int, aet: str = "RAWSCU") -> bytes:
    classes = sorted(STORAGE_SOP_CLASSES.values())
    return associate_rq([(classes[i // len(SYNTAXES)], [SYNTAXES[i % len(SYNTAXES)]]) for i in range(contexts)],
                        aet=aet)


def _received(pdu: bytes) -> tuple[bytes, AcceptancePolicy]:
    """Arguments as an association passes them: new bytes from the socket, whose hash is not known yet."""
    return bytes(bytearray(pdu)), POLICY


@pytest.mark.parametrize("contexts", [12, 120])
def test_negotiate_fresh(benchmark, contexts: int) -> None:
    benchmark.group = f"A-ASSOCIATE-RQ, {contexts} contexts"
    pdu = _request(contexts)

    def forget() -> tuple[tuple[bytes, AcceptancePolicy], dict]:
        ACCEPTED.clear()
        return _received(pdu), {}
    result = benchmark.pedantic(negotiate, setup=forget, rounds=200, iterations=1)
    assert result.accepted and len(result.contexts) == contexts
    if benchmark.stats is not None:  # None with --benchmark-disable
        FRESH[contexts] = benchmark.stats.stats.median


@pytest.mark.parametrize("sender", ["same", "another"])
@pytest.mark.parametrize("contexts", [12, 120])
def test_negotiate_remembered(benchmark, contexts: int, sender: str, capsys) -> None:
    """The request remembered from the same sender, or from another one (another Calling AE Title)."""
    benchmark.group = f"A-ASSOCIATE-RQ, {contexts} contexts"
    pdu = _request(contexts)
    ACCEPTED.clear()
    negotiate(pdu if sender == "same" else _request(contexts, aet="OTHERSCU"), POLICY)
    result = benchmark.pedantic(negotiate, setup=lambda: (_received(pdu), {}), rounds=2000, iterations=1)
    ACCEPTED.clear()
    assert result.accepted and len(result.contexts) == contexts
    if contexts in FRESH and benchmark.stats is not None:
        ratio = FRESH[contexts] / benchmark.stats.stats.median
        benchmark.extra_info["x_vs_fresh"] = round(ratio, 1)
        with capsys.disabled():
            print(f"\n{contexts} contexts, {sender} sender: remembered {ratio:.0f}x faster than negotiated afresh")
