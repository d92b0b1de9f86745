"""The outbox library, the relay's pure decisions and its SQLite claims; the example
writer's lifecycles. SQLite files, no Kafka."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    CorruptRecordException,
    InvalidTimestampError,
    InvalidTopicError,
    KafkaConnectionError,
    KafkaError,
    KafkaStorageError,
    KafkaTimeoutError,
    LeaderNotAvailableError,
    MessageSizeTooLargeError,
    NodeNotReadyError,
    NotEnoughReplicasError,
    NotLeaderForPartitionError,
    OutOfOrderSequenceNumber,
    PolicyViolationError,
    ProducerFenced,
    RecordListTooLargeError,
    RecordTooLargeError,
    RequestTimedOutError,
    TopicAuthorizationFailedError,
    UnknownError,
    UnknownTopicOrPartitionError,
)
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Connection, Engine, func, insert, select, update

from pipeline.domain.models import OrderEvent, parse_event
from pipeline.domain.orders import Order, Rejected, transition
from pipeline.edges import db, outbox
from pipeline.edges.outbox import BUCKETS, Claims, Row, bucket_of, invalid_reason, published_prefix
from pipeline.settings import Settings
from pipeline.tools import shop

RAW = "orders.raw"
#: zlib.crc32 of b"o0".."o3" modulo 64, computed once
BUCKETS_OF_O0_TO_O3 = [59, 45, 23, 1]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = db.engine_for(str(tmp_path / "app.db"))
    db.create_schema(e)
    yield e
    e.dispose()


def event(order: str, n: int, kind: str = "OrderShipped") -> bytes:
    return orjson.dumps({"event_id": f"{order}-e{n}", "type": kind, "order_id": order, "ts_ms": 1})


def add(conn: object, order: str, n: int) -> None:
    outbox.add(
        conn,  # type: ignore[arg-type]
        event_id=f"{order}-e{n}",
        topic=RAW,
        key=order.encode(),
        value=event(order, n),
        created_ms=1000 + n,
    )


def rows(engine: Engine) -> list[tuple[str, int | None, str | None]]:
    o = db.outbox
    with engine.connect() as conn:
        return [
            (r.event_id, r.published_ms, r.error) for r in conn.execute(select(o).order_by(o.c.id))
        ]


def test_business_row_and_event_commit_together(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            insert(db.shop_orders).values(
                order_id="a",
                user_id="u",
                amount_cents=5,
                paid_cents=0,
                status="CREATED",
                version=1,
                updated_ms=1,
            )
        )
        add(conn, "a", 0)
    assert [r[0] for r in rows(engine)] == ["a-e0"]


def test_rollback_drops_both(engine: Engine) -> None:
    with pytest.raises(RuntimeError), engine.begin() as conn:
        conn.execute(
            insert(db.shop_orders).values(
                order_id="b",
                user_id="u",
                amount_cents=5,
                paid_cents=0,
                status="CREATED",
                version=1,
                updated_ms=1,
            )
        )
        add(conn, "b", 0)
        raise RuntimeError("the application fails before commit")
    assert rows(engine) == []
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(db.shop_orders)).scalar_one() == 0


def test_event_id_is_unique(engine: Engine) -> None:
    from sqlalchemy.exc import IntegrityError

    with engine.begin() as conn:
        add(conn, "a", 0)
    with pytest.raises(IntegrityError), engine.begin() as conn:
        add(conn, "a", 0)


def test_bucket_is_stable_and_by_key() -> None:
    assert bucket_of(b"o1", "x") == bucket_of(b"o1", "y")
    assert 0 <= bucket_of(b"o1", "x") < BUCKETS
    assert bucket_of(None, "e1") == bucket_of(b"e1", "zzz")  # keyless: by event id
    # A fixed value: not Python's salted hash(), the same in every process.
    assert [bucket_of(f"o{i}".encode(), "") for i in range(4)] == BUCKETS_OF_O0_TO_O3


def _row(i: int, key: bytes | None, value: bytes, topic: str = RAW, event_id: str = "") -> Row:
    return Row(i, event_id or f"{(key or b'').decode()}-e{i}", topic, key, value, 0, 1)


def test_invalid_rows_are_named() -> None:
    good = Row(
        1,
        "a-e0",
        RAW,
        b"a",
        orjson.dumps({"event_id": "a-e0", "type": "OrderShipped", "order_id": "a", "ts_ms": 1}),
        0,
        1,
    )
    assert invalid_reason(good, RAW) is None
    assert "not a valid" in (invalid_reason(_row(2, b"a", b"{nope"), RAW) or "")
    other_key = Row(3, "b-e0", RAW, b"a", event("b", 0), 0, 1)
    assert "does not equal" in (invalid_reason(other_key, RAW) or "")
    wrong_id = Row(4, "zzz", RAW, b"a", event("a", 0), 0, 1)
    assert "event_id" in (invalid_reason(wrong_id, RAW) or "")
    # Other topics: only the size limit applies.
    assert invalid_reason(_row(5, b"a", b"anything", topic="audit"), RAW) is None
    big = _row(6, b"a", b"x" * (1024 * 1024 + 1), topic="audit")
    assert "1 MiB" in (invalid_reason(big, RAW) or "")


def test_published_prefix_stops_a_key_at_its_first_failure() -> None:
    rs = [_row(1, b"a", b""), _row(2, b"b", b""), _row(3, b"a", b""), _row(4, b"b", b"")]
    assert published_prefix(rs, [True, False, True, True]) == [1, 3]
    assert published_prefix(rs, [False, True, True, True]) == [2, 4]
    assert published_prefix(rs, [True] * 4) == [1, 2, 3, 4]


@given(st.lists(st.tuples(st.sampled_from([b"a", b"b", b"c"]), st.booleans()), max_size=40))
def test_published_prefix_marks_only_per_key_prefixes(items: list[tuple[bytes, bool]]) -> None:
    rs = [_row(i, k, b"") for i, (k, _) in enumerate(items)]
    marked = set(published_prefix(rs, [ok for _, ok in items]))
    by_key: dict[bytes, list[int]] = defaultdict(list)
    for r in rs:
        assert r.key is not None
        by_key[r.key].append(r.id)
    for ids in by_key.values():
        flags = [i in marked for i in ids]
        # marked rows of a key are a prefix of its rows, and each marked row was sent ok
        assert flags == sorted(flags, reverse=True)
    assert all(items[i][1] for i in marked)


def lease(engine: Engine) -> tuple[str, int]:
    with engine.connect() as conn:
        row = conn.execute(select(db.outbox_lease)).one()
    return row.owner, row.expires_ms


def test_sqlite_lease_one_relay_at_a_time(engine: Engine) -> None:
    # A lease far longer than any stall of a loaded machine: it only ends where the test
    # ends it, so no step below depends on how fast the one before it ran.
    a, b = Claims(engine, "a", lease_s=60), Claims(engine, "b", lease_s=60)
    before = db.now_ms()
    assert a.refresh() == set(range(BUCKETS))
    assert b.refresh() == set()
    first = lease(engine)
    assert first[0] == "a" and first[1] >= before + 60_000
    before = db.now_ms()
    assert a.refresh() == set(range(BUCKETS))  # renewal
    renewed = lease(engine)
    assert renewed[0] == "a" and renewed[1] >= before + 60_000
    # a stops renewing (crashed): b takes over once the lease has expired
    with engine.begin() as conn:
        conn.execute(update(db.outbox_lease).values(expires_ms=db.now_ms() - 1))
    before = db.now_ms()
    assert b.refresh() == set(range(BUCKETS))
    owner, expires = lease(engine)
    assert owner == "b" and expires >= before + 60_000
    assert a.refresh() == set()
    assert lease(engine) == (owner, expires)  # a's refresh neither took nor renewed it


def test_fetch_in_id_order_skips_published_and_failed(engine: Engine) -> None:
    with engine.begin() as conn:
        for n in range(5):
            add(conn, "a", n)
    c = Claims(engine, "r")
    owned = c.refresh()
    got = c.fetch(owned, 10)
    assert [r.event_id for r in got] == [f"a-e{n}" for n in range(5)]
    c.mark([got[0].id, got[2].id], {got[1].id: "bad value"})
    assert [r.event_id for r in c.fetch(owned, 10)] == ["a-e3", "a-e4"]
    assert [r.event_id for r in c.fetch(owned, 1)] == ["a-e3"]
    published = rows(engine)
    assert published[1][2] == "bad value" and published[1][1] is None
    assert published[0][1] is not None
    # a bucket not owned is not fetched
    assert c.fetch(owned - {bucket_of(b"a", "")}, 10) == []


def test_shop_lifecycles_are_legal_and_versions_count_steps() -> None:
    orders: dict[str, Order] = {}
    steps: dict[str, int] = defaultdict(int)
    seen = 0
    for step in shop.lifecycles(300, seed=3, prefix="x"):
        seen += 1
        ev = parse_event(orjson.dumps(shop.event_of(step, 5)), step.order_id.encode())
        assert isinstance(ev, OrderEvent), ev
        after, outputs = transition(orders.get(step.order_id), ev)
        assert not any(isinstance(o, Rejected) for o in outputs), (step, outputs)
        orders[step.order_id] = after
        steps[step.order_id] += 1
        assert after.status.value == step.status
    assert len(orders) == 300
    assert all(orders[o].version == n for o, n in steps.items())
    assert 2.0 < seen / 300 < 3.0
    # some of every ending
    assert {o.status.value for o in orders.values()} == {"CREATED", "PAID", "SHIPPED", "CANCELLED"}


def test_shop_writes_business_rows_and_events(engine: Engine) -> None:
    n = shop.write_orders(engine, 40, RAW, seed=2, prefix="w")
    with engine.connect() as conn:
        biz = {r.order_id: r for r in conn.execute(select(db.shop_orders))}
        evs = conn.execute(select(db.outbox).order_by(db.outbox.c.id)).all()
    assert len(biz) == 40 and len(evs) == n
    per_order: dict[str, int] = defaultdict(int)
    for r in evs:
        doc = orjson.loads(r.value)
        assert r.key == doc["order_id"].encode() and r.event_id == doc["event_id"]
        per_order[doc["order_id"]] += 1
    assert {o: b.version for o, b in biz.items()} == dict(per_order)
    # A retried step whose commit went through is not applied twice.
    first = next(iter(shop.lifecycles(40, seed=2, prefix="w")))
    shop.apply_step(engine, first, RAW, retry=True)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(db.outbox)).scalar_one() == n


# -- poison rows (issue 12, item 6): a fake producer, no broker ---------------------------


class FakeBroker:
    """What a broker kept, and the rules it refuses records by."""

    def __init__(self, record_limit: int = 1_000_000, request_limit: int = 2 * 1024 * 1024):
        self.record_limit = record_limit
        self.request_limit = request_limit
        #: records per batch (one topic has one partition here)
        self.batch_records = 3
        self.log: list[tuple[str, bytes | None, bytes]] = []
        #: per topic, errors to fail the next sends' futures with (a passing fault)
        self.faults: dict[str, list[BaseException]] = defaultdict(list)
        self.producers = 0


class FakeProducer:
    """aiokafka's producer as far as the relay uses it: ``send`` raises a record over
    max_request_size at once; the broker answers per batch (up to ``batch_records`` of
    one topic sent before the loop next runs), so one refused record fails its whole
    batch, and the idempotent sequence it broke fails the batches after it."""

    broker: FakeBroker

    def __init__(self, **_: object) -> None:
        self.pending: list[tuple[str, bytes | None, bytes, asyncio.Future[object]]] = []
        self.broken: set[str] = set()  # topics whose sequence a failed batch broke

    async def start(self) -> None:
        self.broker.producers += 1

    async def stop(self) -> None:
        return None

    async def send(
        self, topic: str, value: bytes, key: bytes | None = None, timestamp_ms: int = 0
    ) -> asyncio.Future[object]:
        size = len(value) + len(key or b"") + 70
        if size > self.broker.request_limit:
            raise MessageSizeTooLargeError(f"The message is {size} bytes when serialized")
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        if not self.pending:
            asyncio.get_running_loop().call_soon(self._answer)
        self.pending.append((topic, key, value, fut))
        return fut

    def _answer(self) -> None:
        batches: dict[str, list[tuple[bytes | None, bytes, asyncio.Future[object]]]] = defaultdict(
            list
        )
        for topic, key, value, fut in self.pending:
            batches[topic].append((key, value, fut))
        self.pending = []
        n = self.broker.batch_records
        for topic, records in batches.items():
            for i in range(0, len(records), n):
                self._answer_batch(topic, records[i : i + n])

    def _answer_batch(
        self, topic: str, batch: list[tuple[bytes | None, bytes, asyncio.Future[object]]]
    ) -> None:
        error: BaseException | None = None
        if self.broker.faults[topic]:
            error = self.broker.faults[topic].pop(0)
        elif topic in self.broken:
            error = OutOfOrderSequenceNumber()
        elif any(len(v) + len(k or b"") > self.broker.record_limit for k, v, _ in batch):
            error = MessageSizeTooLargeError()
            self.broken.add(topic)
        for key, value, fut in batch:
            if error is None:
                self.broker.log.append((topic, key, value))
                fut.set_result(None)
            else:
                fut.set_exception(error)


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> FakeBroker:
    b = FakeBroker()
    FakeProducer.broker = b
    monkeypatch.setattr(outbox, "AIOKafkaProducer", FakeProducer)
    return b


def relay_for(engine: Engine, *topics: str) -> outbox.Relay:
    relay = outbox.Relay(Settings(app_id="t"), str(engine.url.database))
    relay.known_topics = {RAW, *topics}

    # The topic check asks a real broker's admin API; here every topic the fake broker
    # is asked about exists. Without this, a topic dropped from ``known_topics`` after
    # UnknownTopicOrPartition was checked against whatever listened on 127.0.0.1:9092.
    async def check(names: list[str]) -> tuple[set[str], dict[str, str], str]:
        return set(names), {}, ""

    relay._check_topics = check  # type: ignore[method-assign]
    return relay


async def publish_round(relay: outbox.Relay, engine: Engine) -> BaseException | None:
    claims = Claims(engine, "r")
    rows_ = claims.fetch(claims.refresh(), 1000)
    try:
        await relay._publish(rows_, claims)
    except KafkaError as error:
        return error
    return None


def add_row(conn: Connection, event_id: str, topic: str, key: bytes | None, value: bytes) -> None:
    outbox.add(conn, event_id=event_id, topic=topic, key=key, value=value)


def outbox_state(engine: Engine) -> dict[str, tuple[bool, str | None]]:
    o = db.outbox
    with engine.connect() as conn:
        return {r.event_id: (r.published_ms is not None, r.error) for r in conn.execute(select(o))}


def keys_in_order(b: FakeBroker, topic: str) -> dict[bytes | None, list[bytes]]:
    seqs: dict[bytes | None, list[bytes]] = defaultdict(list)
    for t, k, v in b.log:
        if t == topic:
            seqs[k].append(v)
    return seqs


async def test_a_key_too_large_for_kafka_is_marked_and_the_rest_published(
    engine: Engine, broker: FakeBroker
) -> None:
    """aiokafka refuses a record over max_request_size in ``send`` itself: the relay let
    that raise out of the batch, after sending the rows before it, which were never
    marked, so every round published them again, forever."""
    with engine.begin() as conn:
        for n in range(3):
            add(conn, "a", n)
        add_row(conn, "big", "audit", b"k" * (2 * 1024 * 1024), b"{}")
        for n in range(3, 6):
            add(conn, "a", n)
        add(conn, "b", 0)
    relay = relay_for(engine, "audit")
    assert await publish_round(relay, engine) is None
    state = outbox_state(engine)
    assert state.pop("big")[1] is not None
    assert "MessageSizeTooLargeError" in (outbox_state(engine)["big"][1] or "")
    assert all(published and error is None for published, error in state.values()), state
    assert len(broker.log) == 7  # each once
    assert await publish_round(relay, engine) is None
    assert len(broker.log) == 7  # nothing again


async def test_a_batch_kafka_refuses_is_split_to_the_one_record(
    engine: Engine, broker: FakeBroker
) -> None:
    """The broker refuses a batch for one record in it (over message.max.bytes), and the
    failed batch breaks the idempotent producer's sequence for the records after it:
    each suspect is sent again alone; only the record refused alone is marked."""
    with engine.begin() as conn:
        for i in range(4):
            add_row(conn, f"s{i}", "audit", b"s", orjson.dumps(i))
        add_row(conn, "huge", "audit", b"h" * 1_500_000, b"{}")
        for i in range(4, 8):
            add_row(conn, f"s{i}", "audit", b"s", orjson.dumps(i))
        add(conn, "a", 0)
    relay = relay_for(engine, "audit")
    first = await publish_round(relay, engine)
    state = outbox_state(engine)
    assert "MessageSizeTooLargeError" in (state["huge"][1] or "")
    assert not state["huge"][0]
    assert all(state[f"s{i}"] == (True, None) for i in range(4)), state
    assert state["a-e0"] == (True, None)
    # The rows batched after the bad one's batch failed out of sequence: a passing error,
    # they stay pending for the next round, which sends them in order.
    assert isinstance(first, OutOfOrderSequenceNumber)
    assert [state[f"s{i}"] for i in range(4, 8)] == [(True, None)] + [(False, None)] * 3
    while await publish_round(relay, engine) is not None:
        pass
    state = outbox_state(engine)
    assert all(state[f"s{i}"] == (True, None) for i in range(8)), state
    assert keys_in_order(broker, "audit")[b"s"] == [orjson.dumps(i) for i in range(8)]
    assert broker.producers >= 2  # a new producer after the broken sequence


async def test_an_illegal_topic_name_is_marked_and_the_rest_published(
    engine: Engine, broker: FakeBroker
) -> None:
    """The relay asked the broker to create "bad topic!"; the broker refused, the relay
    waited for it to be listed and then raised, so every relay crash-looped."""
    with engine.begin() as conn:
        add(conn, "a", 0)
        add_row(conn, "bad", "bad topic!", b"a", b"{}")
        add(conn, "a", 1)
        add(conn, "b", 0)
    relay = relay_for(engine)
    assert await publish_round(relay, engine) is None
    state = outbox_state(engine)
    assert not state["bad"][0] and "not a legal Kafka topic name" in (state["bad"][1] or "")
    assert state["a-e0"] == state["a-e1"] == state["b-e0"] == (True, None)
    assert keys_in_order(broker, RAW)[b"a"] == [event("a", 0), event("a", 1)]


@pytest.mark.parametrize(
    "error",
    [
        KafkaTimeoutError(),
        RequestTimedOutError(),
        NotLeaderForPartitionError(),
        KafkaConnectionError("gone"),
        UnknownTopicOrPartitionError(),
    ],
)
async def test_a_passing_error_never_marks_a_row(
    engine: Engine, broker: FakeBroker, error: KafkaError
) -> None:
    with engine.begin() as conn:
        add(conn, "a", 0)
        add_row(conn, "x0", "audit", b"x", b"0")
        add(conn, "a", 1)
        add_row(conn, "x1", "audit", b"x", b"1")
    broker.faults["audit"].append(error)
    relay = relay_for(engine, "audit")
    assert await publish_round(relay, engine) is error
    state = outbox_state(engine)
    assert state["x0"] == state["x1"] == (False, None)  # pending, neither sent nor failed
    assert state["a-e0"] == state["a-e1"] == (True, None)
    assert await publish_round(relay, engine) is None
    assert all(v == (True, None) for v in outbox_state(engine).values())
    assert keys_in_order(broker, "audit")[b"x"] == [b"0", b"1"]


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (MessageSizeTooLargeError(), "permanent"),
        (RecordTooLargeError(), "permanent"),
        (RecordListTooLargeError(), "permanent"),
        (InvalidTopicError(), "permanent"),
        (TopicAuthorizationFailedError("t"), "permanent"),
        (InvalidTimestampError(), "permanent"),
        (CorruptRecordException(), "permanent"),
        (PolicyViolationError(), "permanent"),
        (KafkaTimeoutError(), "transient"),
        (RequestTimedOutError(), "transient"),
        (NotLeaderForPartitionError(), "transient"),
        (LeaderNotAvailableError(), "transient"),
        (KafkaConnectionError("x"), "transient"),
        (NodeNotReadyError(), "transient"),
        (NotEnoughReplicasError(), "transient"),
        (KafkaStorageError(), "transient"),
        (UnknownTopicOrPartitionError(), "transient"),
        (OutOfOrderSequenceNumber(), "transient"),
        (ProducerFenced(), "transient"),
        (ClusterAuthorizationFailedError(), "transient"),  # the relay's config, not a row
        (UnknownError(), "transient"),
        (RuntimeError("?"), "transient"),
    ],
)
def test_send_errors_are_classified(error: BaseException, kind: str) -> None:
    assert outbox.send_error_kind(error) == kind


def test_topic_names_and_verdicts() -> None:
    for bad in ["bad topic!", "", ".", "..", "a" * 250, "tab\there", "é"]:
        assert outbox.topic_name_error(bad), bad
    for good in [RAW, "a" * 249, "A-b_c.9", "..."]:
        assert outbox.topic_name_error(good) is None, good
    assert outbox.topic_verdict(0) == outbox.topic_verdict(36) == "ready"
    assert outbox.topic_verdict(3) == "missing"
    assert outbox.topic_verdict(17) == outbox.topic_verdict(29) == "refused"
    assert outbox.topic_verdict(44) == "refused"
    assert outbox.topic_verdict(5) == outbox.topic_verdict(38) == "unavailable"


class FakeAdmin:
    """A broker that answers: by default every topic missing, and creating one seems to
    work (but it never shows up)."""

    fail: BaseException | None = None
    listed: tuple[str, ...] = ()
    create_code = 0
    describe_code = 3
    partitions: tuple[dict[str, int], ...] = ()

    def __init__(self, **_: object) -> None:
        pass

    async def start(self) -> None:
        if FakeAdmin.fail is not None:
            raise FakeAdmin.fail

    async def close(self) -> None:
        return None

    async def list_topics(self) -> list[str]:
        return list(FakeAdmin.listed)

    async def describe_topics(self, topics: list[str]) -> list[dict[str, object]]:
        return [
            {"topic": t, "error_code": FakeAdmin.describe_code, "partitions": FakeAdmin.partitions}
            for t in topics
        ]

    async def create_topics(self, new: list[object]) -> object:
        class Created:
            def to_object(self) -> dict[str, object]:
                return {
                    "topic_errors": [
                        {"topic": n.name, "error_code": FakeAdmin.create_code}  # type: ignore[attr-defined]
                        for n in new
                    ]
                }

        return Created()


@pytest.fixture
def admin(monkeypatch: pytest.MonkeyPatch) -> type[FakeAdmin]:
    monkeypatch.setattr(outbox, "AIOKafkaAdminClient", FakeAdmin)
    monkeypatch.setattr(outbox.asyncio, "sleep", _no_sleep)
    for name, value in vars(FakeAdmin).copy().items():
        if name in ("fail", "listed", "create_code", "describe_code", "partitions"):
            monkeypatch.setattr(FakeAdmin, name, value)
    return FakeAdmin


@pytest.mark.parametrize(
    ("listed", "create_code", "describe_code", "verdict"),
    [
        ((), 0, 0, "ready"),  # created, then described with partitions
        (("t",), 0, 0, "ready"),  # there already
        ((), 36, 0, "ready"),  # created by someone else meanwhile
        ((), 17, 3, "refused"),  # invalid topic (a name the broker refuses)
        ((), 29, 3, "refused"),  # not authorized to create it
        ((), 44, 3, "refused"),  # a create policy refuses it
        ((), 38, 3, "waiting"),  # invalid replication factor: the relay's setting
        (("t",), 0, 5, "waiting"),  # listed, no leader yet: no clock
    ],
)
async def test_topic_check_verdicts(
    engine: Engine,
    admin: type[FakeAdmin],
    listed: tuple[str, ...],
    create_code: int,
    describe_code: int,
    verdict: str,
) -> None:
    admin.listed, admin.create_code, admin.describe_code = listed, create_code, describe_code
    admin.partitions = ({"partition": 0, "leader": 1},)
    relay = outbox.Relay(Settings(app_id="t"), str(engine.url.database))
    ready, refused, waiting = await relay._check_topics(["t"])
    got = "ready" if "t" in ready else "refused" if "t" in refused else "waiting"
    assert got == verdict, (ready, refused, waiting)
    assert bool(waiting) is (verdict == "waiting")
    if verdict == "refused":
        assert refused["t"].startswith("topic 't': refused by Kafka")
    assert ("t" in relay.missing_since) is (verdict == "waiting" and not listed)


async def test_a_missing_topic_is_refused_only_after_a_bounded_wait_with_a_broker_answering(
    engine: Engine, broker: FakeBroker, admin: type[FakeAdmin]
) -> None:
    with engine.begin() as conn:
        add_row(conn, "m0", "ghost", b"g", b"0")
        add(conn, "a", 0)
    relay = outbox.Relay(Settings(app_id="t"), str(engine.url.database), topic_wait_s=30)
    relay.known_topics = {RAW}
    # A broker that does not answer starts no clock, however long it lasts.
    admin.fail = KafkaConnectionError("no broker")
    assert await publish_round(relay, engine) is not None
    admin.fail = None
    assert relay.missing_since == {}
    assert outbox_state(engine)["m0"] == (False, None)
    # The broker answers "missing": the clock starts, the row waits...
    assert await publish_round(relay, engine) is not None
    assert outbox_state(engine)["m0"] == (False, None)
    assert "ghost" in relay.missing_since
    # ...and once the topic has stayed missing past the wait, its rows are refused.
    relay.missing_since["ghost"] -= 31
    assert await publish_round(relay, engine) is None
    state = outbox_state(engine)
    assert "ghost is missing" in (state["m0"][1] or "") and not state["m0"][0]
    assert state["a-e0"] == (True, None)


async def _no_sleep(_: float) -> None:
    return None
