"""The chaos harness's pure parts: the seeded schedule and the live duplicate watch."""

from __future__ import annotations

import argparse
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.settings import Settings
from pipeline.tools.chaos import (
    BROKER,
    DELAY,
    KILL,
    KILL_REBALANCING,
    PARTITION,
    RESET,
    SCALE_DOWN,
    SCALE_UP,
    STOP,
    BrokerDidNotReturn,
    Declared,
    DuplicateWatch,
    Plan,
    declared_from,
    kinds_of,
    plan_from,
    schedule,
)

PLAN = Plan(
    seed=42,
    events=20_000,
    workers=3,
    duration_s=90,
    kills=6,
    stops=1,
    broker_restarts=1,
    scale_changes=2,
)


def test_schedule_is_a_function_of_the_seed() -> None:
    assert schedule(PLAN) == schedule(PLAN)
    other = Plan(**{**PLAN.__dict__, "seed": 43})
    assert [f.at_s for f in schedule(other)] != [f.at_s for f in schedule(PLAN)]


def test_schedule_has_every_fault_of_the_plan() -> None:
    kinds = kinds_of(schedule(PLAN))
    assert kinds == {
        KILL: 4,
        KILL_REBALANCING: 2,
        STOP: 1,
        BROKER: 1,
        SCALE_UP: 1,
        SCALE_DOWN: 1,
    }


plans = st.builds(
    Plan,
    seed=st.integers(0, 2**31),
    events=st.just(1000),
    workers=st.integers(1, 5),
    duration_s=st.floats(10, 3600),
    kills=st.integers(0, 30),
    stops=st.integers(0, 5),
    broker_restarts=st.integers(0, 5),
    scale_changes=st.integers(0, 6),
    partitions=st.integers(0, 5),
    delays=st.integers(0, 5),
    resets=st.integers(0, 5),
)


@settings(max_examples=200)
@given(plans)
def test_schedule_properties(plan: Plan) -> None:
    faults = schedule(plan)
    kinds = kinds_of(faults)
    assert kinds.get(KILL, 0) + kinds.get(KILL_REBALANCING, 0) == plan.kills
    assert kinds.get(STOP, 0) == plan.stops
    assert kinds.get(BROKER, 0) == plan.broker_restarts
    assert kinds.get(SCALE_UP, 0) + kinds.get(SCALE_DOWN, 0) == plan.scale_changes
    assert kinds.get(PARTITION, 0) == plan.partitions
    assert kinds.get(DELAY, 0) == plan.delays
    assert kinds.get(RESET, 0) == plan.resets
    # Scaling alternates up and down, so the group ends near its planned size.
    assert 0 <= kinds.get(SCALE_UP, 0) - kinds.get(SCALE_DOWN, 0) <= 1
    assert [f.at_s for f in faults] == sorted(f.at_s for f in faults)
    others = [f for f in faults if f.kind != KILL_REBALANCING]
    for f in faults:
        assert 0 <= f.at_s <= plan.duration_s * 0.8 + 3.05
        if f.kind == KILL_REBALANCING and others:
            # Right after another fault, while the rebalance it started is likely on.
            assert any(0.95 <= f.at_s - o.at_s <= 3.05 for o in others), (f, faults)


def _args(**over: object) -> argparse.Namespace:
    base: dict[str, object] = dict(
        seed=7,
        events=100,
        workers=3,
        duration=60.0,
        kills=6,
        stops=1,
        broker_restarts=1,
        scale_changes=2,
        partitions=1,
        delays=1,
        resets=1,
        faults=None,
        pipeline=None,
        input=None,
        copies=0.3,
    )
    base.update(over)
    return argparse.Namespace(**base)


def test_plan_from_counts_and_total() -> None:
    assert plan_from(_args()) == Plan(7, 100, 3, 60.0, 6, 1, 1, 2, 1, 1, 1)
    total = plan_from(_args(faults=30))
    process = total.kills + total.stops + total.broker_restarts + total.scale_changes
    network = total.partitions + total.delays + total.resets
    assert process + network == 30
    assert network > 0 and total.network
    assert plan_from(_args(faults=30)) == total
    # No broker faults asked for: a total never brings them back; nor network faults.
    assert plan_from(_args(faults=30, broker_restarts=0)).broker_restarts == 0
    quiet = plan_from(_args(faults=30, partitions=0, delays=0, resets=0))
    assert quiet.partitions == quiet.delays == quiet.resets == 0 and not quiet.network


def test_plan_without_seed_draws_one_and_prints_it() -> None:
    a, b = plan_from(_args(seed=None)), plan_from(_args(seed=None))
    assert isinstance(a.seed, int) and a.seed != b.seed


def test_replay_command_reproduces_the_plan() -> None:
    import shlex

    from pipeline.tools.chaos import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    for plan in (PLAN, Plan(**{**PLAN.__dict__, "partitions": 3, "delays": 2, "resets": 1})):
        argv = shlex.split(plan.replay_command())[3:]  # after "python -m pipeline"
        assert plan_from(parser.parse_args(argv)) == plan


