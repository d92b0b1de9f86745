"""Standby copies: each worker keeps its standby changelog partitions current with a
consumer of its own, so that taking a partition over restores only what the copy had
not applied yet.

Faust's own standby path is not used in exactly-once mode. It read the standby
changelogs through the worker's shared consumer, one Faust event per record (4,000 to
5,000 records/s measured), and while a new copy caught up the worker's own partitions
got no deliveries: a takeover of a partition whose copy was current still waited
minutes for its first commit (``docs/benchmarks.md``, "Recovery with big state"). And
its writes could not move the persisted offset (see
``TransactionalStore.apply_changelog_batch``), so the copy saved nothing at takeover.

The rules, each checked where it is applied:

1. A copy is written only with records read contiguously after its persisted offset,
   together with the offset of the last one, in one write batch
   (``TransactionalStore.restore``): the same write as the restore, so "offset N
   persisted" keeps meaning "every committed record up to N is applied".
2. Just before each write, in the same synchronous step: the partition is still a
   standby copy of the current assignment (no rebalance began), it is not owned, and
   its persisted offset is still the one this follower last wrote. Anything else
   (a restore, a commit, a new assignment) moved it: the fetched records are dropped and
   reading starts again from the store's persisted offset.
3. A copy is followed from the end of its assignment's restore
   (:meth:`~pipeline.eos.coordinator.Coordinator.restore`) until the next rebalance
   begins, never while a restore of the same store runs.
4. Second to the worker's own partitions: reading starts :data:`START_DELAY_S` after
   the restore (the new assignment's first commit goes first), at most
   :data:`FETCH_RECORDS` records are read per fetch, and after applying a fetch the
   follower waits as long as applying took, so that a copy catching up takes at most
   about half of the event loop.

An error (a broker away, a timeout) is logged and the follower starts over after
:data:`RETRY_S`: a copy that lags costs time at takeover, never correctness, and
``pipeline_restore_remaining_records{kind="standby"}`` shows the lag.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from faust.types import TP

from pipeline.eos.readers import OnDemand, idle, seek_after_persisted

if TYPE_CHECKING:
    from pipeline.eos.faust.store import TransactionalStore

log = logging.getLogger(__name__)

#: records asked of one fetch (one RocksDB write batch per partition and fetch)
FETCH_RECORDS = 5_000
#: pause before starting over after an error
RETRY_S = 1.0
#: wait after an assignment's restore before its copies are read (rule 4)
START_DELAY_S = 1.0
#: longest wait after one fetch was applied (rule 4)
MAX_PAUSE_S = 0.1


class StandbyFollower:
    """Keeps standby copies current (see the module's rules)."""

    def __init__(self, new_reader: Callable[[], Awaitable[Any]]) -> None:
        #: makes a started ``read_committed`` consumer outside the group
        self._reader = OnDemand(new_reader)
        #: the copies to keep (changelog partition -> its store), and while which
        #: assignment: ``current()`` turns False for good when a rebalance begins
        self._copies: dict[TP, TransactionalStore] = {}
        self._current: Callable[[], bool] = lambda: False
        self._changed = asyncio.Event()
        self._task: asyncio.Future[None] | None = None
        #: per copy, records not applied yet; None until first measured
        self.remaining: dict[TP, int | None] = {}
        #: records applied to copies by this process so far
        self.records = 0
        #: times the follower started over after an error
        self.errors = 0
        #: waiting for copies to follow: it reads and writes nothing meanwhile
        self.idle = False

    def follow(self, copies: Mapping[TP, TransactionalStore], current: Callable[[], bool]) -> None:
        """Keep ``copies`` current while ``current()`` holds (rule 3)."""
        self._copies = dict(copies)
        self._current = current
        self.remaining = {tp: self.remaining.get(tp) for tp in copies}
        self._changed.set()
        if self._task is None and copies:
            self._task = asyncio.ensure_future(self._run())

    def stop(self, expected: Iterable[TP] = ()) -> None:
        """Follow nothing until the next :meth:`follow`; ``expected`` are the copies it
        will be given, counted as not known to be current until then."""
        self._copies = {}
        self._current = lambda: False
        self.remaining = {tp: None for tp in expected}
        self._changed.set()

    @property
    def following(self) -> dict[TP, TransactionalStore]:
        return dict(self._copies)

    def remaining_total(self) -> int:
        """Records the copies have not applied yet, for /metrics. A copy not measured
        yet counts as 1: it is not known to be current."""
        return sum(1 if n is None else n for n in self.remaining.values())

    async def _run(self) -> None:
        while True:
            self._changed.clear()
            copies, current = self._copies, self._current
            if not copies or not current():
                if self._reader.made:
                    idle(await self._reader.get())
                self.idle = True
                await self._changed.wait()
                self.idle = False
                continue
            try:
                await asyncio.wait_for(self._changed.wait(), START_DELAY_S)
                continue  # the copies changed meanwhile
            except TimeoutError:
                pass
            try:
                await self._follow(copies, current)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.errors += 1
                log.warning(
                    "standby copies: %s: %s; starting over in %.0f s with a new consumer",
                    type(exc).__name__,
                    exc,
                    RETRY_S,
                )
                # Not known any more how far the copies are; and a consumer that failed
                # once is not trusted with the next round.
                self.remaining = {tp: None for tp in self.remaining}
                await self._reader.close(quiet=True)
                await asyncio.sleep(RETRY_S)

    async def _follow(
        self, copies: dict[TP, TransactionalStore], current: Callable[[], bool]
    ) -> None:
        """Read ``copies`` from their persisted offsets on, until they change, a rebalance
        begins, or a copy was written by someone else (then the caller starts over)."""
        consumer = await self._reader.get()
        spans = await seek_after_persisted(consumer, copies)
        ktps = {ktp: span.tp for ktp, span in spans.items()}
        ends = {ktp: span.end for ktp, span in spans.items()}
        #: per copy, the persisted offset this follower last saw or wrote (rule 2)
        applied = {span.tp: span.persisted for span in spans.values()}
        for span in spans.values():
            if span.tp in self.remaining:
                self.remaining[span.tp] = span.left
        loop = asyncio.get_running_loop()
        while not self._changed.is_set() and current():
            batches = await consumer.getmany(*ktps, timeout_ms=500, max_records=FETCH_RECORDS)
            began = loop.time()
            for ktp, records in batches.items():
                if records and not self.apply(ktps[ktp], copies, records, applied, current):
                    return
            for ktp, tp in ktps.items():
                if tp not in self.remaining:
                    continue
                # The fetch's last stable offset; the end read at the start until then.
                stable = consumer.last_stable_offset(ktp)
                end = int(ends[ktp]) if stable is None or stable < 0 else int(stable)
                self.remaining[tp] = max(0, end - await consumer.position(ktp))
            # Rule 4: as long again as applying took, or at least one turn of the loop.
            await asyncio.sleep(min(loop.time() - began, MAX_PAUSE_S) if batches else 0)

    def apply(
        self,
        tp: TP,
        copies: Mapping[TP, TransactionalStore],
        records: Sequence[Any],
        applied: dict[TP, int | None],
        current: Callable[[], bool],
    ) -> bool:
        """Write ``records`` (read contiguously after ``applied[tp]``) to ``tp``'s copy,
        if rule 2 allows; False when the caller must stop and read again."""
        store = copies[tp]
        # Rule 2: checked and written with no await in between (this is not a coroutine).
        if self._changed.is_set() or not current():
            return False
        if tp.partition in store.owned:
            # Processed here now: the restore and the commits keep it.
            log.info("%s is owned: no longer followed as a standby copy", tp)
            self._copies.pop(tp, None)
            self.remaining.pop(tp, None)
            return False
        if store.persisted_offset(tp) != applied[tp]:
            log.info("standby copy %s was written elsewhere: reading it again", tp)
            return False
        last = int(records[-1].offset)
        store.restore(tp.partition, [(m.key, m.value) for m in records], last)
        applied[tp] = last
        self.records += len(records)
        return True

    async def close(self) -> None:
        self.stop()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception:  # its errors were logged where they happened
                pass
            self._task = None
        await self._reader.close()
