"""``reconcile --follow``'s incremental checks, fed round by round without a broker.

The topics come from :class:`World`: an in-memory pipeline made of the workers' own
pure decisions (as ``pipeline.tools.reference`` uses them), where each stage's
processed and committed positions are apart, so outputs past the frontier exist.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from pipeline.domain.codecs import dlq_key
from pipeline.domain.dedup import decide
from pipeline.domain.orders import Send, decide_balance, decide_order
from pipeline.domain.route import EID, SRC, DeadLetter, route_record, source_header
from pipeline.kafka_io import Msg
from pipeline.settings import Settings
from pipeline.tools.generate import generate
from pipeline.tools.reconcile_follow import Follower, Record, State, StateMismatch

NEVER = 2**62
STAGES = ("raw", "by_order", "unique", "deltas")


@pytest.fixture
def settings(clean_env: pytest.MonkeyPatch) -> Settings:
    return Settings(app_id="follow-test")


class World:
    """The order pipeline in memory: append-only topics, and per stage input how far it
    processed (its outputs written) and how far it committed (the frontier)."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.topics: dict[str, dict[int, list[Msg]]] = defaultdict(lambda: defaultdict(list))
        self.done = {name: defaultdict(int) for name in STAGES}
        self.committed: dict[str, dict[int, int]] = {name: {} for name in STAGES}
        self.seen: dict[bytes, list[int]] = {}
        self.orders: dict[bytes, bytes] = {}
        self.balances: dict[bytes, bytes] = {}
        self.clock = 1_700_000_000_000
        #: per topic and partition, where another producer's open transaction begins:
        #: a read_committed reader's end (the last stable offset) stops there
        self.held: dict[str, dict[int, int]] = defaultdict(dict)
        self.topic = {
            "raw": settings.topic_raw,
            "by_order": settings.by_order_topic,
            "unique": settings.topic_unique,
            "deltas": settings.deltas_topic,
            "dlq": settings.topic_dlq,
            "changes": settings.topic_changes,
            "rejected": settings.topic_rejected,
            "coupons": settings.topic_coupons,
            "orders_log": f"{settings.app_id}-orders-changelog",
            "balances_log": f"{settings.app_id}-users.balances-changelog",
        }

    def append(
        self,
        name: str,
        partition: int,
        key: bytes | None,
        value: bytes | None,
        ts: int = 0,
        headers: tuple[tuple[str, bytes], ...] = (),
    ) -> Msg:
        part = self.topics[self.topic[name]][partition]
        m = Msg(partition, len(part), ts, key, value, headers)
        part.append(m)
        return m

    def produce(self, count: int, seed: int, prefix: str) -> None:
        for i, rec in enumerate(
            generate(count, seed=seed, bad_rate=0.03, prefix=prefix, illegal_rate=0.1, dup_rate=0.3)
        ):
            self.clock += 7
            self.append("raw", i % 2, rec.key, rec.value, self.clock)

    def _new(self, name: str) -> list[Msg]:
        """The stage's unprocessed input, in arrival order across partitions."""
        todo = []
        for p, records in self.topics[self.topic[name]].items():
            todo += records[self.done[name][p] :]
            self.done[name][p] = len(records)
        return sorted(todo, key=lambda m: (m.timestamp, m.partition, m.offset))

    def run(self, *, commit: tuple[str, ...] = STAGES) -> None:
        """Every stage processes all its input; those in ``commit`` commit it."""
        raw = self.topic["raw"]
        for m in self._new("raw"):
            routed = route_record(m.value, m.key, (raw, m.partition, m.offset))
            if isinstance(routed, DeadLetter):
                self.append("dlq", 0, dlq_key(m.key), routed.value)
                continue
            headers = ((SRC, source_header(m.partition, m.offset)), (EID, routed.event_id))
            self.append("by_order", 0, routed.order_key, m.value, m.timestamp, headers)
        for m in self._new("by_order"):
            eid = dict(m.headers)[EID]
            verdict = decide(self.seen.get(eid, []), m.timestamp, m.timestamp, 10**9, NEVER)
            if verdict.unique:
                self.seen[eid] = verdict.accepted
                src = ((SRC, dict(m.headers)[SRC]),)
                self.append("unique", 0, m.key, m.value, m.timestamp, src)
        unique = self.topic["unique"]
        for m in self._new("unique"):
            step = decide_order(m.value, m.key, (unique, m.partition, m.offset), self.orders.get)
            if step.key is not None and step.order is not None:
                self.orders[step.key] = step.order
                self.append("orders_log", 0, step.key, step.order)
            for out in step.sends:
                self.append(out.kind, 0, out.key, out.value)
        deltas = self.topic["deltas"]
        for m in self._new("deltas"):
            decided = decide_balance(m.value, (deltas, m.partition, m.offset), self.balances.get)
            assert not isinstance(decided, Send), decided
            user, row = decided
            self.balances[user] = row
            self.append("balances_log", 0, user, row)
        for name in commit:
            self.committed[name] = dict(self.done[name])

    def hold(self, name: str, partition: int = 0) -> None:
        """Another producer opens a transaction on the partition and keeps it open."""
        self.held[self.topic[name]][partition] = len(self.topics[self.topic[name]][partition])

    def release(self) -> None:
        """Every open transaction ends (aborted: it wrote nothing that stays)."""
        self.held.clear()

    def snapshot(self) -> dict[str, Any]:
        """What a round would see now: the frontier, every topic's high watermark (but
        orders.raw's: no stage writes it), and its last stable offset."""
        lengths = {t: {p: len(r) for p, r in parts.items()} for t, parts in self.topics.items()}
        return {
            "committed": {n: dict(c) for n, c in self.committed.items()},
            "high": {t: dict(ends) for t, ends in lengths.items() if t != self.topic["raw"]},
            "ends": {
                t: {p: min(end, self.held[t].get(p, end)) for p, end in ends.items()}
                for t, ends in lengths.items()
            },
        }


