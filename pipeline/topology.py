"""The one place that declares topics and tables (:func:`declare`).

The agents and web views are wired onto it by :func:`pipeline.worker.build`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from faust.types import TopicT

from pipeline.eos.faust.store import TransactionalStore
from pipeline.factory import PipelineApp, create_app
from pipeline.settings import Settings


@dataclass
class Topology:
    settings: Settings
    app: PipelineApp
    raw: TopicT
    by_order: TopicT
    unique: TopicT
    dlq: TopicT
    dedup_table: Any
    dedup_store: TransactionalStore
    changes: TopicT
    rejected: TopicT
    coupons: TopicT
    deltas: TopicT
    orders_table: Any
    balances_table: Any


def _topic(app: PipelineApp, name: str, partitions: int) -> TopicT:
    topic = app.topic(
        name,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=partitions,
    )
    app.declared_topics.append(topic)
    return topic


def declare(settings: Settings) -> Topology:
    """A new app with every topic and table declared (no agents yet)."""
    app = create_app(settings)
    n = settings.partitions
    raw = _topic(app, settings.topic_raw, n)
    # orders.raw rekeyed by the order_id in the value (pipeline.agents.route): internal.
    by_order = _topic(app, settings.by_order_topic, n)
    unique = _topic(app, settings.topic_unique, n)
    dlq = _topic(app, settings.topic_dlq, n)

    # event_id -> arrival of its accepted copy; partitioned like the rekeyed input (by
    # order_id), so all copies of an event meet the same partition's state.
    dedup_table = app.Table(
        "dedup",
        # bytes key and value types make Faust pick the "raw" serializer: no JSON here.
        key_type=bytes,
        value_type=bytes,
        partitions=n,
        # Tombstones of expired ids must outlive a restore; compaction drops them later.
        extra_topic_configs={"delete.retention.ms": str(24 * 3600 * 1000)},
    )
    store = dedup_table.data
    assert isinstance(store, TransactionalStore)

    changes = _topic(app, settings.topic_changes, n)
    rejected = _topic(app, settings.topic_rejected, n)
    coupons = _topic(app, settings.topic_coupons, n)
    # The repartition hop: balance deltas keyed by user_id, so that one partition owns
    # each user's balance. Internal; read only by the balances agent.
    deltas = _topic(app, settings.deltas_topic, n)

    # order_id -> Order (JSON); co-partitioned with orders.unique, which is keyed by
    # order_id, so each order's events and state meet in one partition.
    orders_table = app.Table("orders", key_type=bytes, value_type=bytes, partitions=n)
    # user_id -> Balance (JSON); co-partitioned with the deltas topic.
    balances_table = app.Table("users.balances", key_type=bytes, value_type=bytes, partitions=n)

    topo = Topology(
        settings,
        app,
        raw,
        by_order,
        unique,
        dlq,
        dedup_table,
        store,
        changes,
        rejected,
        coupons,
        deltas,
        orders_table,
        balances_table,
    )
    return topo
