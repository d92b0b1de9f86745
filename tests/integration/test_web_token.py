"""The views behind a bearer token (issue 17): with ``PIPELINE_WEB_TOKEN`` set, every
route refuses a request without it, or with a wrong one, alike; ``/metrics`` takes its
own token; a view asked on a worker that does not own the key is forwarded with the
token and answered by the owner; no token reaches the log, ``/stats`` or ``/metrics``."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest

from pipeline.settings import Settings

from .harness import Worker, feed, settled_owners, wait_drained

pytestmark = pytest.mark.integration

TOKEN = "t0k3n-for-the-views-0123456789"
METRICS_TOKEN = "m3trics-for-prometheus-98765"


def _call(url: str, token: str | None = None, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


async def test_every_view_asks_for_the_token_and_forwards_it(
    settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    assert await feed(settings, 400, seed=17, dup_rate=0.2, bad_rate=0.01) == 400
    tokens = {"PIPELINE_WEB_TOKEN": TOKEN, "PIPELINE_METRICS_TOKEN": METRICS_TOKEN}
    a, b = make_worker("a", **tokens), make_worker("b", **tokens)
    a.start()
    b.start()
    await settled_owners([a, b], settings.topic_unique, settings.partitions, timeout=180)
    await wait_drained(settings, [a, b], timeout=240)
    base = f"http://127.0.0.1:{a.web_port}"

    refused: set[bytes] = set()
    paths = ["/stats", "/orders/o1", "/users/u1/balance", "/stages/orders/state/o1"]
    for path in [*paths, "/no/such/route", "/router/"]:
        for token in (None, "wrong-token-of-the-same-size-xx", TOKEN[:-1], "Bearer"):
            status, body = await asyncio.to_thread(_call, base + path, token)
            assert status == 401, (path, token, status, body)
            refused.add(body)
    status, body = await asyncio.to_thread(_call, base + "/metrics", TOKEN)
    assert status == 401  # /metrics has its own token
    refused.add(body)
    assert refused == {b'{"error": "unauthorized"}'}  # never says what was wrong

    # With the token: the views answer, unknown routes and methods get clean 4xx.
    status, stats = await asyncio.to_thread(_call, base + "/stats", TOKEN)
    assert status == 200
    status, body = await asyncio.to_thread(_call, base + "/stages/balances/state/nobody", TOKEN)
    assert status == 404 and b"no state for this key" in body
    assert (await asyncio.to_thread(_call, base + "/no/such/route", TOKEN))[0] == 404
    assert (await asyncio.to_thread(_call, base + "/stats", TOKEN, "POST"))[0] == 405
    long_id = "o" * 20_000
    assert 400 <= (await asyncio.to_thread(_call, f"{base}/orders/{long_id}", TOKEN))[0] < 500
    status, metrics = await asyncio.to_thread(_call, base + "/metrics", METRICS_TOKEN)
    assert status == 200 and b"pipeline_events_seen_total" in metrics
    # The dashboard page itself holds no data: a browser opens it, then it asks.
    status, page = await asyncio.to_thread(_call, base + "/")
    assert status == 200 and b"pipeline-web-token" in page

    # Every order, asked on each worker, is answered by its owner (forwarded with the
    # token by the worker that does not own it).
    answers: dict[str, set[bytes]] = {}
    for n in range(1, 41):
        for w in (a, b):
            url = f"http://127.0.0.1:{w.web_port}/orders/o{n}"
            status, body = await asyncio.to_thread(_call, url, TOKEN)
            assert status in (200, 404), (url, status, body)
            answers.setdefault(f"o{n}", set()).add(body)
    assert all(len(bodies) == 1 for bodies in answers.values()), answers
    assert sum(b'"order_id"' in next(iter(v)) for v in answers.values()) > 20

    a.stop()
    b.stop()
    for text in (stats, metrics, a.log_path.read_bytes(), b.log_path.read_bytes()):
        assert TOKEN.encode() not in text and METRICS_TOKEN.encode() not in text
