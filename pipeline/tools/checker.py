"""A history checker in the manner of Jepsen's: it names each anomaly it finds.

``reconcile`` judges the topics' final contents. This module judges a *history*: what a
chaos run's producer was told was accepted, what a ``read_committed`` reader saw while
the run went on (in the order it saw it), and, once everything has settled, each output
topic read twice, ``read_committed`` and ``read_uncommitted``. From these it reports:

``lost write``
    an input the broker acknowledged that caused nothing (no forward, no dead letter),
    or a forwarded event none of whose outputs ever became visible.
``duplicate``
    an output identity (an ``event_id``, a coupon, a dead letter's input position, a
    balance delta) visible more than once.
``aborted read``
    the live reader saw a record that is not in the committed log at that position: a
    record of an aborted transaction (it is in the ``read_uncommitted`` log), or one
    that is in no log at all, or other bytes than the log holds there.
``torn transaction``
    of the outputs that one event caused in the orders stage (its change, its coupon,
    its balance delta), some are visible and the others never became so.
``reorder``
    one key's records out of order: an order's changes not in version order, its
    forwards not in the order of their copies on one input partition, or the live
    reader seeing a partition's offsets go backwards.
``unexpected``
    an output no event explains.

What each event must cause comes from ``reconcile``'s own replay of the contract
(:class:`pipeline.tools.reconcile.Machine`) over what the orders stage consumed, told
which event each expected output belongs to; nothing of the workers' code is used.

Bounded by the run: the history is in memory (a chaos run's few hundred thousand
records); ``reconcile`` is the tool for a deployment's whole history.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from pipeline.connection import KafkaConnection
from pipeline.kafka_io import read_topic
from pipeline.tools.reconcile import Event, Machine, src_of, validate

LOST, DUPLICATE, ABORTED_READ, TORN, REORDER, UNEXPECTED = (
    "lost write",
    "duplicate",
    "aborted read",
    "torn transaction",
    "reorder",
    "unexpected",
)
KINDS = (LOST, DUPLICATE, ABORTED_READ, TORN, REORDER, UNEXPECTED)
EXAMPLES = 5


class Rec(NamedTuple):
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()


class Seen(NamedTuple):
    """One record the live ``read_committed`` reader returned, in the order it did: its
    value by :func:`fingerprint` (a run's outputs, twice over, would not fit in memory)."""

    topic: str
    partition: int
    offset: int
    digest: bytes


def fingerprint(value: bytes | None) -> bytes:
    return b"\x00" if value is None else hashlib.blake2b(value, digest_size=8).digest()


@dataclass(frozen=True)
class Topics:
    """The order pipeline's topic names (a run's own namespace)."""

    raw: str
    unique: str
    dlq: str
    changes: str
    rejected: str
    coupons: str
    deltas: str

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.unique, self.dlq, self.changes, self.rejected, self.coupons, self.deltas)


@dataclass
class History:
    topics: Topics
    #: input records the producer had acknowledged: (partition, offset) -> (key, value)
    accepted: dict[tuple[int, int], tuple[bytes | None, bytes | None]] = field(default_factory=dict)
    #: what the live read_committed reader returned, in order
    live: list[Seen] = field(default_factory=list)
    #: each topic read read_committed after the run settled, in offset order per partition
    committed: dict[str, list[Rec]] = field(default_factory=dict)
    #: each output topic's data records' positions read read_uncommitted after the run
    #: settled (no transaction open): committed and aborted alike
    written: dict[str, set[tuple[int, int]]] = field(default_factory=dict)


@dataclass
class Verdict:
    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    #: facts, not faults: how much the history held
    facts: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, text: str, n: int = 1) -> None:
        self.counts[kind] += n
        notes = self.examples.setdefault(kind, [])
        if len(notes) < EXAMPLES:
            notes.append(text if len(text) <= 300 else text[:300] + "...")

    @property
    def ok(self) -> bool:
        return not any(self.counts.values())

    def render(self) -> str:
        head = ", ".join(f"{self.counts[k]} {k}" for k in KINDS)
        facts = ", ".join(f"{k} {v:,}" for k, v in self.facts.items())
        lines = [f"history checker: {'PASS' if self.ok else 'FAIL'}: {head}", f"  ({facts})"]
        for kind in KINDS:
            lines += [f"  {kind}: {e}" for e in self.examples.get(kind, [])]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "anomalies": {k: self.counts[k] for k in KINDS},
            "examples": self.examples,
            "facts": self.facts,
        }


