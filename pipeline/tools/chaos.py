"""``python -m pipeline chaos``: faults on a seeded schedule while traffic flows, in the
manner of Kafka's own transaction system tests, then ``reconcile``.

What a run does:

1. Starts ``--workers`` worker processes on topics of the run's own (``chaos-<seed>-…``),
   so a run never touches a deployment's topics or workers.
2. Produces ``--events`` generated events (duplicates, bad input, illegal transitions)
   at a steady rate over most of ``--duration``.
3. Injects the faults of a schedule drawn from ``--seed``: ``kill -9`` of a worker (some
   while a rebalance is in progress), SIGSTOP of a worker for longer than the session
   timeout followed by SIGCONT (a zombie: it must be fenced and write nothing), a
   ``kill -9`` of the broker followed by a start, and scaling the worker count up and down.
4. Meanwhile a ``read_committed`` reader watches every output for an id seen twice and
   reports it the moment it becomes visible.
5. Brings the group back to ``--workers``, waits until every stage has committed all its
   input, runs ``reconcile``, and prints a one-screen summary with the seed and the
   schedule, so a failing run can be replayed.

Which worker a fault hits is drawn at run time from a second generator seeded from the
same seed, so the choices repeat too, as far as the processes' timing lets them.

``--pipeline MODULE --input FILE`` runs the same faults on a pipeline declared with
:mod:`pipeline.api` (:class:`Declared`): its workers are ``faust -A MODULE worker``, its
topics the run's own (``PIPELINE_TOPIC_PREFIX``), its input each line of ``FILE`` as a
record value, some sent again later as a retrying producer would (``--copies``), and its
verdict ``reconcile --pipeline`` (:mod:`pipeline.tools.reconcile_api`), which diffs every
output, dead letter and state changelog; there is no live watch of ids, which only the
order pipeline's contract defines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from pipeline.admin import declare_topics, ensure_topics
from pipeline.connection import security_env
from pipeline.kafka_io import partitions_of
from pipeline.settings import Settings
from pipeline.tools import checker
from pipeline.tools.generate import generate
from pipeline.tools.netfault import DOWN, UP, Link, Proxies, listener_ready
from pipeline.tools.procs import (
    ROOT,
    Worker,
    drained,
    drained_topics,
    namespaced_env,
    settings_from,
)
from pipeline.tools.reconcile import Report, reconcile

KILL = "kill9"
KILL_REBALANCING = "kill9-rebalancing"
STOP = "sigstop"
BROKER = "broker-restart"
SCALE_UP = "scale-up"
SCALE_DOWN = "scale-down"
PARTITION = "partition"
DELAY = "delay-commit"
RESET = "reset"
KINDS = (KILL, KILL_REBALANCING, STOP, BROKER, SCALE_UP, SCALE_DOWN, PARTITION, DELAY, RESET)
#: the faults a worker's proxy injects (pipeline.tools.netfault)
NETWORK = (PARTITION, DELAY, RESET)


@dataclass(frozen=True)
class Fault:
    at_s: float
    kind: str

    def __str__(self) -> str:
        return f"t+{self.at_s:6.1f}s {self.kind}"


@dataclass(frozen=True)
class Plan:
    seed: int
    events: int
    workers: int
    duration_s: float
    kills: int
    stops: int
    broker_restarts: int
    scale_changes: int
    #: network faults, through each worker's proxy (pipeline.tools.netfault)
    partitions: int = 0
    delays: int = 0
    resets: int = 0
    #: the options naming a declared pipeline and its input, for the replay command
    target: str = ""

    @property
    def network(self) -> bool:
        return bool(self.partitions or self.delays or self.resets)

    def replay_command(self) -> str:
        return (
            f"python -m pipeline chaos --seed {self.seed} --events {self.events} "
            f"--workers {self.workers} --duration {self.duration_s:g} --kills {self.kills} "
            f"--stops {self.stops} --broker-restarts {self.broker_restarts} "
            f"--scale-changes {self.scale_changes} --partitions {self.partitions} "
            f"--delays {self.delays} --resets {self.resets}{self.target}"
        )


def schedule(plan: Plan) -> list[Fault]:
    """The faults of a run, a pure function of the plan (and so of the seed).

    Faults fall in the first 80% of the duration, so the last ones still meet traffic.
    About a third of the kills land 1 to 3 s after another fault, when the rebalance that
    fault started is likely under way; they are ``kill9-rebalancing`` and wait for one.
    """
    rng = random.Random(plan.seed)
    kinds: list[str] = []
    rebalancing_kills = plan.kills // 3
    kinds += [KILL] * (plan.kills - rebalancing_kills)
    kinds += [STOP] * plan.stops + [BROKER] * plan.broker_restarts
    kinds += [SCALE_UP if i % 2 == 0 else SCALE_DOWN for i in range(plan.scale_changes)]
    kinds += [PARTITION] * plan.partitions + [DELAY] * plan.delays + [RESET] * plan.resets
    rng.shuffle(kinds)
    span = plan.duration_s * 0.8
    start = min(5.0, plan.duration_s * 0.1)
    slots = len(kinds) or 1
    faults: list[Fault] = []
    for i, kind in enumerate(kinds):
        # One fault per equal slice of the span, at a random point of its slice.
        lo = start + (span - start) * i / slots
        hi = start + (span - start) * (i + 1) / slots
        faults.append(Fault(round(rng.uniform(lo, hi), 1), kind))
    anchors = [f for f in faults if f.kind in (KILL, SCALE_UP, SCALE_DOWN)] or faults
    for _ in range(rebalancing_kills):
        anchor = rng.choice(anchors) if anchors else Fault(start, KILL)
        faults.append(Fault(round(anchor.at_s + rng.uniform(1.0, 3.0), 1), KILL_REBALANCING))
    return sorted(faults, key=lambda f: (f.at_s, f.kind))


class DuplicateWatch:
    """Ids per output topic; an id seen a second time is a duplicate, reported at once.

    The identity of a record is the one ``reconcile`` uses: the ``event_id`` on
    ``orders.unique`` and ``orders.changes`` and ``orders.rejected``, the ``coupon_id``
    on ``coupons.issued``, the input record's position on ``orders.dlq``, and the
    ``event_id`` on the balance deltas (one per event that moves a balance). It keeps
    what it read, in order, for the history checker (:mod:`pipeline.tools.checker`).
    """

    def __init__(self, settings: Settings) -> None:
        self.fields = {
            settings.topic_unique: ("event_id",),
            settings.topic_changes: ("event_id",),
            settings.topic_rejected: ("event_id",),
            settings.topic_coupons: ("coupon_id",),
            settings.topic_dlq: ("topic", "partition", "offset"),
            settings.deltas_topic: ("event_id",),
        }
        self.seen: dict[str, set[tuple[Any, ...]]] = {t: set() for t in self.fields}
        self.duplicates: list[tuple[str, tuple[Any, ...]]] = []
        self.unreadable: list[tuple[str, int, int]] = []
        #: every record returned, in order, for the history checker
        self.live: list[checker.Seen] = []

    @property
    def topics(self) -> list[str]:
        return list(self.fields)

    def add(self, topic: str, partition: int, offset: int, value: bytes | None) -> bool:
        """Record one output record; True when its id was seen before."""
        self.live.append(checker.Seen(topic, partition, offset, checker.fingerprint(value)))
        try:
            doc = orjson.loads(value or b"")
            ident = tuple(doc[f] for f in self.fields[topic])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.unreadable.append((topic, partition, offset))
            return False
        seen = self.seen[topic]
        if ident in seen:
            self.duplicates.append((topic, ident))
            return True
        seen.add(ident)
        return False

    def count(self, topic: str) -> int:
        return len(self.seen[topic])


@dataclass
class Injected:
    fault: Fault
    started_s: float
    note: str


@dataclass
class ChaosResult:
    plan: Plan
    app_id: str
    faults: list[Fault]
    injected: list[Injected] = field(default_factory=list)
    produced: int = 0
    distinct_ids: int = 0
    watch_duplicates: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    watch_counts: dict[str, int] = field(default_factory=dict)
    report: Report | None = None
    seconds: float = 0.0
    drained: bool = False
    workdir: str = ""
    #: workers that exited without being killed (restarted by the run's supervisor)
    exits: list[str] = field(default_factory=list)
    zombies: list[str] = field(default_factory=list)
    #: whether the live duplicate watch ran (the order pipeline's ids only)
    watched: bool = True
    #: what became of each partitioned worker's input partitions
    partitioned: list[str] = field(default_factory=list)
    #: the history checker's verdict (the order pipeline only)
    history: checker.Verdict | None = None

    @property
    def skipped(self) -> list[Injected]:
        """Faults the run could not inject (for example no second worker to take over)."""
        return [i for i in self.injected if i.note.startswith("skipped")]

    @property
    def ok(self) -> bool:
        # A skipped fault weakens the run but proves nothing wrong: it is reported, and
        # tests that need every fault assert on ``skipped`` themselves.
        return (
            self.drained
            and not self.watch_duplicates
            and self.report is not None
            and self.report.ok
            and (self.history is None or self.history.ok)
        )

    def summary(self) -> str:
        p = self.plan
        counts: dict[str, int] = {}
        for inj in self.injected:
            if inj not in self.skipped:
                counts[inj.fault.kind] = counts.get(inj.fault.kind, 0) + 1
        lines = [
            f"chaos run {self.app_id}: seed {p.seed}, {p.workers} workers, {p.events} events, "
            f"{self.seconds:.0f} s (work dir {self.workdir})",
            f"replay: {p.replay_command()}",
            "faults injected: "
            + (", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none")
            + f" ({len(self.injected) - len(self.skipped)} of {len(self.faults)} scheduled;"
            f" {len(self.skipped)} skipped)",
        ]
        lines += [f"  {inj.fault}  {inj.note}" for inj in self.injected]
        lines.append(
            f"events: {self.produced} produced ({self.distinct_ids} distinct event ids); "
            + ", ".join(f"{t} {n}" for t, n in self.watch_counts.items())
        )
        if self.watched:
            lines.append(
                f"live duplicate watch: {len(self.watch_duplicates)} duplicates"
                + (f", first {self.watch_duplicates[:3]}" if self.watch_duplicates else "")
            )
        else:
            lines.append("live duplicate watch: none (a declared pipeline); reconcile below")
        lines += [f"zombie: {z}" for z in self.zombies]
        lines += [f"partitioned: {z}" for z in self.partitioned]
        if self.exits:
            lines.append(f"workers that exited by themselves: {', '.join(self.exits)}")
        if not self.drained:
            lines.append("the pipeline did NOT drain: some input was never committed")
        if self.history is not None:
            lines.append(self.history.render())
        if self.report is not None:
            lines.append(self.report.render())
        lines.append(f"chaos verdict: {'PASS' if self.ok else 'FAIL'}")
        return "\n".join(lines)


@dataclass
class Declared:
    """A pipeline of :mod:`pipeline.api` to run the faults on, and its input."""

    #: the module of the pipeline (``module`` or ``module:attribute``, as ``reconcile
    #: --pipeline`` takes it)
    target: str
    #: the input's record values, in order
    values: list[bytes]
    #: the share of records sent a second time, later, as a retrying producer would
    copies: float = 0.3

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]

    def records(self, seed: int) -> list[tuple[bytes | None, bytes]]:
        """The values, each copy inserted at a later place drawn from ``seed``."""
        rng = random.Random(seed)
        n = len(self.values)
        places: list[tuple[float, int, bytes]] = []
        for i, v in enumerate(self.values):
            places.append((i, 0, v))
            if rng.random() < self.copies:
                places.append((rng.uniform(i, n), 1, v))  # after its first send
        return [(None, v) for _, _, v in sorted(places)]

    def load(self, env: dict[str, str]) -> Any:
        """The pipeline, imported with the run's settings (its app id and topic prefix),
        which a :class:`pipeline.api.Pipeline` reads from the environment as it is made."""
        from pipeline.api import load

        os.environ.update(env)
        return load(self.target)


class Run:
    """One chaos run's processes and tasks."""

    def __init__(
        self,
        plan: Plan,
        base: Settings,
        workdir: Path,
        say: Any,
        declared: Declared | None = None,
    ) -> None:
        self.plan = plan
        self.workdir = workdir
        self.say = say
        self.declared = declared
        self.app_id = f"chaos-{plan.seed}-{os.urandom(3).hex()}"
        extra = {
            # The broker's minimum: a dead or frozen worker's partitions move on quickly.
            "PIPELINE_SESSION_TIMEOUT_S": str(base.session_timeout_s),
            "PIPELINE_PARTITIONS": str(base.partitions),
            # How to reach the broker (TLS, SASL), as the run's own clients do.
            **security_env(base),
        }
        self.pipe: Any = None
        if declared is None:
            self.env = namespaced_env(self.app_id, base.broker, workdir / "w0", **extra)
            self.settings = settings_from(self.env)
            #: the topic the input goes to, and the one whose partitions a worker's
            #: /stats names as the input it processes
            self.input_topic = self.settings.topic_raw
        else:
            self.env = {
                "PIPELINE_BROKER": base.broker,
                "PIPELINE_APP_ID": self.app_id,
                "PIPELINE_TOPIC_PREFIX": self.app_id + ".",
                "PIPELINE_DATADIR": str(workdir / "w0"),
                **extra,
            }
            self.pipe = declared.load(self.env)
            self.settings = self.pipe.settings
            written = {t for info in self.pipe.stages.values() for t in info.outputs}
            entries = [
                info.source for info in self.pipe.stages.values() if info.source not in written
            ]
            if len(set(entries)) != 1:
                raise SystemExit(
                    f"{declared.target}: chaos feeds one input topic; this pipeline reads "
                    f"{sorted(set(entries))}"
                )
            self.input_topic = entries[0]
        self.kafka = self.settings.kafka
        self.picks = random.Random(plan.seed + 1)
        self.workers: list[Worker] = []
        self.stopped: set[str] = set()
        #: workers scaled down on purpose, and those with a restart already scheduled
        self.retired: set[str] = set()
        self.restarting: set[str] = set()
        self.exits: list[str] = []
        #: what became of each frozen worker's partitions
        self.zombies: list[str] = []
        self.positions: dict[TopicPartition, int] = {}
        self.produce_from = 0.0
        self.watch = DuplicateWatch(self.settings)
        self.produced = 0
        #: input records the producer had acknowledged, by position, for the checker
        self.accepted: dict[tuple[int, int], tuple[bytes | None, bytes | None]] = {}
        #: one fault proxy per worker slot, when the plan has network faults
        self.proxies: Proxies | None = None
        self.partitioned: list[str] = []
        self.t0 = time.monotonic()
        self.background: set[asyncio.Task[None]] = set()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    # -- workers -------------------------------------------------------------------

    async def start_proxies(self, base: Settings) -> None:
        """A proxy per worker slot, in front of the broker's FAULTi listeners
        (``scripts/kafka``); refuses to start without them."""
        host, port = broker_address(base.broker)
        first = int(os.environ.get("KAFKA_PROXY_BASE", port + 200))
        slots = int(os.environ.get("KAFKA_PROXY_SLOTS", 8))
        if not await listener_ready(host, first):
            raise NoProxyListeners(
                f"network faults need the broker's proxy listeners on {host}:{first}.. "
                f"(scripts/kafka start has {slots}; KAFKA_PROXY_BASE moves them); none answers. "
                "Run with --partitions 0 --delays 0 --resets 0 for a broker without them."
            )
        self.proxies = Proxies(first, slots, host)
        for slot in range(slots):
            await self.proxies.link(slot)

    def link_of(self, w: Worker) -> Link | None:
        if self.proxies is None:
            return None
        return self.proxies.links.get(self.workers.index(w))

    def new_worker(self) -> Worker:
        name = f"w{len(self.workers)}"
        env = dict(self.env, PIPELINE_DATADIR=str(self.workdir / name))
        link = self.proxies.links.get(len(self.workers)) if self.proxies is not None else None
        if link is not None:
            # All of this worker's traffic through its own proxy: the broker's metadata
            # sends it back to the proxy's address (scripts/kafka, FAULTi listeners).
            scheme = "kafka://" if env["PIPELINE_BROKER"].startswith("kafka://") else ""
            env["PIPELINE_BROKER"] = f"{scheme}{link.address}"
        elif self.proxies is not None:
            self.say(f"{name}: no proxy slot left; it reaches the broker directly")
        app = self.declared.module if self.declared is not None else "pipeline.app"
        w = Worker(env, self.workdir / f"{name}.log", name=name, app=app)
        self.workers.append(w)
        w.start()
        return w

    def running(self) -> list[Worker]:
        """Workers alive and not frozen, the ones a fault may hit."""
        return [w for w in self.workers if w.alive and w.name not in self.stopped]

    def spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def restart_later(self, w: Worker, delay: float) -> None:
        self.restarting.add(w.name)
        try:
            await asyncio.sleep(delay)
            if not w.alive:
                w.start()
        finally:
            self.restarting.discard(w.name)

    async def supervise(self) -> None:
        """Restart a worker that exits by itself, as systemd or Kubernetes would."""
        while True:
            await asyncio.sleep(1)
            for w in self.workers:
                if w.alive or w.name in self.retired or w.name in self.restarting:
                    continue
                rc = w.proc.returncode if w.proc is not None else None
                self.exits.append(f"{w.name} (exit {rc}) at t+{self.elapsed():.0f}s")
                self.say(f"t+{self.elapsed():.1f}s {w.name} exited by itself ({rc}); restarting")
                w.start()

    # -- faults --------------------------------------------------------------------

    async def inject(self, fault: Fault) -> str:
        if fault.kind == KILL:
            return await self.kill(rebalancing=False)
        if fault.kind == KILL_REBALANCING:
            return await self.kill(rebalancing=True)
        if fault.kind == STOP:
            return await self.freeze()
        if fault.kind == BROKER:
            return await self.restart_broker()
        if fault.kind == PARTITION:
            return await self.partition()
        if fault.kind == DELAY:
            return await self.delay_commit()
        if fault.kind == RESET:
            return await self.reset()
        if fault.kind == SCALE_UP:
            back = [w for w in self.workers if w.name in self.retired and not w.alive]
            if back:
                w = back[0]
                self.retired.discard(w.name)
                w.start()
            else:
                w = self.new_worker()
            return f"started {w.name} ({len(self.running())} running)"
        if fault.kind == SCALE_DOWN:
            alive = await self.wait_running(2)
            if len(alive) <= 1:
                return "skipped: only one worker left"
            w = alive[-1]
            self.retired.add(w.name)
            await asyncio.to_thread(w.stop)
            return f"stopped {w.name} gracefully ({len(self.running())} running)"
        raise ValueError(f"unknown fault {fault.kind!r}")

    async def wait_running(self, n: int, timeout: float = 20) -> list[Worker]:
        """The running workers, once there are ``n`` of them (a restart may be pending)."""
        deadline = time.monotonic() + timeout
        # Polling: "running" is process state, which no event reports.
        while len(self.running()) < n and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        return self.running()

    async def kill(self, *, rebalancing: bool) -> str:
        alive = await self.wait_running(1)
        if not alive:
            return "skipped: no worker running"
        victim = self.picks.choice(alive)
        how = ""
        if rebalancing:
            # Kill a worker that is in a rebalance: the one the last fault started, if it
            # is still under way, or else one started here.
            found = await self.rebalancing_worker(10)
            started = ""
            for _ in range(3):
                if found is not None:
                    break
                started = await self.start_rebalance(victim)
                found = await self.rebalancing_worker(60)
            victim = found or victim
            how = f" during a rebalance{started}" if found else " (no rebalance seen)"
        victim.kill9()
        delay = round(self.picks.uniform(1.0, 4.0), 1)
        self.spawn(self.restart_later(victim, delay))
        return f"kill -9 {victim.name}{how}; restart in {delay} s"

    async def rebalancing_worker(self, timeout: float) -> Worker | None:
        """A running worker whose /stats says it is rebalancing, within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for w in self.running():
                st = await asyncio.to_thread(w.stats)
                if st is not None and st.get("rebalancing"):
                    return w
            await asyncio.sleep(0.1)
        return None

    async def start_rebalance(self, victim: Worker) -> str:
        """Restart a worker gracefully: it leaves the group at once, so every member
        rebalances (with one worker, its own start is the rebalance)."""
        trigger = next((w for w in self.running() if w is not victim), victim)
        self.restarting.add(trigger.name)  # not the supervisor's to restart
        try:
            await asyncio.to_thread(trigger.stop)
            trigger.start()
        finally:
            self.restarting.discard(trigger.name)
        return f" (started by restarting {trigger.name})"

    async def freeze(self) -> str:
        alive = await self.wait_running(2)
        if len(alive) < 2:
            return "skipped: a zombie needs another worker to take over"
        # A zombie is a worker frozen while it owns partitions.
        victim, held = await self.holder(alive)
        seconds = self.settings.session_timeout_s + 4
        assert victim.proc is not None
        victim.proc.send_signal(signal.SIGSTOP)
        self.stopped.add(victim.name)
        self.spawn(self.thaw(victim, seconds, held))
        timeout = self.settings.session_timeout_s
        return (
            f"SIGSTOP {victim.name} for {seconds:g} s or more (session timeout {timeout:g} s), "
            f"holding input partitions {sorted(held)}"
        )

    async def holder(self, alive: list[Worker]) -> tuple[Worker, set[int]]:
        """A running worker that owns input partitions, and those partitions (during a
        rebalance a worker may briefly own none); any of ``alive`` after 15 s."""
        holding: list[tuple[Worker, set[int]]] = []
        deadline = time.monotonic() + 15
        while not holding and time.monotonic() < deadline:
            for w in self.running():
                parts = self.owned(await asyncio.to_thread(w.stats))
                if parts:
                    holding.append((w, parts))
            if not holding:
                await asyncio.sleep(0.5)
        return self.picks.choice(holding) if holding else (self.picks.choice(alive), set())

    # -- network faults (pipeline.tools.netfault) ---------------------------------

    def proxied(self) -> list[Worker]:
        return [w for w in self.running() if self.link_of(w) is not None]

    async def partition(self) -> str:
        alive = await self.wait_running(2)
        if len(alive) < 2:
            return "skipped: a partition needs another worker to take over"
        victim, held = await self.holder([w for w in alive if self.link_of(w)] or alive)
        link = self.link_of(victim)
        if link is None:
            return f"skipped: {victim.name} has no proxy"
        # Longer than the session timeout: the group moves its partitions while the
        # process runs on, retrying; after the heal its held requests reach the broker.
        seconds = round(self.settings.session_timeout_s + self.picks.uniform(2.0, 8.0), 1)
        self.spawn(self.heal(victim, link, seconds, held))
        return (
            f"partition {victim.name} from the broker for {seconds:g} s or more (session "
            f"timeout {self.settings.session_timeout_s:g} s), holding input partitions "
            f"{sorted(held)}"
        )

    async def heal(self, victim: Worker, link: Link, seconds: float, held: set[int]) -> None:
        # As for a zombie (thaw): cut off at least ``seconds``, and on until the others
        # are seen owning its partitions (other faults may keep the group rebalancing),
        # up to four times as long; so that the partitioned worker's late requests meet
        # new owners, whatever the timing.
        connections = link.cut()
        taken: set[int] = set()
        start = time.monotonic()
        try:
            while True:
                await asyncio.sleep(1)
                for w in self.running():
                    if w is not victim:
                        taken |= self.owned(await asyncio.to_thread(w.stats))
                cut = time.monotonic() - start
                if cut >= seconds and (held <= taken or cut >= seconds * 4):
                    break
        finally:
            link.heal()
        note = f"{connections} connections held both ways for {cut:.0f} s, then healed"
        if held and held <= taken:
            verdict = "taken over by the others while it was cut off"
        elif held:
            verdict = f"NOT seen taken over: {sorted(held - taken)}"
        else:
            verdict = "it held no input partition when cut off"
        self.partitioned.append(f"{victim.name}: {sorted(held)} {verdict}; {note}")
        self.say(f"t+{self.elapsed():.1f}s healed {victim.name}: {verdict}; {note}")

    async def delay_commit(self) -> str:
        alive = await self.wait_running(1)
        proxied = [w for w in alive if self.link_of(w) is not None]
        if not proxied:
            return "skipped: no worker behind a proxy"
        victim, _ = await self.holder(proxied)
        link = self.link_of(victim)
        assert link is not None
        direction = self.picks.choice([UP, DOWN])
        seconds = round(self.picks.uniform(2.0, 10.0), 1)
        note = await link.delay_commit(direction, seconds, within=10.0)
        return f"{victim.name}: {note}"

    async def reset(self) -> str:
        await self.wait_running(1)
        # A worker with connections to cut (one just restarted may have none yet).
        deadline = time.monotonic() + 15
        while True:
            links = [(w, self.link_of(w)) for w in self.running()]
            connected = [(w, link) for w, link in links if link is not None and link.conns]
            if connected or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.5)
        if not connected:
            return "skipped: no worker connected through a proxy"
        victim, link = self.picks.choice(connected)
        return f"{victim.name}: {await link.reset(within=3.0)}"

    def owned(self, stats: dict[str, Any] | None) -> set[int]:
        """The input partitions a worker's /stats says it processes."""
        if stats is None:
            return set()
        return set(stats.get("partitions", {}).get(self.input_topic, []))

    async def thaw(self, victim: Worker, seconds: float, held: set[int]) -> None:
        # While it is frozen, watch the others take its partitions over: when it wakes
        # it is a zombie, whose transactions the new owners' producers have fenced.
        # It stays frozen at least ``seconds``, and on until that happened (other faults
        # may have the group in turmoil), up to a limit.
        taken: set[int] = set()
        start = time.monotonic()
        while True:
            await asyncio.sleep(1)
            for w in self.running():
                taken |= self.owned(await asyncio.to_thread(w.stats))
            frozen = time.monotonic() - start
            if frozen >= seconds and (held <= taken or frozen >= seconds * 4):
                break
        if victim.proc is not None and victim.proc.poll() is None:
            victim.proc.send_signal(signal.SIGCONT)
        self.stopped.discard(victim.name)
        if held and held <= taken:
            verdict = "taken over by the others while it was stopped (zombie fenced out)"
        elif held:
            verdict = f"NOT seen taken over: {sorted(held - taken)}"
        else:
            verdict = "it held no input partition when stopped"
        self.zombies.append(verdict)
        self.say(
            f"t+{self.elapsed():.1f}s SIGCONT {victim.name} after {frozen:.0f} s: "
            f"{sorted(held)} {verdict}"
        )

    async def restart_broker(self) -> str:
        script = ROOT / "scripts" / "kafka"
        started = time.monotonic()
        await asyncio.to_thread(
            subprocess.run, ["bash", str(script), "kill"], check=True, capture_output=True
        )
        await asyncio.sleep(2)
        # After kill -9 the broker recovers every partition log before it serves; on a
        # broker that kept thousands of test partitions that took over the script's
        # default 90 s (seen in a soak), so a restart here may take longer.
        env = {**os.environ, "KAFKA_START_TIMEOUT": os.environ.get("KAFKA_START_TIMEOUT", "300")}
        done = await asyncio.to_thread(
            subprocess.run,
            ["bash", str(script), "start"],
            capture_output=True,
            text=True,
            env=env,
        )
        if done.returncode != 0:
            raise BrokerDidNotReturn(
                f"the broker did not come back after kill -9 within "
                f"{env['KAFKA_START_TIMEOUT']} s: {done.stderr.strip()[-600:]}"
            )
        return f"kill -9 broker, back after {time.monotonic() - started:.1f} s"

    # -- traffic and the watch -----------------------------------------------------

    async def produce(self, records: list[tuple[bytes | None, bytes]], seconds: float) -> None:
        rate = len(records) / max(seconds, 1.0)
        i = 0
        while i < len(records):
            producer = AIOKafkaProducer(
                **self.kafka.kwargs(),
                enable_idempotence=True,
                acks="all",
                linger_ms=5,
                request_timeout_ms=30_000,
            )
            try:
                await producer.start()
                while i < len(records):
                    chunk = records[i : i + 200]
                    futures = [
                        await producer.send(self.input_topic, value, key=key)
                        for key, value in chunk
                    ]
                    for (key, value), fut in zip(chunk, futures, strict=True):
                        md = await fut
                        self.accepted[(md.partition, md.offset)] = (key, value)
                    i += len(chunk)
                    self.produced = i
                    ahead = i / rate - (self.elapsed() - self.produce_from)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
            except Exception as exc:  # the broker restart: send the chunk again
                # A chunk that failed may be partly written. Sending it again is what
                # any retrying producer does; the copies carry the same event_id.
                self.say(f"t+{self.elapsed():.1f}s producer: {exc!r}; retrying the last chunk")
                await asyncio.sleep(1)
            finally:
                with contextlib.suppress(Exception):
                    await producer.stop()

    async def watch_outputs(self, stop: asyncio.Event) -> None:
        while True:
            consumer = AIOKafkaConsumer(
                **self.kafka.kwargs(),
                isolation_level="read_committed",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
            )
            try:
                await consumer.start()
                tps = []
                for topic in self.watch.topics:
                    parts = await partitions_of(consumer, topic)
                    while not parts:
                        await asyncio.sleep(0.5)
                        parts = await partitions_of(consumer, topic)
                    tps += [TopicPartition(topic, p) for p in sorted(parts)]
                consumer.assign(tps)
                for tp in tps:
                    # Resume where this watch was, after a broker restart broke the reader.
                    consumer.seek(tp, self.positions.get(tp, 0))
                idle_after_stop = 0
                while True:
                    batch = await consumer.getmany(timeout_ms=500, max_records=5000)
                    for tp, msgs in batch.items():
                        for m in msgs:
                            if self.watch.add(tp.topic, tp.partition, m.offset, m.value):
                                self.say(
                                    f"t+{self.elapsed():.1f}s DUPLICATE on {tp.topic} "
                                    f"partition {tp.partition} offset {m.offset}: "
                                    f"{self.watch.duplicates[-1][1]}"
                                )
                            self.positions[tp] = m.offset + 1
                    if stop.is_set():
                        idle_after_stop = 0 if batch else idle_after_stop + 1
                        if idle_after_stop >= 2:
                            return
            except Exception as exc:
                if stop.is_set():
                    return
                self.say(f"t+{self.elapsed():.1f}s watch: {exc!r}; reconnecting")
                await asyncio.sleep(1)
            finally:
                # aiokafka's stop can re-raise the cancellation of its own internal task.
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await consumer.stop()


