"""The status model's histograms."""

from __future__ import annotations

from fastscp.status import LATENCY_BUCKETS, Histogram


def test_a_value_counts_in_the_first_bucket_whose_bound_holds_it() -> None:
    histogram = Histogram.empty((1.0, 2.0, 5.0))
    for value in (0.0, 1.0, 1.5, 2.0, 2.0000001, 5.0, 7.0, 1e9):
        histogram.observe(value)
    # <= 1, <= 2, <= 5, above every bound
    assert histogram.counts == [2, 2, 2, 2]
    assert histogram.count == 8 and histogram.sum == sum((0.0, 1.0, 1.5, 2.0, 2.0000001, 5.0, 7.0, 1e9))
    latency = Histogram.empty(LATENCY_BUCKETS)
    latency.observe(LATENCY_BUCKETS[-1] + 1)
    assert latency.counts[-1] == 1 and len(latency.counts) == len(LATENCY_BUCKETS) + 1
