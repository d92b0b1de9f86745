"""The order state machine and balances: every (state, event type) pair, and properties."""

from __future__ import annotations

from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.domain.models import EventType, OrderEvent
from pipeline.domain.orders import (
    Balance,
    BalanceDelta,
    Change,
    Coupon,
    Order,
    Rejected,
    Status,
    apply_delta,
    coupon_id,
    transition,
)


def ev(kind: EventType, amount: int | None = None, n: int = 0, order: str = "o1") -> OrderEvent:
    return OrderEvent(
        event_id=f"{order}-e{n}",
        type=kind,
        order_id=order,
        ts_ms=1_000 + n,
        user_id="u1" if kind is EventType.ORDER_CREATED else None,
        amount_cents=amount,
    )


def order_in(status: Status, amount: int = 500, paid: int = 0) -> Order | None:
    if status is Status.NEW:
        return None
    version = {Status.CREATED: 1, Status.PAID: 2, Status.SHIPPED: 3, Status.CANCELLED: 2}[status]
    if status in (Status.PAID, Status.SHIPPED):
        paid = amount
    return Order("o1", status, version, "u1", amount, paid, 1)


def event_of(kind: EventType) -> OrderEvent:
    amount = 500 if kind in (EventType.ORDER_CREATED, EventType.PAYMENT_RECEIVED) else None
    return ev(kind, amount, n=9)


# Every (state, event type) pair, with the expected outcome: the new status, or a
# rejection reason.
TABLE: dict[tuple[Status, EventType], Status | str] = {
    (Status.NEW, EventType.ORDER_CREATED): Status.CREATED,
    (Status.NEW, EventType.PAYMENT_RECEIVED): "order was never created",
    (Status.NEW, EventType.ORDER_SHIPPED): "order was never created",
    (Status.NEW, EventType.ORDER_CANCELLED): "order was never created",
    (Status.CREATED, EventType.ORDER_CREATED): "order already exists",
    (Status.CREATED, EventType.PAYMENT_RECEIVED): Status.PAID,
    (Status.CREATED, EventType.ORDER_SHIPPED): "order not paid",
    (Status.CREATED, EventType.ORDER_CANCELLED): Status.CANCELLED,
    (Status.PAID, EventType.ORDER_CREATED): "order already exists",
    (Status.PAID, EventType.PAYMENT_RECEIVED): "order already paid",
    (Status.PAID, EventType.ORDER_SHIPPED): Status.SHIPPED,
    (Status.PAID, EventType.ORDER_CANCELLED): Status.CANCELLED,
    (Status.SHIPPED, EventType.ORDER_CREATED): "order already exists",
    (Status.SHIPPED, EventType.PAYMENT_RECEIVED): "order already shipped",
    (Status.SHIPPED, EventType.ORDER_SHIPPED): "order already shipped",
    (Status.SHIPPED, EventType.ORDER_CANCELLED): "order already shipped",
    (Status.CANCELLED, EventType.ORDER_CREATED): "order already exists",
    (Status.CANCELLED, EventType.PAYMENT_RECEIVED): "order cancelled",
    (Status.CANCELLED, EventType.ORDER_SHIPPED): "order cancelled",
    (Status.CANCELLED, EventType.ORDER_CANCELLED): "order cancelled",
}


def test_the_table_covers_every_pair() -> None:
    assert set(TABLE) == {(s, e) for s in Status for e in EventType}


@pytest.mark.parametrize(("state", "kind"), list(TABLE), ids=lambda x: str(x))
def test_every_state_event_pair(state: Status, kind: EventType) -> None:
    before = order_in(state)
    after, outputs = transition(before, event_of(kind))
    expected = TABLE[(state, kind)]
    old_version = before.version if before else 0
    if isinstance(expected, Status):
        assert after.status is expected
        assert after.version == old_version + 1
        changes = [o for o in outputs if isinstance(o, Change)]
        assert len(changes) == 1
        assert changes[0].from_status is state and changes[0].to_status is expected
        assert changes[0].version == after.version
        assert not [o for o in outputs if isinstance(o, Rejected)]
    else:
        # Rejected: state untouched, one rejection with the reason and current state.
        assert after == (before or Order("o1"))
        assert outputs == [Rejected("o1-e9", "o1", expected, state)]


def test_paid_issues_one_coupon_and_credits_the_balance() -> None:
    created, _ = transition(None, ev(EventType.ORDER_CREATED, 700, 0))
    paid, outputs = transition(created, ev(EventType.PAYMENT_RECEIVED, 700, 1))
    assert outputs[1:] == [
        Coupon(coupon_id("o1"), "o1", "u1", 700),
        BalanceDelta("u1", "o1", 700, 2, "o1-e1", 1),
    ]
    cancelled, outputs = transition(paid, ev(EventType.ORDER_CANCELLED, None, 2))
    assert outputs[1:] == [BalanceDelta("u1", "o1", -700, 3, "o1-e2", -1)]
    assert cancelled.status is Status.CANCELLED


