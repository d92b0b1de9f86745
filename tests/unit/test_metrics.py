"""``/metrics`` renders the live counters in the Prometheus text format."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

from faust.types import TP
from prometheus_client import Histogram
from prometheus_client.parser import text_string_to_metric_families

from pipeline.eos import PartitionState
from pipeline.eos.standby import StandbyFollower
from pipeline.metrics import registry_for, render
from pipeline.stats import Stats


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _histogram(name: str) -> Histogram:
    return Histogram(name, "test", buckets=(0.01, 0.1, 1), registry=None)


def _following(remaining: dict[TP, int | None]) -> StandbyFollower:
    """The coordinator's standby follower, with copies 3 records behind and one not
    measured yet (it counts as 1)."""

    async def no_reader() -> None:
        raise AssertionError("never started")

    follower = StandbyFollower(no_reader)
    follower.remaining = dict(remaining)
    return follower


def _app() -> SimpleNamespace:
    raw0, raw1, u0 = TP("orders.raw", 0), TP("orders.raw", 1), TP("u", 0)
    eos = SimpleNamespace(
        commits=4,
        quiet_commits=3,
        skipped=5,
        reseeks=1,
        unstalls=0,
        ledger_answers=12,
        broker_checks=3,
        aborts=2,
        failures=6,
        rewinds=5,
        poison=1,
        fences=2,
        unknown_checks=4,
        progress_recoveries=8,
        held_waits=9,
        stalled_seconds=lambda: 12.5,
        # the coordinator's own restore of the active changelogs, under way
        restore_remaining={TP("dedup-changelog", 0): 5, TP("dedup-changelog", 1): 2},
        standby=_following({TP("dedup-changelog", 2): 3, TP("dedup-changelog", 3): None}),
        commit_seconds=[0.01, 0.02, 0.03],
        commit_histogram=_histogram("pipeline_commit_duration_seconds"),
        partitions={
            raw0: PartitionState(processed=41),
            raw1: PartitionState(expected=7),
            u0: PartitionState(),
        },
    )
    for v in eos.commit_seconds:
        eos.commit_histogram.observe(v)
    ends = {raw0: 50, raw1: 7}
    recovery = SimpleNamespace(active_remaining_total=lambda: 5, standby_remaining_total=lambda: 30)
    dedup = SimpleNamespace(name="dedup", data=SimpleNamespace(estimated_keys=lambda: 1234))
    plain = SimpleNamespace(name="other", data=object())
    return SimpleNamespace(
        stats=Stats(seen=10, unique=7, duplicates_dropped=2, dlq=1, rejected=3),
        eos=eos,
        rebalancing=False,
        recovering=False,
        consumer=SimpleNamespace(highwater=ends.__getitem__),
        tables=SimpleNamespace(recovery=recovery, values=lambda: [dedup, plain]),
        recoveries=_histogram("pipeline_recovery_seconds"),
    )


def test_metrics_read_the_live_objects_at_scrape_time() -> None:
    app = _app()
    registry = registry_for(app)  # type: ignore[arg-type]
    first = _samples(render(registry))
    assert first[("pipeline_events_seen_total", ())] == 10
    assert first[("pipeline_dead_letters_total", ())] == 1
    assert first[("pipeline_commits_total", ())] == 4
    assert first[("pipeline_quiet_commits_total", ())] == 3
    assert first[("pipeline_commit_seconds", (("quantile", "0.5"),))] == 0.02
    assert first[("pipeline_commit_seconds", (("quantile", "1"),))] == 0.03
    assert first[("pipeline_owned_partitions", (("topic", "orders.raw"),))] == 2
    assert first[("pipeline_rebalancing", ())] == 0
    assert first[("pipeline_transactions_aborted_total", ())] == 2
    assert first[("pipeline_offset_gap_checks_total", (("source", "fetch"),))] == 12
    assert first[("pipeline_offset_gap_checks_total", (("source", "broker"),))] == 3
    assert first[("pipeline_partition_stalled_seconds", ())] == 12.5
    assert first[("pipeline_event_failures_total", ())] == 6
    assert first[("pipeline_partition_rewinds_total", ())] == 5
    assert first[("pipeline_poison_records_total", ())] == 1
    assert first[("pipeline_partitions_fenced_total", ())] == 2
    assert first[("pipeline_offset_checks_unknown_total", ())] == 4
    assert first[("pipeline_progress_recoveries_total", ())] == 8
    assert first[("pipeline_held_waits_total", ())] == 9
    # Nothing is copied at registration: the next scrape sees the new values.
    app.stats.seen = 11
    # Restoring after Faust's rebalance ended counts too (PipelineApp.recovering).
    app.recovering = True
    second = _samples(render(registry))
    assert second[("pipeline_events_seen_total", ())] == 11
    assert second[("pipeline_rebalancing", ())] == 1


def test_commit_latency_is_a_histogram() -> None:
    samples = _samples(render(registry_for(_app())))  # type: ignore[arg-type]
    bucket = "pipeline_commit_duration_seconds_bucket"
    assert samples[(bucket, (("le", "0.01"),))] == 1
    assert samples[(bucket, (("le", "0.1"),))] == 3
    assert samples[("pipeline_commit_duration_seconds_count", ())] == 3


def test_lag_per_partition_from_the_next_offset_to_process() -> None:
    samples = _samples(render(registry_for(_app())))  # type: ignore[arg-type]
    # processed 41 of an end at 50: 42..49 remain; expected 7 at end 7: none.
    assert samples[("pipeline_consumer_lag", (("partition", "0"), ("topic", "orders.raw")))] == 8
    assert samples[("pipeline_consumer_lag", (("partition", "1"), ("topic", "orders.raw")))] == 0
    # A partition with nothing known yet (no end, no position) is left out, not 0.
    assert ("pipeline_consumer_lag", (("partition", "0"), ("topic", "u"))) not in samples


def test_restore_and_table_size() -> None:
    samples = _samples(render(registry_for(_app())))  # type: ignore[arg-type]
    # Faust's recovery (5) plus the coordinator's restore (5 + 2).
    assert samples[("pipeline_restore_remaining_records", (("kind", "active"),))] == 12
    # Faust's own standby count (tables the engine does not follow) and the follower's.
    assert samples[("pipeline_restore_remaining_records", (("kind", "standby"),))] == 30 + 4
    assert samples[("pipeline_table_keys", (("table", "dedup"),))] == 1234
    assert ("pipeline_table_keys", (("table", "other"),)) not in samples
    assert ("pipeline_recovery_seconds_count", ()) in samples


def test_producer_retries_are_counted_from_aiokafka_sender_warnings() -> None:
    registry = registry_for(_app())  # type: ignore[arg-type]
    before = _samples(render(registry))[("pipeline_producer_retries_total", ())]
    sender = logging.getLogger("aiokafka.producer.sender")
    # Levels are process-wide: make sure this logger passes warnings, as in a worker.
    saved = [(lg, lg.level) for lg in (sender, logging.getLogger("aiokafka"))]
    for lg, _ in saved:
        lg.setLevel(logging.WARNING)
    try:
        sender.warning(
            "Got error produce response on topic-partition %s, retrying. Error: %s", 1, 2
        )
        sender.warning("something else")
    finally:
        for lg, level in saved:
            lg.setLevel(level)
    after = _samples(render(registry))[("pipeline_producer_retries_total", ())]
    assert after == before + 1


def test_faust_sensor_and_process_metrics_share_the_registry() -> None:
    app = _app()
    samples = _samples(render(registry_for(app)))  # type: ignore[arg-type]
    assert ("faust_messages_received_total", ()) in samples
    assert ("process_start_time_seconds", ()) in samples
    assert app.monitor is not None


class _Stream:
    """What Faust's monitors read of a stream."""

    def __init__(self, label: str) -> None:
        self.shortlabel = f"Stream: {label}"
        self.task_owner = _Message()  # any object Faust can keep a weak reference to

    def __str__(self) -> str:
        return self.shortlabel


