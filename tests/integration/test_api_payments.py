"""The payments example (``examples/payments/app.py``), a pipeline of the public API, run
as Faust workers through a kill -9, a broker kill -9 and restart, and a frozen worker
taken over (on a broker of its own, which it restarts), then checked twice: by
``reconcile`` for declared pipelines, and against the test's own accounting of the
notices it sent (per merchant: settled cents, settled and failed notices)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import runpy
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from pipeline.api import Pipeline
from pipeline.kafka_io import produce, read_topic
from pipeline.tools.generate import Record
from pipeline.tools.procs import ROOT, Worker, drained_topics
from pipeline.tools.reconcile_api import reconcile_pipeline

from .harness import settings_from

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "payments" / "app.py"


def notices(count: int, seed: int, start: int) -> tuple[list[Record], dict[str, Counter[str]]]:
    """``count`` notices with copies (some under another key, so in another partition)
    and bad records; and what each merchant's total must be, from the unique ones."""
    rnd = random.Random(seed)
    records: list[Record] = []
    want: dict[str, Counter[str]] = {}
    for i in range(start, start + count):
        merchant = f"m{rnd.randrange(12)}"
        status = "settled" if rnd.random() < 0.85 else "failed"
        doc = {
            "provider_id": f"pay-{i}",
            "merchant": merchant,
            "amount_cents": rnd.randrange(1, 100_000),
            "status": status,
        }
        value = json.dumps(doc).encode()
        total = want.setdefault(merchant, Counter())
        total[status] += 1
        if status == "settled":
            total["settled_cents"] += doc["amount_cents"]
        for copy in range(1 + (rnd.random() < 0.25) + (rnd.random() < 0.05)):
            key = None if copy and rnd.random() < 0.5 else doc["provider_id"].encode()
            records.append(Record(key, value, "dup" if copy else "new"))
        if rnd.random() < 0.02:
            bad = rnd.choice(
                [b"{", b'{"provider_id": 7}', json.dumps({**doc, "status": "x"}).encode()]
            )
            records.append(Record(None, bad, "bad"))
    rnd.shuffle(records)  # copies arrive out of order, some before their first
    return records, want


async def _wait(pipe: Pipeline, workers: list[Worker], at_least: float, timeout: float) -> None:
    """Until the group committed ``at_least`` of the stage's input (1.0: all of it)."""
    settings = pipe.settings
    topics = [info.source for info in pipe.stages.values()]
    topics += [info.processed_from for info in pipe.stages.values()]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        done, total = await drained_topics(settings, list(dict.fromkeys(topics)))
        if total and done >= at_least * total:
            return
        if not any(w.alive for w in workers) or loop.time() > deadline:
            tails = "\n".join(f"--- {w.name}\n{w.log_tail()}" for w in workers)
            raise AssertionError(f"at {done}/{total}\n{tails}")
        await asyncio.sleep(0.3)


