"""The sink's pure planning and its one-transaction apply, on SQLite (no Kafka)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from pipeline.domain.orders import coupon_id
from pipeline.edges import db
from pipeline.edges.sink import (
    BadRec,
    ChangeRec,
    Conflict,
    CouponRec,
    OrderRow,
    Rec,
    apply_batch,
    load_offsets,
    parse_record,
    plan_batch,
    read_stored,
    write_plan,
)

CH, CP = "orders.changes", "coupons.issued"

LIFE = [("NEW", "CREATED"), ("CREATED", "PAID"), ("PAID", "SHIPPED")]


def change(order: str, version: int, offset: int, partition: int = 0) -> ChangeRec:
    frm, to = LIFE[version - 1]
    return ChangeRec(
        CH, partition, offset, f"{order}-e{version}", order, frm, to, version, 1000 + version
    )


def coupon(order: str, offset: int, partition: int = 0) -> CouponRec:
    return CouponRec(CP, partition, offset, coupon_id(order), order, "u1", 500)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = db.engine_for(str(tmp_path / "sink.db"))
    db.create_schema(e)
    yield e
    e.dispose()


def apply(engine: Engine, records: list[Rec]) -> object:
    with engine.begin() as conn:
        return apply_batch(conn, records)


def orders_table(engine: Engine) -> dict[str, tuple[str, int]]:
    with engine.connect() as conn:
        o = db.sink_orders
        return {r.order_id: (r.status, r.version) for r in conn.execute(select(o))}


def count(engine: Engine, table: object) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())  # type: ignore[arg-type]


# -- parse --------------------------------------------------------------------------------


def test_parse_change_and_coupon() -> None:
    value = orjson.dumps(
        {
            "event_id": "e1",
            "order_id": "o1",
            "from": "NEW",
            "to": "CREATED",
            "version": 1,
            "ts_ms": 5,
        }
    )
    assert parse_record("changes", CH, 2, 7, value) == ChangeRec(
        CH, 2, 7, "e1", "o1", "NEW", "CREATED", 1, 5
    )
    value = orjson.dumps({"coupon_id": "c", "order_id": "o1", "user_id": "u", "amount_cents": 9})
    assert parse_record("coupons", CP, 0, 1, value) == CouponRec(CP, 0, 1, "c", "o1", "u", 9)


@pytest.mark.parametrize(
    "value",
    [
        b"{not json",
        b"[1]",
        None,
        orjson.dumps({"order_id": "o", "from": "NEW", "to": "CREATED", "version": 1, "ts_ms": 1}),
        orjson.dumps(
            {"event_id": "e", "order_id": "o", "from": "NEW", "to": "X", "version": 1, "ts_ms": 1}
        ),
        orjson.dumps(
            {
                "event_id": "e",
                "order_id": "o",
                "from": "NEW",
                "to": "PAID",
                "version": "1",
                "ts_ms": 1,
            }
        ),
        orjson.dumps(
            {
                "event_id": "e",
                "order_id": "o",
                "from": "NEW",
                "to": "PAID",
                "version": 0,
                "ts_ms": 1,
            }
        ),
    ],
)
def test_parse_bad_change(value: bytes | None) -> None:
    rec = parse_record("changes", CH, 0, 3, value)
    assert isinstance(rec, BadRec) and rec.offset == 3 and "undecodable" in rec.reason


# -- plan (pure) --------------------------------------------------------------------------


def test_plan_folds_an_order_and_advances_offsets() -> None:
    plan = plan_batch([change("a", 1, 0), change("a", 2, 1), change("a", 3, 2)], {}, {})
    assert plan.inserts == [OrderRow("a", "SHIPPED", 3, 1003, "a-e3")]
    assert not plan.updates and not plan.refusals
    assert plan.offsets == {(CH, 0): 3}


def test_plan_updates_from_stored_version() -> None:
    stored = {"a": OrderRow("a", "CREATED", 1, 1001, "a-e1")}
    plan = plan_batch([change("a", 2, 5)], {(CH, 0): 5}, stored)
    assert plan.updates == [(1, OrderRow("a", "PAID", 2, 1002, "a-e2"))]
    assert not plan.inserts


def test_plan_refuses_replay_stale_gap_and_wrong_from() -> None:
    stored = {"a": OrderRow("a", "PAID", 2, 1002, "a-e2")}
    recs: list[Rec] = [
        change("a", 2, 0),  # replay of the stored version
        change("a", 1, 1),  # stale
        ChangeRec(CH, 0, 2, "x", "a", "PAID", "SHIPPED", 4, 1),  # gap
        ChangeRec(CH, 0, 3, "y", "a", "CREATED", "CANCELLED", 3, 1),  # wrong from
        change("b", 2, 4),  # never created
    ]
    plan = plan_batch(recs, {}, stored)
    assert [f.offset for f in plan.refusals] == [0, 1, 2, 3, 4]
    assert "stale" in plan.refusals[0].reason and "gap" in plan.refusals[2].reason
    assert "from CREATED" in plan.refusals[3].reason
    assert not plan.inserts and not plan.updates
    assert plan.offsets == {(CH, 0): 5}


def test_plan_skips_records_below_the_stored_offset() -> None:
    plan = plan_batch(
        [change("a", 1, 0), change("a", 2, 1)],
        {(CH, 0): 1},
        {"a": OrderRow("a", "CREATED", 1, 1001, "a-e1")},
    )
    assert plan.skipped == 1
    assert plan.updates == [(1, OrderRow("a", "PAID", 2, 1002, "a-e2"))]
    assert not plan.refusals


def test_plan_coupon_once_per_order() -> None:
    plan = plan_batch([coupon("a", 0), coupon("a", 1), coupon("b", 2)], {}, {}, [coupon_id("b")])
    assert [c.order_id for c in plan.coupons] == ["a"]
    assert len(plan.refusals) == 2


def test_plan_bad_record_is_refused_and_passed() -> None:
    plan = plan_batch([BadRec(CH, 1, 4, "undecodable")], {}, {})
    assert plan.offsets == {(CH, 1): 5} and len(plan.refusals) == 1


def _lifecycle_records(orders: int, parts: int) -> list[Rec]:
    # Each order's changes in its partition, in version order, interleaved across orders.
    per_part: dict[int, list[Rec]] = {p: [] for p in range(parts)}
    for n in range(orders):
        p = n % parts
        for v in range(1, 1 + (n % 3) + 1):
            per_part[p].append(change(f"o{n}", v, 0, p))
    out: list[Rec] = []
    for p, recs in per_part.items():
        out.extend(
            ChangeRec(
                CH, p, i, r.event_id, r.order_id, r.from_status, r.to_status, r.version, r.ts_ms
            )
            for i, r in enumerate(recs)
            if isinstance(r, ChangeRec)
        )
    return out


def _run_plans(
    records: list[Rec], cuts: list[int]
) -> tuple[dict[str, OrderRow], dict[tuple[str, int], int], int]:
    """Apply plans batch by batch to an in-memory state; returns rows, offsets, refusals."""
    rows: dict[str, OrderRow] = {}
    offsets: dict[tuple[str, int], int] = {}
    refused = 0
    bounds = [0, *sorted(set(cuts)), len(records)]
    for lo, hi in itertools.pairwise(bounds):
        plan = plan_batch(records[lo:hi], offsets, rows)
        for r in plan.inserts:
            assert r.order_id not in rows
            rows[r.order_id] = r
        for expected, r in plan.updates:
            assert rows[r.order_id].version == expected
            rows[r.order_id] = r
        offsets.update(plan.offsets)
        refused += len(plan.refusals)
    return rows, offsets, refused


@given(st.integers(1, 30), st.integers(1, 4), st.lists(st.integers(0, 200), max_size=8))
def test_any_batching_gives_the_same_rows(orders: int, parts: int, cuts: list[int]) -> None:
    records = _lifecycle_records(orders, parts)
    cuts = [c for c in cuts if c <= len(records)]
    whole = _run_plans(records, [])
    split = _run_plans(records, cuts)
    assert split == whole
    rows, _, refused = whole
    assert refused == 0
    assert {k: r.version for k, r in rows.items()} == {f"o{n}": (n % 3) + 1 for n in range(orders)}


@given(st.integers(2, 20), st.data())
def test_replays_never_move_a_row_backwards(orders: int, data: st.DataObject) -> None:
    records = _lifecycle_records(orders, 2)
    rows, offsets, _ = _run_plans(records, [])
    # Replay any records again, as new offsets (a duplicate delivery outside our EOS).
    again = data.draw(st.lists(st.sampled_from(records), min_size=1, max_size=20))
    replay = [
        ChangeRec(CH, 9, i, r.event_id, r.order_id, r.from_status, r.to_status, r.version, r.ts_ms)
        for i, r in enumerate(again)
        if isinstance(r, ChangeRec)
    ]
    plan = plan_batch(replay, offsets, rows)
    assert not plan.inserts and not plan.updates
    assert len(plan.refusals) == len(replay)


# -- apply (SQLite) -----------------------------------------------------------------------


def test_apply_writes_rows_and_offsets_in_one_transaction(engine: Engine) -> None:
    apply(engine, [change("a", 1, 0), change("b", 1, 1), coupon("a", 0)])
    apply(engine, [change("a", 2, 2), change("a", 3, 3)])
    assert orders_table(engine) == {"a": ("SHIPPED", 3), "b": ("CREATED", 1)}
    with engine.connect() as conn:
        assert load_offsets(conn) == {(CH, 0): 4, (CP, 0): 1}
    assert count(engine, db.sink_coupons) == 1
    assert count(engine, db.sink_refusals) == 0


def test_apply_replayed_batch_is_skipped_by_offsets(engine: Engine) -> None:
    batch: list[Rec] = [change("a", 1, 0), change("a", 2, 1), coupon("a", 0)]
    apply(engine, batch)
    plan = apply(engine, batch)
    assert plan.skipped == 3  # type: ignore[attr-defined]
    assert orders_table(engine) == {"a": ("PAID", 2)}
    assert count(engine, db.sink_coupons) == 1
    assert count(engine, db.sink_refusals) == 0


def test_apply_refusals_are_recorded(engine: Engine) -> None:
    apply(engine, [change("a", 1, 0), change("a", 2, 1)])
    apply(engine, [change("a", 1, 2), coupon("a", 0), coupon("a", 1)])
    assert orders_table(engine) == {"a": ("PAID", 2)}
    with engine.connect() as conn:
        reasons = [r.reason for r in conn.execute(select(db.sink_refusals))]
    assert len(reasons) == 2 and "stale" in reasons[0] and "duplicate coupon" in reasons[1]


def test_failed_transaction_leaves_neither_rows_nor_offsets(engine: Engine) -> None:
    apply(engine, [change("a", 1, 0)])
    with pytest.raises(RuntimeError), engine.begin() as conn:
        apply_batch(conn, [change("a", 2, 1), coupon("a", 0)])
        raise RuntimeError("crash before the commit")
    assert orders_table(engine) == {"a": ("CREATED", 1)}
    with engine.connect() as conn:
        assert load_offsets(conn) == {(CH, 0): 1}
    assert count(engine, db.sink_coupons) == 0


def test_a_second_writer_is_fenced_by_the_offset_compare_and_set(engine: Engine) -> None:
    apply(engine, [change("a", 1, 0)])
    batch: list[Rec] = [change("a", 2, 1)]
    # Two sinks read the same stored state; the first one commits its batch.
    with engine.connect() as conn:
        stale = read_stored(conn, batch)
    apply(engine, batch)
    plan = plan_batch(batch, stale.offsets, stale.orders)
    with pytest.raises(Conflict, match="offset"), engine.begin() as conn:
        write_plan(conn, plan, stale.offsets)
    assert orders_table(engine) == {"a": ("PAID", 2)}


def test_the_version_guard_refuses_an_update_on_a_moved_row(engine: Engine) -> None:
    apply(engine, [change("a", 1, 0)])
    batch: list[Rec] = [change("a", 2, 1)]
    with engine.connect() as conn:
        stale = read_stored(conn, batch)
    plan = plan_batch(batch, stale.offsets, stale.orders)
    with engine.begin() as conn:  # another writer moves the row, not the offsets
        conn.execute(update(db.sink_orders).values(version=5, status="SHIPPED"))
    with pytest.raises(Conflict, match="order rows"), engine.begin() as conn:
        write_plan(conn, plan, stale.offsets)
    assert orders_table(engine) == {"a": ("SHIPPED", 5)}
    with engine.connect() as conn:
        assert load_offsets(conn) == {(CH, 0): 1}


def test_unique_constraints_refuse_duplicate_inserts(engine: Engine) -> None:
    row = {"coupon_id": "c1", "order_id": "o1", "user_id": "u", "amount_cents": 1}
    with engine.begin() as conn:
        conn.execute(insert(db.sink_coupons).values(**row))
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(insert(db.sink_coupons).values(**{**row, "coupon_id": "c2"}))
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(insert(db.sink_coupons).values(**{**row, "order_id": "o2"}))
    with engine.begin() as conn:
        conn.execute(
            insert(db.sink_orders).values(
                order_id="o1", status="CREATED", version=1, updated_ms=1, event_id="e"
            )
        )
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(
            insert(db.sink_orders).values(
                order_id="o1", status="CREATED", version=1, updated_ms=1, event_id="e"
            )
        )


def test_url_forms(tmp_path: Path) -> None:
    assert db.normalize_url("postgresql://u:p@h:1/d") == "postgresql+psycopg://u:p@h:1/d"
    assert db.normalize_url("sqlite:///x.db") == "sqlite:///x.db"
    assert db.normalize_url(str(tmp_path / "a.db")) == f"sqlite:///{tmp_path / 'a.db'}"
    e = db.engine_for("sqlite://")
    db.create_schema(e)
    db.create_schema(e)  # idempotent
    assert count(e, db.sink_orders) == 0


# -- values the database refuses (issue 12, item 5) ---------------------------------------


def _refusals(engine: Engine) -> dict[tuple[str, int], tuple[str | None, str]]:
    r = db.sink_refusals
    with engine.connect() as conn:
        return {
            (x.topic, x.offset): (x.key, x.reason)
            for x in conn.execute(select(r.c.topic, r.c.offset, r.c.key, r.c.reason))
        }


def test_a_value_no_column_holds_is_refused_and_the_rest_of_the_batch_lands(
    engine: Engine,
) -> None:
    """ts_ms >= 2^63 made SQLite's driver raise OverflowError (PostgreSQL: DataError) for
    the whole batch, on every restart: the sink crash-looped and nothing behind it landed."""
    top = 2**63 - 1
    batch: list[Rec] = [
        change("a", 1, 0),
        ChangeRec(CH, 0, 1, "b-e1", "b", "NEW", "CREATED", 1, 2**63),
        ChangeRec(CH, 0, 2, "c-e1", "c", "NEW", "CREATED", 1, top),
        ChangeRec(CH, 0, 3, "n-e1", "n\x00ul", "NEW", "CREATED", 1, 5),
        ChangeRec(CH, 0, 4, "l-e1", "l" * 129, "NEW", "CREATED", 1, 5),
        change("a", 2, 5),
        ChangeRec(CH, 0, 6, "b-e2", "b", "CREATED", "PAID", 2, 7),  # its v1 was refused
        CouponRec(CP, 0, 0, coupon_id("rich"), "rich", "u1", top),
        CouponRec(CP, 0, 1, coupon_id("poor"), "poor", "u1", 2**63),
        coupon("a", 2),
    ]
    plan = apply(engine, batch)
    assert orders_table(engine) == {"a": ("PAID", 2), "c": ("CREATED", 1)}
    with engine.connect() as conn:
        assert load_offsets(conn) == {(CH, 0): 7, (CP, 0): 3}
        stored_ts = conn.execute(
            select(db.sink_orders.c.updated_ms).where(db.sink_orders.c.order_id == "c")
        ).scalar_one()
        amounts = dict(
            conn.execute(select(db.sink_coupons.c.order_id, db.sink_coupons.c.amount_cents)).all()
        )
    assert stored_ts == top
    assert amounts == {"rich": top, "a": 500}
    refused = _refusals(engine)
    assert set(refused) == {(CH, 1), (CH, 3), (CH, 4), (CH, 6), (CP, 1)}
    assert "updated_ms" in refused[(CH, 1)][1] and "64-bit" in refused[(CH, 1)][1]
    assert "NUL" in refused[(CH, 3)][1] and refused[(CH, 3)][0] == "'n\\x00ul'"
    assert "129 characters" in refused[(CH, 4)][1]
    assert "gap" in refused[(CH, 6)][1]
    assert "amount_cents" in refused[(CP, 1)][1]
    assert len(plan.refusals) == 5  # type: ignore[attr-defined]


def test_a_refusal_only_the_database_knows_is_isolated_to_its_record(engine: Engine) -> None:
    """A constraint the plan cannot foresee (here a trigger) fails the batch's writes: the
    batch is split down to the one record, which is refused with the database's reason,
    and every other row of the batch lands in the same transaction as the offsets."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TRIGGER veto BEFORE INSERT ON orders WHEN NEW.order_id = 'vetoed'"
            " BEGIN SELECT RAISE(ABORT, 'vetoed by a trigger'); END"
        )
    batch: list[Rec] = [change(f"o{i}", 1, i) for i in range(40)]
    batch[17] = change("vetoed", 1, 17)
    batch.append(change("vetoed", 2, 40))
    batch.append(change("o3", 2, 41))
    apply(engine, batch)
    want = {f"o{i}": ("CREATED", 1) for i in range(40) if i != 17}
    want["o3"] = ("PAID", 2)
    assert orders_table(engine) == want
    with engine.connect() as conn:
        assert load_offsets(conn) == {(CH, 0): 42}
    refused = _refusals(engine)
    assert set(refused) == {(CH, 17), (CH, 40)}
    key, reason = refused[(CH, 17)]
    assert key == "vetoed"
    assert reason.startswith("refused by the database: IntegrityError")
    assert "vetoed by a trigger" in reason
    assert "gap" in refused[(CH, 40)][1]


