"""Network faults between one worker and the broker: a TCP proxy per worker.

``chaos`` gives each worker process a *slot*. The local broker (``scripts/kafka``) has a
plaintext listener ``FAULTi`` per slot on ``base + i``, advertised as ``base + 100 + i``;
a :class:`Link` listens on that advertised port and forwards to the listener. The worker
is bootstrapped at its link's port, and since the broker's metadata names only that
address to a client that came in on ``FAULTi``, every request of the worker (fetches,
produces, heartbeats, transaction calls, to whichever coordinator) passes its link.
The faults act on the bytes in flight, not on the process, which keeps running: its
timers fire and its clients retry, as they would on a real network.

* :meth:`Link.partition`: both directions of every connection are held, and new
  connections are accepted but not connected on, for ``seconds``; then everything held
  is delivered, as TCP retransmission would deliver it after a short outage. A client
  that gave up on a connection meanwhile finds it closed after the heal; the broker
  still receives the requests that were held on it (a late produce, a late commit).
* :meth:`Link.delay_commit`: the next ``EndTxn`` request on any of the worker's
  connections holds that connection, in one direction, for ``seconds``: ``up`` delays
  the commit on its way to the broker; ``down`` delays the broker's answer, so the
  worker waits on a commit that has already happened.
* :meth:`Link.reset`: every connection is cut in the middle of its next request (half
  the request forwarded, then both sockets closed with a reset); a connection that
  sends nothing within the limit is cut as it is.

Kafka's framing is all the proxy reads: a request is a 4-byte big-endian size followed
by that many bytes, of which the first two are the API key (:class:`FrameScanner`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

#: API keys of Kafka's protocol, by name, for the notes (the ones a worker sends)
API_NAMES = {
    0: "Produce",
    1: "Fetch",
    2: "ListOffsets",
    3: "Metadata",
    8: "OffsetCommit",
    9: "OffsetFetch",
    10: "FindCoordinator",
    11: "JoinGroup",
    12: "Heartbeat",
    13: "LeaveGroup",
    14: "SyncGroup",
    18: "ApiVersions",
    19: "CreateTopics",
    22: "InitProducerId",
    24: "AddPartitionsToTxn",
    25: "AddOffsetsToTxn",
    26: "EndTxn",
    28: "TxnOffsetCommit",
    32: "DescribeConfigs",
}
END_TXN = 26
UP, DOWN = "up", "down"
_CHUNK = 256 * 1024
_HEAD = struct.Struct(">ih")


def api_name(key: int) -> str:
    return API_NAMES.get(key, f"api {key}")


@dataclass(frozen=True, slots=True)
class Frame:
    """A request seen on a connection: its API key, and where it starts in the chunk
    that completed its header (negative when the header began in an earlier chunk)."""

    api_key: int
    start: int
    size: int

    def cut(self, chunk_len: int) -> int:
        """A place inside the request, within the chunk: after its header, at most half way."""
        middle = self.start + 4 + max(self.size // 2, 2)
        return max(1, min(middle, chunk_len))


class FrameScanner:
    """Finds request headers in a client's byte stream, however it is cut into chunks."""

    def __init__(self) -> None:
        #: bytes of the current request still to come after its header
        self._left = 0
        self._head = bytearray()

    def scan(self, chunk: bytes) -> list[Frame]:
        frames: list[Frame] = []
        i, n = 0, len(chunk)
        while i < n:
            if self._left:
                step = min(self._left, n - i)
                self._left -= step
                i += step
                continue
            take = chunk[i : i + _HEAD.size - len(self._head)]
            self._head += take
            i += len(take)
            if len(self._head) == _HEAD.size:
                size, api_key = _HEAD.unpack(self._head)
                self._head.clear()
                frames.append(Frame(api_key, i - _HEAD.size, size))
                # The size counts the API key's two bytes, already read.
                self._left = max(size - 2, 0)
        return frames


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    #: loop time until which each direction is held (a delay)
    hold: dict[str, float] = field(default_factory=lambda: {UP: 0.0, DOWN: 0.0})
    #: set by :meth:`Link.reset`: cut at the next request
    reset_armed: bool = False
    closed: bool = False
    #: set when closed: ends a hold early (a link closing must not wait out a delay)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def abort(self) -> None:
        """Close both sides with a TCP reset, not an orderly FIN: what a broken path or
        a crashed middlebox leaves the peers with."""
        self.closed = True
        self.ended.set()
        for w in (self.client, self.upstream):
            if w is None:
                continue
            sock = w.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()


