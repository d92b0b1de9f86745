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
