"""How agents send: raw bytes straight to the producer (no Faust imports at runtime,
so that the pure decisions in ``agents`` stay importable without Faust, as the Quix
Streams benchmark does)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.factory import PipelineApp

Send = Callable[[str, bytes | None, bytes | None], Awaitable[Any]]


def direct_send(app: PipelineApp) -> Send:
    """``send(topic, key, value)`` for agents: raw bytes straight to the producer.

    ``Topic.send`` wraps every record in a FutureMessage and a PendingMessage, runs the
    codecs (ours are "raw") and the send sensors, then calls the same producer; a
    profile of the dedup stage put that wrapping at 4-5% of the worker's CPU. This
    calls what ``Topic.publish_message`` calls, ``app.maybe_start_producer()``: our
    transaction manager in exactly_once (which routes by source partition, see
    :mod:`pipeline.eos`), Faust's producer in at_least_once. Faust's per-topic "sent"
    metrics therefore do not count these records; ``/stats`` and ``/metrics`` do.
    """
    producer: Any = None

    async def send(topic: str, key: bytes | None, value: bytes | None) -> Any:
        nonlocal producer
        if producer is None:
            producer = await app.maybe_start_producer()
        return await producer.send(topic, key, value, None, None, None)

    return send
