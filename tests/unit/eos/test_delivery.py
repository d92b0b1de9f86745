"""In-order, once-only delivery of fetched batches (:mod:`pipeline.eos.delivery` and
``Coordinator._process``), without a broker."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as hs

from pipeline.eos.coordinator import QUEUE_HIGH, Coordinator, StageRunner
from pipeline.eos.delivery import Fetched, Verdict, admit
from pipeline.settings import Settings

from .harness import TP0, Consumer, Emitted, Handled, Rec, deliver, finished, settled, until


def _batch(
    offsets: list[int], start: int, end: int, seeks: int = 0, certain: bool = True
) -> Fetched:
    b = Fetched(Rec(o) for o in offsets)
    b.tp, b.start, b.end, b.seeks, b.certain, b.epoch = TP0, start, end, seeks, certain, 0
    b.behind = 0
    return b


# -- the rule ---------------------------------------------------------------------------


def test_a_batch_that_continues_where_the_partition_stands_is_taken() -> None:
    assert admit(_batch([10, 11, 13], 10, 15), expected=10, seeks_now=0) == (Verdict.TAKE, 0)


def test_a_batch_past_where_the_partition_stands_is_a_gap() -> None:
    assert admit(_batch([12, 13], 12, 14), expected=10, seeks_now=0) == (Verdict.GAP, 0)


def test_a_batch_overlapping_what_was_processed_is_taken_from_the_next_offset() -> None:
    assert admit(_batch([8, 9, 11, 12], 8, 13), expected=10, seeks_now=0) == (Verdict.TAKE, 2)


def test_a_batch_below_where_the_partition_stands_is_old() -> None:
    assert admit(_batch([5, 6], 5, 8), expected=10, seeks_now=0) == (Verdict.OLD, 0)


def test_a_batch_fetched_before_a_seek_or_racing_one_is_stale() -> None:
    assert admit(_batch([10], 10, 11, seeks=1), expected=10, seeks_now=2)[0] is Verdict.STALE
    assert admit(_batch([10], 10, 11, certain=False), expected=10, seeks_now=0)[0] is (
        Verdict.STALE
    )


# -- through the coordinator ------------------------------------------------------------


def _run(coord: Coordinator, stage_of: Handled, *batches: Fetched) -> Emitted:
    emitted = Emitted()
    coord.emit_all = emitted
    asyncio.run(deliver(coord, stage_of.stage(), *batches))
    return emitted


def test_batches_from_the_committed_offset_are_handled_once_in_order() -> None:
    coord, consumer = settled(range(100), committed=10, end=100)
    handled = Handled()
    emitted = _run(coord, handled, consumer.fetch(5), consumer.fetch(5))
    assert handled.offsets == list(range(10, 20))
    assert emitted.values() == [str(o).encode() for o in range(10, 20)]
    st = coord.partitions[TP0]
    assert st.processed == 19 and st.expected == 20 and st.events == 10


def test_markers_between_and_after_records_are_passed_over() -> None:
    records = [10, 11, 14, 15, 19]  # 12, 13, 16-18: markers or aborted records
    coord, consumer = settled(records, committed=10, end=21)
    handled = Handled()
    _run(coord, handled, consumer.fetch(2), consumer.fetch(2), consumer.fetch(9))
    assert handled.offsets == records
    assert coord.partitions[TP0].expected == 21


def test_a_batch_fetched_before_a_seek_is_dropped() -> None:
    coord, consumer = settled(range(100), committed=10, end=100)
    stale = consumer.fetch(5)  # 10..14, then the partition goes back to 10
    asyncio.run(consumer.seek_wait({TP0: 10}))
    handled = Handled()
    _run(coord, handled, stale, consumer.fetch(3))
    assert handled.offsets == [10, 11, 12]
    assert coord.skipped == 5


def test_a_gap_is_fetched_again_and_nothing_past_it_is_processed() -> None:
    coord, consumer = settled(range(100), committed=10, end=100)
    consumer.position = 15  # a position moved past 10..14 without our seek
    handled = Handled()

    async def go() -> None:
        coord.emit_all = Emitted()
        stage = handled.stage()
        await deliver(coord, stage, consumer.fetch(3))
        await until(lambda: consumer.seeks == [10, 10], "the seek back to 10")
        await deliver(coord, stage, consumer.fetch(6))

    asyncio.run(go())
    assert handled.offsets == [10, 11, 12, 13, 14, 15]
    assert coord.reseeks == 1


def test_batches_before_the_assignment_settled_are_dropped() -> None:
    coord, consumer = settled(range(100), committed=10, end=100)
    coord.unsettle()  # a rebalance started
    handled = Handled()
    _run(coord, handled, consumer.fetch(5))
    assert handled.offsets == [] and coord.skipped == 5


def test_a_batch_of_a_partition_not_ours_is_dropped() -> None:
    coord, consumer = settled(range(100), committed=10, end=100)
    other = consumer.fetch(5)
    other.tp = TP0._replace(partition=1)
    handled = Handled()
    _run(coord, handled, other)
    assert handled.offsets == []


def test_processed_batches_are_activity_and_stale_ones_are_not() -> None:
    coord, consumer = settled(range(100), committed=10, end=100)
    stale = consumer.fetch(2)
    asyncio.run(consumer.seek_wait({TP0: 10}))
    _run(coord, Handled(), stale)
    assert not coord.activity.is_set()
    _run(coord, Handled(), consumer.fetch(2))
    assert coord.activity.is_set() and coord.last_done > 0


@settings(max_examples=200, deadline=None)
@given(
    markers=hs.sets(hs.integers(0, 79), max_size=30),
    plan=hs.lists(
        hs.tuples(hs.sampled_from(["fetch", "fetch", "fetch", "stale", "seek"]), hs.integers(1, 9)),
        max_size=60,
    ),
)
def test_every_committed_record_is_handled_once_in_order(
    markers: set[int], plan: list[tuple[str, int]]
) -> None:
    """Whatever the batch sizes, markers, batches fetched before seeks, and seeks
    elsewhere (Faust's own), each committed record is handled once, in order."""
    records = [o for o in range(80) if o not in markers]
    coord, consumer = settled(records, committed=0, end=80)
    handled = Handled()
    stage = handled.stage()
    coord.emit_all = Emitted()
    held: list[Fetched] = []

    async def go() -> None:
        for action, n in plan:
            if action == "fetch":
                await deliver(coord, stage, consumer.fetch(n, past_markers=n % 2 == 0))
            elif action == "stale":
                held.append(consumer.fetch(n))  # fetched now, delivered after a seek
                await consumer.seek_wait({TP0: max(0, consumer.position - n)})
            else:  # a seek we did not make, anywhere
                await consumer.seek_wait({TP0: n * 9})
            if held and action != "stale":
                await deliver(coord, stage, held.pop())
            await asyncio.sleep(0)  # a gap's seek back runs
        for _ in range(200):  # then read on to the end
            await deliver(coord, stage, consumer.fetch(9))
            await asyncio.sleep(0)
            if coord.partitions[TP0].expected == 80:
                break

    asyncio.run(go())
    assert handled.offsets == records


# -- from the fetch loop to the stage ---------------------------------------------------


def test_the_fetch_loop_waits_while_a_stage_is_full_and_goes_on_when_it_drains() -> None:
    coord = Coordinator(Settings())
    runner = coord.add_stage(Handled().stage())
    assert isinstance(runner, StageRunner)

    async def go() -> None:
        big = _batch(list(range(QUEUE_HIGH + 1)), 0, QUEUE_HIGH + 1)
        delivering = asyncio.ensure_future(coord.deliver([big], lambda: False))
        await asyncio.sleep(0.1)
        assert not delivering.done()  # the stage has more queued than it may
        await runner.get()
        await finished(delivering, "the delivery once the stage took the batch")

    asyncio.run(go())


def test_a_rebalance_ends_the_wait_of_the_fetch_loop() -> None:
    coord = Coordinator(Settings())
    coord.add_stage(Handled().stage())
    stopping = [False]

    async def go() -> None:
        big = _batch(list(range(QUEUE_HIGH + 1)), 0, QUEUE_HIGH + 1)
        delivering = asyncio.ensure_future(coord.deliver([big], lambda: stopping[0]))
        await asyncio.sleep(0.1)
        assert not delivering.done()
        stopping[0] = True
        await finished(delivering, "the delivery once a rebalance stops the flow")

    asyncio.run(go())


def test_consumer_harness_models_markers() -> None:
    consumer = Consumer([0, 1, 5], end=8)
    first = consumer.fetch(2)
    assert (first.start, first.end, [r.offset for r in first]) == (0, 5, [0, 1])
    last = consumer.fetch(9)
    assert (last.start, last.end, [r.offset for r in last]) == (5, 8, [5])
