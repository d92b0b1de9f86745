"""pipeline.domain.dedup.decide_record (validation and dedup in one step) and
pipeline.domain.codecs.dlq_value."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from pipeline.domain.codecs import dlq_value
from pipeline.domain.dedup import DeadLetter, Drop, Forward, decide_record, encode_seen

WINDOW = 10_000
WHERE = ("orders.raw", 3, 12345)
GOOD = orjson.dumps({"event_id": "o-1-e0", "type": "OrderShipped", "order_id": "o-1", "ts_ms": 1})


def table(**seen: int) -> Callable[[bytes], bytes | None]:
    rows = {k.encode(): encode_seen(v) for k, v in seen.items()}
    asked: list[bytes] = []

    def lookup(key: bytes) -> bytes | None:
        asked.append(key)
        return rows.get(key)

    lookup.asked = asked  # type: ignore[attr-defined]
    return lookup


def no_lookup(key: bytes) -> bytes | None:
    raise AssertionError(f"a bad record must not touch the dedup state (asked {key!r})")


def dead_letter_doc(action: object) -> dict[str, Any]:
    assert isinstance(action, DeadLetter), f"expected DeadLetter, got {action!r}"
    doc = orjson.loads(action.value)
    assert isinstance(doc, dict)
    return doc


# --------------------------------------------------------------------------- decide_record


def test_new_id_is_forwarded_with_record_time() -> None:
    lookup = table()
    action = decide_record(GOOD, b"o-1", 5_000, WHERE, lookup, WINDOW)
    assert action == Forward(event_id=b"o-1-e0", first_ms=5_000, order_key=b"o-1")
    assert lookup.asked == [b"o-1-e0"]  # type: ignore[attr-defined]


def test_forward_uses_record_timestamp_not_event_ts() -> None:
    action = decide_record(GOOD, None, 777, WHERE, table(), WINDOW)
    # Without a key the output is still keyed by the order_id.
    assert action == Forward(event_id=b"o-1-e0", first_ms=777, order_key=b"o-1")


def test_event_id_bytes_are_utf8() -> None:
    raw = orjson.dumps({"event_id": "é-1", "type": "OrderShipped", "order_id": "o", "ts_ms": 1})
    assert decide_record(raw, b"o", 1, WHERE, table(), WINDOW) == Forward("é-1".encode(), 1, b"o")


@pytest.mark.parametrize("record_ms", [5_000, 5_001, 5_000 + WINDOW - 1, 4_000])
def test_seen_id_inside_window_is_dropped(record_ms: int) -> None:
    action = decide_record(GOOD, b"o-1", record_ms, WHERE, table(**{"o-1-e0": 5_000}), WINDOW)
    assert action == Drop()


@pytest.mark.parametrize("record_ms", [5_000 + WINDOW, 5_000 + 10 * WINDOW])
def test_seen_id_after_window_is_forwarded_again(record_ms: int) -> None:
    action = decide_record(GOOD, b"o-1", record_ms, WHERE, table(**{"o-1-e0": 5_000}), WINDOW)
    assert action == Forward(event_id=b"o-1-e0", first_ms=record_ms, order_key=b"o-1")


def test_other_ids_state_does_not_matter() -> None:
    action = decide_record(GOOD, b"o-1", 5_000, WHERE, table(**{"o-1-e1": 5_000}), WINDOW)
    assert action == Forward(b"o-1-e0", 5_000, b"o-1")


def test_bad_utf8_record_goes_to_dead_letter_as_text() -> None:
    raw = b"{this is not json"
    doc = dead_letter_doc(decide_record(raw, b"o-1", 1, WHERE, no_lookup, WINDOW))
    assert set(doc) == {"reason", "topic", "partition", "offset", "raw"}
    assert doc["reason"].startswith("not JSON")
    assert (doc["topic"], doc["partition"], doc["offset"]) == WHERE
    assert doc["raw"] == raw.decode()


def test_bad_binary_record_goes_to_dead_letter_as_base64() -> None:
    raw = b"\xff\xfe\x00binary\x80"
    doc = dead_letter_doc(decide_record(raw, b"o-1", 1, WHERE, no_lookup, WINDOW))
    assert set(doc) == {"reason", "topic", "partition", "offset", "raw_b64"}
    assert base64.b64decode(doc["raw_b64"], validate=True) == raw
    assert (doc["topic"], doc["partition"], doc["offset"]) == WHERE


def test_key_mismatch_goes_to_dead_letter_with_reason() -> None:
    doc = dead_letter_doc(decide_record(GOOD, b"someone-else", 1, WHERE, no_lookup, WINDOW))
    assert doc["reason"] == "key 'someone-else' does not equal order_id 'o-1'"
    assert doc["raw"] == GOOD.decode()


def test_tombstone_goes_to_dead_letter_with_null_raw() -> None:
    doc = dead_letter_doc(decide_record(None, b"o-1", 1, WHERE, no_lookup, WINDOW))
    assert doc == {
        "reason": "value is null (tombstone)",
        "topic": "orders.raw",
        "partition": 3,
        "offset": 12345,
        "raw": None,
    }


def test_unhashable_type_goes_to_dead_letter() -> None:
    raw = b'{"event_id": "a", "order_id": "b", "type": ["OrderShipped"], "ts_ms": 1}'
    doc = dead_letter_doc(decide_record(raw, b"b", 1, WHERE, no_lookup, WINDOW))
    assert doc["reason"].startswith("unknown type")


@hsettings(max_examples=200)
@given(
    raw=st.binary(max_size=64),
    partition=st.integers(0, 1023),
    offset=st.integers(0, 2**63 - 1),
)
def test_any_bad_bytes_dead_letter_preserves_the_record(
    raw: bytes, partition: int, offset: int
) -> None:
    action = decide_record(raw, None, 1, ("t", partition, offset), table(), WINDOW)
    if not isinstance(action, DeadLetter):
        return  # arbitrary bytes that happen to be a valid event
    doc = orjson.loads(action.value)
    assert (doc["topic"], doc["partition"], doc["offset"]) == ("t", partition, offset)
    assert isinstance(doc["reason"], str) and doc["reason"]
    if "raw" in doc:
        assert "raw_b64" not in doc
        assert doc["raw"].encode("utf-8") == raw
    else:
        assert base64.b64decode(doc["raw_b64"], validate=True) == raw


# --------------------------------------------------------------------------- dlq_value


def test_dlq_value_text() -> None:
    doc = orjson.loads(dlq_value("why", "orders.raw", 0, 7, b'{"a": "\xc3\xa9"}'))
    assert doc == {
        "reason": "why",
        "topic": "orders.raw",
        "partition": 0,
        "offset": 7,
        "raw": '{"a": "é"}',
    }


def test_dlq_value_binary() -> None:
    raw = bytes(range(256))
    doc = orjson.loads(dlq_value("why", "orders.raw", 1, 2, raw))
    assert "raw" not in doc
    assert doc["raw_b64"] == base64.b64encode(raw).decode("ascii")
    assert base64.b64decode(doc["raw_b64"]) == raw


def test_dlq_value_null() -> None:
    doc = orjson.loads(dlq_value("why", "t", 1, 2, None))
    assert doc == {"reason": "why", "topic": "t", "partition": 1, "offset": 2, "raw": None}


def test_dlq_value_empty_bytes_is_empty_text() -> None:
    assert orjson.loads(dlq_value("why", "t", 1, 2, b""))["raw"] == ""


def test_dlq_value_encoded_surrogate_is_not_text() -> None:
    # CESU-style surrogate bytes are not valid UTF-8 and must not be passed off as text.
    raw = b"\xed\xa0\x80"
    doc = orjson.loads(dlq_value("why", "t", 1, 2, raw))
    assert base64.b64decode(doc["raw_b64"]) == raw


@hsettings(max_examples=200)
@given(
    reason=st.text(max_size=50),
    topic=st.text(min_size=1, max_size=20),
    partition=st.integers(0, 2**31 - 1),
    offset=st.integers(0, 2**63 - 1),
    raw=st.none() | st.binary(max_size=64) | st.text(max_size=32).map(str.encode),
)
def test_dlq_value_round_trip(
    reason: str, topic: str, partition: int, offset: int, raw: bytes | None
) -> None:
    doc = orjson.loads(dlq_value(reason, topic, partition, offset, raw))
    assert (doc["reason"], doc["topic"], doc["partition"], doc["offset"]) == (
        reason,
        topic,
        partition,
        offset,
    )
    if raw is None:
        assert doc["raw"] is None and "raw_b64" not in doc
    elif "raw" in doc:
        assert "raw_b64" not in doc
        assert doc["raw"].encode("utf-8") == raw
    else:
        assert base64.b64decode(doc["raw_b64"], validate=True) == raw
        with pytest.raises(UnicodeDecodeError):
            raw.decode("utf-8")