def test_partial_payments_accumulate_without_a_transition() -> None:
    order, _ = transition(None, ev(EventType.ORDER_CREATED, 1000, 0))
    order, outputs = transition(order, ev(EventType.PAYMENT_RECEIVED, 300, 1))
    assert outputs == [] and order.status is Status.CREATED and order.paid_cents == 300
    assert order.version == 1
    order, outputs = transition(order, ev(EventType.PAYMENT_RECEIVED, 800, 2))
    assert order.status is Status.PAID and order.paid_cents == 1100 and order.version == 2
    assert sum(isinstance(o, Coupon) for o in outputs) == 1


def test_cancelling_an_unpaid_order_moves_no_money() -> None:
    order, _ = transition(None, ev(EventType.ORDER_CREATED, 1000, 0))
    _, outputs = transition(order, ev(EventType.ORDER_CANCELLED, None, 1))
    assert not [o for o in outputs if isinstance(o, BalanceDelta)]


def test_coupon_id_is_deterministic_and_distinct() -> None:
    assert coupon_id("o1") == coupon_id("o1")
    assert coupon_id("o1") != coupon_id("o2")
    assert coupon_id("o1").startswith("cpn-")


def test_codecs_round_trip() -> None:
    order = Order("o1", Status.PAID, 2, "u1", 500, 500, 7)
    assert Order.decode(order.encode()) == order
    delta = BalanceDelta("u1", "o1", -5, 3, "o1-e2", -1)
    assert BalanceDelta.decode(delta.encode()) == delta
    bal = Balance("u1", 10, 2, 1)
    assert Balance.decode(bal.encode()) == bal


# -- properties -----------------------------------------------------------------------

kinds = st.sampled_from(list(EventType))
orders = st.sampled_from(["o1", "o2", "o3", "o4"])
users = st.sampled_from(["u1", "u2"])


@st.composite
def event_streams(draw: st.DrawFn) -> list[OrderEvent]:
    """Arbitrary interleavings: duplicates, out-of-order and illegal events included."""
    n = draw(st.integers(0, 60))
    out = []
    for i in range(n):
        kind = draw(kinds)
        amount = (
            draw(st.integers(0, 2_000))
            if kind in (EventType.ORDER_CREATED, EventType.PAYMENT_RECEIVED)
            else None
        )
        out.append(
            OrderEvent(
                event_id=f"e{i}",
                type=kind,
                order_id=draw(orders),
                ts_ms=i,
                user_id=draw(users) if kind is EventType.ORDER_CREATED else None,
                amount_cents=amount,
            )
        )
    return out


@settings(max_examples=300, deadline=None)
@given(event_streams())
def test_properties_over_arbitrary_streams(events: list[OrderEvent]) -> None:
    state: dict[str, Order] = {}
    balances: dict[str, Balance] = {}
    coupons: dict[str, int] = defaultdict(int)
    for e in events:
        before = state.get(e.order_id)
        after, outputs = transition(before, e)  # never raises
        changes = [o for o in outputs if isinstance(o, Change)]
        old_version = before.version if before else 0
        # version: +1 per accepted transition, never backwards
        assert after.version == old_version + len(changes)
        assert len(changes) <= 1
        if changes:
            assert changes[0].version == after.version
        # exactly one verdict or a silent partial payment
        rejected = [o for o in outputs if isinstance(o, Rejected)]
        assert not (rejected and changes)
        for o in outputs:
            if isinstance(o, Coupon):
                coupons[o.order_id] += 1
            if isinstance(o, BalanceDelta):
                balances[o.user_id] = apply_delta(balances.get(o.user_id), o)
        state[e.order_id] = after
    # at most one coupon per order, and exactly one for every order that reached PAID
    assert all(n == 1 for n in coupons.values())
    paid_ever = {o for o, n in coupons.items() if n}
    for oid, order in state.items():
        if order.status in (Status.PAID, Status.SHIPPED):
            assert oid in paid_ever
    # balance = sum over orders that reached PAID and were not cancelled afterwards
    expected: dict[str, int] = defaultdict(int)
    for order in state.values():
        if order.status in (Status.PAID, Status.SHIPPED):
            expected[order.user_id or ""] += order.amount_cents
    for user, bal in balances.items():
        assert bal.balance_cents == expected.get(user, 0)
        assert bal.paid_orders == sum(
            1
            for o in state.values()
            if o.user_id == user and o.status in (Status.PAID, Status.SHIPPED)
        )
    for user, cents in expected.items():
        assert balances[user].balance_cents == cents


def test_a_balance_beyond_64_bits_is_exact_through_its_encoding() -> None:
    """The contract: no effect on a balance is ever lost to an arithmetic or encoding
    limit. 2^63 - 1 cents, paid many times over, outgrows every 64-bit integer (orjson
    refuses to encode it, and decodes such JSON as a float)."""
    big = 2**63 - 1
    balance = None
    for n in range(5):
        delta = BalanceDelta("u", f"o{n}", big, 2, f"e{n}", 1)
        raw = Balance.decode(balance.encode()) if balance is not None else None
        balance = apply_delta(raw, delta)
    assert balance is not None
    assert balance.balance_cents == 5 * big > 2**64
    again = Balance.decode(balance.encode())
    assert again == balance
    assert type(again.balance_cents) is int
