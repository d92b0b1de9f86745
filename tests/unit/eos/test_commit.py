"""The commit protocol (:mod:`pipeline.eos.commit`), step by step, without a broker.

A fake transactional producer writes every call into one log, and the table is a real
:class:`~pipeline.eos.faust.store.TransactionalStore` (RocksDB in a temporary
directory), so the tests see what the seven steps do, in which order, and what is left
in the store when one of them fails. The crash-at-step integration tests
(``tests/integration/test_dedup_chain.py``) show the same against Kafka.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import ProducerFenced
from faust.types import TP

from pipeline.eos.commit import Outcome, Partition, commit_partition, produce, produce_now
from pipeline.eos.faust.store import TransactionalStore
from pipeline.eos.partition import OutRecord, PartitionState
from pipeline.eos.policy import COMMIT_STEPS, FIXES, Policy, Step, is_fence
from pipeline.factory import create_app
from pipeline.settings import Settings

SOURCE = TP("t-commit-raw", 3)
PROGRESS = TopicPartition("t-commit-progress", 3)
GROUP = "t-commit"
EXACTLY_ONCE = Policy(exactly_once=True, fixes=frozenset(FIXES))


class Boom(RuntimeError):
    pass


class FakeTransaction:
    """A transactional producer that logs every call; ``fail_on`` names a call that
    raises instead, ``refuse`` a topic (or ``refuse_tp`` one partition) whose sends the
    broker refuses. ``put`` batches as aiokafka does: the records of one partition
    share one future until the commit's flush sends them."""

    def __init__(self, log: list[tuple[Any, ...]], fail_on: str | None = None) -> None:
        self.log = log
        self.fail_on = fail_on
        self.refuse: str | None = None
        self.refuse_tp: tuple[str, int | None] | None = None
        self.batches: dict[tuple[str, int | None], asyncio.Future[Any]] = {}
        self.ends: defaultdict[tuple[str, int | None], int] = defaultdict(int)
        self.sender_task: asyncio.Future[Any] | None = None
        #: what a refused send fails with
        self.refusal: type[Exception] = Boom

    @property
    def fenced(self) -> bool:
        # As the real one: the sender ended on a fence.
        task = self.sender_task
        return task is not None and task.done() and is_fence(task.exception())

    def _refused(self, topic: str) -> Exception:
        if self.refusal is Boom:
            return Boom(f"{topic} refused the record")
        return self.refusal()

    def _call(self, name: str, *args: Any) -> None:
        self.log.append((name, *args))
        if self.fail_on == name:
            raise Boom(f"{name} failed")

    async def send(
        self,
        topic: str,
        *,
        value: bytes | None,
        key: bytes | None,
        partition: int | None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]:
        self._call("send", topic, key, value)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if topic == self.refuse:
            fut.set_exception(self._refused(topic))
        else:
            offset = self.ends[topic, partition]
            self.ends[topic, partition] += 1
            fut.set_result(SimpleNamespace(topic=topic, partition=partition, offset=offset))
        return fut

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
        self._call("send", topic, key, value)
        self.ends[topic, partition] += 1
        fut = self.batches.get((topic, partition))
        if fut is None:
            fut = self.batches[topic, partition] = asyncio.get_running_loop().create_future()
        return fut

    def put_now(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        timestamp_ms: int | None,
        headers: list[tuple[str, bytes]] | None,
    ) -> asyncio.Future[Any] | None:
        # As aiokafka's: only a batch that ``put`` opened takes a record at once.
        fut = self.batches.get((topic, partition))
        if fut is None:
            return None
        self._call("send", topic, key, value)
        self.ends[topic, partition] += 1
        return fut

    def add_to_transaction(self, tp: TopicPartition) -> None:
        self.log.append(("add", tp.topic))

    async def flush_for_commit(self) -> None:
        # The batches go out whether or not the flush call then fails.
        batches, self.batches = self.batches, {}
        for (topic, partition), fut in batches.items():
            if topic == self.refuse or (topic, partition) == self.refuse_tp:
                fut.set_exception(self._refused(topic))
            else:
                fut.set_result(SimpleNamespace(topic=topic, partition=partition, offset=None))
        self._call("flush")

    async def send_offsets_to_transaction(
        self, offsets: dict[TopicPartition, int], group_id: str
    ) -> None:
        self._call("offsets", {(tp.topic, tp.partition): o for tp, o in offsets.items()}, group_id)

    async def commit_transaction(self) -> None:
        self._call("commit")

    async def begin_transaction(self) -> None:
        self._call("begin")

    async def abort_transaction(self) -> None:
        self._call("abort")


