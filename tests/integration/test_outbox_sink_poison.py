"""Poison at both ends (issue 12, items 5 and 6), on the real broker, PostgreSQL and SQLite.

The sink is given records the database cannot hold among good ones; the relay is given
rows Kafka refuses among good ones. Each must record the refusal, land or publish every
other row exactly once, and keep running: no crash, no loop over the same rows.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy import insert, select, text, update

from pipeline.admin import ensure_topics
from pipeline.domain.models import EventType, OrderEvent
from pipeline.domain.orders import Change, Coupon, Order, transition
from pipeline.edges import db, outbox
from pipeline.kafka_io import read_topic, record_ends
from pipeline.settings import Settings

# Fixtures shared with the full-path tests: a database of the test's own, and processes.
from .test_outbox_sink import (  # noqa: F401
    Proc,
    pending_rows,
    pg_server,
    pg_url,
    procs,
    sink_tables,
)

pytestmark = pytest.mark.integration

TOP = 2**63 - 1


def database(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if backend == "postgres":
        return str(request.getfixturevalue("pg_url"))
    return str(tmp_path / "edge.db")


def veto(url: str, order_id: str) -> None:
    """A refusal only the database knows (no plan can foresee it): a CHECK constraint
    on PostgreSQL, a trigger on SQLite."""
    e = db.engine_for(url)
    try:
        db.create_schema(e)
        with e.begin() as conn:
            if db.is_postgres(e):
                conn.execute(
                    text(f"ALTER TABLE orders ADD CONSTRAINT veto CHECK (order_id <> '{order_id}')")
                )
            else:
                conn.execute(
                    text(
                        "CREATE TRIGGER veto BEFORE INSERT ON orders WHEN NEW.order_id ="
                        f" '{order_id}' BEGIN SELECT RAISE(ABORT, 'vetoed by a trigger'); END"
                    )
                )
    finally:
        e.dispose()


def outputs(events: list[OrderEvent]) -> tuple[list[Change | Coupon], Order | None]:
    """What the pipeline's state machine emits for ``events`` (one order)."""
    order: Order | None = None
    out: list[Change | Coupon] = []
    for ev in events:
        order, emitted = transition(order, ev)
        out.extend(o for o in emitted if isinstance(o, Change | Coupon))
    return out, order


def ev(order: str, n: int, kind: EventType, ts: int = 1, amount: int | None = None) -> OrderEvent:
    user = "u1" if kind is EventType.ORDER_CREATED else None
    return OrderEvent(f"{order}-e{n}", kind, order, ts, user, amount)


