"""``python -m pipeline bench``: what exactly-once costs, and how we compare, in one run.

Every system gets the same pre-produced workload (same count, seed, duplicate and
bad-input rates, ``--partitions``, 8 by default) in topics of its own on the same local
broker, one system after another, each in an OS process of its own so that its CPU and
peak RSS are its own. The systems: the raw aiokafka transactional loop
(``pipeline.tools.bench_raw``), our dedup stage alone and the full chain, each in
``at_least_once`` and ``exactly_once`` (a ``faust`` worker), Quix Streams exactly-once
(``pipeline.tools.bench_quix``, if installed), and Kafka's own producer and consumer perf
tools.

Throughput: the clock starts when the system handles its first record (so start-up and
recovery are not counted) and stops when its consumer group has committed every input
record (every stage's input, for the full chain); CPU is the process's CPU over the same
interval, from ``/proc``. Start to first commit: from the process's start until its
consumer group has committed an input offset (polled every 0.2 s), which takes in the
group join, the recovery and, for ours, a transactional producer per partition.
Latency: after the backlog, a paced trickle of new events is produced while a
``read_committed`` reader in this process notes when each event's output becomes
visible; the latency is that minus the send time (one clock, this process's). Ratios are
taken between systems of the same invocation only.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from pipeline.admin import LARGE_CONFIG, RAW_CONFIG, drop_topics, ensure_topics
from pipeline.connection import KafkaConnection, security_env
from pipeline.factory import MAX_POLL_RECORDS
from pipeline.kafka_io import committed_offsets, partitions_of, produce
from pipeline.settings import Settings
from pipeline.tools.bench_stats import Run, percentile, render_ratios, render_table
from pipeline.tools.generate import generate
from pipeline.tools.procs import ROOT, Worker, drained, namespaced_env, progress, settings_from

TICKS = os.sysconf("SC_CLK_TCK")
RAW = "raw aiokafka tx loop"
QUIX = "Quix Streams 3.28, exactly-once"
DEDUP = "our dedup stage, {}"
FULL = "our full chain, {}"
KPROD = "kafka ProducerPerformance"
KCONS = "kafka ConsumerPerformance"
#: ``bench --only`` names -> the systems they select
SYSTEM_KEYS = {
    "raw": RAW,
    "dedup-alo": DEDUP.format("at_least_once"),
    "dedup-eos": DEDUP.format("exactly_once"),
    "full-alo": FULL.format("at_least_once"),
    "full-eos": FULL.format("exactly_once"),
    "quix": QUIX,
    "kafka": "kafka",
}


def selected(only: str | None) -> set[str] | None:
    """The system names ``--only a,b`` selects (None: all); unknown keys are an error."""
    if not only:
        return None
    keys = [k.strip() for k in only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in SYSTEM_KEYS]
    if unknown:
        raise SystemExit(f"bench --only: unknown {unknown}; choose from {sorted(SYSTEM_KEYS)}")
    return {SYSTEM_KEYS[k] for k in keys}


#: (a, b) pairs whose throughput ratio is printed
PAIRS = (
    (DEDUP.format("exactly_once"), DEDUP.format("at_least_once")),
    (DEDUP.format("exactly_once"), RAW),
    (DEDUP.format("exactly_once"), QUIX),
    (FULL.format("exactly_once"), FULL.format("at_least_once")),
    (RAW, KCONS),
)


def label(system: str, partitions: int, counts: Sequence[int]) -> str:
    """A system's name in the results: with its partition count when several are run."""
    return system if len(counts) == 1 else f"{system}, {partitions} partitions"


def ratio_pairs(counts: Sequence[int]) -> list[tuple[str, str]]:
    """The pairs whose throughput ratio is printed: :data:`PAIRS` at each partition
    count, and each system at every other count against itself at the first."""
    pairs = [(label(a, n, counts), label(b, n, counts)) for n in counts for a, b in PAIRS]
    systems = dict.fromkeys(name for pair in PAIRS for name in pair)
    pairs += [
        (label(system, n, counts), label(system, counts[0], counts))
        for n in counts[1:]
        for system in systems
    ]
    return pairs


