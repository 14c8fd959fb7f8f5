"""Prometheus rendering (fastscp.monitor.metrics) without a process: exact text, escaping, empty server."""

from __future__ import annotations

import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastscp.monitor.metrics import escape_label_value, format_value, render
from fastscp.status import LATENCY_BUCKETS, SIZE_BUCKETS, Histogram, Totals
from tests.unit.monitor.test_monitor import QUOTED_AE, make_snapshot


@pytest.mark.parametrize(("value", "text"), [
    (0, "0"), (123_456, "123456"), (True, "1"), (False, "0"), (0.001, "0.001"), (2.5, "2.5"),
    (16e3, "16000"), (1e9, "1000000000"), (float("inf"), "+Inf"), (float("-inf"), "-Inf"), (float("nan"), "NaN"),
    (1e20, "1e+20"),
])
def test_format_value(value: float, text: str) -> None:
    assert format_value(value) == text


def test_label_values_escape_backslash_quote_and_line_feed() -> None:
    assert escape_label_value(QUOTED_AE) == 'Q\\"AE\\\\1\\nX'
    line = 'fastscp_instances_by_calling_ae_total{calling_ae="Q\\"AE\\\\1\\nX"} 1'
    assert line in render(make_snapshot()).splitlines()


def test_every_family_has_help_and_type_before_its_samples() -> None:
    text = render(make_snapshot(), now=0)
    assert text.endswith("\n") and "\n\n" not in text
    declared: set[str] = set()
    for line in text.splitlines():
        if match := re.match(r"# (HELP|TYPE) (\S+) ", line):
            declared.add(match.group(2))
            continue
        name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0)  # type: ignore[union-attr]
        assert re.sub(r"_(bucket|sum|count)$", "", name) in declared or name in declared, line


def test_a_server_that_has_stored_nothing() -> None:
    snapshot = make_snapshot(
        open=[], recent=[], totals=Totals(), per_modality={}, per_calling_ae={}, rejects={}, workers=[],
        store_latency_seconds=Histogram.empty(LATENCY_BUCKETS), object_size_bytes=Histogram.empty(SIZE_BUCKETS),
    )
    text = render(snapshot)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["fastscp_instances_stored"].samples[0].value == 0
    assert families["fastscp_instances_by_modality"].samples == []
    assert families["fastscp_workers_alive"].samples[0].value == 0
    latency = families["fastscp_store_latency_seconds"].samples
    assert {s.value for s in latency} == {0} and len(latency) == len(LATENCY_BUCKETS) + 3


def test_age_of_the_figures() -> None:
    snapshot = make_snapshot()
    text = render(snapshot, now=snapshot.time + 7.5)
    assert "fastscp_status_age_seconds 7.5" in text.splitlines()