def feed_round(follower: Follower, world: World, snap: dict[str, Any] | None = None) -> int:
    """One round as ``run_round`` does it, from a snapshot of the world; records read."""
    snap = snap or world.snapshot()
    n = 0
    for topic, feed in follower.feeds():
        start = follower.position(topic)
        for p, end in snap["ends"].get(topic, {}).items():
            records: list[Record] = list(world.topics[topic][p][start.get(p, 0) : end])
            for m in records:
                feed(m)
            n += len(records)
            follower.set_position(topic, p, end, end)
    follower.advance(snap["committed"], snap["high"])
    follower.judge()
    follower.commit()
    return n


def counts(follower: Follower) -> list[dict[str, Any]]:
    report = follower.report()
    return [{k: v for k, v in c.__dict__.items() if k != "examples"} for c in report.checks]


def faults(follower: Follower) -> dict[str, dict[str, int]]:
    """Per topic, its non-zero fault counts."""
    out = {}
    for c in follower.report().checks:
        found = {
            k: getattr(c, k)
            for k in ("duplicates", "missing", "unexpected", "out_of_order", "mismatched")
            if getattr(c, k)
        }
        if found:
            out[c.topic] = found
    return out


def test_rounds_with_a_restart_give_the_one_round_verdict(
    settings: Settings, tmp_path: Path
) -> None:
    world = World(settings)
    world.produce(400, seed=3, prefix="a")
    world.run()
    half = world.snapshot()
    world.produce(400, seed=4, prefix="b")
    world.run()

    state = State(str(tmp_path / "rounds"))
    first = Follower(settings, state)
    read1 = feed_round(first, world, half)
    state.close()
    state = State(str(tmp_path / "rounds"))
    again = Follower(settings, state)
    read2 = feed_round(again, world)
    rounds = counts(again)
    state.close()

    whole = State(str(tmp_path / "whole"))
    once = Follower(settings, whole)
    read_all = feed_round(once, world)
    # Each record is read once over both rounds: round 2 went on from the checkpoint.
    assert read1 + read2 == read_all
    assert read2 < read_all
    assert rounds == counts(once)
    assert once.report().ok, once.report().render()
    # Every check had something to check.
    assert all(c.expected > 0 for c in once.report().checks), once.report().render()
    assert once.report().input_records == 800
    assert once.lag() == 0
    whole.close()