class _Message:
    time_in: float | None = None
    time_out: float | None = None
    time_total: float | None = None


def test_caching_sensor_exports_what_faust_sensor_exports() -> None:
    from faust.sensors.prometheus import FaustMetrics, PrometheusMonitor
    from prometheus_client import CollectorRegistry

    from pipeline.metrics import CachingPrometheusMonitor

    def run(monitor_type: type[PrometheusMonitor]) -> dict[tuple[str, Any], float]:
        registry = CollectorRegistry(auto_describe=False)
        monitor = monitor_type(metrics=FaustMetrics.create(registry, "faust"))
        streams = [_Stream("Topic: orders.raw"), _Stream("Topic: orders.unique")]
        tables = [SimpleNamespace(name="dedup"), SimpleNamespace(name="orders")]
        for i in range(300):
            tp = TP("orders.raw" if i % 3 else "orders.unique", i % 4)
            stream = streams[i % 2]
            monitor.on_message_in(tp, i, _Message())  # type: ignore[arg-type]
            state = monitor.on_stream_event_in(tp, i, stream, None)  # type: ignore[arg-type]
            monitor.on_stream_event_out(tp, i, stream, None, state)  # type: ignore[arg-type]
            monitor.track_tp_end_offset(tp, i + 10)
            table = tables[i % 2]
            monitor.on_table_get(table, i)  # type: ignore[arg-type]
            if i % 5 == 0:
                monitor.on_table_set(table, i, i)  # type: ignore[arg-type]
            if i % 7 == 0:
                monitor.on_table_del(table, i)  # type: ignore[arg-type]
        return {
            k: v
            for k, v in _samples(render(registry)).items()
            # timings differ run to run; their counts must not
            if not k[0].endswith(("_sum", "_created")) and "_bucket" not in k[0]
        }

    ours, faust = run(CachingPrometheusMonitor), run(PrometheusMonitor)
    assert ours == faust
    assert ours[("faust_messages_received_per_topic_total", (("topic", "orders.raw"),))] == 200
    assert (
        ours[
            (
                "faust_table_operations_total",
                (("operation", "keys_updated"), ("table", "table.dedup")),
            )
        ]
        == 30
    )
    assert ours[("faust_topic_partition_end_offset", (("partition", "3"), ("topic", "orders.raw")))]


