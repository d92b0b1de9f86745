"""The consumers a worker keeps outside its group (for restores, standby copies, offset
questions and checks), and the one way a changelog is read into a store.

Both the restore (:mod:`pipeline.eos.restore`) and the standby follower
(:mod:`pipeline.eos.standby`) read a changelog partition from just after its store's
persisted offset: :func:`seek_after_persisted` is that start, so that "offset N
persisted" means the same in both (every committed record up to N is applied).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiokafka import TopicPartition
from faust.types import TP

if TYPE_CHECKING:
    from pipeline.eos.faust.store import TransactionalStore


class OnDemand:
    """A client made and started on first use, and only once however many tasks ask
    for it at the same time (two tasks that both found none would each start one, and
    one of them would never be stopped)."""

    def __init__(self, make: Callable[[], Awaitable[Any]]) -> None:
        #: makes the client, started
        self._make = make
        self._client: Any = None
        self._lock = asyncio.Lock()

    @property
    def made(self) -> bool:
        return self._client is not None

    async def get(self) -> Any:
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    self._client = await self._make()
        return self._client

    async def close(self, *, quiet: bool = False) -> None:
        """Stop the client, if made; the next :meth:`get` makes a new one. ``quiet``:
        an error of its stop is not raised (a client that already failed)."""
        async with self._lock:
            client, self._client = self._client, None
            if client is None:
                return
            if quiet:
                with contextlib.suppress(Exception):
                    await client.stop()
            else:
                await client.stop()


def idle(consumer: Any) -> None:
    """Stop ``consumer`` fetching what it was assigned, once it is done reading it.

    Left unpaused, its fetcher goes on fetching those partitions in the background; and
    once such a topic is deleted, aiokafka asks for the topic's metadata in a tight
    loop (measured: half a core and about 3,000 "not found in cluster metadata" errors a
    second, for as long as the worker runs). Paused, not unassigned: aiokafka's fetcher
    fails for good when it wakes to an assignment that an ``unsubscribe`` removed before
    it ran, as a restore that returned at once did (seen with aiokafka 0.14: the next
    restore never ended). The next ``assign`` replaces the paused partitions."""
    consumer.pause(*consumer.assignment())


@dataclass(frozen=True)
class Span:
    """Where reading a changelog partition into its store starts and (for now) ends."""

    tp: TP
    #: the store's persisted offset the start was taken from (None: nothing persisted)
    persisted: int | None
    start: int
    end: int

    @property
    def left(self) -> int:
        return max(0, self.end - self.start)


async def seek_after_persisted(
    consumer: Any, stores: Mapping[TP, TransactionalStore]
) -> dict[TopicPartition, Span]:
    """Assign ``consumer`` (``read_committed``, outside the group) the changelog
    partitions of ``stores`` and seek each to the record after its persisted offset (or
    to the log's start, when retention deleted that far); its end is the last stable
    offset now."""
    ktps = {TopicPartition(tp.topic, tp.partition): tp for tp in stores}
    # Asked before assigning: once assigned, the consumer's fetches (long polls of up to
    # 500 ms) go first on the broker's connection, and each of these two requests can
    # wait for one (measured with a lone consumer: 0.8 and 0.5 s after a re-assign,
    # 0.002 s before).
    ends = await consumer.end_offsets(list(ktps))
    begins = await consumer.beginning_offsets(list(ktps))
    consumer.assign(list(ktps))
    spans: dict[TopicPartition, Span] = {}
    for ktp, tp in ktps.items():
        persisted = stores[tp].persisted_offset(tp)
        start = max(int(begins[ktp]), 0 if persisted is None else persisted + 1)
        consumer.seek(ktp, start)
        spans[ktp] = Span(tp, persisted, start, int(ends[ktp]))
    return spans
