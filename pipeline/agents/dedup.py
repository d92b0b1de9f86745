"""The dedup window against a table (:class:`WindowedDedup`), for any stage of
:mod:`pipeline.api` that dedups: the order pipeline's ``dedup`` stage and users' own.

Whatever it reads and writes goes through the stage's :class:`pipeline.eos.stage.Out`,
so it commits in the transaction of the record's source partition (see
:mod:`pipeline.eos`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.domain.dedup import (
    STREAM_KEY,
    decide,
    decode_ms,
    decode_seen,
    encode_ms,
    encode_seen,
    removable,
)

if TYPE_CHECKING:
    from pipeline.eos.faust.store import TransactionalStore
    from pipeline.eos.stage import Out
    from pipeline.stats import Stats


class WindowedDedup:
    """The dedup window against a table, for any stage: :func:`offer` asks the pure
    decision (:func:`pipeline.domain.dedup.decide`) about one copy, records an accepted
    one, and every ``sweep_every`` records of a partition deletes a bounded batch of
    expired ids, so the table stays bounded by the window (the stream-time row is a
    table row too: it commits, restores and moves with the partition).

    ``prefix`` goes before every id in the table: a user's ids may be any bytes, and
    must never meet the stream-time row. Without one, an id is stored as it is unless it
    starts with a byte below 2, which is escaped with ``\x01`` (the order pipeline's ids
    have no control characters, so its table holds them as they are).
    """

    def __init__(
        self,
        store: TransactionalStore,
        window_ms: int,
        grace_ms: int,
        sweep_batch: int,
        sweep_every: int,
        stats: Stats,
        prefix: bytes = b"",
    ) -> None:
        self.store = store
        self.window_ms = window_ms
        self.grace_ms = grace_ms
        self.batch = sweep_batch
        self.every = sweep_every
        self.stats = stats
        self.prefix = prefix
        self._since_sweep: dict[int, int] = {}
        self._cursor: dict[int, bytes | None] = {}

    def offer(self, out: Out, partition: int, event_id: bytes, arrival_ms: int) -> bool:
        """Whether the copy of ``event_id`` that arrived at ``arrival_ms`` is new (then
        it is recorded); the table reads and writes go through ``out``."""
        store = self.store
        previous = decode_ms(out.get(store, STREAM_KEY))
        stream_ms = arrival_ms if previous is None else max(previous, arrival_ms)
        if stream_ms != previous:
            out.put(store, STREAM_KEY, encode_ms(stream_ms))
        if self.prefix:
            key = self.prefix + event_id
        elif not event_id or event_id[0] < 2:
            # An id that could meet the table's own row (``\x00...``) or an escaped id.
            key = b"\x01" + event_id
        else:
            key = event_id
        verdict = decide(
            decode_seen(out.get(store, key)), arrival_ms, stream_ms, self.window_ms, self.grace_ms
        )
        if verdict.unique:
            out.put(store, key, encode_seen(verdict.accepted))
        n = self._since_sweep.get(partition, 0) + 1
        if n >= self.every:
            n = 0
            self._sweep(partition, stream_ms, out)
        self._since_sweep[partition] = n
        return verdict.unique

    def _sweep(self, partition: int, stream_ms: int, out: Out) -> None:
        # Bounded work per record; removes only ids the decision already treats as
        # absent (expired), so when it runs never changes a verdict.
        store, batch = self.store, self.batch
        rows = store.scan_partition(partition, self._cursor.get(partition), batch)
        for key, _ in rows:
            if key == STREAM_KEY:
                continue
            current = decode_seen(out.get(store, key))
            if current and removable(current, stream_ms, self.window_ms, self.grace_ms):
                out.put(store, key, None)
                self.stats.expired_ids += 1
        self._cursor[partition] = rows[-1][0] + b"\x00" if len(rows) == batch else None
