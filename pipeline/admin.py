"""Topic administration with a plain aiokafka admin client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

log = logging.getLogger(__name__)


async def ensure_topics(
    bootstrap: str,
    names: Iterable[str],
    partitions: int,
    replication: int = 1,
    config: dict[str, str] | None = None,
    attempts: int = 30,
) -> None:
    """Create the topics that do not exist yet (idempotent, safe to race)."""
    wanted = list(dict.fromkeys(names))
    for attempt in range(attempts):
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [n for n in wanted if n not in existing]
            if missing:
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics(
                        [
                            NewTopic(n, partitions, replication, topic_configs=config or {})
                            for n in missing
                        ]
                    )
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


async def drop_topics(bootstrap: str, tag: str) -> list[str]:
    """Delete every topic whose name contains ``tag``; the names deleted.

    For runs that name all their topics after one tag (a bench system run, a test):
    inputs, outputs, changelogs and Faust's internal topics. A long-lived broker slows
    down as partitions pile up (a day of test runs left tens of thousands)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    await admin.start()
    try:
        mine = [t for t in await admin.list_topics() if tag in t]
        if mine:
            await admin.delete_topics(mine)
        return mine
    finally:
        await admin.close()
