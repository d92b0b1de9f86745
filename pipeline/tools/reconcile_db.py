"""``reconcile --db URL``: the database's rows against the Kafka records they stand for.

The last line of defence of the seed article, "periodic reconciliation between message
counts and business data", for both database edges of the chain:

* the sink's tables (``python -m pipeline sink``): ``orders`` must hold, per order, the
  state of its last change on ``orders.changes`` (the highest ``version``: ``to`` as
  ``status``, ``version``, ``ts_ms`` as ``updated_ms``, ``event_id``), and ``coupons``
  every record of ``coupons.issued`` once, with its fields. Differences, per key:
  ``missing`` (no row), ``extra`` (a row no record asks for), ``stale`` (a row at an
  older version than the last change), ``ahead`` (a row at a newer one), ``mismatched``
  (the same version or coupon with another field), ``conflict`` (two different records
  for one version or one coupon id on the topic, which no table can hold both of),
  ``undecodable`` (a record that is no change or coupon by the contract's fields); every
  row of ``sink_refusals`` (a record the sink did not apply; an exactly-once run has
  none); a ``sink_offsets`` row past the end of its partition.
* the transactional outbox (``produce --via-outbox`` / ``outbox-relay``): every row
  marked published (``published_ms`` set) for ``orders.raw`` must be on ``orders.raw``
  with the row's exact key and value (``absent``; ``altered`` when records of its
  ``event_id`` are there, but none with its bytes); a row the relay gave up on
  (``error`` set) is ``unpublishable``: its business row has no event.

Lag is not a difference. The sink writes its rows and the next offset of every source
partition (``sink_offsets``) in one transaction, so its tables are exactly the records
below those offsets: those are what the tables are compared with, and the records at or
past them are counted as the sink's lag. An outbox row not yet published (and not
failed) is the relay's lag. Both are reported on their own line, and the verdict is
exact while the sink and the relay run: the database is read in one snapshot
(``REPEATABLE READ`` on PostgreSQL, one read transaction on SQLite), and Kafka's end
offsets are taken after it, so every record a published row or a stored offset refers
to is below them.

What cannot be checked: the relay sends a row's key and value and nothing else (no
header), and ``orders.raw`` stamps records with the broker's append time, so nothing on a
record says it came through the outbox: a record on ``orders.raw`` without an outbox row
cannot be told apart from one another producer wrote. The report says so. Only rows
for ``orders.raw`` are compared; rows for other topics are counted in a note.

Independence: this is its own plain reading of ``../shared/CONTRACT.md`` and of the
tables' meaning, not the sink's or the relay's decision code: from :mod:`pipeline.edges`
it takes only :mod:`pipeline.edges.db`'s table declarations and URL handling (a unit test
holds it to that).

Memory: per order with a change below the sink's offsets, one small tuple (its last
change); per coupon, one tuple; per outbox row published to ``orders.raw`` and not yet
matched, its ``event_id`` and a 16-byte digest (matched rows are dropped as
``orders.raw`` is read). Table rows are streamed, never held; per table only the first
``show`` differences are kept (all are counted). So it grows with the number of orders
and of published outbox rows, not with the number of records or of table rows read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import orjson
from sqlalchemy import Connection, Engine, create_engine, event, func, inspect, make_url, select

from pipeline.edges import db
from pipeline.kafka_io import Msg, end_offsets, read_topic
from pipeline.settings import Settings

#: per table, the differences kept for the report by default (all are counted)
SHOW = 20
STATUSES = frozenset({"NEW", "CREATED", "PAID", "SHIPPED", "CANCELLED"})

ORDER_KINDS = ("missing", "extra", "stale", "ahead", "mismatched", "conflict", "undecodable")
COUPON_KINDS = ("missing", "extra", "mismatched", "conflict", "undecodable")
OUTBOX_KINDS = ("absent", "altered", "unpublishable")
REFUSAL_KINDS = ("refused",)
OFFSET_KINDS = ("past-end",)


# -- what the records say -----------------------------------------------------------------


class Change(NamedTuple):
    """A record of ``orders.changes``: the order row it leaves behind."""

    order_id: str
    status: str
    version: int
    ts_ms: int
    event_id: str


class Coupon(NamedTuple):
    coupon_id: str
    order_id: str
    user_id: str
    amount_cents: int


class OrderRow(NamedTuple):
    """A row of the sink's ``orders`` table."""

    order_id: str
    status: str
    version: int
    updated_ms: int
    event_id: str


