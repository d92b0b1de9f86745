"""Where a partition continues after a rebalance (:meth:`Coordinator.settle`), and what
a rewind then goes back to, without a broker."""

from __future__ import annotations

import asyncio

import pytest
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


class _StoreWithState(Store):
    transactional = True
    changelog_topic_name = "t-changelog"

    def persisted_offset(self, tp: TP) -> int | None:
        return 41  # the table holds committed state of the partition


def _filled(committed_here: int | None, monkeypatch: pytest.MonkeyPatch) -> dict[TP, int | None]:
    """``_fill_from_progress`` when the group shows no offset and the progress topic has
    no record for :data:`TP0`, whose table holds state."""
    coord = Coordinator(Settings())
    coord.stores[TP0.topic] = [_StoreWithState()]  # type: ignore[list-item]
    coord.state(TP0).committed = committed_here

    async def no_progress(tps: list[TP]) -> dict[TP, int]:
        return {}

    def fatal(message: str, exc: BaseException | None = None) -> None:
        raise SystemExit(message)

    monkeypatch.setattr(coord, "_progress", no_progress)
    monkeypatch.setattr("pipeline.eos.coordinator.fatal", fatal)
    return asyncio.run(coord._fill_from_progress({TP0: None}))


def test_our_own_commit_not_yet_visible_is_no_lost_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    # Seen in a chaos soak: a second recovery of one assignment, moments after the
    # worker's own commits, found neither the group's offset nor the progress record yet
    # (both wait for the commit markers) and ended the worker. Settle uses ours.
    assert _filled(committed_here=30, monkeypatch=monkeypatch) == {TP0: None}


def test_a_partition_with_state_and_no_offset_anywhere_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(SystemExit, match="no committed offset and no progress record"):
        _filled(committed_here=None, monkeypatch=monkeypatch)


async def test_the_end_of_a_recovery_of_an_earlier_assignment_settles_nothing() -> None:
    """Faust can end the recovery of generation 5 after generation 6 was assigned to
    the coordinator (while the new assignment's producers are still being acquired):
    settling then would process partitions whose offsets are not known yet."""
    coord = Coordinator(Settings())
    coord.unsettle()
    coord.assigned(generation=6)
    coord.state(TP0)  # acquired in generation 6
    coord.recovered({TP0: 5}, generation=5)
    assert coord._settling is None and not coord.settled
    # Generation 6's, but Faust was told to start another recovery already.
    coord.recovered({TP0: 5}, generation=6, restarting=True)
    assert coord._settling is None and not coord.settled
    coord.recovered({TP0: 5}, generation=6)
    assert coord._settling is not None
    await coord._settling
    assert coord.settled
    assert coord.partitions[TP0].expected == 5
