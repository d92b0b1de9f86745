"""Exactly-once processing on top of Faust: one Kafka transaction per source partition.

Why this module exists
----------------------
Stock faust-streaming 0.15 ``processing_guarantee="exactly_once"`` has gaps that make
it lose or duplicate records under crashes (each has a switch in ``FIXES`` so tests can
show the gap is real; ``PIPELINE_DISABLE_FIX=name,...`` turns fixes off):

``route-by-source``
    ``TransactionManager.send`` picks the transactional producer from the *destination*
    topic and partition, so an output can commit in another transaction than the source
    offset that produced it. Here every send made while processing an event goes through
    the transaction of that event's *source* partition.
``local-state``
    Faust writes RocksDB immediately, so after a crash the local store can hold writes
    of an aborted transaction (an id marked as seen whose output never committed: that
    event is then lost). Here table writes stay in a per-partition overlay and reach
    RocksDB only after the Kafka transaction committed, in one write batch together
    with the changelog offset they correspond to.
``fatal-commit``
    Commit, begin and abort errors other than ``ProducerFenced`` are logged and
    swallowed; the worker goes on with a broken transaction. Here any failure in the
    commit path ends the process (``os._exit``) so it restarts clean from committed state.
``flush-before-commit``
    The commit path does not wait for the ``send_soon`` buffer or for in-flight sends;
    a record still in a buffer is not part of the transaction that commits its offset.
    Here table changes are written into the transaction at commit time and every send
    future of the transaction is awaited before its offsets are added.
``quiesce``
    Faust commits from a background task while agents keep processing, so records of an
    event whose offset is not yet acked can land in a committed transaction; a crash then
    replays the event and duplicates them. Here the commit of a partition waits until the
    agent is between two events of that partition.
``changelog-offsets``
    ``TableManager.on_commit_tp`` looks pending changelog offsets up by *source* partition
    while they are stored by *changelog* partition (robinhood/faust#599), so persisted
    offsets lag. Here the persisted offset is written by the commit itself, keyed by the
    changelog partition it belongs to.

The commit order
----------------
For every source partition ``tp`` with progress since its last commit, concurrently
across partitions, :meth:`ExactlyOnceTransactionManager._commit_tp` runs:

1. ``quiesce``   take the partition's gate, so no event of ``tp`` is half processed.
2. ``changelog`` send the partition's dirty table rows (last value per key) to the
   changelog partition, inside ``tp``'s transaction.
3. ``drain``     await every send of the transaction (outputs, DLQ, changelog); a failed
   send is fatal.
4. ``offsets``   ``send_offsets_to_transaction({tp: last processed + 1})``.
5. ``commit``    ``commit_transaction()``: outputs, changelog and offsets become visible
   to ``read_committed`` readers together, or not at all.
6. ``persist``   write the dirty rows and the changelog offset of step 2 to RocksDB in one
   write batch. A crash before this only leaves the store behind the changelog, which
   recovery replays; the store is never ahead of committed state.
7. ``begin``     begin the next transaction, then release the gate.

A crash anywhere before step 5 completes aborts the transaction (the broker aborts it
when the restarted worker's producer with the same ``transactional.id`` initialises, or
on timeout); the events are read again from the last committed offsets.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaProducer, TopicPartition
from faust import current_event
from faust.transport.consumer import TransactionManager
from faust.types import TP
from faust.types.tuples import RecordMetadata

if TYPE_CHECKING:
    from faust.types import AppT, StreamT

    from pipeline.settings import Settings
    from tables.store import TransactionalStore

log = logging.getLogger(__name__)

FIXES = (
    "route-by-source",
    "local-state",
    "fatal-commit",
    "flush-before-commit",
    "quiesce",
    "changelog-offsets",
)

#: Exit status of a worker that stopped because a transaction could not commit.
EXIT_COMMIT_FAILED = 70
#: Exit status of a test-only injected crash.
EXIT_INJECTED = 86


class Step(StrEnum):
    QUIESCE = "quiesce"
    CHANGELOG = "changelog"
    DRAIN = "drain"
    OFFSETS = "offsets"
    COMMIT = "commit"
    PERSIST = "persist"
    BEGIN = "begin"


COMMIT_STEPS = tuple(Step)


def fatal(message: str, exc: BaseException | None = None) -> None:
    """End the process now: a worker must never continue past a failed commit.

    ``os._exit`` rather than ``app.crash``: Faust's orderly shutdown commits again and
    flushes buffers, which is exactly what must not happen with a broken transaction.
    The supervisor (systemd, Kubernetes, the chaos harness) restarts the worker, which
    recovers from committed state.
    """
    log.critical("%s: %r; exiting with status %d", message, exc, EXIT_COMMIT_FAILED)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(EXIT_COMMIT_FAILED)


@dataclass
class PartitionState:
    """Per source partition: the processing gate and what the open transaction holds."""

    gate: asyncio.Lock = field(default_factory=asyncio.Lock)
    processed: int | None = None
    committed: int | None = None
    pending: list[asyncio.Future[Any]] = field(default_factory=list)

    @property
    def has_progress(self) -> bool:
        if self.processed is None:
            return bool(self.pending)
        return self.committed is None or self.processed + 1 > self.committed or bool(self.pending)


class Coordinator:
    """Shared by agents, tables and the transaction manager of one app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.enabled = settings.exactly_once
        self.partitions: dict[TP, PartitionState] = {}
        self.sources: set[str] = set()
        self.stores: dict[str, list[TransactionalStore]] = {}
        self._crash_count = 0
        self.commits = 0
        self.aborts = 0
        self.commit_seconds: list[float] = []

    def fix(self, name: str) -> bool:
        return self.enabled and self.settings.fix_enabled(name)

    def register_source(self, topic: str) -> None:
        self.sources.add(topic)

    def register_store(self, source_topic: str, store: TransactionalStore) -> None:
        self.stores.setdefault(source_topic, []).append(store)

    def state(self, tp: TP) -> PartitionState:
        st = self.partitions.get(tp)
        if st is None:
            st = self.partitions[tp] = PartitionState()
        return st

    def crash_point(self, step: Step) -> None:
        """Test-only fault injection: ``PIPELINE_CRASH_AT=<step>`` dies before that step."""
        if self.settings.crash_at != step.value:
            return
        self._crash_count += 1
        if self._crash_count > self.settings.crash_after:
            log.warning("fault injection: crashing at commit step %r", step.value)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(EXIT_INJECTED)

    async def each(self, stream: StreamT) -> AsyncIterator[Any]:
        """Iterate a Faust stream so that commits see only whole events.

        The gate of the event's source partition is held while the agent body runs for
        the event, and the event counts as processed once the body asks for the next one.
        """
        if not self.fix("quiesce"):
            async for value in stream:
                event = stream.current_event
                yield value
                if event is not None:
                    self.state(event.message.tp).processed = event.message.offset
            return
        async for value in stream:
            event = stream.current_event
            assert event is not None
            tp = event.message.tp
            st = self.partitions.get(tp) or self.state(tp)
            async with st.gate:
                yield value
                st.processed = event.message.offset


