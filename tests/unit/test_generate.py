"""pipeline.tools.generate.generate: deterministic traffic with the requested dup and bad mix."""

from __future__ import annotations

import functools
import itertools
from collections import Counter

import orjson
import pytest

from pipeline.domain.models import BadInput, EventType, OrderEvent, parse_event
from pipeline.tools.generate import BAD_KINDS, Record, generate

N = 20_000


@functools.cache
def stream(
    count: int = N, seed: int = 1, dup_rate: float = 0.3, bad_rate: float = 0.01
) -> tuple[Record, ...]:
    return tuple(generate(count, seed=seed, dup_rate=dup_rate, bad_rate=bad_rate))


@pytest.mark.parametrize("count", [0, 1, 2, 17, 1000])
def test_yields_exactly_count(count: int) -> None:
    assert len(list(generate(count))) == count


def test_yields_exactly_count_large() -> None:
    assert len(stream()) == N


def test_same_seed_same_records() -> None:
    assert tuple(generate(3000, seed=42)) == tuple(generate(3000, seed=42))


def test_different_seed_different_records() -> None:
    a, b = tuple(generate(3000, seed=1)), tuple(generate(3000, seed=2))
    assert a != b
    # Not just a rare difference: most positions differ.
    assert sum(x != y for x, y in zip(a, b, strict=True)) > 1500


@pytest.mark.parametrize(
    ("dup_rate", "bad_rate"), [(0.3, 0.01), (0.1, 0.1), (0.5, 0.05), (0.0, 0.0), (0.0, 0.2)]
)
def test_kind_shares_are_near_requested_rates(dup_rate: float, bad_rate: float) -> None:
    kinds = Counter(
        "bad" if r.kind.startswith("bad:") else r.kind for r in stream(N, 7, dup_rate, bad_rate)
    )
    assert set(kinds) <= {"new", "dup", "bad"}
    assert abs(kinds["dup"] / N - dup_rate) <= 0.02, kinds
    assert abs(kinds["bad"] / N - bad_rate) <= 0.02, kinds
    if dup_rate == 0.0:
        assert kinds["dup"] == 0
    if bad_rate == 0.0:
        assert kinds["bad"] == 0


def test_every_dup_repeats_an_earlier_new_record() -> None:
    earlier: set[tuple[bytes | None, bytes]] = set()
    dups = 0
    for r in stream():
        if r.kind == "new":
            earlier.add((r.key, r.value))
        elif r.kind == "dup":
            dups += 1
            assert (r.key, r.value) in earlier, r
    assert dups > 0


def test_every_bad_record_is_rejected_for_its_own_reason() -> None:
    expected = {
        "not-json": "not JSON",
        "not-object": "not a JSON object",
        "missing-event-id": "missing 'event_id'",
        "bad-amount": "field 'amount_cents' must be an integer",
        "unknown-type": "unknown type",
        "key-mismatch": "does not equal order_id",
        "not-utf8": "not JSON",
        "missing-ts": "missing 'ts_ms'",
    }
    assert set(expected) == set(BAD_KINDS)
    seen: Counter[str] = Counter()
    for r in stream(N, 3, 0.3, 0.05):
        if not r.kind.startswith("bad:"):
            continue
        kind = r.kind.removeprefix("bad:")
        seen[kind] += 1
        result = parse_event(r.value, r.key)
        assert isinstance(result, BadInput), r
        assert expected[kind] in result.reason, (r, result)
    assert set(seen) == set(BAD_KINDS)


def test_every_new_and_dup_record_is_accepted() -> None:
    for r in stream():
        if r.kind in ("new", "dup"):
            assert isinstance(parse_event(r.value, r.key), OrderEvent), r


def test_event_ids_of_new_records_are_unique() -> None:
    ids = [orjson.loads(r.value)["event_id"] for r in stream() if r.kind == "new"]
    assert len(ids) == len(set(ids))
    assert len(ids) > N // 2


def test_order_lifecycles_are_well_formed() -> None:
    events: dict[str, list[OrderEvent]] = {}
    last_ts = None
    for r in stream():
        if r.kind != "new":
            continue
        ev = parse_event(r.value, r.key)
        assert isinstance(ev, OrderEvent)
        events.setdefault(ev.order_id, []).append(ev)
        assert last_ts is None or ev.ts_ms > last_ts
        last_ts = ev.ts_ms
    assert len(events) > 100
    final = {EventType.ORDER_SHIPPED, EventType.ORDER_CANCELLED}
    for order_id, evs in events.items():
        assert evs[0].type is EventType.ORDER_CREATED, (order_id, evs[0])
        assert all(e.type is not EventType.ORDER_CREATED for e in evs[1:])
        assert [e.event_id for e in evs] == [f"{order_id}-e{i}" for i in range(len(evs))]
        assert all(e.type not in final for e in evs[:-1]), evs
        paid = [e.amount_cents for e in evs if e.type is EventType.PAYMENT_RECEIVED]
        assert all(p is not None and p > 0 for p in paid)
        assert sum(paid) <= evs[0].amount_cents  # type: ignore[operator]
        if evs[-1].type is EventType.ORDER_SHIPPED:
            assert sum(paid) == evs[0].amount_cents


def test_orders_interleave() -> None:
    # Several orders are in flight at once, as the docstring promises.
    order_ids = [orjson.loads(r.value)["order_id"] for r in stream()[:200] if r.kind == "new"]
    switches = sum(a != b for a, b in itertools.pairwise(order_ids))
    assert switches > len(order_ids) // 2


def test_prefix_and_start_ms() -> None:
    recs = list(generate(50, seed=5, prefix="zz", start_ms=1_000, dup_rate=0, bad_rate=0))
    assert all(r.kind == "new" for r in recs)
    for n, r in enumerate(recs):
        doc = orjson.loads(r.value)
        assert doc["order_id"].startswith("zz")
        assert r.key == doc["order_id"].encode()
        assert doc["ts_ms"] == 1_000 + n


def test_the_sent_events_buffer_gives_back_each_key_and_value() -> None:
    from pipeline.tools.generate import _Sent

    sent = _Sent()
    pairs = [(b"o1", b'{"a":1}'), (b"", b"x"), (b"o3", b""), (b"o\x004", b"\xff" * 300)]
    for k, v in pairs:
        sent.add(k, v)
    assert len(sent) == len(pairs)
    assert [sent.get(i) for i in range(len(pairs))] == pairs
