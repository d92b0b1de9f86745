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
    with the changelog offset they correspond to. The state of a partition taken over
    is restored by :meth:`Coordinator.restore` with a consumer of its own, not by
    Faust's recovery, whose reads through the shared consumer can skip a range.
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

1. ``quiesce``   take the partition's gate (so no event of ``tp`` is half processed),
   note the offset after the last processed event, take the table rows the
   transaction wrote, and from here on *hold* new sends of ``tp`` in memory; then
   release the gate. Processing of ``tp`` goes on during steps 2-7: its table writes
   start a new overlay, its sends wait for the next transaction.
2. ``changelog`` send the rows of step 1 (last value per key) to the changelog
   partition, inside ``tp``'s transaction.
3. ``drain``     await every send of the transaction (outputs, DLQ, changelog); a failed
   send is fatal.
4. ``offsets``   ``send_offsets_to_transaction({tp: the offset of step 1})``.
5. ``commit``    ``commit_transaction()``: outputs, changelog and offsets become visible
   to ``read_committed`` readers together, or not at all.
6. ``persist``   write the rows of step 1 and the changelog offset of step 2 to RocksDB in
   one write batch. A crash before this only leaves the store behind the changelog,
   which recovery replays; the store is never ahead of committed state.
7. ``begin``     begin the next transaction, send the held records into it, in the
   order they were made, and stop holding.

Holding (rather than keeping the gate until step 7) is what lets one agent, which
serves all its partitions in turn, go on while a partition's commit waits on the broker;
it keeps each transaction exactly the events up to its offset, and each key's records in
processing order, since held records reach the log only after the previous transaction's.

When commits happen: every ``commit_interval_s`` while there is progress; when the
agents have gone quiet (nothing finished for ``commit_quiet_s``) with progress pending,
at once, so that at a trickle an output is visible one commit after its event was
processed rather than up to an interval later, at every hop; at a revoke; and at stop.
Under a backlog the agents are never quiet and the interval alone applies.

A crash anywhere before step 5 completes aborts the transaction (the broker aborts it
when the restarted worker's producer with the same ``transactional.id`` initialises, or
on timeout); the events are read again from the last committed offsets.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaProducer, TopicPartition
from faust import current_event
from faust.transport.consumer import TransactionManager
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as AiokafkaConsumer
from faust.types import TP
from faust.types.tuples import RecordMetadata
from mode.services import WaitResults
from prometheus_client import Histogram

from pipeline.kafka_io import last_record_end
from pipeline.models import excerpt

if TYPE_CHECKING:
    from faust.types import StreamT

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
#: An event that fails this many times (its partition aborted and processed again from
#: the last commit each time) goes to the dead-letter topic instead.
MAX_ATTEMPTS = 3
#: A partition aborted this many times in a row without a commit in between ends the
#: process: something other than one event is wrong (the broker refuses the
#: transaction's changelog rows, or the dead-letter topic), and a restart is the move.
MAX_REWINDS_WITHOUT_COMMIT = 10
#: How long a transactional producer may take to start (its InitProducerId waits for
#: the broker to complete the previous owner's transaction): twice the transaction
#: timeout, after which the broker aborts that transaction by itself.
PRODUCER_START_S = 120.0
#: How long a broker check for an offset gap may take before its answer is unknown.
CHECK_TIMEOUT_S = 10.0


def progress_key(tp: TP) -> bytes:
    """The key of a source partition's record on the progress topic."""
    return f"{tp.topic}:{tp.partition}".encode()


class CheckUnknown(RuntimeError):
    """Whether a committed record lies in an offset range could not be found out."""


class InjectedFailure(RuntimeError):
    """Test-only: a commit step failed on purpose."""


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


@dataclass(slots=True)
class OutRecord:
    """A record sent in a source partition's transaction; ``future`` is set while it is
    held (made while the partition's previous transaction commits)."""

    topic: str
    key: bytes | None
    value: bytes | None
    partition: int | None
    timestamp_ms: int | None
    headers: list[tuple[str, bytes]] | None
    #: the offset of the source event that made it (which event a failed send blames)
    source_offset: int | None = None
    future: asyncio.Future[Any] | None = None


@dataclass
class PartitionState:
    """Per source partition: the processing gate and what the open transaction holds."""

    gate: asyncio.Lock = field(default_factory=asyncio.Lock)
    processed: int | None = None
    committed: int | None = None
    #: the lowest offset that may be processed next (set when positions settle)
    expected: int | None = None
    #: a committed record Faust did not deliver: nothing after it until it comes
    hole: int | None = None
    watch: asyncio.Future[None] | None = None
    last_delivery: float = 0.0
    pending: list[asyncio.Future[Any]] = field(default_factory=list)
    #: the commit step this partition's commit is at (for the stuck-commit warning)
    step: str = ""
    #: between a commit's snapshot and its next ``begin``, sends wait here (see
    #: ExactlyOnceTransactionManager._commit_tp) instead of entering the committing one
    holding: bool = False
    held: list[OutRecord] = field(default_factory=list)
    #: events processed since the open transaction's snapshot (step 1), and how many the
    #: transaction being committed holds: what the test-only fault filters look at
    events: int = 0
    txn_events: int = 0
    #: per pending send, the source offset of the event that made it (None: a changelog
    #: row), so that a send the broker refuses is blamed on its event
    pending_from: list[int | None] = field(default_factory=list)
    #: where processing of this assignment started (the committed offset then)
    start: int | None = None
    #: an event failed: nothing of the partition is processed or committed until its
    #: open transaction is aborted and processing went back to the last commit
    rewinding: bool = False
    #: per offset that failed: (attempts, the last error, bounded)
    failures: dict[int, tuple[int, str]] = field(default_factory=dict)
    #: aborts for failed events since the last commit (see MAX_REWINDS_WITHOUT_COMMIT)
    rewinds_in_a_row: int = 0
    #: the sends a commit awaits at its drain step, with the offsets of their events
    draining: tuple[list[asyncio.Future[Any]], list[int | None]] = field(
        default_factory=lambda: ([], [])
    )
    #: loop time of the last event processed (or of the settle), for the stall gauge
    last_progress: float = 0.0
    #: loop time since which records wait here while none is processed (None: not stalled)
    stalled_since: float | None = None

    @property
    def has_progress(self) -> bool:
        if self.processed is None:
            return bool(self.pending)
        return self.committed is None or self.processed + 1 > self.committed or bool(self.pending)


@dataclass
class KnownRecords:
    """Which offsets in ``[lo, hi)`` of one partition hold committed records."""

    lo: int
    hi: int
    offsets: list[int]

    def first_at_or_after(self, start: int) -> int | None:
        """The first record offset >= ``start`` if the range read holds it, else ``None``.

        ``None`` also when nothing in ``[start, hi)`` is a record: the answer then lies
        beyond what was read, and the broker is asked.
        """
        if not self.lo <= start < self.hi:
            return None
        i = bisect.bisect_left(self.offsets, start)
        return self.offsets[i] if i < len(self.offsets) else None


