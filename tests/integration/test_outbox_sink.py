"""Both ends of the chain against real PostgreSQL (and SQLite) and the real broker.

An application writes orders through the outbox (business row + event in one
transaction); two relays publish it to ``orders.raw`` and are ``kill -9``ed over and
over; a worker runs the exactly-once chain; the sink, also ``kill -9``ed over and over,
writes ``orders.changes`` and ``coupons.issued`` into the database. PostgreSQL is
restarted once in the middle. At the end the sink's tables must equal a recomputation
from ``orders.raw`` (dedup by event_id, the state machine replayed), and the
application's own table; rows a crashed relay published twice must show up as dropped
duplicates in the worker's counters.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import create_engine, func, make_url, select, text

from pipeline.domain.models import OrderEvent, parse_event
from pipeline.domain.orders import Change, Coupon, Order, Rejected, transition
from pipeline.edges import db, outbox
from pipeline.kafka_io import committed_offsets, read_topic, record_ends
from pipeline.settings import Settings
from pipeline.tools.procs import ROOT
from pipeline.tools.reconcile import reconcile
from pipeline.tools.shop import lifecycles

from .harness import Worker, wait_drained

pytestmark = pytest.mark.integration

#: A chaos run fails when no outbox row was written or published for this long.
NO_PROGRESS_S = 60.0


@pytest.fixture
def pg_server() -> str:
    url = os.environ.get("PIPELINE_TEST_PG_URL")
    if not url:
        # Never skip the database half quietly (CI sets it through scripts/test).
        pytest.fail(
            "PIPELINE_TEST_PG_URL is not set: export PIPELINE_TEST_PG_URL=$(scripts/postgres start)"
        )
    return url


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A database of this test's own on the test server, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(db.normalize_url(pg_server), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(db.normalize_url(pg_server)).set(database=name)
    yield url.render_as_string(hide_password=False)
    for _ in range(20):
        try:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            break
        except Exception:
            time.sleep(0.5)
    admin.dispose()


@dataclass
class Proc:
    """A ``python -m pipeline ...`` process with its own log."""

    args: list[str]
    env: dict[str, str]
    log_path: Path
    name: str
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    kills: int = 0
    extra: list[str] = field(default_factory=list)

    def start(self, *extra: str) -> None:
        assert not self.alive
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
        env.update(self.env)
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start #{self.starts} {list(extra)} ===\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline", *self.args, *extra],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.kills += 1

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def log(self) -> str:
        if not self.log_path.exists():
            return ""  # never started
        return self.log_path.read_text(errors="replace")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-n:])


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    made: list[Proc] = []

    def make(name: str, args: list[str], env: dict[str, str]) -> Proc:
        p = Proc(args, env, tmp_path / f"{name}.log", name)
        made.append(p)
        return p

    yield make
    for p in made:
        p.kill9()


@dataclass
class Expected:
    orders: dict[str, tuple[str, int, int, str]]
    coupons: dict[str, tuple[str, str, int]]
    raw_records: int
    #: copies of an event_id already in orders.raw: what a relay published twice
    republished: int
    #: orders whose first copies came out of commit order
    misordered: list[str]


async def recompute(settings: Settings) -> Expected:
    """The sink's tables as they must be, from orders.raw alone (read_committed)."""
    seen: set[str] = set()
    state: dict[str, Order] = {}
    orders: dict[str, tuple[str, int, int, str]] = {}
    coupons: dict[str, tuple[str, str, int]] = {}
    seqs: dict[str, list[int]] = defaultdict(list)
    n = repeats = 0
    async for m in read_topic(settings.bootstrap_servers, settings.topic_raw):
        n += 1
        ev = parse_event(m.value, m.key)
        assert isinstance(ev, OrderEvent), ev
        if ev.event_id in seen:
            repeats += 1
            continue
        seen.add(ev.event_id)
        seqs[ev.order_id].append(int(ev.event_id.rsplit("-e", 1)[1]))
        after, outputs = transition(state.get(ev.order_id), ev)
        if outputs and isinstance(outputs[0], Rejected):
            continue
        state[ev.order_id] = after
        for out in outputs:
            if isinstance(out, Change):
                orders[out.order_id] = (out.to_status.value, out.version, out.ts_ms, out.event_id)
            elif isinstance(out, Coupon):
                coupons[out.coupon_id] = (out.order_id, out.user_id, out.amount_cents)
    misordered = [o for o, s in seqs.items() if s != sorted(s)]
    return Expected(orders, coupons, n, repeats, misordered)


