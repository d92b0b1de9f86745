"""Each gap of stock Faust EOS is real: with our fix switched off, a fault breaks
exactly-once, and the check says so. With the fix on, the same fault is harmless
(``test_dedup_chain.test_crash_at_commit_step`` runs every step with all fixes on).

Switch a fix off with ``PIPELINE_DISABLE_FIX=<name>`` (names in ``pipeline.eos.FIXES``).

Every scenario is built so that the break cannot be missed, on a fast machine or a slow
one: a fault fires only at a commit of the source topic the test judges, and only in a
transaction that holds at least ``MIN_EVENTS`` processed events (``PIPELINE_FAULT_TOPIC``,
``PIPELINE_FAULT_MIN_EVENTS``); an injected abort waits until the other partitions'
commits of its round have ended; a slowed step slows every commit, not one.

``STOCK_GAPS_WITH_FIX=1`` runs the ``stock`` variants with the fix left on: each must
then fail with "no break found", which shows that the checks can tell.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import orjson
import pytest
from rocksdict import AccessType, Rdict

from pipeline.eos import EXIT_COMMIT_FAILED, EXIT_INJECTED, Step
from pipeline.kafka_io import committed_offsets, produce, read_topic
from pipeline.settings import Settings
from pipeline.tools.generate import Record, generate
from pipeline.tools.procs import drained
from pipeline.tools.reconcile import reconcile

from .harness import Worker, feed, progress, wait_drained

pytestmark = pytest.mark.integration

#: a transaction the fault lands in holds at least this many events (see the docstring)
MIN_EVENTS = "20"


def _stock(fix: str) -> dict[str, str]:
    """The worker settings of a ``stock`` variant: ``fix`` off, unless the run asks to
    check the check (``STOCK_GAPS_WITH_FIX=1``)."""
    if os.environ.get("STOCK_GAPS_WITH_FIX") == "1":
        return {}
    return {"PIPELINE_DISABLE_FIX": fix}


def _fault(settings: Settings, topic: str | None = None, **extra: str) -> dict[str, str]:
    return {
        "PIPELINE_FAULT_TOPIC": topic or settings.topic_raw,
        "PIPELINE_FAULT_MIN_EVENTS": MIN_EVENTS,
        **extra,
    }


async def _until_drained_or_stuck(settings: Settings, worker: Worker, timeout: float) -> bool:
    """Wait until every stage committed all its input (True), or stopped committing.

    With a fix off, stock Faust can wedge a stage for good (seen in CI: a traceback from
    Faust's publish path, then the dedup stage stuck at 5257 of 6000 for minutes, also
    across restarts; and the state machine one record short of a transactional topic's
    end). The stock checks therefore judge only what the stages claim to have done.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last, moved = -1, loop.time()
    while loop.time() < deadline and worker.alive and loop.time() - moved < 30:
        done, total = await drained(settings)
        if total and done >= total:
            return True
        if done != last:
            last, moved = done, loop.time()
        await asyncio.sleep(0.5)
    return False


async def _hop_broken(settings: Settings, source: str, output: str) -> tuple[int, int]:
    """(duplicated ids, missing ids) of one exactly-once hop, over the input it committed.

    Every event of this input is valid and sent once, so each record of ``source`` below
    its partition's committed offset must have made exactly one record on ``output`` (the
    route hop: orders.raw to the rekeyed input; the dedup hop: that to orders.unique):
    a hop commits its outputs with its input offsets, whatever the stages after it did.
    """
    committed = await committed_offsets(settings.bootstrap_servers, settings.app_id, source)
    expected: set[str] = set()
    async for m in read_topic(settings.bootstrap_servers, source):
        if m.offset < (committed.get(m.partition) or 0):
            expected.add(orjson.loads(m.value)["event_id"])
    seen: Counter[str] = Counter()
    async for m in read_topic(settings.bootstrap_servers, output):
        seen[orjson.loads(m.value)["event_id"]] += 1
    duplicated = sum(1 for n in seen.values() if n > 1)
    return duplicated, len(expected - set(seen))


async def _dedup_hop_broken(settings: Settings) -> tuple[int, int]:
    return await _hop_broken(settings, settings.by_order_topic, settings.topic_unique)


