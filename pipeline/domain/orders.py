"""The order state machine and per-user balances, as pure functions.

``transition(order, event) -> (order, outputs)`` decides every (state, event type) pair
without raising; the Faust agent only reads the table, calls it, writes the table and
sends the outputs. ``reconcile`` does not use it: it has its own reading of the same
rules (``pipeline/tools/reconcile.py``), so that a bug here cannot hide from it.

Rules (``../shared/CONTRACT.md``):

============  ==============  ===========  ===========  ============  ============
state         OrderCreated    Payment      Shipped      Cancelled
============  ==============  ===========  ===========  ============  ============
NEW           -> CREATED      reject       reject       reject
CREATED       reject          paid += n;   reject       -> CANCELLED
                              -> PAID when
                              paid >= amount
PAID          reject          reject       -> SHIPPED   -> CANCELLED
SHIPPED       reject          reject       reject       reject
CANCELLED     reject          reject       reject       reject
============  ==============  ===========  ===========  ============  ============

A partial payment (paid still below the amount) is accepted and recorded in the order
but is not a transition: it emits nothing and leaves ``version`` alone. ``version``
counts transitions, so it rises by exactly one per ``orders.changes`` record, and a
replayed or stale event can never move an order backwards: every rule above only moves
forward, and anything else is rejected.

Side effects of transitions:

* ``-> PAID`` issues exactly one coupon, with an id derived from the order id only, and
  credits the order amount to the user's balance;
* ``PAID -> CANCELLED`` debits it again (``CREATED -> CANCELLED`` never credited).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, NamedTuple

import orjson

from pipeline.domain.codecs import dlq_key, dlq_value
from pipeline.domain.models import BadInput, EventType, OrderEvent, excerpt, parse_event

#: Test-only: a bug planted on purpose, to show that ``reconcile`` catches a wrong
#: operator (tests/integration/test_reconcile_faults.py). ``version-skip``: OrderShipped
#: raises the version by 2. Read once at import, not per call, so that every process
#: importing this operator carries it: the worker, and any checker that shared the code,
#: which is exactly the blind spot that test shows.
PLANTED_BUG = os.environ.get("PIPELINE_PLANT_BUG", "")


class Status(StrEnum):
    NEW = "NEW"
    CREATED = "CREATED"
    PAID = "PAID"
    SHIPPED = "SHIPPED"
    CANCELLED = "CANCELLED"


@dataclass(frozen=True, slots=True)
class Order:
    order_id: str
    status: Status = Status.NEW
    version: int = 0
    user_id: str | None = None
    amount_cents: int = 0
    paid_cents: int = 0
    updated_ms: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "order_id": self.order_id,
            "status": self.status.value,
            "version": self.version,
            "user_id": self.user_id,
            "amount_cents": self.amount_cents,
            "paid_cents": self.paid_cents,
            "updated_ms": self.updated_ms,
        }

    def encode(self) -> bytes:
        return orjson.dumps(self.to_json())

    @classmethod
    def decode(cls, raw: bytes) -> Order:
        d = orjson.loads(raw)
        return cls(
            order_id=d["order_id"],
            status=Status(d["status"]),
            version=int(d["version"]),
            user_id=d.get("user_id"),
            amount_cents=int(d["amount_cents"]),
            paid_cents=int(d["paid_cents"]),
            updated_ms=int(d.get("updated_ms", 0)),
        )


@dataclass(frozen=True, slots=True)
class Change:
    event_id: str
    order_id: str
    from_status: Status
    to_status: Status
    version: int
    ts_ms: int

    def to_json(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "order_id": self.order_id,
            "from": self.from_status.value,
            "to": self.to_status.value,
            "version": self.version,
            "ts_ms": self.ts_ms,
        }


@dataclass(frozen=True, slots=True)
class Rejected:
    event_id: str
    order_id: str
    reason: str
    state: Status

    def to_json(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "order_id": self.order_id,
            "reason": self.reason,
            "state": self.state.value,
        }


@dataclass(frozen=True, slots=True)
class Coupon:
    coupon_id: str
    order_id: str
    user_id: str
    amount_cents: int

    def to_json(self) -> dict[str, Any]:
        return {
            "coupon_id": self.coupon_id,
            "order_id": self.order_id,
            "user_id": self.user_id,
            "amount_cents": self.amount_cents,
        }


@dataclass(frozen=True, slots=True)
class BalanceDelta:
    """A change of one user's balance, sent through the repartition topic (by user)."""

    user_id: str
    order_id: str
    delta_cents: int
    #: the order version that caused it: (order_id, version) is unique per delta
    version: int
    event_id: str
    #: +1 when the order became PAID, -1 when a paid order was cancelled
    paid_orders: int

    def to_json(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "order_id": self.order_id,
            "delta_cents": self.delta_cents,
            "version": self.version,
            "event_id": self.event_id,
            "paid_orders": self.paid_orders,
        }

    def encode(self) -> bytes:
        return orjson.dumps(self.to_json())

    @classmethod
    def decode(cls, raw: bytes) -> BalanceDelta:
        d = orjson.loads(raw)
        return cls(
            user_id=d["user_id"],
            order_id=d["order_id"],
            delta_cents=int(d["delta_cents"]),
            version=int(d["version"]),
            event_id=d["event_id"],
            paid_orders=int(d["paid_orders"]),
        )