class FakeHooks:
    """The fault points and failure handling, logged; ``fail_at`` raises at a step, and
    ``during`` runs a callback when a step is reached (work done meanwhile)."""

    def __init__(self, log: list[tuple[Any, ...]], fail_at: Step | None = None) -> None:
        self.log = log
        self.fail_at = fail_at
        self.during: dict[Step, Any] = {}
        self.blamed: list[tuple[int, str]] = []
        self.rewound = 0

    async def at_step(self, step: Step, tp: TP, st: PartitionState) -> None:
        st.step = step.value
        self.log.append(("step", step.value))
        if step in self.during:
            await self.during[step]()
        if step is self.fail_at:
            raise Boom(f"failed at {step.value}")

    async def fail_point(self, step: Step, txn: Any, tp: TP, st: PartitionState) -> None:
        return None

    def blame(self, tp: TP, st: PartitionState, offset: int, exc: BaseException) -> None:
        self.blamed.append((offset, str(exc)))
        st.rewinding = True

    async def abort_and_rewind(self, tp: TP, st: PartitionState) -> None:
        self.rewound += 1
        self.log.append(("rewind",))


@pytest.fixture
def store(tmp_path: Path) -> TransactionalStore:
    app = create_app(Settings(app_id="t-commit", datadir=tmp_path))
    table = app.Table("dedup", key_type=bytes, value_type=bytes, partitions=8)
    data = table.data
    assert isinstance(data, TransactionalStore) and data.transactional
    return data


def _part(store: TransactionalStore) -> Partition:
    return Partition(tp=SOURCE, progress=PROGRESS, stores=(store,), group_id=GROUP)


def _committed_rows(store: TransactionalStore) -> dict[bytes, bytes]:
    return dict(store.scan_partition(SOURCE.partition, None, 100))


def _changelog_offset(store: TransactionalStore) -> int | None:
    return store.persisted_offset(TP(store.changelog_topic_name, SOURCE.partition))


async def _processed(
    part: Partition, st: PartitionState, txn: FakeTransaction, store: TransactionalStore
) -> None:
    """Two events of the source partition processed: table rows and one output each."""
    for offset, key in ((41, b"a"), (42, b"b")):
        store.stage(SOURCE, key, b"v-" + key)
        await produce(
            part, st, txn, OutRecord("t-commit-out", key, b"out", None, None, None, offset)
        )
        st.processed = offset
        st.events += 1


async def test_the_seven_steps_run_in_order(store: TransactionalStore) -> None:
    log: list[tuple[Any, ...]] = []
    txn, hooks, st, part = FakeTransaction(log), FakeHooks(log), PartitionState(), _part(store)
    await _processed(part, st, txn, store)
    log.clear()

    outcome = await commit_partition(part, st, txn, EXACTLY_ONCE, hooks)

    changelog = store.changelog_topic_name
    assert outcome is Outcome.COMMITTED
    assert log == [
        ("step", "quiesce"),
        ("step", "changelog"),
        ("send", PROGRESS.topic, b"t-commit-raw:3", b"43"),
        ("send", changelog, b"a", b"v-a"),
        ("send", changelog, b"b", b"v-b"),
        ("step", "drain"),
        ("flush",),
        ("step", "offsets"),
        ("offsets", {(SOURCE.topic, SOURCE.partition): 43}, GROUP),
        ("step", "commit"),
        ("commit",),
        ("step", "persist"),
        ("step", "begin"),
        ("begin",),
    ]
    assert [e[1] for e in log if e[0] == "step"] == [s.value for s in COMMIT_STEPS]
    assert _committed_rows(store) == {b"a": b"v-a", b"b": b"v-b"}
    assert _changelog_offset(store) == 1  # the changelog partition's last record
    assert st.committed == 43 and st.step == "" and not st.holding


