"""``reconcile``'s own state machine and output checks, on synthetic topics.

The contract's rules one by one, then a cross-check on random event sequences: what
the workers' operators write (``pipeline.agents.orders.decide_order`` and ``decide_balance``,
imported here, in the test only) must pass, and any change to one of their records
must not.
"""

from __future__ import annotations

import json
import random
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.domain.orders import Send, coupon_id, decide_balance, decide_order
from pipeline.kafka_io import Msg
from pipeline.settings import Settings
from pipeline.tools.reconcile import Reconciler, Report, coupon_id_of

S = Settings()


def ev(
    eid: str,
    kind: str,
    order: str = "o1",
    amount: int | None = None,
    user: str | None = None,
    ts: int = 1,
) -> dict[str, Any]:
    d: dict[str, Any] = {"event_id": eid, "type": kind, "order_id": order, "ts_ms": ts}
    if amount is not None:
        d["amount_cents"] = amount
    if user is not None:
        d["user_id"] = user
    return d


def run(events: list[dict[str, Any]], mutate: Any = None) -> Report:
    """The events as orders.unique (and their copies on orders.raw), the workers' outputs
    for them (``mutate(kind, sends)`` may change those), then the whole check."""
    r = Reconciler(S)
    sends: list[tuple[str, bytes, bytes]] = []
    orders: dict[bytes, bytes] = {}
    balances: dict[bytes, bytes] = {}
    raw, unique = [], []
    for n, d in enumerate(events):
        value = orjson.dumps(d)
        key = d["order_id"].encode()
        raw.append(Msg(0, n, 1000 + n, key, value))
        unique.append(Msg(0, n, 1000 + n, key, value, (("pipeline.src", f"0:{n}".encode()),)))
        step = decide_order(value, key, (S.topic_unique, 0, n), orders.get)
        if step.key is not None and step.order is not None:
            orders[step.key] = step.order
        for out in step.sends:
            sends.append((out.kind, out.key, out.value))
            if out.kind == "deltas":
                decided = decide_balance(out.value, ("d", 0, 0), balances.get)
                assert not isinstance(decided, Send)
                balances[decided[0]] = decided[1]
    if mutate is not None:
        mutate(sends, orders, balances)
    for m in unique:
        r.on_unique(m)
    for m in raw:
        r.on_raw(m)
    r.end_raw()
    for n, (kind, key, value) in enumerate(sends):
        r.on_output(kind, Msg(0, n, 0, key, value))
    r.end_outputs()
    report = r.finish()
    report.checks.append(
        r.table_check("orders", dict(orders), {k: v.to_json() for k, v in r.machine.orders.items()})
    )
    report.checks.append(
        r.table_check(
            "balances",
            dict(balances),
            {k: v.to_json() for k, v in r.machine.balances.items()},
        )
    )
    return report


def faults(report: Report) -> dict[str, dict[str, int]]:
    names = ("duplicates", "missing", "unexpected", "out_of_order", "mismatched")
    return {
        c.topic: {n: getattr(c, n) for n in names if getattr(c, n)}
        for c in report.checks
        if not c.ok
    }


LIFE = [
    ev("e1", "OrderCreated", amount=100, user="u1"),
    ev("e2", "PaymentReceived", amount=40, ts=2),  # partial: recorded, not a transition
    ev("e3", "PaymentReceived", amount=70, ts=3),  # reaches the amount: PAID
    ev("e4", "PaymentReceived", amount=1, ts=4),  # rejected: already paid
    ev("e5", "OrderShipped", ts=5),
    ev("e6", "OrderCancelled", ts=6),  # rejected: shipped
    ev("e7", "OrderShipped", order="o2"),  # rejected: never created
    ev("e8", "OrderCreated", order="o3", amount=5, user="u1"),
    ev("e9", "PaymentReceived", order="o3", amount=5),
    ev("e10", "OrderCancelled", order="o3"),  # PAID -> CANCELLED: debited again
    ev("e11", "OrderCreated", order="o3", amount=5, user="u1"),  # rejected: exists
]


def test_the_rules() -> None:
    report = run(LIFE)
    assert report.ok, report.render()
    o1 = report.orders["o1"].to_json()
    assert o1 == {
        "order_id": "o1",
        "status": "SHIPPED",
        "version": 3,
        "user_id": "u1",
        "amount_cents": 100,
        "paid_cents": 110,
        "updated_ms": 5,
    }
    assert report.orders["o3"].status == "CANCELLED" and "o2" not in report.orders
    assert report.balances["u1"].to_json() == {
        "user_id": "u1",
        "balance_cents": 100,
        "version": 3,
        "paid_orders": 1,
    }
    by_topic = {c.topic: c for c in report.checks}
    assert by_topic[S.topic_changes].expected == 6
    assert by_topic[S.topic_rejected].expected == 4
    assert by_topic[S.topic_coupons].expected == 2
    assert by_topic[S.deltas_topic].expected == 3


def test_coupon_id_is_the_workers() -> None:
    for order in ("o1", "ö" * 128, "x"):
        assert coupon_id_of(order) == coupon_id(order)


