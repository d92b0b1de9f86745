"""The worker's clients outside its group, made on demand: never two of one, whatever
the interleaving of the tasks asking."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.eos.readers import OnDemand


class Client:
    """Stands in for a started consumer: only its stop is called by OnDemand."""

    def __init__(self, fail_stop: bool = False) -> None:
        self.stops = 0
        self.fail_stop = fail_stop

    async def stop(self) -> None:
        self.stops += 1
        if self.fail_stop:
            raise ConnectionError("broker away")


async def test_tasks_asking_at_once_share_one_client() -> None:
    made: list[Client] = []
    gate = asyncio.Event()

    async def make() -> Client:
        # Starting takes a while (a broker round trip): the other tasks ask meanwhile.
        await gate.wait()
        made.append(Client())
        return made[-1]

    ondemand = OnDemand(make)
    asking = [asyncio.ensure_future(ondemand.get()) for _ in range(5)]
    await asyncio.sleep(0)
    gate.set()
    got = await asyncio.gather(*asking)
    assert len(made) == 1
    assert all(c is made[0] for c in got)
    await ondemand.close()
    assert made[0].stops == 1
    await ondemand.close()  # nothing left to stop
    assert made[0].stops == 1


async def test_a_closed_client_is_made_again_on_the_next_get() -> None:
    made: list[Client] = []

    async def make() -> Client:
        made.append(Client(fail_stop=True))
        return made[-1]

    ondemand = OnDemand(make)
    first = await ondemand.get()
    with pytest.raises(ConnectionError):
        await ondemand.close()
    assert not ondemand.made
    second = await ondemand.get()
    assert second is not first
    await ondemand.close(quiet=True)  # its stop failed, and said nothing
    assert (first.stops, second.stops) == (1, 1)


async def test_a_failed_make_leaves_nothing_and_the_next_get_tries_again() -> None:
    attempts = 0

    async def make() -> Client:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise TimeoutError("no broker")
        return Client()

    ondemand = OnDemand(make)
    with pytest.raises(TimeoutError):
        await ondemand.get()
    assert not ondemand.made
    assert isinstance(await ondemand.get(), Client)
    assert attempts == 2
