"""A worker that comes back after a while catches its standby partitions up from the
changelogs; when it then takes them over, their state must be complete.

Found by a 200,000-event chaos soak: a worker restarted with its old data directory,
caught up its standbys, took them over after another worker died, and accepted as new
the copies of events it had already seen (its local store lacked the catch-up range).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from pipeline.kafka_io import produce
from pipeline.settings import Settings
from pipeline.tools.generate import generate
from pipeline.tools.reconcile import reconcile

from .harness import Worker, feed, wait_drained

# The scenario as an integration run (about a minute; it did not reproduce the loss on
# its own): the unit tests in tests/unit/test_store_standby.py guard the fix in CI.
pytestmark = [pytest.mark.integration, pytest.mark.soak]


async def _standbys_caught_up(w: Worker, timeout: float = 60) -> None:
    # The worker's own view: actives recovered, and nothing left to restore on standbys.
    import json
    import urllib.request

    def remaining() -> float | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{w.web_port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith('pipeline_restore_remaining_records{kind="standby"}'):
                return float(line.split()[-1])
        return None

    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        st = w.stats()
        left = await asyncio.to_thread(remaining)
        if st is not None and st.get("partitions") and left == 0:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"{w.name} standbys not caught up: {json.dumps(w.stats())}")


async def test_taking_over_caught_up_standbys_keeps_all_state(
    settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    s = settings
    a, b = make_worker("a"), make_worker("b")
    a.start()
    b.start()
    first = list(generate(3000, seed=31, dup_rate=0.2, bad_rate=0.0))
    await produce(s.bootstrap_servers, s.topic_raw, first)
    await wait_drained(s, [a, b], timeout=180)
    # b leaves (gracefully); a alone moves the changelogs well past b's local state.
    b.stop()
    second = list(generate(3000, seed=32, dup_rate=0.2, bad_rate=0.0, prefix="p"))
    await produce(s.bootstrap_servers, s.topic_raw, second)
    await wait_drained(s, [a], timeout=180)
    # b comes back with its old data directory and catches its standbys up.
    b.start()
    await wait_drained(s, [a, b], timeout=180)
    await _standbys_caught_up(b)
    # a dies: b takes every partition over, standbys included.
    a.kill9()
    # Every event again: all are duplicates, and b must know each of them.
    await produce(s.bootstrap_servers, s.topic_raw, first + second)
    await feed(s, 500, seed=33, dup_rate=0.2, bad_rate=0.0, prefix="q")
    await wait_drained(s, [b], timeout=240)
    report = await reconcile(s)
    assert report.ok, report.render()
