"""A commit whose answer never comes (pipeline/tools/netfault.py, on a broker of its own
with the proxy listeners of scripts/kafka).

The worker's ``EndTxn`` answer is held on its connection for 300 s: the commit's
outcome is unknown to the worker. What must happen: the request times out after
``PIPELINE_PRODUCER_REQUEST_TIMEOUT_S``, the producer asks again on a new connection
(the same commit, never an abort), and the worker goes on, long before the hold ends.
With Faust's default request timeout (1,200 s) the worker committed nothing for as long
as the hold lasted (measured: 120 s of a 120 s hold, then its transactions were aborted
by the broker and it was fenced).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pipeline.admin import declare_topics
from pipeline.kafka_io import produce
from pipeline.tools.chaos import broker_address
from pipeline.tools.generate import generate
from pipeline.tools.netfault import DOWN, END_TXN, Proxies
from pipeline.tools.procs import drained
from pipeline.tools.reconcile import reconcile

from .harness import Worker, settings_from, unique_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HOLD_S = 300.0


async def _wait_drained(settings: object, seconds: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        done, total = await drained(settings)  # type: ignore[arg-type]
        if total and done >= total:
            return True
        await asyncio.sleep(0.5)
    return False


async def test_a_commit_whose_answer_is_lost_is_asked_again_not_aborted(
    own_broker: str, tmp_path: Path
) -> None:
    env = unique_env(
        tmp_path,
        PIPELINE_BROKER=own_broker,
        PIPELINE_SESSION_TIMEOUT_S="6",
        PIPELINE_PRODUCER_REQUEST_TIMEOUT_S="10",
    )
    settings = settings_from(env)
    await declare_topics(settings, [settings.topic_raw])
    host, port = broker_address(own_broker)
    proxies = Proxies(port + 200, 1, host)
    link = await proxies.link(0)
    worker = Worker(
        dict(env, PIPELINE_BROKER=f"kafka://{link.address}"), tmp_path / "w0.log", name="w0"
    )
    worker.start()
    try:
        records = list(generate(3000, seed=16))
        await produce(settings.kafka, settings.topic_raw, records[:1500])
        assert await _wait_drained(settings, 120), worker.log_tail()

        held = asyncio.ensure_future(link.delay_commit(DOWN, HOLD_S, within=60))
        await asyncio.sleep(0.2)
        await produce(settings.kafka, settings.topic_raw, records[1500:])
        note = await held
        assert "an EndTxn held down" in note, note
        loop = asyncio.get_running_loop()
        held_at = loop.time()

        # Everything committed while the answer is still held: the worker did not wait
        # for it, and did not die (no supervisor here restarts it).
        assert await _wait_drained(settings, 120), worker.log_tail()
        assert loop.time() - held_at < HOLD_S
        assert worker.alive, worker.log_tail()
        assert link.requests[END_TXN] >= 2
        log = (tmp_path / "w0.log").read_text()
        assert "Cannot send <class 'aiokafka.protocol.transaction.EndTxnRequest'>" in log
        assert "RequestTimedOutError" in log

        report = await reconcile(settings)
        assert report.ok, report.render()
        assert report.input_records == len(records)
    finally:
        worker.kill9()
        await proxies.close()