def sink_tables(
    url: str,
) -> tuple[dict[str, tuple[str, int, int, str]], dict[str, tuple[str, str, int]], int]:
    e = db.engine_for(url)
    try:
        with e.connect() as conn:
            orders = {
                r.order_id: (r.status, r.version, r.updated_ms, r.event_id)
                for r in conn.execute(select(db.sink_orders))
            }
            coupons = {
                r.coupon_id: (r.order_id, r.user_id, r.amount_cents)
                for r in conn.execute(select(db.sink_coupons))
            }
            refusals = conn.execute(select(func.count()).select_from(db.sink_refusals)).scalar_one()
        return orders, coupons, int(refusals)
    finally:
        e.dispose()


def scalar(url: str, sql: str) -> Any:
    e = db.engine_for(url)
    try:
        with e.connect() as conn:
            return conn.execute(text(sql)).scalar_one()
    finally:
        e.dispose()


def outbox_counts(url: str) -> tuple[int, int, int]:
    """Outbox rows written, published, and pending (neither published nor failed)."""
    e = db.engine_for(url)
    try:
        with e.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT count(*), count(published_ms), coalesce(sum(CASE WHEN"
                    " published_ms IS NULL AND error IS NULL THEN 1 ELSE 0 END), 0) FROM outbox"
                )
            ).one()
        return int(row[0]), int(row[1]), int(row[2])
    finally:
        e.dispose()


def pending_rows(url: str) -> int:
    return int(
        scalar(url, "SELECT count(*) FROM outbox WHERE published_ms IS NULL AND error IS NULL")
    )


def bucket_holders(url: str) -> dict[int, int]:
    """Per backend pid, how many outbox buckets its session holds (advisory locks)."""
    e = db.engine_for(url)
    try:
        with e.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT pid, count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                    " AND classid::bigint = :ns AND objsubid = 2 AND database ="
                    " (SELECT oid FROM pg_database WHERE datname = current_database())"
                    " GROUP BY pid"
                ),
                {"ns": outbox.LOCK_BUCKET},
            ).all()
        return {int(r[0]): int(r[1]) for r in rows}
    finally:
        e.dispose()


async def wait_bucket_holders(
    url: str, done: Callable[[dict[int, int]], bool], what: str, *relays: Proc
) -> dict[int, int]:
    """Until the buckets' holders satisfy ``done``; fails after 60 s with a diagnosis."""
    deadline = time.monotonic() + 60
    while True:
        holders = await asyncio.to_thread(bucket_holders, url)
        if done(holders):
            return holders
        for r in relays:
            assert r.alive, f"{r.name} died waiting for {what}:\n{r.tail()}"
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no {what} in 60 s; buckets held per backend pid: {holders}\n"
                + "\n".join(f"--- {r.name}:\n{r.tail()}" for r in relays)
            )
        await asyncio.sleep(0.1)


