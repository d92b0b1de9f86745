"""Web views on the worker's Faust web server, for every pipeline: ``/stats``,
``/metrics``, each stateful stage's state, and the bearer token that guards them all (the
order pipeline's own views are in :mod:`pipeline.topology`).

Views of state go through Faust's ``table_route``: asked on any worker, the request is
forwarded to the worker that owns the key's partition, which answers from its local
store.

How stale can an answer be? Views read committed state only (the RocksDB store, which
:mod:`pipeline.eos` writes after each Kafka transaction commits), so an answer lags the
events processed by at most one commit interval (``PIPELINE_COMMIT_INTERVAL_S``, 0.1 s
by default) plus the time the key's partition spends in recovery after a rebalance, when
the new owner answers from its standby copy as restored so far. It is never ahead of
what ``read_committed`` consumers of the output topics can see.

While the worker is rebalancing (``"rebalancing": true`` in ``/stats``) views still
answer, from the local copy, which may be behind: such answers carry the header
``X-Pipeline-Stale: possibly``. A standby copy lags the active one by the records its
follower (:mod:`pipeline.eos.standby`) has not applied yet, normally one fetch, until it is
promoted and restored.
"""

from __future__ import annotations

import hmac
import json
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web as aiohttp_web
from faust.web import Request, Response, View

if TYPE_CHECKING:
    from pipeline.api import Codec
    from pipeline.factory import PipelineApp
    from pipeline.settings import Settings


def answer(view: View, body: dict[str, Any]) -> Response:
    """``body`` as JSON, marked ``X-Pipeline-Stale`` while the worker rebalances."""
    # The standard library's JSON, not Faust's (orjson): a balance can outgrow 64 bits.
    response = view.bytes(json.dumps(body).encode(), content_type="application/json")
    if cast("PipelineApp", view.app).recovering:
        response.headers["X-Pipeline-Stale"] = "possibly"
    return response


def token_guard(settings: Settings) -> Any:
    """The aiohttp middleware that asks every request for the bearer token, or None
    when no token is set (``PIPELINE_WEB_TOKEN``, ``PIPELINE_METRICS_TOKEN``).

    A missing, malformed or wrong token gets the same 401, which never says which it
    was. Faust's ``table_route`` forwards a request with its headers, so a view asked on
    a worker that does not own the key is checked again by the owner. The dashboard page
    (``GET /``) is static and holds no data: a browser cannot attach a bearer token to a
    page it opens, so the page asks for the token and sends it with its requests.
    """
    web_token = settings.web_token.get_secret_value() if settings.web_token else None
    metrics = settings.metrics_token.get_secret_value() if settings.metrics_token else None
    if web_token is None and metrics is None:
        return None
    tokens = {"web": web_token, "metrics": metrics or web_token}

    @aiohttp_web.middleware
    async def guard(request: Any, handler: Any) -> Any:
        path = request.path
        if path == "/" and request.method in ("GET", "HEAD"):
            return await handler(request)
        expected = tokens["metrics" if path == "/metrics" else "web"]
        if expected is not None and not _bearer_is(request.headers.get("Authorization"), expected):
            return aiohttp_web.json_response(
                {"error": "unauthorized"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="pipeline"'},
            )
        return await handler(request)

    return guard


def _bearer_is(header: str | None, token: str) -> bool:
    scheme, _, given = (header or "").partition(" ")
    # compare_digest: as long whatever the given token's first wrong character.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )


def install_common(app: PipelineApp, page: str | None = None) -> None:
    """``/stats`` and ``/metrics``: every pipeline's, the order one's and those of
    :mod:`pipeline.api`; and ``page`` at ``/``, if given.

    ``/`` comes first: Faust serves an index of its own there (its "production index"
    blueprint, which no setting turns off), added when the server starts. aiohttp
    refuses that second ``GET /`` when ``/`` is the last route added before it, and
    otherwise serves the first one, ours.
    """
    settings = app.settings
    if page is not None:
        html = page

        @app.page("/")
        class PageView(View):
            async def get(self, request: Request) -> Response:
                return self.html(html)

    @app.page("/stats")
    class StatsView(View):
        async def get(self, request: Request) -> Response:
            body: dict[str, Any] = dict(app.stats.as_dict())
            body["app_id"] = settings.app_id
            body["commits"] = app.eos.commits
            body["processing_guarantee"] = settings.processing_guarantee.value
            # Which source partitions this worker processes now (active, not standby).
            owned: dict[str, list[int]] = {}
            for tp in app.eos.partitions:
                owned.setdefault(tp.topic, []).append(tp.partition)
            body["partitions"] = {t: sorted(ps) for t, ps in sorted(owned.items())}
            # Until the tables are restored too, not only Faust's rebalance.
            body["rebalancing"] = app.recovering
            body["outputs"] = dict(sorted(app.stats.outputs.items()))
            return self.json(body)

    from pipeline.metrics import CONTENT_TYPE, registry_for, render

    registry = registry_for(app)

    @app.page("/metrics")
    class MetricsView(View):
        async def get(self, request: Request) -> Response:
            return self.bytes(render(registry), content_type=CONTENT_TYPE)


#: The longest key a state view takes, in characters: a path is no place for more.
MAX_VIEW_KEY_CHARS = 1024


def state_view(app: PipelineApp, stage: str, table: Any, codec: Codec[Any]) -> None:
    """``GET /stages/<stage>/state/<key>``: a stateful stage's state of ``key`` (the
    key's UTF-8 bytes, as the stage's ``key`` function gives them), served by the worker
    that owns the key, as the order views are. 404 when there is none."""
    show = codec.show

    @app.page(f"/stages/{stage}/state/{{key}}", name=f"state-{stage}")
    class StateView(View):
        @app.table_route(table=table, match_info="key")  # type: ignore[arg-type]
        async def get(self, request: Request, *args: Any, key: str = "", **kw: Any) -> Response:
            if not 1 <= len(key) <= MAX_VIEW_KEY_CHARS or any(ord(c) < 32 for c in key):
                return self.json(
                    {"error": f"a key has 1 to {MAX_VIEW_KEY_CHARS} characters, none a control"},
                    status=400,
                )
            raw = table.get(key.encode())
            if raw is None:
                return self.json({"error": "no state for this key", "key": key}, status=404)
            state = codec.decode(raw)
            try:
                return answer(
                    self, {"stage": stage, "key": key, "state": show(state) if show else state}
                )
            except (TypeError, ValueError):
                # A codec of the user's own whose states json cannot write.
                return self.json(
                    {"error": f"stage {stage!r}: its state is not JSON; give Codec(show=...)"},
                    status=500,
                )
