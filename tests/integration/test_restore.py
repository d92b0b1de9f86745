"""The coordinator's own restore of owned changelog partitions, against the real broker.

A worker's standby copy can miss a range of its changelog (Faust reads it through the
shared consumer; see TransactionalStore.apply_changelog_batch). When the worker takes
the partition over, the restore must read from the persisted offset, not from wherever
the copy got to, skip aborted transactions, and end with every committed value.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from faust.types import TP

from pipeline.admin import ensure_topics
from pipeline.eos import Coordinator, PartitionState
from pipeline.eos.faust.store import TransactionalStore
from pipeline.factory import create_app
from pipeline.settings import Settings


def _event(tp: TP, offset: int, key: bytes, value: bytes | None) -> Any:
    return SimpleNamespace(
        message=SimpleNamespace(tp=tp, partition=tp.partition, offset=offset, key=key, value=value)
    )


async def _write_changelog(settings: Settings, topic: str, partition: int) -> list[Any]:
    """Three committed transactions around an aborted one; returns the committed records
    as (offset, key, value), read back as a read_committed consumer sees them."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        transactional_id=f"{topic}-writer",
    )
    await producer.start()
    try:
        plan: list[tuple[bool, list[Any]]] = [
            (True, [(b"k%d" % (i % 40), b"a%d" % i) for i in range(120)]),
            (False, [(b"k%d" % i, b"ABORTED") for i in range(40)] + [(b"zz", b"ABORTED")]),
            (True, [(b"k%d" % (i % 40), b"b%d" % i) for i in range(0, 90, 3)] + [(b"k7", None)]),
            (True, [(b"k%d" % (i % 7), b"c%d" % i) for i in range(14)]),
        ]
        for commit, rows in plan:
            async with producer.transaction() if commit else _Aborting(producer):
                for key, value in rows:
                    await producer.send(topic, key=key, value=value, partition=partition)
    finally:
        await producer.stop()
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        ktp = TopicPartition(topic, partition)
        consumer.assign([ktp])
        end = (await consumer.end_offsets([ktp]))[ktp]
        out: list[Any] = []
        while await consumer.position(ktp) < end:
            for m in (await consumer.getmany(ktp, timeout_ms=1000)).get(ktp, ()):
                out.append((m.offset, m.key, m.value))
        return out
    finally:
        await consumer.stop()


class _Aborting:
    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer

    async def __aenter__(self) -> None:
        await self.producer.begin_transaction()

    async def __aexit__(self, *exc: object) -> None:
        await self.producer.abort_transaction()


async def _store_with_changelog(
    settings: Settings, tmp_path: Path, name: str, partition: int
) -> tuple[TransactionalStore, str, list[Any]]:
    """A worker's transactional store for a new table, whose changelog ``partition``
    holds the records of :func:`_write_changelog`."""
    app = create_app(settings.model_copy(update={"datadir": tmp_path / "w"}))
    table = app.Table(name, key_type=bytes, value_type=bytes, partitions=2)
    store = table.data
    assert isinstance(store, TransactionalStore) and store.transactional
    changelog = store.changelog_topic_name
    await ensure_topics(settings.bootstrap_servers, [changelog], 2, settings.replication)
    return store, changelog, await _write_changelog(settings, changelog, partition)


async def test_takeover_restores_from_the_persisted_offset_not_from_the_standby_copy(
    settings: Settings, tmp_path: Path
) -> None:
    store, changelog, records = await _store_with_changelog(settings, tmp_path, "restored", 1)
    assert b"ABORTED" not in {v for _, _, v in records}
    tp = TP(changelog, 1)

    # The worker once owned the partition up to the 50th record (persisted), then kept
    # a standby copy that got only the last 20 records: a gap in between.
    persisted_at = records[49][0]
    store.restore(1, [(k, v) for _, k, v in records[:50]], persisted_at)
    store.apply_changelog_batch(
        [_event(tp, o, k, v) for o, k, v in records[-20:]], lambda k: k, lambda v: v
    )
    assert store.persisted_offset(tp) == persisted_at
    # A row that only this store has: the restore must not start before the offset.
    store._db_for_partition(1).put(b"local-only", b"1")

    coord = Coordinator(settings)
    coord.register_store("source", store)
    coord.partitions[TP("source", 1)] = PartitionState()
    try:
        assert await coord.restore(coord.unsettled_count)
    finally:
        await coord.close()

    expected: dict[bytes, bytes | None] = {}
    for _, key, value in records:
        expected[key] = value
    db = store._db_for_partition(1)
    for key, value in expected.items():
        assert db.get(key) == value, key
    assert db.get(b"zz") is None  # only ever written by the aborted transaction
    assert db.get(b"local-only") == b"1"
    assert store.persisted_offset(tp) == records[-1][0]
    assert coord.restored_records == len(records) - 50
    assert store.owned == {1}
    assert coord.restore_remaining == {}


async def test_a_restore_interrupted_by_a_rebalance_resumes_where_it_stopped(
    settings: Settings, tmp_path: Path
) -> None:
    store, changelog, records = await _store_with_changelog(settings, tmp_path, "interrupted", 0)
    coord = Coordinator(settings)
    coord.register_store("source", store)
    coord.partitions[TP("source", 0)] = PartitionState()
    try:
        # The epoch has moved on already: nothing is read, nothing claimed.
        assert not await coord.restore(coord.unsettled_count - 1)
        assert store.persisted_offset(TP(changelog, 0)) is None
        assert await coord.restore(coord.unsettled_count)
    finally:
        await coord.close()
    assert store.persisted_offset(TP(changelog, 0)) == records[-1][0]
    assert coord.restored_records == len(records)


async def test_the_checker_fetches_nothing_once_it_has_answered(
    settings: Settings, tmp_path: Path
) -> None:
    """The offset checks assign the coordinator's checker consumer what they ask about.
    Left assigned and unpaused, its fetcher went on fetching those partitions, and once
    such a topic was deleted aiokafka asked for its metadata in a tight loop: two workers
    whose topics were dropped under them used 68% of a core each and logged about 1,000
    "not found in cluster metadata" errors a second, for as long as they ran."""
    _, changelog, records = await _store_with_changelog(settings, tmp_path, "checked", 0)
    tp = TP(changelog, 0)
    coord = Coordinator(settings)
    try:
        ends = await coord.record_ends([tp])
        first = await coord._first_record(tp, 0)
        consumer = await coord._checker.get()
        assigned = consumer.assignment()
        paused = consumer.paused()
    finally:
        await coord.close()
    assert ends == {tp: records[-1][0] + 1}
    assert first == records[0][0]
    assert assigned == {TopicPartition(changelog, 0)}
    assert paused == assigned
