"""Exactly-once at the edges (issue 12): input at the contract's limits, producer clocks,
missing or misplaced keys, failures of a dependency in the middle of an event, topology
changes and lost consumer-group offsets. Each test names the hole it closes.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions
from aiokafka.protocol.admin import DeleteGroupsRequest

from pipeline.admin import EXIT_CONFIG, drop_topics, ensure_topics
from pipeline.domain.codecs import DLQ_MAX_BYTES
from pipeline.domain.models import MAX_VALUE_BYTES
from pipeline.eos import EXIT_COMMIT_FAILED
from pipeline.kafka_io import produce, read_topic
from pipeline.settings import Settings
from pipeline.tools.generate import Record, generate
from pipeline.tools.reconcile import reconcile

from .harness import Worker, feed, settings_from, wait_drained

pytestmark = pytest.mark.integration


def _event(size: int | None = None, **fields: Any) -> bytes:
    """A valid event, padded with an extra field to exactly ``size`` bytes."""
    raw = orjson.dumps(fields)
    if size is None:
        return raw
    base = orjson.dumps({**fields, "note": ""})
    assert size >= len(base)
    return orjson.dumps({**fields, "note": "x" * (size - len(base))})


async def _ids_on(settings: Settings, topic: str) -> Counter[str]:
    seen: Counter[str] = Counter()
    async for m in read_topic(settings.bootstrap_servers, topic):
        seen[orjson.loads(m.value)["event_id"]] += 1
    return seen


async def _dead_letters(settings: Settings) -> list[dict[str, Any]]:
    out = []
    async for m in read_topic(settings.bootstrap_servers, settings.topic_dlq):
        assert m.value is not None and len(m.value) <= DLQ_MAX_BYTES
        out.append(orjson.loads(m.value))
    return out


# ----------------------------------------------------------------- 1. input size limits


async def test_a_valid_event_of_up_to_one_mib_goes_through_the_whole_chain(
    settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    """Hole 1's trigger: a valid event of 1,000,000 to 1,048,576 bytes was refused by the
    transactional producers (Faust's 1,000,000-byte limit), and the event was lost."""
    s = settings
    created = _event(
        1_040_000,
        event_id="big-e0",
        type="OrderCreated",
        order_id="big",
        user_id="u-big",
        amount_cents=700,
        ts_ms=1,
    )
    paid = _event(
        MAX_VALUE_BYTES,
        event_id="big-e1",
        type="PaymentReceived",
        order_id="big",
        amount_cents=700,
        ts_ms=2,
    )
    over = _event(
        MAX_VALUE_BYTES + 1, event_id="big-e2", type="OrderShipped", order_id="big", ts_ms=3
    )
    assert len(paid) == MAX_VALUE_BYTES
    records = [Record(b"big", v, "big") for v in (created, paid, over)]
    assert await produce(s.bootstrap_servers, s.topic_raw, records) == 3
    assert await feed(s, 500, seed=3, dup_rate=0.2, bad_rate=0.0) == 500
    worker = make_worker()
    worker.start()
    await wait_drained(s, [worker], timeout=180)
    worker.stop()
    report = await reconcile(s)
    assert report.ok, report.render()
    forwarded = {}
    async for m in read_topic(s.bootstrap_servers, s.topic_unique):
        if m.key == b"big":
            forwarded[orjson.loads(m.value)["event_id"]] = m.value
    assert forwarded == {"big-e0": created, "big-e1": paid}
    # The one over 1 MiB is bad input: a dead letter of at most 64 KiB that says so.
    (letter,) = [d for d in await _dead_letters(s) if d.get("raw_size") == len(over)]
    assert letter["reason"] == f"value is {len(over)} bytes, over the 1 MiB limit"
    assert over.decode().startswith(letter["raw"])
    changes = await _ids_on(s, s.topic_changes)
    assert changes["big-e0"] == 1 and changes["big-e1"] == 1


# ----------------------------------------------------- 1. a failure in the middle of an event


STAGES = {
    # stage input -> a marker in the value of some of its records
    "raw": '"type":"PaymentReceived"',
    "by_order": '"type":"PaymentReceived"',
    "unique": '"type":"PaymentReceived"',
    "deltas": '"delta_cents"',
}


def _stage_topic(s: Settings, stage: str) -> str:
    return {
        "raw": s.topic_raw,
        "by_order": s.by_order_topic,
        "unique": s.topic_unique,
        "deltas": s.deltas_topic,
    }[stage]


@pytest.mark.parametrize("stage", list(STAGES))
async def test_a_failure_after_an_event_made_its_effects_is_processed_again_exactly_once(
    stage: str, settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    """Hole 1: an exception inside an agent let the commit move past the event with half
    its effects committed. Here the stage's handler has written its table and sent its
    outputs for the first matching record, then raises (planted): the partition's
    transaction must be aborted and the event processed again, once."""
    s = settings
    assert await feed(s, 3000, seed=12, dup_rate=0.2, bad_rate=0.01, illegal_rate=0.05) == 3000
    worker = make_worker(
        PIPELINE_FAIL_EVENT=STAGES[stage],
        PIPELINE_FAIL_EVENT_TOPIC=_stage_topic(s, stage),
        PIPELINE_FAIL_EVENT_TIMES="1",
    )
    worker.start()
    await wait_drained(s, [worker], timeout=180)
    worker.stop()
    log = worker.log_path.read_text(errors="replace")
    assert "planted failure after processing" in log, "the failure never fired"
    assert "failed (attempt 1 of 3)" in log and "processing again from offset" in log
    report = await reconcile(s)
    assert report.ok, report.render()


async def test_a_record_that_fails_every_time_is_dead_lettered_and_its_partition_goes_on(
    settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    """Hole 1: a poison record must neither loop forever nor stall its partition."""
    s = settings
    poison = _event(
        event_id="poison-e0",
        type="OrderCreated",
        order_id="poison",
        user_id="u",
        amount_cents=5,
        ts_ms=1,
    )
    records = [Record(b"poison", poison, "poison")]
    assert await produce(s.bootstrap_servers, s.topic_raw, records) == 1
    assert await feed(s, 2000, seed=13, dup_rate=0.2, bad_rate=0.0) == 2000
    worker = make_worker(
        PIPELINE_FAIL_EVENT="poison-e0",
        PIPELINE_FAIL_EVENT_TOPIC=s.topic_unique,
        PIPELINE_FAIL_EVENT_TIMES="0",
    )
    worker.start()
    await wait_drained(s, [worker], timeout=180)
    worker.stop()
    letters = [d for d in await _dead_letters(s) if d["topic"] == s.topic_unique]
    assert len(letters) == 1, letters
    assert letters[0]["raw"] == poison.decode()
    assert letters[0]["reason"].startswith("processing failed 3 times; last error: Injected")
    for topic in (s.topic_unique, s.topic_changes, s.topic_rejected):
        twice = [k for k, n in (await _ids_on(s, topic)).items() if n > 1]
        assert not twice, (topic, twice[:5])
    assert "poison-e0" not in await _ids_on(s, s.topic_changes)


async def test_a_worker_refuses_an_output_topic_too_small_for_its_records(
    env: dict[str, str], make_worker: Callable[..., Worker]
) -> None:
    """A broker that refuses a record fails its transaction, and below a size of a
    commit marker it cannot even abort it (seen: a transaction stuck in PrepareAbort
    with a topic of max.message.bytes=64). Such a topic is refused at start, with the
    command that fixes it, rather than found by the first coupon."""
    s = settings_from(env)
    await ensure_topics(
        s.bootstrap_servers, [s.topic_coupons], s.partitions, config={"max.message.bytes": "120"}
    )
    worker = make_worker()
    worker.start()
    code = await asyncio.to_thread(worker.wait_exit, 120)
    assert code == EXIT_CONFIG, worker.log_tail()
    assert f"topic {s.topic_coupons} takes messages of at most 120 bytes" in worker.log_tail()


# ------------------------------------------------ 4. a broker check without an answer


async def test_gap_checks_the_broker_does_not_answer_never_stall_a_partition(
    settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    """Hole 4: a check for committed records in an offset gap that timed out marked a
    "hole" at its start offset; on a topic written by transactions that is usually a
    commit marker, never delivered, and the partition stalled until the next
    rebalance. Delivery no longer asks the broker (a fetched batch proves its range);
    the liveness check still does. Here the first 40 checks time out (injected): every
    stage drains, and the checks that failed were made."""
    s = settings
    assert await feed(s, 3000, seed=23, dup_rate=0.2, bad_rate=0.01) == 3000
    worker = make_worker(PIPELINE_FAIL_CHECKS="40")
    worker.start()
    await wait_drained(s, [worker], timeout=240)
    # Idle partitions are checked every 2 s once nothing was processed for 3 s.
    for _ in range(120):
        if "injected timeout of the check" in worker.log_path.read_text(errors="replace"):
            break
        await asyncio.sleep(0.5)
    metrics = await asyncio.to_thread(_metrics, worker)
    worker.stop()
    assert "injected timeout of the check" in worker.log_path.read_text(errors="replace")
    assert metrics["pipeline_offset_checks_unknown_total"] >= 1, metrics
    report = await reconcile(s)
    assert report.ok, report.render()


def _metrics(worker: Worker) -> dict[str, float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{worker.web_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


# ----------------------------------------------------------------- 2. producer clocks


async def test_dedup_verdicts_do_not_depend_on_producer_timestamps(
    env: dict[str, str], settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    """Hole 2: a first copy stamped 30 days ago (an outbox backlog, a replay) was expired
    at the next sweep and its retry forwarded again; one far-future record expired every
    live id of its partition. The window now runs on the broker's append time."""
    env.update(PIPELINE_EXPIRY_EVERY="1")
    s = settings_from(env)
    now = int(time.time() * 1000)
    events = list(generate(400, seed=15, dup_rate=0.0, bad_rate=0.0))
    old = [Record(r.key, r.value, r.kind) for r in events[:200]]
    assert (
        await produce(s.bootstrap_servers, s.topic_raw, old, timestamp_ms=now - 30 * 86_400_000)
        == 200
    )
    future = [Record(r.key, r.value, r.kind) for r in events[200:]]
    assert (
        await produce(
            s.bootstrap_servers, s.topic_raw, future, timestamp_ms=now + 3650 * 86_400_000
        )
        == 200
    )
    worker = make_worker()
    worker.start()
    await wait_drained(s, [worker], timeout=180)
    # Retries of every event, with honest timestamps, after all the above was processed.
    assert await produce(s.bootstrap_servers, s.topic_raw, events) == 400
    await wait_drained(s, [worker], timeout=180)
    worker.stop()
    forwarded = await _ids_on(s, s.topic_unique)
    assert len(forwarded) == 400 and set(forwarded.values()) == {1}, forwarded.most_common(3)
    report = await reconcile(s)
    assert report.ok, report.render()


async def test_a_worker_refuses_an_input_topic_that_keeps_producer_timestamps(
    env: dict[str, str], make_worker: Callable[..., Worker]
) -> None:
    s = settings_from(env)
    await ensure_topics(s.bootstrap_servers, [s.topic_raw], s.partitions)  # CreateTime
    worker = make_worker()
    worker.start()
    code = await asyncio.to_thread(worker.wait_exit, 120)
    assert code == EXIT_CONFIG, worker.log_tail()
    assert "keeps producer timestamps (message.timestamp.type=CreateTime)" in worker.log_tail()


# ----------------------------------------------------------------- 3. keys and partitions


async def test_every_copy_of_an_event_is_forwarded_once_wherever_it_landed(
    settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    """Hole 3: dedup was scoped to the input partition, so a copy without a key (which
    the partitioner sends anywhere) or with a key a different partitioner placed (a
    librdkafka producer hashes with CRC32, not murmur2) was forwarded a second time."""
    s = settings
    events = list(generate(1200, seed=16, dup_rate=0.0, bad_rate=0.0))
    assert await produce(s.bootstrap_servers, s.topic_raw, events) == 1200
    producer = AIOKafkaProducer(bootstrap_servers=s.bootstrap_servers, enable_idempotence=True)
    await producer.start()
    try:
        for n, rec in enumerate(events[:300]):
            await producer.send(s.topic_raw, rec.value)  # keyless copy
            # A keyed copy on a partition the key does not hash to.
            await producer.send(s.topic_raw, rec.value, key=rec.key, partition=n % s.partitions)
        await producer.flush()
    finally:
        await producer.stop()
    worker = make_worker()
    worker.start()
    await wait_drained(s, [worker], timeout=180)
    worker.stop()
    forwarded = await _ids_on(s, s.topic_unique)
    assert len(forwarded) == 1200 and set(forwarded.values()) == {1}, forwarded.most_common(3)
    report = await reconcile(s)
    assert report.ok, report.render()


# ------------------------------------------------- 7. topology changes and long outages


async def test_partitions_added_to_the_input_keep_exactly_once(
    settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    """Hole 7: adding partitions to orders.raw made every worker crash-loop (a source
    partition without its table's partition). The input is rekeyed before any state, so
    its partition count may change; the events of one order then come from two input
    partitions, one after the other."""
    s = settings
    assert await feed(s, 2000, seed=19, dup_rate=0.3, bad_rate=0.01) == 2000
    worker = make_worker()
    worker.start()
    await wait_drained(s, [worker], timeout=180)
    worker.stop()
    admin = AIOKafkaAdminClient(bootstrap_servers=s.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_partitions({s.topic_raw: NewPartitions(total_count=s.partitions + 4)})
    finally:
        await admin.close()
    assert await feed(s, 2000, seed=20, dup_rate=0.3, bad_rate=0.01, prefix="n") == 2000
    worker.start()
    await wait_drained(s, [worker], timeout=180)
    assert worker.alive, worker.log_tail()
    worker.stop()
    report = await reconcile(s)
    assert report.ok, report.render()


async def test_a_keyed_topic_with_another_partition_count_is_refused(
    env: dict[str, str], make_worker: Callable[..., Worker]
) -> None:
    s = settings_from(env)
    await ensure_topics(s.bootstrap_servers, [s.topic_unique], 3)
    worker = make_worker()
    worker.start()
    code = await asyncio.to_thread(worker.wait_exit, 120)
    assert code == EXIT_CONFIG, worker.log_tail()
    assert f"topic {s.topic_unique} has 3 partitions" in worker.log_tail()


async def _until_gone(s: Settings, topic: str, timeout: float = 60) -> None:
    """Topic deletion completes in the background."""
    admin = AIOKafkaAdminClient(bootstrap_servers=s.bootstrap_servers)
    await admin.start()
    try:
        deadline = time.monotonic() + timeout
        while topic in await admin.list_topics():
            assert time.monotonic() < deadline, f"{topic} not deleted in {timeout} s"
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def _delete_group(s: Settings) -> None:
    """What the broker does when a group's offsets expire (offsets.retention.minutes)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=s.bootstrap_servers)
    await admin.start()
    try:
        node = await admin.find_coordinator(s.app_id)
        response = await admin._send_request_to_node(node, DeleteGroupsRequest([s.app_id]))
        assert all(code == 0 for _, code in response.results), response
    finally:
        await admin.close()


async def test_lost_group_offsets_resume_from_the_pipelines_own_progress(
    settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    """Hole 7: with every worker down longer than offsets.retention.minutes, the group's
    offsets expire and the workers started again from the earliest offsets against
    tables that kept their state (balances added again). Each commit also writes the
    offset to the progress topic, in the same transaction: the worker resumes there.
    Without that record (and with state in the tables) it refuses to guess."""
    s = settings
    assert await feed(s, 2500, seed=21, dup_rate=0.2, bad_rate=0.01, illegal_rate=0.05) == 2500
    worker = make_worker()
    worker.start()
    await wait_drained(s, [worker], timeout=180)
    worker.stop()
    await _delete_group(s)
    assert await feed(s, 1000, seed=22, dup_rate=0.2, bad_rate=0.01, prefix="n") == 1000
    worker.start()
    await wait_drained(s, [worker], timeout=180)
    worker.stop()
    log = worker.log_path.read_text(errors="replace")
    assert "the group has no committed offset (expired?); resuming at" in log
    report = await reconcile(s)
    assert report.ok, report.render()
    # Now without the progress records either: the worker must not start from scratch.
    await _delete_group(s)
    await drop_topics(s.bootstrap_servers, s.progress_topic)
    await _until_gone(s, s.progress_topic)
    worker.start()
    code = await asyncio.to_thread(worker.wait_exit, 120)
    assert code == EXIT_COMMIT_FAILED, worker.log_tail()
    assert "no committed offset and no progress record" in worker.log_tail()