class ExactlyOnceTransactionManager(TransactionManager):
    """Faust's transaction manager, replaced: see the module docstring for the order."""

    coordinator: Coordinator

    def __init__(self, transport: Any, *, consumer: Any, producer: Any, **kwargs: Any) -> None:
        super().__init__(transport, consumer=consumer, producer=producer, **kwargs)
        self.coordinator = self.app.eos  # type: ignore[attr-defined]
        self._producers: dict[str, AIOKafkaProducer] = {}

    # -- naming -------------------------------------------------------------------------

    def transactional_id(self, tp: TP) -> str:
        # One transactional.id per *source* topic-partition, not per Faust topic group:
        # two agents reading different topics never share (and commit) a transaction,
        # and a zombie that still believes it owns ``tp`` is fenced by the new owner.
        return f"{self.app.conf.id}-{tp.topic}-{tp.partition}"

    def _source_tps(self, tps: Iterable[TP]) -> set[TP]:
        assignor = self.app.assignor
        return {
            tp
            for tp in tps
            if tp.topic in self.coordinator.sources and not assignor.is_standby(tp)
        }

    # -- rebalance ----------------------------------------------------------------------

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        # Faust has committed through self.commit() before calling this.
        return None

    async def on_rebalance(
        self, assigned: set[TP], revoked: set[TP], newly_assigned: set[TP]
    ) -> None:
        keep = self._source_tps(assigned)
        for tp in sorted(self._source_tps(revoked) - keep):
            await self._release(tp)
        for tp in sorted(keep):
            if self.transactional_id(tp) not in self._producers:
                await self._acquire(tp)

    async def _acquire(self, tp: TP) -> None:
        tid = self.transactional_id(tp)
        producer = self.producer._new_producer(transactional_id=tid)  # type: ignore[attr-defined]
        try:
            # start() runs InitProducerId: it fences any older producer with this id and
            # waits until that producer's open transaction is completed or aborted, so the
            # committed offsets read next are stable.
            await producer.start()
            await producer.begin_transaction()
        except Exception as exc:
            fatal(f"could not start the transaction of {tid}", exc)
        self._producers[tid] = producer
        st = self.coordinator.state(tp)
        st.pending.clear()
        st.processed = None
        st.committed = None
        for store in self.coordinator.stores.get(tp.topic, ()):
            store.discard(tp)

    async def _release(self, tp: TP) -> None:
        tid = self.transactional_id(tp)
        producer = self._producers.pop(tid, None)
        for store in self.coordinator.stores.get(tp.topic, ()):
            store.discard(tp)
        self.coordinator.partitions.pop(tp, None)
        if producer is not None:
            # Stopping aborts whatever the transaction still holds (nothing after the
            # revoke commit); the new owner's InitProducerId would fence it anyway.
            try:
                await producer.stop()
            except Exception as exc:  # pragma: no cover - best effort on a dead link
                log.warning("stopping producer %s: %r", tid, exc)

    async def on_stop(self) -> None:
        for tid, producer in list(self._producers.items()):
            try:
                await producer.stop()
            except Exception as exc:  # pragma: no cover
                log.warning("stopping producer %s: %r", tid, exc)
        self._producers.clear()

    # -- sending ------------------------------------------------------------------------

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        timestamp: float | None,
        headers: Any,
        *,
        transactional_id: str | None = None,
    ) -> Awaitable[RecordMetadata]:
        event = current_event()
        if event is None:
            # Not part of processing an event (a timer, a web view): nothing to be
            # atomic with, so it goes through the idempotent non-transactional producer.
            return await self.producer.send(topic, key, value, partition, timestamp, headers)
        source = event.message.tp
        if self.coordinator.fix("route-by-source"):
            tp = source
        else:
            # Stock Faust: the destination partition picks the transaction.
            p = self.consumer.key_partition(topic, key, partition)
            tp = TP(source.topic, p.partition if hasattr(p, "partition") else int(p))
            partition = tp.partition
        producer = self._producers.get(self.transactional_id(tp))
        if producer is None:
            fatal(f"no transaction open for {tp} (partition not assigned to this worker)")
            raise AssertionError("unreachable")
        fut = await producer.send(
            topic,
            value=value,
            key=key,
            partition=partition,
            timestamp_ms=int(timestamp * 1000) if timestamp else None,
            headers=_headers(headers),
        )
        self.coordinator.state(tp).pending.append(fut)
        return fut

    async def send_and_wait(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        timestamp: float | None,
        headers: Any,
        *,
        transactional_id: str | None = None,
    ) -> RecordMetadata:
        fut = await self.send(topic, key, value, partition, timestamp, headers)
        return await fut

    # -- committing ---------------------------------------------------------------------

    async def commit(self, offsets: Mapping[TP, int], start_new_transaction: bool = True) -> bool:
        coord = self.coordinator
        tps = [
            tp
            for tp, st in list(coord.partitions.items())
            if st.has_progress and self.transactional_id(tp) in self._producers
        ]
        if not tps:
            return False
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await asyncio.gather(
            *(self._commit_tp(tp, start_new_transaction) for tp in tps), return_exceptions=True
        )
        for tp, result in zip(tps, results, strict=True):
            if isinstance(result, BaseException):
                if coord.fix("fatal-commit"):
                    fatal(f"commit of {tp} failed", result)
                # Stock Faust: log and carry on with whatever state the transaction is in.
                log.error("commit of %s failed (swallowed, fix disabled): %r", tp, result)
        coord.commits += 1
        coord.commit_seconds.append(loop.time() - started)
        if len(coord.commit_seconds) > 1024:
            del coord.commit_seconds[:512]
        return True

    async def _commit_tp(self, tp: TP, start_new_transaction: bool) -> None:
        coord = self.coordinator
        st = coord.state(tp)
        tid = self.transactional_id(tp)
        producer = self._producers[tid]
        coord.crash_point(Step.QUIESCE)
        gate = st.gate if coord.fix("quiesce") else _NO_GATE
        async with gate:  # 1. quiesce
            offset = None if st.processed is None else st.processed + 1
            stores = coord.stores.get(tp.topic, ()) if coord.fix("local-state") else ()

            coord.crash_point(Step.CHANGELOG)  # 2. changelog
            changelog: list[tuple[TransactionalStore, asyncio.Future[Any]]] = []
            for store in stores:
                for key, value in store.dirty_items(tp):
                    fut = await producer.send(
                        store.changelog_topic_name, value=value, key=key, partition=tp.partition
                    )
                    changelog.append((store, fut))
                    st.pending.append(fut)

            coord.crash_point(Step.DRAIN)  # 3. drain
            if coord.fix("flush-before-commit"):
                pending, st.pending = st.pending, []
                await asyncio.gather(*pending)
            else:
                st.pending = []

            coord.crash_point(Step.OFFSETS)  # 4. offsets
            if offset is not None and (st.committed is None or offset > st.committed):
                await producer.send_offsets_to_transaction(
                    {TopicPartition(tp.topic, tp.partition): offset}, self.app.conf.id
                )

            coord.crash_point(Step.COMMIT)  # 5. commit
            await producer.commit_transaction()
            if offset is not None:
                st.committed = offset

            coord.crash_point(Step.PERSIST)  # 6. persist
            last: dict[int, int] = {}
            for store, fut in changelog:
                md = fut.result()
                last[id(store)] = max(last.get(id(store), -1), md.offset)
            for store in stores:
                store.persist(tp, last.get(id(store)))

            coord.crash_point(Step.BEGIN)  # 7. begin
            if start_new_transaction:
                await producer.begin_transaction()


class _NoGate:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


_NO_GATE = _NoGate()


def _headers(headers: Any) -> list[tuple[str, bytes]] | None:
    if not headers:
        return None
    if isinstance(headers, Mapping):
        return list(headers.items())
    return list(headers)


def install(app: AppT) -> None:
    """Make ``app``'s Kafka transport use :class:`ExactlyOnceTransactionManager`."""
    transport = app.transport
    transport.TransactionManager = ExactlyOnceTransactionManager  # type: ignore[misc]