@dataclass(frozen=True, slots=True)
class Difference:
    table: str
    key: str
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.table} {_show(self.key)}: {self.kind}: {self.detail}"


def _show(value: object, limit: int = 80) -> str:
    # Keys come from records and rows anyone may write: one printable, bounded line.
    text = value if isinstance(value, str) else repr(value)
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return text + ("..." if len(value if isinstance(value, str) else text) > limit else "")


def _text(doc: dict[str, Any], name: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name!r} is not a non-empty string")
    return value


def _integer(doc: dict[str, Any], name: str) -> int:
    value = doc.get(name)
    # bool is an int to Python, not to JSON.
    if type(value) is not int:
        raise ValueError(f"{name!r} is not an integer")
    return value


def _object(value: bytes | None) -> dict[str, Any]:
    try:
        doc = orjson.loads(value or b"")
    except orjson.JSONDecodeError as error:
        raise ValueError(f"not JSON ({error})") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return doc


def parse_change(value: bytes | None) -> Change | str:
    """A change record by the contract's fields, or why it is not one. Pure."""
    try:
        doc = _object(value)
        change = Change(
            order_id=_text(doc, "order_id"),
            status=_text(doc, "to"),
            version=_integer(doc, "version"),
            ts_ms=_integer(doc, "ts_ms"),
            event_id=_text(doc, "event_id"),
        )
        if _text(doc, "from") not in STATUSES or change.status not in STATUSES:
            raise ValueError(f"unknown status {_show(doc.get('from'))} -> {_show(change.status)}")
        if change.version < 1:
            raise ValueError(f"version {change.version} < 1")
        return change
    except ValueError as error:
        return f"not a change: {error}"


def parse_coupon(value: bytes | None) -> Coupon | str:
    """A coupon record by the contract's fields, or why it is not one. Pure."""
    try:
        doc = _object(value)
        return Coupon(
            coupon_id=_text(doc, "coupon_id"),
            order_id=_text(doc, "order_id"),
            user_id=_text(doc, "user_id"),
            amount_cents=_integer(doc, "amount_cents"),
        )
    except ValueError as error:
        return f"not a coupon: {error}"


@dataclass
class Expected:
    """What the sink's tables must hold, folded from the records it consumed. Pure."""

    orders: dict[str, Change] = field(default_factory=dict)
    coupons: dict[str, Coupon] = field(default_factory=dict)
    #: faults of the records themselves (conflicting or undecodable), found while folding
    faults: list[Difference] = field(default_factory=list)

    def add_change(self, change: Change) -> None:
        have = self.orders.get(change.order_id)
        if have is None or change.version > have.version:
            self.orders[change.order_id] = change
        elif change.version == have.version and change != have:
            # The sink applies one of them and refuses the other; which one the table
            # should show, the records cannot say.
            self.faults.append(
                Difference(
                    "orders",
                    change.order_id,
                    "conflict",
                    f"two changes at v{change.version}: {_change(have)} and {_change(change)}",
                )
            )

    def add_coupon(self, coupon: Coupon) -> None:
        have = self.coupons.get(coupon.coupon_id)
        if have is None:
            self.coupons[coupon.coupon_id] = coupon
        elif have != coupon:
            self.faults.append(
                Difference(
                    "coupons",
                    coupon.coupon_id,
                    "conflict",
                    f"issued twice with other fields: {_coupon(have)} and {_coupon(coupon)}",
                )
            )
        # The same coupon twice is the Kafka check's duplicate; one row holds it.


def _change(c: Change) -> str:
    return f"v{c.version} {_show(c.status)} at {c.ts_ms} (event {_show(c.event_id)})"


def _coupon(c: Coupon) -> str:
    return f"order {_show(c.order_id)}, user {_show(c.user_id)}, {c.amount_cents} cents"


