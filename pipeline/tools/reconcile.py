"""``reconcile``: prove that the outputs are exactly the input, processed once.

A checker that does not share the workers' blind spots: it reads every topic with a
plain aiokafka ``read_committed`` consumer and judges it by its *own* small reading of
``../shared/CONTRACT.md``: its own validator, its own state machine, its own DLQ rule,
its own coupon id. It imports no decision code of the workers (nothing from
``pipeline.agents``, ``pipeline.eos``, the operators of ``pipeline.domain``,
``pipeline.domain.models.parse_event`` or ``pipeline.domain.codecs.dlq_value``),
only schema constants (size and range limits) and topic names, so a bug in an operator
shows up here as a difference instead of being replayed.

What it checks:

* ``orders.raw``: each record is valid or bad by the contract's rules (:func:`validate`).
* ``orders.dlq``: one dead letter per bad input record (by topic, partition, offset), with
  a bounded reason, the record's key (or its SHA-256 when long), at most 64 KiB, and
  ``raw``/``raw_b64`` equal to the whole original or, when cut, a prefix of it with the
  right ``raw_size`` and ``raw_sha256``, cut only when the whole would not fit. A dead
  letter for anything but bad input (a valid event a stage gave up on) is a fault.
* ``orders.unique``, order-independently, across the whole topic (copies of an event
  may land in any partition):

  a. every forward's source copy (header ``pipeline.src``) exists in ``orders.raw``, is
     valid, and the forward has its exact bytes, its arrival as timestamp, and the
     order id as key;
  b. every valid ``event_id`` is forwarded at least once;
  c. no two forwards of one ``event_id`` arrived less than the dedup window apart;
  d. every copy of an ``event_id`` arrived within the window of a forward of it;
  e. keyed copies of one order from one raw partition are forwarded in offset order;
  f. nothing else is on the topic.

* ``orders.changes``, ``orders.rejected``, ``coupons.issued`` and the balance deltas:
  exactly the records (and keys) this module's state machine gives when replayed over
  each order's actual sequence on ``orders.unique`` (what the orders stage consumed);
  the wording of a rejection's reason is the worker's: only its presence and bound are
  checked.
* the ``orders`` and ``users.balances`` tables, read from their changelogs (last value
  per key, balances parsed by the standard library: exact beyond 64 bits): exactly the
  replayed state, types included.
* no transaction left open on any topic the pipeline writes transactionally.

Memory: bounded by buckets on disk, not by the input (see :class:`Reconciler`): the
records' few needed fields are spilled, grouped by the key each check groups by, and
checked one bucket at a time.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import glob
import hashlib
import itertools
import json
import marshal
import multiprocessing
import os
import re
import shutil
import struct
import sys
import tempfile
import time
import weakref
from array import array
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from pipeline.connection import KafkaConnection
from pipeline.domain.codecs import DLQ_KEY_MAX_BYTES, DLQ_MAX_BYTES, REASON_MAX_BYTES
from pipeline.domain.models import MAX_AMOUNT, MAX_ID_CHARS, MAX_TS_MS, MAX_VALUE_BYTES
from pipeline.kafka_io import end_offsets
from pipeline.settings import Settings

EXAMPLES = 5
#: the header a forward carries: where its copy is in orders.raw, "<partition>:<offset>"
SRC_HEADER = "pipeline.src"

CREATED, PAYMENT, SHIPPED, CANCELLED = (
    "OrderCreated",
    "PaymentReceived",
    "OrderShipped",
    "OrderCancelled",
)
_TYPES = frozenset((CREATED, PAYMENT, SHIPPED, CANCELLED))
_CONTROL = re.compile("[\x00-\x1f\x7f]")


@dataclass
class TopicCheck:
    topic: str
    expected: int = 0
    actual: int = 0
    duplicates: int = 0
    missing: int = 0
    unexpected: int = 0
    out_of_order: int = 0
    mismatched: int = 0
    examples: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.examples) < EXAMPLES:
            self.examples.append(text if len(text) <= 400 else text[:400] + "...")

    @property
    def ok(self) -> bool:
        return not (
            self.duplicates
            or self.missing
            or self.unexpected
            or self.out_of_order
            or self.mismatched
        )


@dataclass
class Report:
    input_records: int = 0
    checks: list[TopicCheck] = field(default_factory=list)
    open_transactions: dict[str, dict[int, tuple[int, int]]] = field(default_factory=dict)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    #: the rebuilt table state, for callers that compare it with web views; empty
    #: unless kept (``reconcile(keep_state=...)``: by default only for small inputs)
    orders: dict[str, OrderRow] = field(default_factory=dict, repr=False)
    balances: dict[str, BalanceRow] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks) and not self.open_transactions

    @property
    def duplicates(self) -> int:
        return sum(c.duplicates for c in self.checks)

    @property
    def losses(self) -> int:
        return sum(c.missing for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "verdict": "PASS" if self.ok else "FAIL",
            "input_records": self.input_records,
            "duplicates": self.duplicates,
            "losses": self.losses,
            "topics": [c.__dict__ | {"ok": c.ok} for c in self.checks],
            "open_transactions": {
                t: {str(p): {"lso": a, "hw": b} for p, (a, b) in parts.items()}
                for t, parts in self.open_transactions.items()
            },
            "seconds": round(self.seconds, 2),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
        }

    def render(self) -> str:
        lines = [f"reconcile: {self.input_records} input records"]
        for c in self.checks:
            lines.append(
                f"  {c.topic:<24} expected {c.expected:>8}  actual {c.actual:>8}  "
                f"duplicates {c.duplicates}  missing {c.missing}  unexpected {c.unexpected}  "
                f"out-of-order {c.out_of_order}  mismatched {c.mismatched}"
            )
            lines.extend(f"      e.g. {ex}" for ex in c.examples)
        for t, parts in self.open_transactions.items():
            lines.append(f"  open transaction on {t}: {parts}")
        lines.append(f"  time {self.seconds:.1f} s, peak RSS {self.peak_rss_mb:.0f} MB")
        lines.append(
            f"verdict: {'PASS' if self.ok else 'FAIL'} "
            f"({self.duplicates} duplicates, {self.losses} losses)"
        )
        return "\n".join(lines)


def write_metrics(report: Report, path: str) -> None:
    """The verdict as Prometheus text, for node_exporter's textfile collector (the
    ``PipelineReconcile*`` alerts of deploy/alerts.yml). Written atomically."""
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    registry = CollectorRegistry()

    def gauge(name: str, text: str, value: float) -> None:
        Gauge(name, text, registry=registry).set(value)

    gauge("pipeline_reconcile_ok", "1 if the last reconcile passed", int(report.ok))
    gauge("pipeline_reconcile_duplicates", "Duplicates the last reconcile found", report.duplicates)
    gauge("pipeline_reconcile_losses", "Losses the last reconcile found", report.losses)
    gauge(
        "pipeline_reconcile_mismatches",
        "Mismatched, unexpected or misordered records and table rows",
        sum(c.mismatched + c.unexpected + c.out_of_order for c in report.checks),
    )
    gauge(
        "pipeline_reconcile_open_transactions",
        "Output partitions with a transaction left open",
        sum(len(p) for p in report.open_transactions.values()),
    )
    gauge("pipeline_reconcile_input_records", "Input records checked", report.input_records)
    gauge("pipeline_reconcile_seconds", "Duration of the last reconcile", report.seconds)
    gauge("pipeline_reconcile_last_run_timestamp_seconds", "When it finished", time.time())
    write_to_textfile(path, registry)


def _peak_rss_mb(*, children: bool = False) -> float:
    """This process's peak resident memory, or its largest child's."""
    import resource

    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024


# -- the contract's input rules ----------------------------------------------------------


class Event(NamedTuple):
    event_id: str
    type: str
    order_id: str
    ts_ms: int
    user_id: str | None
    amount_cents: int | None


def _is_id(value: object) -> bool:
    return type(value) is str and 1 <= len(value) <= MAX_ID_CHARS and _CONTROL.search(value) is None


def _is_int_below(value: object, limit: int) -> bool:
    # type() and not isinstance(): JSON true is not a number, 1.0 is not an integer.
    return type(value) is int and 0 <= value < limit


def validate(value: bytes | None, key: bytes | None) -> Event | str:
    """One ``orders.raw`` record by the contract: the event, or why it is bad input.

    The reason is this module's own short wording (the DLQ's reason is the worker's);
    only good or bad, and the fields, must agree with the workers.
    """
    if value is None:
        return "tombstone"
    if len(value) > MAX_VALUE_BYTES:
        return "value over 1 MiB"
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return "not JSON"
    if type(doc) is not dict:
        return "not a JSON object"
    event_id = doc.get("event_id")
    if not _is_id(event_id):
        return "bad event_id"
    order_id = doc.get("order_id")
    if not _is_id(order_id):
        return "bad order_id"
    kind = doc.get("type")
    if type(kind) is not str or kind not in _TYPES:
        return "bad type"
    ts = doc.get("ts_ms")
    if not _is_int_below(ts, MAX_TS_MS):
        return "bad ts_ms"
    user_id = doc.get("user_id")
    if kind == CREATED:
        if not _is_id(user_id):
            return "bad user_id"
    elif user_id is not None and (type(user_id) is not str or _CONTROL.search(user_id)):
        return "bad user_id"
    amount = doc.get("amount_cents")
    if (kind in (CREATED, PAYMENT) or amount is not None) and not _is_int_below(amount, MAX_AMOUNT):
        return "bad amount_cents"
    if key is not None:
        try:
            if key.decode("utf-8") != order_id:
                return "key is not the order_id"
        except UnicodeDecodeError:
            return "key is not UTF-8"
    return Event(event_id, kind, order_id, ts, user_id, amount)  # type: ignore[arg-type]


# -- the dead-letter rule -----------------------------------------------------------------


def _dlq_key(key: bytes | None) -> bytes | None:
    if key is None or len(key) <= DLQ_KEY_MAX_BYTES:
        return key
    return hashlib.sha256(key).hexdigest().encode("ascii")


def dlq_problems(
    record_key: bytes | None,
    record: bytes | None,
    where: tuple[str, int, int],
    original_key: bytes | None,
    original: bytes | None,
    *,
    empty_key_ok: bool = False,
) -> list[str]:
    """What is wrong with a dead letter for the bad record ``original`` at ``where``
    (nothing: an empty list). ``empty_key_ok``: a keyless original may also be
    dead-lettered with an empty key (the later stages do so)."""
    if record is None:
        return ["a tombstone"]
    problems: list[str] = []
    if len(record) > DLQ_MAX_BYTES:
        problems.append(f"{len(record)} bytes, over {DLQ_MAX_BYTES}")
    want_key = _dlq_key(original_key)
    if record_key != want_key and not (empty_key_ok and original_key is None and record_key == b""):
        problems.append(f"key {_short(record_key)}, expected {_short(want_key)}")
    try:
        doc = json.loads(record)
    except ValueError:
        return [*problems, "not JSON"]
    if type(doc) is not dict:
        return [*problems, "not a JSON object"]
    reason = doc.get("reason")
    if type(reason) is not str or not reason:
        problems.append("no reason")
    elif len(reason.encode("utf-8", errors="replace")) > REASON_MAX_BYTES:
        problems.append(f"reason over {REASON_MAX_BYTES} bytes")
    if (doc.get("topic"), doc.get("partition"), doc.get("offset")) != where or not all(
        type(doc.get(f)) is int for f in ("partition", "offset")
    ):
        problems.append("topic, partition or offset wrong")
    problems.extend(_raw_problems(doc, original))
    return problems


def _raw_problems(doc: dict[str, Any], original: bytes | None) -> list[str]:
    """``raw`` / ``raw_b64`` (and ``raw_size``, ``raw_sha256`` when cut) against the
    original value."""
    cut = "raw_size" in doc or "raw_sha256" in doc
    if original is None:
        if "raw" not in doc or doc["raw"] is not None or "raw_b64" in doc or cut:
            return ['a tombstone must give "raw": null and nothing else']
        return []
    try:
        original.decode("utf-8")
        name, other = "raw", "raw_b64"
    except UnicodeDecodeError:
        name, other = "raw_b64", "raw"
    kept_field = doc.get(name)
    if other in doc or type(kept_field) is not str:
        return [f'the value must be in "{name}" (and only there)']
    try:
        kept = (
            kept_field.encode("utf-8")
            if name == "raw"
            else base64.b64decode(kept_field, validate=True)
        )
    except (UnicodeEncodeError, ValueError):
        return [f'"{name}" is not valid {"text" if name == "raw" else "base64"}']
    if not cut:
        if kept != original:
            return [f'"{name}" is not the whole original value ({len(kept)} of {len(original)})']
        return []
    problems = []
    if doc.get("raw_size") != len(original) or type(doc.get("raw_size")) is not int:
        problems.append(f"raw_size {doc.get('raw_size')!r}, expected {len(original)}")
    if doc.get("raw_sha256") != hashlib.sha256(original).hexdigest():
        problems.append("raw_sha256 is not the original's")
    if not original.startswith(kept) or len(kept) >= len(original):
        problems.append(f'"{name}" is not a proper beginning of the original value')
    # A cut that was not needed loses input for nothing: the whole must not have fit.
    whole = {k: v for k, v in doc.items() if k not in ("raw_size", "raw_sha256")}
    whole[name] = original.decode("utf-8") if name == "raw" else base64.b64encode(original).decode()
    if len(_json_bytes(whole)) <= DLQ_MAX_BYTES:
        problems.append("cut although the whole value fits in a dead letter")
    return problems


def _json_bytes(doc: dict[str, Any]) -> bytes:
    # Escapes as the workers' JSON does (UTF-8 as is, control characters escaped).
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


# -- the dedup promises, order-independently -----------------------------------------------


def dedup_faults(copies: Sequence[tuple[int, bool]], window_ms: int) -> tuple[int, int, str]:
    """The copies of one ``event_id`` as (arrival ms, forwarded): how many duplicates and
    losses the contract sees in them, and a note ("" when none).

    (b) a valid id must be forwarded at least once; (c) no two forwards less than the
    window apart; (d) every copy within the window of some forward, otherwise it should
    have been forwarded itself: one loss per run of such copies that one forward could
    have covered.
    """
    forwards = sorted(a for a, f in copies if f)
    if not forwards:
        return 0, 1, "never forwarded"
    duplicates = sum(1 for x, y in itertools.pairwise(forwards) if y - x < window_ms)
    uncovered = []
    for arrival, forwarded in copies:
        if forwarded:
            continue
        i = bisect.bisect_left(forwards, arrival)
        near = [forwards[j] for j in (i - 1, i) if 0 <= j < len(forwards)]
        if all(abs(arrival - f) >= window_ms for f in near):
            uncovered.append(arrival)
    losses, start = 0, None
    for arrival in sorted(uncovered):
        if start is None or arrival - start >= window_ms:
            losses, start = losses + 1, arrival
    notes = []
    if duplicates:
        notes.append(f"forwarded {duplicates + 1}x within the window, at {forwards[:4]}")
    if losses:
        notes.append(f"copies at {sorted(uncovered)[:4]} not within the window of a forward")
    return duplicates, losses, "; ".join(notes)


# -- the contract's state machine -------------------------------------------------------


class OrderRow:
    """A row of the ``orders`` table, as the web view returns it."""

    __slots__ = (
        "amount_cents",
        "order_id",
        "paid_cents",
        "status",
        "updated_ms",
        "user_id",
        "version",
    )

    def __init__(self, order_id: str, user_id: str | None, amount_cents: int, ts_ms: int) -> None:
        self.order_id = order_id
        self.status = "CREATED"
        self.version = 1
        self.user_id = user_id
        self.amount_cents = amount_cents
        self.paid_cents = 0
        self.updated_ms = ts_ms

    def to_json(self) -> dict[str, Any]:
        return {
            "order_id": self.order_id,
            "status": self.status,
            "version": self.version,
            "user_id": self.user_id,
            "amount_cents": self.amount_cents,
            "paid_cents": self.paid_cents,
            "updated_ms": self.updated_ms,
        }


class BalanceRow:
    """A row of the ``users.balances`` table, as the web view returns it."""

    __slots__ = ("balance_cents", "paid_orders", "user_id", "version")

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.balance_cents = 0
        self.version = 0
        self.paid_orders = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "balance_cents": self.balance_cents,
            "version": self.version,
            "paid_orders": self.paid_orders,
        }


def coupon_id_of(order_id: str) -> str:
    """The coupon id of an order: deterministic from the order id (the workers' formula,
    written down again here)."""
    return "cpn-" + hashlib.sha256(b"coupon:" + order_id.encode()).hexdigest()[:24]


#: a comparable output record: (identity within its order, key + canonical JSON)
Item = tuple[str, bytes]


def _canonical(key: bytes | None, doc: Any) -> bytes:
    # Sorted keys: field order is free; orjson keeps 1, 1.0 and true apart.
    return (
        (key if key is not None else b"<no key>")
        + b"\x00"
        + orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    )


#: stands for a rejection reason that is present and bounded (its wording is free)
_REASON_OK = True


class Machine:
    """The state machine of the contract, replayed over what the orders stage consumed.

    NEW -> CREATED on OrderCreated; CREATED -> PAID when the total paid reaches the
    amount (a partial payment is recorded, not a transition); PAID -> SHIPPED;
    CREATED or PAID -> CANCELLED; anything else is rejected with the current state.
    ``version`` rises by one per transition; reaching PAID issues one coupon and
    credits the user, cancelling a PAID order debits it.
    """

    def __init__(self, want: dict[str, Sequences]) -> None:
        self.orders: dict[str, OrderRow] = {}
        self.balances: dict[str, BalanceRow] = {}
        self.want = want

    def apply(self, e: Event) -> None:
        order = self.orders.get(e.order_id)
        status = order.status if order is not None else "NEW"
        if e.type == CREATED:
            if order is not None:
                return self._reject(e, status)
            order = OrderRow(e.order_id, e.user_id, e.amount_cents or 0, e.ts_ms)
            self.orders[e.order_id] = order
            return self._change(e, "NEW", order)
        if order is None:
            return self._reject(e, status)
        if e.type == PAYMENT:
            if status != "CREATED":
                return self._reject(e, status)
            order.paid_cents += e.amount_cents or 0
            order.updated_ms = e.ts_ms
            if order.paid_cents < order.amount_cents:
                return None
            self._move(e, order, "PAID")
            user = order.user_id or ""
            coupon = {
                "coupon_id": coupon_id_of(e.order_id),
                "order_id": e.order_id,
                "user_id": user,
                "amount_cents": order.amount_cents,
            }
            self.want["coupons"].expect(
                e.order_id, ("coupon", _canonical(e.order_id.encode(), coupon))
            )
            return self._delta(e, order, order.amount_cents, 1)
        if e.type == SHIPPED:
            if status != "PAID":
                return self._reject(e, status)
            return self._move(e, order, "SHIPPED")
        if status not in ("CREATED", "PAID"):
            return self._reject(e, status)
        self._move(e, order, "CANCELLED")
        if status == "PAID":
            self._delta(e, order, -order.amount_cents, -1)
        return None

    def _move(self, e: Event, order: OrderRow, to: str) -> None:
        before = order.status
        order.status, order.version, order.updated_ms = to, order.version + 1, e.ts_ms
        self._change(e, before, order)

    def _change(self, e: Event, before: str, order: OrderRow) -> None:
        doc = {
            "event_id": e.event_id,
            "order_id": e.order_id,
            "from": before,
            "to": order.status,
            "version": order.version,
            "ts_ms": e.ts_ms,
        }
        self.want["changes"].expect(e.order_id, (e.event_id, _canonical(e.order_id.encode(), doc)))

    def _reject(self, e: Event, state: str) -> None:
        doc = {"event_id": e.event_id, "order_id": e.order_id, "reason": _REASON_OK, "state": state}
        self.want["rejected"].expect(e.order_id, (e.event_id, _canonical(e.order_id.encode(), doc)))

    def _delta(self, e: Event, order: OrderRow, cents: int, paid_orders: int) -> None:
        user = order.user_id or ""
        doc = {
            "user_id": user,
            "order_id": e.order_id,
            "delta_cents": cents,
            "version": order.version,
            "event_id": e.event_id,
            "paid_orders": paid_orders,
        }
        self.want["deltas"].expect(e.order_id, (e.event_id, _canonical(user.encode(), doc)))
        balance = self.balances.get(user)
        if balance is None:
            balance = self.balances[user] = BalanceRow(user)
        balance.balance_cents += cents
        balance.version += 1
        balance.paid_orders += paid_orders


class Sequences:
    """Per order, the expected records of one output topic, against the actual ones.

    The actual records are compared as they are read and kept only for orders where
    they went astray, so a correct topic costs no second copy in memory.
    """

    def __init__(self) -> None:
        self.want: dict[str, list[Item]] = {}
        self.pos: dict[str, int] = {}
        self.astray: dict[str, list[Item]] = {}
        self.expected = 0

    def expect(self, order: str, item: Item) -> None:
        self.want.setdefault(order, []).append(item)
        self.expected += 1

    def actual(self, order: str, item: Item) -> None:
        astray = self.astray.get(order)
        if astray is not None:
            astray.append(item)
            return
        p = self.pos.get(order, 0)
        want = self.want.get(order)
        if want is not None and p < len(want) and want[p] == item:
            self.pos[order] = p + 1
        else:
            self.astray[order] = [*(want or [])[:p], item]

    def diff(self, check: TopicCheck) -> None:
        for order in self.want.keys() | self.astray.keys():
            want = self.want.get(order, [])
            got = self.astray.get(order)
            if got is None:
                got = want[: self.pos.get(order, 0)]
            if got != want:
                diff_order(check, order, want, got)


def diff_order(
    check: TopicCheck,
    order: str,
    want: list[Item],
    got: list[Item],
    done: Collection[str] = (),
) -> None:
    """One order's records differ from the expected ones: say how. ``done``: identities
    already matched earlier (``reconcile --follow``'s earlier rounds): another copy of
    one is a duplicate, not an unexpected record."""
    if want == got:
        return
    wanted = Counter(i for i, _ in want)
    gotten = Counter(i for i, _ in got)
    found = False
    for ident in sorted(wanted.keys() | gotten.keys()):
        nw, ng = wanted[ident], gotten[ident]
        if nw == 0:
            if ident in done:
                check.duplicates += ng
                check.note(f"{order}: {ident} again, after it was matched")
            else:
                check.unexpected += ng
                check.note(f"{order}: unexpected {_body(got, ident)}")
            found = True
            continue
        if ng > nw:
            check.duplicates += ng - nw
            check.note(f"{order}: {ident} {ng}x, expected {nw}x")
            found = True
        elif ng < nw:
            check.missing += nw - ng
            check.note(f"{order}: missing {_body(want, ident)}")
            found = True
        if ng:
            same = Counter(b for i, b in want if i == ident) & Counter(
                b for i, b in got if i == ident
            )
            wrong = min(nw, ng) - sum(same.values())
            if wrong > 0:
                check.mismatched += wrong
                check.note(f"{order}: {_body(got, ident)}, expected {_body(want, ident)}")
                found = True
    if not found:
        check.out_of_order += 1
        check.note(
            f"{order}: out of order: {[i for i, _ in got][:6]}, expected {[i for i, _ in want][:6]}"
        )


def _body(items: list[Item], ident: str) -> str:
    body = next(b for i, b in items if i == ident)
    key, _, doc = body.partition(b"\x00")
    return f"key {key.decode(errors='replace')!r} {doc.decode(errors='replace')}"


# -- spilling to disk -----------------------------------------------------------------------

#: records per bucket (of the largest grouping) that one bucket's pass holds in memory:
#: a few hundred bytes each once loaded, so a bucket's work stays near 100 MB
PER_BUCKET = 200_000
#: below this many input records the rebuilt tables are kept in the report by default
KEEP_STATE_UP_TO = 100_000
#: where the buckets go when no ``spill_dir`` is given (default: the system's temp dir)
SPILL_DIR_ENV = "PIPELINE_RECONCILE_SPILL_DIR"
_CHUNK_LEN = struct.Struct(">I")
#: what one fetch may bring: aiokafka holds a fetch per partition decoded at once, so
#: this, not the records' sizes, sets the reading's memory
FETCH_PARTITION_BYTES = 1024 * 1024
FETCH_BYTES = 8 * 1024 * 1024


class SpillDir:
    """The temp directory of one reconcile, made when the first chunk is written (a
    small run, all in memory, leaves nothing behind) and removed by :meth:`remove`, or
    when it is garbage-collected."""

    def __init__(self, parent: str | None) -> None:
        self.parent = parent
        self.path: str | None = None
        self._remove: weakref.finalize[Any, Any] | None = None

    def get(self) -> str:
        if self.path is None:
            self.path = tempfile.mkdtemp(prefix="reconcile-", dir=self.parent)
            self._remove = weakref.finalize(self, shutil.rmtree, self.path, True)
        return self.path

    def remove(self) -> None:
        if self._remove is not None:
            self._remove()


class Spill:
    """Records of one grouping, cut into ``buckets`` files by the caller's bucket number.

    Records are tuples of str, bytes, int, bool and None; they are written in chunks
    (one ``marshal`` dump per few hundred records: per-record framing would cost more
    than the record) and read back in the order they were added. The files only live
    for one run of one process, so marshal's version-specific format is no concern.
    """

    def __init__(self, directory: SpillDir, name: str, buckets: int) -> None:
        self.buckets = buckets
        self.directory = directory
        self.name = name
        self.pending: list[list[tuple[Any, ...]]] = [[] for _ in range(buckets)]
        # Everything pending at once stays within a few tens of MB whatever the count.
        self.flush_at = max(128, 50_000 // buckets)
        #: one file per bucket and writing process: two never append to one file
        self.tag = "main"

    def add(self, bucket: int, record: tuple[Any, ...]) -> None:
        """Add a record (the hot paths append to ``pending`` themselves, and
        :meth:`settle` now and then)."""
        self.pending[bucket].append(record)

    def settle(self) -> None:
        """Write out the buckets that have a chunk's worth pending (called between
        batches of records: a length check per record would cost more)."""
        flush_at = self.flush_at
        for bucket, pending in enumerate(self.pending):
            if len(pending) >= flush_at:
                self._flush(bucket)

    def _flush(self, bucket: int) -> None:
        pending = self.pending[bucket]
        if not pending:
            return
        data = marshal.dumps(pending)
        prefix = os.path.join(self.directory.get(), self.name)
        with open(f"{prefix}-{bucket}.{self.tag}", "ab") as f:
            f.write(_CHUNK_LEN.pack(len(data)) + data)
        self.pending[bucket] = []

    def flush(self) -> None:
        for bucket in range(self.buckets):
            self._flush(bucket)

    def take(self, bucket: int) -> Iterator[tuple[Any, ...]]:
        """The bucket's records, in the order added by each process (this one's
        first); its files are gone afterwards."""
        pending = self.pending[bucket]
        if self.directory.path is None:
            # Nothing was ever written: all of it is here.
            self.pending[bucket] = []
            yield from pending
            return
        self._flush(bucket)
        prefix = os.path.join(self.directory.path, self.name)
        mine = f"{prefix}-{bucket}.{self.tag}"
        paths = sorted(glob.glob(glob.escape(f"{prefix}-{bucket}.") + "*"))
        for path in sorted(paths, key=lambda p: p != mine):
            with open(path, "rb") as f:
                data = f.read()
            os.unlink(path)
            at, end = 0, len(data)
            while at < end:
                (size,) = _CHUNK_LEN.unpack_from(data, at)
                at += 4
                yield from marshal.loads(data[at : at + size])
                at += size


def bucket_count(records: int, per_bucket: int = PER_BUCKET) -> int:
    """Buckets for a grouping of about ``records`` records: one when they fit."""
    return max(1, min(-(-records // per_bucket), 60_000))


# -- the whole check ------------------------------------------------------------------------


class Record(Protocol):
    """A record as the checks read it: a :class:`~pipeline.kafka_io.Msg` (tests) or
    aiokafka's own record (:func:`reconcile`, which saves making a Msg of each)."""

    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


