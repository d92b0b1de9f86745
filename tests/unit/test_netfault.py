"""The fault proxy (pipeline/tools/netfault.py) on real loopback sockets, without a broker.

The "broker" here is a tiny server that records every request frame it receives and
answers each with a frame of its own, so each fault's effect on the bytes is visible.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.tools.netfault import DOWN, END_TXN, UP, FrameScanner, Link
from pipeline.tools.procs import free_port


def frame(api_key: int, body: bytes = b"") -> bytes:
    payload = struct.pack(">hhi", api_key, 0, 7) + body
    return struct.pack(">i", len(payload)) + payload


@given(
    st.lists(st.tuples(st.integers(0, 70), st.binary(max_size=300)), min_size=1, max_size=12),
    st.lists(st.integers(1, 64), min_size=1, max_size=40),
)
@settings(max_examples=300, deadline=None)
def test_the_scanner_finds_every_request_however_the_stream_is_cut(
    requests: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(frame(k, b) for k, b in requests)
    chunks, i, c = [], 0, 0
    while i < len(stream):
        step = cuts[c % len(cuts)]
        chunks.append(stream[i : i + step])
        i, c = i + step, c + 1
    scanner = FrameScanner()
    found = []
    consumed = 0
    for chunk in chunks:
        for f in scanner.scan(chunk):
            found.append(f.api_key)
            # Where it says the request starts is where it does, in stream terms.
            assert stream[consumed + f.start + 4 : consumed + f.start + 6] == struct.pack(
                ">h", f.api_key
            )
            cut = f.cut(len(chunk))
            assert 1 <= cut <= len(chunk)
        consumed += len(chunk)
    assert found == [k for k, _ in requests]


class Broker:
    """Records request frames; answers each with ``frame(api_key)`` at once."""

    def __init__(self) -> None:
        self.port = free_port()
        self.frames: list[int] = []
        self.closed_conns = 0
        self.resets = 0
        self.got = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readexactly(4)
                (size,) = struct.unpack(">i", head)
                body = await reader.readexactly(size)
                (api,) = struct.unpack(">h", body[:2])
                self.frames.append(api)
                self.got.set()
                writer.write(frame(api, b"answer"))
                await writer.drain()
        except asyncio.IncompleteReadError:
            self.closed_conns += 1
        except ConnectionResetError:
            self.resets += 1
        finally:
            writer.close()


@pytest.fixture
async def net() -> AsyncIterator[tuple[Broker, Link]]:
    broker = Broker()
    server = await asyncio.start_server(broker.serve, "127.0.0.1", broker.port)
    link = Link(free_port(), broker.port)
    await link.start()
    try:
        yield broker, link
    finally:
        await link.close()
        server.close()
        await server.wait_closed()


async def client(link: Link) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", link.listen)


async def answer(reader: asyncio.StreamReader) -> int:
    (size,) = struct.unpack(">i", await reader.readexactly(4))
    body = await reader.readexactly(size)
    return int(struct.unpack(">h", body[:2])[0])


async def test_bytes_pass_unchanged_both_ways(net: tuple[Broker, Link]) -> None:
    broker, link = net
    r, w = await client(link)
    for api in (18, 3, 0, END_TXN):
        w.write(frame(api, b"x" * 1000))
    await w.drain()
    assert [await answer(r) for _ in range(4)] == [18, 3, 0, END_TXN]
    assert broker.frames == [18, 3, 0, END_TXN]
    assert link.requests[END_TXN] == 1
    w.close()


async def test_a_partition_holds_both_ways_and_new_connections_then_heals(
    net: tuple[Broker, Link],
) -> None:
    broker, link = net
    r, w = await client(link)
    w.write(frame(3))
    assert await answer(r) == 3
    cut = asyncio.ensure_future(link.partition(1.5))
    await asyncio.sleep(0.1)
    w.write(frame(0, b"held"))
    await w.drain()
    r2, w2 = await client(link)  # accepted, but no path to the broker yet
    w2.write(frame(12))
    await w2.drain()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(answer(r), 0.8)
    assert broker.frames == [3]  # nothing reached the broker during the partition
    await cut
    # Healed: what was held is delivered, as a retransmission would deliver it.
    assert await asyncio.wait_for(answer(r), 5) == 0
    assert await asyncio.wait_for(answer(r2), 5) == 12
    assert sorted(broker.frames) == [0, 3, 12]
    w.close()
    w2.close()


@pytest.mark.parametrize("direction", [UP, DOWN])
async def test_a_commit_delay_holds_the_end_txn_one_way(
    net: tuple[Broker, Link], direction: str
) -> None:
    broker, link = net
    r, w = await client(link)
    delayed = asyncio.ensure_future(link.delay_commit(direction, 1.5, within=5))
    await asyncio.sleep(0.05)
    w.write(frame(0))
    assert await answer(r) == 0  # not a commit: not held
    loop = asyncio.get_running_loop()
    sent = loop.time()
    w.write(frame(END_TXN))
    await w.drain()
    await asyncio.sleep(0.7)
    if direction == UP:
        assert broker.frames == [0]  # the commit has not reached the broker
    else:
        assert broker.frames == [0, END_TXN]  # committed; its answer is what waits
    assert await asyncio.wait_for(answer(r), 5) == END_TXN
    assert loop.time() - sent >= 1.4
    note = await delayed
    assert "EndTxn" in note and direction in note
    w.close()


async def test_a_commit_delay_without_a_commit_holds_every_connection(
    net: tuple[Broker, Link],
) -> None:
    _, link = net
    r, w = await client(link)
    w.write(frame(3))
    assert await answer(r) == 3
    delayed = asyncio.ensure_future(link.delay_commit(DOWN, 1.0, within=0.2))
    await asyncio.sleep(0.3)
    w.write(frame(1))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(answer(r), 0.4)
    assert await asyncio.wait_for(answer(r), 5) == 1
    assert "no commit" in await delayed
    w.close()


async def test_a_reset_cuts_the_next_request_half_way(net: tuple[Broker, Link]) -> None:
    broker, link = net
    r, w = await client(link)
    w.write(frame(3))
    assert await answer(r) == 3
    r_idle, w_idle = await client(link)
    await asyncio.sleep(0.1)
    resetting = asyncio.ensure_future(link.reset(within=1.0))
    await asyncio.sleep(0.1)
    w.write(frame(0, b"p" * 10_000))
    await w.drain()
    note = await resetting
    assert note == "reset 2 connections: 1 mid-Produce, 1 idle"
    # The client sees its connection broken; the broker never got the whole request.
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(answer(r), 5)
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(answer(r_idle), 5)
    await asyncio.sleep(0.2)
    assert broker.frames == [3]
    # New connections work again.
    r2, w2 = await client(link)
    w2.write(frame(18))
    assert await asyncio.wait_for(answer(r2), 5) == 18
    for writer in (w, w_idle, w2):
        with contextlib.suppress(Exception):
            writer.close()


async def test_a_reset_cuts_a_connection_opened_after_the_armed_one_closed(
    net: tuple[Broker, Link],
) -> None:
    """A worker just started: its bootstrap connection closes by itself, and its next
    request goes on a connection opened after the reset began. That one is cut; once
    one is, later connections are left alone."""
    broker, link = net
    r, w = await client(link)
    w.write(frame(18))
    assert await answer(r) == 18
    resetting = asyncio.ensure_future(link.reset(within=5.0))
    await asyncio.sleep(0.1)
    w.close()
    await asyncio.sleep(0.3)
    assert not resetting.done()  # nothing cut yet: the reset waits on
    r2, w2 = await client(link)
    w2.write(frame(3, b"m" * 10_000))
    await w2.drain()
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(answer(r2), 5)
    r3, w3 = await client(link)
    w3.write(frame(18))
    assert await asyncio.wait_for(answer(r3), 5) == 18
    assert await asyncio.wait_for(resetting, 5) == "reset 2 connections: 1 mid-Metadata"
    assert broker.frames == [18, 18]
    for writer in (w2, w3):
        with contextlib.suppress(Exception):
            writer.close()


async def test_a_link_to_a_dead_broker_refuses_the_client() -> None:
    link = Link(free_port(), free_port())  # nothing listens upstream
    await link.start()
    try:
        r, w = await client(link)
        w.write(frame(18))
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(answer(r), 5)
    finally:
        await link.close()
