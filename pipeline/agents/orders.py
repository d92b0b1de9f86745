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
from functools import partial
from typing import TYPE_CHECKING, Any

from faust.types import TP

from pipeline.agents.sending import agent_for, dead_letters
from pipeline.domain.orders import Send, decide_balance, decide_order
from pipeline.eos.faust.store import TransactionalStore
from pipeline.eos.stage import Out, Stage

if TYPE_CHECKING:
    from faust.types import StreamT

    from pipeline.topology import Topology


def _store(table: Any) -> TransactionalStore:
    store = table.data
    assert isinstance(store, TransactionalStore)
    return store


def _lookups(store: TransactionalStore) -> Callable[[TP], Callable[[bytes], bytes | None]]:
    """Per source partition, the table read its records' decisions make."""
    cache: dict[TP, Callable[[bytes], bytes | None]] = {}

    def lookup_for(tp: TP) -> Callable[[bytes], bytes | None]:
        found = cache.get(tp)
        if found is None:
            found = cache[tp] = partial(store.read, tp)
        return found

    return lookup_for


def make_orders_stage(topo: Topology) -> Stage:
    store = _store(topo.orders_table)
    lookup_for = _lookups(store)
    topics = {
        "changes": topo.changes.get_topic_name(),
        "rejected": topo.rejected.get_topic_name(),
        "coupons": topo.coupons.get_topic_name(),
        "deltas": topo.deltas.get_topic_name(),
        "dlq": topo.dlq.get_topic_name(),
    }
    stats = topo.app.stats

    def handle(record: Any, out: Out) -> None:
        where = (record.topic, record.partition, record.offset)
        step = decide_order(record.value, record.key, where, lookup_for(out.tp))
        if step.key is not None:
            out.put(store, step.key, step.order)
        for send in step.sends:
            out.send(topics[send.kind], send.key, send.value)
            if send.kind == "changes":
                stats.changes += 1
            elif send.kind == "rejected":
                stats.rejected += 1
            elif send.kind == "coupons":
                stats.coupons += 1
            elif send.kind == "dlq":
                stats.dlq += 1

    return Stage(
        "orders", topo.unique.get_topic_name(), handle, dead_letters(topo.app, topics["dlq"])
    )


def make_balances_stage(topo: Topology) -> Stage:
    store = _store(topo.balances_table)
    lookup_for = _lookups(store)
    dlq = topo.dlq.get_topic_name()
    stats = topo.app.stats

    def handle(record: Any, out: Out) -> None:
        where = (record.topic, record.partition, record.offset)
        result = decide_balance(record.value, where, lookup_for(out.tp))
        if isinstance(result, Send):
            out.send(dlq, result.key, result.value)
            stats.dlq += 1
        else:
            out.put(store, result[0], result[1])

    return Stage("balances", topo.deltas.get_topic_name(), handle, dead_letters(topo.app, dlq))


def make_orders_agent(topo: Topology) -> Callable[[StreamT], Coroutine[Any, Any, None]]:
    return agent_for(topo.app, make_orders_stage(topo))


def make_balances_agent(topo: Topology) -> Callable[[StreamT], Coroutine[Any, Any, None]]:
    return agent_for(topo.app, make_balances_stage(topo))
