"""The coordinator of one app's exactly-once processing: the partition registry, the
admission of delivered records (in order, once, from the committed offset), settling
after a rebalance (restore itself: :mod:`pipeline.eos.restore`), liveness, and an
event's failure handling.

Shared by the agents (:meth:`Coordinator.run`), the tables and the transaction manager
(:mod:`pipeline.eos.faust.transactions`), which reaches it as ``app.eos``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from aiokafka import TopicPartition
from faust.types import TP
from prometheus_client import Histogram

from pipeline.domain.models import excerpt
from pipeline.eos.delivery import CheckUnknown, Fetched, FetchLedger, KnownRecords, Verdict, admit
from pipeline.eos.faults import Faults
from pipeline.eos.partition import NO_GATE, OutRecord, PartitionState, progress_key
from pipeline.eos.policy import CHECK_TIMEOUT_S, MAX_ATTEMPTS, Policy, fatal, is_fence
from pipeline.eos.readers import OnDemand, idle
from pipeline.eos.restore import Restorer
from pipeline.eos.stage import Out, Stage
from pipeline.eos.standby import StandbyFollower
from pipeline.kafka_io import last_record_end

if TYPE_CHECKING:
    from faust.types import StreamT

    from pipeline.eos.faust.store import TransactionalStore
    from pipeline.settings import Settings

log = logging.getLogger(__name__)

#: Records of one batch handled between two looks at the commit gate: a commit of the
#: partition waits for at most this many.
SLICE = 500
#: Records a stage may have queued before the fetch loop waits for it (and down to
#: which it waits). A few fetches' worth: the queue only has to bridge the hop from the
#: fetch loop to the stage. At 20,000 the full chain's worker peaked at 612 MB of RSS
#: on a 200,000-event backlog and did 5,350 events/s; at 2,000, 469 MB and 7,824.
QUEUE_HIGH = 2_000
QUEUE_LOW = 1_000
#: Sends a partition may hold while its previous transaction commits before its
#: processing waits for that commit. Unbounded, a slow commit let a stage run on and
#: hold its outputs: 8,000 per partition were seen, and the full chain's worker grew
#: by 100 MB within two seconds.
HELD_MAX = 2 * SLICE


class StageRunner:
    """A stage's queue of fetched batches: fed by the fetch loop, drained by its agent."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.batches: deque[Fetched] = deque()
        #: records queued
        self.queued = 0
        self._ready = asyncio.Event()
        self._room = asyncio.Event()

    def put(self, batch: Fetched) -> None:
        self.batches.append(batch)
        self.queued += len(batch)
        self._ready.set()

    async def get(self) -> Fetched:
        while not self.batches:
            self._ready.clear()
            await self._ready.wait()
        batch = self.batches.popleft()
        self.queued -= len(batch)
        if self.queued <= QUEUE_LOW:
            self._room.set()
        return batch

    async def drained(self, poll_s: float) -> None:
        """Until the queue is down to :data:`QUEUE_LOW`, or ``poll_s`` passed."""
        self._room.clear()
        if self.queued <= QUEUE_LOW:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._room.wait(), poll_s)


class FaustRecord:
    """A Faust message as a :class:`pipeline.eos.stage.Record` (at_least_once)."""

    __slots__ = ("headers", "key", "offset", "partition", "timestamp", "topic", "value")

    def __init__(self, message: Any) -> None:
        self.topic = message.topic
        self.partition = message.partition
        self.offset = message.offset
        ts = message.timestamp
        self.timestamp = 0 if ts is None else round(ts * 1000)
        self.key = message.key
        self.value = message.value
        headers = message.headers
        self.headers = (
            list(headers.items()) if isinstance(headers, Mapping) else list(headers or ())
        )