@dataclass(frozen=True)
class Plan:
    count: int
    runs: int
    commit_ms: int
    #: the latency trickle: events per second and seconds
    lat_rate: float
    lat_seconds: float
    quix_python: str | None
    workdir: Path
    partitions: int = 8


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _broker_pid() -> int | None:
    """The local broker's process, if this machine runs it (``scripts/kafka`` writes its
    pid file); ``PIPELINE_BENCH_BROKER_PID`` names another. None for a remote broker."""
    named = os.environ.get("PIPELINE_BENCH_BROKER_PID")
    if named:
        pid = int(named)
    else:
        home = Path(os.environ.get("KAFKA_HOME", "/tmp/pipeline-kafka"))
        try:
            pid = int((home / "broker.pid").read_text().strip())
        except (OSError, ValueError):
            return None
    try:
        # A stale pid file may name some other process by now.
        if b"kafka" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return None
    except OSError:
        return None
    return pid


class _BrokerCpu:
    """The broker's CPU seconds over an interval, or None where it cannot be read."""

    def __init__(self) -> None:
        self.pid = _broker_pid()
        self.start = self._now()

    def _now(self) -> float | None:
        if self.pid is None:
            return None
        try:
            return _cpu_seconds(self.pid)
        except OSError:
            return None

    def per_100k(self, events: int) -> float | None:
        end = self._now()
        if self.start is None or end is None or events <= 0:
            return None
        return round((end - self.start) / events * 100_000, 2)


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _workload(
    kafka: KafkaConnection, topics: list[str], raw: str, count: int, partitions: int = 8
) -> None:
    # The input as the pipeline declares it (append time, room for 1 MiB values), so
    # that every system reads the same topic as our workers need it.
    n = partitions
    await ensure_topics(kafka, [raw], n, config=RAW_CONFIG)
    await ensure_topics(kafka, [t for t in topics if t != raw], n, config=LARGE_CONFIG)
    await produce(
        kafka,
        raw,
        generate(count, seed=42, dup_rate=0.3, bad_rate=0.01, illegal_rate=0.05),
    )


async def _first_commit(settings: Settings, since: float) -> float:
    """Seconds from ``since`` (monotonic) until the app's group committed an input offset."""
    kafka = settings.kafka
    while True:
        committed = await committed_offsets(kafka, settings.app_id, settings.topic_raw)
        if any(committed.values()):
            return round(time.monotonic() - since, 2)
        await asyncio.sleep(0.2)


async def _stop_task(task: asyncio.Task[float]) -> float | None:
    if not task.done():
        task.cancel()
    try:
        return await task
    except (asyncio.CancelledError, Exception):
        return None