def test_balances_beyond_64_bits_are_exact() -> None:
    big = 2**63 - 1
    events = []
    for i in range(3):
        events += [
            ev(f"c{i}", "OrderCreated", order=f"o{i}", amount=big, user="rich"),
            ev(f"p{i}", "PaymentReceived", order=f"o{i}", amount=big),
        ]
    report = run(events)
    assert report.ok, report.render()
    assert report.balances["rich"].balance_cents == 3 * big

    def as_float(sends: Any, orders: Any, balances: dict[bytes, bytes]) -> None:
        row = json.loads(balances[b"rich"])
        row["balance_cents"] = float(row["balance_cents"])
        balances[b"rich"] = json.dumps(row).encode()

    assert faults(run(events, as_float)) == {"balances": {"mismatched": 1}}


def _edit(kind: str, n: int, change: Any) -> Any:
    def mutate(sends: list[tuple[str, bytes, bytes]], orders: Any, balances: Any) -> None:
        hits = [i for i, s in enumerate(sends) if s[0] == kind]
        i = hits[n]
        k, key, value = sends[i]
        doc = orjson.loads(value)
        result = change(key, doc)
        if result is None:
            del sends[i]
        elif result == "twice":
            sends.insert(i, sends[i])
        else:
            sends[i] = (k, result[0], orjson.dumps(result[1]))

    return mutate


def _set(field: str, value: Any) -> Any:
    return lambda key, doc: (key, {**doc, field: value})


@pytest.mark.parametrize(
    ("kind", "change", "topic", "want"),
    [
        ("changes", _set("version", 4), S.topic_changes, {"mismatched": 1}),
        ("changes", _set("version", 3.0), S.topic_changes, {"mismatched": 1}),
        ("changes", _set("from", "NEW"), S.topic_changes, {"mismatched": 1}),
        ("changes", _set("ts_ms", 7), S.topic_changes, {"mismatched": 1}),
        ("changes", lambda k, d: (b"u1", d), S.topic_changes, {"mismatched": 1}),
        ("changes", lambda k, d: None, S.topic_changes, {"missing": 1}),
        ("changes", lambda k, d: "twice", S.topic_changes, {"duplicates": 1}),
        ("rejected", _set("state", "PAID"), S.topic_rejected, {"mismatched": 1}),
        ("rejected", _set("reason", ""), S.topic_rejected, {"mismatched": 1}),
        ("rejected", _set("reason", "r" * 1025), S.topic_rejected, {"mismatched": 1}),
        ("rejected", _set("reason", "any wording"), S.topic_rejected, {}),
        ("coupons", _set("coupon_id", "cpn-x"), S.topic_coupons, {"mismatched": 1}),
        ("coupons", _set("amount_cents", 110), S.topic_coupons, {"mismatched": 1}),
        ("coupons", lambda k, d: "twice", S.topic_coupons, {"duplicates": 1}),
        ("deltas", _set("delta_cents", -100), S.deltas_topic, {"mismatched": 1}),
        ("deltas", _set("version", 3), S.deltas_topic, {"mismatched": 1}),
        ("deltas", lambda k, d: (b"o1", d), S.deltas_topic, {"mismatched": 1}),
        ("deltas", lambda k, d: None, S.deltas_topic, {"missing": 1}),
    ],
)
def test_a_changed_output_record_is_caught(
    kind: str, change: Any, topic: str, want: dict[str, int]
) -> None:
    report = run(LIFE, _edit(kind, 1 if kind != "coupons" else 0, change))
    got = faults(report)
    assert got.get(topic, {}) == want, report.render()
    assert set(got) <= {topic}, report.render()


def test_a_wrong_table_row_is_caught() -> None:
    def skip_a_version(sends: Any, orders: dict[bytes, bytes], balances: Any) -> None:
        row = orjson.loads(orders[b"o1"])
        orders[b"o1"] = orjson.dumps({**row, "version": 4})

    assert faults(run(LIFE, skip_a_version)) == {"orders": {"mismatched": 1}}

    def lose_a_row(sends: Any, orders: dict[bytes, bytes], balances: Any) -> None:
        del orders[b"o3"]
        orders[b"o9"] = orders[b"o1"]

    assert faults(run(LIFE, lose_a_row)) == {"orders": {"missing": 1, "unexpected": 1}}


events = st.lists(
    st.tuples(
        st.sampled_from(["OrderCreated", "PaymentReceived", "OrderShipped", "OrderCancelled"]),
        st.sampled_from(["o1", "o2", "o3"]),
        st.sampled_from([0, 1, 50, 100, 2**63 - 1]),
        st.sampled_from(["u1", "u2"]),
    ),
    max_size=25,
)


@given(events, st.randoms())
def test_the_workers_outputs_pass_and_any_change_is_caught(
    seq: list[tuple[str, str, int, str]], rng: random.Random
) -> None:
    docs = [
        ev(
            f"e{n}",
            kind,
            order=order,
            amount=amount if kind in ("OrderCreated", "PaymentReceived") else None,
            user=user if kind == "OrderCreated" else None,
            ts=n,
        )
        for n, (kind, order, amount, user) in enumerate(seq)
    ]
    report = run(docs)
    assert report.ok, report.render()

    # Bump one number of one output record: caught.
    def bump(sends: list[tuple[str, bytes, bytes]], orders: Any, balances: Any) -> None:
        if not sends:
            return
        i = rng.randrange(len(sends))
        kind, key, value = sends[i]
        doc = orjson.loads(value)
        field = next((f for f in ("version", "amount_cents", "delta_cents") if f in doc), None)
        if field is None:
            doc["state"] = "SHIPPED" if doc["state"] != "SHIPPED" else "NEW"
        else:
            doc[field] += 1
        sends[i] = (kind, key, orjson.dumps(doc))

    if docs:
        assert not run(docs, bump).ok
