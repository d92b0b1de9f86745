"""The history checker (pipeline/tools/checker.py) can fail: each anomaly it names is
planted in an otherwise correct history, and reported as that kind, and only that kind.

The correct history: order o1 is created, paid in full (a change, a coupon and a
balance delta, one transaction of the orders stage), and shipped; order o2 is created
and paid in part (state only, no output); a copy of o1's creation arrives again (dropped
by the dedup stage); one bad input record is dead-lettered; a shipment of a never-created
order o3 is rejected.
"""

from __future__ import annotations

import copy

import orjson
import pytest

from pipeline.tools.checker import (
    ABORTED_READ,
    DUPLICATE,
    KINDS,
    LOST,
    REORDER,
    TORN,
    UNEXPECTED,
    History,
    Rec,
    Seen,
    Topics,
    check,
    fingerprint,
)
from pipeline.tools.reconcile import coupon_id_of

T = Topics(raw="r", unique="u", dlq="d", changes="c", rejected="x", coupons="k", deltas="b")


def ev(eid: str, kind: str, order: str, **extra: object) -> bytes:
    return orjson.dumps({"event_id": eid, "type": kind, "order_id": order, "ts_ms": 1, **extra})


E1 = ev("e1", "OrderCreated", "o1", user_id="u1", amount_cents=500)
E2 = ev("e2", "PaymentReceived", "o1", amount_cents=500)
E3 = ev("e3", "OrderShipped", "o1")
E4 = ev("e4", "OrderCreated", "o2", user_id="u2", amount_cents=900)
E5 = ev("e5", "PaymentReceived", "o2", amount_cents=100)
E6 = ev("e6", "OrderShipped", "o3")
BAD = b"{not json"


def change(eid: str, order: str, frm: str, to: str, version: int) -> bytes:
    doc = {"event_id": eid, "order_id": order, "from": frm, "to": to, "version": version}
    return orjson.dumps({**doc, "ts_ms": 1})


def fwd(p: int, o: int, order: str, value: bytes, src: tuple[int, int]) -> Rec:
    return Rec(p, o, order.encode(), value, (("pipeline.src", f"{src[0]}:{src[1]}".encode()),))


def correct() -> History:
    raw = [
        Rec(0, 0, b"o1", E1),
        Rec(0, 1, b"o1", E2),
        Rec(0, 2, b"o1", E3),
        Rec(1, 0, b"o2", E4),
        Rec(1, 1, b"o2", E5),
        Rec(1, 2, None, BAD),
        Rec(1, 3, b"o3", E6),
        Rec(0, 3, b"o1", E1),  # a producer's retry of e1
    ]
    unique = [
        fwd(0, 0, "o1", E1, (0, 0)),
        fwd(0, 1, "o1", E2, (0, 1)),
        fwd(0, 2, "o1", E3, (0, 2)),
        fwd(1, 0, "o2", E4, (1, 0)),
        fwd(1, 1, "o2", E5, (1, 1)),
        fwd(1, 2, "o3", E6, (1, 3)),
    ]
    changes = [
        Rec(0, 0, b"o1", change("e1", "o1", "NEW", "CREATED", 1)),
        Rec(0, 2, b"o1", change("e2", "o1", "CREATED", "PAID", 2)),
        Rec(0, 4, b"o1", change("e3", "o1", "PAID", "SHIPPED", 3)),
        Rec(1, 0, b"o2", change("e4", "o2", "NEW", "CREATED", 1)),
    ]
    coupon = {"coupon_id": coupon_id_of("o1"), "order_id": "o1", "user_id": "u1"}
    delta = {"user_id": "u1", "order_id": "o1", "delta_cents": 500, "version": 2}
    h = History(
        topics=T,
        accepted={(r.partition, r.offset): (r.key, r.value) for r in raw},
        committed={
            T.raw: raw,
            T.unique: unique,
            T.changes: changes,
            T.rejected: [Rec(1, 0, b"o3", orjson.dumps({"event_id": "e6", "order_id": "o3"}))],
            T.coupons: [Rec(0, 0, b"o1", orjson.dumps({**coupon, "amount_cents": 500}))],
            T.deltas: [Rec(0, 0, b"u1", orjson.dumps({**delta, "event_id": "e2"}))],
            T.dlq: [Rec(0, 0, None, orjson.dumps({"topic": "r", "partition": 1, "offset": 2}))],
        },
    )
    h.written = {t: {(r.partition, r.offset) for r in h.committed.get(t, [])} for t in T.outputs}
    h.live = [
        Seen(t, r.partition, r.offset, fingerprint(r.value))
        for t in T.outputs
        for r in h.committed[t]
    ]
    return h