async def latency(
    kafka: KafkaConnection, source: str, output: str, plan: Plan, tag: str
) -> tuple[float | None, float | None, int]:
    """(p50 ms, p99 ms, events matched) of a paced trickle, ``source`` -> ``output``."""
    reader = AIOKafkaConsumer(
        **kafka.kwargs(),
        isolation_level="read_committed",
        enable_auto_commit=False,
        group_id=None,
    )
    await reader.start()
    producer = AIOKafkaProducer(**kafka.kwargs(), enable_idempotence=True, acks="all", linger_ms=5)
    await producer.start()
    sent: dict[str, float] = {}
    arrived: dict[str, float] = {}
    try:
        tps = [TopicPartition(output, p) for p in sorted(await partitions_of(reader, output))]
        reader.assign(tps)
        await reader.seek_to_end(*tps)
        for tp in tps:
            await reader.position(tp)
        done = asyncio.Event()

        async def read() -> None:
            while not done.is_set():
                batch = await reader.getmany(timeout_ms=50)
                now = time.time()
                for msgs in batch.values():
                    for m in msgs:
                        try:
                            eid = orjson.loads(m.value or b"").get("event_id")
                        except (orjson.JSONDecodeError, AttributeError):
                            continue
                        if eid in sent and eid not in arrived:
                            arrived[eid] = now

        task = asyncio.create_task(read())
        n = int(plan.lat_rate * plan.lat_seconds)
        t0 = time.monotonic()
        # New event ids (prefix), no copies, no bad or illegal input: every event is
        # forwarded by dedup, and most make a transition in the full chain.
        for i, rec in enumerate(
            generate(n, seed=7, dup_rate=0, bad_rate=0, prefix=f"lat{tag}-", illegal_rate=0)
        ):
            sent[orjson.loads(rec.value)["event_id"]] = time.time()
            await producer.send(source, rec.value, key=rec.key)
            ahead = (i + 1) / plan.lat_rate - (time.monotonic() - t0)
            if ahead > 0:
                await asyncio.sleep(ahead)
        await producer.flush()
        # Outputs of the last events: wait until all came or nothing new for a while.
        quiet_since, last = time.monotonic(), -1
        while len(arrived) < len(sent) and time.monotonic() - quiet_since < 5:
            if len(arrived) != last:
                quiet_since, last = time.monotonic(), len(arrived)
            await asyncio.sleep(0.1)
        done.set()
        await task
    finally:
        await producer.stop()
        await reader.stop()
    lat = [(arrived[e] - sent[e]) * 1000 for e in arrived]
    if not lat:
        return None, None, 0
    return round(percentile(lat, 50), 1), round(percentile(lat, 99), 1), len(lat)


async def run_chain(guarantee: str, stages: str, settings: Settings, plan: Plan) -> Run:
    tag = uuid.uuid4().hex[:8]
    app_id = f"bench-{tag}"
    env = namespaced_env(
        app_id,
        settings.broker,
        plan.workdir / tag,
        PIPELINE_PROCESSING_GUARANTEE=guarantee,
        PIPELINE_PARTITIONS=str(plan.partitions),
        PIPELINE_COMMIT_INTERVAL_S=str(plan.commit_ms / 1000),
        # Workers get no PIPELINE_* variable from the runner's environment but these.
        PIPELINE_COMMIT_QUIET_S=str(settings.commit_quiet_s),
        PIPELINE_STAGES=stages,
        # ... and how to reach the broker (TLS, SASL).
        **security_env(settings),
    )
    s = settings_from(env)
    kafka = s.kafka
    await _workload(
        kafka,
        [s.topic_raw, s.topic_unique, s.topic_dlq],
        s.topic_raw,
        plan.count,
        plan.partitions,
    )
    name = (FULL if stages == "all" else DEDUP).format(guarantee)
    worker = Worker(env, plan.workdir / f"{tag}.log", name=name)
    started = time.monotonic()
    worker.start()
    first_commit = asyncio.create_task(_first_commit(s, started))
    try:
        await worker.wait_seen(1, timeout=180)
        assert worker.proc is not None
        pid = worker.proc.pid
        t0 = time.monotonic()
        cpu0 = _cpu_seconds(pid)
        broker = _BrokerCpu()
        seen0 = int((worker.stats() or {}).get("seen", 0))  # type: ignore[call-overload]
        while True:
            # The dedup stage alone commits only orders.raw; the full chain every stage.
            done, total = await drained(s, stages)
            if total and done >= total:
                break
            if not worker.alive:
                raise RuntimeError(f"{name} worker died:\n{worker.log_tail()}")
            await asyncio.sleep(0.1)
        seconds = time.monotonic() - t0
        cpu = _cpu_seconds(pid) - cpu0
        if plan.count - seen0 <= 0:
            # All of the backlog went by before the first reading: nothing to time.
            raise RuntimeError(
                f"{name} handled all {plan.count} events before the clock started; "
                "use a larger --count"
            )
        broker_cpu = broker.per_100k(plan.count - seen0)
        out = s.topic_changes if stages == "all" else s.topic_unique
        p50, p99, matched = await latency(kafka, s.topic_raw, out, plan, tag)
        rss = _peak_rss_mb(pid)
    finally:
        to_first_commit = await _stop_task(first_commit)
        worker.stop()
        await drop_topics(kafka, tag)
    handled = plan.count - seen0
    return Run(
        system=name,
        events=handled,
        seconds=round(seconds, 2),
        events_per_s=round(handled / seconds, 1),
        p50_ms=p50,
        p99_ms=p99,
        cpu_s_per_100k=round(cpu / handled * 100_000, 2),
        broker_cpu_s_per_100k=broker_cpu,
        peak_rss_mb=round(rss, 1),
        first_commit_s=to_first_commit,
        config={
            "commit_interval_ms": plan.commit_ms,
            "commit_quiet_ms": round(settings.commit_quiet_s * 1000, 1),
            "stages": stages,
            "latency_events_matched": matched,
            "batches": f"at most {MAX_POLL_RECORDS} records per poll; at_least_once: "
            "Faust's streams (buffer 4096) and producer, linger 5 ms, max_batch 16 kB; "
            "exactly_once: each fetched batch straight to its stage, one transactional "
            "producer per source partition, linger = the commit interval, max_batch "
            "256 kB, flushed at each commit (pipeline/eos/faust/producer.py)",
        },
    )


