"""``python -m pipeline sink --db URL``: exactly-once from Kafka into a relational database.

It reads ``orders.changes`` and ``coupons.issued`` with ``read_committed`` (aborted
pipeline transactions never reach the database), by manual assignment of every partition,
and writes the ``orders`` and ``coupons`` tables. Exactly once, not merely idempotent:

* each batch of records is one database transaction that writes the rows *and* the next
  offset of every source partition it consumed (``sink_offsets``);
* on start, and after any database error, the consumer seeks to the stored offsets (the
  consumer group's offsets are never used), so a crash before the commit replays the
  batch and a crash after it does not;
* records below a stored offset are skipped, and the offset update is a compare-and-set
  on the previous value, so a second sink on the same database fails its transaction
  rather than writing twice.

Belt and braces below that: unique constraints (order_id, coupon_id, a coupon's
order_id) refuse a duplicate insert, and an order row moves only by its next version
(``UPDATE ... WHERE order_id = ? AND version = ?``), so a stale or replayed change can
never move it backwards. Such refusals are logged and written to ``sink_refusals``; in an
exactly-once run there are none. A record whose values the database cannot hold (an id
with a NUL, a number past its column) is refused the same way, with the offset past it
in the same transaction (:func:`apply_batch`), so it neither stops the sink nor is
retried on every restart; only transient database errors are retried.

The pure part, turning a batch of records and the rows they touch into row operations,
is :func:`plan_batch`; :func:`apply_batch` runs it inside one transaction.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy import Connection, Engine, and_, bindparam, insert, select, tuple_, update

from pipeline.domain.models import excerpt
from pipeline.edges import db
from pipeline.settings import Settings

log = logging.getLogger("pipeline.edges.sink")

STATUSES = frozenset({"NEW", "CREATED", "PAID", "SHIPPED", "CANCELLED"})


@dataclass(frozen=True, slots=True)
class ChangeRec:
    topic: str
    partition: int
    offset: int
    event_id: str
    order_id: str
    from_status: str
    to_status: str
    version: int
    ts_ms: int


@dataclass(frozen=True, slots=True)
class CouponRec:
    topic: str
    partition: int
    offset: int
    coupon_id: str
    order_id: str
    user_id: str
    amount_cents: int


@dataclass(frozen=True, slots=True)
class BadRec:
    topic: str
    partition: int
    offset: int
    reason: str


Rec = ChangeRec | CouponRec | BadRec


@dataclass(frozen=True, slots=True)
class OrderRow:
    order_id: str
    status: str
    version: int
    updated_ms: int
    event_id: str

    def as_params(self) -> dict[str, Any]:
        return {
            "order_id": self.order_id,
            "status": self.status,
            "version": self.version,
            "updated_ms": self.updated_ms,
            "event_id": self.event_id,
        }


@dataclass(frozen=True, slots=True)
class Refusal:
    topic: str
    partition: int
    offset: int
    key: str | None
    reason: str


@dataclass
class Plan:
    """The row operations of one batch."""

    inserts: list[OrderRow] = field(default_factory=list)
    #: (the version the row must still have, the row to write)
    updates: list[tuple[int, OrderRow]] = field(default_factory=list)
    coupons: list[CouponRec] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    #: next offset per (topic, partition), after the batch
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    #: records that were below a stored offset (already in the database)
    skipped: int = 0

    @property
    def rows(self) -> int:
        return len(self.inserts) + len(self.updates) + len(self.coupons)


def _int(doc: dict[str, Any], name: str) -> int:
    value = doc[name]
    if type(value) is not int:
        raise TypeError(f"field {name!r} must be an integer")
    return value


def _str(doc: dict[str, Any], name: str) -> str:
    value = doc[name]
    if not isinstance(value, str) or not value:
        raise TypeError(f"field {name!r} must be a non-empty string")
    return value


def parse_record(kind: str, topic: str, partition: int, offset: int, value: bytes | None) -> Rec:
    """One record of ``orders.changes`` (kind "changes") or ``coupons.issued`` ("coupons")."""
    try:
        doc = orjson.loads(value or b"")
        if not isinstance(doc, dict):
            raise TypeError("not a JSON object")
        if kind == "changes":
            change = ChangeRec(
                topic,
                partition,
                offset,
                event_id=_str(doc, "event_id"),
                order_id=_str(doc, "order_id"),
                from_status=_str(doc, "from"),
                to_status=_str(doc, "to"),
                version=_int(doc, "version"),
                ts_ms=_int(doc, "ts_ms"),
            )
            if change.to_status not in STATUSES or change.from_status not in STATUSES:
                raise ValueError(
                    f"unknown status {excerpt(change.from_status)} -> {excerpt(change.to_status)}"
                )
            if change.version < 1:
                raise ValueError(f"version {change.version} < 1")
            return change
        return CouponRec(
            topic,
            partition,
            offset,
            coupon_id=_str(doc, "coupon_id"),
            order_id=_str(doc, "order_id"),
            user_id=_str(doc, "user_id"),
            amount_cents=_int(doc, "amount_cents"),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        return BadRec(topic, partition, offset, f"undecodable {kind} record: {error}")


def plan_batch(
    records: Sequence[Rec],
    stored_offsets: Mapping[tuple[str, int], int],
    orders: Mapping[str, OrderRow],
    coupon_ids: Iterable[str] = (),
    coupon_orders: Iterable[str] = (),
) -> Plan:
    """Decide a batch against the stored state; pure.

    ``records`` in consumption order (per partition, by offset); ``stored_offsets`` the
    next offset the database has per partition (absent: nothing consumed yet);
    ``orders`` the current rows of the orders the batch touches; ``coupon_ids`` and
    ``coupon_orders`` the coupons already stored among those the batch names.

    A change applies only on top of its predecessor: version 1 from ``NEW`` to a missing
    row, version ``n + 1`` from the stored status to a row at version ``n``. Anything
    else (a replay, a stale or skipped version, a wrong ``from``) is refused. Several
    changes of one order in a batch fold into one insert or update. A record with a
    value no table column can hold (:func:`unstorable`) is refused here, before the
    database sees it: the same verdict on SQLite and PostgreSQL, and whatever the
    batching (a fold would otherwise hide a bad intermediate value from the database).
    """
    plan = Plan()
    state: dict[str, OrderRow | None] = {}
    cids, coids = set(coupon_ids), set(coupon_orders)
    for rec in records:
        tp = (rec.topic, rec.partition)
        floor = plan.offsets.get(tp, stored_offsets.get(tp, 0))
        if rec.offset < floor:
            plan.skipped += 1
            continue
        plan.offsets[tp] = rec.offset + 1
        if isinstance(rec, BadRec):
            plan.refusals.append(Refusal(rec.topic, rec.partition, rec.offset, None, rec.reason))
            continue
        unfit = unstorable(rec)
        if unfit:
            plan.refusals.append(
                Refusal(rec.topic, rec.partition, rec.offset, refusal_key(rec.order_id), unfit)
            )
        elif isinstance(rec, CouponRec):
            if rec.coupon_id in cids or rec.order_id in coids:
                plan.refusals.append(
                    Refusal(
                        rec.topic,
                        rec.partition,
                        rec.offset,
                        rec.order_id,
                        f"duplicate coupon {rec.coupon_id} for order {rec.order_id}",
                    )
                )
                continue
            cids.add(rec.coupon_id)
            coids.add(rec.order_id)
            plan.coupons.append(rec)
        else:
            current = state[rec.order_id] if rec.order_id in state else orders.get(rec.order_id)
            reason = _refuse_change(current, rec)
            if reason:
                plan.refusals.append(
                    Refusal(rec.topic, rec.partition, rec.offset, rec.order_id, reason)
                )
                continue
            state[rec.order_id] = OrderRow(
                rec.order_id, rec.to_status, rec.version, rec.ts_ms, rec.event_id
            )
    for order_id, row in state.items():
        assert row is not None
        before = orders.get(order_id)
        if before is None:
            plan.inserts.append(row)
        else:
            plan.updates.append((before.version, row))
    return plan


def unstorable(rec: ChangeRec | CouponRec) -> str | None:
    """Why the record's values cannot be stored in the sink's tables, or ``None``. Pure."""
    checks: tuple[tuple[Any, object], ...]
    if isinstance(rec, ChangeRec):
        o = db.sink_orders.c
        checks = (
            (o.order_id, rec.order_id),
            (o.event_id, rec.event_id),
            (o.version, rec.version),
            (o.updated_ms, rec.ts_ms),
        )
    else:
        c = db.sink_coupons.c
        checks = (
            (c.order_id, rec.order_id),
            (c.coupon_id, rec.coupon_id),
            (c.user_id, rec.user_id),
            (c.amount_cents, rec.amount_cents),
        )
    for column, value in checks:
        reason = db.unfit(column, value)
        if reason:
            return f"cannot be stored: {reason}"
    return None


def refusal_key(order_id: str) -> str:
    """The order id as ``sink_refusals.key`` can hold it: as is, or a short quote."""
    if db.unfit(db.sink_refusals.c.key, order_id) is None:
        return order_id
    return excerpt(order_id)[:128]


def _refuse_change(current: OrderRow | None, rec: ChangeRec) -> str | None:
    have = current.version if current else 0
    status = current.status if current else "NEW"
    if rec.version <= have:
        return f"stale change v{rec.version} of {rec.order_id}: stored v{have} {status}"
    if rec.version != have + 1:
        return f"gap: change v{rec.version} of {rec.order_id} on stored v{have}"
    if rec.from_status != status:
        return (
            f"change v{rec.version} of {rec.order_id} from {rec.from_status}, "
            f"but stored status is {status}"
        )
    return None


class Conflict(Exception):
    """Another writer changed the sink's offsets or rows under this transaction."""