async def test_the_first_send_registers_the_changelog_and_progress_partitions(
    store: TransactionalStore,
) -> None:
    log: list[tuple[Any, ...]] = []
    txn, st, part = FakeTransaction(log), PartitionState(), _part(store)
    store.stage(SOURCE, b"a", b"1")
    await produce(part, st, txn, OutRecord("t-commit-out", b"a", b"x", None, None, None, 7))
    assert log[:3] == [
        ("add", PROGRESS.topic),
        ("add", store.changelog_topic_name),
        ("send", "t-commit-out", b"a", b"x"),
    ]


@pytest.mark.parametrize("step", [s for s in COMMIT_STEPS if s is not Step.BEGIN])
async def test_a_failure_at_a_step_up_to_persist_leaves_the_store_untouched(
    store: TransactionalStore, step: Step
) -> None:
    log: list[tuple[Any, ...]] = []
    txn, hooks = FakeTransaction(log), FakeHooks(log, fail_at=step)
    st, part = PartitionState(), _part(store)
    await _processed(part, st, txn, store)

    with pytest.raises(Boom):
        await commit_partition(part, st, txn, EXACTLY_ONCE, hooks)

    assert _committed_rows(store) == {}
    assert _changelog_offset(store) is None
    # Only a failure after the commit step leaves a commit behind it (then the store is
    # behind Kafka, which a restore catches up; never ahead).
    committed = COMMIT_STEPS.index(step) > COMMIT_STEPS.index(Step.COMMIT)
    assert (("commit",) in log) is committed
    assert (st.committed == 43) is committed


@pytest.mark.parametrize("call", ["send", "flush", "offsets", "commit"])
async def test_a_failed_producer_call_leaves_the_store_untouched(
    store: TransactionalStore, call: str
) -> None:
    log: list[tuple[Any, ...]] = []
    txn, hooks, st, part = FakeTransaction(log), FakeHooks(log), PartitionState(), _part(store)
    await _processed(part, st, txn, store)
    txn.fail_on = call

    with pytest.raises(Boom):
        await commit_partition(part, st, txn, EXACTLY_ONCE, hooks)

    assert _committed_rows(store) == {}
    assert _changelog_offset(store) is None
    assert st.committed is None
    assert ("begin",) not in log


async def test_a_failure_at_begin_comes_after_the_commit_and_the_persist(
    store: TransactionalStore,
) -> None:
    log: list[tuple[Any, ...]] = []
    txn, hooks = FakeTransaction(log), FakeHooks(log, fail_at=Step.BEGIN)
    st, part = PartitionState(), _part(store)
    await _processed(part, st, txn, store)

    with pytest.raises(Boom):
        await commit_partition(part, st, txn, EXACTLY_ONCE, hooks)

    # Committed in Kafka, so in the store too: the store is never behind a commit it
    # survived, nor ahead of one.
    assert _committed_rows(store) == {b"a": b"v-a", b"b": b"v-b"}
    assert st.committed == 43


async def test_sends_held_during_the_commit_go_into_the_next_transaction_in_order(
    store: TransactionalStore,
) -> None:
    log: list[tuple[Any, ...]] = []
    txn, hooks, st, part = FakeTransaction(log), FakeHooks(log), PartitionState(), _part(store)
    await _processed(part, st, txn, store)
    held: list[asyncio.Future[Any]] = []

    def hold(key: bytes, offset: int) -> None:
        # What the transaction manager does with a send made while ``st.holding``.
        assert st.holding, "sends are held from the quiesce step on"
        record = OutRecord("t-commit-out", key, b"later", None, None, None, offset)
        record.future = asyncio.get_running_loop().create_future()
        st.held.append(record)
        held.append(record.future)

    async def processing_goes_on() -> None:
        for i, key in enumerate((b"c", b"d", b"e")):
            hold(key, 43 + i)

    hooks.during[Step.DRAIN] = processing_goes_on
    hooks.during[Step.PERSIST] = lambda: _async(hold, b"f", 46)

    log.clear()
    await commit_partition(part, st, txn, EXACTLY_ONCE, hooks)

    begin = log.index(("begin",))
    after = [entry for entry in log[begin + 1 :] if entry[0] == "send"]
    assert [key for _, _, key, _ in after] == [b"c", b"d", b"e", b"f"]
    before = [e for e in log[:begin] if e[0] == "send" and e[1] == "t-commit-out"]
    assert before == []  # none of them entered the committing transaction
    await asyncio.sleep(0)  # the held futures resolve through done-callbacks
    assert all(f.done() and f.result().topic == "t-commit-out" for f in held)
    assert [f.result().offset for f in held] == [2, 3, 4, 5]  # after the first two outputs
    assert not st.holding and st.held == []
    assert list(st.pending.values()) == [43, 44, 45, 46]  # the next transaction's sends