def copy_digest(value: bytes | None) -> bytes:
    return hashlib.blake2b(value or b"", digest_size=16).digest()


def src_of(headers: Sequence[tuple[str, bytes]]) -> tuple[int, int] | None:
    """Where a forward's source copy is on ``orders.raw``, by its ``pipeline.src`` header
    (also read by the history checker and ``reconcile --follow``)."""
    for name, raw in headers or ():
        if name == SRC_HEADER:
            try:
                p, o = raw.decode("ascii").split(":")
                return int(p), int(o)
            except ValueError:
                return None
    return None


def _where_key(partition: int, offset: int) -> int:
    return partition << 64 | offset


def _absorb(into: TopicCheck, part: TopicCheck) -> None:
    """Add a check made over one bucket to the whole topic's."""
    into.expected += part.expected
    into.actual += part.actual
    into.duplicates += part.duplicates
    into.missing += part.missing
    into.unexpected += part.unexpected
    into.out_of_order += part.out_of_order
    into.mismatched += part.mismatched
    for text in part.examples:
        into.note(text)


#: record kinds on the spills (the first field of each record)
_VALID, _BAD, _FORWARD = 0, 1, 2  # by event: orders.raw and the forwards
_LETTER, _EXPECT = 0, 1  # by dead-letter coordinates: orders.dlq and bad records
_EVENT, _OUTPUT, _ROW = 0, 1, 2  # by order: orders.unique, the outputs, the orders table
_PARTIAL = 0  # by user: a bucket's sum of deltas; and _ROW: the balances table
_KINDS = ("changes", "rejected", "coupons", "deltas")


