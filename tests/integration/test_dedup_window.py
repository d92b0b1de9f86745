"""The dedup window runs on arrival (the broker's append time in ``orders.raw``), and
its state is bounded: ids older than the window leave the store and the changelog
(tombstones), while verdicts still match the independent rebuild.

The scenario does not depend on how fast anything runs: copies are re-sent only after
more than a window has passed since their first copies were sent, so they arrived more
than a window later, whatever the machine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from pipeline.kafka_io import produce, read_topic
from pipeline.settings import Settings
from pipeline.tools.generate import generate
from pipeline.tools.reconcile import reconcile

from .harness import Worker, settings_from, wait_drained

pytestmark = pytest.mark.integration

WINDOW_S = 2.0


async def test_expired_ids_leave_store_and_changelog(
    env: dict[str, str], settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    env.update(
        PIPELINE_DEDUP_WINDOW_S=str(WINDOW_S),
        PIPELINE_DEDUP_GRACE_S="0",
        PIPELINE_EXPIRY_EVERY="20",
    )
    s = settings_from(env)
    first = list(generate(3000, seed=17, dup_rate=0.3, bad_rate=0.0))
    assert await produce(s.bootstrap_servers, s.topic_raw, first) == len(first)
    worker = make_worker()
    worker.start()
    # Copies of 400 of those events, sent more than a window after their first copies:
    # each is accepted again (a new arrival, far apart), not dropped.
    await asyncio.sleep(WINDOW_S + 0.5)
    again = first[:400]
    assert await produce(s.bootstrap_servers, s.topic_raw, again) == len(again)
    await wait_drained(s, [worker], timeout=150)
    # A sweep only sees committed rows, and stream time only moves with records. A later
    # burst (other order ids), more than a window after everything before it, moves every
    # partition's stream time past the window of every earlier id: all of them must go.
    await asyncio.sleep(WINDOW_S + 0.5)
    later = list(generate(800, seed=18, dup_rate=0.3, bad_rate=0.0, prefix="p"))
    assert await produce(s.bootstrap_servers, s.topic_raw, later) == len(later)
    await wait_drained(s, [worker], timeout=150)
    stats = worker.stats()
    worker.stop()

    report = await reconcile(s)
    assert report.ok, report.render()
    unique = report.checks[0]
    distinct_first = len({r.value for r in first})
    distinct_again = len({r.value for r in again})
    distinct_later = len({r.value for r in later})
    # The re-sent copies were accepted again, once per distinct event.
    assert unique.actual >= distinct_first + distinct_again + distinct_later

    live: dict[bytes, bool] = {}
    tombstones = 0
    async for m in read_topic(s.bootstrap_servers, f"{s.app_id}-dedup-changelog"):
        assert m.key is not None
        live[m.key] = m.value is not None
        tombstones += m.value is None
    assert tombstones > 0
    # A deletion and a re-accept of the same id in one transaction leave no tombstone.
    assert stats is not None and int(stats["expired_ids"]) >= tombstones  # type: ignore[call-overload]
    ids = {k: alive for k, alive in live.items() if not k.startswith(b"\x00")}
    first_ids_live = sorted(k for k, alive in ids.items() if alive and k.startswith(b"o"))
    assert first_ids_live == [], (len(first_ids_live), first_ids_live[:5])
    # Only the last burst's ids stay (and each partition's stream-time row).
    remaining = sum(ids.values())
    assert 0 < remaining <= distinct_later, (remaining, distinct_later)