def change_value(
    order_id: str, version: int, ts_ms: int, frm: str = "NEW", to: str = "CREATED"
) -> bytes:
    doc = {
        "event_id": f"{order_id[:60]}-e{version}",
        "order_id": order_id,
        "from": frm,
        "to": to,
        "version": version,
        "ts_ms": ts_ms,
    }
    return orjson.dumps(doc)


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
async def test_sink_refuses_what_the_database_cannot_hold_and_lands_every_other_row(
    backend: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    env: dict[str, str],
    settings: Settings,
    procs: Callable[..., Proc],  # noqa: F811
) -> None:
    url = database(backend, request, tmp_path)
    veto(url, "vetoed")
    changes, coupons = settings.topic_changes, settings.topic_coupons
    await ensure_topics(settings.bootstrap_servers, [changes, coupons], settings.partitions)

    good: dict[str, list[OrderEvent]] = {}
    for i in range(30):
        o = f"ok{i}"
        good[o] = [
            ev(o, 0, EventType.ORDER_CREATED, amount=1000),
            ev(o, 1, EventType.PAYMENT_RECEIVED, amount=1000),
            ev(o, 2, EventType.ORDER_SHIPPED),
        ]
    # The largest timestamp the contract allows, and an order paid in two parts whose
    # sum (paid_cents) is nearly 2^64: both within the pipeline's own output.
    good["max-ts"] = [ev("max-ts", 0, EventType.ORDER_CREATED, ts=TOP, amount=5)]
    good["rich"] = [
        ev("rich", 0, EventType.ORDER_CREATED, amount=TOP),
        ev("rich", 1, EventType.PAYMENT_RECEIVED, amount=TOP - 1),
        ev("rich", 2, EventType.PAYMENT_RECEIVED, amount=TOP),
    ]
    emitted = {o: outputs(evs) for o, evs in good.items()}
    rich = emitted["rich"][1]
    assert rich is not None and rich.paid_cents == 2**64 - 3 and rich.status.value == "PAID"

    # Records out of the contract (written before validation was tightened, or by another
    # producer), each between good ones in the same partition.
    poison_changes: dict[str, bytes] = {
        "ts 2^63": change_value("over-ts", 1, 2**63),
        "NUL": change_value("nul\x00id", 1, 5),
        "long id": change_value("x" * 200, 1, 5),
        "vetoed": change_value("vetoed", 1, 5),
        "not JSON": b"{not json",
    }
    poison_coupon = orjson.dumps(
        {"coupon_id": "c" * 100, "order_id": "long-coupon", "user_id": "u", "amount_cents": 1}
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, enable_idempotence=True, acks="all"
    )
    await producer.start()
    bad_offsets: dict[tuple[str, int], str] = {}
    try:
        orders_ = list(emitted)
        half = len(orders_) // 2
        for n, o in enumerate(orders_):
            if n == half:
                for name, value in poison_changes.items():
                    md = await producer.send_and_wait(changes, value, key=b"x", partition=0)
                    bad_offsets[(changes, md.offset)] = name
                md = await producer.send_and_wait(coupons, poison_coupon, key=b"x", partition=0)
                bad_offsets[(coupons, md.offset)] = "long coupon id"
            for out in emitted[o][0]:
                topic = changes if isinstance(out, Change) else coupons
                value = orjson.dumps(out.to_json())
                await producer.send_and_wait(topic, value, key=o.encode(), partition=0)
    finally:
        await producer.stop()

    sink = procs("sink", ["sink", "--db", url, "--idle-exit", "3"], env)
    sink.start()
    assert sink.wait(120) == 0, sink.tail()
    ends = {
        topic: (await record_ends(settings.bootstrap_servers, topic))[0]
        for topic in (changes, coupons)
    }
    e = db.engine_for(url)
    try:
        with e.connect() as conn:
            offsets = {
                r.topic: r.next_offset
                for r in conn.execute(select(db.sink_offsets))
                if r.partition == 0
            }
            refusals = {
                (r.topic, r.offset): (r.key, r.reason)
                for r in conn.execute(select(db.sink_refusals))
            }
            max_ts = conn.execute(
                select(db.sink_orders.c.updated_ms).where(db.sink_orders.c.order_id == "max-ts")
            ).scalar_one()
    finally:
        e.dispose()
    assert offsets == ends, (offsets, ends)
    assert set(refusals) == set(bad_offsets), (refusals, bad_offsets)
    by_name = {name: refusals[at] for at, name in bad_offsets.items()}
    assert "64-bit" in by_name["ts 2^63"][1]
    assert "NUL" in by_name["NUL"][1] and by_name["NUL"][0] == "'nul\\x00id'"
    assert "200 characters" in by_name["long id"][1]
    assert by_name["vetoed"][0] == "vetoed"
    assert by_name["vetoed"][1].startswith("refused by the database: ")
    if backend == "postgres":
        assert "CheckViolation [23514]" in by_name["vetoed"][1]
    else:
        assert "vetoed by a trigger" in by_name["vetoed"][1]
    assert "undecodable" in by_name["not JSON"][1]
    assert "coupon_id" in by_name["long coupon id"][1]
    for key, reason in refusals.values():
        assert key is None or len(key) <= 128
        assert len(reason) <= 400

    got_orders, got_coupons, n_refusals = sink_tables(url)
    want_orders = {}
    want_coupons = {}
    for o, (outs, _) in emitted.items():
        for out in outs:
            if isinstance(out, Change):
                want_orders[o] = (out.to_status.value, out.version, out.ts_ms, out.event_id)
            else:
                want_coupons[out.coupon_id] = (out.order_id, out.user_id, out.amount_cents)
    assert got_orders == want_orders
    assert got_coupons == want_coupons
    assert max_ts == TOP and want_coupons[emitted["rich"][0][-1].coupon_id][2] == TOP  # type: ignore[union-attr]
    assert n_refusals == len(bad_offsets)

    # A restart replays nothing and refuses nothing twice: the refusals committed with
    # the offsets.
    sink.start()
    assert sink.wait(120) == 0, sink.tail()
    assert sink_tables(url) == (want_orders, want_coupons, len(bad_offsets))
    assert "Traceback" not in sink.log(), sink.tail()


async def test_shop_paid_cents_holds_what_partial_payments_sum_to(pg_url: str) -> None:  # noqa: F811
    """Each payment < 2^63, their sum up to nearly 2^64: the business table holds it."""
    e = db.engine_for(pg_url)
    try:
        db.create_schema(e)
        t = db.shop_orders
        with e.begin() as conn:
            conn.execute(
                insert(t).values(
                    order_id="rich",
                    user_id="u",
                    amount_cents=TOP,
                    paid_cents=TOP - 1,
                    status="CREATED",
                    version=1,
                    updated_ms=1,
                )
            )
            # as pipeline/tools/shop.py adds a payment: in SQL, on the stored sum
            conn.execute(update(t).values(paid_cents=t.c.paid_cents + TOP))
        with e.connect() as conn:
            paid = conn.execute(select(t.c.paid_cents)).scalar_one()
        assert paid == 2**64 - 3 and type(paid) is int
    finally:
        e.dispose()


