"""How Faust's fetch loop hands records to the conductor under a backlog
(``SettlingConsumer._blocker`` and ``_wait_for_room``), without a broker."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from faust.types import TP
from mode.utils.queues import FlowControlEvent, FlowControlQueue

from pipeline.eos import SettlingConsumer

TP0 = TP("orders.raw", 0)


#: Only a hang ends a wait this long; no verdict depends on it.
HANG_S = 30.0


class Watched:
    """A channel's view of its stream buffer that counts the waiter's looks at it."""

    def __init__(self, queue: FlowControlQueue[int]) -> None:
        self.queue = queue
        self.polls = 0

    def qsize(self) -> int:
        self.polls += 1
        return self.queue.qsize()

    def full(self) -> bool:
        return self.queue.full()

    @property
    def pressure_drop_size(self) -> int:
        return self.queue.pressure_drop_size


async def polled(view: Watched, times: int) -> None:
    """Until the waiter has looked at the buffer ``times`` more times (or returned)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANG_S
    want = view.polls + times
    while view.polls < want:
        assert loop.time() < deadline, f"the waiter did not poll {times} times in {HANG_S:.0f} s"
        await asyncio.sleep(0.001)


def consumer(maxsize: int = 10) -> tuple[Any, FlowControlQueue[int]]:
    flow = FlowControlEvent()
    flow.resume()
    queue: FlowControlQueue[int] = FlowControlQueue(maxsize=maxsize, flow_control=flow)
    chan = SimpleNamespace(queue=Watched(queue))
    fake = SimpleNamespace(
        suspend_flow=asyncio.Event(),
        should_stop=False,
        app=SimpleNamespace(
            flow_control=flow,
            topics=SimpleNamespace(_tp_to_callback_lock=asyncio.Lock(), _tp_index={TP0: [chan]}),
            producer=SimpleNamespace(buffer=SimpleNamespace(size=0, max_messages=100)),
        ),
    )
    return fake, queue


def watched(fake: Any) -> Watched:
    view: Watched = fake.app.topics._tp_index[TP0][0].queue
    return view


MSG = SimpleNamespace(tp=TP0)


async def test_nothing_blocks_a_delivery_into_room() -> None:
    fake, queue = consumer()
    assert SettlingConsumer._blocker(fake, MSG) is None
    for i in range(10):
        queue.put_nowait(i)
    assert SettlingConsumer._blocker(fake, MSG) == "stream buffer"
    fake.app.producer.buffer.size = 101
    assert SettlingConsumer._blocker(fake, MSG) == "producer buffer"
    fake.suspend_flow.set()
    assert SettlingConsumer._blocker(fake, MSG) == "suspended"


async def test_a_full_buffer_is_waited_out_down_to_the_low_water_mark() -> None:
    fake, queue = consumer(maxsize=10)
    for i in range(10):
        queue.put_nowait(i)
    view = watched(fake)
    waiter = asyncio.ensure_future(SettlingConsumer._wait_for_room(fake, MSG, poll_s=0.001))
    taken = 0
    # One record taken leaves room, but not down to 40%: still waiting.
    queue.get_nowait()
    taken += 1
    await polled(view, 2)  # it saw the buffer after the take, and went on waiting
    assert not waiter.done()
    while queue.qsize() > queue.pressure_drop_size:
        queue.get_nowait()
        taken += 1
    # The first look at the buffer down at the mark ends the wait.
    await polled(view, 1)
    assert waiter.done(), f"still waiting with {queue.qsize()} records in the buffer"
    await waiter
    assert queue.qsize() == 4 and taken == 6
    assert SettlingConsumer._blocker(fake, MSG) is None


async def test_a_rebalance_ends_the_wait() -> None:
    fake, queue = consumer(maxsize=10)
    for i in range(10):
        queue.put_nowait(i)
    view = watched(fake)
    waiter = asyncio.ensure_future(SettlingConsumer._wait_for_room(fake, MSG, poll_s=0.001))
    await polled(view, 2)
    assert not waiter.done()
    fake.suspend_flow.set()
    await asyncio.wait_for(waiter, HANG_S)
    assert queue.qsize() == 10
    assert SettlingConsumer._blocker(fake, MSG) == "suspended"
