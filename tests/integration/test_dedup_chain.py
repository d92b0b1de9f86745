"""The dedup chain under kill -9, rebalances and crashes at every commit step.

Each test has its own topics, group and data directories, runs real worker processes
against the real broker, and ends with the independent ``reconcile`` rebuild reading
with ``read_committed``.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Callable

import pytest

from pipeline.eos import COMMIT_STEPS, EXIT_INJECTED, Step
from pipeline.kafka_io import committed_offsets, end_offsets, produce, record_ends
from pipeline.settings import Settings
from pipeline.tools.generate import generate
from pipeline.tools.reconcile import reconcile

from .harness import Worker, feed, progress, settled_owners, wait_drained

pytestmark = pytest.mark.integration


async def _wait_every_partition_moves(
    settings: Settings, workers: list[Worker], timeout: float, must: set[int] | None = None
) -> None:
    """Wait until every partition with work left has committed past where it stood.

    After a worker is killed this proves its partitions were really taken over, rather
    than the survivor merely making progress on its own ones. ``must``: partitions that
    have to be among those with work left (the killed worker's, while input still flows).
    """
    before = await committed_offsets(
        settings.bootstrap_servers, settings.app_id, settings.topic_raw
    )
    deadline = time.monotonic() + timeout
    while True:
        ends = await end_offsets(settings.bootstrap_servers, settings.topic_raw)
        waiting = {p for p, end in ends.items() if (before.get(p) or 0) < end}
        if must is None or must <= waiting:
            break
        # Input still flows: the killed worker's partitions get records it never saw.
        if time.monotonic() > deadline:
            raise AssertionError(f"partitions {sorted(must - waiting)} got no new input")
        await asyncio.sleep(0.1)
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


async def _feed_until(settings: Settings, stop: asyncio.Event, seed: int, rate: float) -> int:
    """Produce chunks of generated records at ``rate`` until ``stop`` is set; the count."""
    count, chunk = 0, 0
    while not stop.is_set():
        records = generate(500, seed=seed + chunk, dup_rate=0.3, bad_rate=0.01, prefix=f"c{chunk}")
        count += await produce(settings.bootstrap_servers, settings.topic_raw, records, rate=rate)
        chunk += 1
    return count


@pytest.mark.slow
async def test_kill9_single_worker_stays_exactly_once(
    settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    rng = random.Random(7)
    worker = make_worker()
    worker.start()
    # Input flows until the last kill, however long the restarts take, so every
    # incarnation is killed while it processes a live stream, never after it drained.
    stop = asyncio.Event()
    feeder = asyncio.create_task(_feed_until(settings, stop, seed=7, rate=1500))
    for _ in range(4):
        # Kill only once this incarnation is processing, at a random moment after.
        await worker.wait_seen(1, timeout=90)
        await asyncio.sleep(rng.uniform(0.0, 1.5))
        assert not feeder.done(), "the feeder stopped early"
        worker.kill9()
        worker.start()
    stop.set()
    count = await feeder
    await wait_drained(settings, [worker], timeout=240)
    await _check(settings, count)


@pytest.mark.slow
async def test_two_workers_rebalance_under_load(
    settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    a, b = make_worker("a"), make_worker("b")
    a.start()
    b.start()
    stop = asyncio.Event()
    feeder = asyncio.create_task(_feed_until(settings, stop, seed=11, rate=1200))
    done = await _wait_progress(settings, 0, [a, b], timeout=90)
    # b dies while input flows; each of its partitions must move to a.
    held = (await settled_owners([a, b], settings.topic_raw, settings.partitions, timeout=120))["b"]
    b.kill9()
    await _wait_every_partition_moves(settings, [a], timeout=120, must=held)
    done = await _wait_progress(settings, done + 2000, [a], timeout=120)
    # b comes back (another rebalance); once both own partitions, a dies and b takes
    # every one of them, still while input flows.
    b.start()
    held = (await settled_owners([a, b], settings.topic_raw, settings.partitions, timeout=120))["a"]
    await _wait_progress(settings, done, [a, b], timeout=90)
    assert not feeder.done(), "the feeder stopped early"
    a.kill9()
    await _wait_every_partition_moves(settings, [b], timeout=120, must=held)
    stop.set()
    count = await feeder
    await wait_drained(settings, [a, b], timeout=240)
    await _check(settings, count)


#: The stage whose transaction each crash test interrupts: every step is crashed in one
#: stage, and every stage is crashed at some step.
STAGES = ("raw", "unique", "deltas")
CRASH_CASES = [
    pytest.param(step, STAGES[i % len(STAGES)], id=f"{step.value}-{STAGES[i % len(STAGES)]}")
    for i, step in enumerate(COMMIT_STEPS)
]


def _stage_topic(settings: Settings, stage: str) -> str:
    return {
        "raw": settings.topic_raw,
        "unique": settings.topic_unique,
        "deltas": settings.deltas_topic,
    }[stage]


@pytest.mark.parametrize(("step", "stage"), CRASH_CASES)
async def test_crash_at_commit_step(
    step: Step, stage: str, settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    """kill at a commit step, in a stage's transaction that holds work, after state of
    every stage was committed: the restarted worker recovers exactly-once.

    Commits every second and never early (no quiet commits), so a transaction gathers
    events even on a slow machine; the crash waits for one holding at least
    ``min_events`` of the stage's events (enough that some wrote table rows).
    """
    slow = {"PIPELINE_COMMIT_INTERVAL_S": "1.0", "PIPELINE_COMMIT_QUIET_S": "0"}
    worker = make_worker(**slow)
    # First some committed state in every stage, and an orderly stop.
    assert await feed(settings, 2000, seed=3, dup_rate=0.3, bad_rate=0.02) == 2000
    worker.start()
    await wait_drained(settings, [worker], timeout=180)
    worker.stop()
    assert await feed(settings, 3000, seed=4, dup_rate=0.3, bad_rate=0.02, prefix="p") == 3000
    topic = _stage_topic(settings, stage)
    min_events = 20 if stage == "raw" else 5
    worker.start(
        PIPELINE_CRASH_AT=step.value,
        PIPELINE_FAULT_TOPIC=topic,
        PIPELINE_FAULT_MIN_EVENTS=str(min_events),
    )
    code = await asyncio.to_thread(worker.wait_exit, 180)
    assert code == EXIT_INJECTED, f"worker did not crash at {step}: {code}\n{worker.log_tail()}"
    if COMMIT_STEPS.index(step) <= COMMIT_STEPS.index(Step.COMMIT):
        # The transaction never committed: its events are still to do.
        ends = await record_ends(settings.bootstrap_servers, topic)
        committed = await committed_offsets(settings.bootstrap_servers, settings.app_id, topic)
        assert any((committed.get(p) or 0) < end for p, end in ends.items())
    worker.start()
    await wait_drained(settings, [worker], timeout=180)
    if step is Step.PERSIST:
        # Committed but never written to RocksDB: the restart restores it from the
        # changelog. Everything was committed before the restart, so the wait above can
        # end while the worker is still starting (seen under load): wait for the line.
        deadline = time.monotonic() + 180
        while True:
            restarted = worker.log_path.read_text(errors="replace").rsplit("=== start #", 1)[-1]
            found = re.search(r"restored [1-9]\d* changelog records", restarted)
            if found or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert found, restarted[-3000:]
    await _check(settings, 5000)


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