def live_of(h: History) -> list[Seen]:
    """What a live reader returns when it reads every committed output, topic by topic."""
    return [
        Seen(t, r.partition, r.offset, fingerprint(r.value))
        for t in T.outputs
        for r in h.committed[t]
    ]


def only(history: History, kind: str) -> list[str]:
    verdict = check(history)
    others = {k: n for k, n in verdict.counts.items() if k != kind and n}
    assert not others, (others, verdict.render())
    assert verdict.counts[kind] >= 1, verdict.render()
    assert not verdict.ok
    return verdict.examples[kind]


def test_the_correct_history_passes() -> None:
    verdict = check(correct())
    assert verdict.ok, verdict.render()
    assert verdict.facts["forwards"] == 6
    assert verdict.facts["aborted records"] == 0
    assert "PASS" in verdict.render()
    assert set(verdict.as_dict()["anomalies"]) == set(KINDS)


def test_a_lost_forward_is_a_lost_write() -> None:
    h = correct()
    # e4 (o2's creation) was acknowledged, but never forwarded; its change is gone too.
    h.committed[T.unique] = [r for r in h.committed[T.unique] if r.value not in (E4, E5)]
    h.committed[T.changes] = [r for r in h.committed[T.changes] if r.key != b"o2"]
    h.live = [s for s in h.live if not (s.topic in (T.unique, T.changes) and s.partition == 1)]
    examples = only(h, LOST)
    assert any("e4" in e and "never forwarded" in e for e in examples)


def test_a_forward_without_any_output_is_a_lost_write() -> None:
    h = correct()
    gone = fingerprint(change("e3", "o1", "PAID", "SHIPPED", 3))
    h.committed[T.changes] = [r for r in h.committed[T.changes] if b'"e3"' not in (r.value or b"")]
    h.live = [s for s in h.live if s.digest != gone]
    assert any("e3" in e for e in only(h, LOST))


def test_a_bad_input_without_its_dead_letter_is_a_lost_write() -> None:
    h = correct()
    h.committed[T.dlq] = []
    h.live = [s for s in h.live if s.topic != T.dlq]
    assert any("r:1:2" in e for e in only(h, LOST))


@pytest.mark.parametrize("topic", [T.changes, T.coupons, T.deltas, T.rejected, T.dlq])
def test_an_output_visible_twice_is_a_duplicate(topic: str) -> None:
    h = correct()
    first = h.committed[topic][0]
    again = first._replace(offset=first.offset + 100)
    h.committed[topic].append(again)
    h.written[topic].add((again.partition, again.offset))
    only(h, DUPLICATE)


def test_a_second_forward_of_an_event_is_a_duplicate() -> None:
    h = correct()
    h.committed[T.unique].append(fwd(0, 9, "o1", E1, (0, 3)))
    assert any("e1" in e for e in only(h, DUPLICATE))


def test_a_record_of_an_aborted_transaction_read_live_is_an_aborted_read() -> None:
    h = correct()
    # A change of an aborted transaction: in the log read_uncommitted, not committed,
    # and the live reader returned it.
    value = change("e9", "o1", "SHIPPED", "CANCELLED", 4)
    h.written[T.changes].add((0, 7))
    h.live.append(Seen(T.changes, 0, 7, fingerprint(value)))
    examples = only(h, ABORTED_READ)
    assert "aborted transaction" in examples[0]
    assert check(h).facts["aborted records"] == 1


