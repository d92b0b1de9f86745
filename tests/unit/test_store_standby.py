"""The table store: records Faust's recovery applies (standby copies) never move the
persisted offset, never overwrite a newer value, and never touch a partition the
coordinator owns; only a contiguous restore and a commit move the offset."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from faust.types import TP

from pipeline.eos.faust.store import TransactionalStore
from pipeline.factory import create_app
from pipeline.settings import Settings

LOG = "t-store-dedup-changelog"


def _event(partition: int, offset: int, key: bytes, value: bytes | None) -> Any:
    tp = TP(LOG, partition)
    return SimpleNamespace(
        message=SimpleNamespace(tp=tp, partition=partition, offset=offset, key=key, value=value)
    )


def _apply(store: TransactionalStore, events: list[Any]) -> None:
    store.apply_changelog_batch(events, to_key=lambda k: k, to_value=lambda v: v)


@pytest.fixture
def store(tmp_path: Path) -> TransactionalStore:
    app = create_app(Settings(app_id="t-store", datadir=tmp_path))
    table = app.Table("dedup", key_type=bytes, value_type=bytes, partitions=8)
    data = table.data
    assert isinstance(data, TransactionalStore) and data.transactional
    return data


def test_standby_records_are_applied_without_moving_the_offset(store: TransactionalStore) -> None:
    standby = TP(LOG, 5)
    store.set_persisted_offset(standby, 3552)
    _apply(
        store,
        [_event(5, 3553, b"a", b"1"), _event(5, 3554, b"b", b"2"), _event(5, 3555, b"a", None)],
    )
    assert store.persisted_offset(standby) == 3552
    db = store._db_for_partition(5)
    assert db.get(b"b") == b"2" and db.get(b"a") is None


def test_a_batch_after_a_gap_leaves_the_offset_where_it_was(store: TransactionalStore) -> None:
    """The soak's case: a standby copy persisted at 2675 missed 2676..2849; a batch of
    2850..2883 came in after the partition had been revoked (so it was no standby any
    more). Stock handling, and ours before, moved the offset to 2883 past the gap."""
    tp = TP(LOG, 2)
    store.set_persisted_offset(tp, 2675)
    _apply(store, [_event(2, o, b"k%d" % o, b"v") for o in range(2850, 2884)])
    assert store.persisted_offset(tp) == 2675
    assert store._db_for_partition(2).get(b"k2883") == b"v"


def test_a_stale_record_never_overwrites_committed_state(store: TransactionalStore) -> None:
    tp = TP(LOG, 3)
    store.restore(3, [(b"k", b"new")], 40)
    _apply(
        store, [_event(3, 12, b"k", b"old"), _event(3, 40, b"k", b"old"), _event(3, 41, b"j", b"1")]
    )
    db = store._db_for_partition(3)
    assert db.get(b"k") == b"new" and db.get(b"j") == b"1"
    assert store.persisted_offset(tp) == 40


def test_an_owned_partition_is_written_by_the_restore_only(store: TransactionalStore) -> None:
    store.owned.add(1)
    _apply(store, [_event(1, 7, b"x", b"1"), _event(6, 7, b"x", b"2")])
    assert store._db_for_partition(1).get(b"x") is None
    assert store._db_for_partition(6).get(b"x") == b"2"  # a standby copy: applied
    store.restore(1, [(b"x", b"1"), (b"y", b"2"), (b"x", None)], 9)
    db = store._db_for_partition(1)
    assert db.get(b"x") is None and db.get(b"y") == b"2"
    assert store.persisted_offset(TP(LOG, 1)) == 9


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


def test_a_read_sees_its_own_partition_only(store: TransactionalStore) -> None:
    """A key kept in every partition (the dedup stage's stream time) or copied into a
    standby partition reads as the record's own partition has it. Outside a Faust event,
    Faust's lookup searches every partition and remembers where it last found a key."""
    store.restore(2, [(b"\x00stream", b"200")], 10)
    store.restore(5, [(b"\x00stream", b"500"), (b"only5", b"x")], 10)
    assert store.read(TP("src", 5), b"\x00stream") == b"500"
    assert store.read(TP("src", 2), b"\x00stream") == b"200"
    assert store.read(TP("src", 5), b"\x00stream") == b"500"
    assert store.read(TP("src", 2), b"only5") is None  # another partition's key
    store.stage(TP("src", 2), b"\x00stream", b"201")
    assert store.read(TP("src", 2), b"\x00stream") == b"201"  # the open transaction's
    assert store.read(TP("src", 5), b"\x00stream") == b"500"