def compare_orders(expected: dict[str, Change], rows: Iterable[OrderRow]) -> Iterator[Difference]:
    """The differences between the last change per order and the ``orders`` rows.

    ``expected`` is emptied as rows are matched (so memory shrinks while the table is
    streamed); what is left at the end are the missing rows. Pure otherwise.
    """
    for row in rows:
        want = expected.pop(row.order_id, None)
        if want is None:
            yield Difference(
                "orders",
                row.order_id,
                "extra",
                f"row at v{row.version} {_show(row.status)}, but no change of this order"
                " below the sink's offsets",
            )
            continue
        if row.version < want.version:
            yield Difference(
                "orders",
                row.order_id,
                "stale",
                f"row at v{row.version} {_show(row.status)}, last change is {_change(want)}",
            )
        elif row.version > want.version:
            yield Difference(
                "orders",
                row.order_id,
                "ahead",
                f"row at v{row.version} {_show(row.status)}, last change is {_change(want)}",
            )
        else:
            fields = [
                f"{name} {_show(got)} != {_show(must)}"
                for name, got, must in (
                    ("status", row.status, want.status),
                    ("updated_ms", row.updated_ms, want.ts_ms),
                    ("event_id", row.event_id, want.event_id),
                )
                if got != must
            ]
            if fields:
                yield Difference(
                    "orders", row.order_id, "mismatched", f"at v{row.version}: " + "; ".join(fields)
                )
    for order_id, want in expected.items():
        yield Difference("orders", order_id, "missing", f"no row; last change is {_change(want)}")
    expected.clear()


def compare_coupons(expected: dict[str, Coupon], rows: Iterable[Coupon]) -> Iterator[Difference]:
    """The differences between the issued coupons and the ``coupons`` rows; empties
    ``expected`` as :func:`compare_orders` does."""
    for row in rows:
        want = expected.pop(row.coupon_id, None)
        if want is None:
            yield Difference(
                "coupons", row.coupon_id, "extra", f"row for {_coupon(row)}, never issued"
            )
            continue
        fields = [
            f"{name} {_show(got)} != {_show(must)}"
            for name, got, must in (
                ("order_id", row.order_id, want.order_id),
                ("user_id", row.user_id, want.user_id),
                ("amount_cents", row.amount_cents, want.amount_cents),
            )
            if got != must
        ]
        if fields:
            yield Difference("coupons", row.coupon_id, "mismatched", "; ".join(fields))
    for coupon_id, want in expected.items():
        yield Difference("coupons", coupon_id, "missing", f"no row; issued for {_coupon(want)}")
    expected.clear()


def record_digest(key: bytes | None, value: bytes | None) -> bytes:
    """A short fingerprint of a record's key and value: a keyless record and one with an
    empty key differ, and so do key/value splits of the same bytes."""
    h = hashlib.blake2b(digest_size=16)
    if key is None:
        h.update(b"\x00")
    else:
        h.update(b"\x01" + len(key).to_bytes(8, "big") + key)
    h.update(value or b"")
    return h.digest()


def event_id_of(value: bytes | None) -> str | None:
    """The ``event_id`` a record of ``orders.raw`` names, if it names one."""
    try:
        doc = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return None
    if isinstance(doc, dict):
        eid = doc.get("event_id")
        if isinstance(eid, str):
            return eid
    return None


class OutboxMatch:
    """Published outbox rows (``event_id`` -> :func:`record_digest` of the row's key and
    value) against the records of ``orders.raw``, one record at a time. Pure.

    A row is found when a record has its ``event_id`` and exactly its bytes; found rows
    are dropped at once (memory shrinks as the topic is read). A relay that published a
    row twice is no difference: the dedup stage drops the copy.
    """

    def __init__(self, published: dict[str, bytes]) -> None:
        # Owned, not copied: the caller's dict shrinks as rows are found.
        self.pending = published
        self.published = len(self.pending)
        #: pending rows with a record of their event_id, but not of their bytes
        self.altered: set[str] = set()

    @property
    def found(self) -> int:
        return self.published - len(self.pending)

    def see(self, key: bytes | None, value: bytes | None) -> None:
        if not self.pending:
            return
        eid = event_id_of(value)
        if eid is None or eid not in self.pending:
            return
        if self.pending[eid] == record_digest(key, value):
            del self.pending[eid]
            self.altered.discard(eid)
        else:
            self.altered.add(eid)

    def finish(self) -> Iterator[Difference]:
        for eid in self.pending:
            if eid in self.altered:
                yield Difference(
                    "outbox",
                    eid,
                    "altered",
                    "marked published, but its records on orders.raw have other bytes than the row",
                )
            else:
                yield Difference("outbox", eid, "absent", "marked published, not on orders.raw")


