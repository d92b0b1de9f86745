"""The walkthrough of issue 14: a third transformation (``pageviews_app.py``, page views
deduped and counted per user), run as a worker and proven by the command line,
``python -m pipeline reconcile --pipeline``, as its docs tell a new user to."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from pipeline.admin import EXIT_CONFIG, ensure_topics
from pipeline.kafka_io import produce, read_topic
from pipeline.tools.generate import Record
from pipeline.tools.procs import Worker, drained_topics

from .harness import exit_code, settings_from

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


async def test_page_views_are_counted_once_per_view_and_reconciled(
    env: dict[str, str], tmp_path: Path
) -> None:
    app_id = env["PIPELINE_APP_ID"]
    env = {**env, "PIPELINE_TOPIC_PREFIX": app_id + "."}
    settings = settings_from(env)
    rnd = random.Random(14)
    records, views = [], Counter[str]()
    for i in range(600):
        user = f"u{rnd.randrange(20)}"
        value = json.dumps({"id": f"v{i}", "user": user, "page": "/"}).encode()
        views[user] += 1
        records += [Record(None, value, "new")] * (1 + (rnd.random() < 0.3))
    records.append(Record(None, b"not a view", "bad"))
    rnd.shuffle(records)
    worker = _worker(env, tmp_path)
    worker.start()
    try:
        source = f"{app_id}.pageviews.raw"
        hop = f"{app_id}-per_user-repartition"
        deadline = asyncio.get_running_loop().time() + 240
        sent = False
        while True:
            stats = await asyncio.to_thread(worker.stats)
            if not sent and stats is not None and stats.get("partitions"):
                assert await produce(settings.bootstrap_servers, source, records) == len(records)
                sent = True
            if sent:
                done, total = await drained_topics(settings, [source, hop])
                if total >= len(records) and done >= total:
                    break
            assert worker.alive, worker.log_tail()
            assert asyncio.get_running_loop().time() < deadline, worker.log_tail()
            await asyncio.sleep(0.3)
        # The stage's state, as its web view serves it: each user's count.
        base = f"http://{worker.web_address}:{worker.web_port}/stages/per_user/state"
        for user, n in views.items():
            status, body = await asyncio.to_thread(_get, f"{base}/{user}")
            assert (status, body) == (200, {"stage": "per_user", "key": user, "state": n})
        assert (await asyncio.to_thread(_get, f"{base}/nobody"))[0] == 404
        assert (await asyncio.to_thread(_get, f"{base}/{'x' * 1025}"))[0] == 400
        assert (await asyncio.to_thread(_get, f"{base}/a%01b"))[0] == 400
    finally:
        worker.stop()
    outside = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    run = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "pipeline", "reconcile", "--pipeline",
         "tests.integration.pageviews_app"],
        cwd=ROOT,
        env={**outside, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "verdict: PASS" in run.stdout
    last: dict[str, int] = {}
    async for m in read_topic(settings.bootstrap_servers, f"{app_id}.pageviews.counts"):
        last[(m.key or b"").decode()] = int(m.value or b"0")
    assert last == dict(views)  # each user's last count: the views sent, copies once


def _get(url: str) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_a_dedup_stage_refuses_a_source_that_keeps_producer_timestamps(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The window runs on arrival: a declared dedup stage whose source topic exists with
    producer timestamps (CreateTime) must not start, as the order pipeline does not."""
    app_id = env["PIPELINE_APP_ID"]
    env = {**env, "PIPELINE_TOPIC_PREFIX": app_id + "."}
    settings = settings_from(env)
    source = f"{app_id}.pageviews.raw"
    await ensure_topics(settings.bootstrap_servers, [source], settings.partitions)  # CreateTime
    worker = _worker(env, tmp_path)
    assert await exit_code(worker) == EXIT_CONFIG, worker.log_tail()
    log = worker.log_tail()
    assert source in log and "message.timestamp.type=CreateTime" in log, log


def _worker(env: dict[str, str], tmp_path: Path) -> Worker:
    wenv = {**env, "PIPELINE_DATADIR": str(tmp_path / "w")}
    return Worker(wenv, tmp_path / "w.log", name="w", app="tests.integration.pageviews_app")
