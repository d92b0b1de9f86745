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

from aiokafka import TopicPartition
from faust.types import TP

if TYPE_CHECKING:
    from pipeline.eos.faust.store import TransactionalStore

log = logging.getLogger(__name__)

#: records asked of one fetch while restoring (one RocksDB write batch per partition)
FETCH_RECORDS = 20_000


class Restorer:
    """Restores changelog partitions with one consumer of its own (made on first use)."""

    def __init__(self, new_reader: Callable[[], Awaitable[Any]]) -> None:
        #: makes the started ``read_committed`` consumer outside the group
        self._new_reader = new_reader
        self._consumer: Any = None
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
            if self._consumer is None:
                self._consumer = await self._new_reader()
            consumer = self._consumer
            try:
                ktps = {TopicPartition(tp.topic, tp.partition): tp for tp in owned}
                # Asked before assigning: once assigned, the consumer's fetches (long
                # polls of up to 500 ms) go first on the broker's connection, and each
                # of these two requests can wait for one (measured with a lone
                # consumer: 0.8 and 0.5 s after a re-assign, 0.002 s before).
                ends = await consumer.end_offsets(list(ktps))
                begins = await consumer.beginning_offsets(list(ktps))
                consumer.assign(list(ktps))
                pending: dict[TopicPartition, int] = {}
                for ktp, tp in ktps.items():
                    persisted = owned[tp].persisted_offset(tp)
                    start = max(int(begins[ktp]), 0 if persisted is None else persisted + 1)
                    if start < int(ends[ktp]):
                        consumer.seek(ktp, start)
                        pending[ktp] = int(ends[ktp])
                        self.remaining[tp] = int(ends[ktp]) - start
                while pending:
                    if not current():
                        log.info("a rebalance began while restoring (%d records applied)", count)
                        return False
                    batches = await consumer.getmany(
                        *pending, timeout_ms=500, max_records=FETCH_RECORDS
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
                # Paused, or its fetcher goes on prefetching them. Not unsubscribed:
                # aiokafka's fetcher fails for good when it wakes to an assignment that
                # an unsubscribe removed before it ran, as a restore that returns at
                # once did (seen with aiokafka 0.14: the next restore never ended).
                consumer.pause(*consumer.assignment())
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
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