async def run_chaos(
    plan: Plan,
    base: Settings,
    *,
    workdir: Path | None = None,
    drain_timeout: float = 600,
    say: Any = None,
    declared: Declared | None = None,
) -> ChaosResult:
    """Run one chaos plan and return its result (the caller prints the summary); on a
    declared pipeline with ``declared``."""
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    # Connection errors while the broker is down are the point of the run; the run
    # reports what matters itself, and the workers' logs keep the details. Restored
    # afterwards: the level is process-wide.
    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return await _run(plan, base, workdir, drain_timeout, say, declared)
    finally:
        quiet.setLevel(level)


async def _run(
    plan: Plan,
    base: Settings,
    workdir: Path | None,
    drain_timeout: float,
    say: Any,
    declared: Declared | None,
) -> ChaosResult:
    workdir = workdir or Path(tempfile.mkdtemp(prefix="pipeline-chaos-"))
    run = Run(plan, base, workdir, say, declared)
    s = run.settings
    faults = schedule(plan)
    result = ChaosResult(
        plan=plan, app_id=run.app_id, faults=faults, workdir=str(workdir), watched=not declared
    )
    say(f"chaos {run.app_id}: seed {plan.seed}; schedule:")
    for f in faults:
        say(f"  {f}")
    if declared is None:
        await declare_topics(s, [s.topic_raw, *run.watch.topics])
        records = [
            (r.key, r.value)
            for r in generate(
                plan.events, seed=plan.seed, dup_rate=0.3, bad_rate=0.01, illegal_rate=0.05
            )
        ]
        result.distinct_ids = len({_event_id(v) for _, v in records} - {None})
    else:
        # Its topics with their configuration (a dedup source keeps the append time)
        # before the first record: the workers would create them, but only once started.
        for name, config in run.pipe.app.topic_overrides.items():
            await ensure_topics(run.kafka, [name], s.partitions, s.replication, config=config)
        records = declared.records(plan.seed)
        result.distinct_ids = len(set(declared.values))
    if plan.network:
        await run.start_proxies(base)
    for _ in range(plan.workers):
        run.new_worker()
    stop_watch = asyncio.Event()
    watch = asyncio.ensure_future(
        run.watch_outputs(stop_watch) if declared is None else stop_watch.wait()
    )
    run.produce_from = run.elapsed()
    producing = asyncio.ensure_future(run.produce(records, plan.duration_s * 0.75))
    ticker = asyncio.ensure_future(_ticker(run, sys.stderr.isatty()))
    supervisor = asyncio.ensure_future(run.supervise())
    try:
        for fault in faults:
            wait = fault.at_s - run.elapsed()
            if wait > 0:
                await asyncio.sleep(wait)
            started = run.elapsed()
            note = await run.inject(fault)
            result.injected.append(Injected(fault, started, note))
            say(f"t+{started:.1f}s {fault.kind}: {note}")
        await producing
        result.produced = run.produced
        # Back to the planned size: every frozen worker thawed, every dead one restarted.
        while run.background:
            await asyncio.gather(*list(run.background))
        for w in run.workers:
            if not w.alive and len(run.running()) < plan.workers:
                run.retired.discard(w.name)
                w.start()
        while len(run.running()) < plan.workers:
            run.new_worker()
        result.drained = await _wait_drained(run, drain_timeout)
        stop_watch.set()
        await watch
        # Every partition healed: the workers' late requests have reached the broker.
        while run.background:
            await asyncio.gather(*list(run.background))
    finally:
        ticker.cancel()
        supervisor.cancel()
        for w in run.workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGCONT)
        await asyncio.gather(*(asyncio.to_thread(w.stop) for w in run.workers))
        if not watch.done():
            stop_watch.set()
            watch.cancel()
        producing.cancel()
        if run.proxies is not None:
            await run.proxies.close()
    result.watch_duplicates = list(run.watch.duplicates)
    result.watch_counts = {t: run.watch.count(t) for t in run.watch.topics}
    result.exits = list(run.exits)
    result.zombies = list(run.zombies)
    result.partitioned = list(run.partitioned)
    if declared is None:
        topics = checker.Topics(
            raw=s.topic_raw,
            unique=s.topic_unique,
            dlq=s.topic_dlq,
            changes=s.topic_changes,
            rejected=s.topic_rejected,
            coupons=s.topic_coupons,
            deltas=s.deltas_topic,
        )
        history = await checker.collect(run.kafka, topics, run.accepted, run.watch.live)
        result.history = checker.check(history)
        del history
        result.report = await reconcile(s)
    else:
        from pipeline.tools.reconcile_api import reconcile_pipeline

        result.report = await reconcile_pipeline(run.pipe)
    result.seconds = run.elapsed()
    return result


