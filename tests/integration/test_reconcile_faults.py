"""``reconcile`` against real topics: clean outputs pass, each seeded fault is caught,
and so is a bug planted in a worker's own operator.

The outputs of the fault tests come from the in-process reference run
(:mod:`pipeline.tools.reference`), which applies the agents' pure operators; ``reconcile``
shares none of their code, so it judges them instead of replaying them.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from pipeline.settings import Settings
from pipeline.tools.reconcile import Report, TopicCheck, reconcile
from pipeline.tools.reference import write_reference

from .harness import Worker, feed, wait_drained

pytestmark = pytest.mark.integration

COUNT = 3000
ROOT = Path(__file__).resolve().parents[2]


async def _run(settings: Settings, *faults: str) -> Report:
    await feed(settings, COUNT, seed=11, dup_rate=0.3, bad_rate=0.02, illegal_rate=0.05)
    assert await write_reference(settings, frozenset(faults)) > COUNT // 2
    return await reconcile(settings)


def _check(report: Report, suffix: str) -> TopicCheck:
    return next(c for c in report.checks if c.topic.endswith(suffix))


async def test_clean_outputs_pass(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    report = await _run(settings)
    assert report.ok, report.render()
    assert report.input_records == COUNT
    # Every kind of output is there, so the fault tests below can hit each.
    assert all(c.expected > 0 for c in report.checks), report.render()
    assert [c.topic for c in report.checks[:2]] == [settings.topic_unique, settings.topic_dlq]
    # A correct run forwards each distinct valid event once: expected is what it has.
    assert report.checks[0].expected == report.checks[0].actual
    # On a terminal, a progress bar per topic read, on stderr.
    capsys.readouterr()
    again = await reconcile(settings, progress=True)
    assert again.ok
    # One line per topic, redrawn in place (\r); its last state is the finished bar:
    # the input, then every checked topic.
    bars = [line.rsplit("\r", 1)[-1] for line in capsys.readouterr().err.split("\n")[:-1]]
    assert len(bars) == len(again.checks) + 1, bars
    assert f"[{'#' * 30}] 100% {settings.topic_raw} {COUNT:,}/{COUNT:,}" in bars
    assert {b.split()[-2] for b in bars} == {settings.topic_raw, *(c.topic for c in again.checks)}


#: fault -> (the check that must catch it, its counts), every other check clean
SEEDED: dict[str, tuple[str, dict[str, int]]] = {
    "duplicate": ("coupons.issued", {"duplicates": 1}),
    "missing": ("orders.changes", {"missing": 1}),
    "forward-twice": ("orders.unique", {"duplicates": 1}),
    "forward-lost": ("orders.unique", {"missing": 1}),
    "forward-bytes": ("orders.unique", {"mismatched": 1}),
    "forward-timestamp": ("orders.unique", {"mismatched": 1}),
    "wrong-key": ("orders.changes", {"mismatched": 1}),
    "dlq-raw": ("orders.dlq", {"mismatched": 1}),
}


@pytest.mark.parametrize("fault", sorted(SEEDED))
async def test_seeded_fault_is_caught(settings: Settings, fault: str) -> None:
    report = await _run(settings, fault)
    assert not report.ok
    suffix, counts = SEEDED[fault]
    caught = _check(report, suffix)
    for name in ("duplicates", "missing", "unexpected", "out_of_order", "mismatched"):
        assert getattr(caught, name) == counts.get(name, 0), (name, report.render())
    assert caught.examples, report.render()
    assert all(c.ok for c in report.checks if c is not caught), report.render()
    assert "FAIL" in report.render()


async def test_duplicated_output_counts_as_a_duplicate(settings: Settings) -> None:
    report = await _run(settings, "duplicate")
    assert report.duplicates == 1 and report.losses == 0, report.render()


async def test_missing_output_counts_as_a_loss(settings: Settings) -> None:
    report = await _run(settings, "missing")
    assert report.losses == 1 and report.duplicates == 0, report.render()


async def test_wrong_table_value_is_caught(settings: Settings) -> None:
    report = await _run(settings, "wrong-table")
    assert not report.ok
    balances = _check(report, "users.balances-changelog")
    assert balances.mismatched == 1, report.render()
    assert balances.examples and "balance_cents" in balances.examples[0]
    assert all(c.ok for c in report.checks if c is not balances), report.render()


async def test_lost_delta_is_caught_on_the_topic_and_in_the_table(settings: Settings) -> None:
    report = await _run(settings, "delta-lost")
    deltas = _check(report, settings.deltas_topic)
    assert (deltas.missing, deltas.duplicates, deltas.mismatched) == (1, 0, 0), report.render()
    balances = _check(report, "users.balances-changelog")
    assert balances.mismatched + balances.missing == 1, report.render()
    assert all(c.ok for c in report.checks if c not in (deltas, balances)), report.render()


@pytest.mark.parametrize("which", ["orders.changes", "orders-changelog"])
async def test_open_transaction_is_caught(settings: Settings, which: str) -> None:
    report = await _run(settings)
    assert report.ok, report.render()
    topic = settings.topic_changes if which == "orders.changes" else f"{settings.app_id}-{which}"
    # A transaction left open: its records are invisible to read_committed readers and
    # hold back everything after them (on a changelog: the table's restore).
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, transactional_id=f"{settings.app_id}-stuck"
    )
    await producer.start()
    try:
        await producer.begin_transaction()
        await producer.send_and_wait(topic, b"{}", key=b"o1", partition=2)
        report = await reconcile(settings)
        assert not report.ok
        assert list(report.open_transactions) == [topic], report.render()
        assert list(report.open_transactions[topic]) == [2]
        assert "open transaction" in report.render()
        await producer.abort_transaction()
        assert (await reconcile(settings)).ok
    finally:
        await producer.stop()


async def test_a_bug_planted_in_a_worker_operator_is_caught(
    env: dict[str, str],
    settings: Settings,
    make_worker: Callable[..., Worker],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker whose state machine skips a version on OrderShipped (the test-only
    ``PIPELINE_PLANT_BUG=version-skip`` of ``pipeline/domain/orders.py``), and a reconcile in a
    process that carries the same switch: a checker that replays the workers' operator
    agrees with the bug; ours must not.

    The reconcile runs as a fresh ``python -m pipeline reconcile`` because the switch is
    read when ``pipeline.domain.orders`` is imported: in this test process it was imported at
    collection, without it.
    """
    monkeypatch.setenv("PIPELINE_PLANT_BUG", "version-skip")
    await feed(settings, 1500, seed=5, dup_rate=0.2, bad_rate=0.01, illegal_rate=0.05)
    worker = make_worker(PIPELINE_PLANT_BUG="version-skip")
    worker.start()
    await wait_drained(settings, [worker], timeout=150)
    worker.stop()

    child = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    child.update(env, PIPELINE_PLANT_BUG="version-skip")
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "pipeline", "reconcile", "--json"],
        cwd=ROOT,
        env=child,
        capture_output=True,
        timeout=300,
        check=False,
    )
    verdict = orjson.loads(done.stdout)
    shown = done.stdout.decode()[:6000]
    assert verdict["verdict"] == "FAIL", shown
    assert done.returncode == 1
    checks = {c["topic"]: c for c in verdict["topics"]}
    changes = checks[settings.topic_changes]
    # Every shipped order's change, and its row in the orders table, has the wrong version.
    assert changes["mismatched"] > 0, shown
    assert checks[f"{settings.app_id}-orders-changelog"]["mismatched"] == changes["mismatched"]
    # Nothing else is wrong: the bug is in one transition.
    bad = {settings.topic_changes, f"{settings.app_id}-orders-changelog"}
    assert all(c["ok"] for t, c in checks.items() if t not in bad), shown
    assert verdict["duplicates"] == verdict["losses"] == 0, shown
