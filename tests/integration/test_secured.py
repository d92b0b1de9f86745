"""The pipeline on a secured broker (issue 17): SASL_SSL with SCRAM users, mutual TLS,
and least-privilege ACLs (``KAFKA_SECURITY=sasl_ssl scripts/kafka``).

Users, as the broker's start creates them: ``pipeline`` (the workers: what ``scripts/kafka
acl pipeline`` grants, nothing else), ``tools`` (produce, reconcile, topic setup) and
``stranger`` (a valid password, no ACL).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)
from pydantic import SecretStr

from pipeline.admin import EXIT_CONFIG, ensure_topics
from pipeline.connection import KafkaConnection, ssl_context_for
from pipeline.kafka_io import produce
from pipeline.settings import Settings
from pipeline.tools.generate import generate
from pipeline.tools.procs import (
    ROOT,
    Worker,
    free_port,
    namespaced_env,
    settings_from,
    wait_drained,
)
from pipeline.tools.reconcile import reconcile

from .harness import exit_code

pytestmark = pytest.mark.integration

SCRIPT = str(ROOT / "scripts" / "kafka")


@dataclass
class Secured:
    """A secured broker of this module's own."""

    env: dict[str, str]  # the scripts/kafka environment
    port: int
    mtls_port: int
    secrets: Path

    def password(self, user: str) -> str:
        return (self.secrets / f"{user}.password").read_text()

    def sasl(self, user: str, password_file: Path | None = None) -> dict[str, str]:
        """The PIPELINE_KAFKA_* settings of ``user`` over SASL_SSL."""
        return {
            "PIPELINE_BROKER": f"kafka://127.0.0.1:{self.port}",
            "PIPELINE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "PIPELINE_KAFKA_SSL_CAFILE": str(self.secrets / "ca.pem"),
            "PIPELINE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "PIPELINE_KAFKA_SASL_USERNAME": user,
            "PIPELINE_KAFKA_SASL_PASSWORD_FILE": str(
                password_file or self.secrets / f"{user}.password"
            ),
        }

    def mtls(self) -> dict[str, str]:
        """The settings of the ``pipeline`` principal by its client certificate."""
        return {
            "PIPELINE_BROKER": f"kafka://127.0.0.1:{self.mtls_port}",
            "PIPELINE_KAFKA_SECURITY_PROTOCOL": "SSL",
            "PIPELINE_KAFKA_SSL_CAFILE": str(self.secrets / "ca.pem"),
            "PIPELINE_KAFKA_SSL_CERTFILE": str(self.secrets / "pipeline-client.pem"),
            "PIPELINE_KAFKA_SSL_KEYFILE": str(self.secrets / "pipeline-client.key"),
        }

    def connection(self, user: str) -> KafkaConnection:
        return KafkaConnection(
            servers=f"127.0.0.1:{self.port}",
            security_protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_username=user,
            sasl_password=SecretStr(self.password(user)),
            cafile=str(self.secrets / "ca.pem"),
            ssl_context=ssl_context_for(self.secrets / "ca.pem"),
        )

    def grant_pipeline(self, s: Settings) -> None:
        """``scripts/kafka acl pipeline`` for the app of ``s``: its sources, its outputs."""
        sources = f"{s.topic_raw},{s.topic_unique}"
        outputs = [s.topic_unique, s.topic_dlq, s.topic_changes, s.topic_rejected]
        outputs.append(s.topic_coupons)
        run = subprocess.run(
            ["bash", SCRIPT, "acl", "pipeline", s.app_id, sources, *outputs],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert run.returncode == 0, run.stdout + run.stderr


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    home = tmp_path_factory.mktemp("secured") / "kafka"
    port = free_port()
    env = {
        "KAFKA_SECURITY": "sasl_ssl",
        "KAFKA_HOME": str(home),
        "KAFKA_PORT": str(port),
        "KAFKA_CONTROLLER_PORT": str(free_port()),
        "KAFKA_MTLS_PORT": str(free_port()),
    }
    subprocess.run(["bash", SCRIPT, "start"], check=True, env={**os.environ, **env}, timeout=240)
    try:
        yield Secured(env, port, int(env["KAFKA_MTLS_PORT"]), home / "secrets")
    finally:
        subprocess.run(["bash", SCRIPT, "stop"], check=False, env={**os.environ, **env})


@dataclass
class App:
    env: dict[str, str]  # the workers' (user pipeline)
    tools: Settings  # the same app, as user tools
    tmp: Path


@pytest.fixture
async def app(secured: Secured, tmp_path: Path) -> AsyncIterator[App]:
    import uuid

    app_id = f"t-{uuid.uuid4().hex[:10]}"
    base = namespaced_env(
        app_id,
        f"kafka://127.0.0.1:{secured.port}",
        tmp_path / "w0",
        PIPELINE_SESSION_TIMEOUT_S="6",
    )
    tools_env = {**base, **secured.sasl("tools")}
    tools = settings_from(tools_env)
    # The pipeline's user may create only its internal topics (<app>-*): the operator
    # creates the contract's topics, as on a managed cluster (README, "Secured cluster").
    outside = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    run = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "pipeline", "topics"],
        cwd=ROOT,
        env={**outside, **tools_env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    secured.grant_pipeline(tools)
    yield App({**base, **secured.sasl("pipeline")}, tools, tmp_path)


def _worker(app: App, name: str, **extra: str) -> Worker:
    """A worker of the app; ``extra`` replaces its connection settings when it names
    another way in (mutual TLS has no SASL settings)."""
    env = {**app.env, "PIPELINE_DATADIR": str(app.tmp / name)}
    if "PIPELINE_KAFKA_SECURITY_PROTOCOL" in extra:
        env = {k: v for k, v in env.items() if not k.startswith("PIPELINE_KAFKA_")}
    return Worker({**env, **extra}, app.tmp / f"{name}.log", name=name)


def _get(worker: Worker, path: str) -> str:
    url = f"http://{worker.web_address}:{worker.web_port}{path}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


@pytest.mark.slow
async def test_the_dedup_chain_stays_exactly_once_through_kill9_on_a_secured_cluster(
    secured: Secured, app: App
) -> None:
    """Two workers as the pipeline's principal, one by SCRAM over SASL_SSL and one by
    its client certificate (mutual TLS); each is killed -9 mid-stream and restarted."""
    a = _worker(app, "a")
    b = _worker(app, "b", **secured.mtls())
    tools = app.tools
    workers = [a, b]
    try:
        a.start()
        b.start()
        sent = 0
        for round_, victim in enumerate((a, b, a)):
            records = list(generate(1500, seed=17 + round_, dup_rate=0.3, bad_rate=0.01,
                                    prefix=f"r{round_}"))  # fmt: skip
            feed = asyncio.create_task(produce(tools.kafka, tools.topic_raw, records, rate=1500))
            await victim.wait_seen(1, timeout=120)
            await asyncio.sleep(0.5)
            victim.kill9()
            victim.start()
            sent += await feed
        await wait_drained(tools, workers, timeout=240)
        stats, metrics = _get(a, "/stats"), _get(a, "/metrics")
    finally:
        for w in workers:
            w.stop()
    report = await reconcile(tools)
    assert report.input_records == sent
    assert report.ok, report.render()
    assert report.duplicates == 0 and report.losses == 0
    # Each worker processed input as the pipeline's principal (wait_seen above), a by
    # SCRAM, b by its certificate; none of it leaked a secret.
    logs = a.log_path.read_text() + b.log_path.read_text()
    assert "Authenticated as pipeline via SCRAM-SHA-512" in a.log_path.read_text()
    for user in ("pipeline", "tools", "admin"):
        secret = secured.password(user)
        for name, text in (("logs", logs), ("/stats", stats), ("/metrics", metrics)):
            assert secret not in text, f"{user}'s password in {name}"


async def test_a_stranger_can_neither_write_outputs_nor_read_state_nor_take_a_transactional_id(
    secured: Secured, app: App
) -> None:
    s = app.tools
    stranger, pipeline = secured.connection("stranger"), secured.connection("pipeline")
    changelog = f"{s.app_id}-users.balances-changelog"

    async def write(conn: KafkaConnection, topic: str) -> None:
        producer = AIOKafkaProducer(**conn.kwargs(), request_timeout_ms=15000)
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"forged", key=b"o-1")
        finally:
            await producer.stop()

    async def read(conn: KafkaConnection, topic: str, group: str | None = None) -> int:
        consumer = AIOKafkaConsumer(
            topic, **conn.kwargs(), group_id=group, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            got = 0
            for _ in range(20):
                batches = await consumer.getmany(timeout_ms=1000)
                got += sum(len(b) for b in batches.values())
                if got:
                    break
            return got
        finally:
            await consumer.stop()

    # The balances changelog as a worker leaves it: it exists and holds a row.
    await ensure_topics(s.kafka, [changelog], s.partitions)
    await write(secured.connection("tools"), changelog)

    async def take(conn: KafkaConnection, tid: str) -> None:
        producer = AIOKafkaProducer(**conn.kwargs(), transactional_id=tid)
        try:
            await producer.start()
        finally:
            await producer.stop()

    with pytest.raises(TopicAuthorizationFailedError):
        await write(stranger, s.topic_unique)
    with pytest.raises((TopicAuthorizationFailedError, GroupAuthorizationFailedError)):
        await read(stranger, changelog)
    with pytest.raises(TransactionalIdAuthorizationFailed):
        await take(stranger, f"{s.app_id}-{s.topic_raw}-0")
    # The same calls as the pipeline's principal go through: the refusals are the ACLs'.
    await write(pipeline, s.topic_unique)
    assert await read(pipeline, changelog, group=s.app_id) == 1
    await take(pipeline, f"{s.app_id}-probe-0")
    # And the pipeline's principal may not write the input, nor take another app's ids.
    with pytest.raises(TopicAuthorizationFailedError):
        await write(pipeline, s.topic_raw)
    with pytest.raises(TransactionalIdAuthorizationFailed):
        await take(pipeline, "another-app-orders.raw-0")


async def test_a_wrong_password_ends_a_worker_and_a_tool_at_once_with_one_line(
    secured: Secured, app: App
) -> None:
    wrong = app.tmp / "wrong.password"
    wrong.write_text("not-the-password")
    worker = _worker(app, "w", **secured.sasl("pipeline", password_file=wrong))
    assert await exit_code(worker) == EXIT_CONFIG, worker.log_tail()
    line = "kafka: authentication failed for user 'pipeline' (SCRAM-SHA-512)"
    assert line in worker.log_tail()
    assert worker.log_path.read_text().count("authentication failed") <= 2  # no retry storm
    outside = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env = {**outside, **app.env, **secured.sasl("tools", password_file=wrong)}
    started = time.monotonic()
    run = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "pipeline", "reconcile"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - started
    assert run.returncode == EXIT_CONFIG, run.stdout + run.stderr
    errors = [ln for ln in run.stderr.splitlines() if "kafka:" in ln]
    assert len(errors) == 1 and "authentication failed for user 'tools'" in errors[0], run.stderr
    assert "Traceback" not in run.stderr
    print(f"reconcile with a wrong password ended in {took:.1f} s")


async def test_an_untrusted_broker_certificate_ends_a_worker_with_one_line(
    secured: Secured, app: App
) -> None:
    # A CA that did not sign the broker's certificate: a man in the middle, to the client.
    untrusted = {"PIPELINE_KAFKA_SSL_CAFILE": str(secured.secrets / "untrusted-ca.pem")}
    worker = _worker(app, "w", **{**secured.sasl("pipeline"), **untrusted})
    assert await exit_code(worker) == EXIT_CONFIG, worker.log_tail()
    assert "TLS handshake with" in worker.log_tail() and "certificate verify failed" in (
        worker.log_tail()
    )
    assert secured.password("pipeline") not in worker.log_path.read_text()
