"""What the agents share: the Faust agent of a stage, dead letters, and the
at_least_once way of sending.

A stage makes outputs with ``out.send`` (:class:`pipeline.eos.stage.Out`); the engine
puts them in the transaction of the record's source partition (exactly-once), or sends
them straight through Faust's producer (:func:`direct_send`, at_least_once).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from pipeline.domain.codecs import dlq_key, dlq_value
from pipeline.eos.partition import OutRecord
from pipeline.eos.stage import Out, Stage

if TYPE_CHECKING:
    from faust.types import StreamT

    from pipeline.factory import PipelineApp


def direct_send(app: PipelineApp) -> Callable[[OutRecord], Any]:
    """``send(record)``: raw bytes straight to Faust's producer (at_least_once).

    ``Topic.send`` wraps every record in a FutureMessage and a PendingMessage, runs the
    codecs (ours are "raw") and the send sensors, then calls the same producer; this
    calls the producer ``Topic.publish_message`` calls. Faust's per-topic "sent" metrics
    therefore do not count these records; ``/stats`` and ``/metrics`` do.
    """
    producer: Any = None

    async def send(record: OutRecord) -> Any:
        nonlocal producer
        if producer is None:
            producer = await app.maybe_start_producer()
        ms = record.timestamp_ms
        # Faust's producer API takes seconds.
        seconds = None if ms is None else ms / 1000
        return await producer.send(
            record.topic, record.key, record.value, None, seconds, record.headers
        )

    return send


def dead_letters(app: PipelineApp, topic: str) -> Callable[[Any, str, Out], None]:
    """``dead_letter(record, reason, out)``: the record to the dead-letter topic, with its
    reason, as an output of its own handling (in its transaction, exactly-once)."""
    stats = app.stats

    def dead_letter(record: Any, reason: str, out: Out) -> None:
        doc = dlq_value(reason, record.topic, record.partition, record.offset, record.value)
        out.send(topic, dlq_key(record.key), doc)
        stats.dlq += 1

    return dead_letter


def agent_for(app: PipelineApp, stage: Stage) -> Callable[[StreamT], Coroutine[Any, Any, None]]:
    """The Faust agent of ``stage``. Exactly-once, its batches go to it from the first
    fetch on (the stream is only Faust's subscription); at_least_once, the stream's
    events do."""
    eos = app.eos
    eos.add_stage(stage)

    async def run(stream: StreamT) -> None:
        await eos.run(stream, stage)

    return run
