"""The outbox library, the relay's pure decisions and its SQLite claims; the example
writer's lifecycles. SQLite files, no Kafka."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine, func, insert, select, update

from pipeline import db, outbox, shop
from pipeline.models import OrderEvent, parse_event
from pipeline.outbox import BUCKETS, Claims, Row, bucket_of, invalid_reason, published_prefix
from tables.orders import Order, Rejected, transition

RAW = "orders.raw"
#: zlib.crc32 of b"o0".."o3" modulo 64, computed once
BUCKETS_OF_O0_TO_O3 = [59, 45, 23, 1]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = db.engine_for(str(tmp_path / "app.db"))
    db.create_schema(e)
    yield e
    e.dispose()


def event(order: str, n: int, kind: str = "OrderShipped") -> bytes:
    return orjson.dumps({"event_id": f"{order}-e{n}", "type": kind, "order_id": order, "ts_ms": 1})


def add(conn: object, order: str, n: int) -> None:
    outbox.add(
        conn,  # type: ignore[arg-type]
        event_id=f"{order}-e{n}",
        topic=RAW,
        key=order.encode(),
        value=event(order, n),
        created_ms=1000 + n,
    )


def rows(engine: Engine) -> list[tuple[str, int | None, str | None]]:
    o = db.outbox
    with engine.connect() as conn:
        return [
            (r.event_id, r.published_ms, r.error) for r in conn.execute(select(o).order_by(o.c.id))
        ]


def test_business_row_and_event_commit_together(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            insert(db.shop_orders).values(
                order_id="a",
                user_id="u",
                amount_cents=5,
                paid_cents=0,
                status="CREATED",
                version=1,
                updated_ms=1,
            )
        )
        add(conn, "a", 0)
    assert [r[0] for r in rows(engine)] == ["a-e0"]


def test_rollback_drops_both(engine: Engine) -> None:
    with pytest.raises(RuntimeError), engine.begin() as conn:
        conn.execute(
            insert(db.shop_orders).values(
                order_id="b",
                user_id="u",
                amount_cents=5,
                paid_cents=0,
                status="CREATED",
                version=1,
                updated_ms=1,
            )
        )
        add(conn, "b", 0)
        raise RuntimeError("the application fails before commit")
    assert rows(engine) == []
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(db.shop_orders)).scalar_one() == 0


def test_event_id_is_unique(engine: Engine) -> None:
    from sqlalchemy.exc import IntegrityError

    with engine.begin() as conn:
        add(conn, "a", 0)
    with pytest.raises(IntegrityError), engine.begin() as conn:
        add(conn, "a", 0)


def test_bucket_is_stable_and_by_key() -> None:
    assert bucket_of(b"o1", "x") == bucket_of(b"o1", "y")
    assert 0 <= bucket_of(b"o1", "x") < BUCKETS
    assert bucket_of(None, "e1") == bucket_of(b"e1", "zzz")  # keyless: by event id
    # A fixed value: not Python's salted hash(), the same in every process.
    assert [bucket_of(f"o{i}".encode(), "") for i in range(4)] == BUCKETS_OF_O0_TO_O3


def _row(i: int, key: bytes | None, value: bytes, topic: str = RAW, event_id: str = "") -> Row:
    return Row(i, event_id or f"{(key or b'').decode()}-e{i}", topic, key, value, 0, 1)


def test_invalid_rows_are_named() -> None:
    good = Row(
        1,
        "a-e0",
        RAW,
        b"a",
        orjson.dumps({"event_id": "a-e0", "type": "OrderShipped", "order_id": "a", "ts_ms": 1}),
        0,
        1,
    )
    assert invalid_reason(good, RAW) is None
    assert "not a valid" in (invalid_reason(_row(2, b"a", b"{nope"), RAW) or "")
    other_key = Row(3, "b-e0", RAW, b"a", event("b", 0), 0, 1)
    assert "does not equal" in (invalid_reason(other_key, RAW) or "")
    wrong_id = Row(4, "zzz", RAW, b"a", event("a", 0), 0, 1)
    assert "event_id" in (invalid_reason(wrong_id, RAW) or "")
    # Other topics: only the size limit applies.
    assert invalid_reason(_row(5, b"a", b"anything", topic="audit"), RAW) is None
    big = _row(6, b"a", b"x" * (1024 * 1024 + 1), topic="audit")
    assert "1 MiB" in (invalid_reason(big, RAW) or "")


def test_published_prefix_stops_a_key_at_its_first_failure() -> None:
    rs = [_row(1, b"a", b""), _row(2, b"b", b""), _row(3, b"a", b""), _row(4, b"b", b"")]
    assert published_prefix(rs, [True, False, True, True]) == [1, 3]
    assert published_prefix(rs, [False, True, True, True]) == [2, 4]
    assert published_prefix(rs, [True] * 4) == [1, 2, 3, 4]


@given(st.lists(st.tuples(st.sampled_from([b"a", b"b", b"c"]), st.booleans()), max_size=40))
def test_published_prefix_marks_only_per_key_prefixes(items: list[tuple[bytes, bool]]) -> None:
    rs = [_row(i, k, b"") for i, (k, _) in enumerate(items)]
    marked = set(published_prefix(rs, [ok for _, ok in items]))
    by_key: dict[bytes, list[int]] = defaultdict(list)
    for r in rs:
        assert r.key is not None
        by_key[r.key].append(r.id)
    for ids in by_key.values():
        flags = [i in marked for i in ids]
        # marked rows of a key are a prefix of its rows, and each marked row was sent ok
        assert flags == sorted(flags, reverse=True)
    assert all(items[i][1] for i in marked)


def lease(engine: Engine) -> tuple[str, int]:
    with engine.connect() as conn:
        row = conn.execute(select(db.outbox_lease)).one()
    return row.owner, row.expires_ms


def test_sqlite_lease_one_relay_at_a_time(engine: Engine) -> None:
    # A lease far longer than any stall of a loaded machine: it only ends where the test
    # ends it, so no step below depends on how fast the one before it ran.
    a, b = Claims(engine, "a", lease_s=60), Claims(engine, "b", lease_s=60)
    before = db.now_ms()
    assert a.refresh() == set(range(BUCKETS))
    assert b.refresh() == set()
    first = lease(engine)
    assert first[0] == "a" and first[1] >= before + 60_000
    before = db.now_ms()
    assert a.refresh() == set(range(BUCKETS))  # renewal
    renewed = lease(engine)
    assert renewed[0] == "a" and renewed[1] >= before + 60_000
    # a stops renewing (crashed): b takes over once the lease has expired
    with engine.begin() as conn:
        conn.execute(update(db.outbox_lease).values(expires_ms=db.now_ms() - 1))
    before = db.now_ms()
    assert b.refresh() == set(range(BUCKETS))
    owner, expires = lease(engine)
    assert owner == "b" and expires >= before + 60_000
    assert a.refresh() == set()
    assert lease(engine) == (owner, expires)  # a's refresh neither took nor renewed it


def test_fetch_in_id_order_skips_published_and_failed(engine: Engine) -> None:
    with engine.begin() as conn:
        for n in range(5):
            add(conn, "a", n)
    c = Claims(engine, "r")
    owned = c.refresh()
    got = c.fetch(owned, 10)
    assert [r.event_id for r in got] == [f"a-e{n}" for n in range(5)]
    c.mark([got[0].id, got[2].id], {got[1].id: "bad value"})
    assert [r.event_id for r in c.fetch(owned, 10)] == ["a-e3", "a-e4"]
    assert [r.event_id for r in c.fetch(owned, 1)] == ["a-e3"]
    published = rows(engine)
    assert published[1][2] == "bad value" and published[1][1] is None
    assert published[0][1] is not None
    # a bucket not owned is not fetched
    assert c.fetch(owned - {bucket_of(b"a", "")}, 10) == []


def test_shop_lifecycles_are_legal_and_versions_count_steps() -> None:
    orders: dict[str, Order] = {}
    steps: dict[str, int] = defaultdict(int)
    seen = 0
    for step in shop.lifecycles(300, seed=3, prefix="x"):
        seen += 1
        ev = parse_event(orjson.dumps(shop.event_of(step, 5)), step.order_id.encode())
        assert isinstance(ev, OrderEvent), ev
        after, outputs = transition(orders.get(step.order_id), ev)
        assert not any(isinstance(o, Rejected) for o in outputs), (step, outputs)
        orders[step.order_id] = after
        steps[step.order_id] += 1
        assert after.status.value == step.status
    assert len(orders) == 300
    assert all(orders[o].version == n for o, n in steps.items())
    assert 2.0 < seen / 300 < 3.0
    # some of every ending
    assert {o.status.value for o in orders.values()} == {"CREATED", "PAID", "SHIPPED", "CANCELLED"}


def test_shop_writes_business_rows_and_events(engine: Engine) -> None:
    n = shop.write_orders(engine, 40, RAW, seed=2, prefix="w")
    with engine.connect() as conn:
        biz = {r.order_id: r for r in conn.execute(select(db.shop_orders))}
        evs = conn.execute(select(db.outbox).order_by(db.outbox.c.id)).all()
    assert len(biz) == 40 and len(evs) == n
    per_order: dict[str, int] = defaultdict(int)
    for r in evs:
        doc = orjson.loads(r.value)
        assert r.key == doc["order_id"].encode() and r.event_id == doc["event_id"]
        per_order[doc["order_id"]] += 1
    assert {o: b.version for o, b in biz.items()} == dict(per_order)
    # A retried step whose commit went through is not applied twice.
    first = next(iter(shop.lifecycles(40, seed=2, prefix="w")))
    shop.apply_step(engine, first, RAW, retry=True)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(db.outbox)).scalar_one() == n
