"""Early commits when the agents go quiet (``Coordinator.wait_quiet``), without a broker.

That processed batches count as activity: ``tests/unit/eos/test_delivery.py``."""

from __future__ import annotations

import asyncio

from pipeline.eos import Coordinator
from pipeline.settings import Settings


async def test_no_event_means_no_early_commit() -> None:
    coord = Coordinator(Settings())
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert not await coord.wait_quiet(0.005, started + 0.05)
    assert loop.time() - started >= 0.05


async def test_quiet_after_an_event_commits_before_the_interval() -> None:
    coord = Coordinator(Settings())
    loop = asyncio.get_running_loop()
    coord.last_done = loop.time()
    coord.activity.set()
    started = loop.time()
    # The interval is far longer than any stall of a loaded machine, so that "returned at
    # the quiet point, not at the end of the interval" is told apart by a wide margin.
    assert await coord.wait_quiet(0.005, started + 60.0)
    waited = loop.time() - started
    assert 0.004 <= waited < 30.0, f"returned after {waited:.3f} s, not at the quiet point"
    # The event has been waited for: the next call needs new activity.
    assert not coord.activity.is_set()
    assert not await coord.wait_quiet(0.005, loop.time() + 0.03)


async def test_a_busy_stream_is_never_quiet() -> None:
    coord = Coordinator(Settings())
    loop = asyncio.get_running_loop()

    async def busy() -> None:
        while True:
            coord.last_done = loop.time()
            coord.activity.set()
            await asyncio.sleep(0.001)

    task = asyncio.ensure_future(busy())
    try:
        started = loop.time()
        # Quiet means 0.5 s without an event: only a stall of the whole loop that long
        # (never seen, even on a loaded machine) could pass for it.
        assert not await coord.wait_quiet(0.5, started + 1.0)
        assert loop.time() - started >= 1.0
    finally:
        task.cancel()


async def test_activity_during_the_wait_pushes_the_quiet_point() -> None:
    coord = Coordinator(Settings())
    loop = asyncio.get_running_loop()
    coord.last_done = loop.time()
    coord.activity.set()

    async def one_more() -> None:
        await asyncio.sleep(0.01)
        coord.last_done = loop.time()

    started = loop.time()
    task = asyncio.ensure_future(one_more())
    assert await coord.wait_quiet(0.02, started + 1.0)
    await task
    assert loop.time() - started >= 0.03 - 0.002
