"""Test helpers around :mod:`pipeline.tools.procs`: per-test topics, group and data dirs."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import Any

from pipeline.kafka_io import produce
from pipeline.settings import Settings
from pipeline.tools.generate import generate
from pipeline.tools.procs import Worker, namespaced_env, progress, settings_from, wait_drained

__all__ = [
    "Worker",
    "broker_url",
    "feed",
    "progress",
    "settings_from",
    "settled_owners",
    "unique_env",
    "wait_drained",
]


async def feed(settings: Settings, count: int, **generate_args: Any) -> int:
    """Produce ``count`` generated records to the test's input topic; returns the count."""
    return await produce(
        settings.bootstrap_servers, settings.topic_raw, generate(count, **generate_args)
    )


def broker_url() -> str:
    return os.environ.get("PIPELINE_BROKER", "kafka://127.0.0.1:9092")


def unique_env(tmp: Path, **extra: str) -> dict[str, str]:
    """PIPELINE_* variables for one test: its own topics, group and data directory."""
    # The broker's minimum session timeout: a kill -9'd worker's partitions move on quickly.
    extra = {"PIPELINE_SESSION_TIMEOUT_S": "6", **extra}
    return namespaced_env(f"t-{uuid.uuid4().hex[:10]}", broker_url(), tmp / "w0", **extra)


async def settled_owners(
    workers: list[Worker], topic: str, partitions: int, timeout: float
) -> dict[str, set[int]]:
    """Each worker's partitions of ``topic``, once none is rebalancing, each owns some,
    and together they own every partition once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    owners: dict[str, set[int]] = {}
    while loop.time() < deadline:
        stats = [await asyncio.to_thread(w.stats) for w in workers]
        if all(st is not None and not st.get("rebalancing") for st in stats):
            owners = {
                w.name: set(st.get("partitions", {}).get(topic, []))  # type: ignore[union-attr]
                for w, st in zip(workers, stats, strict=True)
            }
            parts = sorted(p for ps in owners.values() for p in ps)
            if all(owners.values()) and parts == list(range(partitions)):
                return owners
        await asyncio.sleep(0.2)
    raise AssertionError(f"the workers did not settle in {timeout}s: {owners}")


async def exit_code(worker: Worker, timeout: float = 120) -> int | None:
    """Start ``worker`` and wait for it to end by itself (a refusal at start); its exit
    status, or None if it still ran after ``timeout`` (then it is stopped)."""
    worker.start()
    try:
        return await asyncio.to_thread(worker.wait_exit, timeout)
    finally:
        worker.stop()
