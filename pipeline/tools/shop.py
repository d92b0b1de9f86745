"""The example application behind ``python -m pipeline produce --via-outbox --db URL``.

A shop that keeps its orders in its own table (``shop_orders``) and tells the pipeline
about every change through the outbox: each step of an order (created, paid, shipped or
cancelled) is one database transaction that updates the business row and adds the event
to the outbox (:func:`pipeline.edges.outbox.add`). It never talks to Kafka; the relay does.

Orders are interleaved (several in flight at once) as in real traffic, and only legal
steps are taken: the shop validates before it writes, so the pipeline accepts every
event. ``version`` in ``shop_orders`` counts the steps, the way the pipeline's order
version counts its transitions, so the sink's ``orders`` table must end up equal to it.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import orjson
from sqlalchemy import Engine, insert, select, update

from pipeline.edges import db, outbox
from pipeline.settings import Settings


@dataclass(frozen=True, slots=True)
class Step:
    order_id: str
    type: str
    user_id: str
    amount_cents: int
    #: the order's status after this step
    status: str
    seq: int


def lifecycles(orders: int, *, seed: int = 1, prefix: str = "o") -> Iterator[Step]:
    """Every step of ``orders`` orders, interleaved; deterministic for a seed.

    80% of orders are paid (half of those shipped, one in ten cancelled), the rest are
    cancelled or left open; about 2.4 events per order.
    """
    rng = random.Random(seed)
    active: list[list[Step]] = []
    made = 0
    users = max(10, orders // 20)
    while made < orders or active:
        while made < orders and len(active) < 16:
            made += 1
            oid = f"{prefix}{made}"
            uid = f"u{rng.randrange(1, users + 1)}"
            amount = rng.randrange(100, 50_000)
            plan = [("OrderCreated", "CREATED")]
            if rng.random() < 0.8:
                plan.append(("PaymentReceived", "PAID"))
                roll = rng.random()
                if roll < 0.5:
                    plan.append(("OrderShipped", "SHIPPED"))
                elif roll < 0.6:
                    plan.append(("OrderCancelled", "CANCELLED"))
            elif rng.random() < 0.5:
                plan.append(("OrderCancelled", "CANCELLED"))
            active.append([Step(oid, t, uid, amount, st, i) for i, (t, st) in enumerate(plan)])
        slot = rng.randrange(len(active))
        yield active[slot].pop(0)
        if not active[slot]:
            active.pop(slot)


def event_of(step: Step, ts_ms: int) -> dict[str, object]:
    doc: dict[str, object] = {
        "event_id": f"{step.order_id}-e{step.seq}",
        "type": step.type,
        "order_id": step.order_id,
        "ts_ms": ts_ms,
    }
    if step.type == "OrderCreated":
        doc["user_id"] = step.user_id
        doc["amount_cents"] = step.amount_cents
    elif step.type == "PaymentReceived":
        doc["amount_cents"] = step.amount_cents
    return doc


def apply_step(engine: Engine, step: Step, topic: str, *, retry: bool = False) -> None:
    """One business transaction: the order row and its event, together."""
    now = db.now_ms()
    event = event_of(step, now)
    t = db.shop_orders
    with engine.begin() as conn:
        # A retry after an unknown commit outcome (the connection died at COMMIT): the
        # event id says whether the step is already in.
        if retry:
            done = conn.execute(
                select(db.outbox.c.id).where(db.outbox.c.event_id == event["event_id"])
            ).first()
            if done is not None:
                return
        if step.type == "OrderCreated":
            conn.execute(
                insert(t).values(
                    order_id=step.order_id,
                    user_id=step.user_id,
                    amount_cents=step.amount_cents,
                    paid_cents=0,
                    status=step.status,
                    version=1,
                    updated_ms=now,
                )
            )
        else:
            values: dict[str, object] = {
                "status": step.status,
                "version": t.c.version + 1,
                "updated_ms": now,
            }
            if step.type == "PaymentReceived":
                values["paid_cents"] = t.c.paid_cents + step.amount_cents
            res = conn.execute(update(t).where(t.c.order_id == step.order_id).values(**values))
            if res.rowcount != 1:
                raise RuntimeError(f"order {step.order_id} missing for {step.type}")
        outbox.add(
            conn,
            event_id=str(event["event_id"]),
            topic=topic,
            key=step.order_id.encode(),
            value=orjson.dumps(event),
            created_ms=now,
        )


def write_orders(
    engine: Engine,
    orders: int,
    topic: str,
    *,
    seed: int = 1,
    prefix: str = "o",
    rate: float | None = None,
) -> int:
    """Create ``orders`` orders through the outbox; returns the events written."""
    started = time.monotonic()
    n = 0
    for step in lifecycles(orders, seed=seed, prefix=prefix):
        for attempt in range(60):
            try:
                apply_step(engine, step, topic, retry=attempt > 0)
                break
            except Exception as error:
                # A real application retries a transaction the database could not take
                # (e.g. while it restarts); the transaction is atomic, so that is safe.
                if not db.is_transient(error) or attempt == 59:
                    raise
                time.sleep(min(2.0, 0.1 * (attempt + 1)))
        n += 1
        if rate:
            ahead = n / rate - (time.monotonic() - started)
            if ahead > 0.005:
                time.sleep(ahead)
    return n


def produce_via_outbox(args: argparse.Namespace, settings: Settings) -> int:
    engine = db.engine_for(args.db)
    db.create_schema(engine)
    n = write_orders(
        engine, args.count, settings.topic_raw, seed=args.seed, prefix=args.prefix, rate=args.rate
    )
    engine.dispose()
    print(f"wrote {args.count} orders ({n} events) through the outbox at {args.db}")
    return 0
