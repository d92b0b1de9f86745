"""A reference run of the whole chain in one process, without Faust: for testing
``reconcile`` itself, and for measuring it at scale.

It reads ``orders.raw`` with a ``read_committed`` consumer and writes what a correct
pipeline writes, with the pure decisions the workers' stages are declared with
(``route_record``: the contract's parse and the rekey by order; the dedup ``decide``;
``decide_order`` around ``order_step``; ``decide_balance`` around ``apply_delta``): the
rekeyed input and
``orders.unique`` (arrival timestamps, ``pipeline.src`` headers), the dead letters, every
output topic, the balance deltas, and the final row of the ``orders`` and
``users.balances`` tables to their changelogs. ``reconcile``, which shares none of that
code, must find no fault in it; ``faults`` then seeds one on purpose, so tests can check
that each is caught:

- ``duplicate``: one coupon written twice;
- ``missing``: one order change left out;
- ``wrong-table``: one user's balance one cent off in the table's changelog;
- ``forward-twice``: one dropped copy of an event forwarded as well;
- ``forward-lost``: one event never forwarded (nor processed further);
- ``forward-bytes``: one forward with other bytes than its copy (the same event,
  re-serialized);
- ``forward-timestamp``: one forward stamped with the event's ``ts_ms``, not its arrival;
- ``wrong-key``: one order change keyed by the user, not the order;
- ``delta-lost``: one balance delta neither sent nor applied;
- ``dlq-raw``: one dead letter whose ``raw`` lost its last character.

It proves nothing about the real pipeline (the chaos runs and ``reconcile`` do that);
it is a fast, honest producer of correct, or precisely wrong, outputs.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import replace
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from pipeline.admin import declare_topics, ensure_topics
from pipeline.connection import require_access
from pipeline.domain.codecs import dlq_key
from pipeline.domain.dedup import decide
from pipeline.domain.orders import Balance, Send, decide_balance, decide_order
from pipeline.domain.route import EID, SRC, DeadLetter, route_record, source_header
from pipeline.kafka_io import read_topic
from pipeline.settings import Settings

FAULTS = (
    "duplicate",
    "missing",
    "wrong-table",
    "forward-twice",
    "forward-lost",
    "forward-bytes",
    "forward-timestamp",
    "wrong-key",
    "delta-lost",
    "dlq-raw",
)

#: One process sees every copy, so nothing needs to expire: a grace no run reaches.
_NEVER = 2**62


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
    await declare_topics(s, [s.by_order_topic, *topics.values()])
    kafka = s.kafka
    await ensure_topics(kafka, [orders_log, balances_log], s.partitions)
    producer = AIOKafkaProducer(
        **kafka.kwargs(),
        enable_idempotence=True,
        acks="all",
        linger_ms=20,
        max_batch_size=512 * 1024,
        max_request_size=4 * 1024 * 1024,
    )
    await producer.start()
    written = 0
    pending: list[Any] = []
    todo = set(faults)

    def fault(name: str) -> bool:
        """Seed ``name`` now? Once per run."""
        if name in todo:
            todo.discard(name)
            return True
        return False

    async def send(
        topic: str,
        key: bytes | None,
        value: bytes | None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        nonlocal written
        fut = await producer.send(topic, value, key=key, timestamp_ms=timestamp_ms, headers=headers)
        pending.append(fut)
        written += 1
        if len(pending) >= 20_000:
            await asyncio.gather(*pending)
            pending.clear()

    # event_id -> arrivals of its forwarded copies. Every copy is seen here, in one
    # sequence: a copy is forwarded unless it arrived within the window of one of them.
    seen: dict[bytes, list[int]] = {}
    orders: dict[bytes, bytes] = {}
    balances: dict[bytes, bytes] = {}
    try:
        async for m in read_topic(kafka, s.topic_raw):
            where = (s.topic_raw, m.partition, m.offset)
            routed = route_record(m.value, m.key, where)
            if isinstance(routed, DeadLetter):
                letter = routed.value
                if fault("dlq-raw") and m.value is not None and len(m.value) > 1:
                    doc = orjson.loads(letter)
                    field = "raw" if "raw" in doc else "raw_b64"
                    if doc[field]:
                        doc[field] = doc[field][:-1] if field == "raw" else doc[field][:-4]
                        letter = orjson.dumps(doc)
                    else:
                        todo.add("dlq-raw")
                await send(topics["dlq"], dlq_key(m.key), letter)
                continue
            arrival = m.timestamp
            src = source_header(m.partition, m.offset)
            await send(
                s.by_order_topic,
                routed.order_key,
                m.value,
                arrival,
                [(SRC, src), (EID, routed.event_id)],
            )
            verdict = decide(
                seen.get(routed.event_id, []), arrival, arrival, s.dedup_window_ms, _NEVER
            )
            if verdict.unique:
                seen[routed.event_id] = verdict.accepted
                if fault("forward-lost"):
                    continue
            elif not fault("forward-twice"):
                continue
            value = m.value
            stamp = arrival
            if fault("forward-bytes"):
                value = orjson.dumps(orjson.loads(value or b""), option=orjson.OPT_INDENT_2)
            if fault("forward-timestamp"):
                stamp = orjson.loads(value or b"")["ts_ms"]
            await send(topics["unique"], routed.order_key, value, stamp, [(SRC, src)])
            step = decide_order(value, routed.order_key, where, orders.get)
            if step.key is not None and step.order is not None:
                orders[step.key] = step.order
            for out in step.sends:
                if out.kind == "changes" and fault("missing"):
                    continue
                if out.kind == "deltas" and fault("delta-lost"):
                    continue
                key = out.key
                if out.kind == "changes" and fault("wrong-key"):
                    key = b"not-" + key
                await send(topics[out.kind], key, out.value)
                if out.kind == "coupons" and fault("duplicate"):
                    await send(topics[out.kind], key, out.value)
                if out.kind == "deltas":
                    decided = decide_balance(out.value, where, balances.get)
                    assert not isinstance(decided, Send), decided
                    user, row = decided
                    balances[user] = row
        for key, row in orders.items():
            await send(orders_log, key, row)
        for key, row in balances.items():
            if fault("wrong-table"):
                wrong = Balance.decode(row)
                row = replace(wrong, balance_cents=wrong.balance_cents + 1).encode()
            await send(balances_log, key, row)
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    if todo:
        raise RuntimeError(f"the input gave no chance to seed {sorted(todo)}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.tools.reference", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--fault", action="append", default=[], choices=FAULTS)
    args = parser.parse_args(argv)
    settings = Settings()
    require_access(settings.kafka)
    started = time.monotonic()
    n = asyncio.run(write_reference(settings, frozenset(args.fault)))
    print(f"reference: wrote {n} records in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