def _doc(value: bytes | None) -> dict[str, Any] | None:
    try:
        doc = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


class _Causes:
    """Takes the expected outputs from reconcile's replay, each under the event being
    replayed when it was expected."""

    def __init__(self, kind: str, into: list[tuple[str, str]]) -> None:
        self.kind = kind
        self.into = into

    def expect(self, order: str, item: tuple[str, bytes]) -> None:
        ident = order if self.kind == "coupons" else item[0]
        self.into.append((self.kind, ident))


def check(history: History) -> Verdict:
    v = Verdict()
    t = history.topics
    committed = history.committed
    v.facts["accepted inputs"] = len(history.accepted)
    v.facts["live reads"] = len(history.live)
    _aborted_reads(history, v)

    # What is visible, by identity: (kind, ident) -> count.
    visible: Counter[tuple[str, str]] = Counter()
    letters: Counter[tuple[str, int, int]] = Counter()
    for kind, topic, fld in (
        ("changes", t.changes, "event_id"),
        ("rejected", t.rejected, "event_id"),
        ("deltas", t.deltas, "event_id"),
        ("coupons", t.coupons, "order_id"),
    ):
        for r in committed.get(topic, []):
            doc = _doc(r.value)
            ident = doc.get(fld) if doc is not None else None
            if not isinstance(ident, str):
                v.add(UNEXPECTED, f"{topic}:{r.partition}:{r.offset}: no {fld}")
                continue
            visible[(kind, ident)] += 1
    for r in committed.get(t.dlq, []):
        doc = _doc(r.value)
        try:
            assert doc is not None
            where = (str(doc["topic"]), int(doc["partition"]), int(doc["offset"]))
        except (AssertionError, KeyError, TypeError, ValueError):
            v.add(UNEXPECTED, f"{t.dlq}:{r.partition}:{r.offset}: an undecodable dead letter")
            continue
        letters[where] += 1
    for (topic, p, o), n in letters.items():
        if n > 1:
            v.add(DUPLICATE, f"{n} dead letters for {topic}:{p}:{o}", n - 1)

    # The forwards, and the orders stage's replay over them, per partition in order.
    forwarded: Counter[str] = Counter()
    want: list[tuple[str, str]] = []
    causes = {k: _Causes(k, want) for k in ("changes", "rejected", "coupons", "deltas")}
    machine = Machine(causes)  # type: ignore[arg-type]
    explained: set[tuple[str, str]] = set()
    raw_keys = {(r.partition, r.offset): r.key for r in committed.get(t.raw, [])}
    last_src: dict[tuple[str, int], int] = {}
    for r in committed.get(t.unique, []):
        event = validate(r.value, None)
        # As reconcile reads the contract: a forward keyed by another order is the orders
        # stage's to dead-letter; one without a key is still its order's event.
        if isinstance(event, str) or r.key not in (None, event.order_id.encode()):
            where = (t.unique, r.partition, r.offset)
            if not letters.get(where):
                v.add(LOST, f"{t.unique}:{r.partition}:{r.offset}: bad, and no dead letter")
            continue
        forwarded[event.event_id] += 1
        if forwarded[event.event_id] > 1:
            v.add(DUPLICATE, f"event {event.event_id} forwarded again at {r.partition}:{r.offset}")
            continue
        _forward_order(r, event, raw_keys, last_src, t, v)
        want.clear()
        machine.apply(event)
        _judge(event, list(want), visible, explained, t, v)
    v.facts["forwards"] = sum(forwarded.values())

    for (kind, ident), n in visible.items():
        if (kind, ident) not in explained:
            v.add(UNEXPECTED, f"{kind} {ident}: caused by no forwarded event", n)
        elif n > 1:
            v.add(DUPLICATE, f"{kind} of {ident} visible {n} times", n - 1)

    # Every acknowledged input caused something.
    for (p, o), (key, value) in sorted(history.accepted.items()):
        event = validate(value, key)
        if isinstance(event, str):
            if not letters.get((t.raw, p, o)):
                v.add(LOST, f"{t.raw}:{p}:{o}: bad input ({event}) with no dead letter")
        elif not forwarded.get(event.event_id):
            v.add(LOST, f"{t.raw}:{p}:{o}: event {event.event_id} acknowledged, never forwarded")

    _versions(committed.get(t.changes, []), t.changes, v)
    return v