def compare_outbox(
    published: Mapping[str, bytes], records: Iterable[tuple[bytes | None, bytes | None]]
) -> list[Difference]:
    """The published rows no record (key, value) of ``orders.raw`` carries. Pure."""
    match = OutboxMatch(dict(published))
    for key, value in records:
        match.see(key, value)
    return list(match.finish())


class Cut:
    """Which records of one sink input the sink consumed: those below its stored next
    offset per partition (absent: none). The rest is lag, counted here. Pure."""

    def __init__(self, topic: str, stored: Mapping[int, int], ends: Mapping[int, int]) -> None:
        self.topic = topic
        self.stored = dict(stored)
        self.ends = dict(ends)
        #: records at or past the stored offset, per partition
        self.lag: dict[int, int] = {}

    def consumed(self, partition: int, offset: int) -> bool:
        if offset < self.stored.get(partition, 0):
            return True
        self.lag[partition] = self.lag.get(partition, 0) + 1
        return False

    def past_end(self) -> Iterator[Difference]:
        """Stored offsets that point past the end of their partition (or at a partition
        the topic does not have): the tables claim records Kafka does not hold."""
        for p, nxt in sorted(self.stored.items()):
            end = self.ends.get(p)
            if end is None:
                yield Difference(
                    "sink_offsets",
                    f"{self.topic}[{p}]",
                    "past-end",
                    f"next offset {nxt} for a partition {self.topic} does not have",
                )
            elif nxt > end:
                yield Difference(
                    "sink_offsets",
                    f"{self.topic}[{p}]",
                    "past-end",
                    f"next offset {nxt}, but the partition ends at {end}",
                )


# -- the report ---------------------------------------------------------------------------


@dataclass
class TableCheck:
    table: str
    #: what the table is compared with, for the report
    against: str
    kinds: tuple[str, ...]
    expected: int = 0
    actual: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    differences: list[Difference] = field(default_factory=list)
    show: int = SHOW

    def __post_init__(self) -> None:
        self.counts = {k: self.counts.get(k, 0) for k in self.kinds}

    def add(self, diff: Difference) -> None:
        self.counts[diff.kind] = self.counts.get(diff.kind, 0) + 1
        if self.show <= 0 or len(self.differences) < self.show:
            self.differences.append(diff)

    def add_all(self, diffs: Iterable[Difference]) -> None:
        for d in diffs:
            self.add(d)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def ok(self) -> bool:
        return self.total == 0


@dataclass
class Lag:
    #: per sink input topic, records at or past the sink's offsets, per partition
    sink: dict[str, dict[int, int]] = field(default_factory=dict)
    #: outbox rows for orders.raw neither published nor failed
    outbox_pending: int = 0
    #: created_ms of the oldest of them
    outbox_oldest_ms: int | None = None

    @property
    def sink_records(self) -> int:
        return sum(sum(parts.values()) for parts in self.sink.values())


