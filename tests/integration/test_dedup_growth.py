"""The dedup table's size follows the window, not the history (issue 16).

Bursts of new events are sent one after another, each more than a window after the
previous one was acknowledged, so that every id of an earlier burst arrived (broker
append time) more than a window before any id of the next. With a sweep at every
record over the whole partition (``PIPELINE_EXPIRY_EVERY=1`` and a batch larger than
any partition), the first record of a burst in a partition removes every earlier id
of that partition: after each burst the table holds ids of that burst alone, however
many came before. What a restore rebuilds is measured: the live keys of the table's
changelog (last record per key not a tombstone). No verdict depends on how fast
anything runs: the waits are on the broker's clock and the group's committed offsets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson
import pytest

from pipeline.domain.dedup import STREAM_KEY
from pipeline.eos.partitioner import partition_for
from pipeline.kafka_io import produce, read_topic
from pipeline.settings import Settings
from pipeline.tools.generate import Record, generate

from .harness import Worker, settings_from, wait_drained

pytestmark = pytest.mark.integration

WINDOW_S = 1.5
BURSTS = 5
PER_BURST = 400


def _ids(records: list[Record]) -> set[bytes]:
    return {orjson.loads(r.value)["event_id"].encode() for r in records}


async def _live_ids(s: Settings) -> set[bytes]:
    """The ids a restore of the dedup table would end with."""
    live: dict[bytes, bool] = {}
    async for m in read_topic(s.bootstrap_servers, f"{s.app_id}-dedup-changelog"):
        assert m.key is not None
        live[m.key] = m.value is not None
    return {k for k, alive in live.items() if alive and k != STREAM_KEY}


async def test_dedup_table_levels_off_while_history_grows(
    env: dict[str, str], settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    env.update(
        PIPELINE_DEDUP_WINDOW_S=str(WINDOW_S),
        PIPELINE_DEDUP_GRACE_S="0",
        PIPELINE_EXPIRY_EVERY="1",
        PIPELINE_EXPIRY_BATCH="1000000",
        PIPELINE_STAGES="dedup",
    )
    s = settings_from(env)
    worker = make_worker()
    worker.start()
    parts = list(range(s.partitions))
    sizes: list[int] = []
    history: set[bytes] = set()
    for k in range(BURSTS):
        burst = list(generate(PER_BURST, seed=60 + k, dup_rate=0.2, bad_rate=0.0, prefix=f"g{k}-"))
        # The scenario's own precondition: every dedup partition gets records of every
        # burst (the generator is seeded, so this holds or fails the same every run).
        assert {partition_for(r.key or b"", parts) for r in burst} == set(parts)
        assert await produce(s.bootstrap_servers, s.topic_raw, burst) == len(burst)
        await wait_drained(s, [worker], timeout=120, topics=[s.topic_raw, s.by_order_topic])
        ids = _ids(burst)
        history |= ids
        live = await _live_ids(s)
        # Nothing of an earlier burst is left, and the last copy of each partition is in
        # the window of that partition's stream time: some of this burst's ids are.
        assert live <= ids, sorted(live - ids)[:5]
        assert live
        sizes.append(len(live))
        # Every id of this burst now arrived more than a window before the next one.
        await asyncio.sleep(WINDOW_S + 0.5)
    stats = worker.stats()
    worker.stop()
    print(f"live ids after each burst: {sizes}; distinct ids sent: {len(history)}")
    # Level, not growing: at most one burst's ids, while the history is BURSTS bursts.
    assert sizes[-1] * (BURSTS - 1) < len(history)
    assert stats is not None
    expired = int(stats["expired_ids"])  # type: ignore[call-overload]
    assert expired >= len(history) - sizes[-1]
