"""Faust's aiokafka consumer and its consumer thread, adapted to the coordinator.

What they change (each is explained where it is done):

* every delivered record passes through ``callback`` wrapped as a ``_Delivery``, and
  ``wait_first`` awaits a delivery that cannot block directly (a fast path, for speed);
* ``_read_offset`` (Faust's "last delivered offset" filter) is replaced by
  :class:`~pipeline.eos.delivery.PinnedReadOffsets`;
* ``highwaters`` returns where recovery is to stop (the end of the last committed
  record; for the partitions the coordinator restores itself, where reading starts), not
  the high waters;
* ``position`` always returns -1 (it only feeds a recovery shortcut that fires wrongly);
* ``seek_wait`` maps an unknown offset (None) to 0;
* ``perform_seek`` hands the seek and resume functions to the coordinator;
* the consumer thread tells the coordinator's ledger what each fetch held.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as AiokafkaConsumer
from faust.types import TP
from mode.services import WaitResults

from pipeline.eos.delivery import PinnedReadOffsets


class _Delivery:
    """One record on its way to the conductor (see SettlingConsumer.wait_first)."""

    __slots__ = ("coro", "message")

    def __init__(self, message: Any, coro: Any) -> None:
        self.message = message
        self.coro = coro

    def __await__(self) -> Any:
        return self.coro.__await__()


class SettlingConsumer(AiokafkaConsumer):
    """Faust's aiokafka consumer that tells the coordinator when positions are settled.

    ``perform_seek`` is what Faust's recovery calls, after table recovery, to move every
    stream partition to its committed offset; only after it may events be processed.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_offset = PinnedReadOffsets()
        deliver = self.callback
        self.callback = lambda message: _Delivery(message, deliver(message))

    async def wait_first(self, *coros: Any, timeout: Any = None) -> Any:
        # Faust's fetch loop hands each record to the conductor through
        # ``wait_first(callback(message), suspend_flow.wait())``, so that a rebalance can
        # interrupt a delivery blocked on a full stream buffer. That costs four tasks, a
        # wait and three cancellations per record: about 15% of the dedup stage's CPU in
        # a profile. When the delivery cannot block (checked just before it, with no
        # await in between), it is awaited directly; otherwise it goes the usual way.
        first = coros[0] if coros else None
        if not isinstance(first, _Delivery):
            return await super().wait_first(*coros, timeout=timeout)
        rest = coros[1:]
        blocker = self._blocker(first.message)
        if blocker == "stream buffer":
            # Under a backlog the agent is the bottleneck and its buffer stays full: each
            # record would then take the slow path, its delivery waking with each record
            # the agent takes. Wait instead, once, until the buffer has drained to
            # Faust's own low-water mark (40%), and deliver the next records at once.
            await self._wait_for_room(first.message)
            blocker = self._blocker(first.message)
        if blocker is not None:
            return await super().wait_first(first.coro, *rest, timeout=timeout)
        for other in rest:
            if asyncio.iscoroutine(other):
                other.close()  # the suspend-flow wait, never needed
        result = await first.coro
        return WaitResults([first], [result], False)

    def _blocker(self, message: Any) -> str | None:
        """What the conductor's delivery of ``message`` would wait for; None: nothing.

        It waits only for: Faust's flow control (rebalances), its subscription lock, a
        full producer buffer, or a full stream buffer of a channel reading ``message``'s
        partition.
        """
        if self.suspend_flow.is_set() or self.should_stop:
            return "suspended"
        app = self.app
        if not app.flow_control.is_active():
            return "flow control"
        conductor: Any = app.topics
        if conductor._tp_to_callback_lock.locked():
            return "subscription"
        buffer = app.producer.buffer
        if buffer.size > buffer.max_messages:
            return "producer buffer"
        for chan in conductor._tp_index.get(message.tp, ()):
            if chan.queue.full():
                return "stream buffer"
        return None

    async def _wait_for_room(self, message: Any, poll_s: float = 0.005) -> None:
        """Until every stream buffer reading ``message``'s partition is down to its
        pressure-drop size, or a rebalance or stop begins (then the caller takes Faust's
        interruptible path). Polled: the agent still has 40% of a buffer to work through
        when this returns, so a few milliseconds of lateness never starve it."""
        chans = list(self.app.topics._tp_index.get(message.tp, ()))  # type: ignore[attr-defined]
        while not (self.suspend_flow.is_set() or self.should_stop):
            if all(chan.queue.qsize() <= chan.queue.pressure_drop_size for chan in chans):
                return
            await asyncio.sleep(poll_s)

    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        return LedgerConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def highwaters(self, *partitions: TP) -> Mapping[TP, int]:
        # Faust answers from the consumer's cached last stable offset, which is unknown
        # (-1) for a partition not fetched yet; recovery then raises ConsistencyError
        # for a persisted offset "above the highwater". Ask the broker instead: a
        # read_committed consumer's end offsets are the last stable offsets.
        # And not the last stable offset itself but the end of the last committed
        # record (see Coordinator.record_ends): with transactional changelogs the
        # offset before the LSO is a commit marker that recovery would wait for.
        eos = self.app.eos  # type: ignore[attr-defined]
        # The active changelog partitions of our tables are restored by the coordinator
        # after Faust's recovery (Coordinator.restore): Faust is told they are complete
        # where its reading would start (it subtracts 1, and starts at the persisted
        # offset or before the log start, whichever is later), so it reads none of them.
        assignor = self.app.assignor
        changelogs = self.app.tables._changelogs  # type: ignore[attr-defined]
        mine = [
            tp for tp in partitions if eos.restores_changelog(tp) and not assignor.is_standby(tp)
        ]
        ours: dict[TP, int] = {}
        if mine:
            begins = await eos.beginnings(mine)
            remembered = self.app.tables.recovery.active_offsets  # type: ignore[attr-defined]
            for tp in mine:
                persisted = changelogs[tp.topic].data.persisted_offset(tp)
                start = max(
                    -1 if persisted is None else persisted,
                    remembered.get(tp) or -1,  # what an earlier recovery read, if more
                    begins.get(tp, 0) - 1,
                )
                ours[tp] = start + 1
        rest = [tp for tp in partitions if tp not in ours]
        return {**ours, **(await eos.record_ends(rest) if rest else {})}

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
        eos.read_offsets = self._read_offset
        eos.resume = self.resume_partitions


