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

Memory: dicts, as before (a bounded-memory reconcile is a later issue).
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import hashlib
import itertools
import json
import re
import struct
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from pipeline.connection import KafkaConnection
from pipeline.domain.codecs import DLQ_KEY_MAX_BYTES, DLQ_MAX_BYTES, REASON_MAX_BYTES
from pipeline.domain.models import MAX_AMOUNT, MAX_ID_CHARS, MAX_TS_MS, MAX_VALUE_BYTES
from pipeline.kafka_io import Msg, end_offsets, read_topic
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
    #: the rebuilt table state, for callers that compare it with web views
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


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def diff_order(check: TopicCheck, order: str, want: list[Item], got: list[Item]) -> None:
    """One order's records differ from the expected ones: say how."""
    wanted = Counter(i for i, _ in want)
    gotten = Counter(i for i, _ in got)
    found = False
    for ident in sorted(wanted.keys() | gotten.keys()):
        nw, ng = wanted[ident], gotten[ident]
        if nw == 0:
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


# -- the whole check ------------------------------------------------------------------------

#: a forward of orders.unique, looked up by its source copy: the digest of its value,
#: its timestamp and where it is on orders.unique (one bytes object: memory)
_FORWARD = struct.Struct(">16sqIQ")


def _digest(value: bytes | None) -> bytes:
    return hashlib.blake2b(value or b"", digest_size=16).digest()


def _src(headers: tuple[tuple[str, bytes], ...]) -> tuple[int, int] | None:
    for name, raw in headers:
        if name == SRC_HEADER:
            try:
                p, o = raw.decode("ascii").split(":")
                return int(p), int(o)
            except ValueError:
                return None
    return None


def _where_key(partition: int, offset: int) -> int:
    return partition << 64 | offset