async def test_the_payments_example_is_exactly_once_through_kills_and_a_zombie(
    env: dict[str, str], own_broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {
        **env,
        "PIPELINE_BROKER": own_broker,
        "PIPELINE_TOPIC_PREFIX": env["PIPELINE_APP_ID"] + ".",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # The test's own copy of the declaration, under the test's settings (for reconcile).
    pipe: Pipeline = runpy.run_path(str(EXAMPLE))["pipe"]
    settings = settings_from(env)
    assert pipe.settings.app_id == settings.app_id
    source = pipe.topic_name("payments.raw")

    def worker(name: str) -> Worker:
        wenv = {**env, "PIPELINE_DATADIR": str(tmp_path / name)}
        return Worker(wenv, tmp_path / f"{name}.log", name=name, app="examples.payments.app")

    first, want = notices(1500, seed=5, start=0)
    second, more = notices(1500, seed=6, start=1500)
    for merchant, counts in more.items():
        want.setdefault(merchant, Counter()).update(counts)
    a, b = worker("a"), worker("b")
    a.start()
    b.start()
    try:
        # The workers create the topics at start; wait for them to own partitions.
        await _wait_started([a, b], timeout=120)
        assert await produce(settings.bootstrap_servers, source, first) == len(first)
        await _wait(pipe, [a, b], at_least=0.3, timeout=240)
        a.kill9()  # in the middle of the stream: its open transactions abort
        assert await produce(settings.bootstrap_servers, source, second) == len(second)
        await asyncio.sleep(1)
        a.start()
        # The broker killed and started while the killed worker starts again (its
        # environment is the test's own broker's): every open transaction is aborted,
        # every client reconnects. In CI a worker that started this way led the group
        # with metadata lacking the topics, and the group was assigned nothing until the
        # consumer's next metadata refresh (5 minutes before it was set to 10 s).
        kafka = str(ROOT / "scripts" / "kafka")
        await asyncio.to_thread(subprocess.run, ["bash", kafka, "kill"], check=True)
        await asyncio.to_thread(subprocess.run, ["bash", kafka, "start"], check=True)
        await _wait(pipe, [a, b], at_least=0.7, timeout=150)
        assert b.proc is not None
        b.proc.send_signal(signal.SIGSTOP)  # frozen past its session: a taken-over zombie
        try:
            await asyncio.sleep(float(env["PIPELINE_SESSION_TIMEOUT_S"]) + 6)
        finally:
            b.proc.send_signal(signal.SIGCONT)
        if not b.alive:  # a fenced zombie may end itself (70); its restart is clean
            b.start()
        await _wait(pipe, [a, b], at_least=1.0, timeout=300)
    finally:
        a.stop()
        b.stop()

    report = await reconcile_pipeline(pipe)
    assert report.ok, report.render()
    assert report.duplicates == 0 and report.losses == 0
    # The test's own accounting: every unique notice once, across both outputs.
    ids: Counter[str] = Counter()
    for topic in ("payments.settled", "payments.failed"):
        async for m in read_topic(settings.bootstrap_servers, pipe.topic_name(topic)):
            ids[json.loads(m.value or b"")["provider_id"]] += 1
    assert len(ids) == 3000 and set(ids.values()) == {1}
    state: dict[str, Any] = {}
    changelog = f"{settings.app_id}-notices-changelog"
    async for m in read_topic(settings.bootstrap_servers, changelog):
        state[(m.key or b"").decode()] = None if m.value is None else json.loads(m.value)
    assert state == {
        m: {"settled_cents": c["settled_cents"], "settled": c["settled"], "failed": c["failed"]}
        for m, c in want.items()
    }


async def _wait_started(workers: list[Worker], timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        stats = [await asyncio.to_thread(w.stats) for w in workers]
        if all(s is not None and s.get("partitions") and not s.get("rebalancing") for s in stats):
            return
        if not all(w.alive for w in workers):
            break
        await asyncio.sleep(0.3)
    tails = "\n".join(f"--- {w.name}\n{w.log_tail()}" for w in workers)
    raise AssertionError(f"the workers did not start\n{tails}")


async def test_chaos_drives_the_payments_example_then_reconciles_it(
    env: dict[str, str], own_broker: str, tmp_path: Path
) -> None:
    """``python -m pipeline chaos --pipeline``: the example's workers through a kill -9,
    a frozen worker and a broker kill -9 and restart while its input flows (each notice
    once, some sent again later), then ``reconcile --pipeline``; and the outputs against
    the test's own accounting."""
    records, want = notices(1500, seed=9, start=0)
    lines = [r.value for r in records if r.kind != "dup"]
    assert all(b"\n" not in v for v in lines)
    (tmp_path / "notices.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    outside = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    command = [
        sys.executable, "-m", "pipeline", "chaos", "--json", "--seed", "14",
        "--pipeline", "examples.payments.app", "--input", str(tmp_path / "notices.jsonl"),
        "--workers", "2", "--duration", "40", "--kills", "1", "--stops", "1",
        "--broker-restarts", "1", "--scale-changes", "0", "--partitions", "0",
        "--delays", "0", "--resets", "0", "--workdir", str(tmp_path / "run"),
    ]  # fmt: skip
    run = await asyncio.to_thread(
        subprocess.run,
        command,
        cwd=ROOT,
        # The broker of its own: chaos restarts it through scripts/kafka, whose
        # KAFKA_* variables own_broker has set.
        env={**outside, "PIPELINE_BROKER": own_broker, "PIPELINE_SESSION_TIMEOUT_S": "6"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    doc = json.loads(run.stdout)
    assert doc["verdict"] == "PASS"
    done = Counter(f["kind"] for f in doc["faults"] if not f["note"].startswith("skipped"))
    assert done == {"kill9": 1, "sigstop": 1, "broker-restart": 1}, doc["faults"]
    assert doc["zombies"] and "taken over" in doc["zombies"][0], doc["zombies"]
    report = doc["reconcile"]
    assert report["duplicates"] == 0 and report["losses"] == 0
    assert doc["produced"] > len(lines)  # copies were sent too
    # The test's own accounting, from the outputs of the run's topics.
    bootstrap = own_broker.split("://", 1)[-1]
    totals: dict[str, Counter[str]] = {}
    for status in ("settled", "failed"):
        topic = f"{doc['app_id']}.payments.{status}"
        async for m in read_topic(bootstrap, topic):
            notice = json.loads(m.value or b"")
            total = totals.setdefault(notice["merchant"], Counter())
            total[status] += 1
            if status == "settled":
                total["settled_cents"] += notice["amount_cents"]
    assert totals == want