class LedgerConsumerThread(AIOKafkaConsumerThread):
    """Faust's consumer thread, telling the coordinator's ledger what each fetch held."""

    #: seeks made through :meth:`seek`, which Faust calls from the event loop's thread
    _seeks = 0

    def seek(self, partition: TP, offset: int) -> None:
        # Counted before the position moves, so a fetch that may have read a position
        # moved by this seek sees the count change (see _fetch_records).
        self._seeks += 1
        super().seek(partition, offset)

    async def _fetch_records(
        self,
        consumer: Any,
        active_partitions: set[TP],
        timeout: float | None = None,
        max_records: int | None = None,
    ) -> Any:
        seeks = self._seeks
        records = await super()._fetch_records(
            consumer, active_partitions, timeout=timeout, max_records=max_records
        )
        eos = self.app.eos  # type: ignore[attr-defined]
        if not records or not eos.enabled:
            return records
        # No await since the fetcher handed the records out, so no seek from this
        # thread's loop ran in between; Faust's direct seek from the other thread is
        # caught by the count, read after the positions.
        subscription = consumer._fetcher._subscriptions.subscription
        assignment = subscription.assignment if subscription is not None else None
        if assignment is None:
            return records
        notes: list[tuple[TP, list[int], int]] = []
        for tp, batch in records.items():
            if not batch or tp.topic not in eos.sources:
                continue
            state = assignment.state_value(tp)
            if state is None or not state.has_valid_position:
                continue
            notes.append((TP(tp.topic, tp.partition), [r.offset for r in batch], state.position))
        if self._seeks != seeks:
            return records  # a position may be a seek target: learn nothing from this fetch
        for tp, offsets, position in notes:
            eos.ledger.note(tp, offsets, position)
        return records
