"""The dedup chain under kill -9, rebalances and crashes at every commit step.

Each test has its own topics, group and data directories, runs real worker processes
against the real broker, and ends with the independent ``reconcile`` rebuild reading
with ``read_committed``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import pytest

from pipeline.eos import COMMIT_STEPS, EXIT_INJECTED, Step
from pipeline.generate import generate
from pipeline.kafka_io import committed_offsets, end_offsets, produce
from pipeline.reconcile import reconcile
from pipeline.settings import Settings

from .harness import Worker, feed, progress, wait_drained

pytestmark = pytest.mark.integration


async def _wait_every_partition_moves(
    settings: Settings, workers: list[Worker], timeout: float
) -> None:
    """Wait until every partition with work left has committed past where it stood.

    After a worker is killed this proves its partitions were really taken over, rather
    than the survivor merely making progress on its own ones.
    """
    before = await committed_offsets(
        settings.bootstrap_servers, settings.app_id, settings.topic_raw
    )
    ends = await end_offsets(settings.bootstrap_servers, settings.topic_raw)
    waiting = {p for p, end in ends.items() if (before.get(p) or 0) < end}
    deadline = time.monotonic() + timeout
    while waiting:
        now = await committed_offsets(
            settings.bootstrap_servers, settings.app_id, settings.topic_raw
        )
        waiting = {p for p in waiting if (now.get(p) or 0) <= (before.get(p) or 0)}
        if not any(w.alive for w in workers):
            raise AssertionError("workers exited:\n" + "\n".join(w.log_tail() for w in workers))
        if time.monotonic() > deadline:
            raise AssertionError(f"partitions {sorted(waiting)} did not move in {timeout}s")
        await asyncio.sleep(0.2)


async def _wait_progress(
    settings: Settings, above: int, workers: list[Worker], timeout: float
) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, _ = await progress(settings)
        if done > above:
            return done
        if not any(w.alive for w in workers):
            raise AssertionError("workers exited:\n" + "\n".join(w.log_tail() for w in workers))
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no progress past {above} in {timeout}s:\n" + workers[0].log_tail()
            )
        await asyncio.sleep(0.2)


async def _check(settings: Settings, count: int) -> None:
    report = await reconcile(settings)
    assert report.input_records == count
    assert report.ok, report.render()
    assert report.duplicates == 0 and report.losses == 0
    unique = report.checks[0]
    dlq = report.checks[1]
    # The workload really had duplicates and bad input to deal with.
    assert unique.actual < count * 0.8
    assert dlq.actual > 0


@pytest.mark.slow
async def test_kill9_single_worker_stays_exactly_once(
    settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    count, seed = 20_000, 7
    rng = random.Random(seed)
    worker = make_worker()
    worker.start()
    feeder = asyncio.create_task(
        produce(
            settings.bootstrap_servers,
            settings.topic_raw,
            generate(count, seed=seed, dup_rate=0.3, bad_rate=0.01),
            rate=1500,
        )
    )
    kills: list[int] = []
    for _ in range(4):
        # Kill only once this incarnation is processing, at a random moment after.
        await worker.wait_seen(1, timeout=90)
        await asyncio.sleep(rng.uniform(0.0, 1.5))
        done, _total = await progress(settings)
        worker.kill9()
        kills.append(done)
        worker.start()
    assert await feeder == count
    await wait_drained(settings, [worker], timeout=240)
    assert len(kills) >= 3
    await _check(settings, count)


@pytest.mark.slow
async def test_two_workers_rebalance_under_load(
    settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    count, seed = 20_000, 11
    a, b = make_worker("a"), make_worker("b")
    a.start()
    b.start()
    feeder = asyncio.create_task(
        produce(
            settings.bootstrap_servers,
            settings.topic_raw,
            generate(count, seed=seed, dup_rate=0.3, bad_rate=0.01),
            rate=1200,
        )
    )
    done = await _wait_progress(settings, 0, [a, b], timeout=90)
    # b dies; its partitions move to a while traffic flows.
    b.kill9()
    await _wait_every_partition_moves(settings, [a], timeout=120)
    done = await _wait_progress(settings, done + 2000, [a], timeout=120)
    # b comes back (another rebalance), then a dies and b takes everything.
    b.start()
    await asyncio.sleep(8)
    done = await _wait_progress(settings, done, [a, b], timeout=90)
    a.kill9()
    await _wait_every_partition_moves(settings, [b], timeout=120)
    assert await feeder == count
    await wait_drained(settings, [a, b], timeout=240)
    await _check(settings, count)


@pytest.mark.parametrize("step", COMMIT_STEPS, ids=[s.value for s in COMMIT_STEPS])
async def test_crash_at_commit_step(
    step: Step, settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    count = 4000
    assert await feed(settings, count, seed=3, dup_rate=0.3, bad_rate=0.02) == count
    worker = make_worker()
    # Die at the 4th commit that reaches the step, so some state is already committed.
    worker.start(
        PIPELINE_CRASH_AT=step.value, PIPELINE_CRASH_AFTER="3", PIPELINE_COMMIT_INTERVAL_S="0.05"
    )
    code = await asyncio.to_thread(worker.wait_exit, 120)
    assert code == EXIT_INJECTED, f"worker did not crash at {step}: {code}\n{worker.log_tail()}"
    done, total = await progress(settings)
    assert done < total, "the crash came after all work was done; it proves nothing"
    worker.start()
    await wait_drained(settings, [worker], timeout=180)
    await _check(settings, count)


async def test_at_least_once_mode_processes_everything(
    settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    """The benchmark's baseline mode works: without crashes it is also exact."""
    count = 3000
    assert await feed(settings, count, seed=13, dup_rate=0.3, bad_rate=0.02) == count
    worker = make_worker(PIPELINE_PROCESSING_GUARANTEE="at_least_once")
    worker.start()
    await wait_drained(settings, [worker], timeout=120)
    stats = worker.stats()
    assert stats is not None and stats["processing_guarantee"] == "at_least_once"
    await _check(settings, count)