@dataclass
class DbReport:
    database: str
    checks: list[TableCheck] = field(default_factory=list)
    lag: Lag = field(default_factory=Lag)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def differences(self) -> int:
        return sum(c.total for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "verdict": "PASS" if self.ok else "FAIL",
            "database": self.database,
            "differences": self.differences,
            "tables": [
                {
                    "table": c.table,
                    "against": c.against,
                    "expected": c.expected,
                    "actual": c.actual,
                    "ok": c.ok,
                    **c.counts,
                    "shown": [
                        {"key": d.key, "kind": d.kind, "detail": d.detail} for d in c.differences
                    ],
                }
                for c in self.checks
            ],
            "lag": {
                "sink": {
                    t: {str(p): n for p, n in sorted(parts.items())}
                    for t, parts in self.lag.sink.items()
                },
                "sink_records": self.lag.sink_records,
                "outbox_pending": self.lag.outbox_pending,
                "outbox_oldest_ms": self.lag.outbox_oldest_ms,
            },
            "notes": self.notes,
            "seconds": round(self.seconds, 2),
        }

    def render(self) -> str:
        lines = [f"reconcile --db: {self.database}"]
        for c in self.checks:
            counts = "  ".join(f"{k} {n}" for k, n in c.counts.items())
            lines.append(
                f"  {c.table:<24} expected {c.expected:>8}  actual {c.actual:>8}  {counts}"
            )
            lines.append(f"      against {c.against}")
            lines.extend(f"      e.g. {d}" for d in c.differences)
            if len(c.differences) < c.total:
                lines.append(f"      ... and {c.total - len(c.differences)} more")
        lines.append(f"  lag (not a difference): {self.render_lag()}")
        lines.extend(f"  note: {n}" for n in self.notes)
        lines.append(f"  time {self.seconds:.1f} s")
        lines.append(
            f"verdict (database): {'PASS' if self.ok else 'FAIL'} ({self.differences} differences)"
        )
        return "\n".join(lines)

    def render_lag(self) -> str:
        parts = []
        for topic, lag in self.lag.sink.items():
            behind = {p: n for p, n in lag.items() if n}
            if behind:
                where = ", ".join(f"[{p}] {n}" for p, n in sorted(behind.items())[:8])
                more = " ..." if len(behind) > 8 else ""
                parts.append(
                    f"sink {sum(behind.values())} records behind on {topic} ({where}{more})"
                )
            else:
                parts.append(f"sink up to date on {topic}")
        pending = self.lag.outbox_pending
        if pending:
            age = ""
            if self.lag.outbox_oldest_ms is not None:
                age = f", oldest {max(0, db.now_ms() - self.lag.outbox_oldest_ms) / 1000:.1f} s"
            parts.append(f"outbox {pending} rows not yet published{age}")
        else:
            parts.append("outbox nothing pending")
        return "; ".join(parts)


# -- reading the database -----------------------------------------------------------------


