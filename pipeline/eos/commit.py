"""The commit of one source partition's transaction, in seven steps.

For every source partition ``tp`` with progress since its last commit, concurrently
across partitions, :func:`commit_partition` runs:

1. ``quiesce``   take the partition's gate (so no event of ``tp`` is half processed),
   note the offset after the last processed event, take the table rows the
   transaction wrote, and from here on *hold* new sends of ``tp`` in memory; then
   release the gate. Processing of ``tp`` goes on during steps 2-7: its table writes
   start a new overlay, its sends wait for the next transaction.
2. ``changelog`` send the rows of step 1 (last value per key) to the changelog
   partition, and the offset of step 4 to the progress topic, inside ``tp``'s
   transaction.
3. ``drain``     await every send of the transaction (outputs, DLQ, changelog); a send
   the broker refused blames the event that made it, and the transaction is aborted
   and processed again instead of committed.
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

A crash anywhere before step 5 completes aborts the transaction (the broker aborts it
when the restarted worker's producer with the same ``transactional.id`` initialises, or
on timeout); the events are read again from the last committed offsets. An exception
out of :func:`commit_partition` is the caller's to make fatal (the ``fatal-commit`` fix).

This module knows Kafka only through :class:`Transaction` and the store only through
:class:`Store`, so that the protocol runs, step by step, against fakes in
``tests/unit/eos/test_commit.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from aiokafka import TopicPartition
from faust.types import TP

from pipeline.eos.partition import (
    NO_GATE,
    OutRecord,
    PartitionState,
    chain,
    drained,
    progress_key,
    retrieve,
)
from pipeline.eos.policy import Policy, Step, is_fence

log = logging.getLogger(__name__)


class Transaction(Protocol):
    """One source partition's transactional producer, as the commit uses it."""

    async def send(
        self,
        topic: str,
        *,
        value: bytes | None,
        key: bytes | None,
        partition: int | None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]: ...

    async def put(
        self,
        topic: str,
        *,
        value: bytes | None,
        key: bytes | None,
        partition: int | None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]:
        """Like ``send``, but the future may be shared by the records of one producer
        batch: it says when the record was delivered or refused, not its offset."""
        ...

    def put_now(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        timestamp_ms: int | None,
        headers: list[tuple[str, bytes]] | None,
    ) -> asyncio.Future[Any] | None:
        """``put`` without waiting, if the record can join an open producer batch at
        once; None if not (then ``put``)."""
        ...

    def add_to_transaction(self, tp: TopicPartition) -> None: ...

    def flush_for_commit(self) -> Awaitable[None]: ...

    @property
    def sender_task(self) -> asyncio.Future[Any] | None: ...

    @property
    def fenced(self) -> bool:
        """Whether another producer took this one's transactional id."""
        ...

    async def send_offsets_to_transaction(
        self, offsets: dict[TopicPartition, int], group_id: str
    ) -> None: ...

    async def commit_transaction(self) -> None: ...

    async def begin_transaction(self) -> None: ...

    async def abort_transaction(self) -> None: ...


class Store(Protocol):
    """A table store whose writes wait in an overlay per source partition."""

    @property
    def changelog_topic_name(self) -> str: ...

    def has_dirty(self, tp: TP) -> bool: ...

    def take_dirty(self, tp: TP) -> list[tuple[bytes, bytes | None]]: ...

    def persist(self, tp: TP, changelog_offset: int | None) -> None: ...


class Hooks(Protocol):
    """What the commit calls back into: the fault points, and the partition's failure
    handling (blame an event; abort and go back to the last commit)."""

    async def at_step(self, step: Step, tp: TP, st: PartitionState) -> None: ...

    async def fail_point(
        self, step: Step, txn: Transaction, tp: TP, st: PartitionState
    ) -> None: ...

    def blame(self, tp: TP, st: PartitionState, offset: int, exc: BaseException) -> None: ...

    async def abort_and_rewind(self, tp: TP, st: PartitionState) -> None: ...


class Outcome(Enum):
    COMMITTED = "committed"
    #: an event failed while the commit waited for the gate: nothing was committed
    SKIPPED = "skipped"
    #: a send was refused at the drain step: the transaction was aborted instead
    REWOUND = "rewound"


@dataclass(frozen=True, slots=True)
class Partition:
    """What a source partition's transaction writes besides its outputs."""

    tp: TP
    #: the record of this partition on the progress topic (see step 2)
    progress: TopicPartition
    #: the stores this partition's events write (a table per store)
    stores: Sequence[Store]
    #: the consumer group whose offsets step 4 commits
    group_id: str


