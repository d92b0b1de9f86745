"""``GET /metrics``: the worker's counters in the Prometheus text format.

Values are read from the live objects at scrape time (a custom collector on a registry
of this app's own), so nothing on the hot path pays for metrics. Like ``/stats`` these
count what this process did since it started; the exactly-once facts are in the topics
and are proven by ``reconcile``.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from faust.sensors.prometheus import FaustMetrics
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pipeline.eos.faust.monitor import CachingPrometheusMonitor

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


class _ProducerRetries(logging.Handler):
    """Counts aiokafka's produce retries (the seed article's "producer resend rate").

    aiokafka keeps no retry counter; its sender logs every retried produce response at
    WARNING, and this handler counts those records. Process-wide, like the producers.
    """

    count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying" in str(record.msg):
            _ProducerRetries.count += 1


_retries = _ProducerRetries(level=logging.WARNING)
logging.getLogger("aiokafka.producer.sender").addHandler(_retries)


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
            "pipeline_quiet_commits",
            "Commit rounds started early because the agents had gone quiet",
            value=eos.quiet_commits,
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
        yield GaugeMetricFamily(
            "pipeline_partition_stalled_seconds",
            "The longest a partition of this worker has had records waiting with none"
            " processed (0: none)",
            value=eos.stalled_seconds(),
        )
        yield CounterMetricFamily(
            "pipeline_event_failures",
            "Events whose processing raised (each aborts its partition's transaction)",
            value=eos.failures,
        )
        yield CounterMetricFamily(
            "pipeline_partition_rewinds",
            "Partitions aborted and processed again from their last commit after a failure",
            value=eos.rewinds,
        )
        yield CounterMetricFamily(
            "pipeline_partitions_fenced",
            "Partitions given up because another producer took their transactional id "
            "(a new owner, or the broker after a transaction timed out)",
            value=eos.fences,
        )
        yield CounterMetricFamily(
            "pipeline_poison_records",
            "Events dead-lettered after failing every attempt",
            value=eos.poison,
        )
        yield CounterMetricFamily(
            "pipeline_offset_checks_unknown",
            "Offset-gap checks the broker did not answer in time (the event was fetched again)",
            value=eos.unknown_checks,
        )
        yield CounterMetricFamily(
            "pipeline_progress_recoveries",
            "Partitions resumed from the progress topic: the group's offset was gone",
            value=eos.progress_recoveries,
        )
        yield CounterMetricFamily(
            "pipeline_held_waits",
            "Times processing of a partition waited for its commit: it held the most sends "
            "a committing partition may hold",
            value=eos.held_waits,
        )
        gaps = CounterMetricFamily(
            "pipeline_offset_gap_checks",
            "Offset gaps checked before admitting a record, by where the answer came from",
            labels=["source"],
        )
        gaps.add_metric(["fetch"], eos.ledger_answers)
        gaps.add_metric(["broker"], eos.broker_checks)
        yield gaps
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
            "pipeline_rebalancing",
            "1 while this worker is rebalancing or restoring its tables",
            value=int(app.recovering),
        )
        yield from eos.commit_histogram.collect()
        yield CounterMetricFamily(
            "pipeline_transactions_aborted",
            "Transactions this process aborted (a crashed worker's are aborted by the broker;"
            " see process_start_time_seconds for restarts)",
            value=eos.aborts,
        )
        yield CounterMetricFamily(
            "pipeline_producer_retries",
            "Produce requests aiokafka retried (retriable broker errors)",
            value=_ProducerRetries.count,
        )
        yield from self._lag()
        yield from app.recoveries.collect()
        remaining = GaugeMetricFamily(
            "pipeline_restore_remaining_records",
            "Changelog records still to restore (active: before processing may start)",
            labels=["kind"],
        )
        recovery: Any = app.tables.recovery  # type: ignore[attr-defined]
        # In exactly-once mode the active changelogs are restored by the coordinator.
        ours = sum(eos.restore_remaining.values())
        remaining.add_metric(["active"], recovery.active_remaining_total() + ours)
        # And the standby copies of those changelogs by the coordinator's follower.
        theirs = eos.standby.remaining_total()
        remaining.add_metric(["standby"], recovery.standby_remaining_total() + theirs)
        yield remaining
        keys = GaugeMetricFamily(
            "pipeline_table_keys",
            "Keys in a table's local store on this worker (RocksDB's estimate)",
            labels=["table"],
        )
        for table in list(app.tables.values()):
            store: Any = table.data
            if hasattr(store, "estimated_keys"):
                keys.add_metric([table.name], store.estimated_keys())
        yield keys

    def _lag(self) -> Iterator[Metric]:
        """Per owned source partition: end offset minus the next offset to process.

        The end is the consumer's last known last-stable offset (it counts transaction
        markers, so a caught-up partition behind a transactional topic shows 1 or 2).
        """
        lag = GaugeMetricFamily(
            "pipeline_consumer_lag",
            "Records not yet processed, per source partition this worker owns",
            labels=["topic", "partition"],
        )
        consumer = self.app.consumer
        for tp, st in list(self.app.eos.partitions.items()):
            nxt = st.processed + 1 if st.processed is not None else st.expected
            try:
                end = consumer.highwater(tp)
            except Exception:  # not fetched yet, or the assignment just moved
                continue
            if nxt is None or end is None or end < 0:
                continue
            lag.add_metric([tp.topic, str(tp.partition)], max(0, end - nxt))
        yield lag


def registry_for(app: PipelineApp) -> CollectorRegistry:
    """This app's registry: our collector, Faust's Prometheus sensor, the process."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_AppCollector(app))
    # Faust's own sensor (messages, events, commits, send latency, rebalances, ...) on
    # the same registry, under faust_*; its setup_prometheus_sensors would also add a
    # second /metrics page.
    app.monitor = CachingPrometheusMonitor(metrics=FaustMetrics.create(registry, "faust"))
    # CPU, memory, open files, and the start time that shows restarts.
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


# aiohttp refuses a charset inside content_type; the format is UTF-8 by definition.
CONTENT_TYPE = "text/plain; version=0.0.4"
