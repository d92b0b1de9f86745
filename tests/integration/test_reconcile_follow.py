"""``reconcile --follow`` beside a real worker on the real broker: a round, a stop by
SIGTERM, more input, a round that goes on from the checkpoint and reads only what is
new, the batch ``reconcile``'s verdict, then a planted duplicate caught in the metrics."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from pipeline.kafka_io import read_topic
from pipeline.settings import Settings
from pipeline.tools.procs import ROOT
from pipeline.tools.reconcile import reconcile

from .harness import Worker, feed, wait_drained

pytestmark = pytest.mark.integration

HALF = 1500


def _command(state: Path, metrics: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline",
        "reconcile",
        "--follow",
        "--json",
        "--state",
        str(state),
        "--metrics-file",
        str(metrics),
        *extra,
    ]


def _rounds(out: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in out.splitlines() if line.startswith("{")]


async def _one_round(env: dict[str, str], state: Path, metrics: Path) -> tuple[int, dict[str, Any]]:
    done = await asyncio.to_thread(
        subprocess.run,
        _command(state, metrics, "--rounds", "1"),
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    rounds = _rounds(done.stdout)
    assert len(rounds) == 1, done.stdout + done.stderr
    return done.returncode, rounds[0]


def _gauges(path: Path) -> dict[str, float]:
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _counts(topics: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    return {t["topic"]: (t["expected"], t["actual"]) for t in topics}


async def test_committed_outputs_behind_an_open_transaction_wait_for_it(
    settings: Settings, tmp_path: Path
) -> None:
    """The broker's side of the frontier's step 5, with no worker: a stage transaction
    commits the hop's offsets of two valid input events, and the rekeyed copy of only
    the first, behind another producer's transaction that stays open. A round then
    cannot read the copy (the last stable offset stops at the open transaction) and
    judges neither event; once that transaction is aborted, the copy passes and the
    event without one is reported lost."""
    from pipeline.admin import declare_topics
    from pipeline.domain.route import EID, SRC, Rekey, route_record, source_header
    from pipeline.tools.generate import generate
    from pipeline.tools.reconcile_follow import Follower, State, run_round

    s = settings
    await declare_topics(s)
    kwargs = s.kafka.kwargs()
    records = list(generate(2, seed=5, dup_rate=0.0, bad_rate=0.0, illegal_rate=0.0))
    plain = AIOKafkaProducer(**kwargs)
    await plain.start()
    try:
        sent = [
            await plain.send_and_wait(s.topic_raw, r.value, key=r.key, partition=0) for r in records
        ]
    finally:
        await plain.stop()
    by_order = TopicPartition(s.by_order_topic, 0)
    blocker = AIOKafkaProducer(**kwargs, transactional_id=f"{s.app_id}-blocker")
    stage = AIOKafkaProducer(**kwargs, transactional_id=f"{s.app_id}-stage")
    await blocker.start()
    await stage.start()
    try:
        await blocker.begin_transaction()
        await blocker.send_and_wait(by_order.topic, b"never committed", partition=0)
        await stage.begin_transaction()
        first, meta = records[0], sent[0]
        routed = route_record(first.value, first.key, (s.topic_raw, 0, meta.offset))
        assert isinstance(routed, Rekey)
        headers = [(SRC, source_header(0, meta.offset)), (EID, routed.event_id)]
        await stage.send_and_wait(
            by_order.topic, first.value, key=routed.order_key, partition=0, headers=headers
        )
        # The hop's offsets past both events: the second one's copy is lost.
        await stage.send_offsets_to_transaction(
            {TopicPartition(s.topic_raw, 0): sent[1].offset + 1}, s.app_id
        )
        await stage.commit_transaction()

        follower = Follower(s, State(str(tmp_path / "follow-state")))
        held = await run_round(follower, s)
        assert held.report.ok, held.report.render()
        assert held.read[s.by_order_topic] == 0, held.read
        assert held.lag == 2  # both input records, read and not yet judged
        assert follower.frontier["raw"].get(0, 0) == 0
        await blocker.abort_transaction()
        ended = await run_round(follower, s)
    finally:
        await stage.stop()
        await blocker.stop()
    assert ended.read[s.by_order_topic] == 1, ended.read
    assert follower.frontier["raw"][0] == sent[1].offset + 1
    unique = ended.report.checks[0]
    assert (unique.topic, unique.missing) == (s.topic_unique, 1), ended.report.render()
    assert f"{s.topic_raw}:0:{sent[1].offset}" in unique.examples[0], unique.examples


async def test_follow_resumes_from_its_checkpoint_and_reports_a_planted_duplicate(
    settings: Settings,
    env: dict[str, str],
    make_worker: Callable[..., Worker],
    tmp_path: Path,
) -> None:
    state, metrics = tmp_path / "follow-state", tmp_path / "reconcile.prom"
    await feed(settings, HALF, seed=31, dup_rate=0.3, bad_rate=0.02, illegal_rate=0.05)
    worker = make_worker()
    worker.start()
    await wait_drained(settings, [worker], timeout=240)

    # Round 1 runs as a service does, until SIGTERM; it ends after its round is written.
    proc = await asyncio.create_subprocess_exec(
        *_command(state, metrics, "--interval", "600"),
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        first = (await asyncio.wait_for(proc.stdout.readline(), 300)).decode()
        proc.send_signal(signal.SIGTERM)
        rest, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    out = rest.decode() + err.decode()
    assert proc.returncode == 0, first + out
    # Stopped while waiting: no second round.
    assert not _rounds(out), out
    r1 = orjson.loads(first)
    assert r1["round"] == 1 and r1["complete"], r1
    assert r1["verdict"] == "PASS", r1
    assert r1["input_read"] == HALF
    assert r1["lag_records"] == 0, r1
    assert _gauges(metrics)["pipeline_reconcile_ok"] == 1

    await feed(settings, HALF, seed=32, prefix="p", dup_rate=0.3, bad_rate=0.02)
    await wait_drained(settings, [worker], timeout=240)
    code, r2 = await _one_round(env, state, metrics)
    assert code == 0 and r2["verdict"] == "PASS", r2
    assert r2["round"] == 2
    # From the checkpoint: only the new input, and the new records of every topic.
    assert r2["input_read"] == HALF
    code, fresh = await _one_round(env, tmp_path / "fresh-state", tmp_path / "fresh.prom")
    assert code == 0 and fresh["verdict"] == "PASS", fresh
    assert fresh["input_read"] == 2 * HALF
    assert r1["records_read"] + r2["records_read"] == fresh["records_read"]
    assert _counts(r2["topics"]) == _counts(fresh["topics"])

    # Capped rounds: partial ones judge nothing and follow each other; once caught up,
    # the same counts.
    done = await asyncio.to_thread(
        subprocess.run,
        _command(
            tmp_path / "capped-state",
            tmp_path / "capped.prom",
            *("--round-records", "1000", "--rounds", "20", "--interval", "0"),
        ),
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    capped = _rounds(done.stdout)
    assert len(capped) == 20, done.stdout + done.stderr
    assert not capped[0]["complete"] and capped[-1]["complete"]
    assert all(r["verdict"] == "PASS" for r in capped)
    assert sum(r["records_read"] for r in capped) == fresh["records_read"]
    assert _counts(capped[-1]["topics"]) == _counts(fresh["topics"])

    # The batch reconcile agrees, count for count on the input, the forwards, the dead
    # letters and the outputs.
    batch = await reconcile(settings)
    assert batch.ok, batch.render()
    assert r2["input_records"] == batch.input_records == 2 * HALF
    batch_counts = {c.topic: (c.expected, c.actual) for c in batch.checks}
    for topic in (
        settings.topic_unique,
        settings.topic_dlq,
        settings.topic_changes,
        settings.topic_rejected,
        settings.topic_coupons,
        settings.deltas_topic,
    ):
        assert _counts(r2["topics"])[topic] == batch_counts[topic], topic

    # A change written twice (outside any transaction): round 3 sees it.
    change = None
    async for m in read_topic(settings.kafka, settings.topic_changes):
        change = m
        break
    assert change is not None
    producer = AIOKafkaProducer(**settings.kafka.kwargs())
    await producer.start()
    try:
        await producer.send_and_wait(
            settings.topic_changes, change.value, key=change.key, partition=change.partition
        )
    finally:
        await producer.stop()
    code, r3 = await _one_round(env, state, metrics)
    assert code == 1 and r3["verdict"] == "FAIL", r3
    assert r3["records_read"] == 1 and r3["duplicates"] == 1 and r3["losses"] == 0, r3
    gauges = _gauges(metrics)
    assert gauges["pipeline_reconcile_ok"] == 0
    assert gauges["pipeline_reconcile_duplicates"] == 1
    assert gauges["pipeline_reconcile_lag_records"] == 0
    assert "pipeline_reconcile_last_run_timestamp_seconds" in gauges


async def test_rounds_while_the_worker_processes_live_input_all_pass(
    settings: Settings,
    env: dict[str, str],
    make_worker: Callable[..., Worker],
    tmp_path: Path,
) -> None:
    """Rounds taken in the middle of processing judge only what lies below the frontier:
    whatever moment a round falls on, a correct pipeline passes it, and the rounds end
    up with all the input judged."""
    from pipeline.kafka_io import produce
    from pipeline.tools.generate import generate

    count = 4000
    state, metrics = tmp_path / "follow-state", tmp_path / "reconcile.prom"
    worker = make_worker()
    worker.start()
    records = generate(count, seed=41, dup_rate=0.3, bad_rate=0.02, illegal_rate=0.05)
    feeding = asyncio.create_task(
        produce(settings.bootstrap_servers, settings.topic_raw, records, rate=400)
    )
    proc = await asyncio.create_subprocess_exec(
        *_command(state, metrics, "--interval", "0.5", "--rounds", "12"),
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 300)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    rounds = _rounds(out.decode())
    assert len(rounds) == 12, out.decode() + err.decode()
    for r in rounds:
        assert r["verdict"] == "PASS", r
    # Some rounds saw work past the frontier (else this proves nothing about pending).
    assert any(r["lag_records"] > 0 for r in rounds), [r["lag_records"] for r in rounds]
    assert await feeding == count
    await wait_drained(settings, [worker], timeout=240)
    code, last = await _one_round(env, state, metrics)
    assert code == 0 and last["verdict"] == "PASS", last
    assert last["input_records"] == count and last["lag_records"] == 0
    batch = await reconcile(settings)
    assert batch.ok, batch.render()
    counted = _counts(last["topics"])
    for c in batch.checks[:6]:
        assert counted[c.topic] == (c.expected, c.actual), c.topic


@pytest.mark.slow
async def test_rounds_pass_while_workers_are_killed_and_the_group_rebalances(
    settings: Settings,
    env: dict[str, str],
    make_worker: Callable[..., Worker],
    tmp_path: Path,
) -> None:
    """Aborted transactions, zombie fencing and rebalances between rounds: still no
    round may judge a correct pipeline wrong, and all the input ends up judged."""
    from pipeline.kafka_io import produce
    from pipeline.tools.generate import generate

    count = 6000
    state, metrics = tmp_path / "follow-state", tmp_path / "reconcile.prom"
    a, b = make_worker("a"), make_worker("b")
    a.start()
    b.start()
    records = generate(count, seed=43, dup_rate=0.3, bad_rate=0.02, illegal_rate=0.05)
    feeding = asyncio.create_task(
        produce(settings.bootstrap_servers, settings.topic_raw, records, rate=300)
    )
    proc = await asyncio.create_subprocess_exec(
        *_command(state, metrics, "--interval", "1"),
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        for victim in (a, b, a):
            await asyncio.sleep(5)
            victim.kill9()
            await asyncio.sleep(2)
            victim.start()
        assert await feeding == count
        await wait_drained(settings, [a, b], timeout=300)
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    rounds = _rounds(out.decode())
    assert len(rounds) >= 5, out.decode() + err.decode()
    failed = [r for r in rounds if r["verdict"] != "PASS"]
    if failed:
        # Does the batch run agree (a real loss) or not (the round judged too early)?
        # CI saw a round report losses here twice; this says which next time.
        batch = await reconcile(settings)
        raise AssertionError(f"{failed[0]}\n{err.decode()[-4000:]}\nbatch:\n{batch.render()}")
    code, last = await _one_round(env, state, metrics)
    assert code == 0 and last["verdict"] == "PASS", last
    assert last["input_records"] == count and last["lag_records"] == 0, last
    batch = await reconcile(settings)
    assert batch.ok, batch.render()
    counted = _counts(last["topics"])
    for c in batch.checks[:6]:
        assert counted[c.topic] == (c.expected, c.actual), c.topic
