"""A source partition's transactional producer: aiokafka's, behind the calls the commit
steps make (:class:`pipeline.eos.commit.Transaction`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition


class TransactionalProducer:
    """aiokafka's producer with one ``transactional.id``; the three private members the
    commit needs are reached here and nowhere else."""

    __slots__ = ("producer",)

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer

    @classmethod
    def like_faust(cls, faust_producer: Any, tid: str, linger_s: float) -> TransactionalProducer:
        """Faust's producer settings (acks, request size, security), with batching sized
        to the transaction.

        Records of a transaction are invisible to ``read_committed`` readers until it
        commits, so sending them early buys no latency; it only costs requests. With
        Faust's 5 ms linger and one producer per source partition, a profile of the dedup
        stage found a quarter of the worker's CPU in the producers' request path (about
        one record per request at 1,700 events/s). Here a batch lingers up to a commit
        interval (step 3 sends whatever is left at once), and may grow to 256 kB.
        """
        settings = {
            # Faust's own settings builders: private, but the only place its producer
            # settings (including SASL/SSL) are put together.
            **faust_producer._settings_default(),
            **faust_producer._settings_auth(),
            **faust_producer._settings_extra(),
            "linger_ms": max(5, round(linger_s * 1000)),
            "max_batch_size": 256 * 1024,
        }
        return cls(AIOKafkaProducer(**settings, transactional_id=tid))

    async def start(self) -> None:
        await self.producer.start()

    async def stop(self) -> None:
        await self.producer.stop()

    async def send(
        self,
        topic: str,
        *,
        value: bytes | None,
        key: bytes | None,
        partition: int | None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = await self.producer.send(
            topic,
            value=value,
            key=key,
            partition=partition,
            timestamp_ms=timestamp_ms,
            headers=headers,
        )
        return fut

    def add_to_transaction(self, tp: TopicPartition) -> None:
        # aiokafka's (pinned <0.15) own hook: ``send`` calls the same method for the
        # partition of each record it queues.
        self.producer._txn_manager.maybe_add_partition_to_txn(tp)

    def flush_for_commit(self) -> Awaitable[None]:
        # The call commit_transaction makes first (aiokafka 0.14's accumulator): it
        # closes the open batches and sends them now rather than when their linger ends.
        flush: Awaitable[None] = self.producer._message_accumulator.flush_for_commit()
        return flush

    @property
    def sender_task(self) -> asyncio.Future[Any] | None:
        # Ends when the sender gives up (after a refused batch, say); sends still
        # pending then never complete.
        task: asyncio.Future[Any] | None = self.producer._sender.sender_task
        return task

    async def send_offsets_to_transaction(
        self, offsets: dict[TopicPartition, int], group_id: str
    ) -> None:
        await self.producer.send_offsets_to_transaction(offsets, group_id)

    async def commit_transaction(self) -> None:
        await self.producer.commit_transaction()

    async def begin_transaction(self) -> None:
        await self.producer.begin_transaction()

    async def abort_transaction(self) -> None:
        await self.producer.abort_transaction()
