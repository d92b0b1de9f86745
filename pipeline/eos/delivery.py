"""In-order, once-only delivery: what is known about which offsets hold committed
records, so that a gap in what Faust delivered is told from a transaction marker.

The admission rules themselves (:meth:`pipeline.eos.coordinator.Coordinator.each`) use
these; a batch engine that owns its fetch loop would need neither.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass

from faust.types import TP


class CheckUnknown(RuntimeError):
    """Whether a committed record lies in an offset range could not be found out."""


@dataclass
class KnownRecords:
    """Which offsets in ``[lo, hi)`` of one partition hold committed records."""

    lo: int
    hi: int
    offsets: list[int]

    def first_at_or_after(self, start: int) -> int | None:
        """The first record offset >= ``start`` if the range read holds it, else ``None``.

        ``None`` also when nothing in ``[start, hi)`` is a record: the answer then lies
        beyond what was read, and the broker is asked.
        """
        if not self.lo <= start < self.hi:
            return None
        i = bisect.bisect_left(self.offsets, start)
        return self.offsets[i] if i < len(self.offsets) else None


class FetchLedger:
    """Which offsets hold committed records, as Faust's own consumer fetched them.

    aiokafka hands out a partition's records only from its current position, skipping
    nothing but transaction markers and aborted records, and moves the position past
    what it handed out. So each fetched batch proves: in ``[first offset, position
    after)`` the committed records are exactly the batch's offsets. Batches that join
    (one ends where the next begins) form a chain, and a gap inside the chain is answered
    without asking the broker. That is the common case on a transactional topic, where
    every commit leaves a marker: without this, each first record after a marker cost a
    broker round trip under one lock (seconds of latency per hop at a trickle).

    Written from Faust's consumer thread, read from the event loop: a chain is a list
    that is only appended to and trimmed at the front, or replaced whole, and readers
    copy it first (each step is atomic under the GIL).
    """

    def __init__(self, keep: int = 256) -> None:
        self.keep = keep
        self._chains: dict[TP, list[KnownRecords]] = {}

    def note(self, tp: TP, offsets: list[int], position: int) -> None:
        """Record a batch handed out for ``tp``; ``position`` is the one after it."""
        if not offsets:
            return
        run = KnownRecords(offsets[0], max(position, offsets[-1] + 1), offsets)
        chain = self._chains.get(tp)
        if chain and chain[-1].hi == run.lo:
            chain.append(run)
            if len(chain) > self.keep:
                del chain[0]
        else:
            # After a seek (ours, or Faust's at a rebalance) nothing is known about the
            # offsets between the old chain and this batch: start over.
            self._chains[tp] = [run]

    def first_at_or_after(self, tp: TP, start: int) -> int | None:
        """The first committed offset >= ``start`` if the chain covers it, else ``None``."""
        chain = self._chains.get(tp)
        if not chain:
            return None
        runs = list(chain)
        if not runs[0].lo <= start < runs[-1].hi:
            return None
        for run in runs:
            if start >= run.hi:
                continue
            answer = run.first_at_or_after(max(start, run.lo))
            if answer is not None:
                return answer
        return None

    def forget(self, tp: TP) -> None:
        self._chains.pop(tp, None)


class PinnedReadOffsets(defaultdict[TP, int | None]):
    """Faust's per-partition "last delivered offset", with a ceiling while we wait.

    Faust's fetch loop drops every fetched record below this offset and raises it with
    each delivery; while we wait for a record Faust skipped, it must stay at or below
    that record, or the record is dropped again when our seek fetches it.
    """

    def __init__(self) -> None:
        super().__init__(lambda: None)
        self._pins: dict[TP, int] = {}

    def pin(self, tp: TP, offset: int) -> None:
        self._pins[tp] = offset
        current = self.get(tp)
        if current is not None and current > offset:
            super().__setitem__(tp, offset)

    def unpin(self, tp: TP) -> None:
        self._pins.pop(tp, None)

    def __setitem__(self, tp: TP, offset: int | None) -> None:
        pin = self._pins.get(tp)
        if pin is not None and offset is not None and offset > pin:
            offset = pin
        super().__setitem__(tp, offset)
