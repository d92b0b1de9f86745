"""Step 3's wait (:func:`pipeline.eos.partition.drained`): it ends at the first
refusal wherever it lies, at the sender's end, or once every send completed; and it
leaves no callback behind on the sends it did not wait for."""

from __future__ import annotations

import asyncio
from typing import Any

from pipeline.eos.partition import drained


def _futures(n: int) -> list[asyncio.Future[Any]]:
    loop = asyncio.get_running_loop()
    return [loop.create_future() for _ in range(n)]


async def test_every_send_completed() -> None:
    sends = _futures(5)
    task = asyncio.ensure_future(drained(sends, None))
    for f in reversed(sends):  # batches of other partitions may complete first
        await asyncio.sleep(0)
        assert not task.done()
        f.set_result(None)
    assert await task is False


async def test_a_refusal_behind_a_send_in_flight_ends_the_wait() -> None:
    sends = _futures(4)
    sender = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(drained(sends, sender))
    await asyncio.sleep(0)
    sends[3].set_exception(ValueError("refused"))  # the first stays in flight
    assert await asyncio.wait_for(task, 5) is False
    # Nothing of the wait stays attached to the sends still in flight.
    for f in sends[:3]:
        assert not f._callbacks  # type: ignore[attr-defined]


async def test_a_refusal_already_there_ends_it_at_once() -> None:
    sends = _futures(3)
    sends[1].set_exception(ValueError("refused"))
    assert await asyncio.wait_for(drained(sends, None), 5) is False
    assert not sends[0]._callbacks  # type: ignore[attr-defined]


async def test_the_senders_end_ends_it() -> None:
    sends = _futures(3)
    sender = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(drained(sends, sender))
    await asyncio.sleep(0)
    sends[0].set_result(None)
    await asyncio.sleep(0)
    sender.set_result(None)
    assert await asyncio.wait_for(task, 5) is True


async def test_a_cancelled_send_is_not_a_refusal() -> None:
    sends = _futures(2)
    task = asyncio.ensure_future(drained(sends, None))
    await asyncio.sleep(0)
    sends[0].cancel()
    sends[1].set_result(None)
    assert await asyncio.wait_for(task, 5) is False