_CHUNK = 500


def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


def load_offsets(conn: Connection) -> dict[tuple[str, int], int]:
    t = db.sink_offsets
    return {
        (r.topic, r.partition): r.next_offset
        for r in conn.execute(select(t.c.topic, t.c.partition, t.c.next_offset))
    }


@dataclass
class Stored:
    """What the database holds for the partitions, orders and coupons of one batch."""

    offsets: dict[tuple[str, int], int]
    orders: dict[str, OrderRow]
    coupon_ids: set[str]
    coupon_orders: set[str]


def read_offsets(conn: Connection, records: Sequence[Rec]) -> dict[tuple[str, int], int]:
    off = db.sink_offsets
    tps = sorted({(r.topic, r.partition) for r in records})
    stored: dict[tuple[str, int], int] = {}
    for chunk in _chunks(tps):
        q = select(off.c.topic, off.c.partition, off.c.next_offset).where(
            tuple_(off.c.topic, off.c.partition).in_(list(chunk))
        )
        stored.update({(r.topic, r.partition): r.next_offset for r in conn.execute(q)})
    return stored


def read_stored(conn: Connection, records: Sequence[Rec]) -> Stored:
    o, c = db.sink_orders, db.sink_coupons
    # A value no column can hold is refused by the plan; as a query parameter the
    # database may refuse it too (PostgreSQL: a NUL), so it is not looked up.
    rows = [r for r in records if not isinstance(r, BadRec) and not unstorable(r)]
    order_ids = sorted({r.order_id for r in rows if isinstance(r, ChangeRec)})
    current: dict[str, OrderRow] = {}
    for chunk in _chunks(order_ids):
        for r in conn.execute(select(o).where(o.c.order_id.in_(list(chunk)))):
            current[r.order_id] = OrderRow(
                r.order_id, r.status, r.version, r.updated_ms, r.event_id
            )
    coupons = [r for r in rows if isinstance(r, CouponRec)]
    cids: set[str] = set()
    coids: set[str] = set()
    for chunk in _chunks(coupons):
        q = select(c.c.coupon_id, c.c.order_id).where(
            c.c.coupon_id.in_([r.coupon_id for r in chunk])
            | c.c.order_id.in_([r.order_id for r in chunk])
        )
        for r in conn.execute(q):
            cids.add(r.coupon_id)
            coids.add(r.order_id)
    return Stored(read_offsets(conn, records), current, cids, coids)