class FetchLedger:
    """Which offsets hold committed records, as Faust's own consumer fetched them.

    aiokafka hands out a partition's records only from its current position, skipping
    nothing but transaction markers and aborted records, and moves the position past
    what it handed out. So each fetched batch proves: in ``[first offset, position
    after)`` the committed records are exactly the batch's offsets. Batches that join
    (one ends where the next begins) form a chain, and a gap inside the chain is answered
    without asking the broker. That is the common case on a transactional topic, where
    every commit leaves a marker: without this, each first record after a marker cost a
    broker round trip under one lock (seconds of latency per hop at a trickle).

    Written from Faust's consumer thread, read from the event loop: a chain is a list
    that is only appended to and trimmed at the front, or replaced whole, and readers
    copy it first (each step is atomic under the GIL).
    """

    def __init__(self, keep: int = 256) -> None:
        self.keep = keep
        self._chains: dict[TP, list[KnownRecords]] = {}

    def note(self, tp: TP, offsets: list[int], position: int) -> None:
        """Record a batch handed out for ``tp``; ``position`` is the one after it."""
        if not offsets:
            return
        run = KnownRecords(offsets[0], max(position, offsets[-1] + 1), offsets)
        chain = self._chains.get(tp)
        if chain and chain[-1].hi == run.lo:
            chain.append(run)
            if len(chain) > self.keep:
                del chain[0]
        else:
            # After a seek (ours, or Faust's at a rebalance) nothing is known about the
            # offsets between the old chain and this batch: start over.
            self._chains[tp] = [run]

    def first_at_or_after(self, tp: TP, start: int) -> int | None:
        """The first committed offset >= ``start`` if the chain covers it, else ``None``."""
        chain = self._chains.get(tp)
        if not chain:
            return None
        runs = list(chain)
        if not runs[0].lo <= start < runs[-1].hi:
            return None
        for run in runs:
            if start >= run.hi:
                continue
            answer = run.first_at_or_after(max(start, run.lo))
            if answer is not None:
                return answer
        return None

    def forget(self, tp: TP) -> None:
        self._chains.pop(tp, None)