def test_a_broker_that_does_not_come_back_ends_the_run_without_a_verdict(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.tools import chaos

    async def broker_gone(*args: object, **kwargs: object) -> None:
        raise BrokerDidNotReturn("the broker did not come back after kill -9 within 300 s")

    monkeypatch.setattr(chaos, "run_chaos", broker_gone)
    args = _args(seed=42, json=False, workdir=None, drain_timeout=60)
    assert chaos.main(args, Settings(app_id="t")) == chaos.EXIT_NO_VERDICT
    err = capsys.readouterr().err
    assert "aborted, no verdict" in err and "within 300 s" in err
    assert "--seed 42" in err


def _watch() -> tuple[DuplicateWatch, Settings]:
    s = Settings(app_id="t")
    return DuplicateWatch(s), s


def test_watch_flags_the_second_copy_only() -> None:
    watch, s = _watch()
    v = orjson.dumps({"event_id": "e1", "order_id": "o1"})
    assert watch.add(s.topic_unique, 0, 0, v) is False
    assert watch.add(s.topic_unique, 3, 9, v) is True
    assert watch.duplicates == [(s.topic_unique, ("e1",))]
    # The same event on another topic is its own record there.
    assert watch.add(s.topic_changes, 0, 0, v) is False
    assert watch.count(s.topic_unique) == 1


def test_watch_identities_per_topic() -> None:
    watch, s = _watch()
    coupon = {"coupon_id": "cpn-1", "order_id": "o1", "user_id": "u", "amount_cents": 1}
    assert not watch.add(s.topic_coupons, 0, 0, orjson.dumps(coupon))
    assert watch.add(s.topic_coupons, 0, 1, orjson.dumps({**coupon, "amount_cents": 2}))
    dead = {"reason": "x", "topic": "orders.raw", "partition": 1, "offset": 5, "raw": "?"}
    assert not watch.add(s.topic_dlq, 0, 0, orjson.dumps(dead))
    assert not watch.add(s.topic_dlq, 0, 1, orjson.dumps({**dead, "offset": 6}))
    assert watch.add(s.topic_dlq, 0, 2, orjson.dumps(dead))


def test_watch_counts_unreadable_records_without_failing() -> None:
    watch, s = _watch()
    assert watch.add(s.topic_unique, 2, 7, b"not json") is False
    assert watch.add(s.topic_unique, 2, 8, None) is False
    assert watch.add(s.topic_unique, 2, 9, orjson.dumps({"no": "id"})) is False
    assert watch.unreadable == [
        (s.topic_unique, 2, 7),
        (s.topic_unique, 2, 8),
        (s.topic_unique, 2, 9),
    ]


def test_a_declared_pipelines_input_sends_copies_later_as_a_retrying_producer_would() -> None:
    values = [b"v%d" % i for i in range(1000)]
    declared = Declared("examples.payments.app", values, copies=0.3)
    records = declared.records(seed=5)
    assert records == declared.records(seed=5)  # the seed replays it
    sent = [v for _, v in records]
    assert set(sent) == set(values) and all(k is None for k, _ in records)
    extra = len(sent) - len(values)
    assert 200 < extra < 400  # about 30% sent twice, none three times
    assert max(sent.count(v) for v in values) == 2
    # The originals keep their order; a copy never comes before its first send.
    firsts = sorted(values, key=sent.index)
    assert firsts == values
    assert Declared("m", values, copies=0.0).records(seed=5) == [(None, v) for v in values]


def test_chaos_on_a_declared_pipeline_needs_its_input(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="needs --input"):
        declared_from(_args(pipeline="examples.payments.app"))
    with pytest.raises(SystemExit, match="goes with --pipeline"):
        declared_from(_args(input="x"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(SystemExit, match="holds no record"):
        declared_from(_args(pipeline="m", input=str(empty)))
    two = tmp_path / "two.jsonl"
    two.write_bytes(b'{"a": 1}\n\n{"a": 2}\n')
    found = declared_from(_args(pipeline="m:pipe", input=str(two)))
    assert found is not None and found.values == [b'{"a": 1}', b'{"a": 2}']
    assert found.module == "m" and declared_from(_args()) is None


def test_the_broker_address_of_a_setting() -> None:
    from pipeline.tools.chaos import broker_address

    assert broker_address("kafka://127.0.0.1:9092") == ("127.0.0.1", 9092)
    assert broker_address("127.0.0.1:9492;127.0.0.1:9592") == ("127.0.0.1", 9492)
    assert broker_address("localhost:19092,other:1") == ("localhost", 19092)


def test_the_watch_keeps_what_it_read_in_order_for_the_checker() -> None:
    from pipeline.tools.checker import fingerprint

    s = Settings()
    watch = DuplicateWatch(s)
    watch.add(s.deltas_topic, 0, 5, orjson.dumps({"event_id": "e1"}))
    watch.add(s.topic_changes, 1, 2, b"not json")
    assert [(x.topic, x.partition, x.offset) for x in watch.live] == [
        (s.deltas_topic, 0, 5),
        (s.topic_changes, 1, 2),
    ]
    assert watch.live[1].digest == fingerprint(b"not json")
    assert watch.add(s.deltas_topic, 0, 6, orjson.dumps({"event_id": "e1"}))  # a duplicate
