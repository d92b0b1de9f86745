"""Wires the agents and the web views onto the declared topology (:func:`build`).

The worker's entry point, :mod:`pipeline.app`, calls it with the settings of the
environment; tests and tools call it with their own.
"""

from __future__ import annotations

from pipeline import web
from pipeline.agents import dedup, orders, route
from pipeline.agents.sending import direct_send
from pipeline.eos.faust.store import TransactionalStore
from pipeline.settings import Settings
from pipeline.topology import Topology, declare


def build(settings: Settings | None = None) -> Topology:
    settings = settings or Settings()
    topo = declare(settings)
    app = topo.app
    raw, by_order, unique, deltas = topo.raw, topo.by_order, topo.unique, topo.deltas
    dedup_table, orders_table, balances_table = (
        topo.dedup_table,
        topo.orders_table,
        topo.balances_table,
    )
    eos = app.eos
    # at_least_once: outputs go straight through Faust's producer
    eos.send_direct = direct_send(app)
    eos.register_source(raw.get_topic_name())  # stateless: no table
    for source, table in (
        (by_order, dedup_table),
        (unique, orders_table),
        (deltas, balances_table),
    ):
        eos.register_source(source.get_topic_name())
        assert isinstance(table.data, TransactionalStore)
        eos.register_store(source.get_topic_name(), table.data)
    app.agent(raw, name="route")(route.make_agent(topo))
    app.agent(by_order, name="dedup")(dedup.make_agent(topo))
    # PIPELINE_STAGES=dedup (bench only: route and dedup) leaves the later stages without
    # an agent: their
    # topics and tables are still declared, so nothing else changes shape.
    if settings.stages == "all":
        app.agent(unique, name="orders")(orders.make_orders_agent(topo))
        app.agent(deltas, name="balances")(orders.make_balances_agent(topo))
    web.install(topo)
    return topo