def test_a_duplicate_planted_after_round_one_is_reported_in_round_two(
    settings: Settings, tmp_path: Path
) -> None:
    world = World(settings)
    world.produce(300, seed=5, prefix="c")
    world.run()
    follower = Follower(settings, State(str(tmp_path / "s")))
    feed_round(follower, world)
    assert follower.report().ok, follower.report().render()
    change = world.topics[settings.topic_changes][0][3]
    world.append("changes", 0, change.key, change.value)
    feed_round(follower, world)
    report = follower.report()
    assert not report.ok
    assert faults(follower) == {settings.topic_changes: {"duplicates": 1}}
    assert report.duplicates == 1 and report.losses == 0


def test_a_second_forward_and_a_second_dead_letter_are_duplicates(
    settings: Settings, tmp_path: Path
) -> None:
    world = World(settings)
    world.produce(300, seed=6, prefix="d")
    world.run()
    follower = Follower(settings, State(str(tmp_path / "s")))
    feed_round(follower, world)
    assert follower.report().ok
    forward = world.topics[settings.topic_unique][0][5]
    world.append("unique", 0, forward.key, forward.value, forward.timestamp, forward.headers)
    letter = world.topics[settings.topic_dlq][0][0]
    world.append("dlq", 0, letter.key, letter.value)
    feed_round(follower, world)
    found = faults(follower)
    assert found[settings.topic_unique] == {"duplicates": 1}
    assert found[settings.topic_dlq] == {"duplicates": 1}


def test_outputs_past_the_frontier_are_pending_until_it_passes(
    settings: Settings, tmp_path: Path
) -> None:
    world = World(settings)
    world.produce(300, seed=7, prefix="e")
    # Everything processed, but the state machine and the balances committed nothing.
    world.run(commit=("raw", "by_order"))
    follower = Follower(settings, State(str(tmp_path / "s")))
    feed_round(follower, world)
    report = follower.report()
    assert report.ok, report.render()
    assert follower.lag() > 0
    # Nothing of the state machine judged yet: its outputs wait for their causes.
    assert all(
        follower.outputs[k].missing == follower.outputs[k].unexpected == 0 for k in follower.outputs
    )
    world.run()
    feed_round(follower, world)
    assert follower.report().ok, follower.report().render()
    assert follower.lag() == 0
    # The same counts as a follower that only ever saw the committed world.
    other = Follower(settings, State(str(tmp_path / "other")))
    feed_round(other, world)
    assert counts(follower) == counts(other)


def test_outputs_behind_another_producers_open_transaction_wait_for_it(
    settings: Settings, tmp_path: Path
) -> None:
    """Committed outputs past the first record of a transaction still open (a killed
    worker's, until its partition's next producer aborts it) are invisible to a
    read_committed reader although their inputs' offsets are committed: they are
    pending, not lost, until the transaction ends; a loss among them is then found."""
    world = World(settings)
    world.produce(300, seed=10, prefix="i")
    world.run()
    outputs = ("by_order", "unique", "dlq", "changes", "rejected", "coupons", "deltas")
    for name in (*outputs, "orders_log", "balances_log"):
        world.hold(name)
    world.produce(300, seed=11, prefix="j")
    world.run()
    # A change committed behind the open transaction, lost.
    changes = world.topics[settings.topic_changes][0]
    del changes[world.held[settings.topic_changes][0] + 5]
    follower = Follower(settings, State(str(tmp_path / "s")))
    feed_round(follower, world)
    assert follower.report().ok, follower.report().render()
    assert follower.lag() > 0
    world.release()
    feed_round(follower, world)
    assert faults(follower) == {settings.topic_changes: {"missing": 1}}
    assert follower.lag() == 0
    # The same counts as a follower that read the world after the transaction ended.
    other = Follower(settings, State(str(tmp_path / "other")))
    feed_round(other, world)
    assert counts(follower) == counts(other)


def test_a_missing_output_below_the_frontier_is_a_loss(settings: Settings, tmp_path: Path) -> None:
    world = World(settings)
    world.produce(300, seed=8, prefix="f")
    world.run()
    changes = world.topics[settings.topic_changes][0]
    del changes[10]
    # Offsets as Kafka would give them after the gap: the reader does not care.
    follower = Follower(settings, State(str(tmp_path / "s")))
    feed_round(follower, world)
    assert faults(follower) == {settings.topic_changes: {"missing": 1}}
    assert follower.report().losses == 1


