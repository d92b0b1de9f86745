"""The dedup state is bounded: ids older than the window leave the store and the
changelog (tombstones), and verdicts still match the independent rebuild."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from pipeline.generate import generate
from pipeline.kafka_io import produce, read_topic
from pipeline.reconcile import reconcile
from pipeline.settings import Settings

from .harness import Worker, settings_from, wait_drained

pytestmark = pytest.mark.integration


async def test_expired_ids_leave_store_and_changelog(
    env: dict[str, str], settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    env.update(
        PIPELINE_DEDUP_WINDOW_S="2",
        PIPELINE_DEDUP_GRACE_S="0",
        PIPELINE_EXPIRY_EVERY="20",
    )
    s = settings_from(env)
    count = 4000
    # Recent record times: the broker deletes segments older than its retention (7 days)
    # by record timestamp, which would take the input away mid-test.
    t0 = int(time.time() * 1000) - 3_600_000
    # Record time advances 10 ms per record: the stream spans 40 s, twenty windows.
    assert (
        await produce(
            s.bootstrap_servers,
            s.topic_raw,
            generate(count, seed=17, dup_rate=0.3, bad_rate=0.0),
            timestamp_of=lambda n: t0 + 10 * n,
        )
        == count
    )
    worker = make_worker()
    worker.start()
    await wait_drained(s, [worker], timeout=150)
    # A sweep only sees committed rows, and stream time only moves with records. A second,
    # later burst (other order ids) advances every partition's stream time past the
    # first burst's window after all of it is committed, so every first-burst id must go.
    later = 800
    assert (
        await produce(
            s.bootstrap_servers,
            s.topic_raw,
            generate(later, seed=18, dup_rate=0.3, bad_rate=0.0, prefix="p"),
            timestamp_of=lambda n: t0 + 10 * (count + n),
        )
        == later
    )
    await wait_drained(s, [worker], timeout=150)
    stats = worker.stats()
    worker.stop()

    report = await reconcile(s)
    assert report.ok, report.render()
    unique = report.checks[0]
    # Copies further apart than the window were (rightly) accepted again, so the
    # window really decided something, the same way in the worker and the rebuild.
    distinct = len({r.value for r in generate(count, seed=17, dup_rate=0.3, bad_rate=0.0)})
    second = generate(later, seed=18, dup_rate=0.3, bad_rate=0.0, prefix="p")
    distinct += len({r.value for r in second})
    assert unique.actual > distinct

    live: dict[bytes, bool] = {}
    tombstones = 0
    async for m in read_topic(s.bootstrap_servers, f"{s.app_id}-dedup-changelog"):
        assert m.key is not None
        live[m.key] = m.value is not None
        tombstones += m.value is None
    assert tombstones > 0
    # A deletion and a re-accept of the same id in one transaction leave no tombstone.
    assert stats is not None and int(stats["expired_ids"]) >= tombstones  # type: ignore[call-overload]
    remaining = sum(live.values())
    first_burst_live = sorted(k for k, alive in live.items() if alive and k.startswith(b"o"))
    assert first_burst_live == [], (len(first_burst_live), first_burst_live[:5])
    # Only ids from about the last window (plus one sweep) of the second burst stay.
    assert 0 < remaining < len(live) / 3, (remaining, len(live))