class Reconciler:
    """The checks, fed one record at a time (:func:`reconcile` reads; tests feed).

    Two passes, Grace-hash style, so that memory does not grow with the input. While
    reading (``on_*``), each record is judged on its own and the few fields the
    grouped checks need go to a bucket on disk, chosen by the key that check groups
    by: the ``event_id`` for the dedup promises (a raw copy, and the forwards of it,
    which follow their source copy to its bucket), the coordinates a dead letter is
    about, the order for the state machine, the outputs and the orders table, the user
    for the balances. Then (``end_raw``, ``end_outputs``, ``finish``) one bucket at a
    time is loaded and checked, and only counts and a few examples are kept; with
    ``workers`` above one, by that many forked processes, each a bucket at a time.

    With more than one bucket, ``orders.raw`` must be fed before ``orders.unique``: a
    forward goes to the bucket its source copy went to, remembered in one or two bytes
    per input offset (the only memory that grows with the input: 10 MB for 10 million).
    ``keep_state`` keeps the rebuilt ``orders`` and ``users.balances`` tables for the
    report (unbounded: for small runs whose callers compare them with web views).
    ``check_tables``: the changelogs fed with ``on_table`` are checked too.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        buckets: int = 1,
        spill_dir: str | None = None,
        keep_state: bool = True,
        check_tables: bool = False,
        workers: int = 1,
    ) -> None:
        s = settings
        self.raw_topic = s.topic_raw
        self.unique_topic = s.topic_unique
        self.window_ms = s.dedup_window_ms
        self.report = Report()
        self.unique = TopicCheck(s.topic_unique)
        self.dlq = TopicCheck(s.topic_dlq)
        self.kinds = {
            "changes": s.topic_changes,
            "rejected": s.topic_rejected,
            "coupons": s.topic_coupons,
            "deltas": s.deltas_topic,
        }
        self.outputs = {k: TopicCheck(t) for k, t in self.kinds.items()}
        self.changelogs = {
            "orders": f"{s.app_id}-orders-changelog",
            "balances": f"{s.app_id}-users.balances-changelog",
        }
        self.tables = {k: TopicCheck(t) for k, t in self.changelogs.items()}
        self.keyless = dict.fromkeys(self.changelogs, 0)
        self.check_tables = check_tables
        self.keep_state = keep_state
        #: the rebuilt tables, when kept
        self.machine = Machine({k: Sequences() for k in _KINDS})
        self.buckets = buckets
        self.spill_dir = SpillDir(spill_dir or os.environ.get(SPILL_DIR_ENV) or None)
        self.by_event = Spill(self.spill_dir, "event", buckets)
        self.by_letter = Spill(self.spill_dir, "letter", buckets)
        self.by_order = Spill(self.spill_dir, "order", buckets)
        self.by_order_place = Spill(self.spill_dir, "place", buckets)
        self.by_user = Spill(self.spill_dir, "user", buckets)
        self.spills = (
            self.by_event,
            self.by_letter,
            self.by_order,
            self.by_order_place,
            self.by_user,
        )
        self.workers = workers
        #: per raw partition, the bucket of the record at each offset (``_NOWHERE``: none)
        self.placed: dict[int, array[int]] = {}
        self._typecode = "B" if buckets < 255 else "H"
        self._nowhere = 255 if buckets < 255 else 65535
        self._unique_begun = False
        self.expected_letters = 0

    def close(self) -> None:
        """Remove the spill directory (the buckets are deleted as they are checked; this
        is for a run that ended early)."""
        self.spill_dir.remove()

    # -- routing
    def _coords_bucket(self, partition: int, offset: int) -> int:
        return (partition * 1_000_003 + offset) % self.buckets

    def _letter_bucket(self, topic: str, partition: int, offset: int) -> int:
        return hash((topic, partition, offset)) % self.buckets

    def _key_bucket(self, name: str) -> int:
        # str hashes are salted per process (no input can crowd one bucket); the bucket
        # workers are forked from this process, so they share the salt.
        return hash(name) % self.buckets

    def _place(self, partition: int, offset: int, bucket: int) -> None:
        placed = self.placed.get(partition)
        if placed is None:
            placed = self.placed[partition] = array(self._typecode)
        if offset >= len(placed):
            grow = max(offset + 1 - len(placed), len(placed))
            placed.extend(array(self._typecode, [self._nowhere]) * grow)
        placed[offset] = bucket

    def _source_bucket(self, partition: int, offset: int) -> int:
        placed = self.placed.get(partition)
        if placed is not None and 0 <= offset < len(placed):
            bucket = placed[offset]
            if bucket != self._nowhere:
                return bucket
        return self._coords_bucket(partition, offset)

    def presize(self, ends: dict[int, int]) -> None:
        """Room for the raw offsets to come (end offsets), instead of growing."""
        for p, end in ends.items():
            if self.buckets > 1 and p not in self.placed:
                self.placed[p] = array(self._typecode, [self._nowhere]) * end

    def _expect_letter(
        self, where: tuple[str, int, int], key: bytes | None, value: bytes | None, *, raw: bool
    ) -> None:
        self.by_letter.add(self._letter_bucket(*where), (_EXPECT, *where, key, value, raw))

    def settle(self) -> None:
        """Write out what is pending (between batches of records)."""
        for spill in self.spills:
            spill.settle()

    # -- the buckets, here or in worker processes
    def _each_bucket(self, step: Callable[[int], None]) -> None:
        """``step`` (a method) over every bucket: in this process, or spread over
        ``workers`` forked processes, whose counts and examples are added up here in
        bucket order (a bucket's work is independent of every other's)."""
        if self.workers <= 1 or self.buckets <= 1:
            for bucket in range(self.buckets):
                step(bucket)
            return
        global _FORKED
        # The workers read the buckets from disk: nothing may stay pending here, and
        # the directory must be there before they write to it.
        self.spill_dir.get()
        for spill in self.spills:
            spill.flush()
        _FORKED = (self, step.__name__)
        try:
            with multiprocessing.get_context("fork").Pool(self.workers) as pool:
                for part in pool.imap(_bucket_in_worker, range(self.buckets)):
                    self._add_part(part)
        finally:
            _FORKED = None

    def _part(self) -> _Part:
        return _Part(
            [self.unique, self.dlq, *self.outputs.values(), *self.tables.values()],
            self.expected_letters,
            self.machine.orders,
            self.machine.balances,
        )

    def _fresh(self) -> None:
        """In a worker, before a bucket: counts from zero, writing files of its own."""
        self.unique = TopicCheck(self.unique.topic)
        self.dlq = TopicCheck(self.dlq.topic)
        self.outputs = {k: TopicCheck(c.topic) for k, c in self.outputs.items()}
        self.tables = {k: TopicCheck(c.topic) for k, c in self.tables.items()}
        self.expected_letters = 0
        self.machine = Machine({})
        for spill in self.spills:
            spill.tag = str(os.getpid())
            spill.pending = [[] for _ in range(spill.buckets)]

    def _add_part(self, part: _Part) -> None:
        mine = [self.unique, self.dlq, *self.outputs.values(), *self.tables.values()]
        for into, check in zip(mine, part.checks, strict=True):
            _absorb(into, check)
        self.expected_letters += part.expected_letters
        self.machine.orders.update(part.orders)
        self.machine.balances.update(part.balances)

    # -- orders.raw: each copy, to the bucket of its event_id
    def on_raw(self, m: Record) -> None:
        if self._unique_begun and self.buckets > 1:
            raise RuntimeError("with several buckets, orders.raw must be read first")
        self.report.input_records += 1
        p, o = m.partition, m.offset
        event = validate(m.value, m.key)
        if isinstance(event, str):
            self._expect_letter((self.raw_topic, p, o), m.key, m.value, raw=True)
            bucket = self._coords_bucket(p, o)
            self.by_event.pending[bucket].append((_BAD, p, o))
        else:
            bucket = hash(event.event_id) % self.buckets
            self.by_event.pending[bucket].append(
                (
                    _VALID,
                    p,
                    o,
                    event.event_id,
                    m.timestamp,
                    copy_digest(m.value),
                    m.key is not None,
                    event.order_id,
                ),
            )
        if self.buckets > 1:
            self._place(p, o, bucket)

    # -- orders.unique: the forwards (to their source copy), and the orders stage's input
    def on_unique(self, m: Record) -> None:
        self._unique_begun = True
        uc = self.unique
        uc.actual += 1
        event = validate(m.value, None)
        if isinstance(event, str):
            uc.unexpected += 1
            uc.note(f"{self.unique_topic}:{m.partition}:{m.offset}: not a valid event ({event})")
            # The orders stage's right answer to it: a dead letter.
            self._expect_letter(
                (self.unique_topic, m.partition, m.offset), m.key, m.value, raw=False
            )
            return
        keyed_right = m.key == event.order_id.encode()
        if not keyed_right:
            uc.mismatched += 1
            uc.note(
                f"{self.unique_topic}:{m.partition}:{m.offset}: event {event.event_id} keyed "
                f"{_short(m.key)}, not by its order_id"
            )
        src = src_of(m.headers)
        if src is None:
            uc.unexpected += 1
            uc.note(
                f"{self.unique_topic}:{m.partition}:{m.offset}: event {event.event_id} without"
                f" a {SRC_HEADER} header"
            )
        else:
            rp, ro = src
            bucket = self._source_bucket(rp, ro) if self.buckets > 1 else 0
            self.by_event.pending[bucket].append(
                (_FORWARD, rp, ro, copy_digest(m.value), m.timestamp, m.partition, m.offset)
            )
        if m.key is None or keyed_right:
            self.by_order.pending[hash(event.order_id) % self.buckets].append((_EVENT, *event))
        else:
            self._expect_letter(
                (self.unique_topic, m.partition, m.offset), m.key, m.value, raw=False
            )

    # -- orders.dlq: each letter, to the bucket of what it is about
    def on_dlq(self, m: Record) -> None:
        self.dlq.actual += 1
        try:
            doc = orjson.loads(m.value or b"")
            where = (doc["topic"], doc["partition"], doc["offset"])
            if not (type(where[0]) is str and type(where[1]) is int and type(where[2]) is int):
                raise TypeError(where)
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.dlq.unexpected += 1
            self.dlq.note(f"undecodable dead letter at {m.partition}:{m.offset}")
            return
        self.by_letter.add(
            self._letter_bucket(*where), (_LETTER, *where, m.partition, m.offset, m.key, m.value)
        )

    # -- changes, rejected, coupons, deltas: to the bucket of their order
    def on_output(self, kind: str, m: Record) -> None:
        check = self.outputs[kind]
        check.actual += 1
        try:
            doc = orjson.loads(m.value or b"")
            order = doc["order_id"]
            if type(order) is not str:
                raise TypeError(order)
        except (orjson.JSONDecodeError, KeyError, TypeError):
            check.unexpected += 1
            check.note(f"undecodable record at {m.partition}:{m.offset}")
            return
        if kind == "rejected":
            reason = doc.get("reason")
            if type(reason) is str and reason and len(reason.encode()) <= REASON_MAX_BYTES:
                doc["reason"] = _REASON_OK
        ident = "coupon" if kind == "coupons" else str(doc.get("event_id"))
        self.by_order.pending[hash(order) % self.buckets].append(
            (_OUTPUT, kind, order, ident, _canonical(m.key, doc))
        )

    # -- the tables' changelogs ("orders" or "balances"): to the bucket of their key
    def on_table(self, table: str, m: Record) -> None:
        if m.key is None:
            self.keyless[table] += 1
            return
        spill = self.by_order if table == "orders" else self.by_user
        name = m.key.decode("utf-8", errors="replace")
        spill.add(self._key_bucket(name), (_ROW, m.key, m.value))

    # -- the grouped checks, one bucket at a time
    def end_raw(self) -> None:
        """The dedup promises (a to f): every raw copy against its forwards, per
        ``event_id``; then the order of each order's forwards per raw partition."""
        self._each_bucket(self._forwards_of)
        self._each_bucket(self._places_of)
        uc = self.unique
        # What a correct run forwards: one per distinct id, and again for copies that
        # arrived a window or more apart, which only the actual forwards tell.
        uc.expected = uc.actual - uc.duplicates - uc.unexpected + uc.missing

    def _forwards_of(self, bucket: int) -> None:
        uc = self.unique
        raw_topic = self.raw_topic
        places, buckets = self.by_order_place.pending, self.buckets
        forwards: dict[int, tuple[Any, ...]] = {}
        copies_in: list[tuple[Any, ...]] = []
        for rec in self.by_event.take(bucket):
            if rec[0] != _FORWARD:
                copies_in.append(rec)
                continue
            at = rec[1] << 64 | rec[2]
            if at in forwards:
                uc.duplicates += 1
                uc.note(
                    f"{self.unique_topic}:{rec[5]}:{rec[6]}: the copy at {raw_topic}:{rec[1]}:"
                    f"{rec[2]} forwarded again"
                )
            else:
                forwards[at] = rec
        #: per valid event_id, its copies: arrival * 2 + forwarded, one int or a list
        copies: dict[str, int | list[int]] = {}
        for rec in copies_in:
            p, o = rec[1], rec[2]
            forward = forwards.pop(p << 64 | o, None)
            if rec[0] == _BAD:
                if forward is not None:
                    uc.unexpected += 1
                    uc.note(f"bad input at {raw_topic}:{p}:{o} was forwarded")
                continue
            _, _, _, event_id, arrival, digest, keyed, order_id = rec
            flag = 0
            if forward is not None:
                flag = 1
                _, _, _, fdigest, ts, up, uo = forward
                if fdigest != digest or ts != arrival:
                    uc.mismatched += 1
                    uc.note(
                        f"{self.unique_topic}:{up}:{uo}: not the copy at {raw_topic}:{p}:{o} ("
                        + ("other bytes" if fdigest != digest else f"timestamp {ts}")
                        + f", arrival {arrival})"
                    )
                if keyed:
                    places[hash(order_id) % buckets].append((order_id, p, o, up, uo))
            entry = arrival * 2 + flag
            seen = copies.get(event_id)
            if seen is None:
                copies[event_id] = entry
            elif type(seen) is int:
                copies[event_id] = [seen, entry]
            else:
                seen.append(entry)  # type: ignore[union-attr]
        for at in forwards:
            uc.unexpected += 1
            uc.note(f"a forward of {raw_topic}:{at >> 64}:{at & (2**64 - 1)}, which does not exist")
        for event_id, seen in copies.items():
            if type(seen) is int:
                if seen & 1:
                    continue
                entries = [(seen >> 1, False)]
            else:
                entries = [(c >> 1, bool(c & 1)) for c in seen]  # type: ignore[union-attr]
            duplicates, losses, note = dedup_faults(entries, self.window_ms)
            if duplicates or losses:
                uc.duplicates += duplicates
                uc.missing += losses
                uc.note(f"event {event_id}: {note}")
        self.by_order_place.settle()

    def _places_of(self, bucket: int) -> None:
        """(e): per order and raw partition, in offset order, its keyed copies' forwards
        within one partition of orders.unique must not go backwards."""
        uc = self.unique
        places: dict[str, list[tuple[int, int, int, int]]] = {}
        for order_id, p, o, up, uo in self.by_order_place.take(bucket):
            places.setdefault(order_id, []).append((p, o, up, uo))
        for order_id, rows in places.items():
            if len(rows) == 1:
                continue
            rows.sort()
            for (p0, _, up0, uo0), (p, o, up, uo) in itertools.pairwise(rows):
                if p0 == p and up0 == up and uo0 > uo:
                    uc.out_of_order += 1
                    uc.note(
                        f"order {order_id}: the copy at {self.raw_topic}:{p}:{o} forwarded"
                        " before an earlier one of its partition"
                    )

    def end_outputs(self) -> None:
        """Per order: the state machine replayed over orders.unique against the outputs
        (and the orders table); then per user the balances."""
        self._each_bucket(self._orders_of)
        self._each_bucket(self._balances_of)

    def _orders_of(self, bucket: int) -> None:
        want = {k: Sequences() for k in _KINDS}
        machine = Machine(want)
        rows: dict[bytes, bytes | None] = {}
        for rec in self.by_order.take(bucket):
            tag = rec[0]
            if tag == _EVENT:
                machine.apply(Event(*rec[1:]))
            elif tag == _OUTPUT:
                want[rec[1]].actual(rec[2], (rec[3], rec[4]))
            else:
                rows[rec[1]] = rec[2]
        for kind, check in self.outputs.items():
            check.expected += want[kind].expected
            want[kind].diff(check)
        if self.check_tables:
            part = self.table_check(
                self.changelogs["orders"],
                rows,
                {k: v.to_json() for k, v in machine.orders.items()},
            )
            _absorb(self.tables["orders"], part)
        for user, row in machine.balances.items():
            self.by_user.add(
                self._key_bucket(user),
                (_PARTIAL, user, row.balance_cents, row.version, row.paid_orders),
            )
        self.by_user.settle()
        if self.keep_state:
            self.machine.orders.update(machine.orders)

    def _balances_of(self, bucket: int) -> None:
        balances: dict[str, BalanceRow] = {}
        rows: dict[bytes, bytes | None] = {}
        for rec in self.by_user.take(bucket):
            if rec[0] == _PARTIAL:
                _, user, cents, versions, paid = rec
                row = balances.get(user)
                if row is None:
                    row = balances[user] = BalanceRow(user)
                row.balance_cents += cents
                row.version += versions
                row.paid_orders += paid
            else:
                rows[rec[1]] = rec[2]
        if self.check_tables:
            part = self.table_check(
                self.changelogs["balances"], rows, {k: v.to_json() for k, v in balances.items()}
            )
            _absorb(self.tables["balances"], part)
        if self.keep_state:
            self.machine.balances.update(balances)

    # -- the tables
    def table_check(
        self, changelog: str, rows: dict[bytes, bytes | None], want: dict[str, dict[str, Any]]
    ) -> TopicCheck:
        """The table's committed state (last value per key) against the replayed one."""
        check = TopicCheck(changelog, expected=len(want))
        present = {k: v for k, v in rows.items() if v is not None}
        check.actual = len(present)
        for key, raw in present.items():
            name = key.decode("utf-8", errors="replace")
            w = want.get(name)
            if w is None:
                check.unexpected += 1
                check.note(f"unexpected row {name}: {raw[:200]!r}")
                continue
            try:
                got = json.loads(raw)
            except ValueError:
                got = raw
            if not same_json(got, w):
                # For an order or a balance this is what a duplicate or a lost event
                # leaves behind.
                check.mismatched += 1
                check.note(f"row {name}: {raw[:300].decode(errors='replace')}, expected {w}")
        for name in want:
            if name.encode() not in present:
                check.missing += 1
                check.note(f"missing row {name}")
        return check

    # -- the dead letters: each bad record against the letters about it
    def _letters_of(self, bucket: int) -> None:
        dlq = self.dlq
        letters: dict[tuple[str, int, int], list[tuple[int, int, bytes | None, bytes | None]]]
        letters = {}
        expected = []
        for rec in self.by_letter.take(bucket):
            if rec[0] == _LETTER:
                _, topic, p, o, lp, lo, key, value = rec
                letters.setdefault((topic, p, o), []).append((lp, lo, key, value))
            else:
                expected.append(rec)
        for _, topic, p, o, key, value, raw in expected:
            where = (topic, p, o)
            self.expected_letters += 1
            found = letters.pop(where, None)
            name = f"{topic}:{p}:{o}"
            if not found:
                dlq.missing += 1
                dlq.note(f"no dead letter for bad input at {name}")
                continue
            if len(found) > 1:
                dlq.duplicates += len(found) - 1
                dlq.note(f"{len(found)} dead letters for {name}")
            _, _, lkey, lvalue = found[0]
            problems = dlq_problems(lkey, lvalue, where, key, value, empty_key_ok=not raw)
            if problems:
                dlq.mismatched += 1
                dlq.note(f"dead letter for {name}: {'; '.join(problems)}")
        for (topic, p, o), extra in letters.items():
            dlq.unexpected += len(extra)
            reason = ""
            with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
                reason = str(orjson.loads(extra[0][3] or b"")["reason"])[:200]
            dlq.note(f"a dead letter for {topic}:{p}:{o}, which is not bad input: {reason}")

    def finish(self) -> Report:
        self._each_bucket(self._letters_of)
        self.dlq.expected = self.expected_letters
        report = self.report
        report.checks[:0] = [self.unique, self.dlq, *self.outputs.values()]
        if self.check_tables:
            for table, check in self.tables.items():
                if self.keyless[table]:
                    check.unexpected += self.keyless[table]
                    check.note(f"{self.keyless[table]} records without a key")
                report.checks.append(check)
        report.orders = self.machine.orders
        report.balances = self.machine.balances
        self.close()
        return report


