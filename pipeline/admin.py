"""Topic administration with a plain aiokafka admin client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError, for_code

from pipeline.connection import KafkaConnection, as_connection
from pipeline.domain.models import MAX_VALUE_BYTES

if TYPE_CHECKING:
    from pipeline.settings import Settings

log = logging.getLogger(__name__)

#: The largest message on a topic that carries an input value whole (orders.raw, the
#: rekeyed copy, orders.unique): a valid value is up to 1 MiB, plus its key (an id of up
#: to 128 characters), our headers and the record batch framing. Kafka's default
#: (1 MiB + 12 bytes) refused the largest valid events. Producers may send this much.
LARGE_MESSAGE_BYTES = 2 * 1024 * 1024
#: What such a topic must accept at least, or valid events could not be forwarded.
NEEDED_MESSAGE_BYTES = MAX_VALUE_BYTES + 16 * 1024
#: What every other topic the pipeline writes must accept at least: a dead letter is up
#: to 64 KiB, plus its key and framing; Kafka's default is 1 MiB.
NEEDED_OUTPUT_BYTES = 80 * 1024
#: Exit status of a worker that refuses to start on topics it cannot run on safely.
EXIT_CONFIG = 78
LARGE_CONFIG = {"max.message.bytes": str(LARGE_MESSAGE_BYTES)}
#: CreateTopics answers that no retry changes: not authorized (topic, cluster), an
#: invalid name, a policy, an invalid configuration or partition/replication count.
_REFUSED_CODES = frozenset({17, 29, 31, 37, 38, 40, 44})

#: ``orders.raw``: large messages, and the broker's append time in every record.
RAW_CONFIG = {**LARGE_CONFIG, "message.timestamp.type": "LogAppendTime"}


class TopicsRefused(RuntimeError):
    """The broker refused to create topics for good (one line: which, and why)."""


async def ensure_topics(
    kafka: KafkaConnection | str,
    names: Iterable[str],
    partitions: int,
    replication: int = 1,
    config: dict[str, str] | None = None,
    attempts: int = 30,
) -> None:
    """Create the topics that do not exist yet (idempotent, safe to race)."""
    wanted = list(dict.fromkeys(names))
    conn = as_connection(kafka)
    for attempt in range(attempts):
        admin = AIOKafkaAdminClient(**conn.kwargs(), request_timeout_ms=10000)
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [n for n in wanted if n not in existing]
            if missing:
                response: Any = None
                with contextlib.suppress(TopicAlreadyExistsError):
                    response = await admin.create_topics(
                        [
                            NewTopic(n, partitions, replication, topic_configs=config or {})
                            for n in missing
                        ]
                    )
                if response is not None:
                    _raise_refused(response, conn)
                log.info("created topics %s", missing)
                # Creation returns before every broker's metadata lists the topics. A
                # consumer group leader that computes an assignment from metadata
                # without them leaves their partitions out (aiokafka only logs "Ignoring
                # missing topic") until its metadata is next refreshed, minutes later.
                for _ in range(50):
                    listed = set(await admin.list_topics())
                    if all(n in listed for n in missing):
                        break
                    await asyncio.sleep(0.2)
                else:
                    raise RuntimeError(f"created topics not listed after 10 s: {missing}")
            return
        except KafkaConnectionError:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(1)
        finally:
            await admin.close()


def _raise_refused(response: Any, conn: KafkaConnection) -> None:
    """Raise :class:`TopicsRefused` when a CreateTopics answer refused a topic for good
    (on a secured cluster, above all: a user without the Create right), instead of
    waiting for a topic that will never be listed."""
    refused = []
    for t in response.to_object().get("topic_errors", []):
        code = int(t.get("error_code", 0))
        if code in _REFUSED_CODES:
            kind = getattr(for_code(code), "message", str(code))
            detail = t.get("error_message") or ""
            refused.append(f"{t.get('topic')}: {kind}" + (f" ({detail})" if detail else ""))
    if refused:
        who = f" as user {conn.sasl_username!r}" if conn.sasl else ""
        raise TopicsRefused(
            f"kafka: the broker refused to create topics{who}: {'; '.join(refused)}. "
            "Create them beforehand (a user with the Create right), or grant it"
        )


async def drop_topics(kafka: KafkaConnection | str, tag: str) -> list[str]:
    """Delete every topic whose name contains ``tag``; the names deleted.

    For runs that name all their topics after one tag (a bench system run, a test):
    inputs, outputs, changelogs and Faust's internal topics. A long-lived broker slows
    down as partitions pile up (a day of test runs left tens of thousands)."""
    admin = AIOKafkaAdminClient(**as_connection(kafka).kwargs(), request_timeout_ms=10000)
    await admin.start()
    try:
        mine = [t for t in await admin.list_topics() if tag in t]
        if mine:
            await admin.delete_topics(mine)
        return mine
    finally:
        await admin.close()


def topic_configs(settings: Settings) -> dict[str, dict[str, str]]:
    """Every topic of the pipeline that it creates when missing, with its configuration.

    ``orders.raw`` keeps the broker's append time in each record
    (``LogAppendTime``): the dedup window runs on when a copy arrived, which a
    producer's clock or an outbox backlog cannot fake (``pipeline/domain/dedup.py``).
    """
    return {
        settings.topic_raw: RAW_CONFIG,
        settings.by_order_topic: LARGE_CONFIG,
        settings.topic_unique: LARGE_CONFIG,
        settings.topic_dlq: {},
        settings.topic_changes: {},
        settings.topic_rejected: {},
        settings.topic_coupons: {},
        settings.deltas_topic: {},
        # One record per source partition, rewritten at each commit: compaction keeps
        # the last (see pipeline.eos, "progress"). Small segments, so that compaction
        # runs within the hour and a reader at start reads little more than one
        # record per partition.
        settings.progress_topic: {
            "cleanup.policy": "compact",
            "segment.ms": str(3600 * 1000),
            "segment.bytes": str(16 * 1024 * 1024),
        },
    }


async def declare_topics(settings: Settings, names: Iterable[str] | None = None) -> None:
    """Create the pipeline's topics (or those of ``names``) that do not exist yet."""
    configs = topic_configs(settings)
    wanted = list(names) if names is not None else list(configs)
    groups: dict[tuple[tuple[str, str], ...], list[str]] = {}
    for name in wanted:
        groups.setdefault(tuple(sorted(configs.get(name, {}).items())), []).append(name)
    kafka = settings.kafka
    for config, group in groups.items():
        await ensure_topics(
            kafka,
            group,
            settings.partitions,
            settings.replication,
            config=dict(config),
        )


