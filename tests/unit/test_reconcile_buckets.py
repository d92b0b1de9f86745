"""``reconcile`` in buckets (issue 16): the grouped checks see each group whole in one
bucket, whatever the bucket count, so one bucket and many give the same report."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.domain.codecs import dlq_key, dlq_value
from pipeline.domain.orders import Send, decide_balance, decide_order
from pipeline.kafka_io import Msg
from pipeline.settings import Settings
from pipeline.tools.reconcile import (
    _EVENT,
    _FORWARD,
    _OUTPUT,
    _VALID,
    Reconciler,
    Report,
    Spill,
    SpillDir,
    bucket_count,
)

S = Settings(app_id="t-buckets", dedup_window_ms=1000)
KINDS = ("OrderCreated", "PaymentReceived", "OrderShipped", "OrderCancelled")
BAD = [b"not json", b"[]", b'{"event_id": ""}', b"\xff\xfe"]


class Topics:
    """Every topic reconcile reads, as lists of records: a correct run over random
    events, then the faults ``rng`` plants."""

    def __init__(self, seq: list[tuple[str, str, int, str, int]], rng: random.Random) -> None:
        self.raw: list[Msg] = []
        self.unique: list[Msg] = []
        self.dlq: list[Msg] = []
        self.outputs: list[tuple[str, Msg]] = []
        self.tables: list[tuple[str, Msg]] = []
        raw_next = [0, 0]
        unique_next = [0, 0]
        forwards: list[tuple[Msg, Msg]] = []
        for n, (kind, order, amount, user, copies) in enumerate(seq):
            doc: dict[str, Any] = {"event_id": f"e{n}", "type": kind, "order_id": order}
            doc["ts_ms"] = n
            if kind in ("OrderCreated", "PaymentReceived"):
                doc["amount_cents"] = amount
            if kind == "OrderCreated":
                doc["user_id"] = user
            value = orjson.dumps(doc)
            for c in range(copies):
                # Copies in both partitions, some keyless, some a window or more apart.
                p = (n + c) % 2
                key = order.encode() if c != 1 else None
                arrival = 10_000 * n + 600 * c
                m = Msg(p, raw_next[p], arrival, key, value)
                raw_next[p] += 1
                self.raw.append(m)
                if c == 0 or arrival - 10_000 * n >= S.dedup_window_ms:
                    up = sum(order.encode()) % 2
                    header = f"{p}:{m.offset}".encode()
                    f = Msg(
                        up,
                        unique_next[up],
                        arrival,
                        order.encode(),
                        value,
                        (("pipeline.src", header),),
                    )
                    unique_next[up] += 1
                    forwards.append((m, f))
            if rng.random() < 0.2:
                bad = rng.choice(BAD)
                p = n % 2
                m = Msg(p, raw_next[p], 10_000 * n, b"k", bad)
                raw_next[p] += 1
                self.raw.append(m)
                letter = dlq_value("bad", S.topic_raw, p, m.offset, bad)
                self.dlq.append(Msg(0, len(self.dlq), 0, dlq_key(b"k"), letter))
        self.unique = [f for _, f in forwards]
        orders: dict[bytes, bytes] = {}
        balances: dict[bytes, bytes] = {}
        topic_of = {"changes": 0, "rejected": 1, "coupons": 2, "deltas": 3}
        for f in self.unique:
            step = decide_order(f.value, f.key, (S.topic_unique, f.partition, f.offset), orders.get)
            if step.key is not None and step.order is not None:
                orders[step.key] = step.order
            for out in step.sends:
                self.outputs.append((out.kind, Msg(topic_of[out.kind], 0, 0, out.key, out.value)))
                if out.kind == "deltas":
                    decided = decide_balance(out.value, ("d", 0, 0), balances.get)
                    assert not isinstance(decided, Send)
                    balances[decided[0]] = decided[1]
        self.tables = [("orders", Msg(0, 0, 0, k, v)) for k, v in orders.items()]
        self.tables += [("balances", Msg(0, 0, 0, k, v)) for k, v in balances.items()]
        self._plant(rng)

    def _plant(self, rng: random.Random) -> None:
        for name in ("unique", "dlq", "outputs", "tables"):
            records: list[Any] = getattr(self, name)
            if records and rng.random() < 0.5:
                i = rng.randrange(len(records))
                if rng.random() < 0.5:
                    records.insert(i, records[i])  # a duplicate
                else:
                    del records[i]  # a loss
        if self.unique and rng.random() < 0.3:
            i = rng.randrange(len(self.unique))
            f = self.unique[i]
            self.unique[i] = Msg(f.partition, f.offset, f.timestamp + 1, f.key, f.value, f.headers)
        if self.unique and rng.random() < 0.3:
            # Two forwards swapped: a keyed partition out of order, or nothing wrong.
            i, j = rng.randrange(len(self.unique)), rng.randrange(len(self.unique))
            a, b = self.unique[i], self.unique[j]
            self.unique[i] = Msg(a.partition, a.offset, b.timestamp, b.key, b.value, b.headers)
            self.unique[j] = Msg(b.partition, b.offset, a.timestamp, a.key, a.value, a.headers)

    def check(self, buckets: int, tmp: Path, workers: int = 1) -> Report:
        r = Reconciler(S, buckets=buckets, spill_dir=str(tmp), check_tables=True, workers=workers)
        for m in self.raw:
            r.on_raw(m)
        for m in self.unique:
            r.on_unique(m)
        for m in self.dlq:
            r.on_dlq(m)
        for kind, m in self.outputs:
            r.on_output(kind, m)
        for table, m in self.tables:
            r.on_table(table, m)
        r.settle()
        r.end_raw()
        r.end_outputs()
        return r.finish()


def summary(report: Report) -> list[tuple[Any, ...]]:
    names = ("expected", "actual", "duplicates", "missing", "unexpected", "out_of_order")
    rows: list[tuple[Any, ...]] = []
    for c in report.checks:
        # The first few examples are kept: which ones depends on the bucket order when
        # there are more faults than examples.
        examples = sorted(c.examples) if len(c.examples) < 5 else len(c.examples)
        rows.append((c.topic, *(getattr(c, n) for n in names), c.mismatched, examples))
    return rows


scenarios = st.lists(
    st.tuples(
        st.sampled_from(KINDS),
        st.sampled_from(["o1", "o2", "o3", "o4", "o5"]),
        st.sampled_from([0, 1, 50, 100]),
        st.sampled_from(["u1", "u2", "u3"]),
        st.integers(1, 3),
    ),
    max_size=30,
)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq=scenarios, rng=st.randoms(use_true_random=False), buckets=st.sampled_from([2, 3, 7, 64]))
def test_one_bucket_and_many_give_the_same_report(
    seq: list[tuple[str, str, int, str, int]], rng: random.Random, buckets: int, tmp_path: Path
) -> None:
    topics = Topics(seq, rng)
    one = topics.check(1, tmp_path)
    many = topics.check(buckets, tmp_path)
    assert summary(one) == summary(many), (one.render(), many.render())
    assert one.input_records == many.input_records == len(topics.raw)
    assert {k: v.to_json() for k, v in one.orders.items()} == {
        k: v.to_json() for k, v in many.orders.items()
    }
    assert {k: v.to_json() for k, v in one.balances.items()} == {
        k: v.to_json() for k, v in many.balances.items()
    }
    assert list(tmp_path.iterdir()) == []  # the spills are gone


def test_worker_processes_give_the_same_report(tmp_path: Path) -> None:
    seq = [(KINDS[n % 4], f"o{n % 11}", 50 * (n % 3), f"u{n % 3}", 1 + n % 3) for n in range(300)]
    for seed in range(3):
        topics = Topics(seq, random.Random(seed))
        alone = topics.check(5, tmp_path)
        spread = topics.check(5, tmp_path, workers=2)
        assert summary(alone) == summary(spread), (alone.render(), spread.render())
        assert {k: v.to_json() for k, v in alone.balances.items()} == {
            k: v.to_json() for k, v in spread.balances.items()
        }
        assert len(alone.orders) == len(spread.orders) == 11
    assert list(tmp_path.iterdir()) == []


def test_a_correct_run_passes_in_buckets(tmp_path: Path) -> None:
    seq = [(KINDS[n % 4], f"o{n % 7}", 50, f"u{n % 3}", 1 + n % 3) for n in range(200)]
    report = Topics(seq, _NoFaults()).check(16, tmp_path)
    assert report.ok, report.render()
    assert len(report.checks) == 8


class _NoFaults(random.Random):
    """A random source under which no fault is planted (and no bad record written)."""

    def random(self) -> float:
        return 0.99


def test_a_group_is_never_split(tmp_path: Path) -> None:
    """The copies of an event and the forwards of them share a bucket, and so do an
    order's input events and outputs, whatever the partition they are on."""
    seq = [(KINDS[n % 4], f"o{n % 9}", 50, "u1", 3) for n in range(120)]
    topics = Topics(seq, _NoFaults())
    r = Reconciler(S, buckets=5, spill_dir=str(tmp_path))
    for m in topics.raw:
        r.on_raw(m)
    for m in topics.unique:
        r.on_unique(m)
    for kind, m in topics.outputs:
        r.on_output(kind, m)
    event_bucket: dict[str, set[int]] = {}
    source_bucket: dict[tuple[int, int], int] = {}
    for b, records in enumerate(r.by_event.pending):
        for rec in records:
            if rec[0] == _VALID:
                event_bucket.setdefault(rec[3], set()).add(b)
                source_bucket[rec[1], rec[2]] = b
    forwards = [(b, rec) for b, recs in enumerate(r.by_event.pending) for rec in recs]
    assert all(len(bs) == 1 for bs in event_bucket.values())
    assert len(event_bucket) == 120 and len({min(bs) for bs in event_bucket.values()}) > 1
    for b, rec in forwards:
        if rec[0] == _FORWARD:
            assert source_bucket[rec[1], rec[2]] == b
    order_bucket: dict[str, set[int]] = {}
    for b, records in enumerate(r.by_order.pending):
        for rec in records:
            order = rec[3] if rec[0] == _EVENT else rec[2] if rec[0] == _OUTPUT else None
            order_bucket.setdefault(str(order), set()).add(b)
    assert all(len(bs) == 1 for bs in order_bucket.values()), order_bucket
    r.close()