class Reconciler:
    """The checks, fed one record at a time (:func:`reconcile` reads; tests feed)."""

    def __init__(self, settings: Settings) -> None:
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
        self.want = {k: Sequences() for k in self.kinds}
        self.machine = Machine(self.want)
        #: dead letters by the (topic, partition, offset) they are about
        self.letters: dict[
            tuple[str, int, int], list[tuple[int, int, bytes | None, bytes | None]]
        ] = {}
        self.expected_letters = 0
        self.forwards: dict[int, bytes] = {}
        #: per valid event_id, its copies: arrival * 2 + forwarded, one int or a list
        self.copies: dict[str, int | list[int]] = {}
        #: per (order, raw partition): the place on orders.unique of its last keyed forward
        self.last_place: dict[tuple[str, int], int] = {}

    # -- orders.dlq: read first, so each bad record is judged when it is met
    def on_dlq(self, m: Msg) -> None:
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
        self.letters.setdefault(where, []).append((m.partition, m.offset, m.key, m.value))

    def _expect_letter(
        self, where: tuple[str, int, int], key: bytes | None, value: bytes | None, *, raw: bool
    ) -> None:
        self.expected_letters += 1
        letters = self.letters.pop(where, None)
        name = ":".join(map(str, where))
        if not letters:
            self.dlq.missing += 1
            self.dlq.note(f"no dead letter for bad input at {name}")
            return
        if len(letters) > 1:
            self.dlq.duplicates += len(letters) - 1
            self.dlq.note(f"{len(letters)} dead letters for {name}")
        _, _, lkey, lvalue = letters[0]
        problems = dlq_problems(lkey, lvalue, where, key, value, empty_key_ok=not raw)
        if problems:
            self.dlq.mismatched += 1
            self.dlq.note(f"dead letter for {name}: {'; '.join(problems)}")

    # -- orders.unique: the forwards, and the orders stage's input
    def on_unique(self, m: Msg) -> None:
        uc = self.unique
        uc.actual += 1
        here = f"{self.unique_topic}:{m.partition}:{m.offset}"
        event = validate(m.value, None)
        if isinstance(event, str):
            uc.unexpected += 1
            uc.note(f"{here}: not a valid event ({event})")
            # The orders stage's right answer to it: a dead letter.
            self._expect_letter(
                (self.unique_topic, m.partition, m.offset), m.key, m.value, raw=False
            )
            return
        keyed_right = m.key == event.order_id.encode()
        if not keyed_right:
            uc.mismatched += 1
            uc.note(f"{here}: event {event.event_id} keyed {_short(m.key)}, not by its order_id")
        src = _src(m.headers)
        if src is None:
            uc.unexpected += 1
            uc.note(f"{here}: event {event.event_id} without a {SRC_HEADER} header")
        else:
            at = _where_key(*src)
            if at in self.forwards:
                uc.duplicates += 1
                uc.note(f"{here}: the copy at {self.raw_topic}:{src[0]}:{src[1]} forwarded again")
            else:
                self.forwards[at] = _FORWARD.pack(
                    _digest(m.value), m.timestamp, m.partition, m.offset
                )
        if m.key is None or keyed_right:
            self.machine.apply(event)
        else:
            self._expect_letter(
                (self.unique_topic, m.partition, m.offset), m.key, m.value, raw=False
            )

    # -- orders.raw
    def on_raw(self, m: Msg) -> None:
        self.report.input_records += 1
        uc = self.unique
        forward = self.forwards.pop(_where_key(m.partition, m.offset), None)
        event = validate(m.value, m.key)
        if isinstance(event, str):
            self._expect_letter((self.raw_topic, m.partition, m.offset), m.key, m.value, raw=True)
            if forward is not None:
                uc.unexpected += 1
                uc.note(f"bad input at {self.raw_topic}:{m.partition}:{m.offset} was forwarded")
            return
        flag = 0
        if forward is not None:
            flag = 1
            digest, ts, up, uo = _FORWARD.unpack(forward)
            if digest != _digest(m.value) or ts != m.timestamp:
                uc.mismatched += 1
                uc.note(
                    f"{self.unique_topic}:{up}:{uo}: not the copy at {self.raw_topic}:"
                    f"{m.partition}:{m.offset} ("
                    + ("other bytes" if digest != _digest(m.value) else f"timestamp {ts}")
                    + f", arrival {m.timestamp})"
                )
            if m.key is not None:
                place = _where_key(up, uo)
                last = self.last_place.get((event.order_id, m.partition))
                if last is not None and last >> 64 == up and last > place:
                    uc.out_of_order += 1
                    uc.note(
                        f"order {event.order_id}: the copy at {self.raw_topic}:{m.partition}:"
                        f"{m.offset} forwarded before an earlier one of its partition"
                    )
                self.last_place[(event.order_id, m.partition)] = place
        entry = m.timestamp * 2 + flag
        copies = self.copies.get(event.event_id)
        if copies is None:
            self.copies[event.event_id] = entry
        elif type(copies) is int:
            self.copies[event.event_id] = [copies, entry]
        else:
            copies.append(entry)  # type: ignore[union-attr]

    def end_raw(self) -> None:
        uc = self.unique
        for at in self.forwards:
            uc.unexpected += 1
            uc.note(
                f"a forward of {self.raw_topic}:{at >> 64}:{at & (2**64 - 1)}, which does not exist"
            )
        self.forwards.clear()
        for event_id, copies in self.copies.items():
            if type(copies) is int:
                if copies & 1:
                    continue
                entries = [(copies >> 1, False)]
            else:
                entries = [(c >> 1, bool(c & 1)) for c in copies]  # type: ignore[union-attr]
            duplicates, losses, note = dedup_faults(entries, self.window_ms)
            if duplicates or losses:
                uc.duplicates += duplicates
                uc.missing += losses
                uc.note(f"event {event_id}: {note}")
        self.copies.clear()
        self.last_place.clear()
        # What a correct run forwards: one per distinct id, and again for copies that
        # arrived a window or more apart, which only the actual forwards tell.
        uc.expected = uc.actual - uc.duplicates - uc.unexpected + uc.missing

    # -- changes, rejected, coupons, deltas
    def on_output(self, kind: str, m: Msg) -> None:
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
        self.want[kind].actual(order, (ident, _canonical(m.key, doc)))

    def end_outputs(self) -> None:
        for kind, check in self.outputs.items():
            check.expected = self.want[kind].expected
            self.want[kind].diff(check)

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
            if not _same(got, w):
                # For an order or a balance this is what a duplicate or a lost event
                # leaves behind.
                check.mismatched += 1
                check.note(f"row {name}: {raw[:300].decode(errors='replace')}, expected {w}")
        for name in want:
            if name.encode() not in present:
                check.missing += 1
                check.note(f"missing row {name}")
        return check

    def finish(self) -> Report:
        for (topic, p, o), letters in self.letters.items():
            self.dlq.unexpected += len(letters)
            reason = ""
            with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
                reason = str(orjson.loads(letters[0][3] or b"")["reason"])[:200]
            self.dlq.note(f"a dead letter for {topic}:{p}:{o}, which is not bad input: {reason}")
        self.letters.clear()
        self.dlq.expected = self.expected_letters
        report = self.report
        report.checks[:0] = [self.unique, self.dlq, *self.outputs.values()]
        report.orders = self.machine.orders
        report.balances = self.machine.balances
        return report


