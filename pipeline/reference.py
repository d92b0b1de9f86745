"""A reference run of the whole chain in one process, without Faust: for testing
``reconcile`` itself, and for measuring it at scale.

It reads ``orders.raw`` with a ``read_committed`` consumer, applies the same pure
operators the agents use (``decide_record``, ``decide_order``, ``decide_balance``) and
writes what a correct pipeline writes: every output topic, the repartition topic and
the final row of every table to its changelog. ``reconcile`` must find no fault in it;
``faults`` then seeds one on purpose, so tests can check that each is caught:

- ``duplicate``: one coupon written twice;
- ``missing``: one order change left out;
- ``wrong-table``: one user's balance one cent off in the table's changelog.

It proves nothing about the real pipeline (the chaos runs and ``reconcile`` do that);
it is a fast, honest producer of correct, or precisely wrong, outputs.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import defaultdict
from dataclasses import replace
from typing import Any

from aiokafka import AIOKafkaProducer

from agents.dedup import DeadLetter, Forward, decide_record
from agents.orders import Send, decide_balance, decide_order
from pipeline.admin import ensure_topics
from pipeline.kafka_io import read_topic
from pipeline.settings import Settings
from tables.dedup import encode_seen
from tables.orders import Balance

FAULTS = ("duplicate", "missing", "wrong-table")


async def write_reference(settings: Settings, faults: frozenset[str] = frozenset()) -> int:
    """Write the outputs of a correct run over the current input; returns records written."""
    unknown = set(faults) - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown faults {sorted(unknown)}; known: {FAULTS}")
    s = settings
    orders_log = f"{s.app_id}-orders-changelog"
    balances_log = f"{s.app_id}-users.balances-changelog"
    topics = {
        "unique": s.topic_unique,
        "dlq": s.topic_dlq,
        "changes": s.topic_changes,
        "rejected": s.topic_rejected,
        "coupons": s.topic_coupons,
        "deltas": s.deltas_topic,
    }
    await ensure_topics(
        s.bootstrap_servers, [*topics.values(), orders_log, balances_log], s.partitions
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=s.bootstrap_servers,
        enable_idempotence=True,
        acks="all",
        linger_ms=20,
        max_batch_size=512 * 1024,
    )
    await producer.start()
    written = 0
    pending: list[Any] = []

    async def send(topic: str, key: bytes | None, value: bytes | None) -> None:
        nonlocal written
        pending.append(await producer.send(topic, value, key=key))
        written += 1
        if len(pending) >= 20_000:
            await asyncio.gather(*pending)
            pending.clear()

    seen: dict[int, dict[bytes, bytes]] = defaultdict(dict)
    orders: dict[bytes, bytes] = {}
    balances: dict[bytes, bytes] = {}
    dropped = duplicated = False
    try:
        async for m in read_topic(s.bootstrap_servers, s.topic_raw):
            state = seen[m.partition]
            where = (s.topic_raw, m.partition, m.offset)
            action = decide_record(m.value, m.key, m.timestamp, where, state.get, s.dedup_window_ms)
            if isinstance(action, DeadLetter):
                await send(topics["dlq"], m.key, action.value)
                continue
            if not isinstance(action, Forward):
                continue
            state[action.event_id] = encode_seen(action.first_ms)
            await send(topics["unique"], action.order_key, m.value)
            step = decide_order(m.value, action.order_key, where, orders.get)
            if step.key is not None and step.order is not None:
                orders[step.key] = step.order
            for out in step.sends:
                if out.kind == "changes" and "missing" in faults and not dropped:
                    dropped = True
                    continue
                await send(topics[out.kind], out.key, out.value)
                if out.kind == "coupons" and "duplicate" in faults and not duplicated:
                    duplicated = True
                    await send(topics[out.kind], out.key, out.value)
                if out.kind == "deltas":
                    decided = decide_balance(out.value, where, balances.get)
                    assert not isinstance(decided, Send), decided
                    user, row = decided
                    balances[user] = row
        for key, row in orders.items():
            await send(orders_log, key, row)
        for n, (key, row) in enumerate(balances.items()):
            if n == 0 and "wrong-table" in faults:
                wrong = Balance.decode(row)
                row = replace(wrong, balance_cents=wrong.balance_cents + 1).encode()
            await send(balances_log, key, row)
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.reference", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--fault", action="append", default=[], choices=FAULTS)
    args = parser.parse_args(argv)
    started = time.monotonic()
    n = asyncio.run(write_reference(Settings(), frozenset(args.fault)))
    print(f"reference: wrote {n} records in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
