"""An event whose handling raises never commits half done, and a poison record neither
loops forever nor stalls its partition (issue 12, hole 1); a stall is measured (hole
4): the coordinator's rules, batch by batch, without a broker."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka.errors import ProducerFenced
from faust.types import TP

from pipeline.eos.coordinator import Coordinator
from pipeline.eos.partition import PartitionState
from pipeline.eos.policy import MAX_ATTEMPTS
from pipeline.settings import Settings

from .harness import TP0, Emitted, Handled, Rewinder, deliver, settled, until


def test_a_poison_record_is_tried_three_times_then_dead_lettered_and_the_rest_goes_on() -> None:
    coord, consumer = settled(range(100), committed=10, end=100)
    handled = Handled(fail=lambda offset: offset == 12)
    stage = handled.stage()
    emitted = Emitted()
    coord.emit_all = emitted
    rewind = Rewinder(coord, consumer)
    coord.rewind = rewind

    async def go() -> None:
        for _ in range(MAX_ATTEMPTS + 1):
            await deliver(coord, stage, consumer.fetch(4))
            await until(lambda: not coord.partitions[TP0].rewinding, "the rewind")

    asyncio.run(go())
    st = coord.partitions[TP0]
    assert rewind.calls == MAX_ATTEMPTS
    assert [offset for offset, _ in handled.letters] == [12]
    reason = handled.letters[0][1]
    assert reason.startswith("processing failed 3 times; last error: RuntimeError: 'record 12")
    assert len(reason) < 400  # the error is bounded, whatever it said
    # 10 and 11 were handled again after each abort: their effects were aborted too.
    assert handled.offsets == [10, 11] * MAX_ATTEMPTS + [10, 11, 13]
    # The outputs of the failed attempts were never sent (they would only be aborted).
    assert emitted.values() == [b"10", b"11", b"13"]
    assert emitted.values("dlq") == [reason.encode()]
    assert st.processed == 13 and not st.rewinding
    assert coord.failures == MAX_ATTEMPTS and coord.poison == 1


def test_while_a_partition_goes_back_nothing_of_it_is_processed_or_taken_as_done() -> None:
    coord, consumer = settled(range(100), committed=10, end=100)
    released = asyncio.Event()
    failing = [True]
    handled = Handled(fail=lambda offset: offset == 11 and failing[0])
    stage = handled.stage()
    coord.emit_all = Emitted()

    async def slow_rewind(tp: TP, st: PartitionState) -> None:
        await released.wait()
        st.processed = None
        st.expected = st.committed
        st.rewinding = False
        await consumer.seek_wait({tp: 10})

    coord.rewind = slow_rewind

    async def go() -> PartitionState:
        st = coord.partitions[TP0]
        await deliver(coord, stage, consumer.fetch(2))  # 10 handled, 11 fails
        # Nothing after the failed record is handled, and nothing of its batch counts
        # as done: 10's and 11's effects are aborted with the open transaction.
        assert st.processed is None and st.rewinding
        await deliver(coord, stage, consumer.fetch(2))
        assert coord.skipped == 2
        failing[0] = False
        released.set()
        await until(lambda: not st.rewinding, "the rewind to end")
        await deliver(coord, stage, consumer.fetch(3))
        return st

    st = asyncio.run(go())
    assert handled.offsets == [10, 10, 11, 12]
    assert st.processed == 12


def test_a_commit_that_waits_for_the_gate_sees_the_failure_before_the_gate_opens() -> None:
    # The commit's snapshot (step 1) takes the gate: it must find the partition marked,
    # or it would take the failed record's table rows while its offset is left out.
    coord, consumer = settled(range(100), committed=10, end=100)
    coord.emit_all = Emitted()
    coord.rewind = None
    seen_by_commit: list[bool] = []
    commits: list[asyncio.Future[None]] = []
    st = coord.partitions[TP0]

    async def commit_snapshot() -> None:
        async with st.gate:
            seen_by_commit.append(st.rewinding)

    def fail(offset: int) -> bool:
        commits.append(asyncio.ensure_future(commit_snapshot()))  # waits for the gate
        return True

    async def go() -> None:
        await deliver(coord, Handled(fail=fail).stage(), consumer.fetch(1))
        await until(lambda: bool(seen_by_commit), "the commit to get the gate")

    asyncio.run(go())
    assert seen_by_commit == [True]


def test_an_output_the_producer_refuses_at_once_blames_its_record() -> None:
    coord, consumer = settled(range(100), committed=10, end=100)
    emitted = Emitted()
    emitted.raise_for = {b"11"}
    coord.emit_all = emitted
    coord.rewind = None
    asyncio.run(deliver(coord, Handled().stage(), consumer.fetch(3)))
    st = coord.partitions[TP0]
    assert list(st.failures) == [11] and st.rewinding
    assert st.processed is None  # nothing of the batch counts as done


def test_a_refused_send_is_blamed_on_the_event_that_made_it() -> None:
    # After the broker refused a record, the producer's next send may raise the same
    # error for whichever event sends next: the refused record's event is the culprit.
    coord = Coordinator(Settings())
    st = coord.state(TP0)

    async def go() -> None:
        ok: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        refused: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        ok.set_result(None)
        refused.set_exception(RuntimeError("MessageSizeTooLarge"))
        st.draining = ([ok, refused], [10, 11])
        coord.fail(TP0, st, 14, RuntimeError("MessageSizeTooLarge (raised by a later send)"))

    asyncio.run(go())
    assert list(st.failures) == [11]
    assert st.rewinding


def test_a_fence_is_no_attempt_of_the_record_and_gives_the_partition_up() -> None:
    # Another producer took the partition's transactional id: the record is sound, and
    # counting the fence against it would dead-letter it after three. The partition is
    # marked so that its abort gives it up rather than fencing that producer back.
    coord, _ = settled(range(100), committed=10, end=100)
    emitted = Emitted()
    coord.emit_all = emitted
    rewinds: list[bool] = []

    async def rewind(tp: TP, st: PartitionState) -> None:
        rewinds.append(st.fenced)

    coord.rewind = rewind
    st = coord.partitions[TP0]

    async def go() -> None:
        for n in range(1, MAX_ATTEMPTS + 2):
            st.rewinding = False
            coord.fail(TP0, st, 11, ProducerFenced())
            await until(lambda n=n: len(rewinds) == n, "the rewind")  # type: ignore[misc]

    asyncio.run(go())
    assert st.fenced and st.rewinding
    assert rewinds and all(rewinds)
    assert st.failures == {} and coord.failures == 0 and coord.poison == 0


def test_a_fence_found_among_the_refused_sends_gives_the_partition_up() -> None:
    # The send that raised may say something else (aiokafka refuses every send once its
    # sender ended); the refused batch's fence decides.
    coord = Coordinator(Settings())
    st = coord.state(TP0)
    coord.rewind = None

    async def go() -> None:
        refused: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        refused.set_exception(ProducerFenced())
        st.draining = ([refused], [12])
        coord.fail(TP0, st, 14, RuntimeError("Can't send messages while not in transaction"))

    asyncio.run(go())
    assert st.fenced and st.rewinding
    assert st.failures == {}


class _Log:
    def __init__(self, records: set[int]) -> None:
        self.records = records

    async def first_record(self, tp: TP, start: int) -> int | None:
        later = [o for o in self.records if o >= start]
        return min(later) if later else None


def test_a_stall_is_measured_when_records_wait_or_the_broker_cannot_tell() -> None:
    from pipeline.eos.delivery import CheckUnknown

    coord, _ = settled(range(100), committed=10, end=100)
    coord.register_source(TP0.topic)
    st = coord.partitions[TP0]
    now = [1000.0]
    st.last_progress = st.last_delivery = 990.0

    async def unknown(tp: TP, start: int) -> int | None:
        raise CheckUnknown("no answer")

    async def go() -> None:
        await coord.check_partitions(lambda: now[0])
        assert st.stalled_since == 1000.0  # unknown counts as stalled
        coord._first_record = _Log(set()).first_record  # type: ignore[method-assign]
        now[0] = 1005.0
        await coord.check_partitions(lambda: now[0])
        assert st.stalled_since is None  # nothing waits: idle, not stalled
        coord._first_record = _Log({50}).first_record  # type: ignore[method-assign]
        await coord.check_partitions(lambda: now[0])
        assert st.stalled_since == 1005.0
        st.last_progress = 1006.0  # an event was processed
        now[0] = 1007.0
        await coord.check_partitions(lambda: now[0])
        assert st.stalled_since is None

    coord._first_record = unknown  # type: ignore[method-assign]
    asyncio.run(go())