async def wait_sink_caught_up(settings: Settings, url: str, sink: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    want: dict[tuple[str, int], int] = {}
    for topic in (settings.topic_changes, settings.topic_coupons):
        for p, end in (await record_ends(settings.bootstrap_servers, topic)).items():
            if end:
                want[(topic, p)] = end
    while True:
        e = db.engine_for(url)
        try:
            with e.connect() as conn:
                have = {
                    (r.topic, r.partition): r.next_offset
                    for r in conn.execute(select(db.sink_offsets))
                }
        except Exception:
            have = {}
        finally:
            e.dispose()
        if all(have.get(tp, 0) >= end for tp, end in want.items()):
            return
        assert sink.alive, sink.tail()
        if time.monotonic() > deadline:
            raise AssertionError(f"sink not caught up: {have} < {want}\n{sink.tail()}")
        await asyncio.sleep(0.5)


async def full_path(
    *,
    url: str,
    env: dict[str, str],
    settings: Settings,
    make_worker: Callable[..., Worker],
    procs: Callable[..., Proc],
    orders: int,
    restart_postgres: bool,
    writer_rate: float | None = None,
) -> None:
    rng = random.Random(5)
    half = orders // 2
    halves = (("a", half), ("b", orders - half))
    total = sum(
        sum(1 for _ in lifecycles(n, seed=i + 1, prefix=p)) for i, (p, n) in enumerate(halves)
    )
    schema = db.engine_for(url)
    db.create_schema(schema)
    schema.dispose()
    worker = make_worker("w")
    worker.start()
    # Two application processes write concurrently, as a real service with two instances.
    rate = ["--rate", str(writer_rate)] if writer_rate else []
    writers = [
        procs(
            f"writer{i}",
            [
                "produce",
                "--via-outbox",
                "--db",
                url,
                "--count",
                str(n),
                "--prefix",
                p,
                "--seed",
                str(i + 1),
                *rate,
            ],
            env,
        )
        for i, (p, n) in enumerate(halves)
    ]
    for w in writers:
        w.start()
    # A short pause between publish and mark widens the window a kill -9 can land in.
    relays = [
        procs(f"relay{i}", ["outbox-relay", "--db", url, "--mark-delay", "0.05"], env)
        for i in range(2)
    ]
    # The first incarnation of relay0 dies right after publishing its third batch: at least
    # that batch is published twice, whatever the random kills below hit.
    relays[0].start("--crash-after-publish", "3")
    # relay1 starts once relay0 owns buckets (on SQLite: holds the lease), so relay0
    # certainly publishes its three batches while the writers still write.
    deadline = time.monotonic() + 60
    while "owns" not in relays[0].log():
        assert relays[0].alive and time.monotonic() < deadline, relays[0].tail()
        await asyncio.sleep(0.1)
    relays[1].start()
    sink = procs("sink", ["sink", "--db", url, "--batch", "500"], env)
    sink.start()

    # The chaos comes at points of progress (fractions of the outbox rows published), not
    # of wall time, so that every run gets all of it, in the middle of the work, however
    # fast the machine writes and relays; the loop does not end before it all happened.
    chaos_plan = sorted(
        [((i + rng.random()) / 8, "relay") for i in range(1, 7)]
        + [((i + rng.random()) / 6, "sink") for i in range(1, 5)]
        + ([(0.4 + rng.random() / 10, "postgres")] if restart_postgres else [])
    )
    started = time.monotonic()
    pg_restarted = False
    last = (-1, -1)
    last_progress = started
    timeline: list[str] = []
    writers_done: float | None = None
    while True:
        now = time.monotonic()
        writing = any(w.alive for w in writers)
        if not writing and writers_done is None:
            writers_done = now - started
            timeline.append(f"writers done at {writers_done:.1f} s")
        written, published, pending = outbox_counts(url)
        if (written, published) != last:
            last, last_progress = (written, published), now
        if not writing:
            for w in writers:
                assert w.wait(0) == 0, w.tail()
            if pending == 0:
                assert written == published == total, (
                    f"{written} rows written, {published} published, of {total}"
                )
                if not chaos_plan:
                    break
        assert now - last_progress < NO_PROGRESS_S, (
            f"no outbox row written or published for {NO_PROGRESS_S:.0f} s: {published} of"
            f" {total} published, {pending} pending, writers alive:"
            f" {[w.alive for w in writers]}, chaos still due at:"
            f" {[f'{what} {at:.0%}' for at, what in chaos_plan]}\n"
            + "\n".join(f"--- {r.name}:\n{r.tail()}" for r in relays)
        )
        for r in relays:
            if not r.alive:
                r.start()  # the crashed first incarnation, or one killed below
        if not sink.alive:
            sink.start()
        if chaos_plan and published >= chaos_plan[0][0] * total:
            _, what = chaos_plan.pop(0)
            timeline.append(f"{what} at {now - started:.1f} s ({published}/{total})")
            if what == "relay":
                # relay0's first incarnation is spared: its crash after its third batch
                # is what makes a republished batch certain.
                victim = relays[1] if relays[0].starts == 1 else rng.choice(relays)
                victim.kill9()
                await asyncio.sleep(rng.uniform(0.2, 1.0))
                victim.start()
            elif what == "sink":
                sink.kill9()
                await asyncio.sleep(rng.uniform(0.2, 1.0))
                sink.start()
            else:
                # Everything (writers, relays, sink, LISTEN) rides out a database restart.
                await asyncio.to_thread(
                    subprocess.run,
                    ["bash", str(ROOT / "scripts/postgres"), "restart"],
                    check=True,
                    capture_output=True,
                    timeout=120,
                )
                pg_restarted = True
                timeline.append(f"postgres up at {time.monotonic() - started:.1f} s")
            last_progress = time.monotonic()
        await asyncio.sleep(0.2)
    assert pg_restarted or not restart_postgres
    timeline.append(f"outbox drained at {time.monotonic() - started:.1f} s")
    print("\n" + ", ".join(timeline))
    assert "test crash between publish and mark" in relays[0].log(), relays[0].tail()
    assert sum(r.kills for r in relays) >= 4, "relays were not killed repeatedly"
    assert sink.kills >= 3, "the sink was not killed repeatedly"

    # The sink keeps being killed while the worker drains the rest.
    calm = asyncio.Event()

    async def sink_chaos() -> None:
        while not calm.is_set():
            await asyncio.sleep(rng.uniform(3.0, 6.0))
            if calm.is_set():
                return
            sink.kill9()
            await asyncio.sleep(rng.uniform(0.2, 1.0))
            sink.start()

    chaos = asyncio.create_task(sink_chaos())
    try:
        await wait_drained(settings, [worker], timeout=240)
    finally:
        calm.set()
        await chaos
    await wait_sink_caught_up(settings, url, sink, timeout=120)

    want = await recompute(settings)
    got_orders, got_coupons, refusals = sink_tables(url)
    assert refusals == 0, f"the sink refused {refusals} records (see sink_refusals)"
    assert len(want.orders) == orders
    missing = want.orders.keys() - got_orders.keys()
    extra = got_orders.keys() - want.orders.keys()
    wrong = {
        k: (got_orders[k], want.orders[k])
        for k in want.orders.keys() & got_orders.keys()
        if got_orders[k] != want.orders[k]
    }
    assert not missing and not extra and not wrong, (
        f"{len(missing)} missing, {len(extra)} extra, {len(wrong)} wrong, e.g. "
        f"{sorted(missing)[:3]} {sorted(extra)[:3]} {list(wrong.items())[:3]}"
    )
    assert got_orders == want.orders
    assert got_coupons == want.coupons
    assert len(want.coupons) > orders // 2
    assert not want.misordered, f"per-key order broken: {want.misordered[:5]}"

    # The application's own table: the same status and version for every order.
    e = db.engine_for(url)
    with e.connect() as conn:
        shop = {r.order_id: (r.status, r.version) for r in conn.execute(select(db.shop_orders))}
        published = conn.execute(
            select(func.count()).select_from(db.outbox).where(db.outbox.c.published_ms.isnot(None))
        ).scalar_one()
    e.dispose()
    assert shop == {k: (v[0], v[1]) for k, v in got_orders.items()}
    # Every outbox row is in orders.raw; what is there on top are republished copies.
    assert want.raw_records == published + want.republished

    # The relays' republished rows were dropped by the dedup stage.
    assert want.republished > 0, "no row was published twice: the crash window was never hit"
    st = worker.stats()
    assert st is not None
    assert int(st["duplicates_dropped"]) >= want.republished, (st, want.republished)  # type: ignore[call-overload]
    assert int(st["rejected"]) == 0 and int(st["dlq"]) == 0, st  # type: ignore[call-overload]

    report = await reconcile(settings)
    assert report.ok, report.render()

    # The sink never resumed from the consumer group: it has none.
    assert not any(
        (
            await committed_offsets(
                settings.bootstrap_servers, "pipeline-sink", settings.topic_changes
            )
        ).values()
    )
    print(
        f"\n{orders} orders, {want.raw_records} raw records, {want.republished} republished, "
        f"relay kills {sum(r.kills for r in relays)}, sink kills {sink.kills}, "
        f"{time.monotonic() - started:.0f} s"
    )


@pytest.mark.slow
async def test_full_path_postgres_kill9_relays_and_sink_and_restart_postgres(
    pg_url: str,
    env: dict[str, str],
    settings: Settings,
    make_worker: Callable[..., Worker],
    procs: Callable[..., Proc],
) -> None:
    await full_path(
        url=pg_url,
        env=env,
        settings=settings,
        make_worker=make_worker,
        procs=procs,
        orders=10_000,
        restart_postgres=True,
        # Events per second per writer: writing lasts at least ~20 s on any machine, so
        # the chaos, due at points of progress, lands while rows are being written.
        writer_rate=600,
    )


@pytest.mark.slow
async def test_full_path_sqlite_shortened(
    tmp_path: Path,
    env: dict[str, str],
    settings: Settings,
    make_worker: Callable[..., Worker],
    procs: Callable[..., Proc],
) -> None:
    await full_path(
        url=str(tmp_path / "shop.db"),
        env=env,
        settings=settings,
        make_worker=make_worker,
        procs=procs,
        orders=1_500,
        restart_postgres=False,
        # Events per second per writer: writing lasts ~20 s, so the chaos, due at points
        # of progress, lands while rows are being written.
        writer_rate=90,
    )


async def test_two_relays_share_buckets_in_key_order_and_skip_a_bad_row(
    pg_url: str, env: dict[str, str], settings: Settings, procs: Callable[..., Proc]
) -> None:
    """No kills: two relays, the second joining mid-way (buckets handed over), publish
    every row exactly once, each key in commit order; a bad row is reported by id and
    event_id, not published, and the rows of its key behind it still are."""
    e = db.engine_for(pg_url)
    db.create_schema(e)
    keys = [f"k{i}" for i in range(200)]

    def write(batch: int) -> None:
        with e.begin() as conn:
            for k in keys:
                doc = {
                    "event_id": f"{k}-e{batch}",
                    "type": "OrderShipped",
                    "order_id": k,
                    "ts_ms": batch,
                }
                value = orjson.dumps(doc)
                if k == "k7" and batch == 1:
                    value = b'{"event_id": "k7-e1", "type": "Teleported"'  # broken JSON
                outbox.add(
                    conn,
                    event_id=f"{k}-e{batch}",
                    topic=settings.topic_raw,
                    key=k.encode(),
                    value=value,
                )

    r1 = procs("r1", ["outbox-relay", "--db", pg_url, "--batch", "100"], env)
    r2 = procs("r2", ["outbox-relay", "--db", pg_url, "--batch", "100"], env)
    r1.start()
    for batch in range(4):
        await asyncio.to_thread(write, batch)
    # r1 holds every bucket before r2 joins, so that r2's share is handed over by r1...
    holders = await wait_bucket_holders(
        pg_url, lambda h: list(h.values()) == [outbox.BUCKETS], "r1 to own every bucket", r1
    )
    (r1_pid,) = holders
    r2.start()

    def handed_over(h: dict[int, int]) -> bool:
        # r1 is down to its share of two, r2 (the other session) holds some, and r2 says
        # so itself (it logs what it owns once it has taken it).
        r2_owns = sum(n for pid, n in h.items() if pid != r1_pid)
        r2_says = re.search(rf"owns [1-9]\d* of {outbox.BUCKETS} buckets", r2.log())
        return h.get(r1_pid, 0) <= outbox.BUCKETS // 2 and r2_owns > 0 and r2_says is not None

    # ...and the remaining batches are written only once it has been: they land in both
    # relays' buckets (200 keys over 64 buckets), so both publish some of them.
    await wait_bucket_holders(pg_url, handed_over, "r1 to hand buckets to r2", r1, r2)
    for batch in range(4, 10):
        await asyncio.to_thread(write, batch)
    deadline = time.monotonic() + 60
    while pending_rows(pg_url):
        assert time.monotonic() < deadline, r1.tail() + r2.tail()
        await asyncio.sleep(0.3)
    for r in (r1, r2):
        assert r.alive, r.tail()
        r.proc.terminate()  # type: ignore[union-attr]
        assert r.wait(30) == 0, r.tail()
    sent = {
        r.name: sum(
            int(line.split(" sent ")[1].split()[0])
            for line in r.log().splitlines()
            if " sent " in line
        )
        for r in (r1, r2)
    }
    assert sent["r1"] > 0 and sent["r2"] > 0, sent
    assert sent["r1"] + sent["r2"] == len(keys) * 10 - 1

    seqs: dict[str, list[int]] = defaultdict(list)
    async for m in read_topic(settings.bootstrap_servers, settings.topic_raw):
        doc = orjson.loads(m.value or b"")
        seqs[doc["order_id"]].append(int(doc["event_id"].rsplit("-e", 1)[1]))
    counts = Counter(len(v) for v in seqs.values())
    assert counts == Counter({10: len(keys) - 1, 9: 1}), counts
    assert all(s == sorted(s) for s in seqs.values())
    assert seqs["k7"] == [0, 2, 3, 4, 5, 6, 7, 8, 9]
    logs = r1.log() + r2.log()
    assert "event_id=k7-e1" in logs and "not published" in logs
    with e.connect() as conn:
        row = conn.execute(select(db.outbox).where(db.outbox.c.event_id == "k7-e1")).one()
    assert row.published_ms is None and "not a valid" in row.error
    e.dispose()