def test_a_live_read_of_other_bytes_than_the_log_is_an_aborted_read() -> None:
    h = correct()
    s = h.live[0]
    h.live[0] = s._replace(digest=fingerprint(b"something else"))
    assert "other bytes" in only(h, ABORTED_READ)[0]


def test_a_live_read_of_a_record_in_no_log_is_an_aborted_read() -> None:
    h = correct()
    h.live.append(Seen(T.coupons, 5, 0, fingerprint(b"{}")))
    assert "in no log" in only(h, ABORTED_READ)[0]


@pytest.mark.parametrize("drop", [T.coupons, T.deltas])
def test_a_payment_whose_change_shows_without_its_partner_is_a_torn_transaction(
    drop: str,
) -> None:
    h = correct()
    h.committed[drop] = []
    h.live = [s for s in h.live if s.topic != drop]
    examples = only(h, TORN)
    assert "e2" in examples[0] and "never" in examples[0]


def test_a_coupon_without_its_change_is_a_torn_transaction() -> None:
    h = correct()
    h.committed[T.changes] = [r for r in h.committed[T.changes] if b'"e2"' not in (r.value or b"")]
    gone = fingerprint(change("e2", "o1", "CREATED", "PAID", 2))
    h.live = [s for s in h.live if s.digest != gone]
    # o1's later change (version 3 after 1) is also seen as it is: a version gap is not
    # an order violation.
    assert "e2" in only(h, TORN)[0]


def test_changes_of_an_order_out_of_version_order_are_a_reorder() -> None:
    h = correct()
    c = h.committed[T.changes]
    c[1], c[2] = c[2]._replace(offset=2), c[1]._replace(offset=4)
    h.live = [
        Seen(t, r.partition, r.offset, fingerprint(r.value))
        for t in T.outputs
        for r in h.committed[t]
    ]
    assert "version 2 after 3" in only(h, REORDER)[0]


def test_forwards_out_of_their_copies_order_are_a_reorder() -> None:
    h = correct()
    u = h.committed[T.unique]
    # e3 forwarded before e2: the forwards' sources, 0:2 then 0:1, on one raw partition.
    u[1], u[2] = fwd(0, 1, "o1", E3, (0, 2)), fwd(0, 2, "o1", E2, (0, 1))
    h.committed[T.changes] = [
        Rec(0, 0, b"o1", change("e1", "o1", "NEW", "CREATED", 1)),
        Rec(1, 0, b"o2", change("e4", "o2", "NEW", "CREATED", 1)),
        Rec(0, 2, b"o1", change("e2", "o1", "CREATED", "PAID", 2)),
    ]
    # What the orders stage answers to a shipment before the payment: a rejection.
    h.committed[T.rejected].append(
        Rec(0, 1, b"o1", orjson.dumps({"event_id": "e3", "order_id": "o1"}))
    )
    h.live = [
        Seen(t, r.partition, r.offset, fingerprint(r.value))
        for t in T.outputs
        for r in h.committed[t]
    ]
    assert "0:1 forwarded after" in only(h, REORDER)[0]


def test_a_live_reader_going_backwards_is_a_reorder() -> None:
    h = correct()
    h.live.append(h.live[0])
    assert "read live after" in only(h, REORDER)[0]


def test_an_output_no_event_explains_is_unexpected() -> None:
    h = correct()
    h.committed[T.deltas].append(
        Rec(0, 1, b"u9", orjson.dumps({"user_id": "u9", "order_id": "o9", "event_id": "e99"}))
    )
    assert "e99" in only(h, UNEXPECTED)[0]


def test_the_checker_does_not_change_its_input() -> None:
    h = correct()
    before = copy.deepcopy(h)
    check(h)
    assert h == before