class Link:
    """One worker's proxy: ``127.0.0.1:listen`` to ``127.0.0.1:upstream``."""

    def __init__(self, listen: int, upstream: int, host: str = "127.0.0.1") -> None:
        self.listen = listen
        self.upstream = upstream
        self.host = host
        self.conns: set[_Conn] = set()
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._commit_delay: tuple[str, float, asyncio.Future[str]] | None = None
        self._resets: list[str] = []
        #: while a reset runs, the connections it cuts (see :meth:`reset`)
        self._armed: set[_Conn] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: requests seen per API, for the notes and the tests
        self.requests: Counter[int] = Counter()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.listen}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.listen)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._open.set()
        for c in list(self.conns):
            c.abort()
        # Aborted transports end every pump; waiting for them (not cancelling) lets each
        # connection's handler finish without a stray CancelledError in the log.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # -- faults --------------------------------------------------------------------

    async def partition(self, seconds: float) -> str:
        """Blackhole the worker's traffic both ways for ``seconds``, then heal."""
        held = self.cut()
        try:
            await asyncio.sleep(seconds)
        finally:
            self.heal()
        return f"{held} connections held both ways for {seconds:g} s, then healed"

    def cut(self) -> int:
        """Start a partition (see :meth:`partition`); the connections it holds."""
        self._open.clear()
        return len(self.conns)

    def heal(self) -> None:
        self._open.set()

    async def delay_commit(self, direction: str, seconds: float, within: float) -> str:
        """Hold the connection of the next ``EndTxn`` in ``direction`` for ``seconds``;
        when no commit comes within ``within`` seconds, hold every connection of the
        worker in that direction instead. Returns once the hold has begun."""
        if direction not in (UP, DOWN):
            raise ValueError(direction)
        fired: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._commit_delay = (direction, seconds, fired)
        try:
            note = await asyncio.wait_for(asyncio.shield(fired), within)
        except TimeoutError:
            self._commit_delay = None
            until = asyncio.get_running_loop().time() + seconds
            for c in self.conns:
                c.hold[direction] = max(c.hold[direction], until)
            note = (
                f"no commit within {within:g} s: all {len(self.conns)} connections held "
                f"{direction} for {seconds:g} s"
            )
        # The hold runs on by itself (a time on each held connection).
        return note

    async def reset(self, within: float) -> str:
        """Cut every connection in the middle of its next request (or idle, after
        ``within`` seconds); what was cut, by request. Until one is cut, a connection
        the worker opens meanwhile is armed too: a worker that just started may close
        its only connection (the bootstrap one) and open others before it asks
        anything, and a reset that cut nothing would not be a reset."""
        self._resets = []
        self._armed = set(self.conns)
        for c in self._armed:
            c.reset_armed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        try:
            while not self._resets or any(not c.closed for c in self._armed):
                if loop.time() >= deadline:
                    break
                await asyncio.sleep(0.05)
        finally:
            armed, self._armed = self._armed, None
        idle = 0
        for c in armed:
            c.reset_armed = False
            if not c.closed:
                c.abort()
                idle += 1
        cut = Counter(self._resets)
        parts = [f"{n} mid-{name}" for name, n in sorted(cut.items())]
        if idle:
            parts.append(f"{idle} idle")
        return f"reset {len(armed)} connections: {', '.join(parts) or 'none open'}"

    # -- forwarding ----------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(writer)
        self.conns.add(conn)
        if self._armed is not None and not self._resets:
            conn.reset_armed = True
            self._armed.add(conn)
        try:
            # A partitioned path answers no new connection either.
            await self._open.wait()
            try:
                up_reader, up_writer = await asyncio.open_connection(self.host, self.upstream)
            except OSError:
                conn.abort()  # the broker is down: the client sees the connection fail
                return
            conn.upstream = up_writer
            if up_writer.get_extra_info("sockname") == up_writer.get_extra_info("peername"):
                # Connected to itself: with nothing listening, the kernel gave this
                # socket the listener's port as its own. Holding it would keep the
                # broker from binding its port when it comes back.
                conn.abort()
                return
            down = self._spawn(self._pump(conn, up_reader, writer, DOWN, None))
            await self._pump(conn, reader, up_writer, UP, FrameScanner())
            await asyncio.gather(down, return_exceptions=True)
        finally:
            self.conns.discard(conn)
            if not conn.closed:
                conn.abort()

    async def _pump(
        self,
        conn: _Conn,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: str,
        scanner: FrameScanner | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not conn.closed:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                await self._open.wait()
                if conn.closed:
                    break
                if scanner is not None:
                    for frame in scanner.scan(data):
                        self.requests[frame.api_key] += 1
                        if conn.reset_armed:
                            conn.reset_armed = False
                            self._resets.append(api_name(frame.api_key))
                            writer.write(data[: frame.cut(len(data))])
                            with contextlib.suppress(OSError):
                                await writer.drain()
                            conn.abort()
                            return
                        if frame.api_key == END_TXN and self._commit_delay is not None:
                            which, seconds, fired = self._commit_delay
                            self._commit_delay = None
                            conn.hold[which] = loop.time() + seconds
                            if not fired.done():
                                fired.set_result(
                                    f"an EndTxn held {which} for {seconds:g} s "
                                    f"({'the commit request' if which == UP else 'its answer'})"
                                )
                wait = conn.hold[direction] - loop.time()
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(conn.ended.wait(), wait)
                    await self._open.wait()
                if conn.closed:
                    break
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # One side ended: end the other (a half-open proxy would hide the close).
            if not conn.closed:
                conn.abort()


class Proxies:
    """The links of a chaos run, one per slot, made on demand."""

    def __init__(self, base: int, slots: int, host: str = "127.0.0.1") -> None:
        self.base = base
        self.slots = slots
        self.host = host
        self.links: dict[int, Link] = {}

    def upstream_port(self, slot: int) -> int:
        return self.base + slot

    def listen_port(self, slot: int) -> int:
        return self.base + 100 + slot

    async def link(self, slot: int) -> Link:
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot}: the broker has {self.slots} proxy listeners")
        if slot not in self.links:
            link = Link(self.listen_port(slot), self.upstream_port(slot), self.host)
            await link.start()
            self.links[slot] = link
        return self.links[slot]

    async def close(self) -> None:
        await asyncio.gather(*(link.close() for link in self.links.values()))
        self.links.clear()


async def listener_ready(host: str, port: int, timeout: float = 2.0) -> bool:
    """Whether the broker's proxy listener ``port`` accepts connections."""
    try:
        _, w = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    w.close()
    with contextlib.suppress(OSError):
        await w.wait_closed()
    return True