def test_a_batch_counts_as_its_records_in_faust_received_metrics() -> None:
    """Exactly-once stages get batches, never Faust messages: ``on_batch_in`` moves the
    received counters (total, per topic, last offset per partition) as many per-record
    ``on_message_in`` calls would."""
    from faust.sensors.prometheus import FaustMetrics
    from prometheus_client import CollectorRegistry

    from pipeline.metrics import CachingPrometheusMonitor

    def run(batched: bool) -> dict[tuple[str, Any], float]:
        registry = CollectorRegistry(auto_describe=False)
        monitor = CachingPrometheusMonitor(metrics=FaustMetrics.create(registry, "faust"))
        for p, (start, end) in enumerate([(0, 40), (7, 9), (100, 101)]):
            tp = TP("orders.raw", p)
            if batched:
                monitor.on_batch_in(tp, end - start, end - 1)
            else:
                for offset in range(start, end):
                    monitor.on_message_in(tp, offset, _Message())  # type: ignore[arg-type]
        return {
            k: v
            for k, v in _samples(render(registry)).items()
            # total, per topic, and the last offset per partition
            if k[0].startswith("faust_messages_received") and not k[0].endswith("_created")
        }

    batched = run(True)
    assert batched == run(False)
    assert batched[("faust_messages_received_total", ())] == 43