Output = Change | Rejected | Coupon | BalanceDelta


def coupon_id(order_id: str) -> str:
    """Deterministic: the same order always gets the same coupon id, so a consumer that
    sees a replay (outside our exactly-once chain) can still dedupe it."""
    return "cpn-" + hashlib.sha256(b"coupon:" + order_id.encode()).hexdigest()[:24]


def _reject(order: Order, event: OrderEvent, reason: str) -> tuple[Order, list[Output]]:
    return order, [Rejected(event.event_id, event.order_id, reason, order.status)]


def _move(order: Order, event: OrderEvent, to: Status, **changes: Any) -> tuple[Order, Change]:
    new = replace(order, status=to, version=order.version + 1, updated_ms=event.ts_ms, **changes)
    return new, Change(event.event_id, order.order_id, order.status, to, new.version, event.ts_ms)


_TERMINAL_REASON = {
    Status.SHIPPED: "order already shipped",
    Status.CANCELLED: "order cancelled",
}


def transition(order: Order | None, event: OrderEvent) -> tuple[Order, list[Output]]:
    """Decide ``event`` against the order's current state. Never raises."""
    current = order if order is not None else Order(event.order_id)
    status = current.status
    kind = event.type

    if kind is EventType.ORDER_CREATED:
        if status is not Status.NEW:
            return _reject(current, event, "order already exists")
        new, change = _move(
            current,
            event,
            Status.CREATED,
            user_id=event.user_id,
            amount_cents=event.amount_cents or 0,
        )
        return new, [change]

    if status is Status.NEW:
        return _reject(current, event, "order was never created")
    if status in _TERMINAL_REASON:
        return _reject(current, event, _TERMINAL_REASON[status])

    if kind is EventType.PAYMENT_RECEIVED:
        if status is not Status.CREATED:
            return _reject(current, event, "order already paid")
        paid = current.paid_cents + (event.amount_cents or 0)
        if paid < current.amount_cents:
            return replace(current, paid_cents=paid, updated_ms=event.ts_ms), []
        new, change = _move(current, event, Status.PAID, paid_cents=paid)
        user = new.user_id or ""
        return new, [
            change,
            Coupon(coupon_id(new.order_id), new.order_id, user, new.amount_cents),
            BalanceDelta(user, new.order_id, new.amount_cents, new.version, event.event_id, 1),
        ]

    if kind is EventType.ORDER_SHIPPED:
        if status is not Status.PAID:
            return _reject(current, event, "order not paid")
        new, change = _move(current, event, Status.SHIPPED)
        if PLANTED_BUG == "version-skip":
            new = replace(new, version=new.version + 1)
            change = replace(change, version=new.version)
        return new, [change]

    # OrderCancelled, from CREATED or PAID
    new, change = _move(current, event, Status.CANCELLED)
    if status is Status.PAID:
        user = new.user_id or ""
        return new, [
            change,
            BalanceDelta(user, new.order_id, -new.amount_cents, new.version, event.event_id, -1),
        ]
    return new, [change]


def to_store(before: Order | None, after: Order, outputs: list[Output]) -> Order | None:
    """The row to write after ``transition``, or ``None`` when nothing changed.

    A rejection never writes, not even the blank NEW order ``transition`` returns for an
    order that was never created.
    """
    if outputs and isinstance(outputs[0], Rejected):
        return None
    return after if after != before else None


