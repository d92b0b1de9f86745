"""Faust's aiokafka consumer and its consumer thread, adapted to the engine.

What they change (each is explained where it is done):

* ``_getmany`` takes the source topics' records out of each fetch, as one batch per
  partition (:class:`~pipeline.eos.delivery.Fetched`), and hands them to the
  coordinator's stages: they never become Faust messages or events. The rest of the
  fetch (changelog records for standbys and Faust's recovery) goes on as Faust's;
* ``highwaters`` returns where recovery is to stop (the end of the last committed
  record; for the partitions the coordinator restores itself, where reading starts), not
  the high waters;
* ``position`` always returns -1 (it only feeds a recovery shortcut that fires wrongly);
* ``seek_wait`` maps an unknown offset (None) to 0;
* ``perform_seek`` hands the seek and resume functions to the coordinator;
* the consumer thread records each source partition's position before and after every
  fetch, and counts seeks per partition, which makes the batches (and tells the
  coordinator's ledger what each fetch held).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as AiokafkaConsumer
from faust.types import TP

from pipeline.eos.delivery import Fetched


class SettlingConsumer(AiokafkaConsumer):
    """Faust's aiokafka consumer, delivering the source topics' records in batches to
    the coordinator, and telling it when positions are settled."""

    async def _getmany(self, active_partitions: Any, timeout: float) -> Any:
        records: Any = await super()._getmany(active_partitions, timeout)
        if not records:
            return records
        eos = self.app.eos  # type: ignore[attr-defined]
        runners = eos.runners
        batches = [records.pop(tp) for tp in [tp for tp in records if tp.topic in runners]]
        if batches:
            note = getattr(self.app.monitor, "on_batch_in", None)
            if note is not None:
                for batch in batches:
                    if batch:
                        note(batch.tp, len(batch), batch[-1].offset)
            await eos.deliver(batches, self._stopping)
        return records

    def _stopping(self) -> bool:
        return not self.flow_active or self.should_stop

    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        return BatchingConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def _split(self, partitions: Iterable[TP]) -> tuple[list[TP], list[TP]]:
        """``partitions`` as (our tables' changelog partitions, which the coordinator
        reads and answers for, the rest, which stay Faust's)."""
        eos = self.app.eos  # type: ignore[attr-defined]
        mine: list[TP] = []
        rest: list[TP] = []
        for tp in partitions:
            (mine if eos.restores_changelog(tp) else rest).append(tp)
        return mine, rest

    async def highwaters(self, *partitions: TP) -> Mapping[TP, int]:
        # Faust answers from the consumer's cached last stable offset, which is unknown
        # (-1) for a partition not fetched yet; recovery then raises ConsistencyError
        # for a persisted offset "above the highwater". Ask the broker instead: a
        # read_committed consumer's end offsets are the last stable offsets.
        # And not the last stable offset itself but the end of the last committed
        # record (see Coordinator.record_ends): with transactional changelogs the
        # offset before the LSO is a commit marker that recovery would wait for.
        eos = self.app.eos  # type: ignore[attr-defined]
        # The changelog partitions of our tables are read by the coordinator, not by
        # Faust: the active ones restored after Faust's recovery (Coordinator.restore),
        # the standby copies followed after that (pipeline.eos.standby). Faust is told
        # they are complete where its reading would start (it subtracts 1, and starts at
        # the persisted offset or before the log start, whichever is later), so it reads
        # none of them and counts no standby records as remaining.
        assignor = self.app.assignor
        changelogs = self.app.tables._changelogs  # type: ignore[attr-defined]
        mine, rest = self._split(partitions)
        ours: dict[TP, int] = {}
        if mine:
            begins = await eos.beginnings(mine)
            recovery: Any = self.app.tables.recovery  # type: ignore[attr-defined]
            for tp in mine:
                remembered = (
                    recovery.standby_offsets if assignor.is_standby(tp) else recovery.active_offsets
                )
                persisted = changelogs[tp.topic].data.persisted_offset(tp)
                start = max(
                    -1 if persisted is None else persisted,
                    remembered.get(tp) or -1,  # what an earlier recovery read, if more
                    begins.get(tp, 0) - 1,
                )
                ours[tp] = start + 1
        return {**ours, **(await eos.record_ends(rest) if rest else {})}

    async def earliest_offsets(self, *partitions: TP) -> Mapping[TP, int]:
        # Faust's recovery asks these twice per rebalance (active and standby changelog
        # partitions) through this, the group's consumer, where each request waits
        # behind the consumer's own long-poll fetch: 1.5 s each, 3.0 s of a 4.9 s
        # takeover in bench --recovery. Our tables' changelogs are asked on the
        # coordinator's consumer for offset questions, which fetches nothing.
        eos = self.app.eos  # type: ignore[attr-defined]
        mine, rest = self._split(partitions)
        out: dict[TP, int] = dict(await eos.beginnings(mine)) if mine else {}
        if rest:
            out.update(await super().earliest_offsets(*rest))
        return out

    def resume_partitions(self, tps: Iterable[TP]) -> None:
        # Faust resumes the standby changelog partitions on this (the group's) consumer
        # once its recovery is done, and replays them as one event per record. Ours
        # are followed by the coordinator's own consumer (pipeline.eos.standby): on this
        # one they stay paused, so that none of their records is handed out. (Faust
        # pauses in its own bookkeeping only: aiokafka still buffers one fetch of each,
        # which is never read; memory, not deliveries.)
        eos = self.app.eos  # type: ignore[attr-defined]
        assignor = self.app.assignor
        super().resume_partitions(
            [tp for tp in tps if not (eos.restores_changelog(tp) and assignor.is_standby(tp))]
        )

    async def position(self, tp: TP) -> int | None:
        # Faust calls this only from its recovery's "aborted transactions up to the
        # highwater" shortcut: after two idle 5-second waits it declares a changelog
        # partition recovered once the consumer's *fetch* position passed the
        # highwater, although the fetched records may still sit in its queue, not yet
        # applied. Its idle count is never reset between recoveries, so the shortcut
        # fires at once in a later recovery (seen: a balance read before its last rows
        # were applied; updates lost). The shortcut is not needed here: highwaters()
        # ends at the last committed record, which recovery does receive. -1 keeps the
        # shortcut from ever firing.
        return -1

    async def seek_wait(self, partitions: Mapping[TP, int | None]) -> None:
        # Faust's recovery registers a standby changelog partition with offset None and
        # fills the offset in only in its first pass; when a rebalance restarts the
        # recovery at the wrong moment (seen right after a broker restart), it seeks the
        # standby to None and aiokafka's "Offset must be a positive integer" crashes the
        # worker. No known offset means nothing of the partition is stored: read it from
        # its start, which is what Faust does for -1.
        await super().seek_wait({tp: 0 if o is None else o for tp, o in partitions.items()})

    async def perform_seek(self) -> None:
        # Processing starts when the app's recovery ends (Coordinator.recovered), not
        # here: Faust also calls this from its fetcher in the middle of a recovery.
        await super().perform_seek()
        eos = self.app.eos  # type: ignore[attr-defined]
        eos.seek_wait = self.seek_wait
        thread: Any = self._thread
        eos.seek_counts = thread.seek_counts
        eos.resume = self.resume_partitions


class BatchingConsumerThread(AIOKafkaConsumerThread):
    """Faust's consumer thread, making each fetch's source records into batches.

    Seeks are counted per partition: Faust seeks from the event loop's thread
    (``seek``) and from this one (``_seek_wait``), the engine through ``seek_wait``.
    Each count moves before the position does, so a fetch that may have read a position
    a seek moved sees the count change, and its batch is not trusted.
    """

    _counts: dict[TP, int] | None = None

    @property
    def seek_counts(self) -> dict[TP, int]:
        if self._counts is None:
            self._counts = {}
        return self._counts

    def _count(self, tp: Any) -> None:
        key = TP(tp.topic, tp.partition)
        counts = self.seek_counts
        counts[key] = counts.get(key, 0) + 1

    def seek(self, partition: TP, offset: int) -> None:
        self._count(partition)
        super().seek(partition, offset)

    async def _seek_wait(self, consumer: Any, partitions: Mapping[TP, int]) -> None:
        for tp in partitions:
            self._count(tp)
        await super()._seek_wait(consumer, partitions)

    async def _fetch_records(
        self,
        consumer: Any,
        active_partitions: set[TP],
        timeout: float | None = None,
        max_records: int | None = None,
    ) -> Any:
        eos = self.app.eos  # type: ignore[attr-defined]
        if not eos.enabled:
            return await super()._fetch_records(
                consumer, active_partitions, timeout=timeout, max_records=max_records
            )
        runners = eos.runners
        counts = self.seek_counts
        # Read before the fetch: a fetch that began before the current assignment
        # settled may have raced seeks this thread does not count (Faust's
        # seek_to_committed during a recovery); its batches are never processed.
        count = eos.unsettled_count
        epoch = count if eos.settled_epoch == count else -1
        subscription = consumer._fetcher._subscriptions.subscription
        assignment = subscription.assignment if subscription is not None else None
        before: dict[Any, tuple[int, int]] = {}
        if assignment is not None and active_partitions:
            for tp in active_partitions:
                if tp.topic in runners:
                    state = assignment.state_value(tp)
                    if state is not None and state.has_valid_position:
                        before[tp] = (state.position, counts.get(tp, 0))
        records: Any = await super()._fetch_records(
            consumer, active_partitions, timeout=timeout, max_records=max_records
        )
        subscription = consumer._fetcher._subscriptions.subscription
        assignment = subscription.assignment if subscription is not None else None
        if assignment is not None:
            # A fetch whose records were all markers or aborted hands nothing out but
            # still moves the position past them: tell the stage, as an empty batch,
            # or its next batch would begin past where the partition stands.
            for tp, (position, seeks) in before.items():
                if tp in records or counts.get(tp, 0) != seeks:
                    continue
                state = assignment.state_value(tp)
                if state is not None and state.has_valid_position and state.position > position:
                    records[tp] = []
        if not records:
            return records
        ledger = eos.ledger
        for tp, batch in list(records.items()):
            if tp.topic not in runners:
                continue
            fetched = Fetched(batch)
            fetched.tp = TP(tp.topic, tp.partition)
            fetched.epoch = epoch
            fetched.behind = 0
            seen = before.get(tp)
            state = assignment.state_value(tp) if assignment is not None else None
            seeks = counts.get(tp, 0)
            if seen is None or state is None or not state.has_valid_position:
                fetched.start = fetched.end = -1
                fetched.seeks, fetched.certain = seeks, False
            else:
                fetched.start, fetched.seeks = seen
                fetched.end = state.position
                fetched.certain = seeks == seen[1]
            if fetched.certain and batch:
                ledger.note(fetched.tp, [r.offset for r in batch], fetched.end)
            stable = consumer.last_stable_offset(tp)
            fetched.behind = max(0, stable - fetched.end) if stable is not None else 0
            records[tp] = fetched
        return records
