"""A third transformation, written from docs/api.md alone (issue 14's walkthrough): page
views deduped by their id, counted per user."""

import json
from datetime import timedelta
from typing import Any

from pipeline.api import JSON, Dedup, Emit, Invalid, Pipeline


def parse(value: bytes) -> dict[str, Any] | Invalid:
    try:
        view = json.loads(value)
    except ValueError:
        return Invalid("not JSON")
    if not isinstance(view, dict) or not all(isinstance(view.get(f), str) for f in ("id", "user")):
        return Invalid("a page view needs a string id and user")
    return view


pipe = Pipeline("pageviews")


@pipe.stage(
    "per_user",
    source="pageviews.raw",
    parse=parse,
    outputs=["pageviews.counts"],
    dedup=Dedup(key=lambda v: v["id"].encode(), window=timedelta(minutes=10)),
    partition_by=lambda v: v["user"].encode(),
    key=lambda v: v["user"].encode(),
    state=JSON,
)
def count(seen: Any, view: dict[str, Any]) -> tuple[Any, list[Emit]]:
    seen = (seen or 0) + 1
    return seen, [Emit("pageviews.counts", view["user"].encode(), str(seen).encode())]


app = pipe.app
