"""A source partition's transactional producer: aiokafka's, behind the calls the commit
steps make (:class:`pipeline.eos.commit.Transaction`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import IllegalOperation, ProducerFenced
from aiokafka.partitioner import DefaultPartitioner

from pipeline.eos.partitioner import partition_for
from pipeline.eos.policy import is_fence


class _Settled:
    """In place of a record's own future in aiokafka's batch (``put``): it reads as
    already done, so the batch never resolves it, and no future or metadata is made."""

    __slots__ = ()

    def done(self) -> bool:
        return True


_SETTLED = _Settled()


def _settled() -> _Settled:
    return _SETTLED


class TransactionalProducer:
    """aiokafka's producer with one ``transactional.id``; the private members the commit
    and the sends need are reached here and nowhere else."""

    __slots__ = ("_batches", "_default_partitioner", "_new_future", "_partitions", "producer")

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer
        # The accumulator's open batches per partition (aiokafka 0.14, pinned <0.15).
        self._batches: Mapping[tuple[str, int], Any] = producer._message_accumulator._batches
        #: per topic, its partitions as aiokafka's partitioner gets them; kept for one
        #: transaction (see :meth:`begin_transaction`)
        self._partitions: dict[str, list[int]] = {}
        self._new_future: Callable[[], asyncio.Future[Any]] | None = None
        # aiokafka's default partitioner, which partition_for equals (a word at a time
        # rather than a byte): a partitioner the producer was given is asked instead.
        self._default_partitioner = type(producer._partitioner) is DefaultPartitioner

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
        self._new_future = asyncio.get_running_loop().create_future

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
        fut = self._append(topic, key, value, partition, timestamp_ms, headers)
        if fut is not None:
            return fut
        return await self._send(topic, key, value, partition, timestamp_ms, headers)

    async def put(
        self,
        topic: str,
        *,
        value: bytes | None,
        key: bytes | None,
        partition: int | None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]:
        """Like :meth:`send`, but the future may be shared by every record of one
        producer batch (it is the batch's): done when the batch is delivered, failed if
        the batch is refused, and its result is not this record's offset.

        The commit only needs to know when its sends are delivered, and which event made
        a refused one. A future and a ``RecordMetadata`` per record cost about 2 µs per
        send, and 100,000 of them were alive at once during a backlog.
        """
        fut = self.put_now(topic, key, value, partition, timestamp_ms, headers)
        if fut is not None:
            return fut
        return await self._send(topic, key, value, partition, timestamp_ms, headers)

    def put_now(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        timestamp_ms: int | None,
        headers: list[tuple[str, bytes]] | None,
    ) -> asyncio.Future[Any] | None:
        """:meth:`put` without a coroutine: the future, if the record joined its
        partition's open batch; None if it could not (no open batch, or it is full)."""
        batch = self._open_batch(topic, partition, key)
        if batch is None:
            return None
        appended = batch.append(
            key, value, timestamp_ms, _create_future=_settled, headers=headers or []
        )
        if appended is not None:
            batch_future: asyncio.Future[Any] = batch.future
            return batch_future
        return None

    def _append(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        timestamp_ms: int | None,
        headers: list[tuple[str, bytes]] | None,
    ) -> asyncio.Future[Any] | None:
        """Append the record to its partition's open batch, or None (no open batch, it
        is full, or the partition is not known yet): then :meth:`send` does it.

        ``AIOKafkaProducer.send`` does the same for every record, after checks the
        engine makes once per transaction instead: the topic's metadata (a metadata
        wait and two set copies per call), serializers (the engine hands bytes), the
        transaction's state (records are only ever sent into an open transaction), and
        four coroutine frames. A profile of the dedup stage put about a quarter of the
        worker's CPU in ``send``. An open batch exists only once ``send`` has made it,
        which also added its partition to the transaction; a batch the commit's flush
        closed refuses the record, and ``send`` takes it.
        """
        batch = self._open_batch(topic, partition, key)
        if batch is None:
            return None
        fut: asyncio.Future[Any] | None = batch.append(
            key, value, timestamp_ms, _create_future=self._new_future, headers=headers or []
        )
        return fut

    async def _send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        timestamp_ms: int | None,
        headers: list[tuple[str, bytes]] | None,
    ) -> asyncio.Future[Any]:
        """aiokafka's own ``send``, for a record no open batch took: it makes the batch
        (and adds the partition to the transaction), or waits for room.

        Once the sender has ended, aiokafka refuses every send with "Can't send messages
        while not in transaction", which hides why: the sender's own error is raised
        instead, or named (a fence decides what the worker does next).
        """
        try:
            fut: asyncio.Future[Any] = await self.producer.send(
                topic,
                value=value,
                key=key,
                partition=partition,
                timestamp_ms=timestamp_ms,
                headers=headers,
            )
        except IllegalOperation as exc:
            cause = self.failure
            if cause is None:
                raise
            if is_fence(cause):
                raise ProducerFenced() from cause
            raise IllegalOperation(f"{exc}: the producer's sender ended ({cause!r})") from cause
        return fut

    def _open_batch(self, topic: str, partition: int | None, key: bytes | None) -> Any:
        """aiokafka's open batch for the record's partition, or None."""
        if partition is None:
            if key is None:
                return None  # a random partition: aiokafka picks it
            parts = self._partitions.get(topic)
            if parts is None:
                known = self.producer.client.cluster.partitions_for_topic(topic)
                if not known:
                    return None
                # The list aiokafka's ``_partition`` hands its partitioner.
                parts = self._partitions[topic] = list(known)
            if self._default_partitioner:
                partition = partition_for(key, parts)
            else:
                partition = self.producer._partitioner(key, parts, parts)
        batches = self._batches.get((topic, partition))
        if not batches:
            return None
        return batches[-1]

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

    @property
    def failure(self) -> BaseException | None:
        """The error that ended the producer's sender, or None while it runs.

        aiokafka's sender ends on a fence (``ProducerFenced``, raised on an
        ``InvalidProducerEpoch`` answer to any transactional request) and a few other
        errors; the producer is then in its fatal state and refuses everything.
        """
        task = self.sender_task
        if task is None or not task.done() or task.cancelled():
            return None
        return task.exception()

    @property
    def fenced(self) -> bool:
        return is_fence(self.failure)

    async def send_offsets_to_transaction(
        self, offsets: dict[TopicPartition, int], group_id: str
    ) -> None:
        await self.producer.send_offsets_to_transaction(offsets, group_id)

    async def commit_transaction(self) -> None:
        await self.producer.commit_transaction()

    async def begin_transaction(self) -> None:
        # Partitions are looked up afresh in each transaction (topics may grow).
        self._partitions.clear()
        await self.producer.begin_transaction()

    async def abort_transaction(self) -> None:
        await self.producer.abort_transaction()
