"""pipeline.domain.models.parse_event: valid events parse, every bad input is a BadInput,
never raises."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from pipeline.domain.models import (
    MAX_AMOUNT,
    MAX_ID_CHARS,
    MAX_TS_MS,
    MAX_VALUE_BYTES,
    BadInput,
    EventType,
    OrderEvent,
    _control_error,
    parse_event,
)

BASE: dict[str, Any] = {"event_id": "e-1", "order_id": "o-1", "ts_ms": 1_700_000_000_000}

VALID: dict[str, dict[str, Any]] = {
    "OrderCreated": {**BASE, "type": "OrderCreated", "user_id": "u-7", "amount_cents": 1234},
    "PaymentReceived": {**BASE, "type": "PaymentReceived", "amount_cents": 1000},
    "OrderShipped": {**BASE, "type": "OrderShipped"},
    "OrderCancelled": {**BASE, "type": "OrderCancelled"},
}


def enc(doc: Any) -> bytes:
    return orjson.dumps(doc)


def with_(type_name: str, **changes: Any) -> bytes:
    doc = dict(VALID[type_name])
    for k, v in changes.items():
        if v is DELETE:
            doc.pop(k, None)
        else:
            doc[k] = v
    return enc(doc)


DELETE = object()


def bad_reason(raw: bytes | None, key: bytes | None = None) -> str:
    result = parse_event(raw, key)
    assert isinstance(result, BadInput), f"expected BadInput, got {result!r}"
    assert isinstance(result.reason, str) and result.reason
    return result.reason


# --------------------------------------------------------------------------- valid input


def test_order_created_parses_with_all_fields() -> None:
    ev = parse_event(enc(VALID["OrderCreated"]), b"o-1")
    assert ev == OrderEvent(
        event_id="e-1",
        type=EventType.ORDER_CREATED,
        order_id="o-1",
        ts_ms=1_700_000_000_000,
        user_id="u-7",
        amount_cents=1234,
    )


def test_payment_received_parses() -> None:
    ev = parse_event(enc(VALID["PaymentReceived"]), b"o-1")
    assert isinstance(ev, OrderEvent)
    assert ev.type is EventType.PAYMENT_RECEIVED
    assert ev.amount_cents == 1000
    assert ev.user_id is None
    assert (ev.event_id, ev.order_id, ev.ts_ms) == ("e-1", "o-1", 1_700_000_000_000)


@pytest.mark.parametrize(
    ("name", "etype"),
    [("OrderShipped", EventType.ORDER_SHIPPED), ("OrderCancelled", EventType.ORDER_CANCELLED)],
)
def test_events_without_amount_parse(name: str, etype: EventType) -> None:
    ev = parse_event(enc(VALID[name]), b"o-1")
    assert ev == OrderEvent(event_id="e-1", type=etype, order_id="o-1", ts_ms=1_700_000_000_000)
    assert ev.amount_cents is None and ev.user_id is None


def test_key_none_is_allowed() -> None:
    ev = parse_event(enc(VALID["OrderShipped"]), None)
    assert isinstance(ev, OrderEvent)
    assert ev.order_id == "o-1"


def test_boundaries_are_inclusive_where_documented() -> None:
    # amount 0 and 2^63 - 1, ids of exactly 1 and 128 characters, a value of exactly 1 MiB.
    assert parse_event(with_("PaymentReceived", amount_cents=0)).amount_cents == 0  # type: ignore[union-attr]
    top = parse_event(with_("PaymentReceived", amount_cents=MAX_AMOUNT - 1))
    assert isinstance(top, OrderEvent) and top.amount_cents == MAX_AMOUNT - 1
    long_id = "x" * MAX_ID_CHARS
    ev = parse_event(with_("OrderShipped", order_id=long_id, event_id="e"), long_id.encode())
    assert isinstance(ev, OrderEvent) and ev.order_id == long_id and ev.event_id == "e"
    doc = enc(VALID["OrderShipped"])
    padded = doc + b" " * (MAX_VALUE_BYTES - len(doc))
    assert len(padded) == MAX_VALUE_BYTES
    assert isinstance(parse_event(padded), OrderEvent)


def test_optional_fields_on_other_types_are_kept_when_valid() -> None:
    ev = parse_event(with_("OrderShipped", user_id="u-1", amount_cents=5))
    assert isinstance(ev, OrderEvent)
    assert (ev.user_id, ev.amount_cents) == ("u-1", 5)


# --------------------------------------------------------------------------- bad input


def test_none_value_is_a_tombstone() -> None:
    assert "null" in bad_reason(None)


def test_value_over_one_mib() -> None:
    doc = enc(VALID["OrderShipped"])
    raw = doc + b" " * (MAX_VALUE_BYTES + 1 - len(doc))
    assert len(raw) == MAX_VALUE_BYTES + 1
    reason = bad_reason(raw)
    assert "1 MiB" in reason and str(MAX_VALUE_BYTES + 1) in reason


@pytest.mark.parametrize("raw", [b"", b"{this is not json", b'{"a": 1', b"\xff\xfe", b"NaN"])
def test_not_json(raw: bytes) -> None:
    assert bad_reason(raw).startswith("not JSON")


@pytest.mark.parametrize(
    ("raw", "type_name"),
    [
        (b"[1, 2, 3]", "list"),
        (b'"a string"', "str"),
        (b"42", "int"),
        (b"4.5", "float"),
        (b"null", "NoneType"),
        (b"true", "bool"),
    ],
)
def test_not_an_object(raw: bytes, type_name: str) -> None:
    assert bad_reason(raw) == f"not a JSON object but {type_name}"


@pytest.mark.parametrize("field", ["event_id", "order_id"])
def test_missing_id(field: str) -> None:
    assert bad_reason(with_("OrderShipped", **{field: DELETE})) == f"missing '{field}'"


@pytest.mark.parametrize("field", ["event_id", "order_id"])
@pytest.mark.parametrize("value", [7, 1.5, True, ["a"], {"a": 1}])
def test_ill_typed_id(field: str, value: Any) -> None:
    assert (
        bad_reason(with_("OrderShipped", **{field: value})) == f"field '{field}' must be a string"
    )


@pytest.mark.parametrize("field", ["event_id", "order_id"])
@pytest.mark.parametrize("value", ["", "x" * (MAX_ID_CHARS + 1)])
def test_id_length(field: str, value: str) -> None:
    reason = bad_reason(with_("OrderShipped", **{field: value}))
    assert reason == f"field '{field}' must have 1 to {MAX_ID_CHARS} characters"


@pytest.mark.parametrize("value", ["OrderTeleported", "ordercreated", ""])
def test_unknown_type(value: Any) -> None:
    assert bad_reason(with_("OrderShipped", type=value)) == f"unknown type {value!r}"


@pytest.mark.parametrize(("value", "kind"), [(3, "number"), (None, "null"), (True, "boolean")])
def test_unknown_type_not_a_string_is_named_by_kind(value: Any, kind: str) -> None:
    assert bad_reason(with_("OrderShipped", type=value)) == f"unknown type <{kind}>"


def test_missing_type() -> None:
    assert bad_reason(with_("OrderShipped", type=DELETE)) == "unknown type <null>"


def test_a_reason_never_quotes_input_at_length() -> None:
    # A 900 kB type name and a 100 kB key: the reasons quote 40 characters and the size.
    long_type = bad_reason(with_("OrderShipped", type="T" * 900_000))
    assert long_type == f"unknown type {'T' * 40!r}... (900000 characters)"
    long_key = bad_reason(enc(VALID["OrderShipped"]), b"\x00" * 100_000)
    assert long_key == f"key {chr(0) * 40!r}... (100000 bytes) does not equal order_id 'o-1'"
    assert len(long_key) < 400


@pytest.mark.parametrize("value", [-1, MAX_TS_MS, MAX_TS_MS + 1, 2**64 - 1])
def test_ts_out_of_range(value: int) -> None:
    reason = bad_reason(with_("OrderShipped", ts_ms=value))
    assert reason == "field 'ts_ms' must be an integer with 0 <= n < 2^63"


def test_ts_at_the_limits_is_valid() -> None:
    for value in (0, MAX_TS_MS - 1):
        assert isinstance(parse_event(with_("OrderShipped", ts_ms=value)), OrderEvent)


@pytest.mark.parametrize("field", ["event_id", "order_id", "user_id"])
@pytest.mark.parametrize("char", ["\x00", "\x1f", "\x7f", "\n"])
def test_ids_without_control_characters(field: str, char: str) -> None:
    reason = bad_reason(with_("OrderCreated", **{field: f"a{char}b"}))
    assert reason == f"field '{field}' has a control character (U+{ord(char):04X} at 1)"


def test_user_id_with_a_control_character_on_other_types_too() -> None:
    reason = bad_reason(with_("OrderShipped", user_id="u\x01"))
    assert reason == "field 'user_id' has a control character (U+0001 at 1)"


def test_ids_may_hold_other_unicode() -> None:
    doc = {**VALID["OrderCreated"], "event_id": "é€\u0080\u00a0😀", "user_id": "ü"}
    assert isinstance(parse_event(enc(doc)), OrderEvent)


def test_missing_ts() -> None:
    assert bad_reason(with_("OrderShipped", ts_ms=DELETE)) == "missing 'ts_ms'"


@pytest.mark.parametrize("value", [1.0, 1.5, "1700000000000", True, False, [1]])
def test_ill_typed_ts(value: Any) -> None:
    assert bad_reason(with_("OrderShipped", ts_ms=value)) == "field 'ts_ms' must be an integer"


@pytest.mark.parametrize("value", [DELETE, None, ""])
def test_order_created_needs_user_id(value: Any) -> None:
    reason = bad_reason(with_("OrderCreated", user_id=value))
    assert "'user_id'" in reason


def test_user_id_ill_typed_on_other_type() -> None:
    assert bad_reason(with_("OrderShipped", user_id=5)) == "field 'user_id' must be a string"


@pytest.mark.parametrize("name", ["OrderCreated", "PaymentReceived"])
def test_amount_missing(name: str) -> None:
    assert bad_reason(with_(name, amount_cents=DELETE)) == f"missing 'amount_cents' on {name}"


AMOUNT_REASON = "field 'amount_cents' must be an integer with 0 <= n < 2^63"


@pytest.mark.parametrize("name", ["OrderCreated", "PaymentReceived", "OrderShipped"])
@pytest.mark.parametrize(
    "value", [-1, -5, MAX_AMOUNT, MAX_AMOUNT + 1, 2**64 - 1, True, False, 10.0, 10.5, "10"]
)
def test_amount_invalid(name: str, value: Any) -> None:
    assert bad_reason(with_(name, amount_cents=value)) == AMOUNT_REASON


@pytest.mark.parametrize("literal", [b"1180591620717411303424", b"-9223372036854775809", b"1e3"])
def test_amount_beyond_64_bits_or_exponent(literal: bytes) -> None:
    # orjson hands integers beyond 64 bits (and exponent literals) over as floats.
    raw = with_("PaymentReceived", amount_cents=DELETE)[:-1] + b',"amount_cents":' + literal + b"}"
    assert orjson.loads(raw)["amount_cents"] == float(literal)
    assert bad_reason(raw) == AMOUNT_REASON


def test_key_not_equal_to_order_id() -> None:
    reason = bad_reason(enc(VALID["OrderShipped"]), b"someone-else")
    assert reason == "key 'someone-else' does not equal order_id 'o-1'"


def test_key_not_utf8() -> None:
    assert bad_reason(enc(VALID["OrderShipped"]), b"\xff\xfe") == "key is not UTF-8"


def test_key_check_compares_text_not_bytes() -> None:
    doc = {**VALID["OrderShipped"], "order_id": "ördér-1"}
    assert isinstance(parse_event(enc(doc), "ördér-1".encode()), OrderEvent)
    assert isinstance(parse_event(enc(doc), "ördér-1".encode("latin-1")), BadInput)


@pytest.mark.parametrize("type_value", [[1], {}, {"a": 1}, []])
def test_unhashable_type_value_is_bad_input_not_a_crash(type_value: Any) -> None:
    raw = enc({"event_id": "a", "order_id": "b", "type": type_value, "ts_ms": 1})
    assert bad_reason(raw).startswith("unknown type")


# --------------------------------------------------------------------------- properties

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
FIELDS = ["event_id", "order_id", "type", "ts_ms", "user_id", "amount_cents"]
# Field names come mostly from the schema so the dicts get past the early checks.
field_names = st.sampled_from(FIELDS) | st.text(max_size=8)
field_values = (
    st.sampled_from(["o-1", "OrderCreated", "PaymentReceived", "OrderShipped"]) | json_values
)


def _mutate(base: dict[str, Any], overrides: dict[str, Any], drops: set[str]) -> dict[str, Any]:
    doc = {k: v for k, v in base.items() if k not in drops}
    doc.update(overrides)
    return doc


# Valid events with a few fields replaced or removed reach every check of parse_event;
# free-form dicts cover the rest.
mutated_events = st.builds(
    _mutate,
    st.sampled_from(list(VALID.values())),
    st.dictionaries(field_names, field_values, max_size=3),
    st.sets(st.sampled_from(FIELDS), max_size=2),
)
json_dicts = mutated_events | st.dictionaries(field_names, field_values, max_size=8)
keys = st.none() | st.just(b"o-1") | st.binary(max_size=8)


def _assert_total(raw: bytes | None, key: bytes | None) -> None:
    result = parse_event(raw, key)
    assert isinstance(result, OrderEvent | BadInput)
    if isinstance(result, BadInput):
        assert isinstance(result.reason, str) and result.reason


@hsettings(max_examples=300)
@given(raw=st.binary(max_size=200), key=keys)
def test_never_raises_on_arbitrary_bytes(raw: bytes, key: bytes | None) -> None:
    _assert_total(raw, key)


@hsettings(max_examples=300)
@given(doc=json_dicts.filter(lambda d: not isinstance(d.get("type"), list | dict)), key=keys)
def test_never_raises_on_json_dicts_with_scalar_type(
    doc: dict[str, Any], key: bytes | None
) -> None:
    _assert_total(enc(doc), key)


@hsettings(max_examples=300)
@example(doc={"event_id": "a", "order_id": "b", "type": []}, key=None)
@given(doc=json_dicts, key=keys)
def test_never_raises_on_json_dicts(doc: dict[str, Any], key: bytes | None) -> None:
    _assert_total(enc(doc), key)


# Any text but the control characters the contract rules out of ids.
ids = st.text(
    st.characters(
        blacklist_categories=("Cs",), blacklist_characters="".join(map(chr, [*range(0x20), 0x7F]))
    ),
    min_size=1,
    max_size=MAX_ID_CHARS,
)
amounts = st.integers(min_value=0, max_value=MAX_AMOUNT - 1)


@st.composite
def order_events(draw: st.DrawFn) -> OrderEvent:
    etype = draw(st.sampled_from(list(EventType)))
    needs_amount = etype in (EventType.ORDER_CREATED, EventType.PAYMENT_RECEIVED)
    return OrderEvent(
        event_id=draw(ids),
        type=etype,
        order_id=draw(ids),
        ts_ms=draw(st.integers(min_value=0, max_value=MAX_TS_MS - 1)),
        user_id=draw(ids) if etype is EventType.ORDER_CREATED else draw(st.none() | ids),
        amount_cents=draw(amounts) if needs_amount else draw(st.none() | amounts),
    )


@hsettings(max_examples=300)
@given(ev=order_events(), keyed=st.booleans())
def test_encode_round_trip(ev: OrderEvent, keyed: bool) -> None:
    key = ev.order_id.encode() if keyed else None
    assert parse_event(ev.encode(), key) == ev


@given(st.text(max_size=40))
@example("\u00a0\u2028\u200b\U000e0001")  # unprintable, but not control characters
@example("ok\x7f")
def test_the_control_character_check_is_exact_for_any_text(text: str) -> None:
    """The printable fast path must neither let a control character through nor flag
    text without one, unprintable characters the contract allows included."""
    has_control = any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)
    assert (_control_error("id", text) is not None) == has_control
