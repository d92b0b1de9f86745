"""One database interface for SQLite and PostgreSQL: SQLAlchemy Core engines and the schema.

The outbox (producer side), the example application's business table and the sink's
tables (consumer side) are declared once here; SQLAlchemy renders the DDL and the
statements for each dialect, so no SQL dialect glue is written by hand.

``--db`` takes a SQLAlchemy URL (``postgresql+psycopg://...``, ``sqlite:///path``), a
plain ``postgresql://`` URL (psycopg 3 is put in), or a file path (SQLite).

SQLite runs every transaction as ``BEGIN IMMEDIATE``: it takes the database's single
writer lock up front, so two processes never both read, decide and then fail to upgrade
to a write lock (SQLite's ``database is locked`` deadlock); a waiting writer waits up to
``busy_timeout``. WAL mode lets readers run next to the writer.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    exc,
    text,
)
from sqlalchemy.pool import StaticPool

log = logging.getLogger(__name__)

T = TypeVar("T")

metadata = MetaData()

# SQLite only makes an INTEGER PRIMARY KEY an alias of its rowid (autoincrementing);
# PostgreSQL gets a 64-bit identity.
_Id = BigInteger().with_variant(Integer(), "sqlite")

#: The transactional outbox. ``id`` is the commit order per key (see
#: :func:`pipeline.outbox.add`); ``bucket`` is a hash of the key, the unit a relay owns.
outbox = Table(
    "outbox",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("event_id", String(128), nullable=False, unique=True),
    Column("topic", String(249), nullable=False),
    Column("key", LargeBinary, nullable=True),
    Column("value", LargeBinary, nullable=False),
    Column("bucket", Integer, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("published_ms", BigInteger, nullable=True),
    #: set (and never published) when the row cannot be published: its reason
    Column("error", Text, nullable=True),
    Index(
        "outbox_pending",
        "bucket",
        "id",
        postgresql_where=text("published_ms IS NULL AND error IS NULL"),
        sqlite_where=text("published_ms IS NULL AND error IS NULL"),
    ),
    # Never reuse an id, even after published rows are purged: ids are the order.
    sqlite_autoincrement=True,
)

#: SQLite's relay lease: one relay at a time owns the whole outbox there.
outbox_lease = Table(
    "outbox_lease",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("owner", String(64), nullable=False),
    Column("expires_ms", BigInteger, nullable=False),
)

#: The example application's business table (``produce --via-outbox``).
shop_orders = Table(
    "shop_orders",
    metadata,
    Column("order_id", String(128), primary_key=True),
    Column("user_id", String(128), nullable=False),
    Column("amount_cents", BigInteger, nullable=False),
    Column("paid_cents", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    #: transitions applied, as the pipeline's ``version`` counts them
    Column("version", Integer, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
)

#: The sink's copy of the order state machine, one row per order.
sink_orders = Table(
    "orders",
    metadata,
    Column("order_id", String(128), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("version", Integer, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
    Column("event_id", String(128), nullable=False),
)

sink_coupons = Table(
    "coupons",
    metadata,
    Column("coupon_id", String(64), primary_key=True),
    Column("order_id", String(128), nullable=False),
    Column("user_id", String(128), nullable=False),
    Column("amount_cents", BigInteger, nullable=False),
    UniqueConstraint("order_id", name="coupons_order_id_key"),
)

#: Next offset to consume per source partition, written in the same transaction as rows.
sink_offsets = Table(
    "sink_offsets",
    metadata,
    Column("topic", String(249), primary_key=True),
    Column("partition", Integer, primary_key=True),
    Column("next_offset", BigInteger, nullable=False),
)

#: Records the sink refused (a stale or replayed change, a second coupon, bad JSON).
sink_refusals = Table(
    "sink_refusals",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("topic", String(249), nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("key", String(128), nullable=True),
    Column("reason", Text, nullable=False),
)

# An advisory lock id for schema creation (two processes starting at once would both try
# CREATE TABLE and one would fail on PostgreSQL's catalog unique index).
_SCHEMA_LOCK = 0x5049_0001


def normalize_url(db: str) -> str:
    """A SQLAlchemy URL from ``--db``: a URL, a ``postgresql://`` URL, or a file path."""
    if db.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + db.split("://", 1)[1]
    if "://" in db:
        return db
    return f"sqlite:///{Path(db).expanduser().resolve()}"


def engine_for(db: str, *, echo: bool = False) -> Engine:
    url = normalize_url(db)
    if url.startswith("sqlite"):
        memory = url in ("sqlite://", "sqlite:///:memory:")
        engine = create_engine(
            url,
            echo=echo,
            # A waiting writer waits (seconds) instead of failing at once.
            connect_args={"timeout": 30, "check_same_thread": False},
            # One shared connection for an in-memory database, or each connection
            # would see a database of its own.
            poolclass=StaticPool if memory else None,
        )
        _sqlite_transactions(engine, wal=not memory)
        return engine
    # No pre-ping (a round trip per transaction): after a database restart the first use
    # of a dead pooled connection fails as a disconnect, SQLAlchemy then drops the whole
    # pool, and every caller here retries transient errors.
    return create_engine(url, echo=echo, pool_size=2, max_overflow=4)


def _sqlite_transactions(engine: Engine, *, wal: bool) -> None:
    # pysqlite's own transaction handling begins lazily and deferred; take control of it
    # (SQLAlchemy's documented recipe) so every transaction starts with the write lock.
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        if wal:
            cur.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a process crash (kill -9) loses no committed transaction;
        # only power loss may drop the last ones, and then rows and offsets go together.
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def create_schema(engine: Engine) -> None:
    """Create the tables that are missing (idempotent, safe when processes race)."""
    with engine.begin() as conn:
        if is_postgres(engine):
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK})
        metadata.create_all(conn, checkfirst=True)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


#: errors worth retrying: the server went away, restarted, or a lock wait timed out
TRANSIENT = (exc.OperationalError, exc.InterfaceError, exc.DisconnectionError)


def is_transient(error: BaseException) -> bool:
    if isinstance(error, exc.DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, TRANSIENT)


class Backoff:
    """Exponential backoff with jitter, reset on success."""

    def __init__(self, first: float = 0.1, cap: float = 5.0) -> None:
        self.first = first
        self.cap = cap
        self.delay = first
        self.failures = 0

    def next(self) -> float:
        self.failures += 1
        delay = self.delay
        self.delay = min(self.cap, self.delay * 2)
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.delay = self.first
        self.failures = 0


async def retry_db(
    fn: Callable[[], T], what: str, *, backoff: Backoff | None = None, attempts: int = 0
) -> T:
    """Run the blocking ``fn`` in a thread; retry transient database errors with backoff.

    ``attempts`` 0 means forever: a relay or sink waits out a database restart.
    """
    b = backoff or Backoff()
    n = 0
    while True:
        try:
            result = await asyncio.to_thread(fn)
            b.reset()
            return result
        except Exception as error:
            n += 1
            if not is_transient(error) or (attempts and n >= attempts):
                raise
            delay = b.next()
            log.warning(
                "%s: database unavailable (%s); retry %d in %.1f s",
                what,
                str(error).splitlines()[0][:200],
                n,
                delay,
            )
            await asyncio.sleep(delay)
