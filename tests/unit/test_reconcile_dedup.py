"""``reconcile``'s order-independent dedup promises on small synthetic topics: each
check passes a correct output and fails a wrong one.

(a) a forward is its source copy: exists, valid, same bytes, arrival as timestamp,
    keyed by order_id; (b) every valid event_id forwarded; (c) no two forwards of an id
    less than the window apart; (d) every copy within the window of a forward; (e)
    keyed copies of one order from one raw partition forwarded in offset order; (f)
    nothing else on orders.unique.
"""

from __future__ import annotations

import itertools
import random

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.kafka_io import Msg
from pipeline.settings import Settings
from pipeline.tools.reconcile import Reconciler, TopicCheck, dedup_faults

W = 1000


# -- the pure rule over one id's copies ------------------------------------------------------


def test_one_copy_forwarded() -> None:
    assert dedup_faults([(5, True)], W) == (0, 0, "")


def test_b_a_valid_id_never_forwarded_is_a_loss() -> None:
    dup, lost, note = dedup_faults([(5, False), (7, False)], W)
    assert (dup, lost) == (0, 1) and "never forwarded" in note


def test_c_two_forwards_within_the_window_are_a_duplicate() -> None:
    assert dedup_faults([(0, True), (W - 1, True)], W)[:2] == (1, 0)
    assert dedup_faults([(0, True), (0, True)], W)[:2] == (1, 0)
    # A window or more apart: both right.
    assert dedup_faults([(0, True), (W, True)], W)[:2] == (0, 0)


def test_d_a_copy_outside_every_forwards_window_is_a_loss() -> None:
    # Within the window of the forward, before or after it: dropped rightly.
    assert dedup_faults([(500, True), (0, False), (1499, False)], W)[:2] == (0, 0)
    # A window or more from the only forward: it should have been forwarded.
    dup, lost, note = dedup_faults([(0, True), (W, False)], W)
    assert (dup, lost) == (0, 1) and "not within the window" in note
    # Two such copies close together: one forward would have covered both.
    assert dedup_faults([(0, True), (3000, False), (3500, False)], W)[:2] == (0, 1)
    assert dedup_faults([(0, True), (3000, False), (4000, False)], W)[:2] == (0, 2)


def _greedy(arrivals: list[int], order: list[int], window: int) -> list[tuple[int, bool]]:
    """Copies offered in ``order`` to a store that forwards a copy unless one of its
    forwards arrived within the window: what any correct dedup stage does."""
    forwarded: list[int] = []
    out = []
    for i in order:
        a = arrivals[i]
        fwd = all(abs(a - f) >= window for f in forwarded)
        if fwd:
            forwarded.append(a)
        out.append((a, fwd))
    return out


@given(st.lists(st.integers(0, 5000), min_size=1, max_size=12), st.randoms())
def test_any_processing_order_of_a_correct_stage_passes(
    arrivals: list[int], rng: random.Random
) -> None:
    # Copies reach the stage in any order (they land in several input partitions).
    order = list(range(len(arrivals)))
    rng.shuffle(order)
    assert dedup_faults(_greedy(arrivals, order, W), W)[:2] == (0, 0)


@given(st.lists(st.integers(0, 5000), min_size=2, max_size=12))
def test_forwarding_every_copy_is_caught_when_two_are_close(arrivals: list[int]) -> None:
    close = any(abs(a - b) < W for a, b in itertools.combinations(arrivals, 2))
    dup, lost, _ = dedup_faults([(a, True) for a in arrivals], W)
    assert (dup > 0) == close and lost == 0


# -- the whole unique check, on synthetic topics ---------------------------------------------

SETTINGS = Settings(dedup_window_s=W / 1000)
RAW, UNIQUE = SETTINGS.topic_raw, SETTINGS.topic_unique


def event(eid: str, order: str = "o1", kind: str = "OrderCancelled") -> bytes:
    return orjson.dumps({"event_id": eid, "type": kind, "order_id": order, "ts_ms": 1})


class Topics:
    """orders.raw and orders.unique, written by hand; then the unique check."""

    def __init__(self) -> None:
        self.raw: list[Msg] = []
        self.unique: list[Msg] = []
        self.raw_next: dict[int, int] = {}

    def copy(self, value: bytes, arrival: int, partition: int = 0, keyed: bool = True) -> Msg:
        offset = self.raw_next.get(partition, 0)
        self.raw_next[partition] = offset + 1
        try:
            key: bytes | None = orjson.loads(value)["order_id"].encode() if keyed else None
        except orjson.JSONDecodeError:
            key = b"k"
        m = Msg(partition, offset, arrival, key, value)
        self.raw.append(m)
        return m

    def forward(
        self,
        copy: Msg,
        *,
        value: bytes | None = None,
        timestamp: int | None = None,
        key: bytes | None = b"",
        src: bytes | None = b"",
        partition: int = 0,
    ) -> None:
        v = copy.value if value is None else value
        order = orjson.loads(copy.value or b"")["order_id"].encode()
        header = f"{copy.partition}:{copy.offset}".encode() if src == b"" else src
        self.unique.append(
            Msg(
                partition,
                sum(1 for m in self.unique if m.partition == partition),
                copy.timestamp if timestamp is None else timestamp,
                order if key == b"" else key,
                v,
                (("pipeline.src", header),) if header is not None else (),
            )
        )

    def check(self) -> TopicCheck:
        r = Reconciler(SETTINGS)
        for m in self.unique:
            r.on_unique(m)
        for m in self.raw:
            r.on_raw(m)
        r.end_raw()
        return r.unique


