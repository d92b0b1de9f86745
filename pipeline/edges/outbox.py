"""The transactional outbox: write a business row and its event in one database transaction,
and ``python -m pipeline outbox-relay --db URL`` to publish the events to Kafka.

Writing (:func:`add`): the application calls it inside its own transaction, next to its
business write. Both commit or neither does, so there is never an event without its row
or a row without its event (no dual write). On PostgreSQL :func:`add` first takes a
transaction-scoped advisory lock on the key: two transactions writing events of one key
are serialized, so the later one gets the larger ``id``, and ``id`` order is commit order
per key. On SQLite the single writer lock does the same. The commit also sends a
``NOTIFY`` that wakes the relays at once.

Relaying (:class:`Relay`): rows are hashed by key into :data:`BUCKETS` buckets, and one
bucket is published by one relay at a time, in ``id`` order, so rows of a key reach
Kafka in commit order however many relays run. On PostgreSQL each relay holds the
buckets it owns as session advisory locks (released by the server the moment a relay
dies or loses its connection: ``kill -9`` hands its buckets over at once) and takes a
fair share, ``ceil(BUCKETS / live relays)``; on SQLite one relay holds a lease on the
whole outbox and the others stand by. Batches are sent with an idempotent producer
(``enable_idempotence``, ``acks=all``), awaited, and only then marked published.

A crash between the send and the mark publishes the batch again: same ``event_id``, same
record timestamp (the row's creation time), and the dedup stage drops the copy. A row
that can never be published gets ``error`` set, is logged by id and ``event_id``, and
does not hold up the rows behind it, of its key or any other: its value is not a valid
event for the input topic, its topic name is not a legal Kafka topic name, or Kafka
refuses the row for good (:func:`send_error_kind`: too large, an invalid or unauthorized
topic, a timestamp out of the broker's range, a topic that stays missing and cannot be
created). Anything else (a timeout, a broker away, a leader moving) leaves the row
pending for the next round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import random
import re
import signal
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    CorruptRecordException,
    InvalidTimestampError,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    PolicyViolationError,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
    for_code,
)
from sqlalchemy import Connection, Engine, and_, insert, make_url, select, text, update

from pipeline.admin import topic_configs
from pipeline.domain.models import BadInput, excerpt, parse_event
from pipeline.edges import db
from pipeline.settings import Settings

log = logging.getLogger("pipeline.edges.outbox")

#: Units of ownership among relays; more buckets spread keys more evenly.
BUCKETS = 64
#: Advisory lock namespaces (the first of two int4 keys).
LOCK_KEY = 0x0B0C_0001
LOCK_BUCKET = 0x0B0C_0002
LOCK_MEMBER = 0x0B0C_0003
MEMBER_SLOTS = 256
CHANNEL = "pipeline_outbox"
MAX_VALUE_BYTES = 1024 * 1024
#: How long a topic may stay missing, while the broker answers and refuses or fails to
#: create it, before its rows are marked failed. A broker that does not answer never
#: starts this clock.
TOPIC_WAIT_S = 60.0
#: Kafka's own rule for topic names (``org.apache.kafka.common.internals.Topic``).
_LEGAL_TOPIC = re.compile(r"[a-zA-Z0-9._-]{1,249}")
#: Refusals of a record (or of its batch, see :meth:`Relay._isolate`) that retrying the
#: same record can never change. Authorization is among them: the relay's principal may
#: not write that topic; an operator who grants it re-queues the rows (``UPDATE outbox
#: SET error = NULL WHERE ...``).
PERMANENT_SEND_ERRORS: tuple[type[BaseException], ...] = (
    MessageSizeTooLargeError,  # over max_request_size (client) or message.max.bytes
    RecordTooLargeError,
    RecordListTooLargeError,
    InvalidTopicError,  # e.g. an internal topic
    TopicAuthorizationFailedError,
    InvalidTimestampError,  # outside the broker's message.timestamp.*.max.ms
    CorruptRecordException,
    PolicyViolationError,
)


def bucket_of(key: bytes | None, event_id: str) -> int:
    # crc32 is stable across processes and versions (Python's hash() is salted).
    return zlib.crc32(key if key is not None else event_id.encode()) % BUCKETS


def _int4(n: int) -> int:
    """An unsigned 32-bit hash as PostgreSQL's signed int4."""
    return n - (1 << 32) if n >= 1 << 31 else n


