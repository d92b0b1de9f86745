"""Worker processes for ``bench``, ``chaos``, the demo and the tests: start, kill -9, wait."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.kafka_io import committed_offsets, end_offsets, record_ends
from pipeline.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(*offsets: int) -> int:
    """A port P with P + each offset free too (a broker and the fault proxies' listeners
    at fixed distances from it), free when asked, as free_port's answer is.

    Below the kernel's ephemeral range: a broker restarted on a port of that range can
    find it taken by a client socket's local end, and a client that connects to such a
    port while nothing listens can be given it as its own local port and connect to
    itself (a proxy retrying its upstream while the broker is down did, in a chaos run);
    either way the broker cannot bind it again."""
    low = _ephemeral_low()
    top = max(low - 1 - max(offsets, default=0), 10_001)
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(10_000, top)
        socks = []
        try:
            for off in offsets:
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + off))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return base
    raise RuntimeError(f"no free port with {offsets} free beside it")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def settings_from(env: dict[str, str]) -> Settings:
    keys = {k[len("PIPELINE_") :].lower(): v for k, v in env.items() if k.startswith("PIPELINE_")}
    return Settings(**keys)  # type: ignore[arg-type]


def namespaced_env(app_id: str, broker: str, datadir: Path, **extra: str) -> dict[str, str]:
    """PIPELINE_* variables for a run of its own: every topic, the group and the tables
    carry ``app_id``, so tests and chaos runs never touch each other's (or a user's) data."""
    env = {
        "PIPELINE_BROKER": broker,
        "PIPELINE_APP_ID": app_id,
        "PIPELINE_TOPIC_RAW": f"{app_id}.orders.raw",
        "PIPELINE_TOPIC_UNIQUE": f"{app_id}.orders.unique",
        "PIPELINE_TOPIC_DLQ": f"{app_id}.orders.dlq",
        "PIPELINE_TOPIC_CHANGES": f"{app_id}.orders.changes",
        "PIPELINE_TOPIC_REJECTED": f"{app_id}.orders.rejected",
        "PIPELINE_TOPIC_COUPONS": f"{app_id}.coupons.issued",
        "PIPELINE_DATADIR": str(datadir),
    }
    env.update(extra)
    return env


@dataclass
class Worker:
    """One ``faust -A <app> worker`` process (the order pipeline's ``pipeline.app`` unless
    another module is named) with its own env and log file."""

    env: dict[str, str]
    log_path: Path
    name: str = "w0"
    app: str = "pipeline.app"
    web_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self, **extra: str) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
        env.update(self.env)
        env.update(extra)
        env["PIPELINE_WEB_PORT"] = str(self.web_port)
        self.starts += 1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start #{self.starts} {extra} ===\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "faust",
                    "-A",
                    self.app,
                    "worker",
                    "-l",
                    "info",
                    "--web-port",
                    str(self.web_port),
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill9()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    @property
    def web_address(self) -> str:
        """Where this worker's web server answers: its bind address, or loopback when it
        binds every interface."""
        host = self.env.get("PIPELINE_WEB_HOST", "127.0.0.1")
        return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host

    def stats(self) -> dict[str, object] | None:
        """The worker's ``/stats``, or ``None`` while it does not answer."""
        import json
        import urllib.request

        request = urllib.request.Request(f"http://{self.web_address}:{self.web_port}/stats")
        token = self.env.get("PIPELINE_WEB_TOKEN")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=2) as resp:
                data: dict[str, object] = json.loads(resp.read())
                return data
        except (OSError, ValueError):
            return None

    async def wait_seen(self, n: int, timeout: float) -> None:
        """Wait until this incarnation has handled at least ``n`` records."""
        deadline = time.monotonic() + timeout
        while True:
            st = await asyncio.to_thread(self.stats)
            if st is not None and int(st.get("seen", 0)) >= n:  # type: ignore[call-overload]
                return
            if not self.alive:
                raise AssertionError(f"{self.name} exited:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} handled < {n} records in {timeout}s")
            await asyncio.sleep(0.2)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""


async def progress(settings: Settings) -> tuple[int, int]:
    """(committed, end) summed over the input partitions of the app's consumer group."""
    kafka = settings.kafka
    ends = await end_offsets(kafka, settings.topic_raw)
    committed = await committed_offsets(kafka, settings.app_id, settings.topic_raw)
    done = sum(min(committed.get(p) or 0, end) for p, end in ends.items())
    return done, sum(ends.values())


async def drained(settings: Settings, stages: str = "all") -> tuple[int, int]:
    """(committed, to do) summed over every stage's input: raw, the rekeyed input, unique
    and the deltas (``stages="dedup"``: the first two only, see ``PIPELINE_STAGES``).

    "To do" ends at each partition's last committed record, not its end offset: on the
    transactional topics between stages the end offset lies past a commit marker.
    """
    topics = [settings.topic_raw, settings.by_order_topic]
    if stages == "all":
        topics += [settings.topic_unique, settings.deltas_topic]
    return await drained_topics(settings, topics)


async def drained_topics(settings: Settings, topics: list[str]) -> tuple[int, int]:
    """(committed, to do) of the app's consumer group summed over ``topics`` (to do ends
    at each partition's last committed record, as in :func:`drained`)."""
    done = total = 0
    kafka = settings.kafka
    for topic in topics:
        ends = await record_ends(kafka, topic)
        committed = await committed_offsets(kafka, settings.app_id, topic)
        done += sum(min(committed.get(p) or 0, end) for p, end in ends.items())
        total += sum(ends.values())
    return done, total


async def wait_drained(
    settings: Settings,
    workers: list[Worker],
    timeout: float,
    poll: float = 0.5,
    topics: list[str] | None = None,
) -> None:
    """Wait until every stage committed all its input (of ``topics``, if given: the
    source topics of a pipeline of :mod:`pipeline.api`); fail early if all workers died."""
    deadline = time.monotonic() + timeout
    while True:
        if topics is None:
            done, total = await drained(settings)
        else:
            done, total = await drained_topics(settings, topics)
        if total and done >= total:
            return
        if not any(w.alive for w in workers):
            tails = "\n".join(f"--- {w.name}\n{w.log_tail()}" for w in workers)
            raise AssertionError(f"all workers exited at {done}/{total}\n{tails}")
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {w.name}\n{w.log_tail()}" for w in workers)
            raise AssertionError(f"not drained in {timeout}s: {done}/{total}\n{tails}")
        await asyncio.sleep(poll)
