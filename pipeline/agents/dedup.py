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

    from pipeline.topology import Topology


def _header(headers: Any, name: str) -> bytes | None:
    for k, v in headers or ():
        if k == name:
            return bytes(v)
    return None


def make_stage(topo: Topology) -> Stage:
    settings = topo.settings
    window_ms = settings.dedup_window_ms
    grace_ms = settings.dedup_grace_ms
    batch = settings.expiry_batch
    sweep_every = settings.expiry_every
    store = topo.dedup_store
    unique_topic = topo.unique.get_topic_name()
    stats = topo.app.stats
    since_sweep: dict[int, int] = {}
    cursor: dict[int, bytes | None] = {}

    def sweep(partition: int, stream_ms: int, out: Out) -> None:
        # Bounded work per record; removes only ids the decision already treats as
        # absent (expired), so when it runs never changes a verdict.
        rows = store.scan_partition(partition, cursor.get(partition), batch)
        for key, _ in rows:
            if key.startswith(b"\x00"):
                continue  # the stream-time row
            current = decode_seen(out.get(store, key))
            if current and removable(current, stream_ms, window_ms, grace_ms):
                out.put(store, key, None)
                stats.expired_ids += 1
        cursor[partition] = rows[-1][0] + b"\x00" if len(rows) == batch else None

    def handle(record: Any, out: Out) -> None:
        headers = record.headers
        event_id = _header(headers, EID)
        if event_id is None:
            # Not written by the route stage: a foreign record on an internal topic.
            raise ValueError(f"no {EID} header: not a record of the route stage")
        arrival_ms = record.timestamp
        previous = decode_ms(out.get(store, STREAM_KEY))
        stream_ms = arrival_ms if previous is None else max(previous, arrival_ms)
        if stream_ms != previous:
            out.put(store, STREAM_KEY, encode_ms(stream_ms))
        verdict = decide(
            decode_seen(out.get(store, event_id)), arrival_ms, stream_ms, window_ms, grace_ms
        )
        if verdict.unique:
            out.put(store, event_id, encode_seen(verdict.accepted))
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
        p = record.partition
        n = since_sweep.get(p, 0) + 1
        if n >= sweep_every:
            n = 0
            sweep(p, stream_ms, out)
        since_sweep[p] = n

    return Stage(
        "dedup",
        topo.by_order.get_topic_name(),
        handle,
        dead_letters(topo.app, topo.dlq.get_topic_name()),
    )


def make_agent(topo: Topology) -> Callable[[StreamT], Coroutine[Any, Any, None]]:
    return agent_for(topo.app, make_stage(topo))
