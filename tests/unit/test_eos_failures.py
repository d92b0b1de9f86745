"""An event whose processing raises never commits half done (issue 12, hole 1), and an
unanswered offset-gap check never stalls a partition (hole 4): the rules of
:meth:`pipeline.eos.Coordinator.run` and its admission, without a broker."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from faust.types import TP

from pipeline.eos import MAX_ATTEMPTS, CheckUnknown, Coordinator, PartitionState
from pipeline.eos import coordinator as eos
from pipeline.settings import Settings
from tests.unit.test_eos_admission import TP0, Log, Stream, ev, finished, make, until


class Rewinder:
    """What the transaction manager's rewind does, as far as the coordinator sees it:
    back to the last commit, and the partition is fetched again from there."""

    def __init__(self, coord: Coordinator, stream: Stream, offsets: list[int]) -> None:
        self.coord = coord
        self.stream = stream
        self.offsets = offsets
        self.calls = 0

    async def __call__(self, tp: TP, st: PartitionState) -> None:
        self.calls += 1
        st.processed = None
        st.expected = st.committed if st.committed is not None else st.start
        st.rewinding = False
        self.stream.put(*(ev(o) for o in self.offsets if o >= (st.expected or 0)))


def test_a_poison_event_is_tried_three_times_then_dead_lettered_and_the_rest_goes_on() -> None:
    coord, _ = make(set(range(100)), committed=10)
    handled: list[int] = []
    letters: list[tuple[int, str]] = []

    async def handle(value: Any, msg: Any) -> None:
        if msg.offset == 12:
            raise ValueError("boom " + "x" * 10_000)  # an unbounded message, bounded below
        handled.append(msg.offset)

    async def dead_letter(value: Any, msg: Any, reason: str) -> None:
        letters.append((msg.offset, reason))

    async def go() -> None:
        stream = Stream()
        rewind = Rewinder(coord, stream, [10, 11, 12, 13])
        coord.rewind = rewind
        stream.put(ev(10), ev(11), ev(12), ev(13))
        task = asyncio.ensure_future(coord.run(stream, handle, dead_letter))  # type: ignore[arg-type]
        await until(lambda: 13 in handled, "the event after the poison to be handled")
        assert rewind.calls == MAX_ATTEMPTS
        stream.queue.put_nowait(None)
        await finished(task, "the stream to end")

    asyncio.run(go())
    st = coord.partitions[TP0]
    assert letters == [(12, letters[0][1])]
    reason = letters[0][1]
    assert reason.startswith("processing failed 3 times; last error: ValueError: 'boom xxx")
    assert len(reason) < 400
    # 10 and 11 were processed again after each abort: their effects were aborted too.
    assert handled == [10, 11] * MAX_ATTEMPTS + [10, 11, 13]
    assert st.processed == 13 and not st.rewinding
    assert coord.failures == MAX_ATTEMPTS and coord.poison == 1


def test_while_a_partition_goes_back_nothing_of_it_is_processed_or_taken_as_done() -> None:
    coord, _ = make(set(range(100)), committed=10)
    handled: list[int] = []
    released = asyncio.Event()

    async def handle(value: Any, msg: Any) -> None:
        if msg.offset == 11 and not released.is_set():
            raise RuntimeError("a dependency failed")
        handled.append(msg.offset)

    async def slow_rewind(tp: TP, st: PartitionState) -> None:
        await released.wait()
        st.processed = None
        st.expected = st.start
        st.rewinding = False

    async def no_dead_letter(value: Any, msg: Any, reason: str) -> None:
        raise AssertionError("nothing here is poison")

    async def go() -> PartitionState:
        stream = Stream()
        coord.rewind = slow_rewind
        stream.put(ev(10), ev(11), ev(12), ev(13))
        task = asyncio.ensure_future(coord.run(stream, handle, no_dead_letter))  # type: ignore[arg-type]
        st = coord.partitions[TP0]
        await until(lambda: coord.skipped == 2, "12 and 13 to be skipped")
        # The failed event is not processed, nor anything after it: a commit now would
        # take the offset after 10, and 11's half-done effects are aborted, not taken.
        assert st.processed == 10 and st.rewinding and st.has_progress
        released.set()
        await until(lambda: not st.rewinding, "the rewind to end")
        stream.put(ev(10), ev(11), ev(12))
        stream.queue.put_nowait(None)
        await finished(task, "the stream to end")
        return st

    st = asyncio.run(go())
    assert handled == [10, 10, 11, 12]
    assert st.processed == 12


def test_a_commit_that_waits_for_the_gate_sees_the_failure_before_the_gate_opens() -> None:
    # The commit's snapshot (step 1) takes the gate: it must find the partition marked,
    # or it would take the failed event's table rows while its offset is left out.
    coord, _ = make(set(range(100)), committed=10)
    seen_by_commit: list[bool] = []
    commits: list[asyncio.Future[None]] = []

    async def handle(value: Any, msg: Any) -> None:
        st = coord.partitions[TP0]

        async def commit_snapshot() -> None:
            async with st.gate:
                seen_by_commit.append(st.rewinding)

        commits.append(asyncio.ensure_future(commit_snapshot()))
        await asyncio.sleep(0)  # the commit is now waiting for the gate
        raise RuntimeError("fails after the commit started waiting")

    async def never(*args: Any) -> None:
        raise AssertionError("not reached")

    async def go() -> None:
        stream = Stream()
        coord.rewind = None
        stream.put(ev(10))
        stream.queue.put_nowait(None)
        await finished(coord.run(stream, handle, never), "the stream to end")  # type: ignore[arg-type]
        await until(lambda: bool(seen_by_commit), "the commit to get the gate")

    asyncio.run(go())
    assert seen_by_commit == [True]


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


def test_an_unanswered_gap_check_never_marks_a_hole(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hole 4: a check that timed out marked a "hole" at its start offset, on a topic
    written by transactions usually a commit marker, never delivered: the partition
    skipped and re-seeked every later event, for good."""
    monkeypatch.setattr(eos, "CHECK_TIMEOUT_S", 0.05)
    # 10 is a commit marker; 11 and on are records.
    coord, log = make(set(range(11, 100)), committed=10)
    answers = {"broker": False}

    class Checker:
        """A read_committed consumer whose broker does not answer, then does."""

        def assign(self, tps: list[Any]) -> None: ...

        async def end_offsets(self, tps: list[Any]) -> dict[Any, int]:
            return dict.fromkeys(tps, 100)

        def seek(self, tp: Any, offset: int) -> None:
            self.at = offset

        async def position(self, tp: Any) -> int:
            return self.at

        async def getmany(self, tp: Any, timeout_ms: int) -> dict[Any, list[Any]]:
            if not answers["broker"]:
                await asyncio.sleep(timeout_ms / 1000 / 20)
                return {}
            records = [type("R", (), {"offset": o})() for o in range(11, 20)]
            self.at = 20
            return {tp: records}

    coord._checker = Checker()
    del coord._first_record  # the real check, not make()'s stand-in

    async def go() -> list[int]:
        stream = Stream()
        stream.put(ev(11))  # first delivery after the committed offset: a gap to check
        got: list[int] = []

        async def collect() -> None:
            async for value in coord.each(stream):  # type: ignore[arg-type]
                got.append(value)

        task = asyncio.ensure_future(collect())
        await until(lambda: coord.unknown_checks == 1, "the check to time out")
        st = coord.partitions[TP0]
        assert st.hole is None and st.expected == 10 and got == []
        await until(lambda: 10 in log.seeks, "the partition to be fetched again")
        answers["broker"] = True
        stream.put(ev(11), ev(12))  # fetched again: the check is asked again, and answers
        stream.queue.put_nowait(None)
        await finished(task, "the stream to end")
        return got

    assert asyncio.run(go()) == [11, 12]


def test_a_stall_is_measured_when_records_wait_or_the_broker_cannot_tell() -> None:
    coord, _ = make(set(range(100)), committed=10)
    coord.register_source(TP0.topic)
    st = coord.partitions[TP0]
    now = [1000.0]
    st.last_progress = st.last_delivery = 990.0

    async def unknown(tp: TP, start: int) -> int | None:
        raise CheckUnknown("no answer")

    async def go() -> None:
        await coord.check_partitions(lambda: now[0])
        assert st.stalled_since == 1000.0  # unknown counts as stalled
        coord._first_record = Log(set()).first_record  # type: ignore[method-assign]
        now[0] = 1005.0
        await coord.check_partitions(lambda: now[0])
        assert st.stalled_since is None  # nothing waits: idle, not stalled
        coord._first_record = Log({50}).first_record  # type: ignore[method-assign]
        await coord.check_partitions(lambda: now[0])
        assert st.stalled_since == 1005.0
        st.last_progress = 1006.0  # an event was processed
        now[0] = 1007.0
        await coord.check_partitions(lambda: now[0])
        assert st.stalled_since is None

    coord._first_record = unknown  # type: ignore[method-assign]
    asyncio.run(go())
