"""How agents send: raw bytes straight to the producer (no Faust imports at runtime,
so that the pure decisions in ``agents`` stay importable without Faust, as the Quix
Streams benchmark does)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.domain.codecs import dlq_key, dlq_value

if TYPE_CHECKING:
    from pipeline.factory import PipelineApp

Headers = list[tuple[str, bytes]]


class Send(Protocol):
    def __call__(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        timestamp_ms: int | None = None,
        headers: Headers | None = None,
    ) -> Awaitable[Any]: ...


def direct_send(app: PipelineApp) -> Send:
    """``send(topic, key, value[, timestamp_ms, headers])`` for agents: raw bytes straight
    to the producer.

    ``Topic.send`` wraps every record in a FutureMessage and a PendingMessage, runs the
    codecs (ours are "raw") and the send sensors, then calls the same producer; a
    profile of the dedup stage put that wrapping at 4-5% of the worker's CPU. This
    calls what ``Topic.publish_message`` calls, ``app.maybe_start_producer()``: our
    transaction manager in exactly_once (which routes by source partition, see
    :mod:`pipeline.eos`), Faust's producer in at_least_once. Faust's per-topic "sent"
    metrics therefore do not count these records; ``/stats`` and ``/metrics`` do.
    """
    producer: Any = None

    async def send(
        topic: str,
        key: bytes | None,
        value: bytes | None,
        timestamp_ms: int | None = None,
        headers: Headers | None = None,
    ) -> Any:
        nonlocal producer
        if producer is None:
            producer = await app.maybe_start_producer()
        # Faust's producer API takes seconds.
        seconds = None if timestamp_ms is None else timestamp_ms / 1000
        return await producer.send(topic, key, value, None, seconds, headers)

    return send


def dead_letters(app: PipelineApp, topic: str) -> Callable[[Any, Any, str], Awaitable[None]]:
    """``dead_letter(value, message, reason)``: the record to the dead-letter topic, in
    the same transaction as any output (see ``Coordinator.run``)."""
    send = direct_send(app)
    stats = app.stats

    async def dead_letter(value: Any, message: Any, reason: str) -> None:
        doc = dlq_value(reason, message.topic, message.partition, message.offset, value)
        await send(topic, dlq_key(message.key), doc)
        stats.dlq += 1

    return dead_letter
