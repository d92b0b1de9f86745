"""The table store: records a standby applies never move the persisted offset (so a
takeover replays from the last offset known complete); an active restore's do."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from faust.types import TP

from pipeline.factory import create_app
from pipeline.settings import Settings
from tables.store import TransactionalStore

LOG = "t-store-dedup-changelog"


def _event(partition: int, offset: int, key: bytes, value: bytes | None) -> Any:
    tp = TP(LOG, partition)
    return SimpleNamespace(
        message=SimpleNamespace(tp=tp, partition=partition, offset=offset, key=key, value=value)
    )


@pytest.fixture
def store(tmp_path: Path) -> TransactionalStore:
    app = create_app(Settings(app_id="t-store", datadir=tmp_path))
    table = app.Table("dedup", key_type=bytes, value_type=bytes, partitions=8)
    data = table.data
    assert isinstance(data, TransactionalStore) and data.transactional
    # Partition 5 is a standby of this worker, partition 1 an active one.
    app.assignor = SimpleNamespace(is_standby=lambda tp: tp.partition == 5)  # type: ignore[misc,assignment]
    return data


def test_standby_records_are_applied_without_moving_the_offset(store: TransactionalStore) -> None:
    standby = TP(LOG, 5)
    store.set_persisted_offset(standby, 3552)
    store.apply_changelog_batch(
        [_event(5, 3553, b"a", b"1"), _event(5, 3554, b"b", b"2"), _event(5, 3555, b"a", None)],
        to_key=lambda k: k,
        to_value=lambda v: v,
    )
    assert store.persisted_offset(standby) == 3552
    db = store._db_for_partition(5)
    assert db.get(b"b") == b"2" and db.get(b"a") is None


def test_active_restore_moves_the_offset(store: TransactionalStore) -> None:
    active = TP(LOG, 1)
    store.apply_changelog_batch(
        [_event(1, 7, b"x", b"1"), _event(1, 9, b"y", b"2"), _event(1, 8, b"z", b"3")],
        to_key=lambda k: k,
        to_value=lambda v: v,
    )
    assert store.persisted_offset(active) == 9
    assert store._db_for_partition(1).get(b"z") == b"3"


def test_mixed_batch_moves_only_the_active_offset(store: TransactionalStore) -> None:
    store.set_persisted_offset(TP(LOG, 5), 100)
    store.apply_changelog_batch(
        [_event(5, 180, b"s", b"1"), _event(1, 40, b"t", b"2")],
        to_key=lambda k: k,
        to_value=lambda v: v,
    )
    assert store.persisted_offset(TP(LOG, 5)) == 100
    assert store.persisted_offset(TP(LOG, 1)) == 40


def _processing(tp: TP) -> Any:
    """Make ``tp``'s event the current one, as Faust does while an agent handles it."""
    import weakref

    from faust.streams import _current_event

    class Event:  # a plain class: Faust keeps a weak reference to the current event
        message = SimpleNamespace(tp=tp, partition=tp.partition)

    event = Event()
    _current_event.set(weakref.ref(event))  # type: ignore[arg-type]
    return event  # keep it alive: the context holds a weak reference


def test_rows_of_a_committing_transaction_stay_visible_until_persisted(
    store: TransactionalStore,
) -> None:
    """A commit takes the open transaction's rows (step 1) while processing goes on.

    Reads during processing see the new overlay first, then the committing rows, then
    RocksDB; RocksDB gets the committing rows only at ``persist`` (step 6), and a view
    (no current event) sees committed state only.
    """
    from faust.streams import _current_event

    src = TP("orders.raw", 1)
    keep = _processing(src)
    store._set(b"k", b"1")
    store._set(b"m", b"5")
    assert store.take_dirty(src) == [(b"k", b"1"), (b"m", b"5")]
    store._set(b"k", b"2")  # an event processed while the commit runs
    assert store._get(b"k") == b"2" and store._get(b"m") == b"5"
    assert store._contains(b"m")
    db = store._db_for_partition(1)
    assert db.get(b"k") is None and db.get(b"m") is None
    store.persist(src, 17)
    assert db.get(b"k") == b"1" and db.get(b"m") == b"5"
    assert store.persisted_offset(TP(LOG, 1)) == 17
    assert store._get(b"k") == b"2"  # still the open transaction's value
    store.discard(src)  # that transaction aborted
    assert store._get(b"k") == b"1"
    _current_event.set(None)
    assert store._get(b"k") == b"1" and store._get(b"m") == b"5"
    del keep


def test_an_aborted_commit_leaves_rocksdb_untouched(store: TransactionalStore) -> None:
    from faust.streams import _current_event

    src = TP("orders.raw", 1)
    keep = _processing(src)
    store._set(b"a", b"1")
    store.take_dirty(src)
    store._del(b"a")  # a later event deletes it: the overlay records the delete
    assert store._get(b"a") is None and not store._contains(b"a")
    store.discard(src)  # the worker lost the partition before the commit completed
    assert store._get(b"a") is None
    assert store._db_for_partition(1).get(b"a") is None
    _current_event.set(None)
    del keep