async def _route_hop_broken(settings: Settings) -> tuple[int, int]:
    return await _hop_broken(settings, settings.topic_raw, settings.by_order_topic)


CASES = [
    # Table writes reach RocksDB (and, through send_soon, a non-transactional changelog)
    # before the transaction commits. Crash before the commit: the ids stay "seen",
    # the replayed events are dropped as duplicates, their outputs never exist.
    pytest.param("local-state", Step.COMMIT, id="local-state"),
]


@pytest.mark.parametrize(("fix", "step"), CASES)
async def test_gap_breaks_exactly_once_without_fix(
    fix: str, step: Step, settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    assert await feed(settings, 6000, seed=5, dup_rate=0.0, bad_rate=0.0) == 6000
    worker = make_worker(PIPELINE_COMMIT_INTERVAL_S="0.5", **_stock(fix))
    # The crash comes before the commit of a transaction of the dedup stage that holds
    # at least MIN_EVENTS events: their ids are already marked seen in RocksDB.
    worker.start(PIPELINE_CRASH_AT=step.value, **_fault(settings, settings.by_order_topic))
    code = await asyncio.to_thread(worker.wait_exit, 120)
    assert code == EXIT_INJECTED, worker.log_tail()
    worker.start()
    await _until_drained_or_stuck(settings, worker, timeout=180)
    worker.kill9()
    _, missing = await _dedup_hop_broken(settings)
    assert missing > 0, f"{fix} off: no break found (no losses after a crash at {step})"


async def _refused_or_done(
    settings: Settings, worker: Worker, refused: str, flow: asyncio.Future[None] | None = None
) -> bool:
    """Wait until a send was refused (True), or the dedup stage committed all its input
    (once ``flow``, input still arriving, has ended)."""
    for _ in range(240):
        if refused in worker.log_path.read_text(errors="replace"):
            return True
        done, total = await progress(settings)
        flowing = flow is not None and not flow.done()
        if (total and done >= total and not flowing) or not worker.alive:
            break
        await asyncio.sleep(0.5)
    return refused in worker.log_path.read_text(errors="replace")


#: Every commit of the dedup stage pauses 0.2 s between its commit and the next begin,
#: as a long pause of the event loop (a GC, a slow disk) would.
SLOW_BEGIN = {"PIPELINE_DELAY_AT": Step.BEGIN.value, "PIPELINE_DELAY_S": "0.2"}
REFUSED = "Can't send messages while not in transaction"


#: Input that keeps arriving while the worker commits: 8,000 events at 400 a second.
FLOW = 8000
FLOW_RATE = 400.0


async def _flow(settings: Settings) -> None:
    records = generate(FLOW, seed=9, dup_rate=0.1, bad_rate=0.0)
    assert await produce(settings.bootstrap_servers, settings.topic_raw, records, rate=FLOW_RATE)


async def test_gap_commit_overlaps_processing_without_quiesce(
    settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    """Stock Faust commits from a background task while agents run.

    An event's records can then be sent into a transaction whose offsets do not include
    it. aiokafka refuses sends between ``commit_transaction`` and the next
    ``begin_transaction``, so with aiokafka the overlap shows up as refused sends that
    crash the agent mid-event (and with any other client as duplicates after a crash).
    Every commit here stays out of a transaction for 0.2 s while input keeps arriving
    (a backlog alone can be worked off before the first commit, in batches): without
    the gate, a send lands in that window.
    """
    worker = make_worker(PIPELINE_COMMIT_INTERVAL_S="0.05", **_stock("quiesce"))
    worker.start(**_fault(settings, PIPELINE_FAULT_MIN_EVENTS="1", **SLOW_BEGIN))
    flow = asyncio.ensure_future(_flow(settings))
    try:
        refused = await _refused_or_done(settings, worker, REFUSED, flow)
    finally:
        flow.cancel()
    worker.kill9()
    assert refused, "quiesce off: no break found (no send overlapped a commit)"


async def test_no_send_refused_with_quiesce(
    settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    """The scenario above with the gate: sends made during a commit wait for the next
    transaction, none is refused, and the outputs are exact."""
    worker = make_worker(PIPELINE_COMMIT_INTERVAL_S="0.05")
    worker.start(**_fault(settings, PIPELINE_FAULT_MIN_EVENTS="1", **SLOW_BEGIN))
    await _flow(settings)
    await wait_drained(settings, [worker], timeout=180)
    worker.stop()
    assert REFUSED not in worker.log_path.read_text(errors="replace")
    report = await reconcile(settings)
    assert report.ok, report.render()


def _keyless(records: Iterable[Record]) -> Iterator[Record]:
    """Producers that do not key their records: the partitioner spreads them."""
    for rec in records:
        yield Record(None, rec.value, rec.kind) if rec.kind != "bad:key-mismatch" else rec


@pytest.mark.parametrize("fixed", [True, False], ids=["fixed", "stock"])
async def test_route_by_source(
    fixed: bool, settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    """Unkeyed input: the route stage's outputs (rekeyed by order_id) land on other
    partitions than their events.

    Stock routing puts each output in the transaction of its *destination* partition.
    One transaction of the route stage is aborted (injected, as a broker timeout would)
    once the other partitions' commits of its round have ended. It held outputs of
    other partitions' events, whose offsets those commits just committed (lost), and
    the outputs of its own at least MIN_EVENTS events went out in the others' committed
    transactions (duplicated when its events are processed again). The route hop is
    judged by itself: the dedup stage after it would hide its duplicates.
    """
    count = 6000
    assert (
        await produce(
            settings.bootstrap_servers,
            settings.topic_raw,
            _keyless(generate(count, seed=21, dup_rate=0.0, bad_rate=0.0)),
        )
        == count
    )
    extra = {} if fixed else _stock("route-by-source")
    worker = make_worker(PIPELINE_COMMIT_INTERVAL_S="0.5", **extra)
    worker.start(PIPELINE_FAIL_AT=Step.COMMIT.value, **_fault(settings))
    code = await asyncio.to_thread(worker.wait_exit, 120)
    assert code == EXIT_COMMIT_FAILED, worker.log_tail()
    worker.start()
    # Unkeyed records of one order land on several partitions, so no per-order order
    # exists to check; every output must still exist exactly once.
    if fixed:
        await wait_drained(settings, [worker], timeout=180)
        worker.stop()
        assert await _route_hop_broken(settings) == (0, 0)
        report = await reconcile(settings)
        unique = report.checks[0]
        assert unique.duplicates + unique.missing + unique.unexpected == 0, report.render()
    else:
        await _until_drained_or_stuck(settings, worker, timeout=180)
        worker.kill9()
        duplicated, missing = await _route_hop_broken(settings)
        assert duplicated + missing > 0, "route-by-source off: no break found"


@pytest.mark.parametrize("fixed", [True, False], ids=["fixed", "stock"])
async def test_failed_commit(
    fixed: bool, settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    """A commit the broker aborts (here: injected) must stop the worker.

    Stock Faust logs it and goes on; the next commit then moves the offsets past the
    events whose outputs were just aborted, and they are lost.
    """
    assert await feed(settings, 6000, seed=31, dup_rate=0.1, bad_rate=0.0) == 6000
    extra = {} if fixed else _stock("fatal-commit")
    worker = make_worker(PIPELINE_COMMIT_INTERVAL_S="0.5", **extra)
    worker.start(PIPELINE_FAIL_AT=Step.COMMIT.value, **_fault(settings, settings.by_order_topic))
    if fixed:
        code = await asyncio.to_thread(worker.wait_exit, 120)
        assert code == EXIT_COMMIT_FAILED, worker.log_tail()
        worker.start()
        await wait_drained(settings, [worker], timeout=180)
        worker.stop()
        report = await reconcile(settings)
        assert report.ok, report.render()
    else:
        await _until_drained_or_stuck(settings, worker, timeout=180)
        worker.kill9()
        assert "fault injection: failing commit step" in worker.log_path.read_text()
        _, missing = await _dedup_hop_broken(settings)
        assert missing > 0, "fatal-commit off: no break found (no losses after an abort)"


def _persisted_offsets(datadir: Path, partitions: int) -> dict[int, int | None]:
    out: dict[int, int | None] = {}
    for p in range(partitions):
        path = datadir / "v1" / "tables" / f"dedup-{p}.db"
        if not path.exists():
            out[p] = None
            continue
        db = Rdict(str(path), access_type=AccessType.read_only())
        try:
            raw = db.get(b"__faust\x00offset__")
        finally:
            db.close()
        out[p] = None if raw is None else int(raw)
    return out


async def _lagging_offsets(
    settings: Settings, datadir: Path, timeout: float
) -> dict[int, tuple[int | None, int]]:
    """Changelog partitions whose persisted offset (RocksDB) is not the changelog's last.

    Asked again until none lags or ``timeout`` passes, while the worker runs: a commit
    becomes visible to the group before the worker has written its offset (step 6)."""
    last: dict[int, int] = {}
    async for m in read_topic(settings.bootstrap_servers, f"{settings.app_id}-dedup-changelog"):
        last[m.partition] = max(last.get(m.partition, -1), m.offset)
    assert last, "the changelog is empty"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        persisted = _persisted_offsets(datadir, settings.partitions)
        lagging = {p: (persisted.get(p), off) for p, off in last.items() if persisted.get(p) != off}
        if not lagging or loop.time() > deadline:
            return lagging
        await asyncio.sleep(0.5)


@pytest.mark.parametrize("fixed", [True, False], ids=["fixed", "stock"])
async def test_changelog_offsets_persisted(
    fixed: bool, settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    """RocksDB remembers the changelog offset it is current to, per changelog partition.

    Stock Faust looks the pending offsets up by source partition (faust#599), so they
    are never written during processing and every restart restores from further back.
    """
    count = 4000
    assert await feed(settings, count, seed=41, dup_rate=0.2, bad_rate=0.0) == count
    extra = {} if fixed else _stock("changelog-offsets")
    worker = make_worker(**extra)
    worker.start()
    await wait_drained(settings, [worker], timeout=180)
    datadir = Path(worker.env["PIPELINE_DATADIR"])
    lagging = await _lagging_offsets(settings, datadir, timeout=20)
    worker.kill9()  # no orderly shutdown that could write anything more
    if fixed:
        assert not lagging, f"persisted offsets lag the changelog: {lagging}"
    else:
        assert lagging, "changelog-offsets off: no break found (persisted offsets are current)"


@pytest.mark.parametrize("fixed", [True, False], ids=["fixed", "stock"])
async def test_route_by_source_on_the_repartition_hop(
    fixed: bool, settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    """Keyed input, as producers should send it: the dedup and state-machine hops stay
    on one partition number, but the balance deltas are keyed by user_id and go to other
    partitions. One transaction of the state machine's input, holding at least
    MIN_EVENTS events, is aborted (injected, as a broker timeout would) once the other
    commits of its round have ended. Stock routing had put this partition's deltas in
    other, committed transactions (counted again when its events are processed again)
    and deltas of other partitions' events in it (lost), so balances go wrong; and the
    outputs to topics the worker does not read (changes, coupons) went out in no
    transaction at all, so processing the events again duplicates them. With the fix
    every output and table is exact.
    """
    count = 6000
    assert await feed(settings, count, seed=5, dup_rate=0.2, bad_rate=0.0) == count
    extra = {} if fixed else _stock("route-by-source")
    worker = make_worker(PIPELINE_COMMIT_INTERVAL_S="0.5", **extra)
    worker.start(PIPELINE_FAIL_AT=Step.COMMIT.value, **_fault(settings, settings.topic_unique))
    code = await asyncio.to_thread(worker.wait_exit, 120)
    assert code == EXIT_COMMIT_FAILED, worker.log_tail()
    worker.start()
    if fixed:
        await wait_drained(settings, [worker], timeout=180)
        worker.stop()
        report = await reconcile(settings)
        assert report.ok, report.render()
        return
    complete = await _until_drained_or_stuck(settings, worker, timeout=180)
    worker.kill9()
    report = await reconcile(settings)
    # A stage that wedged leaves input unprocessed: then only duplicates prove a break.
    wrong = sum(c.duplicates + (c.missing + c.mismatched if complete else 0) for c in report.checks)
    assert wrong > 0, "route-by-source off: no break found on the repartition hop\n" + (
        report.render()
    )
