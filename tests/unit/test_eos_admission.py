"""The delivery rules of :meth:`pipeline.eos.Coordinator.each`, without a broker.

The log is modelled by a dict ``offset -> committed record?``; the integration tests run
the same code against the real broker and Faust.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import pytest
from faust.types import TP

from pipeline.eos import Coordinator, KnownRecords
from pipeline.settings import Settings

TP0 = TP("orders.raw", 0)
T = TypeVar("T")


@dataclass
class _Msg:
    tp: TP
    offset: int


@dataclass
class _Event:
    message: _Msg


def ev(offset: int, tp: TP = TP0) -> _Event:
    return _Event(_Msg(tp, offset))


class Stream:
    """The part of a Faust stream that ``Coordinator.each`` uses, fed from a queue."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[_Event | None] = asyncio.Queue()
        self.current_event: _Event | None = None

    def put(self, *events: _Event) -> None:
        for e in events:
            self.queue.put_nowait(e)

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> int:
        await asyncio.sleep(0)  # a real stream yields to the loop; a hole watcher runs
        event = await self.queue.get()
        if event is None:
            raise StopAsyncIteration
        self.current_event = event
        return event.message.offset


#: Only a hang ends a wait this long; no verdict depends on it.
HANG_S = 30.0


async def until(cond: Callable[[], bool], what: str) -> None:
    """Yield to the loop until ``cond()``; fail after :data:`HANG_S`, naming ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANG_S
    while not cond():
        assert loop.time() < deadline, f"waited {HANG_S:.0f} s for {what}"
        await asyncio.sleep(0.001)


async def finished(aw: Awaitable[T], what: str) -> T:
    """Await ``aw``; fail after :data:`HANG_S`, naming ``what``."""
    try:
        return await asyncio.wait_for(aw, HANG_S)
    except TimeoutError:
        raise AssertionError(f"waited {HANG_S:.0f} s for {what}") from None


async def collect(coord: Coordinator, stream: Stream) -> list[int]:
    out = []
    async for value in coord.each(stream):  # type: ignore[arg-type]
        out.append(value)
    return out


class Log:
    """Committed records of one partition; other offsets are markers or aborted."""

    def __init__(self, records: set[int]) -> None:
        self.records = records
        self.seeks: list[int] = []

    async def first_record(self, tp: TP, start: int) -> int | None:
        later = [o for o in self.records if o >= start]
        return min(later) if later else None

    async def beginnings(self, tps: list[TP]) -> dict[TP, int]:
        return {tp: min(self.records) for tp in tps}

    async def seek_wait(self, offsets: dict[TP, int]) -> None:
        self.seeks.extend(offsets.values())


def make(records: set[int], committed: int | None) -> tuple[Coordinator, Log]:
    coord = Coordinator(Settings())
    log = Log(records)
    coord._first_record = log.first_record  # type: ignore[method-assign]
    coord.beginnings = log.beginnings  # type: ignore[method-assign]
    coord.seek_wait = log.seek_wait  # type: ignore[assignment]
    coord.state(TP0)
    asyncio.run(coord.settle({TP0: committed}))
    return coord, log


def admitted(coord: Coordinator, offsets: list[int]) -> list[int]:
    async def go() -> list[int]:
        stream = Stream()
        stream.put(*(ev(o) for o in offsets))
        stream.queue.put_nowait(None)
        return await collect(coord, stream)

    return asyncio.run(go())


def test_in_order_delivery_from_the_committed_offset_is_admitted() -> None:
    coord, log = make(set(range(100)), committed=10)
    assert admitted(coord, list(range(10, 20))) == list(range(10, 20))
    assert log.seeks == []


def test_stale_copies_below_the_committed_offset_are_skipped() -> None:
    coord, _ = make(set(range(100)), committed=10)
    assert admitted(coord, [5, 6, 7, 8, 9, 10, 11, 3, 12]) == [10, 11, 12]
    assert coord.skipped == 6


def test_gap_of_markers_is_accepted() -> None:
    # 12 and 13 are transaction markers: no committed record between 11 and 14.
    coord, log = make({10, 11, 14, 15}, committed=10)
    assert admitted(coord, [10, 11, 14, 15]) == [10, 11, 14, 15]
    assert log.seeks == []


def test_a_dropped_record_stops_the_partition_until_it_is_fetched_again() -> None:
    coord, log = make(set(range(100)), committed=10)
    # Faust delivers 10, then jumps to 40 (11..39 dropped), then redelivers from 11.
    got = admitted(coord, [10, 40, 41, 42, 11, 12, 13])
    assert got == [10, 11, 12, 13]
    assert log.seeks == [11]  # one seek back (rate-limited), to the first missing record
    assert coord.reseeks == 1


def test_first_delivery_after_the_seek_must_be_the_committed_record() -> None:
    coord, log = make(set(range(100)), committed=10)
    assert admitted(coord, [25, 26, 10, 11]) == [10, 11]
    assert log.seeks == [10]


def test_without_a_committed_offset_processing_starts_at_the_log_start() -> None:
    coord, log = make(set(range(3, 100)), committed=None)
    assert admitted(coord, [3, 4, 5]) == [3, 4, 5]
    assert log.seeks == []
    coord, log = make(set(range(3, 100)), committed=None)
    assert admitted(coord, [9, 3, 4]) == [3, 4]
    assert log.seeks == [3]


def test_events_before_the_recovery_ends_are_skipped_then_fetched_again() -> None:
    """Held back, an event would stay unacknowledged and block Faust's revoke; skipped,
    it comes again after the seek that settling does."""
    coord = Coordinator(Settings())
    coord.state(TP0)
    log = Log(set(range(100)))
    coord._first_record = log.first_record  # type: ignore[method-assign]
    coord.seek_wait = log.seek_wait  # type: ignore[assignment]

    async def go() -> list[int]:
        stream = Stream()
        stream.put(ev(10))
        task = asyncio.ensure_future(collect(coord, stream))
        await until(lambda: coord.skipped == 1, "the early event to be skipped")
        assert stream.queue.empty() and not task.done()  # taken, and let go at once
        coord.recovered({TP0: 10})
        assert coord._settling is not None, "recovered() started no settling"
        await finished(coord._settling, "the settling to end")
        assert coord.settled
        assert coord._reseek_task is not None, "settling started no seek"
        await finished(coord._reseek_task, "the seek after settling to end")
        assert log.seeks == [10]  # settling fetches every partition again
        stream.put(ev(10), ev(11), ev(12))  # after that seek
        stream.queue.put_nowait(None)
        return await finished(task, "the stream to end")

    assert asyncio.run(go()) == [10, 11, 12]
    assert coord.skipped == 1


def test_an_event_of_a_partition_that_is_not_ours_is_skipped() -> None:
    # Seen in a two-worker run: records of a just-revoked partition were still
    # delivered; they must neither be processed nor create state for the partition.
    coord, _ = make(set(range(100)), committed=10)
    other = TP("orders.raw", 5)

    async def go() -> list[int]:
        stream = Stream()
        stream.put(ev(10), ev(30, other), ev(11))
        stream.queue.put_nowait(None)
        return await collect(coord, stream)

    assert asyncio.run(go()) == [10, 11]
    assert other not in coord.partitions


def test_a_rebalance_during_the_broker_check_drops_the_event() -> None:
    """The gap check waits on the broker; a rebalance and its revoke commit can happen
    meanwhile. The event must not be processed into the next transaction."""
    coord, _ = make(set(range(100)), committed=10)
    release = asyncio.Event()
    checking = asyncio.Event()

    async def slow_first_record(tp: TP, start: int) -> int | None:
        checking.set()
        await release.wait()
        return None  # no committed record in between: the jump would be fine

    coord._first_record = slow_first_record  # type: ignore[method-assign]

    async def go() -> list[int]:
        stream = Stream()
        stream.put(ev(12))  # 10, 11 are markers in this story
        task = asyncio.ensure_future(collect(coord, stream))
        # Not skipped on the way in: the event is inside the broker check.
        await finished(checking.wait(), "the event to reach the broker check")
        assert coord.skipped == 0
        coord.unsettle()  # the rebalance starts while the check is out
        release.set()
        stream.queue.put_nowait(None)
        return await finished(task, "the stream to end")

    assert asyncio.run(go()) == []
    assert coord.skipped == 1
    assert coord.partitions[TP0].expected == 10  # not taken as processed either


def test_the_end_of_a_superseded_recovery_does_not_settle() -> None:
    coord = Coordinator(Settings())
    coord.state(TP0)
    coord.unsettle()
    coord.assigned()
    coord.unsettle()  # the next rebalance started before this recovery ended

    async def go() -> None:
        coord.recovered({TP0: 10})

    asyncio.run(go())
    assert coord._settling is None, "a superseded recovery started settling"
    assert not coord.settled


def test_a_rebalance_while_settling_leaves_it_unsettled() -> None:
    coord = Coordinator(Settings())
    coord.state(TP0)

    async def slow_beginnings(tps: list[TP]) -> dict[TP, int]:
        coord.unsettle()  # the next rebalance starts while we ask the broker
        return dict.fromkeys(tps, 0)

    coord.beginnings = slow_beginnings  # type: ignore[method-assign]
    asyncio.run(coord.settle({TP0: None}))
    assert not coord.settled


@pytest.mark.parametrize("committed", [0, 7])
def test_every_committed_record_is_admitted_exactly_once_in_order(committed: int) -> None:
    """A messy delivery (stale copies, a dropped range, a re-delivery) still yields the
    log in order, each record once."""
    records = set(range(0, 60)) - {20, 21, 40}  # 20, 21, 40: markers
    coord, _ = make(records, committed=committed)
    delivery = (
        list(range(0, 15))  # stale pre-seek batch, partly below the committed offset
        + list(range(committed, 30))  # the seek's fetch
        + list(range(45, 50))  # a stale batch from ahead: 30..44 dropped by Faust
        + list(range(30, 60))  # fetched again after our seek
    )
    got = admitted(coord, [o for o in delivery if o in records])
    assert got == sorted(o for o in records if o >= committed)


def test_known_records_answer_gaps_inside_the_range_read() -> None:
    known = KnownRecords(10, 20, [10, 11, 14, 19])
    assert known.first_at_or_after(12) == 14
    assert known.first_at_or_after(14) == 14
    assert known.first_at_or_after(15) == 19
    # outside the range read, or nothing after start inside it: ask the broker
    assert known.first_at_or_after(9) is None
    assert known.first_at_or_after(20) is None
    assert KnownRecords(10, 20, [10, 11]).first_at_or_after(12) is None
