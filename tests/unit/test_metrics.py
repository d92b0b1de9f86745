"""``/metrics`` renders the live counters in the Prometheus text format."""

from __future__ import annotations

from types import SimpleNamespace

from faust.types import TP
from prometheus_client.parser import text_string_to_metric_families

from pipeline.metrics import registry_for, render
from pipeline.stats import Stats


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_read_the_live_objects_at_scrape_time() -> None:
    stats = Stats(seen=10, unique=7, duplicates_dropped=2, dlq=1, rejected=3)
    eos = SimpleNamespace(
        commits=4,
        skipped=5,
        reseeks=1,
        unstalls=0,
        commit_seconds=[0.01, 0.02, 0.03],
        partitions={TP("orders.raw", 0): None, TP("orders.raw", 1): None, TP("u", 0): None},
    )
    app = SimpleNamespace(stats=stats, eos=eos, rebalancing=False)
    registry = registry_for(app)  # type: ignore[arg-type]
    first = _samples(render(registry))
    assert first[("pipeline_events_seen_total", ())] == 10
    assert first[("pipeline_dead_letters_total", ())] == 1
    assert first[("pipeline_commits_total", ())] == 4
    assert first[("pipeline_commit_seconds", (("quantile", "0.5"),))] == 0.02
    assert first[("pipeline_commit_seconds", (("quantile", "1"),))] == 0.03
    assert first[("pipeline_owned_partitions", (("topic", "orders.raw"),))] == 2
    assert first[("pipeline_rebalancing", ())] == 0
    # Nothing is copied at registration: the next scrape sees the new values.
    stats.seen = 11
    app.rebalancing = True
    second = _samples(render(registry))
    assert second[("pipeline_events_seen_total", ())] == 11
    assert second[("pipeline_rebalancing", ())] == 1