def _judge(
    event: Event,
    want: list[tuple[str, str]],
    visible: Counter[tuple[str, str]],
    explained: set[tuple[str, str]],
    t: Topics,
    v: Verdict,
) -> None:
    """One forwarded event's outputs: all visible, none (lost), or some (torn)."""
    explained.update(want)
    if not want:
        return  # a partial payment: state only
    shown = [w for w in want if visible.get(w)]
    if not shown:
        v.add(LOST, f"event {event.event_id} ({event.type}): none of {want} is visible")
    elif len(shown) < len(want):
        missing = [w for w in want if not visible.get(w)]
        v.add(TORN, f"event {event.event_id} ({event.type}): {shown} visible, {missing} never")


def _forward_order(
    r: Rec,
    event: Event,
    raw_keys: dict[tuple[int, int], bytes | None],
    last_src: dict[tuple[str, int], int],
    t: Topics,
    v: Verdict,
) -> None:
    """Keyed copies of one order from one input partition are forwarded in their order."""
    src = src_of(r.headers)
    if src is None or raw_keys.get(src) is None:
        return
    place = (event.order_id, src[0])
    last = last_src.get(place)
    if last is not None and src[1] < last:
        v.add(
            REORDER,
            f"order {event.order_id}: {t.raw}:{src[0]}:{src[1]} forwarded after "
            f"{t.raw}:{src[0]}:{last}",
        )
    last_src[place] = src[1] if last is None else max(last, src[1])


def _versions(changes: list[Rec], topic: str, v: Verdict) -> None:
    """An order's changes, in log order, carry versions 1, 2, 3..."""
    last: dict[str, int] = {}
    seen: set[tuple[str, int]] = set()
    for r in changes:
        doc = _doc(r.value)
        if doc is None or not isinstance(doc.get("order_id"), str):
            continue
        order, version = doc["order_id"], doc.get("version")
        if not isinstance(version, int):
            continue
        before = last.get(order, 0)
        # A version seen before is a copy: a duplicate, counted as one already.
        if version < before and (order, version) not in seen:
            v.add(REORDER, f"order {order}: version {version} after {before} on {topic}")
        seen.add((order, version))
        last[order] = max(before, version)


def _aborted_reads(history: History, v: Verdict) -> None:
    t = history.topics
    logs = {
        topic: {
            (r.partition, r.offset): fingerprint(r.value) for r in history.committed.get(topic, [])
        }
        for topic in t.outputs
    }
    aborted = 0
    for topic in t.outputs:
        written = history.written.get(topic, set())
        aborted += len(written - logs[topic].keys())
    v.facts["aborted records"] = aborted
    last: dict[tuple[str, int], int] = {}
    for s in history.live:
        log = logs.get(s.topic)
        if log is None:
            continue
        where = f"{s.topic}:{s.partition}:{s.offset}"
        if (s.partition, s.offset) not in log:
            if (s.partition, s.offset) in history.written.get(s.topic, set()):
                v.add(ABORTED_READ, f"{where}: read live, and it belongs to an aborted transaction")
            else:
                v.add(ABORTED_READ, f"{where}: read live, and it is in no log")
        elif log[(s.partition, s.offset)] != s.digest:
            v.add(ABORTED_READ, f"{where}: read live with other bytes than the log holds")
        before = last.get((s.topic, s.partition))
        if before is not None and s.offset <= before:
            v.add(REORDER, f"{where}: read live after offset {before}")
        last[(s.topic, s.partition)] = s.offset


async def collect(
    kafka: KafkaConnection | str,
    topics: Topics,
    accepted: dict[tuple[int, int], tuple[bytes | None, bytes | None]],
    live: list[Seen],
) -> History:
    """The settled part of a history: every topic read ``read_committed``, and each output
    topic's data records read ``read_uncommitted``. Call it once no transaction is open
    (the pipeline drained), or an open one's records count as aborted."""
    h = History(topics, accepted=accepted, live=live)
    for topic in (topics.raw, *topics.outputs):
        h.committed[topic] = [
            Rec(m.partition, m.offset, m.key, m.value, m.headers)
            async for m in read_topic(kafka, topic)
        ]
    for topic in topics.outputs:
        h.written[topic] = {
            (m.partition, m.offset) async for m in read_topic(kafka, topic, committed=False)
        }
    return h
