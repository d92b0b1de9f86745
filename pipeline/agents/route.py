"""The route agent: ``orders.raw`` -> the input rekeyed by ``order_id`` + ``orders.dlq``.

Why a hop of its own: every copy of an event must meet the same dedup state, whatever
partition of ``orders.raw`` it landed in. The contract allows records without a key,
which the producer's partitioner spreads anywhere; a producer on librdkafka hashes keys
differently from Java's (CRC32, not murmur2); and adding partitions to the topic moves
keys. Rekeyed by the ``order_id`` in the value, every copy of an event, keyed or not,
reaches the one partition of the rekeyed topic (and of the dedup table) that owns its
order, and the records of one input partition keep their order there, so per-order
input order holds for keyed records.

Validation happens here, where the record's place in ``orders.raw`` is known for the
dead letter. What goes on carries, in headers, where it came from (``pipeline.src``,
``"<partition>:<offset>"``) and its ``event_id`` (``pipeline.eid``, so that the dedup
stage need not parse the value again), and as its timestamp its arrival: the
broker's append time in ``orders.raw``.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from pipeline.agents.sending import agent_for, dead_letters
from pipeline.domain.codecs import dlq_key
from pipeline.domain.route import EID, SRC, Rekey, route_record, source_header
from pipeline.eos.stage import Out, Stage

if TYPE_CHECKING:
    from faust.types import StreamT

    from pipeline.topology import Topology


def make_stage(topo: Topology) -> Stage:
    by_order = topo.by_order.get_topic_name()
    dlq_topic = topo.dlq.get_topic_name()
    stats = topo.app.stats

    def handle(record: Any, out: Out) -> None:
        stats.seen += 1
        action = route_record(
            record.value, record.key, (record.topic, record.partition, record.offset)
        )
        if isinstance(action, Rekey):
            headers = [
                (SRC, source_header(record.partition, record.offset)),
                (EID, action.event_id),
            ]
            # Its arrival (the broker's append time in orders.raw) goes on with it.
            out.send(by_order, action.order_key, record.value, record.timestamp, headers)
        else:
            out.send(dlq_topic, dlq_key(record.key), action.value)
            stats.dlq += 1

    return Stage("route", topo.raw.get_topic_name(), handle, dead_letters(topo.app, dlq_topic))


def make_agent(topo: Topology) -> Callable[[StreamT], Coroutine[Any, Any, None]]:
    return agent_for(topo.app, make_stage(topo))
