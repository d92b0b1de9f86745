"""The dedup agent: the input rekeyed by ``order_id`` -> ``orders.unique``.

Every copy of an event reaches this stage's partition of its order (see
:mod:`pipeline.agents.route`), already validated, with its ``event_id`` in a header and its
arrival time as the record timestamp. The agent asks the pure decision
(:func:`pipeline.domain.dedup.decide`) against the dedup table, writes the table and forwards
the first copy. Everything it sends and writes while handling a record commits in the
transaction of the record's source partition (see :mod:`pipeline.eos`).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from pipeline.agents.sending import agent_for, dead_letters
from pipeline.domain.dedup import (
    STREAM_KEY,
    decide,
    decode_ms,
    decode_seen,
    encode_ms,
    encode_seen,
    removable,
)
from pipeline.domain.route import EID, SRC
from pipeline.eos.stage import Out, Stage

if TYPE_CHECKING:
    from faust.types import StreamT

    from pipeline.eos.faust.store import TransactionalStore
    from pipeline.stats import Stats
    from pipeline.topology import Topology


def _header(headers: Any, name: str) -> bytes | None:
    for k, v in headers or ():
        if k == name:
            return bytes(v)
    return None


class WindowedDedup:
    """The dedup window against a table, for any stage: :func:`offer` asks the pure
    decision (:func:`pipeline.domain.dedup.decide`) about one copy, records an accepted
    one, and every ``sweep_every`` records of a partition deletes a bounded batch of
    expired ids, so the table stays bounded by the window (the stream-time row is a
    table row too: it commits, restores and moves with the partition).

    ``prefix`` goes before every id in the table: a user's ids may be any bytes, and
    must never meet the stream-time row.
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
        key = self.prefix + event_id if self.prefix else event_id
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


def make_stage(topo: Topology) -> Stage:
    settings = topo.settings
    window = WindowedDedup(
        topo.dedup_store,
        settings.dedup_window_ms,
        settings.dedup_grace_ms,
        settings.expiry_batch,
        settings.expiry_every,
        topo.app.stats,
    )
    unique_topic = topo.unique.get_topic_name()
    stats = topo.app.stats

    def handle(record: Any, out: Out) -> None:
        headers = record.headers
        event_id = _header(headers, EID)
        if event_id is None:
            # Not written by the route stage: a foreign record on an internal topic.
            raise ValueError(f"no {EID} header: not a record of the route stage")
        arrival_ms = record.timestamp
        if window.offer(out, record.partition, event_id, arrival_ms):
            src = _header(headers, SRC)
            out.send(
                unique_topic,
                record.key,
                record.value,
                arrival_ms,
                [(SRC, src)] if src is not None else None,
            )
            stats.unique += 1
        else:
            stats.duplicates_dropped += 1

    return Stage(
        "dedup",
        topo.by_order.get_topic_name(),
        handle,
        dead_letters(topo.app, topo.dlq.get_topic_name()),
    )


def make_agent(topo: Topology) -> Callable[[StreamT], Coroutine[Any, Any, None]]:
    return agent_for(topo.app, make_stage(topo))