def _same(a: Any, b: Any) -> bool:
    """Equal, and of the same JSON types (1, 1.0 and true are three different values)."""
    if type(a) is not type(b):
        return False
    if type(a) is dict:
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if type(a) is list:
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


class _Progress:
    """A progress bar on stderr, per topic read, when asked for (on a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    async def read(self, kafka: KafkaConnection | str, topic: str) -> AsyncIterator[Msg]:
        if not self.enabled:
            async for m in read_topic(kafka, topic):
                yield m
            return
        # Offsets count transaction markers too: the bar ends a little short of 100%.
        total = sum((await end_offsets(kafka, topic, committed=True)).values())
        n, drawn = 0, 0.0
        async for m in read_topic(kafka, topic):
            n += 1
            if n & 1023 == 0 and time.monotonic() - drawn > 0.2:
                drawn = time.monotonic()
                self._draw(topic, n, total)
            yield m
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


async def reconcile(settings: Settings, *, progress: bool = False) -> Report:
    """Read every topic and judge it by the contract; the verdict and what differs.

    ``progress`` draws a bar on stderr while each topic is read.
    """
    started = time.monotonic()
    bar = _Progress(progress)
    kafka = settings.kafka
    r = Reconciler(settings)
    # Dead letters first (few): each bad record is judged against its letter when met.
    async for m in bar.read(kafka, settings.topic_dlq):
        r.on_dlq(m)
    # orders.unique before orders.raw: only the forwards are remembered, not the input.
    async for m in bar.read(kafka, settings.topic_unique):
        r.on_unique(m)
    async for m in bar.read(kafka, settings.topic_raw):
        r.on_raw(m)
    r.end_raw()
    for kind, topic in r.kinds.items():
        async for m in bar.read(kafka, topic):
            r.on_output(kind, m)
    r.end_outputs()
    report = r.finish()
    for changelog, want in (
        (f"{settings.app_id}-orders-changelog", r.machine.orders),
        (f"{settings.app_id}-users.balances-changelog", r.machine.balances),
    ):
        rows: dict[bytes, bytes | None] = {}
        keyless = 0
        async for m in bar.read(kafka, changelog):
            if m.key is None:
                keyless += 1
            else:
                rows[m.key] = m.value
        check = r.table_check(changelog, rows, {k: v.to_json() for k, v in want.items()})
        if keyless:
            check.unexpected += keyless
            check.note(f"{keyless} records without a key")
        report.checks.append(check)
    report.open_transactions = await open_transactions(kafka, transactional_topics(settings))
    report.seconds = time.monotonic() - started
    report.peak_rss_mb = _peak_rss_mb()
    return report
