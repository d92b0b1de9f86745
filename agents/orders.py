"""The order state machine agent and the per-user balance agent.

``orders.unique`` -> ``orders`` table -> ``orders.changes`` / ``orders.rejected`` /
``coupons.issued``, plus balance deltas keyed by ``user_id`` into the repartition topic;
that topic -> ``users.balances`` table.

Both hops are exactly-once through :mod:`pipeline.eos`: whatever an agent sends and
writes while handling a record commits in the transaction of the record's *source*
partition, together with that partition's offset. For the repartition hop that means a
delta commits atomically with the order change that caused it (sender side) and the
balance update commits atomically with the delta's offset (receiver side); stock Faust
would route the delta's send by its *destination* partition instead.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from pipeline.codecs import dlq_key, dlq_value
from pipeline.models import BadInput, excerpt, parse_event
from pipeline.sending import dead_letters, direct_send
from tables.orders import (
    Balance,
    BalanceDelta,
    Change,
    Coupon,
    Order,
    Rejected,
    apply_delta,
    to_store,
    transition,
)
from tables.store import TransactionalStore

if TYPE_CHECKING:
    from faust.types import StreamT

    from pipeline.topology import Topology


@dataclass(frozen=True, slots=True)
class Send:
    """One record to send: ``kind`` names the output topic."""

    kind: str  # "changes" | "rejected" | "coupons" | "deltas" | "dlq"
    key: bytes
    value: bytes


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
    """The whole per-record decision of the state machine agent (pure)."""
    parsed = parse_event(value, key)
    if isinstance(parsed, BadInput):
        # Cannot come from our dedup stage (it validated), but orders.unique is a topic
        # others may write to: never stall on it.
        topic, partition, offset = where
        dlq = dlq_value(parsed.reason, topic, partition, offset, value)
        return OrderStep(sends=[Send("dlq", dlq_key(key) or b"", dlq)])
    okey = parsed.order_id.encode()
    raw = lookup(okey)
    before = Order.decode(raw) if raw is not None else None
    after, outputs = transition(before, parsed)
    step = OrderStep()
    row = to_store(before, after, outputs)
    if row is not None:
        step.key, step.order = okey, row.encode()
    for out in outputs:
        if isinstance(out, Change):
            step.sends.append(Send("changes", okey, orjson.dumps(out.to_json())))
        elif isinstance(out, Rejected):
            step.sends.append(Send("rejected", okey, orjson.dumps(out.to_json())))
        elif isinstance(out, Coupon):
            step.sends.append(Send("coupons", okey, orjson.dumps(out.to_json())))
        elif isinstance(out, BalanceDelta):
            step.sends.append(Send("deltas", out.user_id.encode(), out.encode()))
    return step


def _store(table: Any) -> TransactionalStore:
    store = table.data
    assert isinstance(store, TransactionalStore)
    return store


def make_orders_agent(topo: Topology) -> Callable[[StreamT], Coroutine[Any, Any, None]]:
    table = topo.orders_table
    lookup = _store(table).lookup
    topics = {
        "changes": topo.changes.get_topic_name(),
        "rejected": topo.rejected.get_topic_name(),
        "coupons": topo.coupons.get_topic_name(),
        "deltas": topo.deltas.get_topic_name(),
        "dlq": topo.dlq.get_topic_name(),
    }
    send_to = direct_send(topo.app)
    dead_letter = dead_letters(topo.app, topics["dlq"])
    stats = topo.app.stats
    eos = topo.app.eos

    async def handle(value: bytes | None, msg: Any) -> None:
        step = decide_order(value, msg.key, (msg.topic, msg.partition, msg.offset), lookup)
        if step.key is not None:
            table[step.key] = step.order
        for send in step.sends:
            await send_to(topics[send.kind], send.key, send.value)
            if send.kind == "changes":
                stats.changes += 1
            elif send.kind == "rejected":
                stats.rejected += 1
            elif send.kind == "coupons":
                stats.coupons += 1
            elif send.kind == "dlq":
                stats.dlq += 1

    async def orders(stream: StreamT) -> None:
        await eos.run(stream, handle, dead_letter)

    return orders


def decide_balance(
    value: bytes | None,
    where: tuple[str, int, int],
    lookup: Callable[[bytes], bytes | None],
) -> tuple[bytes, bytes] | Send:
    """The balance agent's decision: the user key and new balance, or a dead letter."""
    try:
        if value is None:
            raise ValueError("value is null")
        delta = BalanceDelta.decode(value)
    except (ValueError, KeyError, TypeError) as exc:
        # An internal topic, but a foreign or corrupt record must not stall it either.
        topic, partition, offset = where
        return Send(
            "dlq",
            b"",
            dlq_value(
                f"bad balance delta: {type(exc).__name__}: {excerpt(str(exc))}",
                topic,
                partition,
                offset,
                value,
            ),
        )
    ukey = delta.user_id.encode()
    raw = lookup(ukey)
    before = Balance.decode(raw) if raw is not None else None
    return ukey, apply_delta(before, delta).encode()


def make_balances_agent(topo: Topology) -> Callable[[StreamT], Coroutine[Any, Any, None]]:
    table = topo.balances_table
    lookup = _store(table).lookup
    dlq = topo.dlq.get_topic_name()
    send = direct_send(topo.app)
    dead_letter = dead_letters(topo.app, dlq)
    stats = topo.app.stats
    eos = topo.app.eos

    async def handle(value: bytes | None, msg: Any) -> None:
        result = decide_balance(value, (msg.topic, msg.partition, msg.offset), lookup)
        if isinstance(result, Send):
            await send(dlq, result.key, result.value)
            stats.dlq += 1
        else:
            table[result[0]] = result[1]

    async def balances(stream: StreamT) -> None:
        await eos.run(stream, handle, dead_letter)

    return balances
