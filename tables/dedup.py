"""The dedup decision and its bounded window, as pure functions.

State per ``event_id`` is the record timestamp (ms) at which the id was first accepted.
A later record with the same id is a duplicate while its own timestamp is less than
``window_ms`` after that first one. Using the records' own timestamps (not the wall
clock of whichever worker processes them) makes the decision a function of the input
alone: a replay after a crash, a rebalance, or ``reconcile``'s independent rebuild all
reach the same verdicts.

Expiry (removing ids from the store and, through tombstones, from the changelog) only
removes ids that the decision already treats as expired, with a grace period for
late records, so it bounds disk and restore time without changing verdicts.
"""

from __future__ import annotations

from dataclasses import dataclass

_TS = 8


def encode_seen(first_ms: int) -> bytes:
    return first_ms.to_bytes(_TS, "big", signed=True)


def decode_seen(raw: bytes | None) -> int | None:
    if raw is None:
        return None
    return int.from_bytes(raw, "big", signed=True)


@dataclass(frozen=True, slots=True)
class Verdict:
    unique: bool
    #: new state for the id (unchanged for a duplicate)
    first_ms: int


def decide(first_ms: int | None, record_ms: int, window_ms: int) -> Verdict:
    """Is a record with timestamp ``record_ms`` the first of its ``event_id``?"""
    if first_ms is not None and record_ms - first_ms < window_ms:
        return Verdict(unique=False, first_ms=first_ms)
    return Verdict(unique=True, first_ms=record_ms)


def expired(first_ms: int, stream_ms: int, window_ms: int, grace_ms: int) -> bool:
    """May the id leave the store? Only once no in-window copy can reasonably arrive."""
    return stream_ms - first_ms >= window_ms + grace_ms


class DedupWindow:
    """Reference model of one partition's dedup state: the decision plus expiry.

    Used by ``reconcile`` and the property tests; the agent uses :func:`decide` against
    the RocksDB table directly.
    """

    def __init__(self, window_ms: int, grace_ms: int = 0) -> None:
        self.window_ms = window_ms
        self.grace_ms = grace_ms
        self.seen: dict[str, int] = {}
        self.stream_ms: int | None = None

    def offer(self, event_id: str, record_ms: int) -> bool:
        verdict = decide(self.seen.get(event_id), record_ms, self.window_ms)
        self.seen[event_id] = verdict.first_ms
        self.stream_ms = record_ms if self.stream_ms is None else max(self.stream_ms, record_ms)
        return verdict.unique

    def expire(self) -> list[str]:
        if self.stream_ms is None:
            return []
        now = self.stream_ms
        gone = [k for k, v in self.seen.items() if expired(v, now, self.window_ms, self.grace_ms)]
        for k in gone:
            del self.seen[k]
        return gone
