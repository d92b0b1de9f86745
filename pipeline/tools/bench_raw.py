"""The Python ceiling for ``bench``: a minimal transactional dedup loop on plain aiokafka.

``python -m pipeline.tools.bench_raw --input T --unique T --dlq T --group G`` consumes
``read_committed``, makes the same per-record decision as the dedup agent
(:func:`pipeline.agents.dedup.decide_record`) against a plain dict, produces the result and adds
the consumed offsets to the transaction, committing every ``--commit-ms``. One
transactional producer for all partitions, no persisted state, no rebalance handling:
what is left is the cost of Kafka transactions from Python, which our chain cannot beat.

It connects to ``--bootstrap`` as the ``PIPELINE_KAFKA_*`` variables say (TLS, SASL:
the runner passes its own). It prints JSON lines on stdout for the runner:
``{"first": ...}`` when the first record arrives (monotonic clock and process CPU then)
and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from pipeline.domain.dedup import DeadLetter, Forward, decide_record

WINDOW_MS = 7 * 24 * 3600 * 1000


@dataclass
class Counts:
    seen: int = 0
    unique: int = 0
    dropped: int = 0
    dlq: int = 0


def handle(
    records: Iterable[tuple[str, int, int, int, bytes | None, bytes | None]],
    seen: dict[bytes, bytes],
    counts: Counts,
    window_ms: int = WINDOW_MS,
) -> list[tuple[str, bytes | None, bytes]]:
    """Decide a batch of ``(topic, partition, offset, ts_ms, key, value)``; returns the
    records to send as ``("unique" | "dlq", key, value)``. Pure apart from ``seen``."""
    from pipeline.domain.dedup import encode_seen

    out: list[tuple[str, bytes | None, bytes]] = []
    for topic, partition, offset, ts_ms, key, value in records:
        counts.seen += 1
        action = decide_record(value, key, ts_ms, (topic, partition, offset), seen.get, window_ms)
        if isinstance(action, Forward):
            seen[action.event_id] = encode_seen(action.first_ms)
            assert value is not None
            out.append(("unique", action.order_key, value))
            counts.unique += 1
        elif isinstance(action, DeadLetter):
            out.append(("dlq", key, action.value))
            counts.dlq += 1
        else:
            counts.dropped += 1
    return out


async def run(args: argparse.Namespace) -> None:
    from pipeline.settings import Settings

    kafka = Settings(broker=args.bootstrap).kafka
    consumer = AIOKafkaConsumer(
        args.input,
        **kafka.kwargs(),
        group_id=args.group,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=args.max_records,
    )
    producer = AIOKafkaProducer(
        **kafka.kwargs(),
        transactional_id=f"{args.group}-tx",
        enable_idempotence=True,
        linger_ms=args.linger_ms,
        max_batch_size=args.batch_bytes,
    )
    await producer.start()
    await consumer.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    seen: dict[bytes, bytes] = {}
    counts = Counts()
    topics = {"unique": args.unique, "dlq": args.dlq}
    commit_s = args.commit_ms / 1000
    first = True
    try:
        while not stop.is_set():
            # One transaction per commit interval: everything consumed in it, its outputs
            # and its offsets become visible together.
            await producer.begin_transaction()
            offsets: dict[TopicPartition, int] = {}
            deadline = time.monotonic() + commit_s
            while not stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                batch = await consumer.getmany(timeout_ms=max(1, int(left * 1000)))
                for tp, msgs in batch.items():
                    if first and msgs:
                        first = False
                        line = {"first": time.monotonic(), "cpu": time.process_time()}
                        print(orjson.dumps(line).decode(), flush=True)
                    out = handle(
                        (
                            (tp.topic, tp.partition, m.offset, m.timestamp, m.key, m.value)
                            for m in msgs
                        ),
                        seen,
                        counts,
                    )
                    for kind, key, value in out:
                        await producer.send(topics[kind], value, key=key)
                    offsets[tp] = msgs[-1].offset + 1
            if offsets:
                await producer.send_offsets_to_transaction(offsets, args.group)
            await producer.commit_transaction()
            if args.expect and counts.seen >= args.expect:
                # Committed through the whole backlog: the runner's clock stops here, with
                # no polling delay on a loop this fast.
                line = {"drained": time.monotonic(), "cpu": time.process_time()}
                print(orjson.dumps(line).decode(), flush=True)
                args.expect = 0
    finally:
        await consumer.stop()
        await producer.stop()
        print(orjson.dumps({"counts": counts.__dict__}).decode(), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.tools.bench_raw", description=__doc__)
    p.add_argument("--bootstrap", default="127.0.0.1:9092")
    p.add_argument("--input", required=True)
    p.add_argument("--unique", required=True)
    p.add_argument("--dlq", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--commit-ms", type=int, default=100)
    p.add_argument("--expect", type=int, default=0, help="report when this many are committed")
    p.add_argument("--max-records", type=int, default=500, help="consumer batch (500)")
    p.add_argument("--linger-ms", type=int, default=5)
    p.add_argument("--batch-bytes", type=int, default=256 * 1024)
    asyncio.run(run(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
