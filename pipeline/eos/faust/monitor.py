"""Faust's Prometheus sensor, made cheaper per event (see the class)."""

from __future__ import annotations

from typing import Any

from faust.sensors.monitor import Monitor
from faust.sensors.prometheus import PrometheusMonitor
from faust.types import TP


class CachingPrometheusMonitor(PrometheusMonitor):
    """Faust's Prometheus sensor, with its per-event labelled children looked up once.

    ``PrometheusMonitor`` runs for every record: it formats and normalises the stream's
    label (a regular expression) and looks up three labelled children, under the
    client's lock, on each call. A profile of the dedup stage put Faust's per-event
    sensor calls at about 9% of the worker's CPU. The hooks below update the same
    metrics with the same names, labels and values (a unit test compares the two
    sensors' output), through children cached per topic, partition and stream; the rest
    of the sensor is Faust's.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._by_topic: dict[str, Any] = {}
        self._by_tp: dict[TP, Any] = {}
        self._by_stream: dict[Any, Any] = {}
        self._by_table_op: dict[tuple[str, str], Any] = {}
        self._end_by_tp: dict[TP, Any] = {}

    def on_message_in(self, tp: TP, offset: int, message: Any) -> None:
        Monitor.on_message_in(self, tp, offset, message)
        metrics = self._metrics
        metrics.messages_received.inc()
        metrics.active_messages.inc()
        topic = self._by_topic.get(tp.topic)
        if topic is None:
            topic = self._by_topic[tp.topic] = metrics.messages_received_per_topics.labels(
                topic=tp.topic
            )
        topic.inc()
        partition = self._by_tp.get(tp)
        if partition is None:
            partition = self._by_tp[tp] = metrics.messages_received_per_topics_partition.labels(
                topic=tp.topic, partition=tp.partition
            )
        partition.set(offset)

    def on_batch_in(self, tp: TP, count: int, last_offset: int) -> None:
        """A batch of ``count`` source records handed to a stage (exactly-once): they
        never become Faust messages, so ``on_message_in`` never sees them. The same
        received counters move, once per batch instead of once per record, so that
        dashboards built on Faust's metrics still count the input."""
        metrics = self._metrics
        metrics.messages_received.inc(count)
        topic = self._by_topic.get(tp.topic)
        if topic is None:
            topic = self._by_topic[tp.topic] = metrics.messages_received_per_topics.labels(
                topic=tp.topic
            )
        topic.inc(count)
        partition = self._by_tp.get(tp)
        if partition is None:
            partition = self._by_tp[tp] = metrics.messages_received_per_topics_partition.labels(
                topic=tp.topic, partition=tp.partition
            )
        partition.set(last_offset)

    def on_stream_event_in(self, tp: TP, offset: int, stream: Any, event: Any) -> Any:
        state = Monitor.on_stream_event_in(self, tp, offset, stream, event)
        metrics = self._metrics
        metrics.total_events.inc()
        metrics.total_active_events.inc()
        child = self._by_stream.get(stream)
        if child is None:
            child = self._by_stream[stream] = metrics.total_events_per_stream.labels(
                stream=f"stream.{self._stream_label(stream)}.events"
            )
        child.inc()
        return state

    def _table_op(self, table: Any, operation: str) -> Any:
        key = (table.name, operation)
        child = self._by_table_op.get(key)
        if child is None:
            child = self._by_table_op[key] = self._metrics.table_operations.labels(
                table=f"table.{table.name}", operation=operation
            )
        return child

    # The table hooks run for every read and write through a Table; Monitor's part
    # keeps its own per-table counters, as in Faust's sensor.
    def on_table_get(self, table: Any, key: Any) -> None:
        Monitor.on_table_get(self, table, key)
        self._table_op(table, self.KEYS_RETRIEVED).inc()

    def on_table_set(self, table: Any, key: Any, value: Any) -> None:
        Monitor.on_table_set(self, table, key, value)
        self._table_op(table, self.KEYS_UPDATED).inc()

    def on_table_del(self, table: Any, key: Any) -> None:
        Monitor.on_table_del(self, table, key)
        self._table_op(table, self.KEYS_DELETED).inc()

    def track_tp_end_offset(self, tp: TP, offset: int) -> None:
        # Called for every partition of every fetch batch.
        Monitor.track_tp_end_offset(self, tp, offset)
        child = self._end_by_tp.get(tp)
        if child is None:
            child = self._end_by_tp[tp] = self._metrics.topic_partition_end_offset.labels(
                topic=tp.topic, partition=tp.partition
            )
        child.set(offset)