def add(
    conn: Connection,
    *,
    event_id: str,
    topic: str,
    key: bytes | None,
    value: bytes,
    created_ms: int | None = None,
) -> None:
    """Add an event to the outbox in the caller's open transaction."""
    postgres = conn.dialect.name == "postgresql"
    if postgres:
        # One round trip: the per-key lock (held to the end of the transaction) and the
        # wake-up of the relays (delivered at commit, and only then; several in one
        # transaction fold into one).
        conn.execute(
            text("SELECT pg_advisory_xact_lock(:ns, :k), pg_notify(:c, '')"),
            {"ns": LOCK_KEY, "k": _int4(zlib.crc32(key or event_id.encode())), "c": CHANNEL},
        )
    conn.execute(
        insert(db.outbox).values(
            event_id=event_id,
            topic=topic,
            key=key,
            value=value,
            bucket=bucket_of(key, event_id),
            created_ms=created_ms if created_ms is not None else db.now_ms(),
        )
    )


@dataclass(frozen=True, slots=True)
class Row:
    id: int
    event_id: str
    topic: str
    key: bytes | None
    value: bytes
    bucket: int
    created_ms: int


def topic_name_error(topic: str) -> str | None:
    """Why Kafka would refuse ``topic`` as a name, or ``None``. Pure."""
    if _LEGAL_TOPIC.fullmatch(topic) is None or topic in (".", ".."):
        return (
            f"topic {excerpt(topic)} is not a legal Kafka topic name (1 to 249 of"
            " a-z A-Z 0-9 . _ -)"
        )
    return None


def send_error_kind(error: BaseException) -> Literal["permanent", "transient"]:
    """Whether a failed send can ever succeed for the same record. Pure.

    Everything not known to be permanent is transient: a timeout, a lost connection, a
    leader moving, an unknown topic (its own bounded wait is in
    :meth:`Relay._check_topics`), a fenced or out-of-sequence producer (a new producer
    resends), even an error aiokafka does not name. Marking a row failed loses its event
    unless an operator re-queues it, so only a refusal of the record itself does.
    """
    return "permanent" if isinstance(error, PERMANENT_SEND_ERRORS) else "transient"


def describe_send_error(error: BaseException) -> str:
    """A bounded reason for a refused row (an error's text may quote a topic name)."""
    errno = getattr(error, "errno", None)
    detail = " ".join(str(a) for a in error.args) or getattr(error, "description", "")
    detail = "".join(c if c.isprintable() else " " for c in detail[:300])
    code = f" [error {errno}]" if errno is not None else ""
    return f"refused by Kafka: {type(error).__name__}{code}" + (f": {detail}" if detail else "")


def topic_verdict(error_code: int) -> Literal["ready", "missing", "refused", "unavailable"]:
    """A topic's state from a metadata or CreateTopics error code. Pure."""
    if error_code == 0 or error_code == TopicAlreadyExistsError.errno:
        return "ready"
    if error_code == UnknownTopicOrPartitionError.errno:
        return "missing"
    if error_code in (
        InvalidTopicError.errno,
        TopicAuthorizationFailedError.errno,
        PolicyViolationError.errno,
    ):
        return "refused"
    return "unavailable"


def invalid_reason(row: Row, raw_topic: str) -> str | None:
    """Why a row must not be published, or ``None``. Pure."""
    bad_topic = topic_name_error(row.topic)
    if bad_topic:
        return bad_topic
    if len(row.value) > MAX_VALUE_BYTES:
        return f"value is {len(row.value)} bytes, over the 1 MiB limit"
    if row.topic == raw_topic:
        parsed = parse_event(row.value, row.key)
        if isinstance(parsed, BadInput):
            return f"not a valid {raw_topic} event: {parsed.reason}"
        if parsed.event_id != row.event_id:
            return f"value's event_id {parsed.event_id!r} is not the row's {row.event_id!r}"
    return None


def published_prefix(rows: Sequence[Row], ok: Sequence[bool]) -> list[int]:
    """Ids safe to mark published: per key, the rows before the first failed send. Pure.

    Marking a later row of a key while an earlier one stays pending would publish the
    earlier one after it on the next round. ``rows`` leaves out the rows marked failed
    for good: those hold up nothing.
    """
    blocked: set[bytes | None] = set()
    out: list[int] = []
    for row, good in zip(rows, ok, strict=True):
        k = row.key if row.key is not None else row.event_id.encode()
        if k in blocked:
            continue
        if good:
            out.append(row.id)
        else:
            blocked.add(k)
    return out