def _event_id(value: bytes) -> str | None:
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    eid = doc.get("event_id") if isinstance(doc, dict) else None
    return eid if isinstance(eid, str) else None


async def _wait_drained(run: Run, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if run.pipe is None:
                done, total = await drained(run.settings)
            else:
                topics = [t for i in run.pipe.stages.values() for t in (i.source, i.processed_from)]
                done, total = await drained_topics(run.settings, list(dict.fromkeys(topics)))
        except Exception as exc:  # the broker may still be settling after its restart
            run.say(f"drain check: {exc!r}")
            await asyncio.sleep(1)
            continue
        if total and done >= total:
            return True
        await asyncio.sleep(1)
    return False


async def _ticker(run: Run, tty: bool) -> None:
    last = 0.0
    while True:
        await asyncio.sleep(1)
        watched = (
            f"unique out {run.watch.count(run.settings.topic_unique)}  "
            f"duplicates {len(run.watch.duplicates)}  "
            if run.pipe is None
            else ""
        )
        line = (
            f"t+{run.elapsed():5.0f}s produced {run.produced}/{run.plan.events}  "
            f"{watched}workers {len(run.running())}"
        )
        if tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif run.elapsed() - last >= 10:
            last = run.elapsed()
            run.say(line)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "chaos",
        help="kill, freeze and restart workers and the broker while traffic flows; reconcile",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--seed", type=int, default=None, help="schedule seed (random if not given)")
    p.add_argument("--events", type=int, default=20_000, help="input events (20000)")
    p.add_argument("--workers", type=int, default=3, help="worker processes (3)")
    p.add_argument("--duration", type=float, default=90, help="seconds of traffic and faults (90)")
    p.add_argument("--kills", type=int, default=6, help="kill -9 of a worker (6)")
    p.add_argument("--stops", type=int, default=1, help="SIGSTOP past the session timeout (1)")
    p.add_argument(
        "--broker-restarts",
        type=int,
        default=1,
        help="kill -9 and start of the local broker, through scripts/kafka (1); 0 for a "
        "broker this machine does not run",
    )
    p.add_argument("--scale-changes", type=int, default=2, help="worker count +1/-1 (2)")
    p.add_argument(
        "--partitions",
        type=int,
        default=1,
        help="cut a worker off the broker, both ways, past the session timeout, then heal (1)",
    )
    p.add_argument(
        "--delays",
        type=int,
        default=1,
        help="hold a worker's commit (EndTxn) or its answer for 2-10 s (1)",
    )
    p.add_argument(
        "--resets",
        type=int,
        default=1,
        help="reset a worker's connections in the middle of requests (1); network faults "
        "need the local broker's proxy listeners (scripts/kafka)",
    )
    p.add_argument(
        "--faults",
        type=int,
        default=None,
        help="a total number of faults, split over the kinds by the seed (overrides the counts)",
    )
    p.add_argument("--drain-timeout", type=float, default=600, help="seconds to drain (600)")
    p.add_argument("--workdir", default=None, help="worker data and logs (a new temp dir)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--pipeline",
        metavar="MODULE[:NAME]",
        help="a pipeline declared with pipeline.api instead of the order pipeline (needs --input)",
    )
    p.add_argument(
        "--input",
        metavar="FILE",
        help="with --pipeline: its input, one record value per line (--events is then "
        "the number of lines)",
    )
    p.add_argument(
        "--copies",
        type=float,
        default=0.3,
        help="with --pipeline: the share of input records sent again later (0.3)",
    )
    p.set_defaults(func=main)


def plan_from(args: argparse.Namespace) -> Plan:
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    kills, stops, brokers, scales = args.kills, args.stops, args.broker_restarts, args.scale_changes
    net = {"partitions": args.partitions, "delays": args.delays, "resets": args.resets}
    if args.faults is not None:
        rng = random.Random(seed ^ 0x5EED)
        weights = {"kills": 6, "stops": 1, "brokers": 1 if brokers else 0, "scales": 2}
        # A kind asked to be 0 stays 0: a total never brings it back.
        weights |= {kind: 2 if n else 0 for kind, n in net.items()}
        drawn = rng.choices(list(weights), weights=list(weights.values()), k=args.faults)
        kills, stops = drawn.count("kills"), drawn.count("stops")
        brokers, scales = drawn.count("brokers"), drawn.count("scales")
        net = {kind: drawn.count(kind) for kind in net}
    return Plan(
        seed, args.events, args.workers, args.duration, kills, stops, brokers, scales, **net
    )


class BrokerDidNotReturn(RuntimeError):
    """A broker restart fault could not bring the broker back: the run has no verdict."""


class NoProxyListeners(RuntimeError):
    """Network faults were asked for, and the broker has no listener for the proxies."""


def broker_address(broker: str) -> tuple[str, int]:
    """The first host and port of a broker setting (``kafka://host:port;...``)."""
    first = broker.split("://", 1)[-1].split(";")[0].split(",")[0]
    host, _, port = first.rpartition(":")
    return host or "127.0.0.1", int(port)


#: Exit status of a run that ended without a verdict (1 is a failed verdict).
EXIT_NO_VERDICT = 2


def declared_from(args: argparse.Namespace) -> Declared | None:
    """``--pipeline`` and its ``--input``, or None for the order pipeline."""
    if not args.pipeline:
        if args.input:
            raise SystemExit("chaos: --input goes with --pipeline")
        return None
    if not args.input:
        raise SystemExit("chaos --pipeline needs --input FILE (one record value per line)")
    if not 0 <= args.copies <= 1:
        raise SystemExit("chaos: --copies is a share, 0 to 1")
    values = [line for line in Path(args.input).read_bytes().splitlines() if line.strip()]
    if not values:
        raise SystemExit(f"chaos: {args.input} holds no record")
    return Declared(args.pipeline, values, args.copies)


def main(args: argparse.Namespace, settings: Settings) -> int:
    declared = declared_from(args)
    if declared is not None:
        args.events = len(declared.values)
    plan = plan_from(args)
    if declared is not None:
        plan = replace(
            plan,
            target=f" --pipeline {args.pipeline} --input {args.input} --copies {args.copies:g}",
        )
    try:
        result = asyncio.run(
            run_chaos(
                plan,
                settings,
                workdir=Path(args.workdir) if args.workdir else None,
                drain_timeout=args.drain_timeout,
                declared=declared,
            )
        )
    except (BrokerDidNotReturn, NoProxyListeners) as exc:
        print(f"chaos run aborted, no verdict: {exc}", file=sys.stderr)
        print(f"replay: {plan.replay_command()}", file=sys.stderr)
        return EXIT_NO_VERDICT
    if args.json:
        doc = {
            "verdict": "PASS" if result.ok else "FAIL",
            "app_id": result.app_id,
            "seed": plan.seed,
            "plan": plan.__dict__,
            "faults": [
                {"at_s": i.fault.at_s, "kind": i.fault.kind, "note": i.note}
                for i in result.injected
            ],
            "produced": result.produced,
            "zombies": result.zombies,
            "partitioned": result.partitioned,
            "history": result.history.as_dict() if result.history else None,
            "exits": result.exits,
            "watch_duplicates": [[t, list(i)] for t, i in result.watch_duplicates],
            "reconcile": result.report.as_dict() if result.report else None,
            "seconds": round(result.seconds, 1),
        }
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(result.summary())
    return 0 if result.ok else 1


def kinds_of(faults: Iterable[Fault]) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in faults:
        out[f.kind] = out.get(f.kind, 0) + 1
    return out
