"""Deterministic demo and load traffic for ``orders.raw``.

Orders go through realistic lifecycles (created, one or more payments, shipped or
cancelled). On top of that the generator re-sends earlier events with the same
``event_id`` (as a retrying producer would: some right away, some much later) and mixes
in bad records of several kinds. With ``illegal_rate``, that share of orders also gets a
lifecycle with a mistake the state machine must reject: two events swapped, an event
after the end, a second OrderCreated, or a stray event of an order never created.
The same seed gives the same records.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

import orjson

BAD_KINDS = (
    "not-json",
    "not-object",
    "missing-event-id",
    "bad-amount",
    "unknown-type",
    "key-mismatch",
    "not-utf8",
    "missing-ts",
)


@dataclass(frozen=True, slots=True)
class Record:
    key: bytes | None
    value: bytes
    #: "new", "dup" or "bad:<kind>" (for the generator's own accounting only)
    kind: str


#: what an order's lifecycle may get wrong, for the state machine to reject
ILLEGAL_KINDS = ("swapped", "after-end", "double-create", "never-created")


def _lifecycle(
    rng: random.Random, order_id: str, user_id: str, ts: int, illegal_rate: float = 0.0
) -> list[dict[str, object]]:
    amount = rng.randrange(100, 50_000)
    events: list[dict[str, object]] = [
        {"type": "OrderCreated", "user_id": user_id, "amount_cents": amount}
    ]
    roll = rng.random()
    if roll < 0.75:
        parts = 1 if rng.random() < 0.7 else rng.randrange(2, 4)
        left = amount
        for i in range(parts):
            pay = left if i == parts - 1 else rng.randrange(1, max(2, left // 2))
            left -= pay
            events.append({"type": "PaymentReceived", "amount_cents": pay})
        if rng.random() < 0.85:
            events.append({"type": "OrderShipped"})
        elif rng.random() < 0.5:
            events.append({"type": "OrderCancelled"})
    elif roll < 0.9:
        events.append({"type": "OrderCancelled"})
    if illegal_rate and rng.random() < illegal_rate:
        kind = ILLEGAL_KINDS[rng.randrange(len(ILLEGAL_KINDS))]
        if kind == "swapped" and len(events) >= 2:
            # Out of order: e.g. a payment before the order exists, a shipment before
            # the payment. The early one is rejected; the rest may then still apply.
            i = rng.randrange(len(events) - 1)
            events[i], events[i + 1] = events[i + 1], events[i]
        elif kind == "after-end":
            late = rng.choice(["PaymentReceived", "OrderShipped", "OrderCancelled"])
            extra: dict[str, object] = {"type": late}
            if late == "PaymentReceived":
                extra["amount_cents"] = rng.randrange(1, 1000)
            events.append(extra)
        elif kind == "double-create":
            events.insert(1, {"type": "OrderCreated", "user_id": user_id, "amount_cents": 1})
        else:
            # Nothing of this order but a stray event: its OrderCreated never comes.
            events = [{"type": rng.choice(["PaymentReceived", "OrderShipped"]), "amount_cents": 5}]
            if events[0]["type"] == "OrderShipped":
                del events[0]["amount_cents"]
    for i, e in enumerate(events):
        e["event_id"] = f"{order_id}-e{i}"
        e["order_id"] = order_id
        e["ts_ms"] = ts + i
    return events


def _bad(rng: random.Random, kind: str, n: int) -> tuple[bytes | None, bytes]:
    oid = f"bad-{n}"
    key = oid.encode()
    if kind == "not-json":
        return key, b"{this is not json"
    if kind == "not-object":
        return key, b"[1, 2, 3]"
    if kind == "missing-event-id":
        return key, orjson.dumps({"type": "OrderShipped", "order_id": oid, "ts_ms": 1})
    if kind == "bad-amount":
        return key, orjson.dumps(
            {
                "event_id": f"{oid}-x",
                "type": "PaymentReceived",
                "order_id": oid,
                "amount_cents": -5,
                "ts_ms": 1,
            }
        )
    if kind == "unknown-type":
        return key, orjson.dumps(
            {"event_id": f"{oid}-x", "type": "OrderTeleported", "order_id": oid, "ts_ms": 1}
        )
    if kind == "key-mismatch":
        return b"someone-else", orjson.dumps(
            {"event_id": f"{oid}-x", "type": "OrderShipped", "order_id": oid, "ts_ms": 1}
        )
    if kind == "not-utf8":
        return key, b"\xff\xfe\x00binary" + bytes([rng.randrange(256)])
    return key, orjson.dumps({"event_id": f"{oid}-x", "type": "OrderShipped", "order_id": oid})


class _Sent:
    """Every new event sent so far, any of which a later copy may repeat: one growing
    buffer and an array of offsets, not two bytes objects per event. Interleaved with
    the short-lived objects of producing, tens of millions of small long-lived objects
    left the heap fragmented: ``produce --count 10000000`` grew past 22 GB (OOM-killed
    at 7.6 M), where this holds about 200 bytes per event."""

    def __init__(self) -> None:
        self._data = bytearray()
        #: per event: where its key starts, where its value starts (its key ends)
        self._at = array("Q")

    def __len__(self) -> int:
        return len(self._at) // 2

    def add(self, key: bytes, value: bytes) -> None:
        self._at.append(len(self._data))
        self._data += key
        self._at.append(len(self._data))
        self._data += value

    def get(self, i: int) -> tuple[bytes, bytes]:
        k, v = self._at[2 * i], self._at[2 * i + 1]
        end = self._at[2 * i + 2] if 2 * i + 2 < len(self._at) else len(self._data)
        return bytes(self._data[k:v]), bytes(self._data[v:end])


def generate(
    count: int,
    *,
    seed: int = 1,
    dup_rate: float = 0.3,
    bad_rate: float = 0.01,
    start_ms: int = 1_700_000_000_000,
    prefix: str = "o",
    illegal_rate: float = 0.0,
) -> Iterator[Record]:
    """Yield exactly ``count`` records."""
    rng = random.Random(seed)
    sent = _Sent()
    # Several orders are in flight at once, so their events interleave as in real traffic.
    active: list[list[dict[str, object]]] = []
    orders = 0
    for n in range(count):
        roll = rng.random()
        if roll < bad_rate:
            kind = BAD_KINDS[n % len(BAD_KINDS)]
            key, value = _bad(rng, kind, n)
            yield Record(key, value, f"bad:{kind}")
            continue
        if roll < bad_rate + dup_rate and sent:
            # Mostly recent retries, sometimes a copy from far back in the stream.
            if rng.random() < 0.7:
                idx = len(sent) - 1 - rng.randrange(min(len(sent), 50))
            else:
                idx = rng.randrange(len(sent))
            key, value = sent.get(idx)
            yield Record(key, value, "dup")
            continue
        while len(active) < 16:
            orders += 1
            oid = f"{prefix}{orders}"
            uid = f"u{rng.randrange(1, 1 + max(10, count // 40))}"
            active.append(_lifecycle(rng, oid, uid, start_ms + n, illegal_rate))
        slot = rng.randrange(len(active))
        doc = active[slot].pop(0)
        doc["ts_ms"] = start_ms + n
        if not active[slot]:
            active.pop(slot)
        key = str(doc["order_id"]).encode()
        value = orjson.dumps(doc)
        sent.add(key, value)
        yield Record(key, value, "new")
