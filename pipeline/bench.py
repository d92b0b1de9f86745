"""``python -m pipeline bench``: what exactly-once costs, measured in one run.

Each system processes the same pre-produced workload (same count, seed, duplicate and
bad-input rates, partitions) on the same local broker, one after another. The clock
starts when the worker handles its first record and stops when every stage of the full
chain (dedup, state machine, balances behind the repartition hop) has committed all its
input, so start-up and table recovery are not counted; the
worker's CPU seconds over the same interval come from ``/proc``. Ratios are computed
between systems of the same run only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.admin import ensure_topics
from pipeline.generate import generate
from pipeline.kafka_io import produce
from pipeline.procs import Worker, drained, settings_from
from pipeline.settings import Settings

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    system: str
    events: int
    seconds: float
    events_per_s: float
    cpu_s_per_100k: float
    peak_rss_mb: float


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def run_chain(guarantee: str, count: int, base: Settings, workdir: Path) -> Run:
    tag = uuid.uuid4().hex[:8]
    env = {
        "PIPELINE_BROKER": base.broker,
        "PIPELINE_APP_ID": f"bench-{tag}",
        "PIPELINE_TOPIC_RAW": f"bench-{tag}.orders.raw",
        "PIPELINE_TOPIC_UNIQUE": f"bench-{tag}.orders.unique",
        "PIPELINE_TOPIC_DLQ": f"bench-{tag}.orders.dlq",
        "PIPELINE_TOPIC_CHANGES": f"bench-{tag}.orders.changes",
        "PIPELINE_TOPIC_REJECTED": f"bench-{tag}.orders.rejected",
        "PIPELINE_TOPIC_COUPONS": f"bench-{tag}.coupons.issued",
        "PIPELINE_PROCESSING_GUARANTEE": guarantee,
        "PIPELINE_PARTITIONS": str(base.partitions),
        "PIPELINE_COMMIT_INTERVAL_S": str(base.commit_interval_s),
        "PIPELINE_DATADIR": str(workdir / tag),
    }
    s = settings_from(env)
    await ensure_topics(
        s.bootstrap_servers, [s.topic_raw, s.topic_unique, s.topic_dlq], s.partitions
    )
    await produce(
        s.bootstrap_servers,
        s.topic_raw,
        generate(count, seed=42, dup_rate=0.3, bad_rate=0.01, illegal_rate=0.05),
    )
    worker = Worker(env, workdir / f"{tag}.log", name=guarantee)
    worker.start()
    try:
        await worker.wait_seen(1, timeout=120)
        assert worker.proc is not None
        pid = worker.proc.pid
        t0 = time.monotonic()
        cpu0 = _cpu_seconds(pid)
        first = worker.stats() or {}
        seen0 = int(first.get("seen", 0))  # type: ignore[call-overload]
        while True:
            # Every stage: dedup, the state machine and the balances behind the
            # repartition hop must have committed all their input.
            done, total = await drained(s)
            if done >= total:
                break
            if not worker.alive:
                raise RuntimeError(f"{guarantee} worker died:\n{worker.log_tail()}")
            await asyncio.sleep(0.2)
        seconds = time.monotonic() - t0
        cpu = _cpu_seconds(pid) - cpu0
        rss = _peak_rss_mb(pid)
    finally:
        worker.stop()
    handled = count - seen0
    return Run(
        system=f"full chain, {guarantee}",
        events=handled,
        seconds=round(seconds, 2),
        events_per_s=round(handled / seconds, 1),
        cpu_s_per_100k=round(cpu / handled * 100_000, 2),
        peak_rss_mb=round(rss, 1),
    )


def render(results: dict[str, list[Run]], settings: Settings, count: int) -> str:
    lines = [
        f"Workload: {count} events, 30% duplicates, 1% bad, 5% of orders with an illegal "
        f"event, {settings.partitions} partitions, one worker process, commit interval "
        f"{settings.commit_interval_s} s. Full chain: dedup -> state machine -> repartition "
        "-> balances; the clock stops when every stage has committed all its input.",
        "",
        "| system | events/s (median) | min | max | CPU s / 100k events | peak RSS MB |",
        "|---|---|---|---|---|---|",
    ]
    medians: dict[str, float] = {}
    for system, runs in results.items():
        eps = [r.events_per_s for r in runs]
        medians[system] = statistics.median(eps)
        cpu = statistics.median(r.cpu_s_per_100k for r in runs)
        rss = max(r.peak_rss_mb for r in runs)
        lines.append(
            f"| {system} | {medians[system]:.0f} | {min(eps):.0f} | {max(eps):.0f} | "
            f"{cpu:.1f} | {rss:.0f} |"
        )
    alo = medians.get("full chain, at_least_once")
    eos = medians.get("full chain, exactly_once")
    if alo and eos:
        lines += ["", f"exactly_once / at_least_once throughput: {eos / alo:.2f}"]
    return "\n".join(lines)


def main(args: argparse.Namespace, settings: Settings) -> int:
    count = 10_000 if args.quick else args.count
    runs = 1 if args.quick else args.runs
    results: dict[str, list[Run]] = {}

    async def go() -> None:
        with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
            for i in range(runs):
                for guarantee in ("at_least_once", "exactly_once"):
                    r = await run_chain(guarantee, count, settings, Path(tmp))
                    results.setdefault(r.system, []).append(r)
                    print(
                        f"  run {i + 1}/{runs} {r.system}: {r.events_per_s:.0f} events/s",
                        flush=True,
                    )

    asyncio.run(go())
    table = render(results, settings, count)
    print(table)
    if args.out:
        Path(args.out).write_text(
            json.dumps({k: [asdict(r) for r in v] for k, v in results.items()}, indent=2)
        )
    return 0