def apply_batch(conn: Connection, records: Sequence[Rec]) -> Plan:
    """Apply a batch inside the caller's transaction (``with engine.begin() as conn``).

    The offsets of every record move in this transaction, whatever becomes of its row:
    a record the database refuses for its content is written to ``sink_refusals``
    instead, in the same transaction, so it is neither retried forever nor lost. Only
    the row writes run under a savepoint; when the database refuses them for their
    content (:func:`pipeline.edges.db.is_content_error`), the batch is split in halves, each
    under its own savepoint, down to the one record that fails alone, so the rows of
    every other record still land. Any other error (a conflict with a second sink, a
    lost connection) fails the whole transaction, for the caller to replay.
    """
    stored_offsets = read_offsets(conn, records)
    result = Plan()
    fresh: list[Rec] = []
    for rec in records:
        tp = (rec.topic, rec.partition)
        if rec.offset < result.offsets.get(tp, stored_offsets.get(tp, 0)):
            result.skipped += 1
            continue
        result.offsets[tp] = rec.offset + 1
        fresh.append(rec)
    # Offsets first, outside the savepoints: the compare-and-set orders two sinks on one
    # database before either writes a row, and a conflict there is never a refusal.
    write_offsets(conn, result.offsets, stored_offsets)
    _apply_rows(conn, fresh, result)
    return result


