"""The order pipeline, declared through the public API (:mod:`pipeline.api`), as any
user's pipeline is (:func:`declare`).

Three stages, each a declaration of the contract (``../shared/CONTRACT.md``):

1. ``dedup`` forwards every distinct ``event_id`` of ``orders.raw`` once to
   ``orders.unique``. Its hop first validates each record and rekeys it by its
   ``order_id`` (the internal topic ``<app>-raw-by-order``): every copy of an event,
   keyed or not, then meets the one partition of the dedup table that owns its order,
   and the records of one input partition keep their order there;
2. ``orders``, the state machine (:func:`pipeline.domain.orders.transition`) on the
   ``orders`` table: ``orders.changes``, ``orders.rejected``, ``coupons.issued``, and
   balance deltas keyed by ``user_id`` into ``<app>-balance-deltas``;
3. ``balances`` adds each delta to the user's row of ``users.balances``.

Its views of orders and balances (:func:`install_views`) are wired on by
:func:`pipeline.worker.build`. The names of the tables and internal topics are those the
pipeline had before it was declared through the API: a deployment's state and the
records in flight stay where they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from importlib.resources import files
from typing import Any

from faust.web import Request, Response, View

from pipeline.api import Codec, Dedup, Emit, Invalid, Keyed, Pipeline
from pipeline.domain.models import MAX_ID_CHARS, BadInput, OrderEvent, parse_event
from pipeline.domain.orders import (
    Balance,
    BalanceDelta,
    Order,
    apply_delta,
    order_step,
    parse_delta,
)
from pipeline.factory import PipelineApp
from pipeline.settings import Settings
from pipeline.web import answer


@dataclass
class Topology:
    settings: Settings
    pipe: Pipeline
    app: PipelineApp
    #: None when ``PIPELINE_STAGES=dedup`` (bench) leaves the later stages out
    orders_table: Any
    balances_table: Any


ORDER: Codec[Order] = Codec(Order.encode, Order.decode, show=Order.to_json)
BALANCE: Codec[Balance] = Codec(Balance.encode, Balance.decode, show=Balance.to_json)


def parse_order(value: bytes, key: bytes | None) -> OrderEvent | Invalid:
    """An ``orders.raw`` record, judged by the contract (its key must be its order's)."""
    parsed = parse_event(value, key)
    return Invalid(parsed.reason) if isinstance(parsed, BadInput) else parsed


def parse_balance_delta(value: bytes) -> BalanceDelta | Invalid:
    delta = parse_delta(value)
    return Invalid(delta) if isinstance(delta, str) else delta


def declare(settings: Settings) -> Topology:
    """The order pipeline's app, every stage declared (no web views yet)."""
    if settings.topic_prefix:
        # The order pipeline's topics have names of their own (PIPELINE_TOPIC_*), which
        # reconcile, chaos and produce read: a prefix they do not know would split them.
        raise ValueError(
            "PIPELINE_TOPIC_PREFIX is for pipelines of pipeline.api; name the order "
            "pipeline's topics with PIPELINE_TOPIC_RAW, PIPELINE_TOPIC_UNIQUE, ..."
        )
    s = settings
    pipe = Pipeline(s.app_id, dead_letters=s.topic_dlq, settings=s, page=dashboard())
    app = pipe.app
    app.order_topics = True
    parse = Keyed(parse_order)
    pipe.dedup(
        "dedup",
        source=s.topic_raw,
        parse=parse,
        dedup=Dedup(
            key=lambda e: e.event_id.encode(),
            window=timedelta(milliseconds=s.dedup_window_ms),
            grace=timedelta(milliseconds=s.dedup_grace_ms),
        ),
        to=s.topic_unique,
        partition_by=lambda e: e.order_id.encode(),
        table="dedup",
        through=s.by_order_topic,
    )
    if s.stages != "all":
        # PIPELINE_STAGES=dedup (bench only): the first stage by itself.
        return Topology(s, pipe, app, None, None)
    changes, rejected, coupons, deltas = (
        s.topic_changes,
        s.topic_rejected,
        s.topic_coupons,
        s.deltas_topic,
    )
    app.stats.counted_as.update(changes=changes, rejected=rejected, coupons=coupons)

    topics = {"changes": changes, "rejected": rejected, "coupons": coupons, "deltas": deltas}

    @pipe.stage(
        "orders",
        source=s.topic_unique,
        parse=parse,
        outputs=list(topics.values()),
        key=lambda e: e.order_id.encode(),
        state=ORDER,
        table="orders",
    )
    def orders(order: Order | None, event: OrderEvent) -> tuple[Order | None, list[Emit]]:
        row, sends = order_step(order, event)
        return row, [Emit(topics[send.kind], send.key, send.value) for send in sends]

    @pipe.stage(
        "balances",
        source=deltas,
        parse=parse_balance_delta,
        outputs=[],
        key=lambda d: d.user_id.encode(),
        state=BALANCE,
        table="users.balances",
    )
    def balances(balance: Balance | None, delta: BalanceDelta) -> tuple[Balance, list[Emit]]:
        return apply_delta(balance, delta), []

    return Topology(s, pipe, app, pipe.tables["orders"], pipe.tables["users.balances"])


# -- the order pipeline's web views ---------------------------------------------


def _bad_id(name: str, value: str) -> str | None:
    if not 1 <= len(value) <= MAX_ID_CHARS:
        return f"{name} must have 1 to {MAX_ID_CHARS} characters"
    if any(ord(c) < 32 for c in value):
        return f"{name} must not contain control characters"
    return None


def dashboard() -> str:
    """The order pipeline's dashboard page: static, its script polls ``/stats``."""
    return files("pipeline").joinpath("dashboard.html").read_text(encoding="utf-8")


def install_views(topo: Topology) -> None:
    """The order pipeline's views of orders and balances (the dashboard and the common
    views come with its :class:`pipeline.api.Pipeline`)."""
    app = topo.app
    orders_table = topo.orders_table
    balances_table = topo.balances_table
    if orders_table is None or balances_table is None:
        return  # PIPELINE_STAGES=dedup (bench): no state machine, no balances

    @app.page("/orders/{order_id}")
    class OrderView(View):
        # The ignores: Faust types the decorated method as taking the base View.
        @app.table_route(table=orders_table, match_info="order_id")  # type: ignore[arg-type]
        async def get(
            self, request: Request, *args: Any, order_id: str = "", **kw: Any
        ) -> Response:
            error = _bad_id("order_id", order_id)
            if error:
                return self.json({"error": error}, status=400)
            raw = orders_table.get(order_id.encode())
            if raw is None:
                return self.json({"error": "order not found", "order_id": order_id}, status=404)
            return answer(self, Order.decode(raw).to_json())

    @app.page("/users/{user_id}/balance")
    class BalanceView(View):
        @app.table_route(table=balances_table, match_info="user_id")  # type: ignore[arg-type]
        async def get(self, request: Request, *args: Any, user_id: str = "", **kw: Any) -> Response:
            error = _bad_id("user_id", user_id)
            if error:
                return self.json({"error": error}, status=400)
            raw = balances_table.get(user_id.encode())
            if raw is None:
                # A user with no paid order has a zero balance; say whether we know them.
                return self.json(
                    {"error": "no balance for this user", "user_id": user_id}, status=404
                )
            return answer(self, Balance.decode(raw).to_json())
