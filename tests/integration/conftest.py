from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from pipeline.admin import declare_topics, drop_topics
from pipeline.settings import Settings
from pipeline.tools.procs import ROOT, free_ports

from .harness import Worker, broker_url, settings_from, unique_env


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def _broker_is_up() -> None:
    async def probe() -> None:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=broker_url().split("://", 1)[-1], request_timeout_ms=5000
        )
        await admin.start()
        await admin.close()

    try:
        asyncio.run(asyncio.wait_for(probe(), 20))
    except Exception as exc:  # the suite must not silently skip its real-broker half
        pytest.fail(
            f"no Kafka broker at {broker_url()} (start it with scripts/kafka start): {exc!r}"
        )


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = unique_env(tmp_path)
    yield env
    # Torn down last (every fixture of the test depends on this one), so after the
    # workers: drop the test's topics, or a broker kept across runs (scripts/test
    # --repeat) piles up thousands of partitions and slows down.
    bootstrap = broker_url().split("://", 1)[-1]
    try:
        asyncio.run(asyncio.wait_for(drop_topics(bootstrap, env["PIPELINE_APP_ID"]), 30))
    except Exception as exc:  # the broker may be gone (a test that stops it): not a verdict
        print(f"could not drop the test's topics: {exc!r}")


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    s = settings_from(env)
    topics = [s.topic_raw, s.topic_unique, s.topic_dlq]
    asyncio.run(declare_topics(s, topics))
    return s


@pytest.fixture
def make_worker(env: dict[str, str], tmp_path: Path) -> Iterator[object]:
    workers: list[Worker] = []

    def make(name: str = "w0", **extra: str) -> Worker:
        wenv = dict(env)
        wenv["PIPELINE_DATADIR"] = str(tmp_path / name)
        wenv.update(extra)
        w = Worker(wenv, tmp_path / f"{name}.log", name=name)
        workers.append(w)
        return w

    yield make
    for w in workers:
        w.kill9()


@pytest.fixture
def own_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A broker of the test's own (scripts/kafka with its own port and state
    directory), for tests that restart it: the other tests' broker must not go away."""
    # scripts/kafka's proxy listeners sit at port+200+i, advertised at port+300+i.
    port = free_ports(0, 1, *range(200, 208), *range(300, 308))
    controller = port + 1
    env = {
        "KAFKA_PORT": str(port),
        "KAFKA_CONTROLLER_PORT": str(controller),
        "KAFKA_HOME": str(tmp_path / "kafka"),
    }
    # The chaos run restarts "the broker" through scripts/kafka with this environment.
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    script = str(ROOT / "scripts" / "kafka")
    subprocess.run(["bash", script, "start"], check=True, env={**os.environ, **env})
    try:
        yield f"kafka://127.0.0.1:{port}"
    finally:
        subprocess.run(["bash", script, "stop"], check=False, env={**os.environ, **env})