async def _async(fn: Any, *args: Any) -> None:
    fn(*args)


async def test_a_refused_send_blames_its_event_and_rewinds_instead_of_committing(
    store: TransactionalStore,
) -> None:
    log: list[tuple[Any, ...]] = []
    txn, hooks, st, part = FakeTransaction(log), FakeHooks(log), PartitionState(), _part(store)
    txn.refuse = "t-commit-out"
    await _processed(part, st, txn, store)

    outcome = await commit_partition(part, st, txn, EXACTLY_ONCE, hooks)

    assert outcome is Outcome.REWOUND
    assert hooks.blamed == [(41, "t-commit-out refused the record")]  # the first event
    assert hooks.rewound == 1
    assert not any(entry[0] in ("offsets", "commit", "begin") for entry in log)
    assert _committed_rows(store) == {}
    assert st.committed is None


async def test_a_refused_batch_blames_the_first_event_whose_record_it_carries(
    store: TransactionalStore,
) -> None:
    log: list[tuple[Any, ...]] = []
    txn, hooks, st, part = FakeTransaction(log), FakeHooks(log), PartitionState(), _part(store)
    txn.refuse_tp = ("t-commit-out", 1)
    for offset, partition in ((41, 0), (42, 1), (43, 0), (44, 1)):
        await produce(
            part, st, txn, OutRecord("t-commit-out", b"k", b"out", partition, None, None, offset)
        )
        st.processed = offset
        st.events += 1
    # One future per batch, each with the first event whose record it carries.
    assert sorted(v for v in st.pending.values() if v is not None) == [41, 42]

    outcome = await commit_partition(part, st, txn, EXACTLY_ONCE, hooks)

    assert outcome is Outcome.REWOUND
    assert hooks.blamed == [(42, "t-commit-out refused the record")]
    assert st.committed is None


async def test_a_fenced_batch_blames_no_event_and_gives_the_partition_up(
    store: TransactionalStore,
) -> None:
    # Another producer took the transactional id: no event is at fault, and the abort
    # that follows must give the partition up (st.fenced), not start a new producer.
    log: list[tuple[Any, ...]] = []
    txn, hooks, st, part = FakeTransaction(log), FakeHooks(log), PartitionState(), _part(store)
    txn.refuse, txn.refusal = "t-commit-out", ProducerFenced
    await _processed(part, st, txn, store)

    outcome = await commit_partition(part, st, txn, EXACTLY_ONCE, hooks)

    assert outcome is Outcome.REWOUND
    assert hooks.blamed == [] and hooks.rewound == 1
    assert st.fenced and st.rewinding
    assert not any(entry[0] in ("offsets", "commit", "begin") for entry in log)
    assert _committed_rows(store) == {} and st.committed is None


async def test_a_sender_ended_by_a_fence_gives_the_partition_up(
    store: TransactionalStore,
) -> None:
    log: list[tuple[Any, ...]] = []
    txn, hooks, st, part = FakeTransaction(log), FakeHooks(log), PartitionState(), _part(store)
    await _processed(part, st, txn, store)
    ended: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    ended.set_exception(ProducerFenced())
    txn.sender_task = ended
    assert txn.fenced

    outcome = await commit_partition(part, st, txn, EXACTLY_ONCE, hooks)

    assert outcome is Outcome.REWOUND
    assert hooks.blamed == [] and st.fenced
    assert _committed_rows(store) == {} and st.committed is None