def test_driver_refusals_are_isolated_without_the_plan_check(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database path on its own: with the plan's check off, sqlite3's OverflowError
    and an unencodable string are content errors of their record only."""
    monkeypatch.setattr("pipeline.edges.sink.unstorable", lambda rec: None)
    batch: list[Rec] = [
        change("a", 1, 0),
        ChangeRec(CH, 0, 1, "b-e1", "b", "NEW", "CREATED", 1, 2**63),
        ChangeRec(CH, 0, 2, "s-e1", "s\ud800", "NEW", "CREATED", 1, 5),
        change("c", 1, 3),
        CouponRec(CP, 0, 0, "cp", "p", "u", -(2**63) - 1),
    ]
    apply(engine, batch)
    assert orders_table(engine) == {"a": ("CREATED", 1), "c": ("CREATED", 1)}
    refused = _refusals(engine)
    assert set(refused) == {(CH, 1), (CH, 2), (CP, 0)}
    assert "OverflowError" in refused[(CH, 1)][1]
    assert "UnicodeEncodeError" in refused[(CH, 2)][1]
    with engine.connect() as conn:
        assert load_offsets(conn) == {(CH, 0): 4, (CP, 0): 1}


def test_a_refusal_the_database_cannot_hold_either_is_written_in_ascii(engine: Engine) -> None:
    """A database whose encoding cannot hold the refused record's id (here a trigger
    refusing non-ASCII in sink_refusals) still gets the refusal, so the sink moves on."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TRIGGER veto BEFORE INSERT ON orders WHEN NEW.order_id = 'ca\u00f1on'"
            " BEGIN SELECT RAISE(ABORT, 'vetoed'); END"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER ascii_only BEFORE INSERT ON sink_refusals"
            " WHEN NEW.key GLOB '*[^ -~]*' BEGIN SELECT RAISE(ABORT, 'not ASCII'); END"
        )
    apply(engine, [change("a", 1, 0), change("ca\u00f1on", 1, 1), change("b", 1, 2)])
    assert orders_table(engine) == {"a": ("CREATED", 1), "b": ("CREATED", 1)}
    key, reason = _refusals(engine)[(CH, 1)]
    assert key == "'ca\\xf1on'" and "vetoed" in reason
    with engine.connect() as conn:
        assert load_offsets(conn) == {(CH, 0): 3}


