"""``reconcile --db`` on the real broker, PostgreSQL and SQLite.

An application writes orders through the outbox, the relay publishes them to
``orders.raw``, the in-process reference run writes what a correct pipeline outputs, and
the sink writes them into the database. ``reconcile --db`` must pass; output the sink
has not consumed yet and an outbox row not yet published must show as lag, not as a
difference; then a missing row, an extra row, a stale version and an outbox row marked
published without its record must each be named by key, with exit status 1.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy import delete, insert, select, update

from pipeline.edges import db, outbox
from pipeline.edges.outbox import Relay
from pipeline.edges.sink import run_sink
from pipeline.settings import Settings
from pipeline.tools.procs import ROOT
from pipeline.tools.reference import write_reference
from pipeline.tools.shop import apply_step, lifecycles, write_orders

from .test_outbox_sink import pg_server, pg_url  # noqa: F401

pytestmark = pytest.mark.integration

ORDERS = 40


def database(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if backend == "postgres":
        return str(request.getfixturevalue("pg_url"))
    return str(tmp_path / "edge.db")


def cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    """``python -m pipeline reconcile ...`` as an operator runs it: (status, its output)."""
    penv = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    penv.update(env)
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "reconcile", *args],
        cwd=ROOT,
        env=penv,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if "--json" in args:
        return out.returncode, out.stdout
    return out.returncode, out.stdout + out.stderr


async def build(settings: Settings, url: str) -> int:
    """The whole chain, to its end: outbox -> orders.raw -> outputs -> sink tables."""
    engine = db.engine_for(url)
    try:
        db.create_schema(engine)
        await asyncio.to_thread(write_orders, engine, ORDERS, settings.topic_raw)
    finally:
        engine.dispose()
    stats = await Relay(settings, url).run(asyncio.Event(), idle_exit_s=2.0)
    assert stats.published > ORDERS
    assert await write_reference(settings) > 0
    sunk = await run_sink(settings, url, idle_exit_s=3.0)
    assert sunk.records > ORDERS and sunk.refusals == 0
    return stats.published


def rows(url: str) -> dict[str, tuple[str, int]]:
    engine = db.engine_for(url)
    try:
        with engine.connect() as conn:
            o = db.sink_orders.c
            return {
                r.order_id: (r.status, r.version)
                for r in conn.execute(select(o.order_id, o.status, o.version))
            }
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
async def test_reconcile_db_passes_counts_lag_and_names_each_planted_difference(
    backend: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    settings: Settings,
    env: dict[str, str],
) -> None:
    url = database(backend, request, tmp_path)
    published = await build(settings, url)

    status, out = await asyncio.to_thread(cli, env, "--db", url)
    assert status == 0, out
    assert "verdict: PASS (0 duplicates, 0 losses)" in out, out  # the Kafka checks ran
    assert "verdict (database): PASS (0 differences)" in out, out
    assert "verdict: PASS (Kafka PASS, database PASS)" in out, out
    assert f"outbox                   expected {published:>8}  actual {published:>8}" in out
    assert f"orders                   expected {ORDERS:>8}  actual {ORDERS:>8}" in out, out
    assert "sink up to date" in out and "outbox nothing pending" in out, out

    # Lag: a change the sink has not consumed and an outbox row not yet published.
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    await producer.start()
    try:
        late = {
            "event_id": "late-e0",
            "order_id": "late",
            "from": "NEW",
            "to": "CREATED",
            "version": 1,
            "ts_ms": 1,
        }
        await producer.send_and_wait(settings.topic_changes, orjson.dumps(late), key=b"late")
    finally:
        await producer.stop()
    engine = db.engine_for(url)
    try:
        step = next(lifecycles(1, prefix="pending-"))
        await asyncio.to_thread(apply_step, engine, step, settings.topic_raw)
    finally:
        engine.dispose()
    status, out = await asyncio.to_thread(cli, env, "--db", url, "--db-only")
    assert status == 0, out
    assert "verdict (database): PASS (0 differences)" in out, out
    assert f"sink 1 records behind on {settings.topic_changes}" in out, out
    assert "outbox 1 rows not yet published" in out, out
    assert "reconcile: " not in out, "--db-only runs no Kafka check"

    # Now plant one difference of each kind.
    have = rows(url)
    gone = sorted(k for k in have)[0]
    stale = sorted(k for k, (_, v) in have.items() if v >= 2 and k != gone)[0]
    engine = db.engine_for(url)
    try:
        with engine.begin() as conn:
            o = db.sink_orders
            conn.execute(delete(o).where(o.c.order_id == gone))
            conn.execute(
                insert(o).values(
                    order_id="stray", status="PAID", version=2, updated_ms=1, event_id="stray-e1"
                )
            )
            conn.execute(update(o).where(o.c.order_id == stale).values(version=o.c.version - 1))
            ghost = {
                "event_id": "ghost-e0",
                "type": "OrderCreated",
                "order_id": "ghost",
                "user_id": "u1",
                "amount_cents": 5,
                "ts_ms": 1,
            }
            outbox.add(
                conn,
                event_id="ghost-e0",
                topic=settings.topic_raw,
                key=b"ghost",
                value=orjson.dumps(ghost),
            )
            t = db.outbox
            conn.execute(
                update(t).where(t.c.event_id == "ghost-e0").values(published_ms=db.now_ms())
            )
    finally:
        engine.dispose()

    status, out = await asyncio.to_thread(cli, env, "--db", url, "--db-only")
    assert status == 1, out
    assert f"e.g. orders {gone}: missing: no row" in out, out
    assert "e.g. orders stray: extra: row at v2 PAID" in out, out
    assert f"e.g. orders {stale}: stale: row at v{have[stale][1] - 1}" in out, out
    assert "e.g. outbox ghost-e0: absent: marked published, not on orders.raw" in out, out
    assert "missing 1  extra 1  stale 1  ahead 0  mismatched 0" in out, out
    assert "absent 1  altered 0  unpublishable 0" in out, out
    assert "verdict (database): FAIL (4 differences)" in out, out
    # The lag is still reported apart, not as a difference.
    assert f"sink 1 records behind on {settings.topic_changes}" in out, out

    status, out = await asyncio.to_thread(cli, env, "--db", url, "--db-only", "--json")
    assert status == 1, out
    doc = orjson.loads(out)
    assert doc["verdict"] == "FAIL" and doc["db"]["differences"] == 4, out
    shown = {(d["key"], d["kind"]) for t in doc["db"]["tables"] for d in t["shown"]}
    assert shown == {
        (gone, "missing"),
        ("stray", "extra"),
        (stale, "stale"),
        ("ghost-e0", "absent"),
    }


def test_a_database_it_cannot_compare_is_one_line_and_no_verdict(
    env: dict[str, str], tmp_path: Path
) -> None:
    # A typo in a SQLite path makes a new, empty file: that must not pass as "nothing
    # to compare"; nor may an unreachable server end in a traceback.
    for url, says in (
        (str(tmp_path / "typo.db"), "has neither the sink's tables"),
        ("postgresql://nobody:secret@127.0.0.1:1/none", "cannot read the database"),
    ):
        code, out = cli(env, "--db-only", "--db", url)
        assert code == 2, out
        assert says in out and "Traceback" not in out, out
        assert "secret" not in out
