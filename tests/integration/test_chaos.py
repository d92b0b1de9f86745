"""``python -m pipeline chaos``, the CI-sized run: 20,000 events, 3 workers, 6 kill -9s
(some during rebalances), a SIGSTOP'd zombie, a broker kill -9 and restart, scaling, and
the network faults of each worker's proxy (a partition past the session timeout, a
commit held in flight, connections reset mid-request), with a live read_committed
duplicate watch, the history checker and a reconcile at the end.

It runs on a broker of its own (scripts/kafka with its own port and state directory):
the broker restart must not break the other tests' broker.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.tools.chaos import (
    BROKER,
    DELAY,
    KILL,
    KILL_REBALANCING,
    PARTITION,
    RESET,
    STOP,
    Plan,
    kinds_of,
    run_chaos,
)
from pipeline.tools.procs import settings_from

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_chaos_short_run_is_exactly_once(own_broker: str, tmp_path: Path) -> None:
    base = settings_from({"PIPELINE_BROKER": own_broker, "PIPELINE_SESSION_TIMEOUT_S": "6"})
    plan = Plan(
        seed=20261126,
        events=20_000,
        workers=3,
        duration_s=80,
        kills=6,
        stops=1,
        broker_restarts=1,
        scale_changes=2,
        partitions=1,
        delays=1,
        resets=1,
    )
    result = await run_chaos(plan, base, workdir=tmp_path / "run", drain_timeout=300, say=print)
    summary = result.summary()
    print(summary)
    assert result.ok, summary
    assert result.skipped == [], summary
    done = kinds_of(i.fault for i in result.injected)
    assert done.get(KILL, 0) + done.get(KILL_REBALANCING, 0) == 6, summary
    assert done[STOP] == 1 and done[BROKER] == 1, summary
    assert done[PARTITION] == done[DELAY] == done[RESET] == 1, summary
    assert result.produced == plan.events
    report = result.report
    assert report is not None and report.input_records >= plan.events
    # The live watch read every output to its end: what it saw equals the rebuild.
    unique = next(c for c in report.checks if c.topic.endswith(".orders.unique"))
    assert result.watch_counts[unique.topic] == unique.expected > 0
    # The frozen worker's partitions were taken over while it was stopped, so when it
    # woke it was a zombie, which reconcile shows wrote nothing twice.
    assert len(result.zombies) == 1 and "(zombie fenced out)" in result.zombies[0], summary
    # At least one kill hit a worker in the middle of a rebalance.
    assert any("during a rebalance" in i.note for i in result.injected), summary
    # The partitioned worker ran on, cut off, while the others took its partitions; the
    # held commit was a real EndTxn; and the history shows none of the named anomalies.
    assert len(result.partitioned) == 1, summary
    assert "taken over by the others while it was cut off" in result.partitioned[0], summary
    delay = next(i for i in result.injected if i.fault.kind == DELAY)
    assert "an EndTxn held" in delay.note, summary
    reset = next(i for i in result.injected if i.fault.kind == RESET)
    assert "mid-" in reset.note, summary
    assert result.history is not None and result.history.ok, summary
    assert result.history.facts["accepted inputs"] == plan.events
    assert result.history.facts["live reads"] > 0
