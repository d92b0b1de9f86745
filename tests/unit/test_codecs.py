"""The dead-letter record is bounded whatever the input (``../shared/CONTRACT.md``)."""

from __future__ import annotations

import base64
import hashlib

import orjson
from hypothesis import given
from hypothesis import strategies as st

from pipeline.domain.codecs import (
    DLQ_KEY_MAX_BYTES,
    DLQ_MAX_BYTES,
    REASON_MAX_BYTES,
    bounded_reason,
    dlq_key,
    dlq_value,
)


def _check(raw: bytes, reason: str = "bad") -> dict[str, object]:
    out = dlq_value(reason, "orders.raw", 3, 42, raw)
    assert len(out) <= DLQ_MAX_BYTES
    doc = orjson.loads(out)
    assert (doc["topic"], doc["partition"], doc["offset"]) == ("orders.raw", 3, 42)
    assert len(doc["reason"].encode()) <= REASON_MAX_BYTES
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if "raw_size" in doc:
        assert doc["raw_size"] == len(raw)
        assert doc["raw_sha256"] == hashlib.sha256(raw).hexdigest()
    else:
        assert "raw_sha256" not in doc
    if text is not None:
        assert "raw_b64" not in doc
        assert text.startswith(doc["raw"])
        if "raw_size" not in doc:
            assert doc["raw"] == text
    else:
        assert "raw" not in doc
        head = base64.b64decode(doc["raw_b64"])
        assert raw.startswith(head)
        if "raw_size" not in doc:
            assert head == raw
    return doc


def test_short_values_are_kept_whole() -> None:
    assert _check(b'{"a": 1}')["raw"] == '{"a": 1}'
    assert _check(b"\xff\xfe")["raw_b64"] == base64.b64encode(b"\xff\xfe").decode()


def test_null_value() -> None:
    assert orjson.loads(dlq_value("null", "t", 0, 1, None))["raw"] is None


def test_a_value_of_several_megabytes_is_cut_to_the_bound() -> None:
    doc = _check(b"x" * 3_000_000)
    # As much as fits is kept, not a token prefix.
    assert len(doc["raw"]) > DLQ_MAX_BYTES - 1024  # type: ignore[arg-type]


def test_text_that_escapes_six_fold_still_fits() -> None:
    doc = _check(b"\x01" * 200_000)
    assert doc["raw"] and set(doc["raw"]) == {"\x01"}  # type: ignore[arg-type]


def test_multibyte_text_is_never_split_inside_a_character() -> None:
    doc = _check("é😀".encode() * 100_000)
    assert "\ufffd" not in doc["raw"]  # type: ignore[operator]


def test_binary_is_cut_on_whole_bytes() -> None:
    _check(bytes(range(256)) * 4000)


def test_a_long_reason_is_cut() -> None:
    assert len(bounded_reason("é" * 5000).encode()) <= REASON_MAX_BYTES
    _check(b"x", reason="r" * 100_000)


@given(st.binary(max_size=200_000), st.text(max_size=2000))
def test_any_value_and_reason_fit(raw: bytes, reason: str) -> None:
    _check(raw, reason)


@given(st.text(max_size=70_000))
def test_any_text_fits(text: str) -> None:
    _check(text.encode("utf-8", errors="surrogatepass"))


def test_dead_letter_key() -> None:
    assert dlq_key(None) is None
    assert dlq_key(b"o-1") == b"o-1"
    long = b"k" * (DLQ_KEY_MAX_BYTES + 1)
    assert dlq_key(long) == hashlib.sha256(long).hexdigest().encode()