@dataclass
class RelayStats:
    published: int = 0
    batches: int = 0
    failed_rows: int = 0
    db_errors: int = 0
    kafka_errors: int = 0


class Claims:
    """Which buckets this relay may publish, and keeping hold of them."""

    def __init__(self, engine: Engine, owner: str, lease_s: float = 3.0) -> None:
        self.engine = engine
        self.owner = owner
        self.lease_s = lease_s
        self.postgres = db.is_postgres(engine)
        self.conn: Connection | None = None
        self.buckets: set[int] = set()
        self.member_slot: int | None = None

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()  # a closed session releases its advisory locks
        self.conn = None
        self.buckets = set()
        self.member_slot = None

    def connection(self) -> Connection:
        if self.conn is None or self.conn.closed or self.conn.invalidated:
            self.close()
            # The session that holds the locks; autocommit so no transaction stays open.
            self.conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        return self.conn

    def refresh(self) -> set[int]:
        """Take or give back buckets; blocking. Returns the buckets owned now."""
        if not self.postgres:
            return self._sqlite_lease()
        conn = self.connection()
        if self.member_slot is None:
            for slot in random.sample(range(MEMBER_SLOTS), MEMBER_SLOTS):
                got: bool = conn.execute(
                    text("SELECT pg_try_advisory_lock(:ns, :s)"), {"ns": LOCK_MEMBER, "s": slot}
                ).scalar_one()
                if got:
                    self.member_slot = slot
                    break
            else:
                raise RuntimeError(f"more than {MEMBER_SLOTS} relays on one outbox")
        members: int = conn.execute(
            text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND classid::bigint = :ns AND objsubid = 2"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ),
            {"ns": _int4(LOCK_MEMBER)},
        ).scalar_one()
        share = math.ceil(BUCKETS / max(1, int(members)))
        # Give back the surplus first (between batches, so nothing is in flight), then
        # take free buckets up to the share, starting at a random place to spread them.
        for b in sorted(self.buckets, reverse=True)[: max(0, len(self.buckets) - share)]:
            conn.execute(text("SELECT pg_advisory_unlock(:ns, :b)"), {"ns": LOCK_BUCKET, "b": b})
            self.buckets.discard(b)
        if len(self.buckets) < share:
            start = random.randrange(BUCKETS)
            for i in range(BUCKETS):
                b = (start + i) % BUCKETS
                if b in self.buckets:
                    continue
                got = conn.execute(
                    text("SELECT pg_try_advisory_lock(:ns, :b)"), {"ns": LOCK_BUCKET, "b": b}
                ).scalar_one()
                if got:
                    self.buckets.add(b)
                    if len(self.buckets) >= share:
                        break
        return set(self.buckets)

    def _sqlite_lease(self) -> set[int]:
        lease = db.outbox_lease
        now = db.now_ms()
        with self.engine.begin() as conn:
            row = conn.execute(select(lease).where(lease.c.name == "relay")).first()
            if row is None:
                conn.execute(
                    insert(lease).values(
                        name="relay", owner=self.owner, expires_ms=now + int(self.lease_s * 1000)
                    )
                )
            elif row.owner == self.owner or row.expires_ms < now:
                if row.owner != self.owner:
                    log.info("outbox-relay: lease of %s expired; taking over", row.owner)
                conn.execute(
                    update(lease)
                    .where(lease.c.name == "relay")
                    .values(owner=self.owner, expires_ms=now + int(self.lease_s * 1000))
                )
            else:
                self.buckets = set()
                return set()
        self.buckets = set(range(BUCKETS))
        return set(self.buckets)

    def fetch(self, buckets: set[int], limit: int) -> list[Row]:
        if not buckets:
            return []
        o = db.outbox
        q = (
            select(o.c.id, o.c.event_id, o.c.topic, o.c.key, o.c.value, o.c.bucket, o.c.created_ms)
            .where(
                and_(
                    o.c.published_ms.is_(None),
                    o.c.error.is_(None),
                    o.c.bucket.in_(sorted(buckets)),
                )
            )
            .order_by(o.c.id)
            .limit(limit)
        )
        if self.postgres:
            rows = self.connection().execute(q).all()
        else:
            with self.engine.connect() as conn:
                rows = conn.execute(q).all()
        return [
            Row(r.id, r.event_id, r.topic, r.key, r.value, r.bucket, r.created_ms) for r in rows
        ]

    def mark(self, published: list[int], failed: dict[int, str]) -> None:
        o = db.outbox
        now = db.now_ms()

        def run(conn: Connection) -> None:
            for i in range(0, len(published), 1000):
                conn.execute(
                    update(o)
                    .where(and_(o.c.id.in_(published[i : i + 1000]), o.c.published_ms.is_(None)))
                    .values(published_ms=now)
                )
            for row_id, reason in failed.items():
                conn.execute(update(o).where(o.c.id == row_id).values(error=reason[:2000]))

        with self.engine.begin() as conn:
            run(conn)


