"""Plain aiokafka producing and ``read_committed`` reading, independent of Faust.

``reconcile``, ``chaos``, ``bench`` and the tests read through these functions, so the
proof never depends on the code it checks. Each takes the connection
(``settings.kafka``, :class:`pipeline.connection.KafkaConnection`), or a bare bootstrap
string for a plaintext broker (the tests).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from pipeline.connection import KafkaConnection, as_connection
from pipeline.tools.generate import Record

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Msg:
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()


async def produce(
    kafka: KafkaConnection | str,
    topic: str,
    records: Iterable[Record],
    *,
    rate: float | None = None,
    timestamp_ms: int | None = None,
    timestamp_of: Callable[[int], int] | None = None,
) -> int:
    """Send records with an idempotent producer (``acks=all``); returns the count."""
    producer = AIOKafkaProducer(
        **as_connection(kafka).kwargs(),
        enable_idempotence=True,
        acks="all",
        linger_ms=5,
        max_batch_size=256 * 1024,
        max_request_size=2 * 1024 * 1024,
    )
    await producer.start()
    n = 0
    started = time.monotonic()
    try:
        pending = []
        for rec in records:
            pending.append(
                await producer.send(
                    topic,
                    rec.value,
                    key=rec.key,
                    timestamp_ms=timestamp_of(n) if timestamp_of else timestamp_ms,
                )
            )
            n += 1
            if len(pending) >= 5000:
                for fut in pending:
                    await fut
                pending.clear()
            if rate:
                ahead = n / rate - (time.monotonic() - started)
                if ahead > 0.005:
                    await asyncio.sleep(ahead)
        for fut in pending:
            await fut
    finally:
        await producer.stop()
    return n


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    parts = consumer.partitions_for_topic(topic)
    if parts is None:
        # A consumer without subscriptions has no metadata for the topic yet.
        await consumer._client.force_metadata_update()
        parts = consumer.partitions_for_topic(topic)
    return set(parts or ())


async def end_offsets(
    kafka: KafkaConnection | str, topic: str, *, committed: bool = True
) -> dict[int, int]:
    """End offsets: the last stable offset (read_committed) or the high watermark."""
    return (await ends_of(kafka, [topic], committed=committed))[topic]


async def ends_of(
    kafka: KafkaConnection | str, topics: list[str], *, committed: bool = True
) -> dict[str, dict[int, int]]:
    """:func:`end_offsets` of several topics, asked at once (one consumer, one request
    per broker); a topic that does not exist has no partitions."""
    consumer = AIOKafkaConsumer(
        **as_connection(kafka).kwargs(),
        isolation_level="read_committed" if committed else "read_uncommitted",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        tps = []
        for t in topics:
            tps += [TopicPartition(t, p) for p in sorted(await partitions_of(consumer, t))]
        ends = await consumer.end_offsets(tps) if tps else {}
    finally:
        await consumer.stop()
    out: dict[str, dict[int, int]] = {t: {} for t in topics}
    for tp, off in ends.items():
        out[tp.topic][tp.partition] = off
    return out


async def _stop(consumer: AIOKafkaConsumer) -> None:
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        # aiokafka's stop re-raises the cancellation of its own group-coordinator task
        # when a consumer is stopped right after it started (a topic with no partition to
        # read); only a cancellation of this task is to be passed on.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


async def read_topic(
    kafka: KafkaConnection | str,
    topic: str,
    *,
    until: dict[int, int] | None = None,
    committed: bool = True,
) -> AsyncIterator[Msg]:
    """Every committed record of ``topic`` up to the end offsets taken at the start; with
    ``committed=False``, every data record up to the high watermarks, aborted ones too."""
    consumer = AIOKafkaConsumer(
        **as_connection(kafka).kwargs(),
        isolation_level="read_committed" if committed else "read_uncommitted",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        group_id=None,
        client_id=f"reader-{uuid.uuid4().hex[:8]}",
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_bytes=32 * 1024 * 1024,
    )
    await consumer.start()
    try:
        if until is None:
            parts = await partitions_of(consumer, topic)
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            ends = await consumer.end_offsets(tps) if tps else {}
            until = {tp.partition: off for tp, off in ends.items()}
        tps = [TopicPartition(topic, p) for p, end in until.items() if end > 0]
        if not tps:
            return
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        remaining = {tp for tp in tps}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=1000)
            for tp, msgs in batch.items():
                end = until[tp.partition]
                for m in msgs:
                    if m.offset >= end:
                        break
                    yield Msg(tp.partition, m.offset, m.timestamp, m.key, m.value, tuple(m.headers))
            for tp in list(remaining):
                # Positions move past transaction markers too, so compare positions.
                if await consumer.position(tp) >= until[tp.partition]:
                    remaining.discard(tp)
    finally:
        await _stop(consumer)


async def committed_offsets(
    kafka: KafkaConnection | str, group: str, topic: str
) -> dict[int, int | None]:
    consumer = AIOKafkaConsumer(
        **as_connection(kafka).kwargs(), group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        parts = await partitions_of(consumer, topic)
        out: dict[int, int | None] = {}
        for p in sorted(parts):
            out[p] = await consumer.committed(TopicPartition(topic, p))
        return out
    finally:
        await consumer.stop()


async def last_record_end(consumer: Any, ktp: TopicPartition, begin: int, end: int) -> int:
    """The offset after the last committed record of ``ktp`` in ``[begin, end)``.

    On a transactional topic the last stable offset usually lies just past a commit
    marker that no consumer ever receives; "processed everything" means having
    committed this offset, not the LSO. ``consumer`` must read ``read_committed`` and
    have ``ktp`` assigned. Reads backwards in growing windows.
    """
    window = 64
    hi = end
    deadline = asyncio.get_running_loop().time() + 15.0
    while hi > begin:
        if asyncio.get_running_loop().time() > deadline:  # pragma: no cover
            log.warning("%s: no last record found quickly; using the end offset", ktp)
            return end
        lo = max(begin, hi - window)
        consumer.seek(ktp, lo)
        last = -1
        while await consumer.position(ktp) < hi:
            batch = await consumer.getmany(ktp, timeout_ms=1000)
            for msg in batch.get(ktp, ()):
                if msg.offset < hi:
                    last = max(last, int(msg.offset))
        if last >= 0:
            return last + 1
        hi = lo
        window *= 4
    return begin


async def record_ends(kafka: KafkaConnection | str, topic: str) -> dict[int, int]:
    """Per partition of ``topic``, the offset after its last committed record."""
    consumer = AIOKafkaConsumer(
        **as_connection(kafka).kwargs(),
        isolation_level="read_committed",
        enable_auto_commit=False,
        max_partition_fetch_bytes=256 * 1024,
    )
    await consumer.start()
    try:
        parts = await partitions_of(consumer, topic)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return {}
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        begins = await consumer.beginning_offsets(tps)
        return {
            tp.partition: await last_record_end(consumer, tp, int(begins[tp]), int(ends[tp]))
            for tp in tps
        }
    finally:
        await consumer.stop()
