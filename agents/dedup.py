"""The dedup agent: ``orders.raw`` -> ``orders.unique`` + ``orders.dlq``.

The agent iterates, asks the pure operator what to do, writes the table and sends.
Everything it sends and writes while handling a record commits in the transaction of
the record's source partition (see :mod:`pipeline.eos`).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.codecs import dlq_key, dlq_value
from pipeline.models import BadInput, parse_event
from pipeline.sending import direct_send
from tables.dedup import decide, decode_seen, encode_seen, expired

if TYPE_CHECKING:
    from faust.types import StreamT

    from pipeline.topology import Topology


@dataclass(frozen=True, slots=True)
class Forward:
    """Accept: remember ``event_id`` from ``first_ms`` on and forward the record."""

    event_id: bytes
    first_ms: int
    #: ``orders.unique`` is keyed by order_id even when the input record had no key.
    order_key: bytes


@dataclass(frozen=True, slots=True)
class Drop:
    """A duplicate inside the window."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    value: bytes


def decide_record(
    value: bytes | None,
    key: bytes | None,
    record_ms: int,
    where: tuple[str, int, int],
    lookup: Callable[[bytes], bytes | None],
    window_ms: int,
) -> Forward | Drop | DeadLetter:
    """The whole per-record decision; ``lookup`` reads the dedup state of an id."""
    parsed = parse_event(value, key)
    if isinstance(parsed, BadInput):
        topic, partition, offset = where
        return DeadLetter(dlq_value(parsed.reason, topic, partition, offset, value))
    event_id = parsed.event_id.encode()
    verdict = decide(decode_seen(lookup(event_id)), record_ms, window_ms)
    if verdict.unique:
        return Forward(event_id, verdict.first_ms, parsed.order_id.encode())
    return Drop()


def make_agent(topo: Topology) -> Callable[[StreamT], Coroutine[Any, Any, None]]:
    settings = topo.settings
    window_ms = settings.dedup_window_ms
    grace_ms = settings.dedup_grace_ms
    batch = settings.expiry_batch
    sweep_every = settings.expiry_every
    seen_table = topo.dedup_table
    store = topo.dedup_store
    unique_topic = topo.unique.get_topic_name()
    dlq_topic = topo.dlq.get_topic_name()
    send = direct_send(topo.app)
    stats = topo.app.stats
    eos = topo.app.eos
    stream_ms: dict[int, int] = {}
    since_sweep: dict[int, int] = {}
    cursor: dict[int, bytes | None] = {}

    def sweep(partition: int, now_ms: int) -> None:
        rows = store.scan_partition(partition, cursor.get(partition), batch)
        for key, _ in rows:
            current = decode_seen(store.lookup(key))
            if current is not None and expired(current, now_ms, window_ms, grace_ms):
                del seen_table[key]
                stats.expired_ids += 1
        cursor[partition] = rows[-1][0] + b"\x00" if len(rows) == batch else None

    async def dedup(stream: StreamT) -> None:
        async for value in eos.each(stream):
            event = stream.current_event
            assert event is not None
            msg = event.message
            record_ms = round(msg.timestamp * 1000)
            stats.seen += 1
            action = decide_record(
                value,
                msg.key,
                record_ms,
                (msg.topic, msg.partition, msg.offset),
                store.lookup,
                window_ms,
            )
            if isinstance(action, Forward):
                seen_table[action.event_id] = encode_seen(action.first_ms)
                await send(unique_topic, action.order_key, value)
                stats.unique += 1
            elif isinstance(action, Drop):
                stats.duplicates_dropped += 1
            else:
                await send(dlq_topic, dlq_key(msg.key), action.value)
                stats.dlq += 1
            p = msg.partition
            if record_ms > stream_ms.get(p, record_ms - 1):
                stream_ms[p] = record_ms
            n = since_sweep.get(p, 0) + 1
            if n >= sweep_every:
                n = 0
                sweep(p, stream_ms[p])
            since_sweep[p] = n

    return dedup
