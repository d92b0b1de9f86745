"""In-order, once-only delivery, batch by batch.

The engine takes each source partition's records straight from the consumer's fetch,
as the batch the fetch handed out (:class:`Fetched`), before Faust would turn them into
one ``Message`` and one ``Event`` each. A fetch hands a partition's records out from its
current position and moves the position past them (and past the transaction markers and
aborted records among and after them), so a batch proves that the committed records in
``[start, end)`` are exactly its records. Delivery in order, each record once, is then a
rule over offsets alone (:func:`admit`): a batch continues the partition where it
stands, or it is stale (a seek came after its fetch), or there is a gap to seek back to.

:class:`FetchLedger` remembers which offsets hold committed records for the liveness
check (:meth:`pipeline.eos.coordinator.Coordinator.check_partitions`).
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from faust.types import TP


class Fetched(list[Any]):
    """One fetch's records of one source partition, in offset order.

    ``start`` is the partition's position when the fetch handed them out, ``end`` the
    position after (past trailing markers too); ``seeks`` counts the seeks of the
    partition made before the fetch began, and ``certain`` is False when one was made
    while it ran (then ``start`` may not be where the records begin).
    """

    __slots__ = ("behind", "certain", "end", "epoch", "seeks", "start", "tp")

    tp: TP
    start: int
    end: int
    seeks: int
    certain: bool
    #: the coordinator's assignment epoch when the fetch began (-1: not settled then)
    epoch: int
    #: offsets between ``end`` and the log's last stable offset at the fetch (0: none,
    #: or unknown)
    behind: int


class Verdict(Enum):
    #: process ``records[skip:]``; the partition continues at the batch's end
    TAKE = "take"
    #: fetched before a seek, or the seek raced the fetch: drop; the seek's target is
    #: fetched again
    STALE = "stale"
    #: nothing new: every record is below where the partition stands
    OLD = "old"
    #: the batch begins past where the partition stands: committed records in between
    #: were skipped; seek back and drop
    GAP = "gap"


def admit(batch: Fetched, expected: int, seeks_now: int) -> tuple[Verdict, int]:
    """The delivery rule for one batch of a partition that stands at ``expected``
    (its next offset to process), after ``seeks_now`` seeks of it.

    Returns the verdict and, for ``TAKE``, how many leading records to skip (records
    below ``expected``, when a batch overlaps what was processed already).
    """
    if not batch.certain or batch.seeks != seeks_now:
        return Verdict.STALE, 0
    if batch.start > expected:
        return Verdict.GAP, 0
    if batch.end <= expected:
        return Verdict.OLD, 0
    if batch.start == expected:
        return Verdict.TAKE, 0
    skip = bisect.bisect_left([r.offset for r in batch], expected)
    return Verdict.TAKE, skip


class CheckUnknown(RuntimeError):
    """Whether a committed record lies in an offset range could not be found out."""


@dataclass
class KnownRecords:
    """Which offsets in ``[lo, hi)`` of one partition hold committed records."""

    lo: int
    hi: int
    offsets: Sequence[int]

    def __post_init__(self) -> None:
        # Machine integers, 8 bytes an offset, not an int object (about 36 bytes with
        # its list slot) each: the ledger keeps up to ``keep`` batches per partition,
        # and in a 200,000-event run of the full chain it held some 400,000 offsets.
        if not isinstance(self.offsets, array):
            self.offsets = array("q", self.offsets)

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

    def note(self, tp: TP, offsets: Sequence[int], position: int) -> None:
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