class Relay:
    """One relay process: claim buckets, publish pending rows in id order, mark them."""

    def __init__(
        self,
        settings: Settings,
        db_url: str,
        *,
        batch: int = 500,
        max_wait_s: float = 1.0,
        mark_delay_s: float = 0.0,
        crash_after_publish: int = 0,
        topic_wait_s: float = TOPIC_WAIT_S,
    ) -> None:
        self.settings = settings
        self.db_url = db_url
        self.batch = batch
        self.max_wait_s = max_wait_s
        self.mark_delay_s = mark_delay_s
        self.crash_after_publish = crash_after_publish
        self.linger_s = 0.01
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.stats = RelayStats()
        self.wake = asyncio.Event()
        self.producer: AIOKafkaProducer | None = None
        self.known_topics: set[str] = set()
        self.topic_wait_s = topic_wait_s
        #: topic -> when the broker first said it is missing (and it stayed so)
        self.missing_since: dict[str, float] = {}

    async def _producer(self) -> AIOKafkaProducer:
        if self.producer is None:
            producer = AIOKafkaProducer(
                **self.settings.kafka.kwargs(),
                enable_idempotence=True,
                acks="all",
                linger_ms=5,
                max_batch_size=256 * 1024,
                max_request_size=2 * 1024 * 1024,
                request_timeout_ms=15000,
                client_id=f"outbox-relay-{self.owner}",
            )
            await producer.start()
            self.producer = producer
        return self.producer

    async def _drop_producer(self) -> None:
        if self.producer is not None:
            with contextlib.suppress(Exception):
                await self.producer.stop()
        self.producer = None

    async def _listen(self, stop: asyncio.Event) -> None:
        """Wake the loop on every NOTIFY (PostgreSQL only); reconnect with backoff."""
        import psycopg

        url = make_url(db.normalize_url(self.db_url))
        conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        backoff = db.Backoff(first=0.5, cap=5.0)
        while not stop.is_set():
            try:
                aconn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
                async with aconn:
                    await aconn.execute(f"LISTEN {CHANNEL}")
                    backoff.reset()
                    self.wake.set()  # rows may have come while not listening
                    async for _ in aconn.notifies():
                        self.wake.set()
                        if stop.is_set():
                            break
            except (psycopg.Error, OSError) as error:
                delay = backoff.next()
                log.warning(
                    "outbox-relay: LISTEN connection lost (%s); polling, reconnect in %.1f s",
                    str(error).splitlines()[0][:200] if str(error) else type(error).__name__,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _database_lost(
        self, error: Exception, claims: Claims, backoff: db.Backoff, what: str
    ) -> None:
        """A transient database error: release the buckets (the session that held them
        is gone) and wait before the next round. Anything else is raised."""
        if not db.is_transient(error):
            raise error
        self.stats.db_errors += 1
        await asyncio.to_thread(claims.close)
        delay = backoff.next()
        log.warning(
            "outbox-relay %s: %s (%s), retry in %.1f s",
            self.owner,
            what,
            str(error).splitlines()[0][:200],
            delay,
        )
        await asyncio.sleep(delay)

    async def run(self, stop: asyncio.Event, idle_exit_s: float | None = None) -> RelayStats:
        engine = db.engine_for(self.db_url)
        await db.retry_db(lambda: db.create_schema(engine), "outbox-relay: create schema")
        claims = Claims(engine, self.owner)
        listener = asyncio.create_task(self._listen(stop)) if db.is_postgres(engine) else None
        idle_wait = 0.02
        db_backoff = db.Backoff(first=0.2, cap=5.0)
        kafka_backoff = db.Backoff(first=0.2, cap=5.0)
        last_rows = time.monotonic()
        last_report = time.monotonic()
        owned: set[int] = set()
        refreshed = 0.0
        log.info("outbox-relay %s: publishing %s", self.owner, engine.url)
        try:
            while not stop.is_set():
                try:
                    if not owned or time.monotonic() - refreshed > 1.0:
                        now_owned = await asyncio.to_thread(claims.refresh)
                        refreshed = time.monotonic()
                    else:
                        now_owned = owned
                    if now_owned != owned:
                        log.info(
                            "outbox-relay %s: owns %d of %d buckets",
                            self.owner,
                            len(now_owned),
                            BUCKETS,
                        )
                        owned = now_owned
                    rows = await asyncio.to_thread(claims.fetch, owned, self.batch)
                    db_backoff.reset()
                except Exception as error:
                    owned = set()
                    await self._database_lost(
                        error, claims, db_backoff, "database unavailable; buckets released"
                    )
                    continue
                if time.monotonic() - last_report > 5:
                    last_report = time.monotonic()
                    log.info("outbox-relay %s: %s", self.owner, self.stats)
                if not rows:
                    if idle_exit_s is not None and time.monotonic() - last_rows > idle_exit_s:
                        break
                    # Poll with backoff; a NOTIFY cuts the wait short.
                    self.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wake.wait(), idle_wait)
                    idle_wait = min(self.max_wait_s, idle_wait * 2)
                    continue
                idle_wait = 0.02
                last_rows = time.monotonic()
                if len(rows) < self.batch:
                    # Few rows: let a few more commits arrive, for fuller batches.
                    await asyncio.sleep(self.linger_s)
                try:
                    await self._publish(rows, claims)
                    kafka_backoff.reset()
                except KafkaError as error:
                    self.stats.kafka_errors += 1
                    await self._drop_producer()
                    delay = kafka_backoff.next()
                    log.warning(
                        "outbox-relay %s: Kafka: %r; the rows of the batch of %d (ids %d..%d)"
                        " not acknowledged stay pending, retry in %.1f s",
                        self.owner,
                        error,
                        len(rows),
                        rows[0].id,
                        rows[-1].id,
                        delay,
                    )
                    await asyncio.sleep(delay)
                except Exception as error:
                    owned = set()
                    await self._database_lost(
                        error, claims, db_backoff, "marking failed; the batch goes out again"
                    )
        finally:
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await listener
            await self._drop_producer()
            await asyncio.to_thread(claims.close)
            engine.dispose()
            log.info("outbox-relay %s: stopped: %s", self.owner, self.stats)
        return self.stats

    async def _check_topics(self, topics: list[str]) -> tuple[set[str], dict[str, str], str]:
        """Make sure the topics exist: (the ready ones, the refused ones with a reason,
        why the others are not ready yet).

        The broker does not create topics on first use (nor should it); an outbox may
        name a topic before any consumer made it. A topic the broker refuses to create
        (an invalid name, no authorization, a policy) is refused for good; one that it
        says is missing, and that stays missing for ``topic_wait_s`` while the broker
        keeps answering, too. An admin request that fails (broker away, timeout) proves
        nothing about the topic and refuses nothing.
        """
        ready: set[str] = set()
        refused: dict[str, str] = {}
        waiting = ""
        admin = AIOKafkaAdminClient(
            **self.settings.kafka.kwargs(),
            request_timeout_ms=10000,
            client_id=f"outbox-relay-{self.owner}",
        )
        try:
            await admin.start()
            # Listed first: a metadata request naming a missing topic would have a
            # broker with auto.create.topics.enable create it, with its defaults.
            listed = set(await admin.list_topics())
            exist = {n for n in topics if n in listed}
            missing = [n for n in topics if n not in listed]
            if missing:
                # The pipeline's own topics with the pipeline's configuration (above all
                # orders.raw with the broker's append time, or workers refuse it).
                configs = topic_configs(self.settings)
                created = await admin.create_topics(
                    [
                        NewTopic(
                            name,
                            self.settings.partitions,
                            self.settings.replication,
                            topic_configs=configs.get(name, {}),
                        )
                        for name in missing
                    ]
                )
                for t in created.to_object()["topic_errors"]:
                    verdict = topic_verdict(t["error_code"])
                    if verdict == "ready":
                        exist.add(t["topic"])
                    elif verdict == "refused":
                        refused[t["topic"]] = _topic_refusal(t["topic"], t["error_code"])
                    else:
                        waiting = f"creating topic {t['topic']}: error {t['error_code']}"
            # Creation returns before the topic's partitions have leaders. A topic
            # still missing from an earlier round gets one look, not the full wait: the
            # other topics' rows of the batch wait for this.
            pending = sorted(exist)
            looks = 1 if all(n in self.missing_since or n in listed for n in pending) else 25
            for look in range(looks):
                if not pending:
                    break
                if look:
                    await asyncio.sleep(0.2)
                for t in await admin.describe_topics(pending):
                    verdict = topic_verdict(t["error_code"])
                    if verdict == "ready" and t["partitions"]:
                        ready.add(t["topic"])
                    elif verdict == "refused":
                        refused[t["topic"]] = _topic_refusal(t["topic"], t["error_code"])
                pending = [n for n in pending if n not in ready and n not in refused]
            # The broker answered all along: a topic it never listed, that is still not
            # there, is missing; past the wait, for good.
            now = time.monotonic()
            for name in topics:
                if name in ready or name in refused:
                    continue
                if name in listed:
                    waiting = waiting or f"topic {name} has no partition leaders yet"
                    continue
                since = self.missing_since.setdefault(name, now)
                if now - since >= self.topic_wait_s:
                    refused[name] = (
                        f"topic {name} is missing and could not be created for"
                        f" {now - since:.0f} s ({waiting or 'not listed after creation'})"
                    )
                else:
                    waiting = waiting or f"topic {name} is missing after its creation"
        except (KafkaError, OSError, TimeoutError) as error:
            waiting = f"topic check failed: {error!r}"[:300]
        finally:
            with contextlib.suppress(Exception):
                await admin.close()
        for name in ready | set(refused):
            self.missing_since.pop(name, None)
        return ready, refused, waiting

    async def _publish(self, rows: list[Row], claims: Claims) -> None:
        """Publish ``rows`` (in id order), mark what went out and what never can.

        Raises a :class:`KafkaError` when a row was held back for a passing reason (the
        caller backs off); those rows, and the rows of their keys behind them, stay
        pending.
        """
        failed: dict[int, str] = {}
        #: rows sent and acknowledged
        acked: set[int] = set()
        #: why the rows left pending are (the first reason)
        passing: BaseException | None = None
        candidates: list[Row] = []
        for row in rows:
            reason = invalid_reason(row, self.settings.topic_raw)
            if reason is None:
                candidates.append(row)
            else:
                failed[row.id] = reason
        new_topics = sorted({r.topic for r in candidates} - self.known_topics)
        if new_topics:
            ready, refused, waiting = await self._check_topics(new_topics)
            self.known_topics |= ready
            for row in candidates:
                if row.topic in refused:
                    failed[row.id] = refused[row.topic]
            if waiting:
                passing = KafkaError(waiting)
        sendable = [r for r in candidates if r.topic in self.known_topics and r.id not in failed]
        producer = await self._producer() if sendable else None
        sent: list[tuple[Row, asyncio.Future[Any]]] = []
        for row in sendable:
            assert producer is not None
            try:
                sent.append(
                    (
                        row,
                        await producer.send(
                            row.topic, row.value, key=row.key, timestamp_ms=row.created_ms
                        ),
                    )
                )
            except Exception as error:
                if send_error_kind(error) == "permanent":
                    # Refused before it was queued (over max_request_size): this record's
                    # own verdict, and the producer's state is untouched.
                    failed[row.id] = describe_send_error(error)
                    continue
                # Waiting for metadata or buffer space timed out: the rest of the batch
                # waits for the next round too rather than for each its own timeout.
                passing = passing or error
                if isinstance(error, UnknownTopicOrPartitionError):
                    self.known_topics.discard(row.topic)
                break
        results = await asyncio.gather(*(f for _, f in sent), return_exceptions=True)
        suspects: list[Row] = []
        for (row, _), res in zip(sent, results, strict=True):
            if not isinstance(res, BaseException):
                acked.add(row.id)
            elif send_error_kind(res) == "permanent":
                suspects.append(row)
            else:
                passing = passing or res
                if isinstance(res, UnknownTopicOrPartitionError):
                    self.known_topics.discard(row.topic)
        if suspects:
            passing = await self._isolate(rows, suspects, acked, failed) or passing
        live = [r for r in rows if r.id not in failed]
        published = published_prefix(live, [r.id in acked for r in live])
        for row in rows:
            if row.id in failed:
                log.error(
                    "outbox-relay %s: row id=%d event_id=%s topic=%s not published: %s",
                    self.owner,
                    row.id,
                    row.event_id,
                    excerpt(row.topic),
                    failed[row.id],
                )
        self.stats.batches += 1
        if published:
            log.info(
                "outbox-relay %s: sent %d rows (ids %d..%d), marking",
                self.owner,
                len(published),
                published[0],
                published[-1],
            )
        if self.crash_after_publish and self.stats.batches >= self.crash_after_publish:
            log.warning("outbox-relay %s: test crash between publish and mark", self.owner)
            os._exit(75)
        if self.mark_delay_s:
            await asyncio.sleep(self.mark_delay_s)
        await asyncio.to_thread(claims.mark, published, failed)
        self.stats.published += len(published)
        self.stats.failed_rows += len(failed)
        if passing is not None:
            raise passing if isinstance(passing, KafkaError) else KafkaError(repr(passing))

    async def _isolate(
        self, rows: list[Row], suspects: list[Row], acked: set[int], failed: dict[int, str]
    ) -> BaseException | None:
        """Find which of ``suspects`` Kafka refuses, by sending each alone.

        The broker answers per batch: one record too large (or a batch over the topic's
        max.message.bytes) fails every record it was batched with. Each suspect is sent
        again on its own, in id order, and only one refused alone is marked failed. A
        failed batch also leaves the idempotent producer's sequence broken for that
        partition (its later batches fail with OutOfOrderSequenceNumber), so a new
        producer sends, and another after each refusal. A row whose key has an earlier
        row pending is left pending (it would overtake it). Returns the passing error
        that stopped it, if any.
        """
        await self._drop_producer()
        held: set[bytes] = set()
        by_id = {r.id: r for r in suspects}
        for row in rows:
            k = row.key if row.key is not None else row.event_id.encode()
            if row.id not in by_id:
                if row.id not in acked and row.id not in failed:
                    held.add(k)
                continue
            if k in held:
                continue
            try:
                producer = await self._producer()
                await (
                    await producer.send(
                        row.topic, row.value, key=row.key, timestamp_ms=row.created_ms
                    )
                )
            except Exception as error:
                if send_error_kind(error) == "permanent":
                    failed[row.id] = describe_send_error(error)
                    await self._drop_producer()
                    continue
                await self._drop_producer()
                return error
            acked.add(row.id)
        return None


