"""Which database errors are retried, which refuse a record, which end the process:
psycopg 3 errors by SQLSTATE, real sqlite3 errors by result code, as SQLAlchemy 2 wraps
them. No server needed (psycopg errors are built from their SQLSTATE classes)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psycopg
import pytest
from psycopg import errors as pg
from sqlalchemy import create_engine, exc, insert, text

from pipeline.edges import db


def wrapped(orig: BaseException) -> BaseException:
    """As SQLAlchemy raises a DBAPI error: its DataError, OperationalError, ..."""
    return exc.DBAPIError.instance("SELECT 1", {}, orig, psycopg.Error)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("sqlstate", "kind"),
    [
        ("40001", "transient"),  # serialization failure
        ("40P01", "transient"),  # deadlock detected
        ("55P03", "transient"),  # lock not available (lock_timeout)
        ("57P01", "transient"),  # admin shutdown: the server restarts
        ("57P03", "transient"),  # cannot connect now: starting up
        ("57014", "transient"),  # query canceled (statement_timeout)
        ("08006", "transient"),  # connection failure
        ("53300", "transient"),  # too many connections
        ("25P03", "transient"),  # idle in transaction timeout: session ended
        ("22001", "content"),  # value too long for varchar(n)
        ("22003", "content"),  # numeric value out of range (bigint)
        ("22021", "content"),  # invalid byte sequence for encoding
        ("22P05", "content"),  # untranslatable character
        ("23505", "content"),  # unique violation
        ("23514", "content"),  # check violation
        ("54000", "content"),  # program limit exceeded: index row too large
        ("42P01", "other"),  # undefined table
        ("42501", "other"),  # insufficient privilege
        ("28P01", "other"),  # invalid password
        ("XX000", "other"),  # internal error
    ],
)
def test_postgres_errors_by_sqlstate(sqlstate: str, kind: str) -> None:
    orig = pg.lookup(sqlstate)("message")
    assert orig.sqlstate == sqlstate
    assert db.error_kind(wrapped(orig)) == kind
    assert db.is_transient(wrapped(orig)) is (kind == "transient")
    assert db.is_content_error(wrapped(orig)) is (kind == "content")


def test_psycopg_client_side_errors() -> None:
    # Connection refused or lost: raised by psycopg itself, without a SQLSTATE.
    assert db.error_kind(wrapped(psycopg.OperationalError("connection refused"))) == "transient"
    assert db.error_kind(wrapped(psycopg.InterfaceError("the connection is closed"))) == (
        "transient"
    )
    nul = psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes")
    assert db.error_kind(wrapped(nul)) == "content"
    assert db.error_kind(wrapped(psycopg.ProgrammingError("bad query"))) == "other"


def test_an_invalidated_connection_is_transient_whatever_the_error() -> None:
    error = exc.DBAPIError.instance(
        "SELECT 1",
        {},
        pg.lookup("42P01")("x"),
        psycopg.Error,
        connection_invalidated=True,  # type: ignore[arg-type]
    )
    assert db.error_kind(error) == "transient"
    assert db.error_kind(exc.DisconnectionError("gone")) == "transient"
    assert db.error_kind(exc.TimeoutError("QueuePool limit reached")) == "transient"


def test_driver_binding_errors_are_content() -> None:
    assert db.error_kind(OverflowError("Python int too large to convert to SQLite INTEGER")) == (
        "content"
    )
    unencodable = UnicodeEncodeError("utf-8", "s\ud800", 1, 2, "surrogates not allowed")
    assert db.error_kind(unencodable) == "content"
    assert db.error_kind(RuntimeError("a bug")) == "other"
    assert db.error_kind(ValueError("a bug")) == "other"


def test_real_sqlite_errors(tmp_path: Path) -> None:
    path = tmp_path / "e.db"
    engine = db.engine_for(str(path))
    db.create_schema(engine)
    row = {"order_id": "a", "status": "CREATED", "version": 1, "updated_ms": 1, "event_id": "e"}
    with engine.begin() as conn:
        conn.execute(insert(db.sink_orders).values(**row))
    # a constraint: content
    with pytest.raises(exc.IntegrityError) as unique, engine.begin() as conn:
        conn.execute(insert(db.sink_orders).values(**row))
    assert db.error_kind(unique.value) == "content"
    # an int sqlite3 cannot bind: content (sqlite3 raises OverflowError, unwrapped)
    with pytest.raises(OverflowError) as big, engine.begin() as conn:
        conn.execute(insert(db.sink_orders).values(**{**row, "order_id": "b", "updated_ms": 2**63}))
    assert db.error_kind(big.value) == "content"
    # a missing table: neither
    with pytest.raises(exc.OperationalError) as missing, engine.begin() as conn:
        conn.execute(text("SELECT * FROM no_such_table"))
    assert db.error_kind(missing.value) == "other"
    # the writer lock held by another connection: transient ("database is locked")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        impatient = create_engine(db.normalize_url(str(path)), connect_args={"timeout": 0})
        with pytest.raises(exc.OperationalError) as locked, impatient.begin() as conn:
            conn.execute(text("INSERT INTO outbox_lease VALUES ('x', 'y', 1)"))
        assert "locked" in str(locked.value)
        assert db.error_kind(locked.value) == "transient"
        impatient.dispose()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    engine.dispose()


def test_described_errors_are_one_bounded_printable_line() -> None:
    orig = pg.lookup("23505")(
        'duplicate key value violates unique constraint "orders_pkey"\n'
        "DETAIL:  Key (order_id)=(" + "x\x01" * 1000 + ") already exists."
    )
    line = db.describe_error(wrapped(orig))
    assert line.startswith("UniqueViolation [23505]: duplicate key value")
    assert "\n" not in line and len(line) <= 400
    long_first = pg.lookup("22001")("v" * 5000 + "\x00")
    assert len(db.describe_error(wrapped(long_first))) <= 400
    assert db.describe_error(OverflowError("too big")) == "OverflowError: too big"
