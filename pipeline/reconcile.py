"""``reconcile``: prove that the outputs are exactly the input, processed once.

An independent rebuild: a plain aiokafka ``read_committed`` consumer reads
``orders.raw`` up to its end offsets, replays the pure operators over it (no Faust, no
tables of the worker), and diffs the result against what the output topics hold:

* ``orders.unique``: every distinct valid ``event_id`` exactly once (again only if a copy
  came after its dedup window), nothing else, and for every order the same sequence of
  events as the accepted copies in the input;
* ``orders.dlq``: every bad input record exactly once (by topic, partition, offset), with
  the reason the validator gives;
* ``orders.changes``, ``orders.rejected``, ``coupons.issued``: per order, exactly the
  records the state machine (:func:`tables.orders.transition`) gives when replayed over
  the accepted events in per-order input order;
* the ``orders`` and ``users.balances`` tables, read from their changelogs (last value
  per key): exactly the replayed state;
* no transaction left open: on every output partition the last stable offset equals the
  high watermark.
"""

from __future__ import annotations

import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from agents.dedup import DeadLetter, Drop, Forward, decide_record
from pipeline.kafka_io import Msg, end_offsets, read_topic
from pipeline.models import OrderEvent, parse_event
from pipeline.settings import Settings
from tables.orders import (
    Balance,
    BalanceDelta,
    Change,
    Coupon,
    Order,
    Rejected,
    apply_delta,
    to_store,
    transition,
)

EXAMPLES = 5


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
            self.examples.append(text)

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
    orders: dict[str, Order] = field(default_factory=dict, repr=False)
    balances: dict[str, Balance] = field(default_factory=dict, repr=False)

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


