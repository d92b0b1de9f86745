"""The standby follower's write rule (pipeline.eos.standby, rule 2) on a real table store,
without a broker: a fetched range is written only while its assignment is current, the
partition is not owned, and nobody moved the persisted offset since the follower's last
write; plus the coordinator's and the restore's side of rule 3."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from faust.types import TP

from pipeline.eos.coordinator import Coordinator
from pipeline.eos.faust.store import TransactionalStore
from pipeline.eos.restore import Restorer
from pipeline.eos.standby import StandbyFollower
from pipeline.factory import create_app
from pipeline.settings import Settings

LOG = "t-standby-dedup-changelog"
COPY = TP(LOG, 3)


async def _no_reader() -> Any:
    raise AssertionError("no consumer in these tests")


def _records(*rows: tuple[int, bytes, bytes | None]) -> list[Any]:
    # The fields of aiokafka's ConsumerRecord that the follower reads.
    return [SimpleNamespace(offset=o, key=k, value=v) for o, k, v in rows]


@pytest.fixture
def store(tmp_path: Path) -> TransactionalStore:
    app = create_app(Settings(app_id="t-standby", datadir=tmp_path))
    table = app.Table("dedup", key_type=bytes, value_type=bytes, partitions=8)
    data = table.data
    assert isinstance(data, TransactionalStore) and data.transactional
    return data


def _following(store: TransactionalStore) -> tuple[StandbyFollower, dict[TP, int | None]]:
    follower = StandbyFollower(_no_reader)
    follower._copies = {COPY: store}
    follower.remaining = {COPY: 7}
    store.restore(COPY.partition, [(b"a", b"0")], 10)
    return follower, {COPY: 10}


def test_a_range_read_after_the_persisted_offset_is_written_with_its_last_offset(
    store: TransactionalStore,
) -> None:
    follower, applied = _following(store)
    ok = follower.apply(
        COPY,
        {COPY: store},
        _records((11, b"a", b"1"), (13, b"b", b"2"), (14, b"a", None)),
        applied,
        lambda: True,
    )
    assert ok
    assert store.persisted_offset(COPY) == 14 and applied[COPY] == 14
    db = store._db_for_partition(3)
    assert db.get(b"a") is None and db.get(b"b") == b"2"
    assert follower.records == 3


def test_a_persisted_offset_moved_by_someone_else_is_never_written_behind(
    store: TransactionalStore,
) -> None:
    follower, applied = _following(store)
    # A restore (or a commit) wrote the partition up to 20 since the follower's read.
    store.restore(COPY.partition, [(b"a", b"newer")], 20)
    ok = follower.apply(COPY, {COPY: store}, _records((11, b"a", b"older")), applied, lambda: True)
    assert not ok
    assert store.persisted_offset(COPY) == 20
    assert store._db_for_partition(3).get(b"a") == b"newer"


def test_an_owned_partition_is_left_to_the_restore_and_the_commits(
    store: TransactionalStore,
) -> None:
    follower, applied = _following(store)
    store.owned.add(COPY.partition)
    ok = follower.apply(COPY, {COPY: store}, _records((11, b"a", b"late")), applied, lambda: True)
    assert not ok
    assert store._db_for_partition(3).get(b"a") == b"0"
    assert COPY not in follower.following and COPY not in follower.remaining


def test_nothing_is_written_once_a_rebalance_began_or_the_copies_changed(
    store: TransactionalStore,
) -> None:
    follower, applied = _following(store)
    rows = _records((11, b"a", b"1"))
    assert not follower.apply(COPY, {COPY: store}, rows, applied, lambda: False)
    follower._changed.set()  # follow() or stop() was called meanwhile
    assert not follower.apply(COPY, {COPY: store}, rows, applied, lambda: True)
    assert store.persisted_offset(COPY) == 10
    assert store._db_for_partition(3).get(b"a") == b"0"


def test_copies_of_an_assignment_count_as_not_current_until_measured() -> None:
    follower = StandbyFollower(_no_reader)
    follower.remaining = {COPY: 0}
    follower.stop(expected=[COPY, TP(LOG, 4)])
    assert follower.remaining_total() == 2


async def test_a_late_settle_of_an_earlier_assignment_keeps_the_current_follow() -> None:
    """A superseded assignment's settle that ends after the next one's must not make the
    follower follow for a dead epoch (it would then follow nothing)."""
    coord = Coordinator(Settings())
    coord.unsettle()
    coord.assigned(generation=1)
    stale = coord.unsettled_count
    coord.unsettle()
    coord.assigned(generation=2)
    coord.follow_standbys(coord.unsettled_count)
    assert coord.standby._current()
    coord.follow_standbys(stale)
    assert coord.standby._current()
    await coord.close()


async def test_a_restore_for_an_assignment_that_ended_reports_so() -> None:
    restorer = Restorer(_no_reader)
    assert not await restorer.restore({}, lambda: False)
    assert await restorer.restore({}, lambda: True)


def test_which_generation_an_ended_recovery_served_is_read_from_faust(tmp_path: Path) -> None:
    """EngineApp.ended_recovery reads Faust's Recovery internals: a Faust upgrade that
    renames them fails here, not in a rebalance."""
    app: Any = create_app(Settings(app_id="t-ended", datadir=tmp_path))
    recovery = app.tables.recovery
    recovery._generation_id = 7
    assert app.ended_recovery() == (7, False)
    recovery.signal_recovery_start.set()
    assert app.ended_recovery() == (7, True)