async def test_records_that_join_an_open_batch_at_once_keep_the_blame_of_its_first(
    store: TransactionalStore,
) -> None:
    """The engine's path (emit_all): ``produce_now`` first, ``produce`` when no batch is
    open. The first record of a transaction, and the first of each partition, open
    batches; the rest join them at once, and a refusal still blames the earliest."""
    log: list[tuple[Any, ...]] = []
    txn, hooks, st, part = FakeTransaction(log), FakeHooks(log), PartitionState(), _part(store)
    txn.refuse_tp = ("t-commit-out", 1)
    joined = []
    for offset, partition in ((41, 0), (42, 1), (43, 0), (44, 1), (45, 0)):
        record = OutRecord("t-commit-out", b"k", b"out", partition, None, None, offset)
        if produce_now(st, txn, record):
            joined.append(offset)
        else:
            await produce(part, st, txn, record)
        st.processed = offset
        st.events += 1
    assert joined == [43, 44, 45]  # 41 opened the transaction, 42 partition 1's batch
    assert sorted(v for v in st.pending.values() if v is not None) == [41, 42]
    assert [e[3] for e in log if e[0] == "send"] == [b"out"] * 5  # none lost, none twice

    outcome = await commit_partition(part, st, txn, EXACTLY_ONCE, hooks)

    assert outcome is Outcome.REWOUND
    assert hooks.blamed == [(42, "t-commit-out refused the record")]


async def test_a_partition_whose_event_failed_is_not_committed(store: TransactionalStore) -> None:
    log: list[tuple[Any, ...]] = []
    txn, hooks, st, part = FakeTransaction(log), FakeHooks(log), PartitionState(), _part(store)
    await _processed(part, st, txn, store)
    st.rewinding = True  # an event failed while the commit waited for the gate
    log.clear()

    assert await commit_partition(part, st, txn, EXACTLY_ONCE, hooks) is Outcome.SKIPPED
    assert log == [("step", "quiesce")]
    assert store.has_dirty(SOURCE)  # left for the abort to discard


async def test_the_quiesce_step_waits_for_the_event_in_progress(store: TransactionalStore) -> None:
    log: list[tuple[Any, ...]] = []
    txn, hooks, st, part = FakeTransaction(log), FakeHooks(log), PartitionState(), _part(store)
    await _processed(part, st, txn, store)
    await st.gate.acquire()  # an agent is in the middle of event 43
    commit = asyncio.ensure_future(commit_partition(part, st, txn, EXACTLY_ONCE, hooks))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert st.step == "waiting for the gate"
    store.stage(SOURCE, b"c", b"v-c")  # event 43's write, before its gate is released
    st.processed = 43
    st.gate.release()
    assert await commit is Outcome.COMMITTED
    assert ("offsets", {(SOURCE.topic, SOURCE.partition): 44}, GROUP) in log
    assert _committed_rows(store)[b"c"] == b"v-c"


async def test_without_progress_nothing_moves_the_offset(store: TransactionalStore) -> None:
    log: list[tuple[Any, ...]] = []
    txn, hooks, st, part = FakeTransaction(log), FakeHooks(log), PartitionState(), _part(store)
    st.processed, st.committed = 42, 43  # committed already

    assert await commit_partition(part, st, txn, EXACTLY_ONCE, hooks) is Outcome.COMMITTED
    assert not any(entry[0] in ("send", "offsets") for entry in log)


async def test_a_partition_in_the_middle_of_an_event_is_due_for_the_commit_round() -> None:
    """A revoke's commit round that left out a partition whose event was being processed
    (nothing processed or sent yet) let that event's effects commit later, past the
    offset the next assignment continued from."""
    st = PartitionState()
    assert not st.due
    await st.gate.acquire()  # an event is being handled
    assert st.due and not st.has_progress
    st.gate.release()
    st.processed = 7
    assert st.due