class _Progress:
    """A progress bar on stderr, per topic read, when asked for (on a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    async def read(self, bootstrap: str, topic: str) -> AsyncIterator[Msg]:
        if not self.enabled:
            async for m in read_topic(bootstrap, topic):
                yield m
            return
        # Offsets count transaction markers too: the bar ends a little short of 100%.
        total = sum((await end_offsets(bootstrap, topic, committed=True)).values())
        n, drawn = 0, 0.0
        async for m in read_topic(bootstrap, topic):
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


async def reconcile(settings: Settings, *, progress: bool = False) -> Report:
    """Rebuild the expected outputs and tables from the input and diff the actual ones.

    ``progress`` draws a bar on stderr while each topic is read.
    """
    started = time.monotonic()
    bar = _Progress(progress)
    bootstrap = settings.bootstrap_servers
    report = Report()

    # -- expected, rebuilt from the input --------------------------------------------
    # An event_id may legitimately be accepted again once its dedup window has passed,
    # so the expectation is, per order, the exact sequence of accepted event ids.
    window_ms = settings.dedup_window_ms
    seen: dict[int, dict[bytes, bytes]] = defaultdict(dict)
    expected_order: dict[bytes, list[bytes]] = defaultdict(list)  # order_id -> event ids
    expected_dlq: dict[tuple[int, int], str] = {}
    # The state machine replayed over the accepted events, in per-order input order.
    orders: dict[str, Order] = {}
    balances: dict[str, Balance] = {}
    wanted: dict[str, dict[str, list[Any]]] = {k: defaultdict(list) for k in _SEQUENCES}
    raw_topic = settings.topic_raw
    async for m in bar.read(bootstrap, raw_topic):
        report.input_records += 1
        state = seen[m.partition]
        action = decide_record(
            m.value, m.key, m.timestamp, (raw_topic, m.partition, m.offset), state.get, window_ms
        )
        if isinstance(action, Forward):
            state[action.event_id] = action.first_ms.to_bytes(8, "big", signed=True)
            expected_order[action.order_key].append(action.event_id)
            event = parse_event(m.value, m.key)
            assert isinstance(event, OrderEvent)
            _replay(event, orders, balances, wanted)
        elif isinstance(action, DeadLetter):
            expected_dlq[(m.partition, m.offset)] = orjson.loads(action.value)["reason"]
        else:
            assert isinstance(action, Drop)
    seen.clear()

    # -- orders.unique ------------------------------------------------------------------
    uc = TopicCheck(settings.topic_unique, expected=sum(len(v) for v in expected_order.values()))
    actual_order: dict[bytes, list[bytes]] = defaultdict(list)
    async for m in bar.read(bootstrap, settings.topic_unique):
        uc.actual += 1
        try:
            doc = orjson.loads(m.value or b"")
            eid = doc["event_id"].encode()
            order = doc["order_id"].encode()
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            uc.unexpected += 1
            uc.note(f"undecodable record at {m.partition}:{m.offset}")
            continue
        if m.key != order:
            uc.mismatched += 1
            uc.note(f"event {eid.decode()} keyed {m.key!r}, not by its order_id")
        actual_order[order].append(eid)
    _diff_sequences(
        uc,
        {k.decode(): [e.decode() for e in v] for k, v in expected_order.items()},
        {k.decode(): [e.decode() for e in v] for k, v in actual_order.items()},
    )
    report.checks.append(uc)

    # -- orders.dlq ---------------------------------------------------------------------
    dc = TopicCheck(settings.topic_dlq, expected=len(expected_dlq))
    seen_dlq: set[tuple[int, int]] = set()
    async for m in bar.read(bootstrap, settings.topic_dlq):
        dc.actual += 1
        try:
            doc = orjson.loads(m.value or b"")
            where = (int(doc["partition"]), int(doc["offset"]))
            reason = doc["reason"]
            src = doc["topic"]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            dc.unexpected += 1
            dc.note(f"undecodable dlq record at {m.partition}:{m.offset}")
            continue
        if src != raw_topic or where not in expected_dlq:
            dc.unexpected += 1
            dc.note(f"dlq record for {src}:{where} that is not bad input")
            continue
        if where in seen_dlq:
            dc.duplicates += 1
            dc.note(f"dlq duplicate for {src}:{where[0]}:{where[1]}")
            continue
        seen_dlq.add(where)
        if reason != expected_dlq[where]:
            dc.mismatched += 1
            dc.note(f"dlq reason for {where}: {reason!r}, expected {expected_dlq[where]!r}")
    for where in expected_dlq:
        if where not in seen_dlq:
            dc.missing += 1
            dc.note(f"missing dlq record for {raw_topic}:{where[0]}:{where[1]}")
    report.checks.append(dc)

    # -- the state machine's outputs ------------------------------------------------------
    topics = {
        "changes": settings.topic_changes,
        "rejected": settings.topic_rejected,
        "coupons": settings.topic_coupons,
    }
    for kind, topic in topics.items():
        produced: dict[str, list[Any]] = defaultdict(list)
        check = TopicCheck(topic, expected=sum(len(v) for v in wanted[kind].values()))
        async for m in bar.read(bootstrap, topic):
            check.actual += 1
            try:
                doc = orjson.loads(m.value or b"")
                produced[doc["order_id"]].append(_SEQUENCES[kind](doc))
            except (orjson.JSONDecodeError, KeyError, TypeError):
                check.unexpected += 1
                check.note(f"undecodable record at {m.partition}:{m.offset}")
        _diff_sequences(check, wanted[kind], produced)
        report.checks.append(check)

    # -- the tables, from their changelogs ------------------------------------------------
    report.checks.append(
        await _diff_table(
            bar,
            bootstrap,
            f"{settings.app_id}-orders-changelog",
            {k.encode(): v.to_json() for k, v in orders.items()},
            lambda raw: Order.decode(raw).to_json(),
        )
    )
    report.checks.append(
        await _diff_table(
            bar,
            bootstrap,
            f"{settings.app_id}-users.balances-changelog",
            {k.encode(): v.to_json() for k, v in balances.items()},
            lambda raw: Balance.decode(raw).to_json(),
        )
    )
    report.orders = orders
    report.balances = balances

    # -- no transaction left open -------------------------------------------------------
    for topic in (
        settings.topic_unique,
        settings.topic_dlq,
        settings.topic_changes,
        settings.topic_rejected,
        settings.topic_coupons,
        settings.deltas_topic,
    ):
        lso = await end_offsets(bootstrap, topic, committed=True)
        hw = await end_offsets(bootstrap, topic, committed=False)
        open_parts = {p: (lso[p], hw[p]) for p in hw if lso.get(p) != hw[p]}
        if open_parts:
            report.open_transactions[topic] = open_parts

    report.seconds = time.monotonic() - started
    report.peak_rss_mb = _peak_rss_mb()
    return report


#: per output topic, the comparable form of one record (order of fields fixed)
_SEQUENCES: dict[str, Callable[[dict[str, Any]], tuple[Any, ...]]] = {
    "changes": lambda d: (d["event_id"], d["from"], d["to"], d["version"], d["ts_ms"]),
    "rejected": lambda d: (d["event_id"], d["reason"], d["state"]),
    "coupons": lambda d: (d["coupon_id"], d["user_id"], d["amount_cents"]),
}


def _replay(
    event: OrderEvent,
    orders: dict[str, Order],
    balances: dict[str, Balance],
    want: dict[str, dict[str, list[Any]]],
) -> None:
    after, outputs = transition(orders.get(event.order_id), event)
    row = to_store(orders.get(event.order_id), after, outputs)
    if row is not None:
        orders[event.order_id] = row
    for out in outputs:
        if isinstance(out, Change):
            want["changes"][out.order_id].append(_SEQUENCES["changes"](out.to_json()))
        elif isinstance(out, Rejected):
            want["rejected"][out.order_id].append(_SEQUENCES["rejected"](out.to_json()))
        elif isinstance(out, Coupon):
            want["coupons"][out.order_id].append(_SEQUENCES["coupons"](out.to_json()))
        elif isinstance(out, BalanceDelta):
            balances[out.user_id] = apply_delta(balances.get(out.user_id), out)


def _diff_sequences(
    check: TopicCheck, want: dict[str, list[Any]], got: dict[str, list[Any]]
) -> None:
    """Per order, the records must be exactly the expected ones, in the same order."""
    for key in want.keys() | got.keys():
        w, g = want.get(key, []), got.get(key, [])
        if w == g:
            continue
        wn, gn = Counter(w), Counter(g)
        for item in wn.keys() | gn.keys():
            extra = gn[item] - wn[item]
            if extra > 0 and wn[item] == 0:
                check.unexpected += extra
                check.note(f"{key}: unexpected {item}")
            elif extra > 0:
                check.duplicates += extra
                check.note(f"{key}: duplicate {item} ({gn[item]}x)")
            elif extra < 0:
                check.missing += -extra
                check.note(f"{key}: missing {item}")
        if wn == gn:
            check.out_of_order += 1
            check.note(f"{key}: out of order: {g[:6]}, expected {w[:6]}")


async def _diff_table(
    bar: _Progress,
    bootstrap: str,
    changelog: str,
    want: dict[bytes, dict[str, Any]],
    decode: Callable[[bytes], dict[str, Any]],
) -> TopicCheck:
    """The table's committed state (last value per key in its changelog) vs expected."""
    check = TopicCheck(changelog, expected=len(want))
    got: dict[bytes, dict[str, Any] | None] = {}
    async for m in bar.read(bootstrap, changelog):
        if m.key is None:
            continue
        got[m.key] = decode(m.value) if m.value is not None else None
    present = {k: v for k, v in got.items() if v is not None}
    check.actual = len(present)
    for key in want.keys() | present.keys():
        w, g = want.get(key), present.get(key)
        if w == g:
            continue
        if g is None:
            check.missing += 1
            check.note(f"missing row {key.decode()}")
        elif w is None:
            check.unexpected += 1
            check.note(f"unexpected row {key.decode()}: {g}")
        else:
            # A wrong state: for an order or balance this is what a duplicate or a lost
            # event leaves behind.
            check.mismatched += 1
            check.note(f"row {key.decode()}: {g}, expected {w}")
    return check