def _apply_rows(conn: Connection, records: Sequence[Rec], into: Plan) -> None:
    if not records:
        return
    try:
        with conn.begin_nested():
            stored = read_stored(conn, records)
            # Every record here is at or past its stored offset (apply_batch skipped the
            # rest), so no floor applies.
            plan = plan_batch(records, {}, stored.orders, stored.coupon_ids, stored.coupon_orders)
            write_rows(conn, plan)
    except Exception as error:
        if not db.is_content_error(error):
            raise
        if len(records) > 1:
            # Halves in order: the first half's rows are in place when the second is
            # planned, as they would be in one batch.
            mid = len(records) // 2
            _apply_rows(conn, records[:mid], into)
            _apply_rows(conn, records[mid:], into)
            return
        rec = records[0]
        key = None if isinstance(rec, BadRec) else refusal_key(rec.order_id)
        refusal = Refusal(
            rec.topic,
            rec.partition,
            rec.offset,
            key,
            f"refused by the database: {db.describe_error(error)}",
        )
        try:
            with conn.begin_nested():
                _write_refusals(conn, [refusal])
        except Exception as again:
            if not db.is_content_error(again):
                raise
            # A database whose encoding cannot hold the quoted id or message (say,
            # LATIN1): the refusal in ASCII, so that the record still moves on.
            refusal = Refusal(
                rec.topic,
                rec.partition,
                rec.offset,
                None if key is None else ascii(key)[:128],
                ascii(refusal.reason)[:1024],
            )
            _write_refusals(conn, [refusal])
        into.refusals.append(refusal)
        return
    into.inserts += plan.inserts
    into.updates += plan.updates
    into.coupons += plan.coupons
    into.refusals += plan.refusals


def write_plan(conn: Connection, plan: Plan, stored: Mapping[tuple[str, int], int]) -> None:
    """Write a plan made from ``stored``; :class:`Conflict` if the rows moved since."""
    write_offsets(conn, plan.offsets, stored)
    write_rows(conn, plan)


def write_offsets(
    conn: Connection,
    offsets: Mapping[tuple[str, int], int],
    stored: Mapping[tuple[str, int], int],
) -> None:
    """Move the offsets from ``stored``; :class:`Conflict` if another writer moved them.

    The compare-and-set's row lock orders two sinks on one database, and the loser finds
    the offset moved and rolls back.
    """
    off = db.sink_offsets
    for tp, nxt in sorted(offsets.items()):
        if tp in stored:
            res = conn.execute(
                update(off)
                .where(
                    and_(
                        off.c.topic == tp[0],
                        off.c.partition == tp[1],
                        off.c.next_offset == stored[tp],
                    )
                )
                .values(next_offset=nxt)
            )
            if res.rowcount != 1:
                raise Conflict(f"offset of {tp[0]}[{tp[1]}] moved under this sink")
        else:
            # A concurrent first insert fails on the primary key.
            conn.execute(insert(off).values(topic=tp[0], partition=tp[1], next_offset=nxt))


