"""``GET /metrics``: the worker's counters in the Prometheus text format.

Values are read from the live objects at scrape time (a custom collector on a registry
of this app's own), so nothing on the hot path pays for metrics. Like ``/stats`` these
count what this process did since it started; the exactly-once facts are in the topics
and are proven by ``reconcile``.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from pipeline.factory import PipelineApp

#: Stats field -> (metric name without ``_total``, help text)
_COUNTERS = {
    "seen": ("pipeline_events_seen", "Input records handled by the dedup stage"),
    "unique": ("pipeline_events_unique", "Records forwarded to orders.unique"),
    "duplicates_dropped": ("pipeline_duplicates_dropped", "Duplicates dropped by dedup"),
    "dlq": ("pipeline_dead_letters", "Records sent to the dead-letter topic"),
    "rejected": ("pipeline_orders_rejected", "Events rejected by the state machine"),
    "changes": ("pipeline_order_changes", "Accepted order transitions"),
    "coupons": ("pipeline_coupons_issued", "Coupons issued"),
    "expired_ids": ("pipeline_dedup_ids_expired", "Dedup ids removed after the window"),
}


class _AppCollector(Collector):
    def __init__(self, app: PipelineApp) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        app = self.app
        stats = app.stats.as_dict()
        for field, (name, help_text) in _COUNTERS.items():
            yield CounterMetricFamily(name, help_text, value=stats[field])
        eos = app.eos
        yield CounterMetricFamily(
            "pipeline_commits", "Commit rounds (one transaction per partition)", value=eos.commits
        )
        yield CounterMetricFamily(
            "pipeline_deliveries_skipped",
            "Deliveries skipped by the exactly-once admission (stale or early copies)",
            value=eos.skipped,
        )
        yield CounterMetricFamily(
            "pipeline_reseeks", "Seeks back to a record Faust did not deliver", value=eos.reseeks
        )
        yield CounterMetricFamily(
            "pipeline_unstalls", "Partitions resumed by the liveness check", value=eos.unstalls
        )
        latency = GaugeMetricFamily(
            "pipeline_commit_seconds",
            "Duration of recent commit rounds",
            labels=["quantile"],
        )
        recent = list(eos.commit_seconds[-512:])
        if recent:
            ordered = sorted(recent)
            latency.add_metric(["0.5"], statistics.median(ordered))
            latency.add_metric(["0.99"], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))])
            latency.add_metric(["1"], ordered[-1])
        yield latency
        owned = GaugeMetricFamily(
            "pipeline_owned_partitions",
            "Source partitions this worker processes now",
            labels=["topic"],
        )
        counts: dict[str, int] = {}
        for tp in eos.partitions:
            counts[tp.topic] = counts.get(tp.topic, 0) + 1
        for topic, n in sorted(counts.items()):
            owned.add_metric([topic], n)
        yield owned
        yield GaugeMetricFamily(
            "pipeline_rebalancing", "1 while this worker is rebalancing", value=int(app.rebalancing)
        )


def registry_for(app: PipelineApp) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_AppCollector(app))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


# aiohttp refuses a charset inside content_type; the format is UTF-8 by definition.
CONTENT_TYPE = "text/plain; version=0.0.4"
