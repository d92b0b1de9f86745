"""A RocksDB table store that never runs ahead of committed Kafka state.

Subclass of Faust's rocksdict-backed store (it overrides ``_set``, ``_del``, ``_get``,
``_contains`` and ``apply_changelog_batch``, and reads ``_db_for_partition``, ``_dbs``
and ``_key_index``), and of Faust's table (``on_key_set``/``on_key_del`` no longer
send). In exactly-once mode, writes made while an event is processed go to an
in-memory overlay keyed by the event's source partition. Reads during processing see
the overlay first. The commit (:mod:`pipeline.eos.commit`) sends the overlay to the
changelog inside the transaction and, only after the transaction committed, writes it
to RocksDB in one write batch together with the changelog offset
(:meth:`TransactionalStore.persist`). After ``kill -9`` the store therefore holds
committed state, possibly behind the changelog (recovery replays the rest), but never a
write of an aborted transaction.

The persisted changelog offset of a partition is written only by a commit and by the
coordinator's restore and standby follower (:meth:`TransactionalStore.restore`, a
contiguous read from the previous offset), never by Faust's recovery: it always means
"every committed record up to here is applied".

Reads without a current event (web views) see committed state only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import faust
from faust import current_event
from faust.stores.rocksdb import Store as RocksStore
from faust.types import TP, EventT
from rocksdict import WriteBatch

if TYPE_CHECKING:
    from pipeline.eos.policy import Policy

_DELETED = object()


class TransactionalStore(RocksStore):
    policy: Policy | None = None

    def __init__(self, *args: Any, policy: Policy | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.policy = policy
        # Asked for every read and write: the policy is frozen, so answer once.
        self._transactional = policy is not None and policy.on("local-state")
        # source TP -> {key: value or None (delete)} of the open transaction
        self._dirty: dict[TP, dict[bytes, bytes | None]] = {}
        # source TP -> the rows of the transaction being committed: taken from _dirty
        # when its commit starts, written to RocksDB once it committed. Processing goes
        # on meanwhile (into a fresh _dirty), and its reads must still see these rows.
        self._committing: dict[TP, dict[bytes, bytes | None]] = {}
        #: partitions :meth:`restore` and the commits write; Faust's recovery must not
        self.owned: set[int] = set()

    @property
    def transactional(self) -> bool:
        return self._transactional

    @property
    def changelog_topic_name(self) -> str:
        return str(self.table.changelog_topic.get_topic_name())

    # -- the overlay --------------------------------------------------------------------

    def _overlay(self) -> tuple[dict[bytes, bytes | None], int, TP] | None:
        if not self.transactional:
            return None
        event = current_event()
        if event is None:
            return None
        tp = event.message.tp
        dirty = self._dirty.get(tp)
        if dirty is None:
            dirty = self._dirty[tp] = {}
        return dirty, event.message.partition, tp

    def _set(self, key: bytes, value: bytes | None) -> None:
        ov = self._overlay()
        if ov is None:
            super()._set(key, value)
            return
        dirty, partition, _ = ov
        dirty[key] = value
        self._key_index[key] = partition

    def _del(self, key: bytes) -> None:
        ov = self._overlay()
        if ov is None:
            super()._del(key)
            return
        dirty, _, _ = ov
        dirty[key] = None

    def _get(self, key: bytes) -> bytes | None:
        ov = self._overlay()
        if ov is not None:
            dirty, _, tp = ov
            if key in dirty:
                return dirty[key]
            committing = self._committing.get(tp)
            if committing is not None and key in committing:
                return committing[key]
        value: bytes | None = super()._get(key)
        return value

    def _contains(self, key: bytes) -> bool:
        ov = self._overlay()
        if ov is not None:
            dirty, _, tp = ov
            if key in dirty:
                return dirty[key] is not None
            committing = self._committing.get(tp)
            if committing is not None and key in committing:
                return committing[key] is not None
        return bool(super()._contains(key))

    def stage(self, tp: TP, key: bytes, value: bytes | None) -> None:
        """Write ``key`` (``None``: delete it) for a record of source partition ``tp``.

        Exactly-once: into the open transaction's overlay. Otherwise, while Faust
        delivers an event (at_least_once): through the table, so that Faust sends the
        changelog record. Otherwise (exactly-once with the ``local-state`` fix off, the
        stock behaviour a test shows the gap of): straight to RocksDB.
        """
        if self._transactional:
            dirty = self._dirty.get(tp)
            if dirty is None:
                dirty = self._dirty[tp] = {}
            dirty[key] = value
            if value is not None:
                self._key_index[key] = tp.partition
        elif current_event() is not None:
            table: Any = self.table
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value
        else:
            # Faust's own _set/_del take the partition from the current event, which a
            # batch has none of.
            db = self._db_for_partition(tp.partition)
            if value is None:
                db.delete(key)
            else:
                db.put(key, value)
                self._key_index[key] = tp.partition

    def read(self, tp: TP, key: bytes) -> bytes | None:
        """``key``'s value as a record of source partition ``tp`` sees it: the open and
        the committing transaction's writes first, then RocksDB."""
        if self._transactional:
            dirty = self._dirty.get(tp)
            if dirty is not None and key in dirty:
                return dirty[key]
            committing = self._committing.get(tp)
            if committing is not None and key in committing:
                return committing[key]
        # The partition's own database, never Faust's ``_get``: outside a Faust event
        # (a batch has none) that searches every partition, standbys included, and
        # remembers where it last found a key; a key every partition keeps (the dedup
        # stage's stream time) then read another partition's value. The search also
        # cost a RocksDB lookup per partition for a key that is nowhere yet.
        value: bytes | None = self._db_for_partition(tp.partition).get(key)
        return value

    def has_dirty(self, tp: TP) -> bool:
        """Whether the open transaction of ``tp`` has written rows not yet taken."""
        return bool(self._dirty.get(tp))

    def take_dirty(self, tp: TP) -> list[tuple[bytes, bytes | None]]:
        """The rows of the transaction now committing; later writes start a new overlay."""
        dirty = self._dirty.pop(tp, None)
        if not dirty:
            return list(self._committing.get(tp, {}).items())
        committing = self._committing.get(tp)
        if committing is None:
            self._committing[tp] = dirty
        else:  # a commit that failed with the fatal-commit fix off: carried over
            committing.update(dirty)
            dirty = committing
        return list(dirty.items())

    def persist(self, tp: TP, changelog_offset: int | None) -> None:
        """Write the committed rows of ``tp`` and its changelog offset atomically."""
        dirty = self._committing.pop(tp, None)
        if not dirty and changelog_offset is None:
            return
        db = self._db_for_partition(tp.partition)
        batch = WriteBatch(raw_mode=True)
        for key, value in (dirty or {}).items():
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        if changelog_offset is not None:
            batch.put(self.offset_key, str(changelog_offset).encode())
        db.write(batch)

    def apply_changelog_batch(
        self,
        batch: Iterable[EventT],
        to_key: Callable[[Any], Any],
        to_value: Callable[[Any], Any],
    ) -> None:
        """Write changelog records Faust's recovery read: standby copies only.

        Faust no longer reads our changelogs (the consumer keeps them paused, and
        :mod:`pipeline.eos.standby` follows the standby copies through :meth:`restore`);
        this stays a guard should a Faust path still deliver some. In exactly-once mode
        Faust's recovery never moves the persisted offset, and never writes a partition
        this worker owns: :meth:`restore` does both, from a consumer of ours. Why: Faust
        reads changelogs through the worker's shared consumer, where records fetched
        before a seek are still delivered after it, and its in-memory "last offset read"
        filter then drops the records the seek fetched again. Its standby copies
        therefore can miss ranges. Two 200,000-event chaos soaks found such a copy whose
        persisted offset had moved past the missing range (once through a standby's own
        batches, once through a batch flushed just after the partition was revoked), so
        that taking the partition over restored nothing of it and accepted copies of
        events already seen.

        So a persisted offset is only ever written by a contiguous read from the
        previous one (:meth:`restore`) or by a commit (:meth:`persist`), and "offset
        N persisted" always means "every committed record up to N is applied".
        Records at or below the persisted offset are skipped here: a stale copy
        must not overwrite a newer value. Views of a standby may be incomplete; they
        are documented as possibly stale.
        """
        if not self.transactional:
            super().apply_changelog_batch(batch, to_key, to_value)
            return
        writes: dict[int, WriteBatch] = {}
        floors: dict[int, int] = {}
        for event in batch:
            msg = event.message
            partition = msg.partition
            if partition in self.owned:
                continue
            floor = floors.get(partition)
            if floor is None:
                persisted = self.persisted_offset(msg.tp)
                floor = floors[partition] = -1 if persisted is None else persisted
            if msg.offset <= floor:
                continue
            key = msg.key
            assert key is not None, "a changelog record without its table key"
            wb = writes.get(partition)
            if wb is None:
                wb = writes[partition] = WriteBatch(raw_mode=True)
            if msg.value is None:
                wb.delete(key)
            else:
                wb.put(key, msg.value)
        for partition, wb in writes.items():
            self._db_for_partition(partition).write(wb)

    def restore(
        self, partition: int, rows: Iterable[tuple[bytes, bytes | None]], offset: int
    ) -> None:
        """Apply changelog records read contiguously after the persisted offset, up to
        and including ``offset``, and persist that offset in the same write batch."""
        batch = WriteBatch(raw_mode=True)
        for key, value in rows:
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        batch.put(self.offset_key, str(offset).encode())
        self._db_for_partition(partition).write(batch)

    def estimated_keys(self) -> int:
        """RocksDB's estimate of the committed keys over this worker's partitions."""
        total = 0
        for db in list(self._dbs.values()):
            # Includes our changelog-offset key, one per partition: negligible.
            total += int(db.property_int_value("rocksdb.estimate-num-keys") or 0)
        return total

    def discard(self, tp: TP) -> None:
        """Forget the uncommitted overlay of ``tp`` (aborted, or partition revoked)."""
        self._dirty.pop(tp, None)
        self._committing.pop(tp, None)

    def scan_partition(
        self, partition: int, start: bytes | None, limit: int
    ) -> list[tuple[bytes, bytes]]:
        """Up to ``limit`` committed rows of one partition, in key order from ``start``."""
        db = self._db_for_partition(partition)
        it = db.iter()
        if start is None:
            it.seek_to_first()
        else:
            it.seek(start)
        out: list[tuple[bytes, bytes]] = []
        while it.valid() and len(out) < limit:
            key = it.key()
            if key != self.offset_key:
                out.append((key, it.value()))
            it.next()
        return out