# -- the relay ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
async def test_relay_marks_poison_rows_and_publishes_every_other_row(
    backend: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    env: dict[str, str],
    settings: Settings,
    procs: Callable[..., Proc],  # noqa: F811
) -> None:
    url = database(backend, request, tmp_path)
    e = db.engine_for(url)
    db.create_schema(e)
    raw = settings.topic_raw
    # A topic of one partition, so that small rows share batches with the refused ones;
    # the broker's per-record limit set here, not taken from the broker's defaults.
    audit = f"{raw}.audit"
    await ensure_topics(
        settings.bootstrap_servers, [audit], 1, config={"max.message.bytes": "1048588"}
    )
    keys = [f"k{i}" for i in range(10)]
    poison: dict[str, str] = {}

    def raw_row(conn: object, k: str, n: int) -> None:
        doc = {"event_id": f"{k}-e{n}", "type": "OrderShipped", "order_id": k, "ts_ms": n}
        outbox.add(
            conn,  # type: ignore[arg-type]
            event_id=f"{k}-e{n}",
            topic=raw,
            key=k.encode(),
            value=orjson.dumps(doc),
        )

    def other(conn: object, event_id: str, topic: str, key: bytes, value: bytes) -> None:
        outbox.add(conn, event_id=event_id, topic=topic, key=key, value=value)  # type: ignore[arg-type]

    with e.begin() as conn:
        for n in range(5):
            for k in keys:
                raw_row(conn, k, n)
            other(conn, f"s-{n}", audit, b"s", orjson.dumps(n))
            if n == 1:
                # over the producer's max_request_size (2 MiB): refused by send() itself
                other(conn, "giant-key", audit, b"g" * (2 * 1024 * 1024), b"{}")
                poison["giant-key"] = "MessageSizeTooLargeError"
                # within it, but over the topic's max.message.bytes: the broker refuses
                # its whole batch
                other(conn, "broker-refuses", audit, b"b" * 1_500_000, b"{}")
                poison["broker-refuses"] = "MessageSizeTooLargeError"
                # a name Kafka refuses, between two rows of key k3
                other(conn, "bad-topic", "bad topic!", b"k3", b"{}")
                poison["bad-topic"] = "not a legal Kafka topic name"
                for m in range(5, 8):
                    other(conn, f"s-{m}", audit, b"s", orjson.dumps(m))
    e.dispose()

    relay = procs("relay", ["outbox-relay", "--db", url, "--batch", "100"], env)
    relay.start()
    deadline = time.monotonic() + 90
    while True:
        pending = await asyncio.to_thread(pending_rows, url)
        if pending == 0:
            break
        assert relay.alive, f"the relay died with {pending} rows pending:\n{relay.tail()}"
        assert time.monotonic() < deadline, f"{pending} rows still pending:\n{relay.tail()}"
        await asyncio.sleep(0.3)
    assert relay.alive, relay.tail()
    relay.proc.terminate()  # type: ignore[union-attr]
    assert relay.wait(30) == 0, relay.tail()
    assert relay.starts == 1

    e = db.engine_for(url)
    try:
        with e.connect() as conn:
            rows = {r.event_id: r for r in conn.execute(select(db.outbox))}
    finally:
        e.dispose()
    for event_id, reason in poison.items():
        row = rows.pop(event_id)
        assert row.published_ms is None and reason in (row.error or ""), (event_id, row.error)
        assert len(row.error) <= 2000
        assert f"event_id={event_id}" in relay.log() and "not published" in relay.log()
    assert all(r.published_ms is not None and r.error is None for r in rows.values())

    seqs: dict[bytes | None, list[int]] = defaultdict(list)
    async for m in read_topic(settings.bootstrap_servers, raw):
        seqs[m.key].append(orjson.loads(m.value or b"")["ts_ms"])
    assert seqs == {k.encode(): list(range(5)) for k in keys}  # each once, in order
    audited = [(m.key, m.value) async for m in read_topic(settings.bootstrap_servers, audit)]
    assert audited == [(b"s", orjson.dumps(n)) for n in [0, 1, 5, 6, 7, 2, 3, 4]]
    assert "Traceback" not in relay.log(), relay.tail()
