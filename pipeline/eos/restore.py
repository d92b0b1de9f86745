"""Restore: the tables of the partitions a worker processes are brought up to their
changelogs' ends before any of their events is processed.

Each changelog partition is read with a consumer of our own (``read_committed``, no
group), from the record after the store's persisted offset to the end, and each fetch
is written to RocksDB in one write batch together with the offset of its last record
(``TransactionalStore.restore``). One consumer, one seek, every record in order: the
persisted offset can only ever mean "applied up to here". Faust's recovery is told
there is nothing to read for these partitions (``SettlingConsumer.highwaters``): it
reads through the shared consumer, where stale fetches and its read-offset filter can
skip a range (see ``TransactionalStore.apply_changelog_batch``).

The end offsets are asked after this worker's ``InitProducerId`` for each source
partition (``ExactlyOnceTransactionManager._acquire``), which waited for the previous
owner's last transaction to complete or abort: nothing can be appended behind them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from faust.types import TP

from pipeline.eos.readers import OnDemand, idle, seek_after_persisted

if TYPE_CHECKING:
    from pipeline.eos.faust.store import TransactionalStore

log = logging.getLogger(__name__)

#: records asked of one fetch while restoring (one RocksDB write batch per partition)
FETCH_RECORDS = 20_000
#: ``getmany`` returns as soon as records come, or when its wait is over; a fetch that
#: brings none (only control records) leaves it waiting. A transactional changelog
#: usually ends in a commit marker (its last stable offset points just past one), so
#: a restore with nothing left but that marker waited out aiokafka's 500 ms every time
#: (0.50 s on each restore that read nothing, bench --recovery). With at most
#: MARKER_TAIL offsets left in every partition, the wait is SHORT_WAIT_MS and the
#: positions tell when the marker was passed; otherwise the long wait, which costs
#: nothing while records come.
MARKER_TAIL = 2
SHORT_WAIT_MS = 20
LONG_WAIT_MS = 500


class Restorer:
    """Restores changelog partitions with one consumer of its own (made on first use)."""

    def __init__(self, new_reader: Callable[[], Awaitable[Any]]) -> None:
        #: makes the started ``read_committed`` consumer outside the group
        self._reader = OnDemand(new_reader)
        #: one restore at a time: they share the consumer
        self._lock = asyncio.Lock()
        #: per changelog partition being restored, records still to read (for /metrics)
        self.remaining: dict[TP, int] = {}
        #: records restored by this process so far
        self.records = 0

    async def restore(
        self, owned: Mapping[TP, TransactionalStore], current: Callable[[], bool]
    ) -> bool:
        """Bring every partition of ``owned`` (changelog partition -> its store) up to
        its changelog's end. Returns False, early, once ``current()`` says a rebalance
        began: what was written stays valid, and that rebalance's restore goes on from it.
        """
        if not owned:
            return current()
        started = time.monotonic()
        count = 0
        async with self._lock:
            # Not measured yet, so not known to be done: 1 each until the ends are
            # asked (as the standby follower counts its copies). With nothing here, the
            # metric said a cold start's restore was over before it began.
            self.remaining = dict.fromkeys(owned, 1)
            consumer = await self._reader.get()
            try:
                spans = await seek_after_persisted(consumer, owned)
                pending = {ktp: span.end for ktp, span in spans.items() if span.left}
                ktps = {ktp: span.tp for ktp, span in spans.items()}
                self.remaining = {span.tp: span.left for span in spans.values() if span.left}
                while pending:
                    if not current():
                        log.info("a rebalance began while restoring (%d records applied)", count)
                        return False
                    tail = all(self.remaining[ktps[k]] <= MARKER_TAIL for k in pending)
                    batches = await consumer.getmany(
                        *pending,
                        timeout_ms=SHORT_WAIT_MS if tail else LONG_WAIT_MS,
                        max_records=FETCH_RECORDS,
                    )
                    if not current():  # the fetch waited: the assignment may be gone
                        log.info("a rebalance began while restoring (%d records applied)", count)
                        return False
                    for ktp, records in batches.items():
                        if records:
                            tp = ktps[ktp]
                            rows = [(m.key, m.value) for m in records]
                            owned[tp].restore(tp.partition, rows, int(records[-1].offset))
                            count += len(records)
                    for ktp in list(pending):
                        left = pending[ktp] - await consumer.position(ktp)
                        self.remaining[ktps[ktp]] = max(0, left)
                        if left <= 0:
                            del pending[ktp]
            finally:
                self.remaining = {}
                idle(consumer)
                self.records += count
        # Logged when nothing was left to read too: a takeover from a current standby
        # copy shows as 0 records (bench --recovery reads these lines).
        log.info(
            "restored %d changelog records of %d partitions in %.2f s",
            count,
            len(owned),
            time.monotonic() - started,
        )
        # Finished, but for this assignment only if it is still the current one.
        return current()

    async def close(self) -> None:
        await self._reader.close()