async def topic_problems(
    settings: Settings,
    changelogs: Iterable[str] = (),
    *,
    keyed: Iterable[str] = (),
    append_time: Iterable[str] = (),
    orders: bool = True,
) -> list[str]:
    """What about the existing topics would make the pipeline unsafe to run, one line
    each (an empty list: nothing).

    * ``orders.raw`` (and the topics of ``append_time``) must keep the append time
      (``message.timestamp.type``): a dedup window runs on it.
    * Every topic keyed like a table (and those of ``keyed``) must have the configured
      partition count: a key hashed to another partition than its state lives in would
      be processed against an empty table. ``orders.raw`` may have any count: it is
      rekeyed first.
    * The topics that carry an input value whole must take the largest valid one.

    ``orders=False`` (a pipeline of :mod:`pipeline.api`) leaves the order pipeline's
    topics out: a cluster may hold an ``orders.raw`` that is not this app's.
    """
    own_keyed = [settings.by_order_topic, settings.topic_unique, settings.deltas_topic]
    keyed = [*(own_keyed if orders else []), *keyed, *changelogs]
    large = [settings.topic_raw, settings.by_order_topic, settings.topic_unique] if orders else []
    own_written = [
        settings.topic_dlq,
        settings.topic_changes,
        settings.topic_rejected,
        settings.topic_coupons,
        settings.deltas_topic,
    ]
    written = [*(own_written if orders else []), settings.progress_topic, *changelogs]
    appended = [*([settings.topic_raw] if orders else []), *append_time]
    admin = AIOKafkaAdminClient(**settings.kafka.kwargs(), request_timeout_ms=10000)
    await admin.start()
    problems: list[str] = []
    try:
        existing = set(await admin.list_topics())
        present = [t for t in dict.fromkeys([*keyed, *large]) if t in existing]
        counts = {d["topic"]: len(d["partitions"]) for d in await admin.describe_topics(present)}
        for topic in dict.fromkeys(keyed):
            n = counts.get(topic)
            if n is not None and n != settings.partitions:
                problems.append(
                    f"topic {topic} has {n} partitions, not PIPELINE_PARTITIONS="
                    f"{settings.partitions}: its keys would meet another partition's state"
                    " (see README, 'Changing the partition count')"
                )
        checked = [t for t in dict.fromkeys([*large, *written, *appended]) if t in existing]
        configs = await _configs(admin, checked)
        for topic in dict.fromkeys(appended):
            kind = configs.get(topic, {}).get("message.timestamp.type")
            if topic in configs and kind != "LogAppendTime":
                problems.append(
                    f"topic {topic} keeps producer timestamps "
                    f"(message.timestamp.type={kind}); the dedup "
                    "window runs on the broker's append time. Run: kafka-configs.sh "
                    f"--alter --entity-type topics --entity-name {topic} "
                    "--add-config message.timestamp.type=LogAppendTime"
                )
        needs = dict.fromkeys(written, NEEDED_OUTPUT_BYTES)
        if orders:
            needs[settings.by_order_topic] = NEEDED_MESSAGE_BYTES
            needs[settings.topic_unique] = NEEDED_MESSAGE_BYTES
        for topic, needed in needs.items():
            size = int(configs.get(topic, {}).get("max.message.bytes", LARGE_MESSAGE_BYTES))
            if size < needed:
                what = (
                    "a valid event of 1 MiB"
                    if needed == NEEDED_MESSAGE_BYTES
                    else "the pipeline's records (a dead letter is up to 64 KiB)"
                )
                problems.append(
                    f"topic {topic} takes messages of at most {size} bytes, less than {what} "
                    f"needs ({needed}). Run: kafka-configs.sh --alter --entity-type topics "
                    f"--entity-name {topic} --add-config max.message.bytes={LARGE_MESSAGE_BYTES}"
                )
    finally:
        await admin.close()
    return problems


async def _configs(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, dict[str, str]]:
    if not topics:
        return {}
    resources = [ConfigResource(ConfigResourceType.TOPIC, t) for t in topics]
    out: dict[str, dict[str, str]] = {}
    for response in await admin.describe_configs(resources):
        resource: Any
        for resource in response.resources:
            _error, _message, _type, name, entries = resource[:5]
            out[name] = {str(e[0]): str(e[1]) for e in entries}
    return out