class Coordinator:
    """Shared by agents, tables and the transaction manager of one app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.enabled = settings.exactly_once
        self._fixes: dict[str, bool] = {}
        self.partitions: dict[TP, PartitionState] = {}
        self.sources: set[str] = set()
        self.stores: dict[str, list[TransactionalStore]] = {}
        self._crash_count = 0
        self._fail_count = 0
        self.commits = 0
        self.skipped = 0
        self.settled = False
        self.unsettled_count = 0
        self.assign_epoch = 0
        self.reseeks = 0
        #: set by the consumer: seek through Faust's consumer thread, and its read offsets
        self.seek_wait: Callable[[Mapping[TP, int]], Awaitable[None]] | None = None
        self.read_offsets: dict[TP, int | None] | None = None
        self.resume: Callable[[set[TP]], None] | None = None
        self.unstalls = 0
        self._liveness_task: asyncio.Future[None] | None = None
        self._checker: Any = None
        self._checker_lock = asyncio.Lock()
        #: per partition, the committed-record offsets of the last range read
        self._known: dict[TP, KnownRecords] = {}
        #: what Faust's consumer fetched (see FetchLedger); fed by the consumer thread
        self.ledger = FetchLedger()
        self.ledger_answers = 0
        self.broker_checks = 0
        self._settling: asyncio.Future[None] | None = None
        #: changelog topics of transactional stores (see :meth:`restores_changelog`)
        self._changelog_names: set[str] = set()
        self._restorer: Any = None
        self._restore_lock = asyncio.Lock()
        #: per owned changelog partition, records still to restore (for /metrics)
        self.restore_remaining: dict[TP, int] = {}
        self.restored_records = 0
        #: called once processing may start after a rebalance (recovery duration metric)
        self.on_settled: Callable[[], None] | None = None
        self._offsets_reader: Any = None
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

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def fix(self, name: str) -> bool:
        # Asked several times per event: the settings are frozen, so answer once per name.
        known = self._fixes.get(name)
        if known is None:
            known = self._fixes[name] = self.enabled and self.settings.fix_enabled(name)
        return known

    def register_source(self, topic: str) -> None:
        self.sources.add(topic)

    def register_store(self, source_topic: str, store: TransactionalStore) -> None:
        self.stores.setdefault(source_topic, []).append(store)
        if store.transactional:
            self._changelog_names.add(store.changelog_topic_name)

    def state(self, tp: TP) -> PartitionState:
        st = self.partitions.get(tp)
        if st is None:
            st = self.partitions[tp] = PartitionState()
        return st

    def _fault_applies(self, step: Step, tp: TP, st: PartitionState) -> bool:
        """Test-only: does a fault at ``step`` of ``tp``'s commit pass the filters?

        ``PIPELINE_FAULT_TOPIC`` keeps faults to one source topic's partitions, and
        ``PIPELINE_FAULT_MIN_EVENTS`` to transactions holding at least that many events,
        so that a test's fault always lands on the stage it judges, with work in flight,
        however fast the machine drains its input.
        """
        settings = self.settings
        if settings.fault_topic and tp.topic != settings.fault_topic:
            return False
        events = st.events if step is Step.QUIESCE else st.txn_events
        return events >= settings.fault_min_events

    def crash_point(self, step: Step, tp: TP, st: PartitionState) -> None:
        """Test-only fault injection: ``PIPELINE_CRASH_AT=<step>`` dies before that step."""
        if self.settings.crash_at != step.value or not self._fault_applies(step, tp, st):
            return
        self._crash_count += 1
        if self._crash_count > self.settings.crash_after:
            log.warning("fault injection: crashing at commit step %r", step.value)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(EXIT_INJECTED)

    async def fail_point(
        self, step: Step, producer: AIOKafkaProducer, tp: TP, st: PartitionState
    ) -> None:
        """Test-only: ``PIPELINE_FAIL_AT=<step>`` aborts one transaction and raises there.

        Exactly one partition's commit fails (the first after ``crash_after`` have
        passed the step and the filters of :meth:`_fault_applies`), as when the broker
        times out one transaction while the others commit. It fails only once the
        other partitions' commits of the same round have ended: whatever they committed
        (offsets of events whose records sit in this transaction, when routing is
        broken) is then committed for certain when this one aborts.
        """
        if self.settings.fail_at != step.value or not self._fault_applies(step, tp, st):
            return
        self._fail_count += 1
        if self._fail_count == self.settings.crash_after + 1:
            await self._others_committed(st)
            log.warning(
                "fault injection: failing commit step %r of %s (%d events in the transaction)",
                step.value,
                tp,
                st.txn_events,
            )
            await producer.abort_transaction()
            self.aborts += 1
            raise InjectedFailure(f"injected failure at commit step {step.value}")

    async def _others_committed(self, st: PartitionState, timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for _ in range(round(timeout / 0.01)):  # polled: test-only, and bounded
            if loop.time() > deadline or not any(
                o.step for o in self.partitions.values() if o is not st
            ):
                return
            await asyncio.sleep(0.01)

    async def delay_point(self, step: Step, tp: TP, st: PartitionState) -> None:
        """Test-only: ``PIPELINE_DELAY_AT=<step>`` pauses every commit that passes the
        filters at that step for ``PIPELINE_DELAY_S``, as a long pause of the loop would."""
        if self.settings.delay_at == step.value and self._fault_applies(step, tp, st):
            log.warning(
                "fault injection: delaying commit step %r of %s by %g s",
                step.value,
                tp,
                self.settings.delay_s,
            )
            await asyncio.sleep(self.settings.delay_s)

    # -- delivery ---------------------------------------------------------------------

    def unsettle(self) -> None:
        """A rebalance started: positions are about to be re-seeked.

        May be called from Faust's consumer thread: it only flips plain attributes.
        """
        self.settled = False
        self.unsettled_count += 1

    def assigned(self) -> None:
        """Partitions were assigned: the recovery that follows ends in :meth:`settle`."""
        self.assign_epoch = self.unsettled_count
        # Until the restore says which partitions are owned, Faust's standby copies may
        # write any of them (above the persisted offset: the restore re-reads that).
        self._disown()

    def _disown(self) -> None:
        for stores in self.stores.values():
            for store in stores:
                store.owned.clear()

    def recovered(self, committed: Mapping[TP, int | None] | None = None) -> None:
        """The recovery of the current assignment completed; start processing.

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
        if self.assign_epoch != self.unsettled_count:
            log.info("ignoring the end of a superseded recovery")
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
        missing = [tp for tp, offset in out.items() if offset is None]
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
        """Bring the state of every owned partition up to its changelog's end.

        Each changelog partition is read with a consumer of our own (``read_committed``,
        no group), from the record after the store's persisted offset to the end, and
        each fetch is written to RocksDB in one write batch together with the offset of
        its last record. One consumer, one seek, every record in order: the persisted
        offset can only ever mean "applied up to here". Faust's recovery is told there
        is nothing to read for these partitions (``SettlingConsumer.highwaters``): it
        reads through the shared consumer, where stale fetches and its read-offset
        filter can skip a range (see ``TransactionalStore.apply_changelog_batch``).

        The end offsets are asked after this worker's ``InitProducerId`` for each
        source partition (``ExactlyOnceTransactionManager._acquire``), which waited for
        the previous owner's last transaction to complete or abort: nothing can be
        appended behind them. Returns ``False`` when a rebalance began meanwhile; what
        was written stays valid, and that rebalance's restore goes on from it.
        """
        owned = self.owned_changelogs()
        self._disown()
        for tp, store in owned.items():
            store.owned.add(tp.partition)
        if not owned:
            return True
        started = time.monotonic()
        count = 0
        async with self._restore_lock:
            consumer = await self._restore_consumer()
            try:
                ktps = {TopicPartition(tp.topic, tp.partition): tp for tp in owned}
                consumer.assign(list(ktps))
                ends = await consumer.end_offsets(list(ktps))
                begins = await consumer.beginning_offsets(list(ktps))
                pending: dict[TopicPartition, int] = {}
                for ktp, tp in ktps.items():
                    persisted = owned[tp].persisted_offset(tp)
                    start = max(int(begins[ktp]), 0 if persisted is None else persisted + 1)
                    if start < int(ends[ktp]):
                        consumer.seek(ktp, start)
                        pending[ktp] = int(ends[ktp])
                        self.restore_remaining[tp] = int(ends[ktp]) - start
                while pending:
                    if epoch != self.unsettled_count:
                        log.info("a rebalance began while restoring (%d records applied)", count)
                        return False
                    batches = await consumer.getmany(*pending, timeout_ms=500, max_records=20_000)
                    for ktp, records in batches.items():
                        if records:
                            tp = ktps[ktp]
                            rows = [(m.key, m.value) for m in records]
                            owned[tp].restore(tp.partition, rows, int(records[-1].offset))
                            count += len(records)
                    for ktp in list(pending):
                        left = pending[ktp] - await consumer.position(ktp)
                        self.restore_remaining[ktps[ktp]] = max(0, left)
                        if left <= 0:
                            del pending[ktp]
            finally:
                self.restore_remaining = {}
                consumer.unsubscribe()  # or its fetcher goes on prefetching them
        self.restored_records += count
        if count:
            log.info(
                "restored %d changelog records of %d partitions in %.2f s",
                count,
                len(owned),
                time.monotonic() - started,
            )
        return True

    async def _restore_consumer(self) -> Any:
        if self._restorer is None:
            self._restorer = await self._reader(auto_offset_reset="earliest")
        return self._restorer

    async def _reader(self, **extra: Any) -> Any:
        """A started ``read_committed`` consumer outside the group (it never subscribes)."""
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap_servers,
            isolation_level="read_committed",
            enable_auto_commit=False,
            **extra,
        )
        await consumer.start()
        return consumer

    async def _committed_offsets(self, tps: list[TP]) -> dict[TP, int | None]:
        from aiokafka import AIOKafkaConsumer

        if self._offsets_reader is None:
            # Has the group id to ask the group coordinator, but never subscribes, so
            # it never joins the group.
            self._offsets_reader = AIOKafkaConsumer(
                bootstrap_servers=self.settings.bootstrap_servers,
                group_id=self.settings.app_id,
                enable_auto_commit=False,
            )
            await self._offsets_reader.start()
        out: dict[TP, int | None] = {}
        for tp in tps:
            out[tp] = await self._offsets_reader.committed(TopicPartition(tp.topic, tp.partition))
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
            st.expected = start if start is not None else beginnings.get(tp)
            st.start = st.expected
            st.hole = None
        if isinstance(self.read_offsets, PinnedReadOffsets):
            for tp in list(self.partitions):
                self.read_offsets.unpin(tp)
        self._known = {tp: k for tp, k in self._known.items() if tp in self.partitions}
        now = asyncio.get_running_loop().time()
        for st in self.partitions.values():
            st.last_delivery = st.last_progress = now
            st.stalled_since = None
        if self._liveness_task is None or self._liveness_task.done():
            self._liveness_task = asyncio.ensure_future(self._liveness())
        self.settled = True
        # Records delivered before this point were skipped (see _epoch): fetch every
        # partition again from where processing continues, rather than wait for a later
        # delivery to reveal the gap (or for the liveness check, if none comes).
        targets = {tp: st.expected for tp, st in self.partitions.items() if st.expected is not None}
        if targets and self.seek_wait is not None:
            for tp, offset in targets.items():
                self._keep_read_offset(tp, offset)
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
            consumer = await self._checker_consumer()
            ktp = TopicPartition(tp.topic, tp.partition)
            consumer.assign([ktp])
            end = (await consumer.end_offsets([ktp]))[ktp]
            if start >= end:
                return None
            consumer.seek(ktp, start)
            deadline = asyncio.get_running_loop().time() + CHECK_TIMEOUT_S
            while await consumer.position(ktp) < end:
                if asyncio.get_running_loop().time() > deadline:
                    # Unknown. Not "a record is missing at ``start``": on a topic
                    # written by transactions ``start`` is often a commit marker, which
                    # is never delivered, and waiting for it stalled the partition.
                    raise CheckUnknown(f"{tp}: could not read from {start} in time")
                batch = await consumer.getmany(ktp, timeout_ms=1000)
                offsets = [int(m.offset) for m in batch.get(ktp, ())]
                if offsets:
                    after = await consumer.position(ktp)
                    self._known[tp] = KnownRecords(start, max(after, offsets[-1] + 1), offsets)
                    return offsets[0]
            return None

    async def record_ends(self, tps: Iterable[TP]) -> dict[TP, int]:
        """Per partition, the offset after its last committed *record*.

        The last stable offset of a transactional topic usually points just past a
        commit marker, which no consumer ever receives. Faust's recovery waits for the
        record at ``highwater - 1`` and only gives up after two 5-second timeouts, on
        every restart; this is where it should stop instead.
        """
        out: dict[TP, int] = {}
        async with self._checker_lock:
            consumer = await self._checker_consumer()
            ktps = [TopicPartition(tp.topic, tp.partition) for tp in tps]
            if not ktps:
                return out
            consumer.assign(ktps)
            ends = await consumer.end_offsets(ktps)
            begins = await consumer.beginning_offsets(ktps)
            for ktp in ktps:
                end, begin = int(ends[ktp]), int(begins[ktp])
                out[TP(ktp.topic, ktp.partition)] = await last_record_end(consumer, ktp, begin, end)
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
                log.warning("liveness check of %s: %s", tp, exc)
                if st.stalled_since is None:
                    st.stalled_since = now
                continue
            if first is None:  # nothing to do: idle, not stalled
                st.stalled_since = None
                continue
            if st.stalled_since is None:
                st.stalled_since = now
            if now - st.last_delivery < 3.0 or st.hole is not None or st.rewinding:
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
            self._keep_read_offset(tp, first)
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

    async def _checker_consumer(self) -> Any:
        if self._checker is None:
            self._checker = await self._reader(max_partition_fetch_bytes=1024 * 1024)
        return self._checker

    async def beginnings(self, tps: list[TP]) -> dict[TP, int]:
        async with self._checker_lock:
            consumer = await self._checker_consumer()
            ktps = [TopicPartition(tp.topic, tp.partition) for tp in tps]
            begins = await consumer.beginning_offsets(ktps)
        return {TP(k.topic, k.partition): int(v) for k, v in begins.items()}

    async def close(self) -> None:
        if self._liveness_task is not None:
            self._liveness_task.cancel()
        if self._checker is not None:
            await self._checker.stop()
            self._checker = None
        if self._offsets_reader is not None:
            await self._offsets_reader.stop()
            self._offsets_reader = None
        if self._restorer is not None:
            await self._restorer.stop()
            self._restorer = None

    def _epoch(self) -> int | None:
        """The assignment epoch to process in; ``None`` (skip the event) if unsettled.

        An event delivered before the recovery of the current assignment ended is not
        held back but skipped: holding it would keep it unacknowledged, and Faust's
        revoke handler waits for every delivered event to be acknowledged before the
        rebalance can go on (a deadlock, seen with three agents). A skipped record is not
        lost: once settled, the first delivery above the committed offset shows the gap
        and :meth:`_admit` seeks back to it.
        """
        return self.unsettled_count if self.settled else None

    def _current(self, tp: TP, st: PartitionState, epoch: int) -> bool:
        """Still the same assignment as when the event was admitted?"""
        return self.settled and self.unsettled_count == epoch and self.partitions.get(tp) is st

    async def _admit(self, event: Any, st: PartitionState, epoch: int) -> bool:
        """Whether ``event`` is to be processed; called with the partition's gate held.

        Faust does not guarantee that an agent sees each record of a partition once and
        in order around rebalances: it hands over records while tables are still being
        recovered and before it seeks to the committed offsets, and batches fetched
        before that seek are still delivered after it, while its read-offset filter then
        drops the records the seek fetched again. Processing must instead continue from
        the committed offset, record by record:

        * before the recovery ends, an event is skipped (see :meth:`_epoch`);
        * an event below the next expected offset is a stale copy: skipped;
        * an event above it is accepted only if no committed record lies in between
          (transaction markers and aborted records take offsets too); otherwise the
          record in between was dropped, so we seek back to it and skip until it comes;
          when the broker cannot say (:class:`CheckUnknown`), the event is skipped too
          and the partition fetched again from the expected offset, to ask again;
        * while a failed event's partition is being rewound, every event is skipped.

        The caller holds the gate, so a commit cannot slip in between this decision and
        the processing; since the checks below may wait on the broker, the assignment is
        checked again at the end.
        """
        message = event.message
        tp = message.tp
        st.last_delivery = self._clock()
        if st.rewinding:
            self.skipped += 1
            return False
        offset = message.offset
        expected = st.expected
        if expected is not None and offset != expected:
            if offset < expected:
                self.skipped += 1
                return False
            if st.hole is None:
                try:
                    first = await self._first_record(tp, expected)
                except Exception as exc:
                    # Never process past a record that may be missing, and never assume
                    # one at ``expected`` either (often a marker, never delivered):
                    # fetch from ``expected`` again, and ask again at that delivery.
                    self.skipped += 1
                    self.unknown_checks += 1
                    log.warning("%s: %s; fetching again from %d", tp, exc, expected)
                    self._keep_read_offset(tp, expected)
                    self._spawn(self._seek_quietly({tp: expected}))
                    return False
                if first is not None and first < offset:
                    st.hole = first
            if st.hole is not None:
                if offset < st.hole:  # pragma: no cover - below the hole: stale
                    self.skipped += 1
                    return False
                if offset > st.hole:
                    self.skipped += 1
                    await self._reseek(tp, st, st.hole)
                    return False
        if not self._current(tp, st, epoch):
            self.skipped += 1
            return False
        if st.hole is not None or offset == expected:
            read = self.read_offsets
            if isinstance(read, PinnedReadOffsets):
                read.unpin(tp)  # the record we seeked back for has come
        st.hole = None
        st.expected = offset + 1
        return True

    def _keep_read_offset(self, tp: TP, offset: int) -> None:
        # Faust's fetch loop drops records below its last delivered offset; stale
        # deliveries ahead of the seek position would otherwise hide the record.
        read = self.read_offsets
        if isinstance(read, PinnedReadOffsets):
            read.pin(tp, offset)
        elif read is not None and (read.get(tp) or 0) > offset:
            read[tp] = offset

    async def _reseek(self, tp: TP, st: PartitionState, offset: int) -> None:
        self._keep_read_offset(tp, offset)
        if st.watch is None or st.watch.done():
            st.watch = asyncio.ensure_future(self._watch_hole(tp, st))

    async def _watch_hole(self, tp: TP, st: PartitionState) -> None:
        """Seek back to the missing record, once a second, until it is delivered."""
        while st.hole is not None and self.seek_wait is not None:
            if not self.settled:
                return  # a rebalance started; the next settle starts over
            hole = st.hole
            self.reseeks += 1
            log.warning("%s: record %d was not delivered; seeking back to it", tp, hole)
            self._keep_read_offset(tp, hole)
            try:
                await asyncio.wait_for(self.seek_wait({tp: hole}), 10.0)
            except Exception as exc:  # revoked meanwhile, or the consumer is busy
                log.warning("seek of %s failed: %r", tp, exc)
            await asyncio.sleep(1.0)
        read = self.read_offsets
        if isinstance(read, PinnedReadOffsets):
            read.unpin(tp)

    async def each(self, stream: StreamT) -> AsyncIterator[Any]:
        """Iterate a Faust stream so that commits see only whole events, in order.

        The gate of the event's source partition is held while the agent body runs for
        the event, and the event counts as processed once the body asks for the next one.
        """
        if not self.enabled:
            # at_least_once: Faust's own acking and commits apply.
            async for value in stream:
                yield value
            return
        quiesce = self.fix("quiesce")
        now = self._clock = asyncio.get_running_loop().time
        activity = self.activity
        async for value in stream:
            event = stream.current_event
            assert event is not None
            epoch = self._epoch()
            tp = event.message.tp
            st = self.partitions.get(tp)
            if epoch is None or st is None:
                # A rebalance replaced the assignment, or ``tp`` is not (or no longer)
                # ours: a stale delivery that its current owner processes.
                self.skipped += 1
                continue
            if not quiesce:
                if await self._admit(event, st, epoch):
                    yield value
                    if not st.rewinding:
                        st.processed = event.message.offset
                        st.events += 1
                        st.last_progress = self.last_done = now()
                    activity.set()
                continue
            async with st.gate:
                if not await self._admit(event, st, epoch):
                    continue
                yield value
                # A failed event (see run) is not processed: its partition goes back.
                if not st.rewinding:
                    st.processed = event.message.offset
                    st.events += 1
                    st.last_progress = self.last_done = now()
            activity.set()

    async def run(
        self,
        stream: StreamT,
        handle: Callable[[Any, Any], Awaitable[None]],
        dead_letter: Callable[[Any, Any, str], Awaitable[None]],
    ) -> None:
        """The agents' loop: ``handle(value, message)`` for every event, exactly once.

        An exception from ``handle`` (the operator, a codec, a table, a send) must not
        let a commit move the partition's offset past the event while some of its
        effects are in the open transaction: :meth:`fail` marks the partition, which is
        then neither processed nor committed until the transaction manager has aborted
        its open transaction and gone back to its last commit; everything since is
        processed again. An event that fails :data:`MAX_ATTEMPTS` times is handed to
        ``dead_letter(value, message, reason)`` instead (in its transaction, like any
        output), so a poison record neither loops forever nor stalls its partition.

        In at_least_once mode an event is tried :data:`MAX_ATTEMPTS` times in place
        (its partial effects may repeat, as at-least-once allows), then dead-lettered.
        """
        if not self.enabled:
            async for value in stream:
                event = stream.current_event
                assert event is not None
                await self._at_least_once(value, event.message, handle, dead_letter)
            return
        partitions = self.partitions
        planted = self._planted_failure()
        async for value in self.each(stream):
            event = stream.current_event
            assert event is not None
            message = event.message
            st = partitions[message.tp]  # admitted, so ours
            failed = st.failures.get(message.offset) if st.failures else None
            try:
                if failed is not None and failed[0] >= MAX_ATTEMPTS:
                    reason = f"processing failed {failed[0]} times; last error: {failed[1]}"
                    await dead_letter(value, message, reason)
                    self.poison += 1
                    log.error(
                        "%s: the record at offset %d failed %d times; sent to the "
                        "dead-letter topic",
                        message.tp,
                        message.offset,
                        failed[0],
                    )
                else:
                    await handle(value, message)
                    if planted is not None:
                        planted(message.topic, value)
            except Exception as exc:
                self.fail(message.tp, st, message.offset, exc)

    def _planted_failure(self) -> Callable[[str, Any], None] | None:
        """Test-only (``PIPELINE_FAIL_EVENT``): a failure after the handler's effects."""
        settings = self.settings
        needle = settings.fail_event
        if needle is None:
            return None
        marker = needle.encode()
        left = [settings.fail_event_times]

        def check(topic: str, value: Any) -> None:
            if settings.fail_event_topic not in (None, topic):
                return
            if not isinstance(value, bytes) or marker not in value:
                return
            if settings.fail_event_times and left[0] <= 0:
                return
            left[0] -= 1
            raise InjectedFailure(f"planted failure after processing a record with {needle!r}")

        return check

    def fail(self, tp: TP, st: PartitionState, offset: int, exc: BaseException) -> None:
        """Processing the event at ``offset`` of ``tp`` raised ``exc``: go back.

        Called with the partition's gate held, so no commit snapshot can take the
        event's partial effects (a commit waiting for the gate sees ``rewinding``).
        """
        # A record the broker refused fails its send's future, and every later send of
        # that producer may then raise the same error: blame the event whose record was
        # refused, not the one that happened to send next.
        sends = [
            *zip(st.pending, st.pending_from, strict=True),
            *zip(*st.draining, strict=True),
        ]
        refused = [
            (o, f.exception())
            for f, o in sends
            if o is not None and f.done() and not f.cancelled() and f.exception() is not None
        ]
        if refused:
            offset, first = min(refused, key=lambda r: r[0])
            exc = first if first is not None else exc
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

    async def _at_least_once(
        self,
        value: Any,
        message: Any,
        handle: Callable[[Any, Any], Awaitable[None]],
        dead_letter: Callable[[Any, Any, str], Awaitable[None]],
    ) -> None:
        error = ""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                await handle(value, message)
                return
            except Exception as exc:
                error = f"{type(exc).__name__}: {excerpt(str(exc), 200)}"
                self.failures += 1
                log.error(
                    "%s: the record at offset %d failed (attempt %d of %d): %s",
                    message.tp,
                    message.offset,
                    attempt,
                    MAX_ATTEMPTS,
                    error,
                )
        self.poison += 1
        reason = f"processing failed {MAX_ATTEMPTS} times; last error: {error}"
        await dead_letter(value, message, reason)

    async def wait_quiet(self, quiet_s: float, deadline: float) -> bool:
        """Wait until the agents finished an event and then got nothing new for
        ``quiet_s``, or until ``deadline`` (loop time). True if they went quiet.

        Under a backlog the agents are never quiet and commits keep to the interval; at a
        trickle, an event's transaction commits a few milliseconds after it was processed
        instead of waiting out the rest of the interval, once per hop.
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
            if quiet_for >= quiet_s:
                return True
            if now >= deadline:
                return False
            await asyncio.sleep(min(quiet_s - quiet_for, deadline - now))


class ExactlyOnceTransactionManager(TransactionManager):
    """Faust's transaction manager, replaced: see the module docstring for the order."""

    coordinator: Coordinator

    def __init__(self, transport: Any, *, consumer: Any, producer: Any, **kwargs: Any) -> None:
        super().__init__(transport, consumer=consumer, producer=producer, **kwargs)
        self.coordinator = self.app.eos  # type: ignore[attr-defined]
        self.coordinator.rewind = self.rewind
        self._producers: dict[str, AIOKafkaProducer] = {}
        #: source partitions this worker holds a transactional producer for
        self._held: set[TP] = set()
        self._commit_lock = asyncio.Lock()
        self._commit_timer: asyncio.Future[None] | None = None
        self._tids: dict[TP, str] = {}
        self._progress_tps: dict[TP, TopicPartition] = {}

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
        self.coordinator.assigned()
        if self._commit_timer is None:
            self._commit_timer = asyncio.ensure_future(self._commit_loop())
        keep = self._source_tps(assigned)
        self._check_state_assigned(keep, assigned)
        # Release by what we hold, not by Faust's ``revoked``: a partition that moves
        # from active to standby here is still "assigned" to the consumer (Faust assigns
        # standby source partitions, paused), so it is in neither set. Keeping its
        # producer would skip InitProducerId when it comes back, and with it the fencing
        # of, and the wait for, the transaction its owner meanwhile had open.
        for tp in sorted(self._held - keep):
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

    def _new_transactional_producer(self, tid: str) -> AIOKafkaProducer:
        """Faust's producer settings, with batching sized to the transaction.

        Records of a transaction are invisible to ``read_committed`` readers until it
        commits, so sending them early buys no latency; it only costs requests. With
        Faust's 5 ms linger and one producer per source partition, a profile of the dedup
        stage found a quarter of the worker's CPU in the producers' request path (about
        one record per request at 1,700 events/s). Here a batch lingers up to a commit
        interval (step 3 sends whatever is left at once), and may grow to 256 kB.
        """
        faust_producer: Any = self.producer
        settings = {
            **faust_producer._settings_default(),
            **faust_producer._settings_auth(),
            **faust_producer._settings_extra(),
            "linger_ms": max(5, round(float(self.app.conf.broker_commit_interval) * 1000)),
            "max_batch_size": 256 * 1024,
        }
        return AIOKafkaProducer(**settings, transactional_id=tid)

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
        _fail_held(st, "the partition was assigned anew")
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
            _fail_held(st, "the partition was released")
        if producer is not None:
            # Stopping aborts whatever the transaction still holds (nothing after the
            # revoke commit); the new owner's InitProducerId would fence it anyway.
            if st is not None and st.has_progress:
                self.coordinator.aborts += 1
            try:
                await producer.stop()
            except Exception as exc:  # pragma: no cover - best effort on a dead link
                log.warning("stopping producer %s: %r", tid, exc)

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
        source = event.message.tp
        if self.coordinator.fix("route-by-source"):
            tp = source
        else:
            # Stock Faust: the destination partition picks the transaction; when the
            # consumer has no metadata for the destination topic (it does not read it),
            # there is no partition and the record goes out in no transaction at all.
            p = self.consumer.key_partition(topic, key, partition)
            if p is None:
                return await self.producer.send(topic, key, value, partition, timestamp, headers)
            tp = TP(source.topic, int(p))
            partition = tp.partition
        producer = self._producers.get(self.transactional_id(tp))
        if producer is None:
            fatal(f"no transaction open for {tp} (partition not assigned to this worker)")
            raise AssertionError("unreachable")
        st = self.coordinator.state(tp)
        record = OutRecord(
            topic,
            key,
            value,
            partition,
            None if timestamp is None else round(timestamp * 1000),
            _headers(headers),
            event.message.offset,
        )
        if st.holding:
            record.future = asyncio.get_running_loop().create_future()
            st.held.append(record)
            return record.future
        return await self._produce(producer, tp, st, record)

    async def _produce(
        self, producer: AIOKafkaProducer, tp: TP, st: PartitionState, record: OutRecord
    ) -> asyncio.Future[Any]:
        """Hand ``record`` to ``tp``'s transaction; step 3 awaits what this returns."""
        if not st.pending:  # the transaction's first record
            self._add_changelogs_early(producer, tp)
        fut: asyncio.Future[Any] = await producer.send(
            record.topic,
            value=record.value,
            key=record.key,
            partition=record.partition,
            timestamp_ms=record.timestamp_ms,
            headers=record.headers,
        )
        st.pending.append(fut)
        st.pending_from.append(record.source_offset)
        return fut

    def _add_changelogs_early(self, producer: AIOKafkaProducer, tp: TP) -> None:
        """At a transaction's first send, register its changelog partitions with it too.

        aiokafka adds a partition to the transaction (AddPartitionsToTxn, a round trip to
        the coordinator) when the first record for it is queued; the changelog rows are
        queued only at commit step 2, so each transaction paid a second AddPartitionsToTxn
        in its commit path. Queued in the same step of the loop as the first output, both
        go in one request. Only a store that has already written in this transaction
        counts: its rows are certain to go to that changelog partition at step 2, so no
        partition joins a transaction it does not write. ``_txn_manager`` is aiokafka's
        (pinned <0.15) own hook for this; ``send`` calls the same method.
        """
        txn = producer._txn_manager
        # The progress record (step 2) is certain too: a transaction with a send has
        # processed an event, so its offset moves.
        txn.maybe_add_partition_to_txn(self._progress_tp(tp))
        stores = self.coordinator.stores.get(tp.topic)
        if not stores:
            return
        for store in stores:
            if store.has_dirty(tp):
                txn.maybe_add_partition_to_txn(
                    TopicPartition(store.changelog_topic_name, tp.partition)
                )

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
            if st.has_progress
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
                if coord.fix("fatal-commit"):
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

    async def _begin_quietly(self, tp: TP) -> None:
        producer = self._producers.get(self.transactional_id(tp))
        if producer is None:
            return
        try:
            await producer.begin_transaction()
            await self._send_held(producer, tp, self.coordinator.state(tp))
        except Exception as exc:
            log.error("begin of %s failed (swallowed, fix disabled): %r", tp, exc)

    async def _at(self, tp: TP, st: PartitionState, step: Step) -> None:
        st.step = step.value
        coord = self.coordinator
        coord.crash_point(step, tp, st)
        if coord.settings.delay_at is not None:
            await coord.delay_point(step, tp, st)

    async def _commit_tp(self, tp: TP) -> None:
        coord = self.coordinator
        st = coord.state(tp)
        tid = self.transactional_id(tp)
        producer = self._producers[tid]
        quiesce = coord.fix("quiesce")
        await self._at(tp, st, Step.QUIESCE)
        st.step = "waiting for the gate"
        async with st.gate if quiesce else _NO_GATE:  # 1. quiesce
            if st.rewinding:
                # An event failed while this commit waited for the gate: the open
                # transaction holds part of it, and is aborted instead (see rewind).
                st.step = ""
                return
            offset = None if st.processed is None else st.processed + 1
            stores = coord.stores.get(tp.topic, ()) if coord.fix("local-state") else ()
            rows = [(store, store.take_dirty(tp)) for store in stores]
            st.txn_events, st.events = st.events, 0
            # Without the quiesce fix (a test switch) sends go on into this transaction.
            st.holding = quiesce

        await self._at(tp, st, Step.CHANGELOG)  # 2. changelog (and progress)
        if offset is not None and (st.committed is None or offset > st.committed):
            # The offset of step 4 once more, as a record of our own in the same
            # transaction: if the group's committed offsets are ever gone (expired
            # while every worker was down longer than offsets.retention.minutes),
            # processing resumes from here, not from the log start (see _settle_from).
            progress = self._progress_tp(tp)
            fut = await producer.send(
                progress.topic,
                value=str(offset).encode(),
                key=progress_key(tp),
                partition=progress.partition,
            )
            st.pending.append(fut)
            st.pending_from.append(None)
        changelog: list[tuple[TransactionalStore, asyncio.Future[Any]]] = []
        for store, items in rows:
            for key, value in items:
                fut = await producer.send(
                    store.changelog_topic_name, value=value, key=key, partition=tp.partition
                )
                changelog.append((store, fut))
                st.pending.append(fut)
                st.pending_from.append(None)

        await self._at(tp, st, Step.DRAIN)  # 3. drain
        if coord.fix("flush-before-commit"):
            pending, st.pending = st.pending, []
            made_by, st.pending_from = st.pending_from, []
            # Send the lingering batches now rather than when their linger ends. The
            # same call commit_transaction makes first (aiokafka 0.14's accumulator):
            # it closes the open batches, so nothing added later joins them.
            flush = asyncio.ensure_future(producer._message_accumulator.flush_for_commit())
            st.draining = (pending, made_by)
            try:
                # Not gather: once the broker refused a batch, aiokafka's sender may die
                # (the next batch of the partition is out of sequence) and then the
                # flush and the other sends never complete (seen: a commit stuck here
                # for minutes). The first refusal, or the sender's end, ends the wait.
                dead = await _drained(pending, producer._sender.sender_task)
                refused = [
                    (o, f.exception())
                    for f, o in zip(pending, made_by, strict=True)
                    if f.done() and not f.cancelled() and f.exception() is not None
                ]
                if not refused and not dead:
                    await flush
            finally:
                st.draining = ([], [])
            if refused or dead:
                # The broker refused a record (too large for the topic, say): the
                # transaction cannot commit whole. Blame the first event that made a
                # refused record (unless an event's failure already did), abort, and
                # process again from the last commit.
                flush.cancel()
                for fut in pending:
                    fut.add_done_callback(_retrieve)
                blamed = min((o for o, _ in refused if o is not None), default=None)
                first_error = refused[0][1] if refused else None
                if st.rewinding:
                    pass  # counted already, by the failure of the event that sent next
                elif blamed is not None and first_error is not None:
                    coord.fail(tp, st, blamed, first_error)
                else:
                    log.error(
                        "%s: the transaction cannot commit (%r, producer sender ended: %s)",
                        tp,
                        first_error,
                        dead,
                    )
                    st.rewinding = True
                await self._rewind(tp, st)
                return
        else:
            st.pending = []
            st.pending_from = []

        await self._at(tp, st, Step.OFFSETS)  # 4. offsets
        if offset is not None and (st.committed is None or offset > st.committed):
            await producer.send_offsets_to_transaction(
                {TopicPartition(tp.topic, tp.partition): offset}, self.app.conf.id
            )

        await self._at(tp, st, Step.COMMIT)  # 5. commit
        await coord.fail_point(Step.COMMIT, producer, tp, st)
        await producer.commit_transaction()
        st.rewinds_in_a_row = 0
        if offset is not None:
            st.committed = offset
            if st.failures:  # a failure below a committed offset is history
                st.failures = {o: f for o, f in st.failures.items() if o >= offset}

        await self._at(tp, st, Step.PERSIST)  # 6. persist
        last: dict[int, int] = {}
        for store, fut in changelog:
            md = fut.result()
            last[id(store)] = max(last.get(id(store), -1), md.offset)
        keep_offsets = coord.fix("changelog-offsets")
        for store in stores:
            # Stock Faust (#599) loses these offsets; then restores start too early.
            store.persist(tp, last.get(id(store)) if keep_offsets else None)

        await self._at(tp, st, Step.BEGIN)  # 7. begin
        await producer.begin_transaction()
        await self._send_held(producer, tp, st)
        st.step = ""

    def _progress_tp(self, tp: TP) -> TopicPartition:
        found = self._progress_tps.get(tp)
        if found is None:
            settings = self.coordinator.settings
            found = TopicPartition(settings.progress_topic, tp.partition % settings.partitions)
            self._progress_tps[tp] = found
        return found

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
        st.rewinds_in_a_row += 1
        if st.rewinds_in_a_row > MAX_REWINDS_WITHOUT_COMMIT:
            fatal(f"{tp}: aborted {st.rewinds_in_a_row - 1} times without a commit")
        # Held sends and table rows of the aborted transaction are dropped with it.
        for store in coord.stores.get(tp.topic, ()):
            store.discard(tp)
        _fail_held(st, "its transaction was aborted after an event failed")
        for fut in st.pending:
            fut.add_done_callback(_retrieve)
        st.pending.clear()
        st.pending_from.clear()
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
        st.step = ""
        coord.rewinds += 1
        st.rewinding = False
        log.warning("%s: transaction aborted; processing again from offset %s", tp, target)
        if target is not None and coord.seek_wait is not None:
            coord._keep_read_offset(tp, target)
            await coord._seek_quietly({tp: target})

    async def _send_held(self, producer: AIOKafkaProducer, tp: TP, st: PartitionState) -> None:
        """Send what was held during the commit into the transaction just begun."""
        while st.held:
            batch, st.held = st.held, []
            for record in batch:
                assert record.future is not None
                _chain(await self._produce(producer, tp, st, record), record.future)
        # No await since the loop saw the list empty: nothing can be held in between.
        st.holding = False