@dataclass(frozen=True, slots=True)
class Balance:
    user_id: str
    balance_cents: int = 0
    #: how many deltas were applied (a per-user version)
    version: int = 0
    paid_orders: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "balance_cents": self.balance_cents,
            "version": self.version,
            "paid_orders": self.paid_orders,
        }

    def encode(self) -> bytes:
        # The standard library's JSON: a balance is a sum of amounts below 2^63 each,
        # so it outgrows 64 bits, where orjson refuses to encode it and decodes it as a
        # float. Balances are small rows on the last stage; exactness is the point.
        return json.dumps(self.to_json(), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Balance:
        d = json.loads(raw)
        return cls(
            user_id=d["user_id"],
            balance_cents=int(d["balance_cents"]),
            version=int(d["version"]),
            paid_orders=int(d["paid_orders"]),
        )


def apply_delta(balance: Balance | None, delta: BalanceDelta) -> Balance:
    current = balance if balance is not None else Balance(delta.user_id)
    return replace(
        current,
        balance_cents=current.balance_cents + delta.delta_cents,
        version=current.version + 1,
        paid_orders=current.paid_orders + delta.paid_orders,
    )


# -- the two stages' operators, and their whole per-record decisions ------------


class Send(NamedTuple):
    """One record to send: ``kind`` names the output topic. (A named tuple: several per
    event, and a frozen dataclass's ``__init__`` costs a ``setattr`` call per field.)"""

    kind: str  # "changes" | "rejected" | "coupons" | "deltas" | "dlq"
    key: bytes
    value: bytes


def order_step(order: Order | None, event: OrderEvent) -> tuple[Order | None, list[Send]]:
    """The state machine stage's operator (``pipeline.topology``): the order's row after
    ``event`` (the very row it was given when nothing is to be written: a rejection or a
    no-op) and the records to send."""
    after, outputs = transition(order, event)
    okey = event.order_id.encode()
    sends = []
    for out in outputs:
        if isinstance(out, Change):
            sends.append(Send("changes", okey, orjson.dumps(out.to_json())))
        elif isinstance(out, Rejected):
            sends.append(Send("rejected", okey, orjson.dumps(out.to_json())))
        elif isinstance(out, Coupon):
            sends.append(Send("coupons", okey, orjson.dumps(out.to_json())))
        else:
            sends.append(Send("deltas", out.user_id.encode(), out.encode()))
    row = to_store(order, after, outputs)
    return (order if row is None else row), sends


def parse_delta(value: bytes | None) -> BalanceDelta | str:
    """A record of the deltas topic, or why it is none: the topic is internal, but a
    foreign or corrupt record must not stall it either."""
    try:
        if value is None:
            raise ValueError("value is null")
        return BalanceDelta.decode(value)
    except (ValueError, KeyError, TypeError) as exc:
        return f"bad balance delta: {type(exc).__name__}: {excerpt(str(exc))}"


@dataclass(slots=True)
class OrderStep:
    """What handling one ``orders.unique`` record does: a table write and the sends."""

    key: bytes | None = None
    order: bytes | None = None
    sends: list[Send] = field(default_factory=list)


def decide_order(
    value: bytes | None,
    key: bytes | None,
    where: tuple[str, int, int],
    lookup: Callable[[bytes], bytes | None],
) -> OrderStep:
    """The whole per-record decision of the state machine stage (pure): its parse, its
    table read, its operator (:func:`order_step`). For tools that rebuild what the
    workers write with the workers' own code (``pipeline.tools.reference``)."""
    parsed = parse_event(value, key)
    if isinstance(parsed, BadInput):
        topic, partition, offset = where
        dlq = dlq_value(parsed.reason, topic, partition, offset, value)
        return OrderStep(sends=[Send("dlq", dlq_key(key) or b"", dlq)])
    okey = parsed.order_id.encode()
    raw = lookup(okey)
    before = Order.decode(raw) if raw is not None else None
    row, sends = order_step(before, parsed)
    step = OrderStep(sends=sends)
    if row is not before and row is not None:
        step.key, step.order = okey, row.encode()
    return step


def decide_balance(
    value: bytes | None,
    where: tuple[str, int, int],
    lookup: Callable[[bytes], bytes | None],
) -> tuple[bytes, bytes] | Send:
    """The balance stage's whole decision: the user key and new balance (its operator,
    :func:`apply_delta`), or a dead letter."""
    delta = parse_delta(value)
    if isinstance(delta, str):
        topic, partition, offset = where
        return Send("dlq", b"", dlq_value(delta, topic, partition, offset, value))
    ukey = delta.user_id.encode()
    raw = lookup(ukey)
    before = Balance.decode(raw) if raw is not None else None
    return ukey, apply_delta(before, delta).encode()