async def commit_partition(
    part: Partition, st: PartitionState, txn: Transaction, policy: Policy, hooks: Hooks
) -> Outcome:
    """Commit ``part``'s open transaction: the seven steps of the module docstring."""
    tp = part.tp
    quiesce = policy.on("quiesce")
    await hooks.at_step(Step.QUIESCE, tp, st)
    st.step = "waiting for the gate"
    async with st.gate if quiesce else NO_GATE:  # 1. quiesce
        if st.rewinding:
            # An event failed while this commit waited for the gate: the open
            # transaction holds part of it, and is aborted instead (see Hooks).
            st.step = ""
            return Outcome.SKIPPED
        offset = None if st.processed is None else st.processed + 1
        stores = part.stores if policy.on("local-state") else ()
        rows = [(store, store.take_dirty(tp)) for store in stores]
        st.txn_events, st.events = st.events, 0
        # Without the quiesce fix (a test switch) sends go on into this transaction.
        if quiesce:
            st.hold()
        else:
            st.release()
    moves = offset is not None and (st.committed is None or offset > st.committed)

    await hooks.at_step(Step.CHANGELOG, tp, st)  # 2. changelog (and progress)
    if moves:
        # The offset of step 4 once more, as a record of our own in the same
        # transaction: if the group's committed offsets are ever gone (expired while
        # every worker was down longer than offsets.retention.minutes), processing
        # resumes from here, not from the log start (Coordinator._fill_from_progress).
        fut = await txn.put(
            part.progress.topic,
            value=str(offset).encode(),
            key=progress_key(tp),
            partition=part.progress.partition,
        )
        st.pending.setdefault(fut, None)
    # Step 6 needs the changelog offset of each store's last row: only that row is sent
    # with a future of its own.
    changelog: list[tuple[Store, asyncio.Future[Any]]] = []
    for store, items in rows:
        topic, final = store.changelog_topic_name, len(items) - 1
        for i, (key, value) in enumerate(items):
            if i == final:
                fut = await txn.send(topic, value=value, key=key, partition=tp.partition)
                changelog.append((store, fut))
            else:
                now = txn.put_now(topic, key, value, tp.partition, None, None)
                if now is None:
                    now = await txn.put(topic, value=value, key=key, partition=tp.partition)
                fut = now
            st.pending.setdefault(fut, None)

    await hooks.at_step(Step.DRAIN, tp, st)  # 3. drain
    sends, st.pending = st.pending, {}
    pending, made_by = list(sends), list(sends.values())
    if policy.on("flush-before-commit") and not await _drain(tp, st, txn, pending, made_by, hooks):
        return Outcome.REWOUND

    await hooks.at_step(Step.OFFSETS, tp, st)  # 4. offsets
    if moves:
        assert offset is not None
        await txn.send_offsets_to_transaction(
            {TopicPartition(tp.topic, tp.partition): offset}, part.group_id
        )

    await hooks.at_step(Step.COMMIT, tp, st)  # 5. commit
    await hooks.fail_point(Step.COMMIT, txn, tp, st)
    await txn.commit_transaction()
    st.rewinds_in_a_row = 0
    if offset is not None:
        st.committed = offset
        if st.failures:  # a failure below a committed offset is history
            st.failures = {o: f for o, f in st.failures.items() if o >= offset}

    await hooks.at_step(Step.PERSIST, tp, st)  # 6. persist
    last: dict[int, int] = {}
    for store, fut in changelog:
        last[id(store)] = max(last.get(id(store), -1), fut.result().offset)
    keep_offsets = policy.on("changelog-offsets")
    for store in stores:
        # Stock Faust (#599) loses these offsets; then restores start too early.
        store.persist(tp, last.get(id(store)) if keep_offsets else None)

    await hooks.at_step(Step.BEGIN, tp, st)  # 7. begin
    await txn.begin_transaction()
    await send_held(part, st, txn)
    st.step = ""
    return Outcome.COMMITTED