class Coordinator:
    """Shared by agents, tables and the transaction manager of one app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        #: the guarantee and the fixes, decided once (see pipeline.eos.policy)
        self.policy = Policy.from_settings(settings)
        self.enabled = self.policy.exactly_once
        self.partitions: dict[TP, PartitionState] = {}
        self.sources: set[str] = set()
        self.stores: dict[str, list[TransactionalStore]] = {}
        self.commits = 0
        self.skipped = 0
        #: the assignment epoch processing may run in (see :attr:`settled`)
        self.settled_epoch: int | None = None
        self.unsettled_count = 0
        self.assign_epoch = 0
        #: the group generation of the last assignment (see :meth:`recovered`)
        self.assign_generation: int | None = None
        self.reseeks = 0
        #: set by the consumer: seek through Faust's consumer thread, its seeks per
        #: partition (see Fetched), and resume a paused partition
        self.seek_wait: Callable[[Mapping[TP, int]], Awaitable[None]] | None = None
        self.seek_counts: Mapping[TP, int] | None = None
        self.resume: Callable[[set[TP]], None] | None = None
        #: set by the transaction manager: put a handled chunk's outputs into the
        #: transaction of their source partition, in order; the first one refused and
        #: why, or None (see ExactlyOnceTransactionManager.emit_all)
        self.emit_all: (
            Callable[[TP, list[OutRecord]], Awaitable[tuple[OutRecord, BaseException] | None]]
            | None
        ) = None
        #: at_least_once: send an output straight through Faust's producer
        self.send_direct: Callable[[OutRecord], Awaitable[Any]] | None = None
        #: per source topic, its stage's queue of fetched batches
        self.runners: dict[str, StageRunner] = {}
        self._quiesce = self.policy.on("quiesce")
        self.unstalls = 0
        self._liveness_task: asyncio.Future[None] | None = None
        self._checker = OnDemand(lambda: self._reader(max_partition_fetch_bytes=1024 * 1024))
        #: the checker is assigned what it checks: one check at a time
        self._checker_lock = asyncio.Lock()
        #: per partition, the committed-record offsets of the last range read
        self._known: dict[TP, KnownRecords] = {}
        #: what Faust's consumer fetched (see FetchLedger); fed by the consumer thread
        self.ledger = FetchLedger()
        self.ledger_answers = 0
        #: times a stage waited for a commit because its partition held HELD_MAX sends
        self.held_waits = 0
        self.broker_checks = 0
        self._settling: asyncio.Future[None] | None = None
        #: changelog topics of transactional stores (see :meth:`restores_changelog`)
        self._changelog_names: set[str] = set()
        self.restorer = Restorer(lambda: self._reader(auto_offset_reset="earliest"))
        #: keeps this worker's standby copies current (pipeline.eos.standby)
        self.standby = StandbyFollower(lambda: self._reader(auto_offset_reset="earliest"))
        #: the standby changelog partitions of the current assignment, of our stores
        self._standby_copies: set[TP] = set()
        #: changelog topic -> its transactional store
        self._store_of_changelog: dict[str, TransactionalStore] = {}
        #: called once processing may start after a rebalance (recovery duration metric)
        self.on_settled: Callable[[], None] | None = None
        self._offsets_reader = OnDemand(self._new_offsets_reader)
        self._reseek_task: asyncio.Future[None] | None = None
        self.commit_seconds: list[float] = []
        #: loop time at which an agent last finished an event (see :meth:`wait_quiet`)
        self.last_done = 0.0
        #: set when an event finishes; the commit loop clears it when it has waited for one
        self.activity = asyncio.Event()
        #: the event loop's clock, bound once (looked up per event otherwise)
        self._clock: Callable[[], float] = time.monotonic
        #: commits started because the agents went quiet, before the interval was up
        self.quiet_commits = 0
        # Exported through /metrics (pipeline.metrics); unregistered here, so that two
        # apps in one process (tests) keep separate histograms.
        self.commit_histogram = Histogram(
            "pipeline_commit_duration_seconds",
            "Duration of a commit round: every owned partition's transaction committed",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=None,
        )
        #: transactions this process aborted itself (released with uncommitted work, a
        #: failed event, or the test-only fail points); a crashed worker's are aborted
        #: by the broker
        self.aborts = 0
        #: events whose processing raised, partitions rewound for them, and events sent
        #: to the dead-letter topic after MAX_ATTEMPTS failures
        self.failures = 0
        self.rewinds = 0
        self.poison = 0
        #: partitions given up because another producer took their transactional id
        self.fences = 0
        #: offset-gap checks the broker did not answer (the event waited for another)
        self.unknown_checks = 0
        #: partitions resumed from the progress topic: the group's offset was gone
        self.progress_recoveries = 0
        #: test-only: broker checks failed on purpose so far (``PIPELINE_FAIL_CHECKS``)
        self.failed_checks = 0
        #: set by the transaction manager: abort a partition's open transaction and go
        #: back to its last commit (see ExactlyOnceTransactionManager.rewind)
        self.rewind: Callable[[TP, PartitionState], Awaitable[None]] | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        #: test-only fault points (inert unless a PIPELINE_* fault switch is set)
        self.faults = Faults(settings, self.partitions, self._count_abort)
        self._planted = self.faults.planted_failure()

    def _count_abort(self) -> None:
        self.aborts += 1

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def fix(self, name: str) -> bool:
        return self.policy.on(name)

    def register_source(self, topic: str) -> None:
        self.sources.add(topic)

    def register_store(self, source_topic: str, store: TransactionalStore) -> None:
        self.stores.setdefault(source_topic, []).append(store)
        if store.transactional:
            self._changelog_names.add(store.changelog_topic_name)
            self._store_of_changelog[store.changelog_topic_name] = store

    def state(self, tp: TP) -> PartitionState:
        st = self.partitions.get(tp)
        if st is None:
            st = self.partitions[tp] = PartitionState()
        return st

    # -- delivery ---------------------------------------------------------------------

    @property
    def settled(self) -> bool:
        """Whether the current assignment's recovery ended, so that processing may run.

        One comparison of two integers, each written by one statement: the consumer
        thread's :meth:`unsettle` and the loop's :meth:`settle` may interleave anywhere
        without leaving it true for an assignment that did not settle (with a flag set
        by each, a settle that checked its epoch just before a rebalance began could
        set the flag after the rebalance cleared it).
        """
        return self.settled_epoch == self.unsettled_count

    def unsettle(self) -> None:
        """A rebalance started: positions are about to be re-seeked.

        May be called from Faust's consumer thread: one increment, which ends
        :attr:`settled` for the epoch that was settled.
        """
        self.unsettled_count += 1

    def assigned(self, standbys: Iterable[TP] = (), generation: int | None = None) -> None:
        """Partitions were assigned in group ``generation`` (``standbys``: those assigned
        as standby copies): the recovery that follows ends in :meth:`settle`."""
        self.assign_epoch = self.unsettled_count
        self.assign_generation = generation
        # The standby follower stopped writing when the rebalance began (its current()
        # turned False); it follows the new copies once the restore is done.
        self._standby_copies = {tp for tp in standbys if self.restores_changelog(tp)}
        self.standby.stop(expected=self._standby_copies)
        self._disown()

    def _disown(self) -> None:
        for stores in self.stores.values():
            for store in stores:
                store.owned.clear()

    def recovered(
        self,
        committed: Mapping[TP, int | None] | None = None,
        *,
        generation: int | None = None,
        restarting: bool = False,
    ) -> None:
        """The recovery of the current assignment completed; start processing.

        ``generation`` is the group generation the completed recovery was for, and
        ``restarting`` whether Faust was told to start another one already. Either
        shows a recovery that ended after the next assignment arrived: Faust ends a
        recovery (its seek to the committed offsets) without checking the generation
        again, and the next assignment's ``assigned`` may come first. A chaos run saw
        one settle the next assignment while its producers were still being acquired:
        processing began at offset 0 of partitions it had no offsets for yet, and 873
        events were forwarded twice.

        Called by the app at the end of Faust's recovery. Not from ``perform_seek``:
        Faust also seeks to committed offsets whenever its fetcher runs while flow is
        stopped, which happens in the middle of a table recovery; settling then let
        events be processed against a half-restored dedup table (duplicates).

        The committed offsets are asked from the broker (``committed`` is for tests),
        not taken from Faust's consumer: Faust also writes its own ack-based offsets
        into that map after every commit call, whether anything was committed or not,
        including offsets of events we skipped (seen: offsets of skipped events taken
        as committed, and the records below them never processed).
        """
        stale_generation = (
            generation is not None
            and self.assign_generation is not None
            and generation != self.assign_generation
        )
        if self.assign_epoch != self.unsettled_count or stale_generation or restarting:
            log.info(
                "ignoring the end of a superseded recovery (generation %s; assigned %s)",
                generation,
                self.assign_generation,
            )
            return
        epoch = self.unsettled_count
        self._settling = asyncio.ensure_future(self._settle_from(committed, epoch))

    async def _settle_from(self, committed: Mapping[TP, int | None] | None, epoch: int) -> None:
        try:
            if not await self.restore(epoch):
                return  # a rebalance started: its recovery restores again
        except Exception as exc:
            # Never process against incomplete state: end the process, restart clean.
            fatal("could not restore the tables", exc)
            return
        self.follow_standbys(epoch)
        try:
            if committed is None:
                committed = await self._committed_offsets(list(self.partitions))
                committed = await self._fill_from_progress(committed)
        except Exception as exc:
            # Without them nothing may be processed: end the process, restart clean.
            fatal("could not read the committed offsets", exc)
            return
        await self.settle(committed, epoch=epoch)
        if self.on_settled is not None and epoch == self.unsettled_count:
            self.on_settled()

    async def _fill_from_progress(self, committed: Mapping[TP, int | None]) -> dict[TP, int | None]:
        """Where the group has no committed offset, the last one from the progress
        topic (written in the same transaction as the offset itself).

        The group's offsets are gone when every worker was down longer than the
        broker's ``offsets.retention.minutes``: starting again from the earliest
        offsets would then process every retained event a second time against tables
        that kept its effects (balances added twice). A partition with no progress
        record either is new (a fresh deployment, or partitions added to
        ``orders.raw``) unless its table's changelog holds state: then where processing
        stopped is unknown, and the worker refuses to guess.
        """
        out = dict(committed)
        # A partition this worker committed itself (and kept) is known to it exactly,
        # whatever the group says: its last commit's offsets and progress record become
        # visible only once the commit markers are written, after commit_transaction
        # returned. ``settle`` continues from ours then. Asking the progress topic, and
        # refusing for want of it, would end a sound worker: a chaos soak saw a second
        # recovery of one assignment do that moments after the worker's own commits.
        missing = [
            tp
            for tp, offset in out.items()
            if offset is None
            and (tp not in self.partitions or self.partitions[tp].committed is None)
        ]
        if not missing:
            return out
        found = await self._progress(missing)
        for tp in missing:
            offset = found.get(tp)
            if offset is not None:
                log.warning(
                    "%s: the group has no committed offset (expired?); resuming at %d, "
                    "the last offset the pipeline committed for it",
                    tp,
                    offset,
                )
                out[tp] = offset
                self.progress_recoveries += 1
        orphans = [tp for tp in missing if out[tp] is None and self._has_state(tp)]
        if orphans:
            fatal(
                f"no committed offset and no progress record for {orphans}, whose tables "
                "hold state: processing them from the start would apply events twice "
                "(see README, 'Lost consumer group offsets')",
                RuntimeError("committed offsets missing"),
            )
        return out

    async def _progress(self, tps: list[TP]) -> dict[TP, int]:
        settings = self.settings
        partitions = {tp.partition % settings.partitions for tp in tps}
        wanted = {progress_key(tp): tp for tp in tps}
        reader = await self._reader(auto_offset_reset="earliest")
        out: dict[TP, int] = {}
        try:
            ktps = [TopicPartition(settings.progress_topic, p) for p in sorted(partitions)]
            reader.assign(ktps)
            ends = await reader.end_offsets(ktps)
            await reader.seek_to_beginning(*ktps)
            pending = {k for k in ktps if ends[k] > 0}
            while pending:
                batches = await reader.getmany(*pending, timeout_ms=1000)
                for records in batches.values():
                    for m in records:
                        tp = wanted.get(m.key)
                        if tp is not None and m.value is not None:
                            out[tp] = int(m.value)
                for ktp in list(pending):
                    if await reader.position(ktp) >= ends[ktp]:
                        pending.discard(ktp)
        finally:
            await reader.stop()
        return out

    def _has_state(self, tp: TP) -> bool:
        """Does a table of ``tp``'s stage hold state for it (restored or persisted)?"""
        for store in self.stores.get(tp.topic, ()):
            if (
                store.transactional
                and store.persisted_offset(TP(store.changelog_topic_name, tp.partition)) is not None
            ):
                return True
        return False

    def owned_changelogs(self) -> dict[TP, TransactionalStore]:
        """The changelog partitions of the source partitions this worker processes."""
        out: dict[TP, TransactionalStore] = {}
        for tp in self.partitions:
            for store in self.stores.get(tp.topic, ()):
                if store.transactional:
                    out[TP(store.changelog_topic_name, tp.partition)] = store
        return out

    def restores_changelog(self, tp: TP) -> bool:
        """Is ``tp`` a changelog partition that :meth:`restore` reads, not Faust?"""
        return tp.topic in self._changelog_names

    async def restore(self, epoch: int) -> bool:
        """Bring the state of every owned partition up to its changelog's end
        (:mod:`pipeline.eos.restore`); ``False`` when a rebalance began meanwhile."""
        owned = self.owned_changelogs()
        self._disown()
        for tp, store in owned.items():
            store.owned.add(tp.partition)
        return await self.restorer.restore(owned, lambda: epoch == self.unsettled_count)

    def follow_standbys(self, epoch: int) -> None:
        """Keep this assignment's standby copies current from now until a rebalance
        begins (:mod:`pipeline.eos.standby`); called once its restore is done."""
        if epoch != self.unsettled_count:
            # A superseded assignment's settle, ending late (its restore was slow while
            # the next assignment's already ran): it must not replace the current copies'
            # follow with one for a dead epoch.
            return
        self.standby.follow(
            {
                tp: self._store_of_changelog[tp.topic]
                for tp in self._standby_copies
                if tp.topic in self._store_of_changelog
            },
            lambda: epoch == self.unsettled_count,
        )

    @property
    def restore_remaining(self) -> dict[TP, int]:
        """Per owned changelog partition, records still to restore (for /metrics)."""
        return self.restorer.remaining

    @property
    def restored_records(self) -> int:
        return self.restorer.records

    async def _reader(self, **extra: Any) -> Any:
        """A started ``read_committed`` consumer outside the group (it never subscribes)."""
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(
            **self.settings.kafka.kwargs(),
            isolation_level="read_committed",
            enable_auto_commit=False,
            **extra,
        )
        await consumer.start()
        return consumer

    async def _offsets(self) -> Any:
        """A consumer for offset questions only: it is never assigned a partition, so
        no long-poll fetch of its own holds up its requests. (The broker answers one
        connection's requests in order: a ``ListOffsets`` sent behind a fetch waits up
        to the fetch's wait, 0.5 s in aiokafka and 1.5 s in Faust's consumer.)"""
        return await self._offsets_reader.get()

    async def _new_offsets_reader(self) -> Any:
        from aiokafka import AIOKafkaConsumer

        # Has the group id to ask the group coordinator, but never subscribes, so it
        # never joins the group.
        consumer = AIOKafkaConsumer(
            **self.settings.kafka.kwargs(), group_id=self.settings.app_id, enable_auto_commit=False
        )
        await consumer.start()
        return consumer

    async def _committed_offsets(self, tps: list[TP]) -> dict[TP, int | None]:
        reader = await self._offsets()
        out: dict[TP, int | None] = {}
        for tp in tps:
            out[tp] = await reader.committed(TopicPartition(tp.topic, tp.partition))
        return out

    async def settle(self, committed: Mapping[TP, int | None], epoch: int | None = None) -> None:
        """Set where each partition continues, then let events through.

        A partition without a committed offset starts at the beginning of its log
        (``auto_offset_reset=earliest``), and is checked from there just the same. If
        another rebalance started meanwhile (``epoch`` changed), nothing is settled:
        that rebalance's recovery will.
        """
        if epoch is None:
            epoch = self.unsettled_count
        fresh = [tp for tp in self.partitions if committed.get(tp) is None]
        beginnings = await self.beginnings(fresh) if fresh else {}
        if epoch != self.unsettled_count:
            log.info("a rebalance started while settling; not settled")
            return
        dirty: list[tuple[TP, PartitionState]] = []
        for tp, st in self.partitions.items():
            start = committed.get(tp)
            if st.committed is not None and (start is None or st.committed > start):
                # A partition this worker kept: its last commit returned once the broker
                # decided it, but the offset becomes visible to OffsetFetch only when the
                # commit marker has reached __consumer_offsets (aiokafka cannot ask for
                # stable offsets, KIP-447). Our own record of it is exact.
                log.info(
                    "%s: committed offset %s not visible yet; using ours, %d",
                    tp,
                    start,
                    st.committed,
                )
                start = st.committed
            elif start is not None and st.committed is not None and start > st.committed:
                # Someone else committed it since our last commit (only after rebalances
                # this worker missed, and the transaction manager then took the partition
                # anew, so this is a second line of defence): what we kept is stale.
                log.warning(
                    "%s: committed offset %d is past our last commit %d; dropping what "
                    "this worker kept of it",
                    tp,
                    start,
                    st.committed,
                )
                for store in self.stores.get(tp.topic, ()):
                    store.discard(tp)
                st.processed = None
            if st.processed is not None and (start is None or st.processed + 1 > start):
                # Processed but not committed, although the revoke commit commits
                # everything processed before the rebalance: whatever let that happen,
                # the open transaction holds effects past where processing continues,
                # and must not commit with a later offset. Abort it (below).
                log.warning(
                    "%s: processed up to %d, committed %s; aborting its open transaction",
                    tp,
                    st.processed,
                    start,
                )
                dirty.append((tp, st))
            # From here on a rewind goes back to where processing now continues.
            st.committed = start
            st.expected = start if start is not None else beginnings.get(tp)
            st.start = st.expected
        self._known = {tp: k for tp, k in self._known.items() if tp in self.partitions}
        now = asyncio.get_running_loop().time()
        for st in self.partitions.values():
            st.last_delivery = st.last_progress = now
            st.stalled_since = None
        for tp, st in dirty:
            st.rewinding = True
            if self.rewind is not None:
                await self.rewind(tp, st)
            self.partitions[tp].processed = None
        if epoch != self.unsettled_count:
            log.info("a rebalance started while settling; not settled")
            return
        if self._liveness_task is None or self._liveness_task.done():
            self._liveness_task = asyncio.ensure_future(self._liveness())
        self.settled_epoch = epoch
        # Batches fetched before this point are dropped (they may begin anywhere): fetch
        # every partition again from where processing continues.
        targets = {tp: st.expected for tp, st in self.partitions.items() if st.expected is not None}
        if targets and self.seek_wait is not None:
            self._reseek_task = asyncio.ensure_future(self._seek_quietly(targets))
        log.info(
            "settled: processing resumes at %s",
            {f"{tp.topic}[{tp.partition}]": st.expected for tp, st in self.partitions.items()}
            if len(self.partitions) <= 16
            else f"{len(self.partitions)} partitions",
        )

    async def _first_record(self, tp: TP, start: int) -> int | None:
        """Offset of the first committed record of ``tp`` at or after ``start``.

        Read with a separate ``read_committed`` consumer (kept open, reassigned per
        question), so the answer does not depend on Faust's delivery. Raises
        :class:`CheckUnknown` when the broker does not answer in time. Each read covers a
        whole fetch (up to 1 MiB); which offsets in that range hold committed records is
        remembered, since it never changes. On a topic written by transactions (every
        commit leaves a marker in each partition it wrote) most gaps are then answered
        without a round trip.
        """
        if self.settings.fail_checks > self.failed_checks:
            # Test-only: this check times out (and neither memory answers it).
            self.failed_checks += 1
            raise CheckUnknown(f"{tp}: injected timeout of the check from {start}")
        answer = self.ledger.first_at_or_after(tp, start)
        if answer is not None:
            self.ledger_answers += 1
            return answer
        known = self._known.get(tp)
        if known is not None:
            answer = known.first_at_or_after(start)
            if answer is not None:
                return answer
        self.broker_checks += 1
        async with self._checker_lock:
            consumer = await self._checker.get()
            ktp = TopicPartition(tp.topic, tp.partition)
            consumer.assign([ktp])
            try:
                end = (await consumer.end_offsets([ktp]))[ktp]
                if start >= end:
                    return None
                consumer.seek(ktp, start)
                deadline = asyncio.get_running_loop().time() + CHECK_TIMEOUT_S
                while await consumer.position(ktp) < end:
                    if asyncio.get_running_loop().time() > deadline:
                        # Unknown. Not "a record is missing at ``start``": on a topic
                        # written by transactions ``start`` is often a commit marker,
                        # which is never delivered, and waiting for it stalled the
                        # partition.
                        raise CheckUnknown(f"{tp}: could not read from {start} in time")
                    batch = await consumer.getmany(ktp, timeout_ms=1000)
                    offsets = [int(m.offset) for m in batch.get(ktp, ())]
                    if offsets:
                        after = await consumer.position(ktp)
                        self._known[tp] = KnownRecords(start, max(after, offsets[-1] + 1), offsets)
                        return offsets[0]
                return None
            finally:
                idle(consumer)

    async def record_ends(self, tps: Iterable[TP]) -> dict[TP, int]:
        """Per partition, the offset after its last committed *record*.

        The last stable offset of a transactional topic usually points just past a
        commit marker, which no consumer ever receives. Faust's recovery waits for the
        record at ``highwater - 1`` and only gives up after two 5-second timeouts, on
        every restart; this is where it should stop instead.
        """
        out: dict[TP, int] = {}
        async with self._checker_lock:
            consumer = await self._checker.get()
            ktps = [TopicPartition(tp.topic, tp.partition) for tp in tps]
            if not ktps:
                return out
            consumer.assign(ktps)
            try:
                ends = await consumer.end_offsets(ktps)
                begins = await consumer.beginning_offsets(ktps)
                for ktp in ktps:
                    end, begin = int(ends[ktp]), int(begins[ktp])
                    tp = TP(ktp.topic, ktp.partition)
                    out[tp] = await last_record_end(consumer, ktp, begin, end)
            finally:
                idle(consumer)
        return out

    async def _seek_quietly(self, targets: Mapping[TP, int]) -> None:
        if self.seek_wait is None:
            return
        try:
            await asyncio.wait_for(self.seek_wait(targets), 10.0)
        except Exception as exc:  # revoked meanwhile: the next settle seeks again
            log.info("seek after settling failed: %r", exc)

    async def _liveness(self) -> None:
        """Notice stalled partitions, and un-stall those Faust stopped delivering.

        Every 2 s, a partition with nothing processed for 3 s is asked whether committed
        records wait after its next expected offset. If they do (or the broker cannot
        tell), it counts as stalled from then on: ``pipeline_partition_stalled_seconds``
        rises and the ``PipelinePartitionStalled`` alert fires, however the stall came
        about. If in addition nothing was even delivered for 3 s, it is resumed and
        seeked to the record (seen after restarts: a partition stays paused, or its
        re-fetched records are filtered out, although the log has records after our
        next expected offset).
        """
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(2.0)
            if self.settled and self.seek_wait is not None:
                await self.check_partitions(loop.time)

    async def check_partitions(self, clock: Callable[[], float]) -> None:
        """One round of :meth:`_liveness` over every partition (``clock``: loop time)."""
        for tp, st in list(self.partitions.items()):
            now = clock()
            if tp.topic not in self.sources or st.expected is None:
                continue
            if now - st.last_progress < 3.0:
                st.stalled_since = None
                continue
            try:
                first = await self._first_record(tp, st.expected)
            except Exception as exc:  # unknown: records may be waiting
                self.unknown_checks += 1
                log.warning("liveness check of %s: %s", tp, exc)
                if st.stalled_since is None:
                    st.stalled_since = now
                continue
            if first is None:  # nothing to do: idle, not stalled
                st.stalled_since = None
                continue
            if st.stalled_since is None:
                st.stalled_since = now
            if now - st.last_delivery < 3.0 or st.rewinding:
                continue  # deliveries come: admission (or a rewind) is at work
            if not self.settled:
                continue
            self.unstalls += 1
            log.warning(
                "%s: no delivery for %.0f s with record %d waiting; resuming and seeking to %d",
                tp,
                now - st.last_delivery,
                first,
                first,
            )
            st.last_delivery = now
            if self.resume is not None:
                self.resume({tp})
            if self.seek_wait is None:
                continue
            try:
                await asyncio.wait_for(self.seek_wait({tp: first}), 10.0)
            except Exception as exc:
                log.warning("seek of %s failed: %r", tp, exc)

    def stalled_seconds(self) -> float:
        """The longest time a partition of this worker has had records waiting while
        none was processed (0: none stalled)."""
        now = time.monotonic()  # asyncio's loop time is time.monotonic()
        times = [now - st.stalled_since for st in self.partitions.values() if st.stalled_since]
        return max(times, default=0.0)

    async def beginnings(self, tps: list[TP]) -> dict[TP, int]:
        consumer = await self._offsets()
        ktps = [TopicPartition(tp.topic, tp.partition) for tp in tps]
        begins = await consumer.beginning_offsets(ktps)
        return {TP(k.topic, k.partition): int(v) for k, v in begins.items()}

    async def close(self) -> None:
        if self._liveness_task is not None:
            self._liveness_task.cancel()
        await self._checker.close()
        await self._offsets_reader.close()
        await self.restorer.close()
        await self.standby.close()

    def _current(self, tp: TP, st: PartitionState, epoch: int) -> bool:
        """Still the same assignment as when the batch arrived?"""
        return self.settled and self.unsettled_count == epoch and self.partitions.get(tp) is st

    # -- batches: from the fetch to the stages ---------------------------------------

    def add_stage(self, stage: Stage) -> StageRunner:
        """Register ``stage``: its source topic's batches go to it (exactly-once)."""
        runner = self.runners[stage.topic] = StageRunner(stage)
        self.register_source(stage.topic)
        return runner

    async def deliver(self, batches: Iterable[Fetched], stopping: Callable[[], bool]) -> None:
        """Hand fetched batches to their stages; wait while a stage has more queued than
        :data:`QUEUE_HIGH` records, so the fetch loop goes no faster than the stages.

        The wait ends early when ``stopping()`` (a rebalance stops Faust's flow, or the
        worker stops): what is queued then is dropped by the stage, and fetched again
        from where processing continues once the next assignment settles.
        """
        now = self._clock()
        runners = self.runners
        for batch in batches:
            runner = runners.get(batch.tp.topic)
            if runner is None:
                continue
            st = self.partitions.get(batch.tp)
            if st is not None:
                st.last_delivery = now
                st.behind = batch.behind
            runner.put(batch)
        for runner in runners.values():
            while runner.queued > QUEUE_HIGH and not stopping():
                await runner.drained(poll_s=0.05)

    async def run_stage(self, stage: Stage) -> None:
        """The agent of ``stage``, exactly-once: process its batches, in order, once.

        In at_least_once mode the records come through Faust's stream instead
        (:meth:`run`).
        """
        runner = self.runners.get(stage.topic) or self.add_stage(stage)
        self._clock = asyncio.get_running_loop().time
        while True:
            batch = await runner.get()
            await self._process(stage, batch)

    async def _process(self, stage: Stage, batch: Fetched) -> None:
        tp = batch.tp
        st = self.partitions.get(tp)
        n = len(batch)
        if st is None or not self._current(tp, st, batch.epoch) or st.rewinding:
            # Before the current assignment settled (its settle seeks every partition
            # to where processing continues), not ours, or going back: fetched again.
            self.skipped += n
            return
        expected = st.expected
        assert expected is not None  # set for every partition when settling
        verdict, skip = admit(batch, expected, self.seeks_of(tp))
        if verdict is not Verdict.TAKE:
            self.skipped += n
            if verdict is Verdict.GAP:
                # Committed records between where the partition stands and this batch
                # were not delivered: fetch them (never process past them).
                self.reseeks += 1
                log.warning(
                    "%s: a fetch began at %d, past %d; seeking back", tp, batch.start, expected
                )
                self._spawn(self._seek_quietly({tp: expected}))
            elif verdict is Verdict.STALE and batch.seeks == self.seeks_of(tp):
                # The fetch raced a seek we do not know the target of: go to ours.
                self._spawn(self._seek_quietly({tp: expected}))
            return
        st.expected = batch.end
        records = batch if skip == 0 else batch[skip:]
        if skip:
            self.skipped += skip
        quiesce = self._quiesce
        out = Out(tp)
        rewound = st.rewound
        for i in range(0, len(records), SLICE):
            chunk = records[i : i + SLICE]
            if st.holding and len(st.held) >= HELD_MAX:
                self.held_waits += 1
                await st.unheld.wait()
            async with st.gate if quiesce else NO_GATE:
                # A rewind may have begun, or begun and ended, while this batch waited:
                # the partition went back to its last commit and fetches from there, so
                # none of this batch's later records may be handled now.
                if not self._current(tp, st, batch.epoch) or st.rewinding or st.rewound != rewound:
                    return
                done = self._apply(stage, tp, st, chunk, out)
                if done < len(chunk):
                    out.sends.clear()  # the partition goes back: they would be aborted
                    return
                if not await self._emit(tp, st, out):
                    return
                st.processed = chunk[-1].offset
                st.events += len(chunk)
                st.last_progress = self.last_done = self._clock()
            self.activity.set()

    def _apply(self, stage: Stage, tp: TP, st: PartitionState, chunk: Any, out: Out) -> int:
        """Handle the records of ``chunk`` in order; how many were handled (fewer than
        all: the next one failed, and its partition is going back)."""
        handle = stage.handle
        failures = st.failures
        planted = self._planted
        for n, record in enumerate(chunk):
            out.offset = record.offset
            try:
                failed = failures.get(record.offset) if failures else None
                if failed is not None and failed[0] >= MAX_ATTEMPTS:
                    reason = f"processing failed {failed[0]} times; last error: {failed[1]}"
                    stage.dead_letter(record, reason, out)
                    self.poison += 1
                    log.error(
                        "%s: the record at offset %d failed %d times; sent to the "
                        "dead-letter topic",
                        tp,
                        record.offset,
                        failed[0],
                    )
                else:
                    handle(record, out)
                    if planted is not None:
                        planted(record.topic, record.value)
            except Exception as exc:
                self.fail(tp, st, record.offset, exc)
                return n
        return len(chunk)

    async def _emit(self, tp: TP, st: PartitionState, out: Out) -> bool:
        """Send the outputs of a handled chunk into the partition's transaction; False
        if a send failed (its record is blamed and the partition goes back)."""
        emit_all = self.emit_all
        assert emit_all is not None, "no transaction manager"
        sends, out.sends = out.sends, []
        if not sends:
            return True
        refused = await emit_all(tp, sends)
        if refused is not None:
            # Refused before it was queued (larger than the producer may send, say).
            record, exc = refused
            self.fail(tp, st, record.source_offset or 0, exc)
            return False
        return True

    @property
    def behind(self) -> bool:
        """Whether a partition's last fetch left records in its log (a backlog)."""
        return any(st.behind > 0 for st in self.partitions.values())

    def seeks_of(self, tp: TP) -> int:
        """How many seeks of ``tp`` the consumer has made (see :class:`Fetched`)."""
        counts = self.seek_counts
        return 0 if counts is None else counts.get(tp, 0)

    async def run(self, stream: StreamT, stage: Stage) -> None:
        """The agent of ``stage``: :meth:`run_stage` in exactly-once mode (the stream is
        only Faust's subscription then: its records never reach it), else every event
        of the stream, through Faust."""
        if self.enabled:
            await self.run_stage(stage)
            return
        async for _ in stream:
            event = stream.current_event
            assert event is not None
            await self._at_least_once(event.message, stage)

    def fail(self, tp: TP, st: PartitionState, offset: int, exc: BaseException) -> None:
        """Processing the event at ``offset`` of ``tp`` raised ``exc``: go back.

        Called with the partition's gate held, so no commit snapshot can take the
        event's partial effects (a commit waiting for the gate sees ``rewinding``).
        """
        # A record the broker refused fails its send's future, and every later send of
        # that producer may then raise the same error: blame the event whose record was
        # refused, not the one that happened to send next.
        sends = [*st.pending.items(), *zip(*st.draining, strict=True)]
        refused = [
            (o, f.exception())
            for f, o in sends
            if o is not None and f.done() and not f.cancelled() and f.exception() is not None
        ]
        if refused:
            offset, first = min(refused, key=lambda r: r[0])
            exc = first if first is not None else exc
        if is_fence(exc):
            # Not the record's fault, and no attempt of it: another producer took the
            # partition's transactional id. The abort gives the partition up (counting
            # it as the record's failure would dead-letter a sound record after three).
            log.warning(
                "%s: the partition's producer was fenced (%s); its open transaction is "
                "dropped and the partition given up until the group assigns it again",
                tp,
                type(exc).__name__,
            )
            st.fenced = True
            st.rewinding = True
            if self.rewind is not None:
                self._spawn(self.rewind(tp, st))
            return
        attempts = st.failures[offset][0] + 1 if offset in st.failures else 1
        error = f"{type(exc).__name__}: {excerpt(str(exc), 200)}"
        st.failures[offset] = (attempts, error)
        self.failures += 1
        if attempts > MAX_ATTEMPTS + 1:
            # Even sending it to the dead-letter topic failed twice.
            fatal(f"{tp}: could not dead-letter the record at offset {offset}", exc)
        log.error(
            "%s: processing the record at offset %d failed (attempt %d of %d): %s; "
            "aborting the partition's open transaction, processing again from its last commit",
            tp,
            offset,
            attempts,
            MAX_ATTEMPTS,
            error,
        )
        st.rewinding = True
        if self.rewind is not None:
            self._spawn(self.rewind(tp, st))

    async def _at_least_once(self, message: Any, stage: Stage) -> None:
        """One event through Faust, at least once: tried :data:`MAX_ATTEMPTS` times in
        place (its partial effects may repeat, as at-least-once allows), then
        dead-lettered."""
        record = FaustRecord(message)
        tp = message.tp
        error = ""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            out = Out(tp)
            out.offset = record.offset
            try:
                stage.handle(record, out)
                await self._send_direct(out)
                return
            except Exception as exc:
                error = f"{type(exc).__name__}: {excerpt(str(exc), 200)}"
                self.failures += 1
                log.error(
                    "%s: the record at offset %d failed (attempt %d of %d): %s",
                    tp,
                    record.offset,
                    attempt,
                    MAX_ATTEMPTS,
                    error,
                )
        self.poison += 1
        out = Out(tp)
        out.offset = record.offset
        stage.dead_letter(
            record, f"processing failed {MAX_ATTEMPTS} times; last error: {error}", out
        )
        await self._send_direct(out)

    async def _send_direct(self, out: Out) -> None:
        send = self.send_direct
        assert send is not None, "no producer"
        for r in out.sends:
            await send(r)
        out.sends.clear()

    async def wait_quiet(self, quiet_s: float, deadline: float) -> bool:
        """Wait until the agents finished an event and then got nothing new for
        ``quiet_s``, or until ``deadline`` (loop time). True if they went quiet.

        Under a backlog the agents are never quiet and commits keep to the interval; at a
        trickle, an event's transaction commits a few milliseconds after it was processed
        instead of waiting out the rest of the interval, once per hop. With batches the
        stages pause between two fetches even under a backlog, so "quiet" also needs
        every partition's last fetch to have reached the end of its log
        (:attr:`behind`): otherwise each pause would commit a small transaction.
        """
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        if not self.activity.is_set():
            try:
                await asyncio.wait_for(self.activity.wait(), remaining)
            except TimeoutError:
                return False
        self.activity.clear()
        while True:
            now = loop.time()
            quiet_for = now - self.last_done
            if quiet_for >= quiet_s and not self.behind:
                return True
            if now >= deadline:
                return False
            await asyncio.sleep(max(0.001, min(quiet_s - quiet_for, deadline - now)))