def _fail_held(st: PartitionState, why: str) -> None:
    """Held sends that will never be sent: their events were not committed either, and
    are processed again by the partition's next owner (or by this worker, re-assigned)."""
    held, st.held, st.holding = st.held, [], False
    for h in held:
        if h.future is not None and not h.future.done():
            h.future.set_exception(RuntimeError(f"not sent: {why} before its commit"))
            _retrieve(h.future)  # nobody awaits a held send: no "never retrieved" noise


async def _drained(pending: list[asyncio.Future[Any]], sender: asyncio.Future[Any] | None) -> bool:
    """Wait until every send of ``pending`` completed or one failed; True instead if the
    producer's sender task ended first (its remaining sends would never complete)."""
    left = {f for f in pending if not f.done()}
    if any(f.done() and not f.cancelled() and f.exception() is not None for f in pending):
        return False
    while left:
        watch = left | {sender} if sender is not None else left
        done, _ = await asyncio.wait(watch, return_when=asyncio.FIRST_COMPLETED)
        if sender is not None and sender in done:
            return True
        left -= done
        if any(not f.cancelled() and f.exception() is not None for f in done):
            return False
    return False


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a future's outcome as seen (its failure is handled where it is decided)."""
    if not fut.cancelled():
        fut.exception()


def _chain(source: asyncio.Future[Any], target: asyncio.Future[Any]) -> None:
    """Resolve ``target`` (a held send's future) as ``source`` (the real send) resolves."""

    def done(f: asyncio.Future[Any]) -> None:
        if target.done():
            return
        if f.cancelled():
            target.cancel()
        elif f.exception() is not None:
            target.set_exception(f.exception())  # type: ignore[arg-type]
        else:
            target.set_result(f.result())

    source.add_done_callback(done)


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


