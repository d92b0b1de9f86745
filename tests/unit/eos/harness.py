"""A coordinator settled on one partition, and a simulated consumer in front of it.

The log is a set of committed-record offsets below an end; the other offsets are
transaction markers or aborted records. The consumer hands records out as
:class:`~pipeline.eos.delivery.Fetched` batches from its position, moving the position
past trailing markers, and counts its seeks, as Faust's consumer thread does
(``pipeline.eos.faust.consumer``). Nothing here waits on a clock: the tests drive the
batches through the coordinator's own ``_process``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from faust.types import TP

from pipeline.eos.coordinator import Coordinator
from pipeline.eos.delivery import Fetched
from pipeline.eos.partition import OutRecord, PartitionState, fail_held
from pipeline.eos.stage import Out, Stage
from pipeline.settings import Settings

TP0 = TP("orders.raw", 0)
T = TypeVar("T")

#: Only a hang ends a wait this long; no verdict depends on it.
HANG_S = 30.0


async def until(cond: Callable[[], bool], what: str) -> None:
    """Yield to the loop until ``cond()``; fail after :data:`HANG_S`, naming ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANG_S
    while not cond():
        assert loop.time() < deadline, f"waited {HANG_S:.0f} s for {what}"
        await asyncio.sleep(0.001)


async def finished(aw: Awaitable[T], what: str) -> T:
    try:
        return await asyncio.wait_for(aw, HANG_S)
    except TimeoutError:
        raise AssertionError(f"waited {HANG_S:.0f} s for {what}") from None


@dataclass
class Rec:
    """A source record, as aiokafka's ``ConsumerRecord`` has it."""

    offset: int
    topic: str = TP0.topic
    partition: int = TP0.partition
    timestamp: int = 0
    key: bytes | None = None
    value: bytes | None = b"v"
    headers: list[tuple[str, bytes]] = field(default_factory=list)


class Consumer:
    """One partition's log and a consumer reading it in batches."""

    def __init__(self, records: Iterable[int], end: int) -> None:
        self.records = sorted(records)
        self.end = end
        self.position = 0
        self.seeks: list[int] = []
        self.counts: dict[TP, int] = {}

    async def seek_wait(self, targets: dict[TP, int]) -> None:
        for tp, offset in targets.items():
            self.counts[tp] = self.counts.get(tp, 0) + 1
            self.position = offset
            self.seeks.append(offset)

    def fetch(self, n: int, past_markers: bool = True) -> Fetched:
        """Up to ``n`` records from the position; the position moves past them, and
        (``past_markers``) past the markers that follow them, up to the next record."""
        batch = [o for o in self.records if o >= self.position][:n]
        fetched = Fetched(Rec(o) for o in batch)
        fetched.tp = TP0
        fetched.start = self.position
        if batch:
            following = next((o for o in self.records if o > batch[-1]), self.end)
            fetched.end = following if past_markers else batch[-1] + 1
        else:
            fetched.end = self.position
        fetched.seeks = self.counts.get(TP0, 0)
        fetched.certain = True
        fetched.behind = 0
        self.position = fetched.end
        return fetched


class Handled:
    """A stage that records what it handled; ``fail`` decides whether a record raises."""

    def __init__(self, fail: Callable[[int], bool] = lambda offset: False) -> None:
        self.offsets: list[int] = []
        self.letters: list[tuple[int, str]] = []
        self.fail = fail

    def stage(self) -> Stage:
        def handle(record: Any, out: Out) -> None:
            if self.fail(record.offset):
                raise RuntimeError(f"record {record.offset} fails " + "x" * 10_000)
            self.offsets.append(record.offset)
            out.send("out", None, str(record.offset).encode())

        def dead_letter(record: Any, reason: str, out: Out) -> None:
            self.letters.append((record.offset, reason))
            out.send("dlq", None, reason.encode())

        return Stage("test", TP0.topic, handle, dead_letter)


class Emitted:
    """The transaction manager's ``emit_all``: records what went into which transaction;
    a value in ``raise_for`` is refused before it is queued, as a record larger than the
    producer may send is, and nothing after it in the chunk goes in."""

    def __init__(self) -> None:
        self.records: list[tuple[TP, OutRecord]] = []
        self.raise_for: set[bytes] = set()

    async def __call__(
        self, source: TP, records: list[OutRecord]
    ) -> tuple[OutRecord, BaseException] | None:
        for record in records:
            if record.value in self.raise_for:
                return record, RuntimeError("MessageSizeTooLarge: refused before it was queued")
            self.records.append((source, record))
        return None

    def values(self, topic: str = "out") -> list[bytes]:
        return [r.value or b"" for _, r in self.records if r.topic == topic]


class Rewinder:
    """What the transaction manager's rewind does, as far as the coordinator sees it:
    back to the last commit, and the partition fetched again from there."""

    def __init__(self, coord: Coordinator, consumer: Consumer) -> None:
        self.coord = coord
        self.consumer = consumer
        self.calls = 0

    async def __call__(self, tp: TP, st: PartitionState) -> None:
        self.calls += 1
        fail_held(st, "its transaction was aborted")
        st.processed = None
        st.expected = st.committed if st.committed is not None else st.start
        st.rewound += 1
        st.rewinding = False
        assert st.expected is not None
        await self.consumer.seek_wait({tp: st.expected})


def settled(records: Iterable[int], committed: int, end: int) -> tuple[Coordinator, Consumer]:
    """A coordinator settled on :data:`TP0` at ``committed``, and its consumer."""
    coord = Coordinator(Settings())
    consumer = Consumer(records, end)
    coord.seek_wait = consumer.seek_wait  # type: ignore[assignment]
    coord.seek_counts = consumer.counts
    coord.state(TP0)

    async def go() -> None:
        await coord.settle({TP0: committed})
        # settle seeks every partition to where it continues (in a task of its own)
        await until(lambda: committed in consumer.seeks, "the settle's seek")

    asyncio.run(go())
    return coord, consumer


async def deliver(coord: Coordinator, stage: Stage, *batches: Fetched) -> None:
    """The batches through the coordinator, as the stage's agent would take them."""
    for batch in batches:
        batch.epoch = coord.unsettled_count
        await coord._process(stage, batch)