def _topic_refusal(topic: str, code: int) -> str:
    return f"topic {excerpt(topic)}: {describe_send_error(for_code(code)())}"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "outbox-relay",
        help="publish a database outbox to Kafka (idempotent producer, per-key order)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--db", required=True, help="SQLAlchemy URL or SQLite file path")
    p.add_argument("--batch", type=int, default=500, help="rows per round (500)")
    p.add_argument(
        "--max-wait", type=float, default=1.0, help="longest poll interval when idle, s (1.0)"
    )
    p.add_argument(
        "--idle-exit",
        type=float,
        default=None,
        help="exit after this many seconds without a pending row (default: run until stopped)",
    )
    # Test-only: widen or hit the window between publish and mark.
    p.add_argument("--mark-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--crash-after-publish", type=int, default=0, help=argparse.SUPPRESS)
    p.set_defaults(func=main)


def main(args: argparse.Namespace, settings: Settings) -> int:
    logging.getLogger("pipeline").setLevel(logging.INFO)
    relay = Relay(
        settings,
        args.db,
        batch=args.batch,
        max_wait_s=args.max_wait,
        mark_delay_s=args.mark_delay,
        crash_after_publish=args.crash_after_publish,
    )

    async def run() -> RelayStats:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        return await relay.run(stop, idle_exit_s=args.idle_exit)

    stats = asyncio.run(run())
    print(
        f"outbox-relay: {stats.published} rows published in {stats.batches} batches, "
        f"{stats.failed_rows} rows not publishable"
    )
    return 0