def test_a_conflict_inside_the_savepoint_still_fails_the_transaction(engine: Engine) -> None:
    """A row moved under the sink is a conflict to replay, never a refusal of content."""
    apply(engine, [change("a", 1, 0)])
    with engine.begin() as conn:
        # The update then matches no row, as if another writer had moved it.
        conn.exec_driver_sql(
            "CREATE TRIGGER hold BEFORE UPDATE ON orders BEGIN SELECT RAISE(IGNORE); END"
        )
    with pytest.raises(Conflict, match="order rows"), engine.begin() as conn:
        apply_batch(conn, [change("b", 1, 1), change("a", 2, 2)])
    assert orders_table(engine) == {"a": ("CREATED", 1)}
    assert _refusals(engine) == {}
    with engine.connect() as conn:
        assert load_offsets(conn) == {(CH, 0): 1}


def test_refusal_keys_and_reasons_are_bounded() -> None:
    huge = "x" * 1_000_000
    plan = plan_batch(
        [
            ChangeRec(CH, 0, 0, "e", huge, "NEW", "CREATED", 1, 1),
            CouponRec(CP, 0, 0, huge, "o", "u", 1),
            ChangeRec(CH, 0, 1, huge, "o", "NEW", "CREATED", 1, 1),
        ],
        {},
        {},
    )
    assert len(plan.refusals) == 3
    for f in plan.refusals:
        assert f.key is None or len(f.key) <= 128
        assert len(f.reason) <= 200, f.reason
    bad = parse_record(
        "changes",
        CH,
        0,
        0,
        orjson.dumps(
            {"event_id": "e", "order_id": "o", "from": huge, "to": "X", "version": 1, "ts_ms": 1}
        ),
    )
    assert isinstance(bad, BadRec) and len(bad.reason) <= 200, bad


def _with_bad_values(records: list[Rec], picks: list[int]) -> list[Rec]:
    out = list(records)
    for i in picks:
        r = out[i % len(out)]
        if isinstance(r, ChangeRec):
            out[i % len(out)] = ChangeRec(
                r.topic, r.partition, r.offset, r.event_id, r.order_id, r.from_status,
                r.to_status, r.version, 2**63 + i,
            )  # fmt: skip
    return out


@given(
    st.integers(1, 20),
    st.integers(1, 3),
    st.lists(st.integers(0, 200), max_size=5),
    st.lists(st.integers(0, 200), max_size=8),
)
def test_refusals_of_unstorable_values_do_not_depend_on_the_batching(
    orders: int, parts: int, bad: list[int], cuts: list[int]
) -> None:
    records = _with_bad_values(_lifecycle_records(orders, parts), bad)
    cuts = [c for c in cuts if c <= len(records)]
    assert _run_plans(records, cuts) == _run_plans(records, [])