async def run_process(system: str, plan: Plan, settings: Settings) -> Run:
    """The raw loop or Quix: a child process that reports its first record on stdout."""
    tag = uuid.uuid4().hex[:8]
    group = f"bench-{tag}"
    raw, unique, dlq = f"{group}.orders.raw", f"{group}.orders.unique", f"{group}.orders.dlq"
    kafka = settings.kafka
    await _workload(kafka, [raw, unique, dlq], raw, plan.count, plan.partitions)
    common = ["--bootstrap", kafka.servers, "--input", raw, "--unique", unique, "--dlq", dlq]
    common += ["--group", group, "--commit-ms", str(plan.commit_ms)]
    env = _child_env(settings)
    if system == RAW:
        cmd = [
            sys.executable,
            "-m",
            "pipeline.tools.bench_raw",
            *common,
            "--expect",
            str(plan.count),
        ]
        config: dict[str, object] = {
            "commit_interval_ms": plan.commit_ms,
            "batches": "getmany max_records 500, producer linger 5 ms, max_batch 256 kB; "
            "one transactional producer",
        }
    else:
        assert plan.quix_python
        state = plan.workdir / tag
        cmd = [
            plan.quix_python,
            "-m",
            "pipeline.tools.bench_quix",
            *common,
            "--state-dir",
            str(state),
        ]
        config = {
            "commit_interval_ms": plan.commit_ms,
            "batches": "Quix defaults (librdkafka), producer linger 5 ms",
        }
    log = plan.workdir / f"{tag}.log"
    started = time.monotonic()
    proc = _spawn(cmd, env, log)
    s = settings.model_copy(update={"app_id": group, "topic_raw": raw})
    first_commit = asyncio.create_task(_first_commit(s, started))
    try:
        assert proc.stdout is not None
        first = await asyncio.wait_for(_first_line(proc.stdout), timeout=180)
        if first is None:
            raise RuntimeError(f"{system} exited: {log.read_text(errors='replace')[-3000:]}")
        broker = _BrokerCpu()
        if system == RAW:
            # The loop says when it committed its last input record itself.
            last = await asyncio.wait_for(_first_line(proc.stdout, "drained"), timeout=600)
            if last is None:
                raise RuntimeError(f"{system} exited: {log.read_text(errors='replace')[-3000:]}")
            end, cpu_end = last["drained"], last["cpu"]
        else:
            while True:
                done, total = await progress(s)
                if total and done >= total:
                    break
                if proc.poll() is not None:
                    text = log.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{system} died: {text}")
                await asyncio.sleep(0.1)
            end, cpu_end = time.monotonic(), _cpu_seconds(proc.pid)
        seconds = end - first["first"]
        cpu = cpu_end - first["cpu"]
        broker_cpu = broker.per_100k(plan.count)
        p50, p99, matched = await latency(kafka, raw, unique, plan, tag)
        rss = _peak_rss_mb(proc.pid)
    finally:
        to_first_commit = await _stop_task(first_commit)
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        await drop_topics(kafka, tag)
    config["latency_events_matched"] = matched
    return Run(
        system=system,
        events=plan.count,
        seconds=round(seconds, 2),
        events_per_s=round(plan.count / seconds, 1),
        p50_ms=p50,
        p99_ms=p99,
        cpu_s_per_100k=round(cpu / plan.count * 100_000, 2),
        broker_cpu_s_per_100k=broker_cpu,
        peak_rss_mb=round(rss, 1),
        first_commit_s=to_first_commit,
        config=config,
    )