class PinnedReadOffsets(defaultdict[TP, int | None]):
    """Faust's per-partition "last delivered offset", with a ceiling while we wait.

    Faust's fetch loop drops every fetched record below this offset and raises it with
    each delivery; while we wait for a record Faust skipped, it must stay at or below
    that record, or the record is dropped again when our seek fetches it.
    """

    def __init__(self) -> None:
        super().__init__(lambda: None)
        self._pins: dict[TP, int] = {}

    def pin(self, tp: TP, offset: int) -> None:
        self._pins[tp] = offset
        current = self.get(tp)
        if current is not None and current > offset:
            super().__setitem__(tp, offset)

    def unpin(self, tp: TP) -> None:
        self._pins.pop(tp, None)

    def __setitem__(self, tp: TP, offset: int | None) -> None:
        pin = self._pins.get(tp)
        if pin is not None and offset is not None and offset > pin:
            offset = pin
        super().__setitem__(tp, offset)


class _Delivery:
    """One record on its way to the conductor (see SettlingConsumer.wait_first)."""

    __slots__ = ("coro", "message")

    def __init__(self, message: Any, coro: Any) -> None:
        self.message = message
        self.coro = coro

    def __await__(self) -> Any:
        return self.coro.__await__()


class SettlingConsumer(AiokafkaConsumer):
    """Faust's aiokafka consumer that tells the coordinator when positions are settled.

    ``perform_seek`` is what Faust's recovery calls, after table recovery, to move every
    stream partition to its committed offset; only after it may events be processed.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_offset = PinnedReadOffsets()
        deliver = self.callback
        self.callback = lambda message: _Delivery(message, deliver(message))

    async def wait_first(self, *coros: Any, timeout: Any = None) -> Any:
        # Faust's fetch loop hands each record to the conductor through
        # ``wait_first(callback(message), suspend_flow.wait())``, so that a rebalance can
        # interrupt a delivery blocked on a full stream buffer. That costs four tasks, a
        # wait and three cancellations per record: about 15% of the dedup stage's CPU in
        # a profile. When the delivery cannot block (checked just before it, with no
        # await in between), it is awaited directly; otherwise it goes the usual way.
        first = coros[0] if coros else None
        if not isinstance(first, _Delivery):
            return await super().wait_first(*coros, timeout=timeout)
        rest = coros[1:]
        blocker = self._blocker(first.message)
        if blocker == "stream buffer":
            # Under a backlog the agent is the bottleneck and its buffer stays full: each
            # record would then take the slow path, its delivery waking with each record
            # the agent takes. Wait instead, once, until the buffer has drained to
            # Faust's own low-water mark (40%), and deliver the next records at once.
            await self._wait_for_room(first.message)
            blocker = self._blocker(first.message)
        if blocker is not None:
            return await super().wait_first(first.coro, *rest, timeout=timeout)
        for other in rest:
            if asyncio.iscoroutine(other):
                other.close()  # the suspend-flow wait, never needed
        result = await first.coro
        return WaitResults([first], [result], False)

    def _blocker(self, message: Any) -> str | None:
        """What the conductor's delivery of ``message`` would wait for; None: nothing.

        It waits only for: Faust's flow control (rebalances), its subscription lock, a
        full producer buffer, or a full stream buffer of a channel reading ``message``'s
        partition.
        """
        if self.suspend_flow.is_set() or self.should_stop:
            return "suspended"
        app = self.app
        if not app.flow_control.is_active():
            return "flow control"
        conductor: Any = app.topics
        if conductor._tp_to_callback_lock.locked():
            return "subscription"
        buffer = app.producer.buffer
        if buffer.size > buffer.max_messages:
            return "producer buffer"
        for chan in conductor._tp_index.get(message.tp, ()):
            if chan.queue.full():
                return "stream buffer"
        return None

    async def _wait_for_room(self, message: Any, poll_s: float = 0.005) -> None:
        """Until every stream buffer reading ``message``'s partition is down to its
        pressure-drop size, or a rebalance or stop begins (then the caller takes Faust's
        interruptible path). Polled: the agent still has 40% of a buffer to work through
        when this returns, so a few milliseconds of lateness never starve it."""
        chans = list(self.app.topics._tp_index.get(message.tp, ()))  # type: ignore[attr-defined]
        while not (self.suspend_flow.is_set() or self.should_stop):
            if all(chan.queue.qsize() <= chan.queue.pressure_drop_size for chan in chans):
                return
            await asyncio.sleep(poll_s)

    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        return LedgerConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def highwaters(self, *partitions: TP) -> Mapping[TP, int]:
        # Faust answers from the consumer's cached last stable offset, which is unknown
        # (-1) for a partition not fetched yet; recovery then raises ConsistencyError
        # for a persisted offset "above the highwater". Ask the broker instead: a
        # read_committed consumer's end offsets are the last stable offsets.
        # And not the last stable offset itself but the end of the last committed
        # record (see Coordinator.record_ends): with transactional changelogs the
        # offset before the LSO is a commit marker that recovery would wait for.
        eos = self.app.eos  # type: ignore[attr-defined]
        # The active changelog partitions of our tables are restored by the coordinator
        # after Faust's recovery (Coordinator.restore): Faust is told they are complete
        # where its reading would start (it subtracts 1, and starts at the persisted
        # offset or before the log start, whichever is later), so it reads none of them.
        assignor = self.app.assignor
        changelogs = self.app.tables._changelogs  # type: ignore[attr-defined]
        mine = [
            tp for tp in partitions if eos.restores_changelog(tp) and not assignor.is_standby(tp)
        ]
        ours: dict[TP, int] = {}
        if mine:
            begins = await eos.beginnings(mine)
            remembered = self.app.tables.recovery.active_offsets  # type: ignore[attr-defined]
            for tp in mine:
                persisted = changelogs[tp.topic].data.persisted_offset(tp)
                start = max(
                    -1 if persisted is None else persisted,
                    remembered.get(tp) or -1,  # what an earlier recovery read, if more
                    begins.get(tp, 0) - 1,
                )
                ours[tp] = start + 1
        rest = [tp for tp in partitions if tp not in ours]
        return {**ours, **(await eos.record_ends(rest) if rest else {})}

    async def position(self, tp: TP) -> int | None:
        # Faust calls this only from its recovery's "aborted transactions up to the
        # highwater" shortcut: after two idle 5-second waits it declares a changelog
        # partition recovered once the consumer's *fetch* position passed the
        # highwater, although the fetched records may still sit in its queue, not yet
        # applied. Its idle count is never reset between recoveries, so the shortcut
        # fires at once in a later recovery (seen: a balance read before its last rows
        # were applied; updates lost). The shortcut is not needed here: highwaters()
        # ends at the last committed record, which recovery does receive. -1 keeps the
        # shortcut from ever firing.
        return -1

    async def seek_wait(self, partitions: Mapping[TP, int | None]) -> None:
        # Faust's recovery registers a standby changelog partition with offset None and
        # fills the offset in only in its first pass; when a rebalance restarts the
        # recovery at the wrong moment (seen right after a broker restart), it seeks the
        # standby to None and aiokafka's "Offset must be a positive integer" crashes the
        # worker. No known offset means nothing of the partition is stored: read it from
        # its start, which is what Faust does for -1.
        await super().seek_wait({tp: 0 if o is None else o for tp, o in partitions.items()})

    async def perform_seek(self) -> None:
        # Processing starts when the app's recovery ends (Coordinator.recovered), not
        # here: Faust also calls this from its fetcher in the middle of a recovery.
        await super().perform_seek()
        eos = self.app.eos  # type: ignore[attr-defined]
        eos.seek_wait = self.seek_wait
        eos.read_offsets = self._read_offset
        eos.resume = self.resume_partitions


class LedgerConsumerThread(AIOKafkaConsumerThread):
    """Faust's consumer thread, telling the coordinator's ledger what each fetch held."""

    #: seeks made through :meth:`seek`, which Faust calls from the event loop's thread
    _seeks = 0

    def seek(self, partition: TP, offset: int) -> None:
        # Counted before the position moves, so a fetch that may have read a position
        # moved by this seek sees the count change (see _fetch_records).
        self._seeks += 1
        super().seek(partition, offset)

    async def _fetch_records(
        self,
        consumer: Any,
        active_partitions: set[TP],
        timeout: float | None = None,
        max_records: int | None = None,
    ) -> Any:
        seeks = self._seeks
        records = await super()._fetch_records(
            consumer, active_partitions, timeout=timeout, max_records=max_records
        )
        eos = self.app.eos  # type: ignore[attr-defined]
        if not records or not eos.enabled:
            return records
        # No await since the fetcher handed the records out, so no seek from this
        # thread's loop ran in between; Faust's direct seek from the other thread is
        # caught by the count, read after the positions.
        subscription = consumer._fetcher._subscriptions.subscription
        assignment = subscription.assignment if subscription is not None else None
        if assignment is None:
            return records
        notes: list[tuple[TP, list[int], int]] = []
        for tp, batch in records.items():
            if not batch or tp.topic not in eos.sources:
                continue
            state = assignment.state_value(tp)
            if state is None or not state.has_valid_position:
                continue
            notes.append((TP(tp.topic, tp.partition), [r.offset for r in batch], state.position))
        if self._seeks != seeks:
            return records  # a position may be a seek target: learn nothing from this fetch
        for tp, offsets, position in notes:
            eos.ledger.note(tp, offsets, position)
        return records
