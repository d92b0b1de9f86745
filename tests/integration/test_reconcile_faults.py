"""``reconcile`` against real topics: clean outputs pass, and each seeded fault is
caught (a duplicated output, a missing output, a wrong table value, an open
transaction). The outputs come from the in-process reference run
(:mod:`pipeline.reference`), which applies the agents' pure operators."""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaProducer

from pipeline.reconcile import Report, TopicCheck, reconcile
from pipeline.reference import write_reference
from pipeline.settings import Settings

from .harness import feed

pytestmark = pytest.mark.integration

COUNT = 3000


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
    # On a terminal, a progress bar per topic read, on stderr.
    capsys.readouterr()
    again = await reconcile(settings, progress=True)
    assert again.ok
    # One line per topic, redrawn in place (\r); its last state is the finished bar.
    bars = [line.rsplit("\r", 1)[-1] for line in capsys.readouterr().err.split("\n")[:-1]]
    assert len(bars) == len(again.checks) + 1  # the input, then every checked topic
    assert bars[0] == f"[{'#' * 30}] 100% {settings.topic_raw} {COUNT:,}/{COUNT:,}"


async def test_duplicated_output_is_caught(settings: Settings) -> None:
    report = await _run(settings, "duplicate")
    assert not report.ok
    coupons = _check(report, "coupons.issued")
    assert (coupons.duplicates, coupons.missing) == (1, 0), report.render()
    assert report.duplicates == 1 and report.losses == 0
    assert "FAIL" in report.render()


async def test_missing_output_is_caught(settings: Settings) -> None:
    report = await _run(settings, "missing")
    assert not report.ok
    changes = _check(report, "orders.changes")
    assert (changes.missing, changes.duplicates) == (1, 0), report.render()
    assert report.losses == 1 and report.duplicates == 0


async def test_wrong_table_value_is_caught(settings: Settings) -> None:
    report = await _run(settings, "wrong-table")
    assert not report.ok
    balances = _check(report, "users.balances-changelog")
    assert balances.mismatched == 1, report.render()
    assert balances.examples and "balance_cents" in balances.examples[0]
    assert all(c.ok for c in report.checks if c is not balances), report.render()


async def test_open_transaction_is_caught(settings: Settings) -> None:
    report = await _run(settings)
    assert report.ok, report.render()
    # A transaction left open on an output: its records are invisible to read_committed
    # readers and hold back everything after them.
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, transactional_id=f"{settings.app_id}-stuck"
    )
    await producer.start()
    try:
        await producer.begin_transaction()
        await producer.send_and_wait(settings.topic_changes, b"{}", key=b"o1", partition=2)
        report = await reconcile(settings)
        assert not report.ok
        assert list(report.open_transactions) == [settings.topic_changes], report.render()
        assert list(report.open_transactions[settings.topic_changes]) == [2]
        assert "open transaction" in report.render()
        await producer.abort_transaction()
        assert (await reconcile(settings)).ok
    finally:
        await producer.stop()