def test_a_missing_output_past_the_frontier_is_not_yet_a_loss(
    settings: Settings, tmp_path: Path
) -> None:
    world = World(settings)
    world.produce(300, seed=8, prefix="g")
    world.run(commit=("raw", "by_order"))
    del world.topics[settings.topic_changes][0][10]
    follower = Follower(settings, State(str(tmp_path / "s")))
    feed_round(follower, world)
    assert follower.report().ok
    world.committed["unique"] = dict(world.done["unique"])
    world.committed["deltas"] = dict(world.done["deltas"])
    feed_round(follower, world)
    assert faults(follower) == {settings.topic_changes: {"missing": 1}}


def test_a_valid_copy_the_hop_committed_past_but_never_rekeyed_is_lost(
    settings: Settings, tmp_path: Path
) -> None:
    world = World(settings)
    world.produce(200, seed=9, prefix="h")
    world.run()
    by_order = world.topics[settings.by_order_topic][0]
    # A single-copy event, so only the hop check can see it go.
    lone = next(
        m
        for m in by_order
        if sum(1 for o in by_order if dict(o.headers)[EID] == dict(m.headers)[EID]) == 1
    )
    lone_src = dict(lone.headers)[SRC]
    world.topics[settings.by_order_topic][0] = [m for m in by_order if m is not lone]
    world.topics[settings.topic_unique][0] = [
        m for m in world.topics[settings.topic_unique][0] if dict(m.headers)[SRC] != lone_src
    ]
    follower = Follower(settings, State(str(tmp_path / "s")))
    feed_round(follower, world)
    found = faults(follower)
    assert found[settings.topic_unique] == {"missing": 1}, follower.report().render()


def test_a_wrong_balance_row_is_a_mismatch(settings: Settings, tmp_path: Path) -> None:
    world = World(settings)
    world.produce(300, seed=10, prefix="i")
    world.run()
    follower = Follower(settings, State(str(tmp_path / "s")))
    feed_round(follower, world)
    assert follower.report().ok
    log = world.topics[f"{settings.app_id}-users.balances-changelog"][0]
    last = log[-1]
    assert last.value is not None
    world.append("balances_log", 0, last.key, last.value.replace(b'"version":', b'"version":1'))
    feed_round(follower, world)
    found = faults(follower)
    assert list(found) == [f"{settings.app_id}-users.balances-changelog"]
    assert found[f"{settings.app_id}-users.balances-changelog"]["mismatched"] >= 1


def test_a_state_of_other_topics_is_refused(settings: Settings, tmp_path: Path) -> None:
    state = State(str(tmp_path / "s"))
    follower = Follower(settings, state)
    follower.commit()
    state.close()
    other = Settings(app_id="another-app")
    state = State(str(tmp_path / "s"))
    with pytest.raises(StateMismatch):
        Follower(other, state)
    state.close()


@pytest.mark.parametrize(
    "argv",
    [
        ["reconcile", "--follow", "--db", "sqlite:///x.db"],
        ["reconcile", "--follow", "--pipeline", "examples.payments.app"],
        ["reconcile", "--follow", "--rounds", "0"],
        ["reconcile", "--follow", "--round-records", "0"],
        ["reconcile", "--follow", "--interval", "-1"],
        ["reconcile", "--rounds", "2"],
        ["reconcile", "--state", "somewhere"],
    ],
)
def test_follow_options_that_do_not_go_together_are_refused(
    settings: Settings, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.__main__ import _reconcile, build_parser

    args = build_parser().parse_args(argv)
    assert _reconcile(args, settings) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "reconcile" in err


def test_follow_refuses_an_at_least_once_deployment(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.__main__ import _reconcile, build_parser

    settings = Settings(app_id="alo", processing_guarantee="at_least_once")
    args = build_parser().parse_args(["reconcile", "--follow"])
    assert _reconcile(args, settings) == 2
    assert "exactly-once" in capsys.readouterr().err
