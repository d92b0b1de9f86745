"""The standby follower (pipeline.eos.standby) against the real broker: a standby copy
is kept current with committed records only, its persisted offset moves with it, so
that taking the partition over restores nothing; it stops writing as soon as a
rebalance begins, and never writes a partition the worker owns."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from faust.types import TP

from pipeline.eos import Coordinator, PartitionState
from pipeline.eos.faust.store import TransactionalStore
from pipeline.settings import Settings
from pipeline.tools.procs import Worker, wait_drained
from pipeline.tools.reconcile import reconcile

from .harness import feed, settled_owners
from .test_restore import _store_with_changelog
from .test_standby_takeover import _standbys_caught_up

pytestmark = pytest.mark.integration


# Long enough for one of the follower's requests to time out (aiokafka's 40 s) and the
# follower to start over: CI once saw a copy not caught up within 30 s, with no error
# logged yet. The verdicts wait for a state, never for a time.
async def _until(check: Callable[[], bool], what: str, timeout: float = 90) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


def _values(records: list[tuple[int, bytes, bytes | None]]) -> dict[bytes, bytes | None]:
    out: dict[bytes, bytes | None] = {}
    for _, key, value in records:
        out[key] = value
    return out


def _holds(store: TransactionalStore, partition: int, expected: dict[bytes, bytes | None]) -> bool:
    db = store._db_for_partition(partition)
    return all(db.get(k) == v for k, v in expected.items())


async def _commit(
    settings: Settings, topic: str, partition: int, rows: list[tuple[bytes, bytes]]
) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, transactional_id=f"{topic}-more"
    )
    await producer.start()
    try:
        async with producer.transaction():
            for key, value in rows:
                await producer.send(topic, key=key, value=value, partition=partition)
    finally:
        await producer.stop()


async def _last_offset(settings: Settings, topic: str, partition: int) -> int:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        ktp = TopicPartition(topic, partition)
        end = (await consumer.end_offsets([ktp]))[ktp]
        return int(end) - 2  # the last record, before its transaction's commit marker
    finally:
        await consumer.stop()


async def _follow_as_standby(coord: Coordinator, tp: TP) -> None:
    """An assignment in which ``tp`` is a standby copy: its restore (which owns nothing),
    then the follower, as Coordinator._settle_from runs them."""
    coord.assigned({tp})
    epoch = coord.unsettled_count
    assert await coord.restore(epoch)
    coord.follow_standbys(epoch)


@contextlib.asynccontextmanager
async def _copy_of(
    settings: Settings, tmp_path: Path, name: str, partition: int
) -> AsyncIterator[tuple[Coordinator, TransactionalStore, TP, list[Any]]]:
    """A coordinator with one table store whose changelog ``partition`` holds the
    records of test_restore's _write_changelog, followed as a standby copy."""
    store, changelog, records = await _store_with_changelog(settings, tmp_path, name, partition)
    tp = TP(changelog, partition)
    coord = Coordinator(settings)
    coord.register_store("source", store)
    try:
        await _follow_as_standby(coord, tp)
        yield coord, store, tp, records
    finally:
        await coord.close()


async def test_a_standby_copy_follows_committed_records_and_its_takeover_restores_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    async with _copy_of(settings, tmp_path, "followed", 1) as (coord, store, tp, records):
        # Caught up with the committed records only (an aborted transaction is in the
        # log), the offset persisted with them.
        await _until(lambda: store.persisted_offset(tp) == records[-1][0], "caught up")
        assert _holds(store, 1, _values(records))
        assert store._db_for_partition(1).get(b"zz") is None  # aborted-only key
        await _until(lambda: coord.standby.remaining.get(tp) == 0, "no records left")

        # It follows what is committed later too.
        await _commit(settings, tp.topic, 1, [(b"k1", b"later"), (b"new", b"row")])
        last = await _last_offset(settings, tp.topic, 1)
        await _until(lambda: store.persisted_offset(tp) == last, "the later commit")
        assert _holds(store, 1, {b"k1": b"later", b"new": b"row"})
        assert coord.standby.records == len(records) + 2

        # The partition moves here: its restore has nothing left to read.
        coord.unsettle()
        coord.assigned(set())
        coord.partitions[TP("source", 1)] = PartitionState()
        await coord.restore(coord.unsettled_count)
        assert coord.restored_records == 0
        assert store.owned == {1}
        assert store.persisted_offset(tp) == last