def counts(c: TopicCheck) -> dict[str, int]:
    names = ("duplicates", "missing", "unexpected", "out_of_order", "mismatched")
    return {n: getattr(c, n) for n in names if getattr(c, n)}


def test_a_correct_topic_passes() -> None:
    t = Topics()
    a = t.copy(event("e1"), 100, partition=0)
    t.copy(event("e1"), 150, partition=1, keyed=False)  # a keyless retry elsewhere
    b = t.copy(event("e2"), 120, partition=1)
    again = t.copy(event("e1"), 100 + W, partition=2)  # a window later: new again
    t.forward(a)
    t.forward(b)
    t.forward(again)
    c = t.check()
    assert c.ok, c.examples
    assert (c.actual, c.expected) == (3, 3)


def test_uniqueness_is_across_partitions() -> None:
    # The same event in two raw partitions, both forwarded: one too many, even though
    # each partition on its own looks clean.
    t = Topics()
    t.forward(t.copy(event("e1"), 100, partition=0))
    t.forward(t.copy(event("e1"), 130, partition=1, keyed=False), partition=1)
    assert counts(t.check()) == {"duplicates": 1}


def test_one_copy_forwarded_twice_is_a_duplicate() -> None:
    t = Topics()
    a = t.copy(event("e1"), 100)
    t.forward(a)
    t.forward(a)
    assert counts(t.check()) == {"duplicates": 1}


def test_a_lost_event_and_a_lost_late_copy() -> None:
    t = Topics()
    t.copy(event("e1"), 100)  # (b) never forwarded
    t.forward(t.copy(event("e2"), 100))
    t.copy(event("e2"), 100 + 2 * W)  # (d) far outside the window: should be forwarded
    assert counts(t.check()) == {"missing": 2}


@pytest.mark.parametrize(
    ("fault", "want"),
    [
        ("other bytes", {"mismatched": 1}),
        ("other timestamp", {"mismatched": 1}),
        ("no key", {"mismatched": 1}),
        ("wrong key", {"mismatched": 1}),
        ("no src", {"unexpected": 1, "missing": 1}),
        ("src of nothing", {"unexpected": 1, "missing": 1}),
        ("src of bad input", {"unexpected": 1, "missing": 1}),
        ("not an event", {"unexpected": 1, "missing": 1}),
    ],
)
def test_a_forward_must_be_its_source_copy(fault: str, want: dict[str, int]) -> None:
    t = Topics()
    value = event("e1")
    copy = t.copy(value, 100)
    bad = t.copy(b"{not json", 101)
    if fault == "other bytes":
        t.forward(copy, value=value.replace(b"{", b"{ "))
    elif fault == "other timestamp":
        t.forward(copy, timestamp=1)
    elif fault == "no key":
        t.forward(copy, key=None)
    elif fault == "wrong key":
        t.forward(copy, key=b"o2")
    elif fault == "no src":
        t.forward(copy, src=None)
    elif fault == "src of nothing":
        t.forward(copy, src=b"7:7")
    elif fault == "src of bad input":
        t.forward(copy, src=f"{bad.partition}:{bad.offset}".encode())
    else:
        t.forward(copy, value=b"[]")
    assert counts(t.check()) == want


def test_e_keyed_copies_of_one_partition_keep_their_order() -> None:
    t = Topics()
    first = t.copy(event("e1"), 100)
    second = t.copy(event("e2"), 101)
    t.forward(second)
    t.forward(first)
    c = t.check()
    assert counts(c) == {"out_of_order": 1}, c.examples


def test_e_order_is_free_across_partitions_and_for_keyless_copies() -> None:
    t = Topics()
    first = t.copy(event("e1"), 100, partition=0)
    second = t.copy(event("e2"), 101, partition=1)
    keyless = t.copy(event("e3"), 90, partition=0, keyed=False)
    t.forward(second)
    t.forward(keyless)
    t.forward(first)
    assert t.check().ok


def test_f_nothing_else_on_the_topic() -> None:
    t = Topics()
    t.forward(t.copy(event("e1"), 100))
    t.unique.append(Msg(0, 9, 0, b"o9", event("x9", "o9"), ()))
    t.unique.append(Msg(0, 10, 0, b"o9", b"garbage", ()))
    assert counts(t.check()) == {"unexpected": 2}