def read_engine(url: str) -> Engine:
    """An engine that reads without blocking the sink or the relay.

    :func:`pipeline.edges.db.engine_for` begins every SQLite transaction with the writer
    lock, which would stop the sink for as long as this reads Kafka; here a SQLite
    transaction is a plain deferred one (in WAL mode, a snapshot next to the writer).
    """
    normalized = db.normalize_url(url)
    if not normalized.startswith("sqlite"):
        return db.engine_for(url)
    engine = create_engine(normalized, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        # Take over pysqlite's transaction handling (SQLAlchemy's documented recipe) so
        # that the BEGIN below really starts the transaction.
        dbapi_conn.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")

    return engine


def _streamed(conn: Connection) -> Connection:
    # A server-side cursor on PostgreSQL: the rows come in batches, never all at once.
    return conn.execution_options(yield_per=2000)


def _order_rows(conn: Connection) -> Iterator[OrderRow]:
    o = db.sink_orders.c
    q = select(o.order_id, o.status, o.version, o.updated_ms, o.event_id)
    for r in _streamed(conn).execute(q):
        yield OrderRow(r.order_id, r.status, r.version, r.updated_ms, r.event_id)


def _coupon_rows(conn: Connection) -> Iterator[Coupon]:
    c = db.sink_coupons.c
    q = select(c.coupon_id, c.order_id, c.user_id, c.amount_cents)
    for r in _streamed(conn).execute(q):
        yield Coupon(r.coupon_id, r.order_id, r.user_id, r.amount_cents)


def _count(conn: Connection, table: Any) -> int:
    return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def _read_outbox(
    conn: Connection,
    raw_topic: str,
    published: dict[str, bytes],
    check: TableCheck,
    report: DbReport,
) -> None:
    """Fill ``published``; unpublishable rows into ``check``; pending rows into the lag."""
    o = db.outbox.c
    q = select(o.event_id, o.key, o.value, o.published_ms, o.error, o.created_ms).where(
        o.topic == raw_topic
    )
    for r in _streamed(conn).execute(q):
        if r.published_ms is not None:
            published[r.event_id] = record_digest(r.key, r.value)
        elif r.error is not None:
            check.add(
                Difference(
                    "outbox", r.event_id, "unpublishable", f"never published: {_show(r.error, 300)}"
                )
            )
        else:
            lag = report.lag
            lag.outbox_pending += 1
            if lag.outbox_oldest_ms is None or r.created_ms < lag.outbox_oldest_ms:
                lag.outbox_oldest_ms = r.created_ms
    others = int(
        conn.execute(
            select(func.count()).select_from(db.outbox).where(o.topic != raw_topic)
        ).scalar_one()
    )
    if others:
        report.notes.append(f"{others} outbox rows for other topics than {raw_topic}: not checked")


# -- the run ------------------------------------------------------------------------------


class NoTables(LookupError):
    """The database holds none of the tables this compares."""


async def reconcile_db(settings: Settings, url: str, *, show: int = SHOW) -> DbReport:
    """Compare the database at ``url`` with the Kafka outputs (see the module doc)."""
    started = time.monotonic()
    s = settings
    kafka = s.kafka
    report = DbReport(make_url(db.normalize_url(url)).render_as_string(hide_password=True))

    def check(table: str, against: str, kinds: tuple[str, ...]) -> TableCheck:
        c = TableCheck(table, against, kinds, show=show)
        report.checks.append(c)
        return c

    orders = check(
        "orders",
        f"the last change per order on {s.topic_changes}, below the sink's offsets",
        ORDER_KINDS,
    )
    coupons = check("coupons", f"{s.topic_coupons}, below the sink's offsets", COUPON_KINDS)
    refusals = check(
        "sink_refusals",
        "nothing: records the sink did not apply (exactly once: none)",
        REFUSAL_KINDS,
    )
    offsets = check(
        "sink_offsets",
        f"the partitions of {s.topic_changes} and {s.topic_coupons}, and their ends",
        OFFSET_KINDS,
    )
    outbox = check("outbox", f"{s.topic_raw} (rows marked published)", OUTBOX_KINDS)
    published: dict[str, bytes] = {}

    engine = read_engine(url)
    try:
        with engine.connect() as plain:
            conn = plain
            if db.is_postgres(engine):
                # One snapshot for every read: the offsets, the rows written with them,
                # and the outbox, however long the Kafka reads in between take.
                conn = plain.execution_options(
                    isolation_level="REPEATABLE READ", postgresql_readonly=True
                )
            with conn.begin():
                tables = set(inspect(conn).get_table_names())
                have_sink = {"orders", "coupons", "sink_offsets"} <= tables
                if not have_sink and "outbox" not in tables:
                    # A wrong URL (a typo makes a new SQLite file) must not pass as
                    # "nothing to compare".
                    raise NoTables(
                        f"{report.database} has neither the sink's tables (orders, coupons, "
                        "sink_offsets) nor the outbox's: is it the pipeline's database?"
                    )
                if not have_sink:
                    report.notes.append(
                        "no sink tables in this database (the sink never ran here):"
                        " every output record counts as lag"
                    )
                stored: dict[str, dict[int, int]] = {s.topic_changes: {}, s.topic_coupons: {}}
                foreign: set[str] = set()
                if have_sink:
                    t = db.sink_offsets.c
                    for r in conn.execute(select(t.topic, t.partition, t.next_offset)):
                        if r.topic in stored:
                            stored[r.topic][r.partition] = r.next_offset
                        else:
                            foreign.add(r.topic)
                if foreign:
                    report.notes.append(
                        "sink_offsets also names "
                        + ", ".join(sorted(_show(f) for f in foreign)[:5])
                        + ": another sink's inputs on this database; their rows show up as extra"
                    )
                if "outbox" in tables:
                    _read_outbox(conn, s.topic_raw, published, outbox, report)
                else:
                    report.notes.append("no outbox table in this database: nothing to check")

                expected = Expected()
                for topic, target, parse in (
                    (s.topic_changes, orders, parse_change),
                    (s.topic_coupons, coupons, parse_coupon),
                ):
                    # Taken after the snapshot: every record the stored offsets count
                    # is below them.
                    ends = await end_offsets(kafka, topic)
                    cut = Cut(topic, stored[topic], ends)
                    offsets.expected += len(ends)
                    offsets.actual += len(stored[topic])
                    offsets.add_all(cut.past_end())
                    async for m in read_topic(kafka, topic, until=ends):
                        if not cut.consumed(m.partition, m.offset):
                            continue
                        target.expected += 1
                        got = parse(m.value)
                        if isinstance(got, str):
                            target.add(
                                Difference(
                                    target.table,
                                    f"{topic}[{m.partition}]@{m.offset}",
                                    "undecodable",
                                    got,
                                )
                            )
                        elif isinstance(got, Change):
                            expected.add_change(got)
                        else:
                            expected.add_coupon(got)
                    report.lag.sink[topic] = {p: cut.lag.get(p, 0) for p in sorted(ends)}
                for fault in expected.faults:
                    (orders if fault.table == "orders" else coupons).add(fault)
                # "expected" so far counted records; the tables hold one row per key.
                orders.expected = len(expected.orders)
                coupons.expected = len(expected.coupons)
                if have_sink:
                    orders.actual = _count(conn, db.sink_orders)
                    coupons.actual = _count(conn, db.sink_coupons)
                    orders.add_all(compare_orders(expected.orders, _order_rows(conn)))
                    coupons.add_all(compare_coupons(expected.coupons, _coupon_rows(conn)))
                else:
                    orders.add_all(compare_orders(expected.orders, ()))
                    coupons.add_all(compare_coupons(expected.coupons, ()))
                if "sink_refusals" in tables:
                    f = db.sink_refusals.c
                    refusals.actual = _count(conn, db.sink_refusals)
                    q = select(f.topic, f.partition, f.offset, f.key, f.reason).order_by(f.id)
                    for r in _streamed(conn).execute(q):
                        refusals.add(
                            Difference(
                                "sink_refusals",
                                r.key if r.key is not None else f"{r.topic}[{r.partition}]",
                                "refused",
                                f"{_show(r.topic)}[{r.partition}]@{r.offset}:"
                                f" {_show(r.reason, 300)}",
                            )
                        )
    finally:
        engine.dispose()

    # The snapshot is over: what it marked published is in `published`, and every such
    # row was acknowledged by the broker before it was marked, so before these ends.
    if published:
        match = OutboxMatch(published)
        outbox.expected = match.published
        ends = await end_offsets(kafka, s.topic_raw)
        reader = cast(AsyncGenerator[Msg, None], read_topic(kafka, s.topic_raw, until=ends))
        async with contextlib.aclosing(reader) as raw:
            async for m in raw:
                match.see(m.key, m.value)
                if not match.pending:
                    break  # every published row found: the rest of the topic says nothing
        outbox.actual = match.found
        outbox.add_all(match.finish())
    report.notes.append(
        f"records on {s.topic_raw} carry no outbox mark (the relay adds no header, the topic"
        " keeps the broker's append time): records without an outbox row cannot be told"
        " from other producers' records and are not checked"
    )
    report.seconds = time.monotonic() - started
    return report


def write_db_metrics(report: DbReport, path: str, *, append: bool = False) -> None:
    """The database verdict as Prometheus text (node_exporter's textfile collector),
    after what ``path`` holds when ``append`` (the Kafka verdict of the same run).
    Replaced atomically, as the collector may read it at any moment."""
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    registry = CollectorRegistry()

    def gauge(name: str, text: str, value: float) -> None:
        Gauge(name, text, registry=registry).set(value)

    gauge("pipeline_reconcile_db_ok", "1 if the last database reconcile passed", int(report.ok))
    differences = Gauge(
        "pipeline_reconcile_db_differences",
        "Differences between the database and the Kafka outputs, by table",
        ["table"],
        registry=registry,
    )
    for c in report.checks:
        differences.labels(table=c.table).set(c.total)
    gauge(
        "pipeline_reconcile_db_sink_lag_records",
        "Output records the sink had not consumed yet",
        report.lag.sink_records,
    )
    gauge(
        "pipeline_reconcile_db_outbox_pending_rows",
        "Outbox rows not yet published",
        report.lag.outbox_pending,
    )
    gauge(
        "pipeline_reconcile_db_seconds", "Duration of the last database reconcile", report.seconds
    )
    before = b""
    if append and os.path.exists(path):
        with open(path, "rb") as old:
            before = old.read()
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".reconcile-db-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(before + generate_latest(registry))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
