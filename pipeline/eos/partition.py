"""One source partition's share of the engine: its processing gate, the open
transaction's bookkeeping, and the sends held while its previous transaction commits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from faust.types import TP


def progress_key(tp: TP) -> bytes:
    """The key of a source partition's record on the progress topic."""
    return f"{tp.topic}:{tp.partition}".encode()


@dataclass(slots=True)
class OutRecord:
    """A record sent in a source partition's transaction; ``future`` is set while it is
    held (made while the partition's previous transaction commits)."""

    topic: str
    key: bytes | None
    value: bytes | None
    partition: int | None
    timestamp_ms: int | None
    headers: list[tuple[str, bytes]] | None
    #: the offset of the source event that made it (which event a failed send blames)
    source_offset: int | None = None
    future: asyncio.Future[Any] | None = None


@dataclass
class PartitionState:
    """Per source partition: the processing gate and what the open transaction holds."""

    gate: asyncio.Lock = field(default_factory=asyncio.Lock)
    processed: int | None = None
    committed: int | None = None
    #: the lowest offset that may be processed next (set when positions settle)
    expected: int | None = None
    #: a committed record Faust did not deliver: nothing after it until it comes
    hole: int | None = None
    watch: asyncio.Future[None] | None = None
    last_delivery: float = 0.0
    #: the sends of the open transaction: per future, the source offset of the first
    #: event whose record it carries (None: a changelog or progress row), so that a send
    #: the broker refuses is blamed on its event. A future may be a whole producer
    #: batch's (``Transaction.put``), in offset order: its first record's event is the
    #: earliest one the refusal can be blamed on.
    pending: dict[asyncio.Future[Any], int | None] = field(default_factory=dict)
    #: the commit step this partition's commit is at (for the stuck-commit warning)
    step: str = ""
    #: between a commit's snapshot and its next ``begin``, sends wait here (see
    #: ExactlyOnceTransactionManager._commit_tp) instead of entering the committing one
    holding: bool = False
    held: list[OutRecord] = field(default_factory=list)
    #: set while nothing is held: processing that made :data:`HELD_MAX` held sends waits
    #: on it (see ``Coordinator._process``)
    unheld: asyncio.Event = field(default_factory=asyncio.Event)
    #: events processed since the open transaction's snapshot (step 1), and how many the
    #: transaction being committed holds: what the test-only fault filters look at
    events: int = 0
    txn_events: int = 0
    #: where processing of this assignment started (the committed offset then)
    start: int | None = None
    #: an event failed: nothing of the partition is processed or committed until its
    #: open transaction is aborted and processing went back to the last commit
    rewinding: bool = False
    #: the partition's producer was fenced: another producer owns its transactional id,
    #: so the abort that follows gives the partition up instead of starting a new
    #: producer (which would fence that owner in turn)
    fenced: bool = False
    #: per offset that failed: (attempts, the last error, bounded)
    failures: dict[int, tuple[int, str]] = field(default_factory=dict)
    #: aborts for failed events since the last commit (see MAX_REWINDS_WITHOUT_COMMIT)
    rewinds_in_a_row: int = 0
    #: rewinds done: a batch whose processing was suspended (at its emit, or waiting for
    #: a commit, see HELD_MAX) across one must not go on with its later records
    rewound: int = 0
    #: the sends a commit awaits at its drain step, with the offsets of their events
    draining: tuple[list[asyncio.Future[Any]], list[int | None]] = field(
        default_factory=lambda: ([], [])
    )
    #: loop time of the last event processed (or of the settle), for the stall gauge
    last_progress: float = 0.0
    #: loop time since which records wait here while none is processed (None: not stalled)
    stalled_since: float | None = None
    #: how many offsets the last fetched batch ended before the log's end (its last
    #: stable offset): more than 0 under a backlog
    behind: int = 0

    @property
    def has_progress(self) -> bool:
        if self.processed is None:
            return bool(self.pending)
        return self.committed is None or self.processed + 1 > self.committed or bool(self.pending)

    @property
    def due(self) -> bool:
        """Whether a commit round must commit this partition: it has progress, or an
        event of it is being processed right now (its gate is held). A revoke's commit
        that skipped such a partition left the event's effects in the open transaction
        past the offset the next assignment continues from (found with batches, where
        the window is a whole batch; one event wide here)."""
        return self.has_progress or self.gate.locked()

    def hold(self) -> None:
        """From a commit's snapshot to its next ``begin``: sends wait in :attr:`held`."""
        self.holding = True
        self.unheld.clear()

    def release(self) -> None:
        self.holding = False
        self.unheld.set()


def fail_held(st: PartitionState, why: str) -> None:
    """Held sends that will never be sent: their events were not committed either, and
    are processed again by the partition's next owner (or by this worker, re-assigned)."""
    held, st.held = st.held, []
    st.release()
    for h in held:
        if h.future is not None and not h.future.done():
            h.future.set_exception(RuntimeError(f"not sent: {why} before its commit"))
            retrieve(h.future)  # nobody awaits a held send: no "never retrieved" noise


async def drained(pending: list[asyncio.Future[Any]], sender: asyncio.Future[Any] | None) -> bool:
    """Wait until every send of ``pending`` completed or one failed; True instead if the
    producer's sender task ended first (its remaining sends would never complete).

    A transaction holds thousands of sends, resolved a producer batch at a time. Waiting
    on all of them at each wake-up (``asyncio.wait`` over what is left) added and removed
    a callback per send per batch: in a 200,000-event run the full chain's worker had
    40,000 callbacks queued and 200,000 futures alive. Here each send gets one callback,
    which only reports a failure, and the wait is on one send at a time, in order.
    """
    loop = asyncio.get_running_loop()
    failed: asyncio.Future[None] = loop.create_future()

    def on_done(f: asyncio.Future[Any]) -> None:
        if not failed.done() and not f.cancelled() and f.exception() is not None:
            failed.set_result(None)

    if any(f.done() and not f.cancelled() and f.exception() is not None for f in pending):
        return False
    for f in pending:
        if not f.done():
            f.add_done_callback(on_done)
    try:
        for f in pending:
            if f.done():
                continue
            watch = {f, failed} if sender is None else {f, failed, sender}
            done, _ = await asyncio.wait(watch, return_when=asyncio.FIRST_COMPLETED)
            if sender is not None and sender in done:
                return True
            if failed.done() or (f.done() and not f.cancelled() and f.exception() is not None):
                return False
        return False
    finally:
        for f in pending:
            if not f.done():
                f.remove_done_callback(on_done)


def retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a future's outcome as seen (its failure is handled where it is decided)."""
    if not fut.cancelled():
        fut.exception()


def chain(source: asyncio.Future[Any], target: asyncio.Future[Any]) -> None:
    """Resolve ``target`` (a held send's future) as ``source`` (the real send) resolves."""

    def done(f: asyncio.Future[Any]) -> None:
        if target.done():
            return
        if f.cancelled():
            target.cancel()
        elif f.exception() is not None:
            target.set_exception(f.exception())  # type: ignore[arg-type]
        else:
            target.set_result(f.result())

    source.add_done_callback(done)


class NoGate:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


NO_GATE = NoGate()


def as_headers(headers: Any) -> list[tuple[str, bytes]] | None:
    if not headers:
        return None
    if isinstance(headers, Mapping):
        return list(headers.items())
    return list(headers)
