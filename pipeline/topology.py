"""The one place that declares topics, tables and agents.

Worker, tests and tools import :func:`build` (or the default :data:`pipeline.app.app`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from faust.types import TopicT

from pipeline.factory import PipelineApp, create_app
from pipeline.settings import Settings
from tables.store import TransactionalStore


@dataclass
class Topology:
    settings: Settings
    app: PipelineApp
    raw: TopicT
    unique: TopicT
    dlq: TopicT
    dedup_table: Any
    dedup_store: TransactionalStore


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


def build(settings: Settings | None = None) -> Topology:
    from agents import dedup
    from pipeline import web

    settings = settings or Settings()
    app = create_app(settings)
    n = settings.partitions
    raw = _topic(app, settings.topic_raw, n)
    unique = _topic(app, settings.topic_unique, n)
    dlq = _topic(app, settings.topic_dlq, n)

    # event_id -> first accepted record timestamp; partitioned like orders.raw (by
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

    topo = Topology(settings, app, raw, unique, dlq, dedup_table, store)
    app.eos.register_source(raw.get_topic_name())
    app.eos.register_store(raw.get_topic_name(), store)
    app.agent(raw, name="dedup")(dedup.make_agent(topo))
    web.install(topo)
    return topo