class _Part(NamedTuple):
    """What a worker found in one bucket: its checks (unique, dlq, the outputs, the
    tables), and the rebuilt rows when kept."""

    checks: list[TopicCheck]
    expected_letters: int
    orders: dict[str, OrderRow]
    balances: dict[str, BalanceRow]


#: the reconciler and the step a forked worker runs (set just before the fork)
_FORKED: tuple[Reconciler, str] | None = None


def _bucket_in_worker(bucket: int) -> _Part:
    assert _FORKED is not None
    r, step = _FORKED
    r._fresh()
    getattr(r, step)(bucket)
    for spill in r.spills:
        spill.flush()
    return r._part()


def same_json(a: Any, b: Any) -> bool:
    """Equal, and of the same JSON types (1, 1.0 and true are three different values)."""
    if type(a) is not type(b):
        return False
    if type(a) is dict:
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if type(a) is list:
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


async def read_batches(
    kafka: KafkaConnection | str, topic: str
) -> AsyncIterator[list[ConsumerRecord[bytes, bytes]]]:
    """Every committed record of ``topic`` up to its end offsets at the start, in the
    batches aiokafka fetched them in: what :func:`pipeline.kafka_io.read_topic` reads,
    without a generator step and a new object per record (a fifth of the reading)."""
    conn = kafka if isinstance(kafka, KafkaConnection) else KafkaConnection.plaintext(kafka)
    consumer = AIOKafkaConsumer(
        **conn.kwargs(),
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        group_id=None,
        max_partition_fetch_bytes=FETCH_PARTITION_BYTES,
        fetch_max_bytes=FETCH_BYTES,
    )
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic)
        if parts is None:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic)
        tps = [TopicPartition(topic, p) for p in sorted(parts or ())]
        ends = await consumer.end_offsets(tps) if tps else {}
        tps = [tp for tp in tps if ends[tp] > 0]
        if not tps:
            return
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        remaining = set(tps)
        while remaining:
            fetched = await consumer.getmany(*remaining, timeout_ms=1000)
            for tp, records in fetched.items():
                end = ends[tp]
                if records and records[-1].offset >= end:
                    records = [r for r in records if r.offset < end]
                if records:
                    yield records
            for tp in list(remaining):
                # Positions move past transaction markers too, so compare positions.
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()


