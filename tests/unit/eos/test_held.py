"""Sends made while a partition's previous transaction commits are held, in order, and
only up to :data:`~pipeline.eos.coordinator.HELD_MAX`: then the partition's processing
waits for that commit, so a slow commit bounds the worker's memory instead of growing
it. Driven through the coordinator's own ``_process``, without a broker or a clock."""

from __future__ import annotations

import asyncio

from pipeline.eos.coordinator import HELD_MAX, SLICE
from pipeline.eos.partition import OutRecord

from .harness import TP0, Handled, Rewinder, deliver, finished, settled, until


class HoldingEmit:
    """``emit_all`` of a partition whose commit is in flight: every send is held."""

    def __init__(self, coord: object) -> None:
        self.coord = coord

    async def __call__(self, source: object, records: list[OutRecord]) -> None:
        st = self.coord.partitions[TP0]  # type: ignore[attr-defined]
        assert st.holding
        st.held.extend(records)
        return None


def test_processing_waits_for_the_commit_once_the_held_sends_reach_the_bound() -> None:
    total = HELD_MAX + 3 * SLICE
    coord, consumer = settled(range(total), committed=0, end=total)
    handled = Handled()
    stage = handled.stage()
    coord.emit_all = HoldingEmit(coord)
    st = coord.partitions[TP0]

    async def go() -> None:
        st.hold()  # the snapshot of a commit took the partition's open transaction
        batch = consumer.fetch(total)
        batch.epoch = coord.unsettled_count  # as the harness's ``deliver`` marks it
        task = asyncio.ensure_future(coord._process(stage, batch))
        await until(lambda: coord.held_waits == 1, "processing to wait for the commit")
        for _ in range(10):
            await asyncio.sleep(0)
        # Stopped at the bound, between slices: nothing past it was handled.
        assert len(st.held) == HELD_MAX and len(handled.offsets) == HELD_MAX
        assert st.processed == HELD_MAX - 1
        # The commit ends (its step 7 sends the held ones, in order): processing goes on.
        sent = [r.value for r in st.held]
        st.held.clear()
        st.hold()  # ... and the next commit has begun, holding again
        st.unheld.set()
        await finished(task, "the rest of the batch")
        assert sent == [str(o).encode() for o in range(HELD_MAX)]

    asyncio.run(go())
    assert handled.offsets == list(range(total))
    assert st.processed == total - 1


def test_a_batch_waiting_for_the_commit_stops_if_the_partition_was_rewound_meanwhile() -> None:
    """The commit fails (a refused batch, say): the partition is rewound to its last
    commit, which releases the held sends. The batch that waited must not go on with its
    later records, even though, once it runs again, the rewind is over: the partition
    fetches them again from the last commit (seen in a chaos run as events handled
    twice, the second time against state that already held the first)."""
    total = HELD_MAX + 2 * SLICE
    coord, consumer = settled(range(total), committed=0, end=total)
    handled = Handled()
    stage = handled.stage()
    coord.emit_all = HoldingEmit(coord)
    rewind = Rewinder(coord, consumer)
    st = coord.partitions[TP0]

    async def go() -> None:
        st.hold()
        batch = consumer.fetch(total)
        batch.epoch = coord.unsettled_count
        task = asyncio.ensure_future(coord._process(stage, batch))
        await until(lambda: coord.held_waits == 1, "processing to wait for the commit")
        st.rewinding = True
        await rewind(TP0, st)  # all of it, before the waiting batch runs again
        assert not st.rewinding and st.expected == 0
        await finished(task, "the waiting batch")

    asyncio.run(go())
    assert handled.offsets == list(range(HELD_MAX))  # nothing past the wait
    assert st.processed is None and st.expected == 0
    assert consumer.seeks[-1] == 0  # fetched again from the last commit


def test_a_partition_not_holding_never_waits() -> None:
    total = HELD_MAX + 2 * SLICE
    coord, consumer = settled(range(total), committed=0, end=total)
    handled = Handled()
    stage = handled.stage()
    sent: list[OutRecord] = []

    async def emit_all(source: object, records: list[OutRecord]) -> None:
        sent.extend(records)

    coord.emit_all = emit_all

    async def go() -> None:
        await finished(deliver(coord, stage, consumer.fetch(total)), "the batch")

    asyncio.run(go())
    assert len(sent) == total and coord.held_waits == 0