def write_rows(conn: Connection, plan: Plan) -> None:
    """Write a plan's rows and refusals; :class:`Conflict` if an order row moved."""
    o, c = db.sink_orders, db.sink_coupons
    if plan.inserts:
        conn.execute(insert(o), [r.as_params() for r in plan.inserts])
    if plan.updates:
        stmt = (
            update(o)
            .where(and_(o.c.order_id == bindparam("b_order_id"), o.c.version == bindparam("b_v")))
            .values(
                status=bindparam("b_status"),
                version=bindparam("b_version"),
                updated_ms=bindparam("b_updated_ms"),
                event_id=bindparam("b_event_id"),
            )
        )
        res = conn.execute(
            stmt,
            [
                {
                    "b_order_id": row.order_id,
                    "b_v": expected,
                    "b_status": row.status,
                    "b_version": row.version,
                    "b_updated_ms": row.updated_ms,
                    "b_event_id": row.event_id,
                }
                for expected, row in plan.updates
            ],
        )
        if conn.dialect.supports_sane_multi_rowcount and res.rowcount != len(plan.updates):
            raise Conflict(f"{len(plan.updates) - res.rowcount} order rows moved under this sink")
    if plan.coupons:
        conn.execute(
            insert(c),
            [
                {
                    "coupon_id": r.coupon_id,
                    "order_id": r.order_id,
                    "user_id": r.user_id,
                    "amount_cents": r.amount_cents,
                }
                for r in plan.coupons
            ],
        )
    _write_refusals(conn, plan.refusals)


def _write_refusals(conn: Connection, refusals: Sequence[Refusal]) -> None:
    if refusals:
        conn.execute(
            insert(db.sink_refusals),
            [
                {
                    "topic": f.topic,
                    "partition": f.partition,
                    "offset": f.offset,
                    "key": f.key,
                    "reason": f.reason,
                }
                for f in refusals
            ],
        )


@dataclass
class SinkStats:
    records: int = 0
    rows: int = 0
    batches: int = 0
    refusals: int = 0
    skipped: int = 0
    db_errors: int = 0


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    from pipeline.kafka_io import partitions_of

    return await partitions_of(consumer, topic)


