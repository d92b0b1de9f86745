"""Where a worker's time goes: one worker on a backlog, sampled with py-spy.

``python -m pipeline.tools.bench_profile [--guarantee exactly_once] [--stages dedup]
[--count 40000] [--seconds 15] [--out prof.txt] [--gil]`` produces a backlog on topics of its
own, starts one worker, samples it with ``py-spy record`` (the ``profile`` extra) while
it works through the backlog, prints events/s and CPU per event, and a breakdown of the
samples by activity. The raw stacks (py-spy's collapsed format) stay in ``--out`` for a
flame graph. This is how the hot costs in docs/benchmarks.md were found.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from pipeline.admin import drop_topics
from pipeline.connection import require_access, security_env
from pipeline.settings import Settings
from pipeline.tools.bench import _cpu_seconds, _workload
from pipeline.tools.procs import Worker, drained, namespaced_env, settings_from

#: activity -> frames that mark it; a sample counts for the first activity it matches
ACTIVITIES: list[tuple[str, tuple[str, ...]]] = [
    ("consumer thread", ("Thread._bootstrap",)),
    ("idle (event loop waiting)", ("EpollSelector.select",)),
    ("commit (pipeline.eos.commit)", ("commit_partition", "_commit_all", "send_held")),
    ("stage: pure decision", ("decide_record", "decide_order", "decide_balance", "decide ")),
    ("stage: table reads and writes", ("TransactionalStore.read", "TransactionalStore.stage")),
    ("sends into the transaction", ("Coordinator._emit", "TransactionManager.emit")),
    ("stage: the rest of handle", ("Coordinator._apply",)),
    ("batch delivery (engine)", ("Coordinator._process", "Coordinator.deliver")),
    ("fetch loop (Faust)", ("Fetcher._fetcher", "_drain_messages")),
    ("producer requests (aiokafka)", ("Sender.", "AIOKafkaClient.send", "BaseHandler.do")),
]


def breakdown(raw: str) -> list[tuple[str, float]]:
    """Shares of the samples by activity, from py-spy's collapsed stacks."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        total += int(n)
        for name, marks in ACTIVITIES:
            if any(m in stack for m in marks):
                counts[name] += int(n)
                break
        else:
            counts["other"] += int(n)
    return [(name, n / total) for name, n in counts.most_common()] if total else []


async def profile(
    args: argparse.Namespace, settings: Settings, workdir: Path, spy: str
) -> tuple[int, float, float]:
    """(events handled, seconds, CPU seconds) of the profiled worker."""
    tag = uuid.uuid4().hex[:8]
    env = namespaced_env(
        f"prof-{tag}",
        settings.broker,
        workdir / tag,
        PIPELINE_PROCESSING_GUARANTEE=args.guarantee,
        PIPELINE_PARTITIONS="8",
        PIPELINE_COMMIT_INTERVAL_S=str(settings.commit_interval_s),
        PIPELINE_STAGES=args.stages,
        **security_env(settings),
    )
    s = settings_from(env)
    kafka = s.kafka
    topics = [s.topic_raw, s.topic_unique, s.topic_dlq]
    await _workload(kafka, topics, s.topic_raw, args.count)
    worker = Worker(env, workdir / f"{tag}.log", name="profiled")
    worker.start()
    try:
        await worker.wait_seen(1, timeout=180)
        assert worker.proc is not None
        pid = worker.proc.pid
        t0, cpu0 = time.monotonic(), _cpu_seconds(pid)
        seen0 = int((worker.stats() or {}).get("seen", 0))  # type: ignore[call-overload]
        spy_args = ["record", "-r", "100", "-d", str(args.seconds), "-p", str(pid)]
        if args.gil:
            spy_args.append("--gil")
        sampler = await asyncio.create_subprocess_exec(
            spy,
            *spy_args,
            "-f",
            "raw",
            "-o",
            args.out,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while True:
            done, total = await drained(s, args.stages)
            if total and done >= total:
                break
            if not worker.alive:
                raise RuntimeError(f"the worker died:\n{worker.log_tail()}")
            await asyncio.sleep(0.1)
        seconds, cpu = time.monotonic() - t0, _cpu_seconds(pid) - cpu0
        await sampler.wait()
        # What the engine did meanwhile: commit rounds, early (quiet) commits, waits for
        # a commit with HELD_MAX sends held, and the commits' durations.
        counters = await asyncio.to_thread(_engine_counters, worker.web_port)
        if counters:
            print("engine counters at the end:\n" + counters)
    finally:
        worker.stop()
        await drop_topics(kafka, tag)
    return args.count - seen0, seconds, cpu


ENGINE_COUNTERS = (
    "pipeline_commits_total",
    "pipeline_quiet_commits_total",
    "pipeline_held_waits_total",
    "pipeline_commit_seconds{",
    "pipeline_partition_rewinds_total",
)


def _engine_counters(port: int) -> str:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return ""
    return "\n".join(f"  {line}" for line in text.splitlines() if line.startswith(ENGINE_COUNTERS))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tools.bench_profile")
    parser.add_argument("--guarantee", default="exactly_once")
    parser.add_argument("--stages", default="dedup", choices=["dedup", "all"])
    parser.add_argument("--count", type=int, default=40_000)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--out", default="profile.txt")
    parser.add_argument(
        "--gil",
        action="store_true",
        help="sample only the thread holding the GIL: where the CPU of a process whose "
        "threads wait for the GIL goes (without it, a thread waiting for the GIL is "
        "counted where it waits)",
    )
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy is not installed: pip install -e '.[profile]'", file=sys.stderr)
        return 2
    settings = Settings()
    require_access(settings.kafka)
    with tempfile.TemporaryDirectory(prefix="pipeline-profile-") as tmp:
        handled, seconds, cpu = asyncio.run(profile(args, settings, Path(tmp), spy))
    out = Path(args.out)
    print(
        f"{args.guarantee}, stages {args.stages}: {handled / seconds:.0f} events/s, "
        f"{cpu / handled * 1e6:.0f} µs CPU per event ({handled} events in {seconds:.1f} s; "
        "the sampler itself slows the worker)"
    )
    if out.exists():
        print(f"samples by activity ({out}):")
        for name, share in breakdown(out.read_text()):
            print(f"  {share * 100:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
