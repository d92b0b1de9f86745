"""Where a partition continues after a rebalance (:meth:`Coordinator.settle`), and what
a rewind then goes back to, without a broker."""

from __future__ import annotations

import asyncio

from faust.types import TP

from pipeline.eos.coordinator import Coordinator
from pipeline.settings import Settings

TP0 = TP("orders.raw", 0)


class Store:
    """The part of a table store that settling touches."""

    def __init__(self) -> None:
        self.discarded: list[TP] = []

    def discard(self, tp: TP) -> None:
        self.discarded.append(tp)


def _settled(
    committed_here: int | None, committed_in_group: int | None
) -> tuple[Coordinator, Store]:
    coord = Coordinator(Settings())
    store = Store()
    coord.stores[TP0.topic] = [store]  # type: ignore[list-item]
    st = coord.state(TP0)
    st.committed = committed_here
    st.processed = None if committed_here is None else committed_here - 1
    asyncio.run(coord.settle({TP0: committed_in_group}))
    return coord, store


def test_a_partition_kept_continues_from_our_commit_not_yet_visible_in_the_group() -> None:
    coord, store = _settled(committed_here=30, committed_in_group=20)
    st = coord.partitions[TP0]
    assert (st.expected, st.committed, st.start) == (30, 30, 30)
    assert store.discarded == []


def test_a_partition_committed_past_our_last_commit_continues_from_there() -> None:
    """Another worker owned it in rebalances this one missed: a rewind must go back to
    that worker's commit, and nothing this one kept of the partition stays."""
    coord, store = _settled(committed_here=10, committed_in_group=20)
    st = coord.partitions[TP0]
    assert (st.expected, st.committed, st.start) == (20, 20, 20)
    assert st.processed is None
    assert store.discarded == [TP0]


def test_a_new_partition_continues_from_the_group_commit() -> None:
    coord, store = _settled(committed_here=None, committed_in_group=7)
    st = coord.partitions[TP0]
    assert (st.expected, st.committed) == (7, 7)
    assert store.discarded == []