def test_with_buckets_orders_raw_comes_first(tmp_path: Path) -> None:
    r = Reconciler(S, buckets=3, spill_dir=str(tmp_path))
    r.on_unique(Msg(0, 0, 0, None, b"{}"))
    with pytest.raises(RuntimeError, match=r"orders\.raw"):
        r.on_raw(Msg(0, 0, 0, None, b"{}"))
    r.close()


def test_a_spill_gives_back_its_records_in_order(tmp_path: Path) -> None:
    spill = Spill(SpillDir(str(tmp_path)), "t", 3)
    spill.flush_at = 4
    records = [(n % 3, f"r{n}", n * 2**70, None, b"\x00" * n, n % 2 == 0) for n in range(50)]
    for rec in records:
        spill.add(rec[0], rec)
        spill.settle()
    (made,) = tmp_path.iterdir()
    assert len(list(made.iterdir())) == 3
    for b in range(3):
        assert list(spill.take(b)) == [r for r in records if r[0] == b]
    assert list(made.iterdir()) == []
    assert list(spill.take(0)) == []
    spill.directory.remove()
    assert list(tmp_path.iterdir()) == []


def test_a_small_run_writes_nothing_and_an_abandoned_one_leaves_nothing(tmp_path: Path) -> None:
    seq = [(KINDS[n % 4], f"o{n % 5}", 50, "u1", 2) for n in range(40)]
    topics = Topics(seq, _NoFaults())
    r = Reconciler(S, buckets=3, spill_dir=str(tmp_path))
    for m in topics.raw:
        r.on_raw(m)
    for m in topics.unique:
        r.on_unique(m)
    r.end_raw()  # all of it still in memory: no directory made
    assert list(tmp_path.iterdir()) == [] and r.unique.ok, r.unique
    r = Reconciler(S, buckets=3, spill_dir=str(tmp_path))
    for spill in r.spills:
        spill.flush_at = 1
    for m in topics.raw:
        r.on_raw(m)
    r.settle()
    assert len(list(tmp_path.iterdir())) == 1
    del r, spill  # never finished: its directory goes with it
    assert list(tmp_path.iterdir()) == []


def test_the_bucket_count_follows_the_size() -> None:
    assert bucket_count(0) == bucket_count(1) == bucket_count(200_000) == 1
    assert bucket_count(200_001) == 2
    assert bucket_count(17_000_000) == 85
