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
from typing import TYPE_CHECKING, Any

from pipeline.agents.sending import dead_letters, direct_send
from pipeline.domain.orders import Send, decide_balance, decide_order
from pipeline.eos.faust.store import TransactionalStore

if TYPE_CHECKING:
    from faust.types import StreamT

    from pipeline.topology import Topology


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
