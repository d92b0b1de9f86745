"""The dedup decision and its bounded window, as pure functions.

Which time the window runs on: the broker's **append time** of each copy in
``orders.raw`` (the topic keeps ``message.timestamp.type=LogAppendTime``, see
:func:`pipeline.admin.topic_configs`). That is when a copy *arrived*, which is what the
contract's window is about ("every copy that arrives within the window after the first
copy arrived"). A producer's own timestamp is not: an outbox backlog, a MirrorMaker or
disaster-recovery replay, or a slow clock stamps a first copy days old, and a window on
producer time then let its retry through a second later; one far-future timestamp
expired every id of its partition. The worker's clock is not either: it would make the
verdicts depend on when and where a record was processed.

State of one partition of the dedup table:

* per ``event_id``: the arrival times (ms) of its accepted copies that are still live,
  each 8 bytes, in order (usually one; more only for an id re-sent further apart than
  the window);
* :data:`STREAM_KEY`: the partition's stream time, the latest arrival seen. It is a
  table row like the ids, so it commits, restores and moves with the partition:
  restarts and rebalances cannot change it.

A copy is a duplicate while it arrived within ``window_ms`` of an accepted copy (before
or after it: copies of one event that land in several input partitions reach the table
in any order). An accepted arrival ``window_ms + grace_ms`` or more before the stream
time is *expired*: it is treated as absent, whether or not the sweep has deleted it
yet, so verdicts are a function of the partition's records alone, never of sweep
timing. The grace is for copies that reach the table late because another input
partition lags: a copy delayed by more than the grace, relative to the partition's
newest, may be accepted again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from pipeline.domain.route import DeadLetter, route_record

_TS = 8

#: The row holding the partition's stream time. Ids cannot collide with it: no id has a
#: control character (``pipeline.domain.models``).
STREAM_KEY = b"\x00stream_ms"


def encode_ms(ms: int) -> bytes:
    """The stream-time row's value."""
    return ms.to_bytes(_TS, "big", signed=True)


def decode_ms(raw: bytes | None) -> int | None:
    return None if raw is None else int.from_bytes(raw[:_TS], "big", signed=True)


def encode_seen(accepted: int | list[int]) -> bytes:
    """The row of an id: its live accepted arrivals, 8 bytes each, in order."""
    if isinstance(accepted, int):
        accepted = [accepted]
    return b"".join(a.to_bytes(_TS, "big", signed=True) for a in accepted)


def decode_seen(raw: bytes | None) -> list[int]:
    if not raw:
        return []
    return [int.from_bytes(raw[i : i + _TS], "big", signed=True) for i in range(0, len(raw), _TS)]


class Verdict(NamedTuple):
    """(A named tuple: one per record; see :class:`pipeline.domain.route.Rekey`.)"""

    unique: bool
    #: the id's new state: its live accepted arrivals (unchanged for a duplicate)
    accepted: list[int]


def expired(first_ms: int, stream_ms: int, window_ms: int, grace_ms: int) -> bool:
    """Is an arrival so old that no in-window copy of it can reasonably come any more?"""
    return stream_ms - first_ms >= window_ms + grace_ms


def decide(
    accepted: list[int], arrival_ms: int, stream_ms: int, window_ms: int, grace_ms: int
) -> Verdict:
    """Is a copy that arrived at ``arrival_ms`` new? ``accepted``: the stored arrivals of
    its id's accepted copies; ``stream_ms``: the partition's stream time, this copy
    included."""
    if not accepted:  # an id not seen (or swept): most copies
        return Verdict(True, [arrival_ms])
    live = [a for a in accepted if not expired(a, stream_ms, window_ms, grace_ms)]
    if any(abs(arrival_ms - a) < window_ms for a in live):
        return Verdict(False, accepted)
    return Verdict(True, sorted([*live, arrival_ms]))


def removable(accepted: list[int], stream_ms: int, window_ms: int, grace_ms: int) -> bool:
    """May the sweep delete the id's row? When every arrival in it has expired."""
    return all(expired(a, stream_ms, window_ms, grace_ms) for a in accepted)


class DedupWindow:
    """Reference model of one partition's dedup state: the decision plus expiry.

    Used by the property tests; the agent uses :func:`decide` against the RocksDB table.
    """

    def __init__(self, window_ms: int, grace_ms: int = 0) -> None:
        self.window_ms = window_ms
        self.grace_ms = grace_ms
        self.seen: dict[str, list[int]] = {}
        self.stream_ms: int | None = None

    def offer(self, event_id: str, arrival_ms: int) -> bool:
        stream = arrival_ms if self.stream_ms is None else max(self.stream_ms, arrival_ms)
        self.stream_ms = stream
        verdict = decide(
            self.seen.get(event_id, []), arrival_ms, stream, self.window_ms, self.grace_ms
        )
        self.seen[event_id] = verdict.accepted
        return verdict.unique

    def expire(self) -> list[str]:
        if self.stream_ms is None:
            return []
        now = self.stream_ms
        gone = [k for k, v in self.seen.items() if removable(v, now, self.window_ms, self.grace_ms)]
        for k in gone:
            del self.seen[k]
        return gone


# -- validation and dedup in one step (the single-hop peers of the benchmarks) -----


@dataclass(frozen=True, slots=True)
class Forward:
    """Accept: remember ``event_id`` from ``first_ms`` on and forward the record."""

    event_id: bytes
    first_ms: int
    #: ``orders.unique`` is keyed by order_id even when the input record had no key.
    order_key: bytes


@dataclass(frozen=True, slots=True)
class Drop:
    """A duplicate inside the window."""


def decide_record(
    value: bytes | None,
    key: bytes | None,
    record_ms: int,
    where: tuple[str, int, int],
    lookup: Callable[[bytes], bytes | None],
    window_ms: int,
) -> Forward | Drop | DeadLetter:
    """Validation and dedup in one step, for one input partition's records in order.

    The single-hop form of the two stages, used where one process sees every copy in
    one sequence (the raw-loop and Quix Streams benchmark peers): the stream time is
    the record's own arrival, so nothing is expired early.
    """
    routed = route_record(value, key, where)
    if isinstance(routed, DeadLetter):
        return routed
    verdict = decide(decode_seen(lookup(routed.event_id)), record_ms, record_ms, window_ms, 0)
    if verdict.unique:
        # In one ordered sequence the latest acceptance is the only one a later copy
        # can fall within the window of: the callers store just that.
        return Forward(routed.event_id, record_ms, routed.order_key)
    return Drop()