class _Progress:
    """A progress bar on stderr, per topic read, when asked for (on a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    async def read(
        self, kafka: KafkaConnection | str, topic: str
    ) -> AsyncIterator[list[ConsumerRecord[bytes, bytes]]]:
        if not self.enabled:
            async for batch in read_batches(kafka, topic):
                yield batch
            return
        # Offsets count transaction markers too: the bar ends a little short of 100%.
        total = sum((await end_offsets(kafka, topic, committed=True)).values())
        n, drawn = 0, 0.0
        async for batch in read_batches(kafka, topic):
            n += len(batch)
            if time.monotonic() - drawn > 0.2:
                drawn = time.monotonic()
                self._draw(topic, n, total)
            yield batch
        self._draw(topic, n, total)
        sys.stderr.write("\n")

    @staticmethod
    def _draw(topic: str, n: int, total: int) -> None:
        share = min(n / total, 1.0) if total else 1.0
        bar = "#" * round(share * 30)
        sys.stderr.write(f"\r[{bar:<30}] {share:4.0%} {topic} {n:,}/{total:,}")
        sys.stderr.flush()


def transactional_topics(settings: Settings) -> list[str]:
    """Every topic the pipeline writes in transactions: none may hold one open."""
    s = settings
    return [
        s.topic_unique,
        s.topic_dlq,
        s.topic_changes,
        s.topic_rejected,
        s.topic_coupons,
        s.deltas_topic,
        s.by_order_topic,
        s.progress_topic,
        f"{s.app_id}-dedup-changelog",
        f"{s.app_id}-orders-changelog",
        f"{s.app_id}-users.balances-changelog",
    ]


async def open_transactions(
    kafka: KafkaConnection | str, topics: Iterable[str]
) -> dict[str, dict[int, tuple[int, int]]]:
    """Per topic, its partitions whose last stable offset is behind the high watermark
    (a transaction still open), with both."""
    found: dict[str, dict[int, tuple[int, int]]] = {}
    for topic in topics:
        lso = await end_offsets(kafka, topic, committed=True)
        hw = await end_offsets(kafka, topic, committed=False)
        open_parts = {p: (lso[p], hw[p]) for p in hw if lso.get(p) != hw[p]}
        if open_parts:
            found[topic] = open_parts
    return found


async def _topic_sizes(kafka: KafkaConnection | str, topics: dict[str, str]) -> dict[str, int]:
    """Records (and markers) per topic, from its end offsets: to size the buckets."""
    return {
        name: sum((await end_offsets(kafka, topic, committed=True)).values())
        for name, topic in topics.items()
    }


async def reconcile(
    settings: Settings,
    *,
    progress: bool = False,
    keep_state: bool | None = None,
    buckets: int | None = None,
    spill_dir: str | None = None,
    workers: int | None = None,
) -> Report:
    """Read every topic and judge it by the contract; the verdict and what differs.

    ``progress`` draws a bar on stderr while each topic is read. ``keep_state``: the
    rebuilt tables in ``Report.orders`` and ``Report.balances`` (default: only up to
    ``KEEP_STATE_UP_TO`` input records; they grow with the input). ``buckets``: how
    many pieces to check the input in (default: from the topics' sizes, so that one
    piece stays small); ``spill_dir``: where the pieces go meanwhile (default:
    ``$PIPELINE_RECONCILE_SPILL_DIR`` or the system's temp dir), removed at the end.
    ``workers``: processes that check the buckets once read (default: one per core, up
    to two; the reading itself is one process). The peak RSS reported is this process's
    plus ``workers`` times the largest worker's: a bound on their sum.
    """
    started = time.monotonic()
    bar = _Progress(progress)
    kafka = settings.kafka
    s = settings
    ends = await end_offsets(kafka, s.topic_raw, committed=True)
    raw = sum(ends.values())
    if buckets is None:
        sizes = await _topic_sizes(
            kafka,
            {
                "unique": s.topic_unique,
                "changes": s.topic_changes,
                "rejected": s.topic_rejected,
                "coupons": s.topic_coupons,
                "deltas": s.deltas_topic,
                "orders": f"{s.app_id}-orders-changelog",
            },
        )
        by_event = raw + sizes["unique"]
        by_order = sum(sizes.values())
        buckets = bucket_count(max(by_event, by_order))
    if keep_state is None:
        keep_state = raw <= KEEP_STATE_UP_TO
    if workers is None:
        workers = min(2, os.cpu_count() or 1) if buckets > 1 else 1
    r = Reconciler(
        settings,
        buckets=buckets,
        spill_dir=spill_dir,
        keep_state=keep_state,
        check_tables=True,
        workers=workers,
    )
    try:
        r.presize(ends)
        # orders.raw first: each forward on orders.unique follows its copy's bucket.
        async for batch in bar.read(kafka, s.topic_raw):
            for m in batch:
                r.on_raw(m)
            r.settle()
        async for batch in bar.read(kafka, s.topic_unique):
            for m in batch:
                r.on_unique(m)
            r.settle()
        r.placed.clear()
        async for batch in bar.read(kafka, s.topic_dlq):
            for m in batch:
                r.on_dlq(m)
            r.settle()
        for kind, topic in r.kinds.items():
            async for batch in bar.read(kafka, topic):
                for m in batch:
                    r.on_output(kind, m)
                r.settle()
        for table, changelog in r.changelogs.items():
            async for batch in bar.read(kafka, changelog):
                for m in batch:
                    r.on_table(table, m)
                r.settle()
        r.end_raw()
        r.end_outputs()
        report = r.finish()
    finally:
        r.close()
    report.open_transactions = await open_transactions(kafka, transactional_topics(settings))
    report.seconds = time.monotonic() - started
    report.peak_rss_mb = _peak_rss_mb() + (
        workers * _peak_rss_mb(children=True) if workers > 1 else 0
    )
    return report