class EosTable(faust.Table):
    """Faust table whose changes reach the changelog through the commit, not ``send_soon``.

    In exactly-once mode the changelog records are produced by :mod:`pipeline.eos.commit` at
    commit time from the store overlay (last value per key), inside the transaction of
    the source partition. Stock ``on_key_set`` would also ``send_soon`` a record per
    write through a buffer that the commit does not flush.
    """

    def _new_store_by_url(self, url: Any) -> TransactionalStore:
        coordinator = getattr(self.app, "eos", None)
        policy = coordinator.policy if coordinator is not None else None
        options = dict(self.options or {})
        options.setdefault("driver", "rocksdict")
        return TransactionalStore(
            url,
            self.app,
            self,
            table_name=self.name,
            key_type=self.key_type,
            key_serializer=self.key_serializer,
            value_serializer=self.value_serializer,
            value_type=self.value_type,
            loop=self.loop,
            options=options,
            policy=policy,
        )

    def _changes_via_commit(self) -> bool:
        data = self.data
        return isinstance(data, TransactionalStore) and data.transactional

    def on_key_set(self, key: Any, value: Any) -> None:
        if self._changes_via_commit():
            self._sensor_on_set(self, key, value)
            return
        super().on_key_set(key, value)

    def on_key_del(self, key: Any) -> None:
        if self._changes_via_commit():
            self._sensor_on_del(self, key)
            return
        super().on_key_del(key)
