"""Views on workers at different addresses (issue 17): a view asked on a worker that does
not own the key is forwarded to the owner's *advertised* address. Two workers on one
machine, at 127.0.0.2 and 127.0.0.3 (Linux routes all of 127/8 to loopback): bound there
each, a forward to any other address would find nobody listening; bound to every
interface, they advertise their own address explicitly."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest

from pipeline.settings import Settings

from .harness import Worker, feed, settled_owners, wait_drained

pytestmark = pytest.mark.integration


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.mark.parametrize("bind", ["own-address", "every-interface"])
async def test_every_view_is_answered_by_the_owner_at_its_advertised_address(
    bind: str, settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    assert await feed(settings, 400, seed=31, dup_rate=0.2, bad_rate=0.0) == 400
    workers = []
    for name, address in (("a", "127.0.0.2"), ("b", "127.0.0.3")):
        if bind == "own-address":
            env = {"PIPELINE_WEB_HOST": address}
        else:
            env = {"PIPELINE_WEB_HOST": "0.0.0.0", "PIPELINE_WEB_ADVERTISED_HOST": address}
        # Faust's /router page tells where each worker says it is.
        workers.append(make_worker(name, PIPELINE_WEB_FAUST_PAGES="true", **env))
    for w in workers:
        w.start()
    await settled_owners(workers, settings.topic_unique, settings.partitions, timeout=180)
    await wait_drained(settings, workers, timeout=240)
    a = workers[0]
    status, body = await asyncio.to_thread(_get, f"http://{a.web_address}:{a.web_port}/router/")
    assert status == 200, body
    router = json.loads(body)
    urls = {url.split("//")[-1].split(":")[0] for url in router}
    assert urls == {"127.0.0.2", "127.0.0.3"}, router

    found = 0
    for n in range(1, 41):
        answers = set()
        for w in workers:
            host = "127.0.0.2" if w is a else "127.0.0.3"
            status, body = await asyncio.to_thread(_get, f"http://{host}:{w.web_port}/orders/o{n}")
            assert status in (200, 404), (w.name, n, status, body)
            answers.add((status, body))
        assert len(answers) == 1, (n, answers)  # both give the owner's answer
        found += next(iter(answers))[0] == 200
    assert found > 20
