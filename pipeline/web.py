"""Web views on the worker's Faust web server."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from faust.web import Request, Response, View

if TYPE_CHECKING:
    from pipeline.topology import Topology


def install(topo: Topology) -> None:
    app = topo.app

    @app.page("/stats")
    class StatsView(View):
        async def get(self, request: Request) -> Response:
            body: dict[str, Any] = dict(app.stats.as_dict())
            body["commits"] = app.eos.commits
            body["processing_guarantee"] = topo.settings.processing_guarantee.value
            return self.json(body)
