"""``stream.metrics.observe_many`` equals one ``Histogram.observe`` per value
(it bins values itself and bumps prometheus_client's internal bucket values,
so a change in that library must fail here, not skew a dashboard)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from stream.metrics import observe_many

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def _samples(h: Histogram) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in h.collect() for s in m.samples
            if not s.name.endswith("_created")}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(BUCKETS), st.floats(0, 100, allow_nan=False)), max_size=300))
def test_observe_many_equals_observe_one_by_one(values):
    one, many = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("lat_seconds", "x", buckets=BUCKETS, registry=one)
    h2 = Histogram("lat_seconds", "x", buckets=BUCKETS, registry=many)
    for v in values:
        h1.observe(v)
    observe_many(h2, values)
    a, b = _samples(h1), _samples(h2)
    assert a.keys() == b.keys()
    for k in a:
        assert abs(a[k] - b[k]) <= 1e-9 * max(1.0, abs(a[k])), (k, a[k], b[k])
