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
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    TypeDecorator,
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


class WideCents(TypeDecorator[int]):
    """Cents that may reach 2^64: NUMERIC(20) on PostgreSQL, read back as ``int``.

    A sum of payments each below 2^63 (an order's ``paid_cents``) can pass a signed
    64-bit column. SQLite has no exact integer wider than 64 bits, so there it stays an
    INTEGER and a larger value is refused by the driver (OverflowError).
    """

    impl = BigInteger
    cache_ok = True

    def load_dialect_impl(self, dialect: Any) -> Any:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(Numeric(20, 0, asdecimal=True))
        return dialect.type_descriptor(BigInteger())

    def process_result_value(self, value: Any, dialect: Any) -> int | None:
        return None if value is None else int(value)


#: The transactional outbox. ``id`` is the commit order per key (see
#: :func:`pipeline.edges.outbox.add`); ``bucket`` is a hash of the key, the unit a relay owns.
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
    #: below 2^64: partial payments, each < 2^63, until the sum reaches the amount (< 2^63)
    Column("paid_cents", WideCents, nullable=False),
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


def unfit(column: Column[Any], value: object) -> str | None:
    """Why ``value`` cannot be stored in ``column`` on every supported database, or
    ``None``. Pure: the same verdict on SQLite (which enforces neither a length nor NUL)
    as on PostgreSQL, so a table holds the same rows on either.

    Strings: no NUL (PostgreSQL text cannot hold one), at most the column's length,
    encodable as UTF-8 (no lone surrogate).
    Integers: the column's signed width (SQLite's INTEGER is 64 bits as well).
    """
    kind = column.type
    if isinstance(value, str):
        if "\x00" in value:
            return f"{column.name} has a NUL character, which PostgreSQL text cannot hold"
        length = getattr(kind, "length", None)
        if length is not None and len(value) > length:
            return f"{column.name} has {len(value)} characters, over the column's {length}"
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                return f"{column.name} is not valid Unicode (a lone surrogate)"
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        bits = 64 if isinstance(kind, BigInteger) else 32 if isinstance(kind, Integer) else 0
        if bits and not -(2 ** (bits - 1)) <= value < 2 ** (bits - 1):
            # str() of a huge int is slow (and refused past 4300 digits): name its size.
            shown = str(value) if value.bit_length() <= 128 else f"a {value.bit_length()}-bit int"
            return f"{column.name} {shown} does not fit a signed {bits}-bit column"
    return None


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


ErrorKind = Literal["transient", "content", "other"]

# PostgreSQL SQLSTATE classes (psycopg 3 sets ``sqlstate`` on every server error):
# 08 connection exception, 40 transaction rollback (serialization failure, deadlock),
# 53 insufficient resources, 57 operator intervention (admin or crash shutdown, cannot
# connect now, statement timeout), 58 system error. Retrying may succeed.
_PG_TRANSIENT_CLASSES = frozenset({"08", "40", "53", "57", "58"})
# 55P03 lock not available (lock_timeout), 55006 object in use, 25P03 idle in
# transaction timeout (the session is gone).
_PG_TRANSIENT_STATES = frozenset({"55P03", "55006", "25P03"})
# 22 data exception (value too long, numeric out of range, invalid byte sequence,
# untranslatable character), 23 integrity constraint violation, 54 program limit
# exceeded (an index row too large): the statement's values, not the server.
_PG_CONTENT_CLASSES = frozenset({"22", "23", "54"})
# SQLite primary result codes.
_SQLITE_TRANSIENT = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_INTERRUPT,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_PROTOCOL,
    }
)
_SQLITE_CONTENT = frozenset(
    {sqlite3.SQLITE_TOOBIG, sqlite3.SQLITE_CONSTRAINT, sqlite3.SQLITE_MISMATCH}
)


def error_kind(error: BaseException) -> ErrorKind:
    """What a database error says about retrying the statement that raised it.

    ``transient``: the server or the connection (gone, restarting, a lock or a
    serialization conflict); the same statement may succeed later. ``content``: the
    statement's values (too long, out of range, a NUL in text, a constraint); it fails
    the same way every time. ``other``: neither (a missing table, bad credentials, a
    bug); retrying would not help and refusing the data would be wrong.
    """
    if isinstance(error, exc.DBAPIError) and error.connection_invalidated:
        return "transient"
    if isinstance(error, exc.DisconnectionError | exc.TimeoutError):
        return "transient"  # the pool's own: a dropped connection, no free connection
    orig: BaseException = error
    if isinstance(error, exc.StatementError) and isinstance(error.orig, BaseException):
        orig = error.orig
    # Raised by the drivers while binding, before the statement reaches the database:
    # sqlite3 cannot hold an int outside 64 bits, no driver encodes a lone surrogate.
    if isinstance(orig, OverflowError | UnicodeError):
        return "content"
    if isinstance(orig, sqlite3.Error):
        code = getattr(orig, "sqlite_errorcode", None)
        if code is not None:
            primary = code & 0xFF
            if primary in _SQLITE_TRANSIENT:
                return "transient"
            if primary in _SQLITE_CONTENT:
                return "content"
            return "other"
        if isinstance(orig, sqlite3.DataError | sqlite3.IntegrityError):
            return "content"
        return "other"
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return "other"
    if isinstance(orig, psycopg.Error):
        state = orig.sqlstate
        if state is None:
            # Raised by psycopg itself: a lost or refused connection, or a value it
            # cannot send (PostgreSQL text cannot hold NUL).
            if isinstance(orig, psycopg.OperationalError | psycopg.InterfaceError):
                return "transient"
            if isinstance(orig, psycopg.DataError):
                return "content"
            return "other"
        if state[:2] in _PG_TRANSIENT_CLASSES or state in _PG_TRANSIENT_STATES:
            return "transient"
        if state[:2] in _PG_CONTENT_CLASSES:
            return "content"
        return "other"
    return "other"


def is_transient(error: BaseException) -> bool:
    """Worth retrying: the database went away, restarted, or a lock or serialization
    conflict failed the transaction."""
    return error_kind(error) == "transient"


def is_content_error(error: BaseException) -> bool:
    """The statement's values are refused; the same values fail every time."""
    return error_kind(error) == "content"


def describe_error(error: BaseException, limit: int = 300) -> str:
    """One bounded, printable line naming a database error (for a stored reason).

    A driver message may quote a value (a duplicate key's DETAIL, a trigger's text):
    only its first line is kept, cut to ``limit``, with control characters escaped.
    """
    orig = error.orig if isinstance(error, exc.StatementError) and error.orig else error
    state = getattr(orig, "sqlstate", None) or getattr(orig, "sqlite_errorname", None)
    lines = str(orig).splitlines()
    text_ = lines[0] if lines else ""
    text_ = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text_[:limit])[:limit]
    name = type(orig).__name__
    return f"{name} [{state}]: {text_}" if state else f"{name}: {text_}"


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
