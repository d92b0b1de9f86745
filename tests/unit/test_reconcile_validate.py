"""``reconcile``'s own reading of the input rules (:func:`pipeline.tools.reconcile.validate`):
every rule of the contract, and agreement with the workers' validator on random input.

The cross-check imports ``pipeline.domain.models.parse_event`` here, in the test only: the
checker itself must not share it.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.domain.models import MAX_VALUE_BYTES, OrderEvent, parse_event
from pipeline.tools.reconcile import Event, validate

OK: dict[str, Any] = {
    "event_id": "e-1",
    "type": "OrderCreated",
    "order_id": "o-1",
    "user_id": "u-1",
    "amount_cents": 100,
    "ts_ms": 1_700_000_000_000,
}


def _encode(d: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(d)
    except TypeError:  # integers beyond 64 bits: write the JSON by hand
        return json.dumps(d).encode()


def doc(**changes: Any) -> bytes:
    d = dict(OK)
    for k, v in changes.items():
        if v is DROP:
            d.pop(k, None)
        else:
            d[k] = v
    return _encode(d)


DROP = object()


def test_a_valid_event_with_and_without_key() -> None:
    want = Event("e-1", "OrderCreated", "o-1", 1_700_000_000_000, "u-1", 100)
    assert validate(doc(), b"o-1") == want
    assert validate(doc(), None) == want


@pytest.mark.parametrize(
    ("value", "key"),
    [
        (None, b"o-1"),  # tombstone
        (b"{not json", None),
        (b"[1, 2]", None),  # not an object
        (b'"text"', None),
        (b"\xff\xfe\x00", None),  # not UTF-8
        (doc(event_id=DROP), None),
        (doc(event_id=""), None),
        (doc(event_id="e" * 129), None),
        (doc(event_id=5), None),
        (doc(order_id="o\x00"), None),
        (doc(order_id="o\x7f"), None),
        (doc(order_id="o\n"), None),
        (doc(type="OrderTeleported"), None),
        (doc(type=["OrderCreated"]), None),
        (doc(type=DROP), None),
        (doc(ts_ms=DROP), None),
        (doc(ts_ms=-1), None),
        (doc(ts_ms=2**63), None),
        (doc(ts_ms=1.0), None),
        (doc(ts_ms=True), None),
        (doc(ts_ms="1"), None),
        (doc(user_id=DROP), None),  # required on OrderCreated
        (doc(user_id=""), None),
        (doc(user_id="u" * 129), None),
        (doc(user_id="u\x1f"), None),
        (doc(amount_cents=DROP), None),
        (doc(amount_cents=-1), None),
        (doc(amount_cents=2**63), None),
        (doc(amount_cents=2**64), None),  # orjson: a float
        (doc(amount_cents=1.0), None),
        (doc(amount_cents=False), None),
        (doc(type="PaymentReceived", amount_cents=DROP), None),
        (doc(type="OrderShipped", amount_cents="5"), None),  # present: must be valid
        (doc(type="OrderShipped", user_id=7), None),
        (doc(type="OrderShipped", user_id="u\x00"), None),
        (doc(), b"o-2"),  # key is not the order_id
        (doc(), b"\xff"),  # key not UTF-8
        (b" " * (MAX_VALUE_BYTES - len(doc())) + doc() + b" ", None),  # over 1 MiB
    ],
)
def test_bad_input(value: bytes | None, key: bytes | None) -> None:
    assert isinstance(validate(value, key), str)
    # The workers agree.
    assert not isinstance(parse_event(value, key), OrderEvent)


@pytest.mark.parametrize(
    "value",
    [
        doc(event_id="e" * 128, order_id="ö" * 128, user_id="ü" * 128),
        doc(ts_ms=0, amount_cents=0),
        doc(ts_ms=2**63 - 1, amount_cents=2**63 - 1),
        doc(type="OrderShipped", amount_cents=DROP, user_id=DROP),
        doc(type="OrderShipped", amount_cents=None, user_id=None),
        doc(type="OrderCancelled", user_id="x" * 300),  # only OrderCreated bounds user_id
        doc(type="PaymentReceived", user_id=DROP, extra={"any": [1]}),
        b" " * (MAX_VALUE_BYTES - len(doc())) + doc(),  # exactly 1 MiB
    ],
)
def test_valid_input(value: bytes) -> None:
    assert isinstance(validate(value, None), Event)
    assert isinstance(parse_event(value, None), OrderEvent)


ids = st.one_of(
    st.text(min_size=0, max_size=130),
    st.sampled_from(["o-1", "e-1", "u-1", "o\x00", "", "x" * 128, "x" * 129]),
    st.integers(),
    st.none(),
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "event_id": ids,
        "order_id": st.sampled_from(["o-1", "o-2", "", "o\x1f", 3]),
        "type": st.one_of(
            st.sampled_from(
                ["OrderCreated", "PaymentReceived", "OrderShipped", "OrderCancelled", "x"]
            ),
            st.integers(),
            st.lists(st.integers(), max_size=1),
        ),
        "user_id": ids,
        "amount_cents": st.one_of(
            st.integers(min_value=-(2**65), max_value=2**65),
            st.sampled_from([0, 2**63 - 1, 2**63, -1]),
            st.floats(allow_nan=False, allow_infinity=False),
            st.booleans(),
            st.none(),
            st.text(max_size=3),
        ),
        "ts_ms": st.one_of(
            st.integers(min_value=-(2**65), max_value=2**65),
            st.sampled_from([0, 2**63 - 1, 2**63]),
            st.floats(allow_nan=False, allow_infinity=False),
            st.booleans(),
            st.none(),
        ),
    },
)


@given(
    fields,
    st.one_of(st.none(), st.sampled_from([b"o-1", b"o-2", b"\xff", b""])),
    st.sampled_from(["object", "array", "garbage", "null"]),
)
def test_agrees_with_the_workers_validator(
    d: dict[str, Any], key: bytes | None, shape: str
) -> None:
    value: bytes | None = _encode(d)
    if shape == "array":
        value = b"[" + (value or b"") + b"]"
    elif shape == "garbage":
        value = (value or b"")[:-1]
    elif shape == "null":
        value = None
    ours = validate(value, key)
    theirs = parse_event(value, key)
    if isinstance(theirs, OrderEvent):
        assert isinstance(ours, Event), (value, key, ours)
        assert ours == Event(
            theirs.event_id,
            theirs.type.value,
            theirs.order_id,
            theirs.ts_ms,
            theirs.user_id,
            theirs.amount_cents,
        )
    else:
        assert isinstance(ours, str), (value, key, theirs)


@given(st.binary(max_size=64), st.one_of(st.none(), st.binary(max_size=4)))
def test_agrees_on_arbitrary_bytes(value: bytes, key: bytes | None) -> None:
    ours, theirs = validate(value, key), parse_event(value, key)
    assert isinstance(ours, Event) == isinstance(theirs, OrderEvent)