def _child_env(settings: Settings) -> dict[str, str]:
    """The environment of the raw loop and the Quix peer: how to reach the broker as
    ``settings`` says, as PIPELINE_KAFKA_* (the raw loop reads them) and as librdkafka's
    configuration in ``PIPELINE_BENCH_KAFKA_CONFIG`` (the Quix peer, which may run on an
    interpreter without the pipeline's dependencies). The environment, not the command
    line: other users can read a command line, not another user's environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_KAFKA_")}
    env.update(security_env(settings), PYTHONPATH=str(ROOT))
    env["PIPELINE_BENCH_KAFKA_CONFIG"] = json.dumps(settings.kafka.librdkafka_config())
    return env


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as err:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, start_new_session=True
        )


async def _first_line(stream: IO[bytes], field: str = "first") -> dict[str, float] | None:
    while True:
        line = await asyncio.to_thread(stream.readline)
        if not line:
            return None
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and field in data:
            return data


async def run_kafka_tools(plan: Plan, settings: Settings) -> list[Run]:
    kafka = settings.kafka
    tag = uuid.uuid4().hex[:8]
    topic = f"bench-{tag}.perf"
    await ensure_topics(kafka, [topic], plan.partitions)
    # TLS and SASL for the Java tools: a properties file only this user can read (it
    # holds the password), removed at the end.
    security = kafka.java_properties()
    config = None
    if security:
        fd, name = tempfile.mkstemp(prefix=f"bench-{tag}-", suffix=".properties")
        with os.fdopen(fd, "w") as f:
            f.write(security)
        config = Path(name)
    try:
        return await _kafka_tools(plan, kafka, topic, config)
    finally:
        if config is not None:
            config.unlink(missing_ok=True)
        await drop_topics(kafka, tag)


async def _kafka_tools(
    plan: Plan, kafka: KafkaConnection, topic: str, config: Path | None = None
) -> list[Run]:
    security = ["--command-config", str(config)] if config is not None else []
    props = [f"bootstrap.servers={kafka.servers}", "acks=all", "linger.ms=5", "batch.size=262144"]
    pargs = ["--topic", topic, "--num-records", str(plan.count), "--record-size", "200"]
    pargs += [*security, "--throughput", "-1", "--producer-props", *props]
    out, cpu, rss = await asyncio.to_thread(_measured, "ProducerPerformance", pargs)
    m = re.search(
        r"(\d+) records sent, ([\d.]+) records/sec.*?(\d+) ms 50th, \d+ ms 95th, (\d+) ms 99th",
        out,
    )
    if not m:
        raise RuntimeError(f"ProducerPerformance: unexpected output:\n{out[-2000:]}")
    eps = float(m.group(2))
    runs = [
        Run(
            system=KPROD,
            events=int(m.group(1)),
            seconds=round(int(m.group(1)) / eps, 2),
            events_per_s=round(eps, 1),
            p50_ms=float(m.group(3)),
            p99_ms=float(m.group(4)),
            cpu_s_per_100k=round(cpu / plan.count * 100_000, 2),
            peak_rss_mb=round(rss, 1),
            config={"props": " ".join(props[1:]), "record_bytes": 200},
            note="latency is send to ack (acks=all), not end to end; CPU includes JVM start",
        )
    ]
    cargs = ["--bootstrap-server", kafka.servers, "--topic", topic]
    cargs += ["--num-records", str(plan.count), *security]
    out, cpu, rss = await asyncio.to_thread(_measured, "ConsumerPerformance", cargs)
    lines = [ln for ln in out.splitlines() if ln.startswith("start.time") or ln[:2] == "20"]
    if len(lines) < 2:
        raise RuntimeError(f"ConsumerPerformance: unexpected output:\n{out[-2000:]}")
    row = dict(
        zip(
            (c.strip() for c in lines[0].split(",")),
            (v.strip() for v in lines[1].split(",")),
            strict=False,
        )
    )
    # fetch.nMsg.sec leaves out the consumer group join (seconds on this broker), as the
    # other systems' clocks start at their first record; nMsg.sec is kept in the config.
    eps = float(row["fetch.nMsg.sec"])
    n = int(float(row["data.consumed.in.nMsg"]))
    runs.append(
        Run(
            system=KCONS,
            events=n,
            seconds=round(n / eps, 2),
            events_per_s=round(eps, 1),
            cpu_s_per_100k=round(cpu / plan.count * 100_000, 2),
            peak_rss_mb=round(rss, 1),
            config={"nMsg_per_s_with_group_join": float(row["nMsg.sec"])},
            note="read_uncommitted, no processing; CPU includes JVM start",
        )
    )
    return runs


def _measured(tool: str, args: list[str]) -> tuple[str, float, float]:
    proc = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "kafka"), "bin", f"org.apache.kafka.tools.{tool}", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    out = proc.stdout.read().decode(errors="replace")
    # wait4 gives this child's rusage, which includes the JVM it waited for: CPU and the
    # largest resident set among them.
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    return out, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def _quix_python() -> str | None:
    explicit = os.environ.get("PIPELINE_BENCH_QUIX_PYTHON")
    if explicit:
        return explicit
    if importlib.util.find_spec("quixstreams") is not None:
        return sys.executable
    return None


def main(args: argparse.Namespace, settings: Settings) -> int:
    if getattr(args, "recovery", False):
        from pipeline.tools.bench_recovery import main as recovery

        return recovery(args, settings)
    quick = bool(args.quick)
    count = 5_000 if quick else args.count
    runs = 1 if quick else args.runs
    only = selected(getattr(args, "only", None))
    quix = _quix_python()
    results: dict[str, list[Run]] = {}
    skipped: list[str] = []
    if quix is None:
        skipped.append(
            f"{QUIX}: not installed (pip install -e '.[bench]', or point "
            "PIPELINE_BENCH_QUIX_PYTHON at an interpreter that has it)"
        )
    started = time.time()
    load0 = os.getloadavg()

    counts: list[int] = list(args.partitions)

    def labelled(system: str, partitions: int) -> str:
        return label(system, partitions, counts)

    async def go(workdir: Path) -> None:
        base = Plan(
            count=count,
            runs=runs,
            commit_ms=round(settings.commit_interval_s * 1000),
            # Below every system's throughput here, so that latency is not queueing.
            lat_rate=100.0,
            lat_seconds=3.0 if quick else 10.0,
            quix_python=quix,
            workdir=workdir,
        )
        for i, partitions in ((i, p) for i in range(runs) for p in counts):
            plan = replace(base, partitions=partitions)
            jobs: list[tuple[str, object]] = [
                (RAW, lambda plan=plan: run_process(RAW, plan, settings)),
                *(
                    (
                        (FULL if st == "all" else DEDUP).format(g),
                        lambda g=g, st=st, plan=plan: run_chain(g, st, settings, plan),
                    )
                    for st in ("dedup", "all")
                    for g in ("at_least_once", "exactly_once")
                ),
            ]
            if quix:
                jobs.append((QUIX, lambda plan=plan: run_process(QUIX, plan, settings)))
            if only is not None:
                jobs = [(name, job) for name, job in jobs if name in only]
            for name, job in jobs:
                try:
                    r = await job()  # type: ignore[operator]
                except Exception as exc:
                    name = labelled(name, partitions)
                    print(f"  run {i + 1}/{runs} {name}: FAILED {exc}", flush=True)
                    skipped.append(f"{name} run {i + 1}: {str(exc)[:2000]}")
                    continue
                r.system = labelled(r.system, partitions)
                results.setdefault(r.system, []).append(r)
                print(
                    f"  run {i + 1}/{runs} {r.system}: {r.events_per_s:.0f} events/s, "
                    f"p50 {r.p50_ms} ms, p99 {r.p99_ms} ms",
                    flush=True,
                )
            if only is not None and "kafka" not in only:
                continue
            for r in await run_kafka_tools(plan, settings):
                r.system = labelled(r.system, partitions)
                results.setdefault(r.system, []).append(r)
                print(f"  run {i + 1}/{runs} {r.system}: {r.events_per_s:.0f} events/s")

    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        asyncio.run(go(Path(tmp)))
    outbox: list[dict[str, float]] = []
    db_url = args.db or os.environ.get("PIPELINE_BENCH_DB")
    if db_url:
        # Both ends of the chain (issue #5): one relay publishing the outbox, and the sink
        # writing orders.changes, each over `count` rows from a standing start.
        from pipeline.tools.bench_outbox import bench as bench_outbox

        for i in range(runs):
            outbox.append(asyncio.run(bench_outbox(db_url, count, settings)))
            print(f"  run {i + 1}/{runs} outbox and sink: {outbox[-1]}", flush=True)
    load1 = os.getloadavg()
    report = render(results, count, runs, settings, skipped, counts)
    if outbox:
        report += "\n\n" + render_outbox(outbox, db_url or "")
    report += (
        f"\n\nWall time {time.time() - started:.0f} s; load average (1 min) "
        f"{load0[0]:.2f} before, {load1[0]:.2f} after, on {os.cpu_count()} CPUs."
    )
    print(report)
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "count": count,
                    "runs": runs,
                    "partitions": counts,
                    "commit_interval_s": settings.commit_interval_s,
                    "loadavg_before": load0,
                    "loadavg_after": load1,
                    "skipped": skipped,
                    "results": {k: [asdict(r) for r in v] for k, v in results.items()},
                    "outbox": outbox,
                },
                indent=2,
            )
        )
    return 0


def render_outbox(runs: list[dict[str, float]], db_url: str) -> str:
    """The outbox relay and the database sink: median (min-max) rows per second."""
    dialect = db_url.split(":", 1)[0].split("+", 1)[0] if "://" in db_url else "sqlite"
    lines = [
        f"Outbox relay and database sink on {dialect} ({int(runs[0]['rows'])} rows per run):",
        "",
        "| end | rows/s (median) | min | max |",
        "|---|---|---|---|",
    ]
    for key, name in (("relay_rows_per_s", "outbox relay"), ("sink_records_per_s", "sink")):
        values = [r[key] for r in runs]
        lines.append(
            f"| {name} | {statistics.median(values):.0f} | {min(values):.0f} | {max(values):.0f} |"
        )
    return "\n".join(lines)


def render(
    results: dict[str, list[Run]],
    count: int,
    runs: int,
    settings: Settings,
    skipped: list[str],
    partitions: Sequence[int] = (8,),
) -> str:
    lines = [
        f"Workload: {count} events (30% duplicates, 1% bad, 5% of orders with an illegal "
        f"event, ~200-byte JSON), {' and '.join(map(str, partitions))} partitions, one process "
        "per system, commit interval "
        f"{settings.commit_interval_s} s (our workers also commit once quiet for "
        f"{settings.commit_quiet_s} s), {runs} run(s) per system: median (min-max).",
        "Latency: 100 events/s trickle after the backlog, send -> output visible to a "
        "read_committed reader (dedup: orders.unique; full chain: orders.changes).",
        "",
        render_table(results),
        "",
        "Ratios of median throughput:",
        render_ratios(results, ratio_pairs(partitions)),
        "",
        "Configuration per system:",
    ]
    for system, rs in results.items():
        cfg = rs[0].config
        note = f" ({rs[0].note})" if rs[0].note else ""
        lines.append(f"- {system}: {json.dumps(cfg)}{note}")
    if skipped:
        lines += ["", "Not measured:", *(f"- {s}" for s in skipped)]
    return "\n".join(lines)