async def run_sink(
    settings: Settings,
    db_url: str,
    *,
    batch_max: int = 2000,
    stop: asyncio.Event | None = None,
    idle_exit_s: float | None = None,
) -> SinkStats:
    """Consume until ``stop`` is set (or ``idle_exit_s`` passes without a record)."""
    stop = stop or asyncio.Event()
    engine = db.engine_for(db_url)
    await db.retry_db(lambda: db.create_schema(engine), "sink: create schema")
    kinds = {settings.topic_changes: "changes", settings.topic_coupons: "coupons"}
    consumer = AIOKafkaConsumer(
        **settings.kafka.kwargs(),
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        client_id="pipeline-sink",
        max_partition_fetch_bytes=1024 * 1024,
    )
    stats = SinkStats()
    await consumer.start()
    try:
        tps = await _assign_all(consumer, list(kinds), stop)
        if not tps:
            return stats
        await _seek_stored(consumer, engine, tps)
        log.info("sink: consuming %d partitions of %s into %s", len(tps), list(kinds), engine.url)
        last_record = time.monotonic()
        last_report = time.monotonic()
        backoff = db.Backoff()
        while not stop.is_set():
            fetched = await consumer.getmany(timeout_ms=300, max_records=batch_max)
            records: list[Rec] = []
            for tp, msgs in fetched.items():
                kind = kinds[tp.topic]
                records.extend(
                    parse_record(kind, tp.topic, tp.partition, m.offset, m.value) for m in msgs
                )
            now = time.monotonic()
            if now - last_report > 5:
                last_report = now
                log.info("sink: %s", stats)
            if not records:
                if idle_exit_s is not None and now - last_record > idle_exit_s:
                    break
                continue
            last_record = now

            def work(batch: list[Rec] = records) -> Plan:
                with engine.begin() as conn:
                    return apply_batch(conn, batch)

            try:
                plan = await asyncio.to_thread(work)
            except Exception as error:
                stats.db_errors += 1
                # A record's content never fails the batch (apply_batch refuses the
                # record); what is left is a second sink, a transient error, or a fault
                # no replay can mend, which ends the process.
                expected = isinstance(error, Conflict) or _is_integrity(error)
                if not (expected or db.is_transient(error)):
                    raise
                delay = backoff.next()
                log.warning(
                    "sink: batch of %d records not written (%s); back to the stored offsets"
                    " in %.1f s",
                    len(records),
                    db.describe_error(error),
                    delay,
                )
                await asyncio.sleep(delay)
                # The commit may or may not have happened: the database is the truth.
                await _seek_stored(consumer, engine, tps)
                continue
            backoff.reset()
            stats.batches += 1
            stats.records += len(records) - plan.skipped
            stats.rows += plan.rows
            stats.skipped += plan.skipped
            stats.refusals += len(plan.refusals)
            for f in plan.refusals:
                log.warning(
                    "sink: refused %s[%d]@%d (%s): %s",
                    f.topic,
                    f.partition,
                    f.offset,
                    f.key,
                    f.reason,
                )
            log.debug("sink: batch of %d records, %d rows", len(records), plan.rows)
    finally:
        log.info("sink: stopping: %s", stats)
        await consumer.stop()
        engine.dispose()
    return stats


def _is_integrity(error: BaseException) -> bool:
    from sqlalchemy import exc

    # Only the first insert of a partition's offset row can raise it here (row writes
    # run under savepoints in apply_batch): another sink inserted it concurrently. The
    # batch is rolled back and replayed from the stored offsets, where it is skipped.
    return isinstance(error, exc.IntegrityError)


async def _assign_all(
    consumer: AIOKafkaConsumer, topics: list[str], stop: asyncio.Event
) -> list[TopicPartition]:
    backoff = db.Backoff(first=0.2, cap=2.0)
    while not stop.is_set():
        parts = {t: await _partitions(consumer, t) for t in topics}
        missing = [t for t, ps in parts.items() if not ps]
        if not missing:
            tps = [TopicPartition(t, p) for t in topics for p in sorted(parts[t])]
            consumer.assign(tps)
            return tps
        log.info("sink: waiting for topics %s", missing)
        await asyncio.sleep(backoff.next())
    return []


async def _seek_stored(
    consumer: AIOKafkaConsumer, engine: Engine, tps: list[TopicPartition]
) -> None:
    def load() -> dict[tuple[str, int], int]:
        with engine.connect() as conn:
            return load_offsets(conn)

    stored = await db.retry_db(load, "sink: load offsets")
    for tp in tps:
        nxt = stored.get((tp.topic, tp.partition))
        if nxt is None:
            await consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, nxt)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "sink",
        help="the exactly-once database sink: orders.changes and coupons.issued -> tables",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--db", required=True, help="SQLAlchemy URL or SQLite file path")
    p.add_argument("--batch", type=int, default=2000, help="records per transaction (2000)")
    p.add_argument(
        "--idle-exit",
        type=float,
        default=None,
        help="exit after this many seconds without a record (default: run until stopped)",
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace, settings: Settings) -> int:
    logging.getLogger("pipeline").setLevel(logging.INFO)

    async def run() -> SinkStats:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        return await run_sink(
            settings, args.db, batch_max=args.batch, stop=stop, idle_exit_s=args.idle_exit
        )

    stats = asyncio.run(run())
    print(
        f"sink: {stats.records} records, {stats.rows} rows in {stats.batches} transactions, "
        f"{stats.refusals} refused"
    )
    return 0
