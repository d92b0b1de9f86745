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


def consumer(maxsize: int = 10) -> tuple[Any, FlowControlQueue[int]]:
    flow = FlowControlEvent()
    flow.resume()
    queue: FlowControlQueue[int] = FlowControlQueue(maxsize=maxsize, flow_control=flow)
    chan = SimpleNamespace(queue=queue)
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
    waiter = asyncio.ensure_future(SettlingConsumer._wait_for_room(fake, MSG, poll_s=0.001))
    taken = 0
    # One record taken leaves room, but not down to 40%: still waiting.
    queue.get_nowait()
    taken += 1
    await asyncio.sleep(0.01)
    assert not waiter.done()
    while queue.qsize() > queue.pressure_drop_size:
        queue.get_nowait()
        taken += 1
    await asyncio.wait_for(waiter, 1.0)
    assert queue.qsize() == 4 and taken == 6
    assert SettlingConsumer._blocker(fake, MSG) is None


async def test_a_rebalance_ends_the_wait() -> None:
    fake, queue = consumer(maxsize=10)
    for i in range(10):
        queue.put_nowait(i)
    waiter = asyncio.ensure_future(SettlingConsumer._wait_for_room(fake, MSG, poll_s=0.001))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    fake.suspend_flow.set()
    await asyncio.wait_for(waiter, 1.0)
    assert queue.qsize() == 10
    assert SettlingConsumer._blocker(fake, MSG) == "suspended"