async def test_a_rebalance_stops_the_follower_before_its_next_write(
    settings: Settings, tmp_path: Path
) -> None:
    async with _copy_of(settings, tmp_path, "stopped", 0) as (coord, store, tp, records):
        await _until(lambda: store.persisted_offset(tp) == records[-1][0], "caught up")

        # A rebalance begins (Faust's consumer thread calls unsettle): the follower
        # stops by itself, before the new assignment is even known.
        coord.unsettle()
        await _until(lambda: coord.standby.idle, "the follower waits")
        await _commit(settings, tp.topic, 0, [(b"k2", b"after the rebalance began")])
        # Idle means waiting for follow() or stop(), which nothing called: it has not
        # fetched, let alone written, since.
        assert coord.standby.idle
        assert store.persisted_offset(tp) == records[-1][0]
        assert store._db_for_partition(0).get(b"k2") == _values(records)[b"k2"]

        # The same partition is a copy of the next assignment too: followed again from
        # its persisted offset, the record it did not write included.
        await _follow_as_standby(coord, tp)
        last = await _last_offset(settings, tp.topic, 0)
        await _until(lambda: store.persisted_offset(tp) == last, "caught up again")
        assert store._db_for_partition(0).get(b"k2") == b"after the rebalance began"


async def test_a_copy_that_becomes_owned_is_left_to_the_restore_and_the_commits(
    settings: Settings, tmp_path: Path
) -> None:
    async with _copy_of(settings, tmp_path, "owned", 1) as (coord, store, tp, records):
        await _until(lambda: store.persisted_offset(tp) == records[-1][0], "caught up")
        # The partition is owned now (as if a restore had claimed it), and a commit of
        # this worker writes a row the changelog gets later: the follower must neither
        # overwrite it nor move the offset.
        store.owned.add(1)
        store.restore(1, [(b"k3", b"this worker's commit")], records[-1][0])
        await _commit(settings, tp.topic, 1, [(b"k3", b"late copy")])
        await _until(lambda: tp not in coord.standby.following, "the follower let it go")
        assert store._db_for_partition(1).get(b"k3") == b"this worker's commit"
        assert store.persisted_offset(tp) == records[-1][0]


async def test_a_worker_takes_over_from_its_current_standby_copies_without_restoring(
    settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    """Two real workers: b's copies of a's partitions follow the changelogs, so when a
    is killed -9 b restores nothing of them. Before the follower, b restored every
    partition it took over in full (Faust's standby replay did not move the offset)."""
    s = settings
    a, b = make_worker("a"), make_worker("b")
    a.start()
    b.start()
    await feed(s, 2000, seed=41, dup_rate=0.2, bad_rate=0.0)
    await wait_drained(s, [a, b], timeout=180)
    # Both process some partitions: a's move to b at the kill.
    await settled_owners([a, b], s.topic_raw, s.partitions, timeout=60)
    # Nothing is written from here on: once b's copies are at the end, they stay there.
    await _standbys_caught_up(b)
    mark = b.log_path.stat().st_size
    a.kill9()
    await wait_drained(s, [b], timeout=180)
    await feed(s, 200, seed=42, dup_rate=0.2, bad_rate=0.0, prefix="t")
    await wait_drained(s, [b], timeout=180)
    after = b.log_path.read_bytes()[mark:].decode(errors="replace")
    restores = [int(n) for n in re.findall(r"restored (\d+) changelog records", after)]
    assert restores, after[-3000:]
    assert sum(restores) == 0, restores
    report = await reconcile(s)
    assert report.ok, report.render()
