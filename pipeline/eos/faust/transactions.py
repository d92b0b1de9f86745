"""Faust's transaction manager, replaced: one transaction per *source* partition.

Faust builds it from ``transport.TransactionManager`` (set in
:meth:`pipeline.factory.PipelineApp._new_transport`). It holds the transactional
producers, routes every send made while processing an event into that event's source
partition's transaction, and runs the commit rounds (:mod:`pipeline.eos.commit`).

What it changes in Faust's meaning: ``commit`` ignores its arguments (it commits what
the coordinator recorded as processed, for every partition with progress), and ``send``
routes by source partition rather than by destination.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any, cast

from aiokafka import TopicPartition
from faust import current_event
from faust.transport.consumer import TransactionManager
from faust.types import TP
from faust.types.tuples import RecordMetadata

from pipeline.eos.commit import (
    Partition,
    Transaction,
    commit_partition,
    produce,
    produce_now,
    send_held,
)
from pipeline.eos.coordinator import Coordinator
from pipeline.eos.faust.producer import TransactionalProducer
from pipeline.eos.partition import OutRecord, PartitionState, as_headers, fail_held, retrieve
from pipeline.eos.policy import (
    FENCED_WAIT_SESSIONS,
    MAX_REWINDS_WITHOUT_COMMIT,
    PRODUCER_START_S,
    Step,
    fatal,
    is_fence,
)

log = logging.getLogger(__name__)


class ExactlyOnceTransactionManager(TransactionManager):
    """Faust's transaction manager, replaced (see the module docstring)."""

    coordinator: Coordinator

    def __init__(self, transport: Any, *, consumer: Any, producer: Any, **kwargs: Any) -> None:
        super().__init__(transport, consumer=consumer, producer=producer, **kwargs)
        self.coordinator = self.app.eos  # type: ignore[attr-defined]
        self.coordinator.rewind = self.rewind
        self.coordinator.emit_all = self.emit_all
        self._by_source = self.coordinator.policy.on("route-by-source")
        self._producers: dict[str, TransactionalProducer] = {}
        #: source partitions this worker holds a transactional producer for
        self._held: set[TP] = set()
        self._commit_lock = asyncio.Lock()
        self._commit_timer: asyncio.Future[None] | None = None
        self._tids: dict[TP, str] = {}
        self._parts: dict[TP, Partition] = {}
        #: the consumer group generation of the last assignment this worker took
        self._generation: int | None = None
        #: source partitions given up after a fence, with when (see :meth:`_give_up`)
        self._given_up: dict[TP, float] = {}

    # -- naming -------------------------------------------------------------------------

    def transactional_id(self, tp: TP) -> str:
        # One transactional.id per *source* topic-partition, not per Faust topic group:
        # two agents reading different topics never share (and commit) a transaction,
        # and a zombie that still believes it owns ``tp`` is fenced by the new owner.
        tid = self._tids.get(tp)
        if tid is None:  # asked per send: Faust's settings lookups are not free
            tid = self._tids[tp] = f"{self.app.conf.id}-{tp.topic}-{tp.partition}"
        return tid

    def _source_tps(self, tps: Iterable[TP]) -> set[TP]:
        assignor = self.app.assignor
        return {
            tp for tp in tps if tp.topic in self.coordinator.sources and not assignor.is_standby(tp)
        }

    # -- rebalance ----------------------------------------------------------------------

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        # Faust's revoke path has already asked for a commit, but Faust skips it when a
        # timer commit is in flight ("wait for it, then do nothing"), and it only commits
        # what its own ack tracking allows. Events processed after the in-flight commit
        # took its snapshot would stay in the open transaction; for a partition this
        # worker keeps, the next recovery then seeks back to the older committed offset
        # and processes them again into that same transaction. So commit here, ourselves,
        # everything processed so far. Events are held back from now until the next
        # recovery ends (the coordinator is unsettled), so nothing new slips in.
        await self.commit({})

    async def on_rebalance(
        self, assigned: set[TP], revoked: set[TP], newly_assigned: set[TP]
    ) -> None:
        assignor = self.app.assignor
        self.coordinator.assigned(
            {tp for tp in assigned if assignor.is_standby(tp)},
            generation=self.app.consumer_generation_id,
        )
        # The group decided whose every partition is, those given up after a fence too.
        self._given_up.clear()
        if self._commit_timer is None:
            self._commit_timer = asyncio.ensure_future(self._commit_loop())
        keep = self._source_tps(assigned)
        self._check_state_assigned(keep, assigned)
        # Release by what we hold, not by Faust's ``revoked``: a partition that moves
        # from active to standby here is still "assigned" to the consumer (Faust assigns
        # standby source partitions, paused), so it is in neither set. Keeping its
        # producer would skip InitProducerId when it comes back, and with it the fencing
        # of, and the wait for, the transaction its owner meanwhile had open.
        release = self._held - keep
        generation = self.app.consumer_generation_id
        # Skipped generations are told even when nothing is held any more: a worker back
        # from a freeze may have given up every partition (fenced) before this rebalance.
        if self._generation is not None and generation != self._generation + 1:
            # Generations were skipped: this worker missed rebalances (stopped, or cut off
            # longer than its session), in which other workers may have owned, processed
            # and committed the partitions it gets back. What it kept of them (producer,
            # last commit, open overlays) is stale: a chaos run found a worker that, back
            # from SIGSTOP, kept its fenced producer, failed, and rewound to its own old
            # commit instead of the newer one, applying a range of events twice. Only
            # consecutive generations prove nobody else owned a kept partition.
            log.warning(
                "group generation %d follows %d: rebalances were missed; "
                "taking every partition anew",
                generation,
                self._generation,
            )
            release = set(self._held)
        self._generation = generation
        for tp in sorted(release):
            await self._release(tp)
        for tp in sorted(keep):
            if self.transactional_id(tp) not in self._producers:
                await self._acquire(tp)

    def _check_state_assigned(self, keep: set[TP], assigned: set[TP]) -> None:
        """Every processed partition's table state must be recovered with it.

        A source partition comes with the same partition of each of its tables'
        changelogs, as an active assignment, or Faust neither restores nor maintains
        that state, and processing would start from an empty table. That happened when
        the group leader's metadata did not list a changelog topic yet (the app now
        creates changelogs before subscribing). Should it happen again, a restart, with
        fresh metadata, is the only safe move: never process without the state.
        """
        assignor = self.app.assignor
        for tp in sorted(keep):
            for store in self.coordinator.stores.get(tp.topic, ()):
                changelog = TP(store.changelog_topic_name, tp.partition)
                if changelog not in assigned or assignor.is_standby(changelog):
                    fatal(
                        f"{tp} is assigned without its table state {changelog}",
                        RuntimeError("changelog partition not actively assigned"),
                    )

    def _new_transactional_producer(self, tid: str) -> TransactionalProducer:
        return TransactionalProducer.like_faust(
            self.producer, tid, float(self.app.conf.broker_commit_interval)
        )

    def _partition(self, tp: TP) -> Partition:
        """What ``tp``'s transactions write besides outputs (asked per send: cached)."""
        part = self._parts.get(tp)
        if part is None:
            settings = self.coordinator.settings
            part = self._parts[tp] = Partition(
                tp=tp,
                progress=TopicPartition(
                    settings.progress_topic, tp.partition % settings.partitions
                ),
                stores=tuple(self.coordinator.stores.get(tp.topic, ())),
                group_id=self.app.conf.id,
            )
        return part

    async def _acquire(self, tp: TP) -> None:
        tid = self.transactional_id(tp)
        producer = self._new_transactional_producer(tid)
        try:
            # start() runs InitProducerId: it fences any older producer with this id and
            # waits until that producer's open transaction is completed or aborted, so the
            # committed offsets read next are stable. Bounded, as in _rewind.
            await asyncio.wait_for(producer.start(), PRODUCER_START_S)
            await producer.begin_transaction()
        except Exception as exc:
            fatal(f"could not start the transaction of {tid}", exc)
        self._producers[tid] = producer
        self._held.add(tp)
        st = self.coordinator.state(tp)
        st.pending.clear()
        fail_held(st, "the partition was assigned anew")
        st.processed = None
        st.committed = None
        for store in self.coordinator.stores.get(tp.topic, ()):
            store.discard(tp)

    async def _release(self, tp: TP) -> None:
        tid = self.transactional_id(tp)
        producer = self._producers.pop(tid, None)
        self._held.discard(tp)
        for store in self.coordinator.stores.get(tp.topic, ()):
            store.discard(tp)
        st = self.coordinator.partitions.pop(tp, None)
        self.coordinator.ledger.forget(tp)  # memory only: what it knew stays true
        if st is not None:
            fail_held(st, "the partition was released")
        if producer is not None:
            # Stopping aborts whatever the transaction still holds (nothing after the
            # revoke commit); the new owner's InitProducerId would fence it anyway.
            if st is not None and st.has_progress:
                self.coordinator.aborts += 1
            try:
                # Bounded: a fenced producer's last batches may never be accepted.
                await asyncio.wait_for(producer.stop(), 5.0)
            except Exception as exc:  # pragma: no cover - best effort on a dead link
                log.warning("stopping producer %s: %r", tid, exc)

    async def _give_up(self, tp: TP, st: PartitionState) -> None:
        """``tp``'s producer was fenced: drop the partition until a rebalance decides.

        Starting a new producer for it, as an abort otherwise does, would run
        InitProducerId, which fences whoever took the transactional id. A worker back
        from a freeze longer than its session meets its fenced producers before it hears
        of the rebalances it missed; re-initialising them fenced the partitions' new
        owner, whose next commit then failed (seen in CI: the owner exited with 70, and
        the "missed rebalances" test with it). Kafka Streams treats a fenced task the
        same way: as migrated, closed without a commit, until the group says whose it is.

        The open transaction is dropped with the producer (the broker aborted it when
        the other producer initialised), the partition's state here is forgotten, and
        its fetched records are skipped. If the group assigns it to this worker again,
        :meth:`on_rebalance` takes it anew from the committed offsets. If no rebalance
        comes (the broker fenced a transaction that outlived its timeout, and the group
        still names this worker), :meth:`_commit_loop` ends the process after
        :data:`FENCED_WAIT_SESSIONS` session timeouts: its restart rejoins the group.
        """
        self.coordinator.fences += 1
        await self._release(tp)
        self._given_up.setdefault(tp, asyncio.get_running_loop().time())
        log.warning(
            "%s: given up after its producer was fenced; waiting for the group to assign it",
            tp,
        )

    def _check_given_up(self, now: float) -> None:
        """End the process if a partition given up was not decided by a rebalance in time."""
        if not self._given_up:
            return
        wait = FENCED_WAIT_SESSIONS * float(self.app.conf.broker_session_timeout)
        since = min(self._given_up.values())
        if now - since > wait:
            tps = ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(self._given_up))
            fatal(
                f"producers fenced for {tps} and no rebalance for {now - since:.0f} s; "
                "restarting to rejoin the group"
            )

    async def _commit_loop(self) -> None:
        """Commit on our own clock as well as Faust's.

        Faust's timer calls :meth:`commit` only when its own ack tracking finds offsets
        to commit, and that tracking stalls on the gaps that transaction markers and our
        corrections of its delivery leave (seen: a stage behind a transactional topic
        processed its last records but never committed them). Progress here is what
        :class:`Coordinator` recorded, so this never commits anything Faust would not.
        """
        interval = float(self.app.conf.broker_commit_interval)
        coord = self.coordinator
        quiet_s = coord.settings.commit_quiet_s
        loop = asyncio.get_running_loop()
        while True:
            deadline = loop.time() + interval
            quiet = quiet_s > 0 and await coord.wait_quiet(quiet_s, deadline)
            if not quiet:
                await asyncio.sleep(max(0.0, deadline - loop.time()))
            self._check_given_up(loop.time())
            if coord.settled and any(st.has_progress for st in coord.partitions.values()):
                if quiet:
                    coord.quiet_commits += 1
                await self.commit({})

    async def on_stop(self) -> None:
        if self._commit_timer is not None:
            self._commit_timer.cancel()
        await self.coordinator.close()
        for tid, producer in list(self._producers.items()):
            try:
                await producer.stop()
            except Exception as exc:  # pragma: no cover
                log.warning("stopping producer %s: %r", tid, exc)
        self._producers.clear()
        self._held.clear()

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
        record = OutRecord(
            topic,
            key,
            value,
            partition,
            None if timestamp is None else round(timestamp * 1000),
            as_headers(headers),
            event.message.offset,
        )
        return await self.emit(event.message.tp, record)

    async def emit_all(
        self, source: TP, records: list[OutRecord]
    ) -> tuple[OutRecord, BaseException] | None:
        """Put the outputs of a handled chunk of ``source`` into its transaction, in
        order (held while it commits); the first record refused before it was queued
        (larger than the producer may send, say) and why, or None."""
        if not self._by_source:
            for record in records:  # stock routing: per record, as Faust does
                try:
                    await self.emit(source, record)
                except Exception as exc:
                    return record, exc
            return None
        producer = self._producers.get(self.transactional_id(source))
        if producer is None:
            fatal(f"no transaction open for {source} (partition not assigned to this worker)")
            raise AssertionError("unreachable")
        st = self.coordinator.state(source)
        part = self._partition(source)
        for i, record in enumerate(records):
            if st.holding:
                # Held ones are never awaited by the stage: no future until sent.
                st.held.extend(records[i:])
                return None
            try:
                if not produce_now(st, producer, record):
                    await produce(part, st, producer, record)
            except Exception as exc:
                return record, exc
        return None

    async def emit(self, source: TP, record: OutRecord) -> asyncio.Future[Any]:
        """Put ``record``, made while processing a record of ``source``, into the
        transaction of ``source`` (held, while that transaction commits)."""
        if self._by_source:
            tp = source
        else:
            # Stock Faust: the destination partition picks the transaction; when the
            # consumer has no metadata for the destination topic (it does not read it),
            # there is no partition and the record goes out in no transaction at all.
            p = self.consumer.key_partition(record.topic, record.key, record.partition)
            if p is None:
                seconds = None if record.timestamp_ms is None else record.timestamp_ms / 1000
                fut: Any = await self.producer.send(
                    record.topic, record.key, record.value, None, seconds, record.headers
                )
                return cast("asyncio.Future[Any]", fut)
            tp = TP(source.topic, int(p))
            record.partition = tp.partition
        producer = self._producers.get(self.transactional_id(tp))
        if producer is None:
            fatal(f"no transaction open for {tp} (partition not assigned to this worker)")
            raise AssertionError("unreachable")
        st = self.coordinator.state(tp)
        if st.holding:
            record.future = asyncio.get_running_loop().create_future()
            st.held.append(record)
            return record.future
        # Its caller may read the record's metadata from the future: its own, then.
        return await produce(self._partition(tp), st, producer, record, own=True)

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
        # Faust's timer and our revoke hook may both commit; one at a time, and the
        # second then commits whatever progress the first did not include.
        async with self._commit_lock:
            return await self._commit_all()

    async def _commit_all(self) -> bool:
        coord = self.coordinator
        tps = [
            tp
            for tp, st in list(coord.partitions.items())
            if st.due
            and not st.rewinding  # its open transaction holds part of a failed event
            and self.transactional_id(tp) in self._producers
        ]
        if not tps:
            return False
        loop = asyncio.get_running_loop()
        started = loop.time()
        # ``start_new_transaction`` is ignored: Faust passes False when it commits at a
        # revoke, and then a partition this worker keeps would have no open transaction
        # for its next event. Beginning is client-side only in Kafka (an empty
        # transaction costs the broker nothing), and a released partition's producer
        # aborts it when stopped.
        gathered = asyncio.gather(
            *(self._commit_tp(tp) for tp in tps),
            return_exceptions=True,
        )
        while True:
            done, _ = await asyncio.wait({gathered}, timeout=5.0)
            if done:
                break
            stuck = {
                f"{tp.topic}[{tp.partition}]": coord.partitions[tp].step
                for tp in tps
                if tp in coord.partitions and coord.partitions[tp].step
            }
            log.warning("commit running for %.0f s; at steps %s", loop.time() - started, stuck)
        results = gathered.result()
        for tp, result in zip(tps, results, strict=True):
            if isinstance(result, BaseException):
                st = coord.partitions.get(tp)
                if st is not None and self._fenced_before_commit(tp, st, result):
                    # Nothing of the transaction can have committed: give the partition
                    # up, as an abort after a fence does (see _give_up).
                    log.warning("%s: fenced at commit step %r: %r", tp, st.step, result)
                    await self._give_up(tp, st)
                    continue
                if coord.policy.on("fatal-commit"):
                    fatal(f"commit of {tp} failed", result)
                # Stock Faust: log, and carry on in a new transaction as if it committed.
                log.error("commit of %s failed (swallowed, fix disabled): %r", tp, result)
                await self._begin_quietly(tp)
        coord.commits += 1
        coord.commit_seconds.append(loop.time() - started)
        coord.commit_histogram.observe(loop.time() - started)
        if len(coord.commit_seconds) > 1024:
            del coord.commit_seconds[:512]
        return True

    def _fenced_before_commit(self, tp: TP, st: PartitionState, exc: BaseException) -> bool:
        """Whether ``tp``'s commit failed on a fence at a step other than the commit
        itself (step 5). A fence before it means the transaction never committed; after
        it (at ``begin``), that it did. A failed ``commit_transaction`` stays fatal
        whatever it says, like any commit whose outcome the worker must not guess."""
        if st.step == Step.COMMIT.value:
            return False
        producer = self._producers.get(self.transactional_id(tp))
        return is_fence(exc) or (producer is not None and producer.fenced)

    async def _begin_quietly(self, tp: TP) -> None:
        producer = self._producers.get(self.transactional_id(tp))
        if producer is None:
            return
        try:
            await producer.begin_transaction()
            await send_held(self._partition(tp), self.coordinator.state(tp), producer)
        except Exception as exc:
            log.error("begin of %s failed (swallowed, fix disabled): %r", tp, exc)

    async def _commit_tp(self, tp: TP) -> None:
        coord = self.coordinator
        txn = self._producers[self.transactional_id(tp)]
        await commit_partition(self._partition(tp), coord.state(tp), txn, coord.policy, self)

    # -- what the commit calls back into (pipeline.eos.commit.Hooks) -------------------

    async def at_step(self, step: Step, tp: TP, st: PartitionState) -> None:
        st.step = step.value
        faults = self.coordinator.faults
        faults.crash_point(step, tp, st)
        if faults.delays:
            await faults.delay_point(step, tp, st)

    async def fail_point(self, step: Step, txn: Transaction, tp: TP, st: PartitionState) -> None:
        await self.coordinator.faults.fail_point(step, txn, tp, st)

    def blame(self, tp: TP, st: PartitionState, offset: int, exc: BaseException) -> None:
        self.coordinator.fail(tp, st, offset, exc)

    async def abort_and_rewind(self, tp: TP, st: PartitionState) -> None:
        await self._rewind(tp, st)

    async def rewind(self, tp: TP, st: PartitionState) -> None:
        """Abort ``tp``'s open transaction and go back to its last commit (see
        :meth:`Coordinator.run`): after the commit round in flight, if any."""
        async with self._commit_lock:
            if self.coordinator.partitions.get(tp) is st and st.rewinding:
                await self._rewind(tp, st)

    async def _rewind(self, tp: TP, st: PartitionState) -> None:
        """Called with the commit lock held (no commit of ``tp`` in flight), and with
        ``st.rewinding`` set (nothing of ``tp`` processed meanwhile)."""
        coord = self.coordinator
        tid = self.transactional_id(tp)
        old = self._producers.get(tid)
        if old is None:  # released meanwhile: its next owner starts from the commit
            return
        if st.fenced or old.fenced:
            await self._give_up(tp, st)
            return
        st.rewinds_in_a_row += 1
        if st.rewinds_in_a_row > MAX_REWINDS_WITHOUT_COMMIT:
            fatal(f"{tp}: aborted {st.rewinds_in_a_row - 1} times without a commit")
        # Held sends and table rows of the aborted transaction are dropped with it.
        for store in coord.stores.get(tp.topic, ()):
            store.discard(tp)
        fail_held(st, "its transaction was aborted after an event failed")
        for fut in st.pending:
            fut.add_done_callback(retrieve)
        st.pending.clear()
        # A new producer with the same transactional.id, not abort_transaction(): after
        # the broker refused a batch, aiokafka 0.14's producer aborted fine but then
        # never delivered the next transaction's records (seen: a commit stuck at its
        # drain step for minutes). The new one's InitProducerId aborts the open
        # transaction and fences the old producer, whatever state that one is in.
        try:
            await asyncio.wait_for(old.stop(), 5.0)
        except Exception as exc:  # it is fenced below either way
            log.warning("stopping the producer of %s: %r", tp, exc)
        try:
            producer = self._new_transactional_producer(tid)
            # Bounded: InitProducerId waits while the broker completes the old
            # transaction, which it cannot when a partition of it refuses even the
            # abort marker (seen with a topic whose max.message.bytes was 64); past the
            # transaction timeout, restart clean rather than wait forever.
            await asyncio.wait_for(producer.start(), PRODUCER_START_S)
            await producer.begin_transaction()
        except Exception as exc:
            fatal(f"could not start a new transaction for {tp}", exc)
        self._producers[tid] = producer
        coord.aborts += 1
        target = st.committed if st.committed is not None else st.start
        st.processed = None
        st.events = 0
        st.hole = None
        st.expected = target
        st.rewound += 1
        st.step = ""
        coord.rewinds += 1
        st.rewinding = False
        log.warning("%s: transaction aborted; processing again from offset %s", tp, target)
        if target is not None and coord.seek_wait is not None:
            await coord._seek_quietly({tp: target})