async def _drain(
    tp: TP,
    st: PartitionState,
    txn: Transaction,
    pending: list[asyncio.Future[Any]],
    made_by: list[int | None],
    hooks: Hooks,
) -> bool:
    """Step 3: True once every send of the transaction completed; False (and the
    transaction aborted, its partition rewound) if one was refused."""
    # Send the lingering batches now rather than when their linger ends; this closes
    # the open batches, so nothing added later joins them.
    flush = asyncio.ensure_future(txn.flush_for_commit())
    st.draining = (pending, made_by)
    try:
        # Not gather: once the broker refused a batch, aiokafka's sender may die (the
        # next batch of the partition is out of sequence) and then the flush and the
        # other sends never complete (seen: a commit stuck here for minutes). The first
        # refusal, or the sender's end, ends the wait.
        dead = await drained(pending, txn.sender_task)
        refused = [
            (o, f.exception())
            for f, o in zip(pending, made_by, strict=True)
            if f.done() and not f.cancelled() and f.exception() is not None
        ]
        if not refused and not dead:
            await flush
            return True
    finally:
        st.draining = ([], [])
    # The broker refused a record (too large for the topic, say): the transaction cannot
    # commit whole. Blame the first event that made a refused record (unless an event's
    # failure already did), abort, and process again from the last commit.
    flush.cancel()
    for fut in pending:
        fut.add_done_callback(retrieve)
    blamed = min((o for o, _ in refused if o is not None), default=None)
    first_error = refused[0][1] if refused else None
    if st.rewinding:
        pass  # counted already, by the failure of the event that sent next
    elif txn.fenced or any(is_fence(e) for _, e in refused):
        # Another producer owns the transactional id now. No event is to blame, and
        # the abort gives the partition up rather than fencing that owner in turn with
        # a new producer of ours.
        log.warning(
            "%s: the partition's producer was fenced; the transaction is dropped and the "
            "partition given up until the group assigns it again",
            tp,
        )
        st.fenced = True
        st.rewinding = True
    elif blamed is not None and first_error is not None:
        hooks.blame(tp, st, blamed, first_error)
    else:
        log.error(
            "%s: the transaction cannot commit (%r, producer sender ended: %s)",
            tp,
            first_error,
            dead,
        )
        st.rewinding = True
    await hooks.abort_and_rewind(tp, st)
    return False


async def produce(
    part: Partition, st: PartitionState, txn: Transaction, record: OutRecord, own: bool = False
) -> asyncio.Future[Any]:
    """Hand ``record`` to the partition's open transaction; step 3 awaits the result.

    The future returned is the record's own (its result is the record's metadata) only
    if ``own``; otherwise it may be shared by its producer batch (``Transaction.put``).
    """
    if not st.pending:  # the transaction's first record
        _add_early(part, txn)
    fut = await (txn.send if own else txn.put)(
        record.topic,
        value=record.value,
        key=record.key,
        partition=record.partition,
        timestamp_ms=record.timestamp_ms,
        headers=record.headers,
    )
    # Records are made in offset order, so the first record of a batch is the earliest
    # event a refusal of that batch can be blamed on.
    st.pending.setdefault(fut, record.source_offset)
    return fut


def produce_now(st: PartitionState, txn: Transaction, record: OutRecord) -> bool:
    """:func:`produce` without a coroutine, when the record can join an open producer
    batch at once (``Transaction.put_now``): True if it did. A transaction's first record
    always goes through :func:`produce`, which registers the changelog partitions first.

    Most outputs take this path, which saves two coroutines per output record
    (``produce`` and ``put``).
    """
    pending = st.pending
    if not pending:
        return False
    fut = txn.put_now(
        record.topic,
        record.key,
        record.value,
        record.partition,
        record.timestamp_ms,
        record.headers,
    )
    if fut is None:
        return False
    pending.setdefault(fut, record.source_offset)
    return True


def _add_early(part: Partition, txn: Transaction) -> None:
    """At a transaction's first send, register its changelog partitions with it too.

    Kafka adds a partition to a transaction (AddPartitionsToTxn, a round trip to the
    coordinator) when the first record for it is queued; the changelog rows are queued
    only at step 2, so each transaction paid a second AddPartitionsToTxn in its commit
    path. Queued in the same step of the loop as the first output, both go in one
    request. Only a store that has already written in this transaction counts: its rows
    are certain to go to that changelog partition at step 2, so no partition joins a
    transaction it does not write. The progress record is certain too: a transaction
    with a send has processed an event, so its offset moves.
    """
    txn.add_to_transaction(part.progress)
    for store in part.stores:
        if store.has_dirty(part.tp):
            txn.add_to_transaction(TopicPartition(store.changelog_topic_name, part.tp.partition))


async def send_held(part: Partition, st: PartitionState, txn: Transaction) -> None:
    """Step 7: send what was held during the commit into the transaction just begun, in
    the order it was made."""
    while st.held:
        batch, st.held = st.held, []
        for record in batch:
            fut = await produce(part, st, txn, record, own=record.future is not None)
            if record.future is not None:  # a caller may await it (emit)
                chain(fut, record.future)
    # No await since the loop saw the list empty: nothing can be held in between.
    st.release()
