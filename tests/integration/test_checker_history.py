"""The history checker's reading of a real broker (pipeline/tools/checker.py ``collect``):
an aborted transaction's record is in the ``read_uncommitted`` log and not in the
committed one, so a live reader that returned it is named an aborted read.

The live reader here reads ``read_uncommitted`` on purpose: it stands for a reader (or
a broker) that let an aborted record through, which is the anomaly to be caught.
"""

from __future__ import annotations

import uuid

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from pipeline.admin import drop_topics, ensure_topics
from pipeline.kafka_io import read_topic
from pipeline.tools.checker import ABORTED_READ, Seen, Topics, check, collect, fingerprint

from .harness import broker_url

pytestmark = pytest.mark.integration


async def test_a_record_of_an_aborted_transaction_read_live_is_named() -> None:
    broker = broker_url().split("://", 1)[-1]
    ns = f"hist-{uuid.uuid4().hex[:8]}"
    try:
        await _aborted_read(broker, ns)
    finally:
        await drop_topics(broker, ns)


async def _aborted_read(broker: str, ns: str) -> None:
    t = Topics(*(f"{ns}.{n}" for n in ("raw", "u", "d", "c", "x", "k", "b")))
    await ensure_topics(broker, [t.raw, *t.outputs], 1, 1)
    producer = AIOKafkaProducer(
        bootstrap_servers=broker,
        transactional_id=f"{ns}-tx",
        enable_idempotence=True,
    )
    await producer.start()
    try:
        # A change whose transaction aborts: what a fenced zombie's last writes are.
        await producer.begin_transaction()
        doc = {"event_id": "e9", "order_id": "o9", "from": "NEW", "to": "CREATED", "version": 1}
        await (await producer.send(t.changes, orjson.dumps(doc), key=b"o9"))
        await producer.abort_transaction()
    finally:
        await producer.stop()

    dirty = [
        Seen(t.changes, m.partition, m.offset, fingerprint(m.value))
        async for m in read_topic(broker, t.changes, committed=False)
    ]
    assert len(dirty) == 1
    history = await collect(broker, t, accepted={}, live=dirty)
    assert history.committed[t.changes] == []
    assert history.written[t.changes] == {(dirty[0].partition, dirty[0].offset)}

    verdict = check(history)
    assert verdict.counts[ABORTED_READ] == 1, verdict.render()
    assert "aborted transaction" in verdict.examples[ABORTED_READ][0]
    assert verdict.facts["aborted records"] == 1
    # The same history without that read is clean: the aborted record itself is no anomaly.
    history.live = []
    assert check(history).ok
