"""``reconcile``'s own check of a dead letter (:func:`pipeline.tools.reconcile.dlq_problems`):
the contract's bound and cutting rule, against letters the workers' codec writes (used
here, in the test only) and against letters broken on purpose."""

from __future__ import annotations

import base64
import hashlib

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.domain.codecs import DLQ_MAX_BYTES, dlq_key, dlq_value
from pipeline.tools.reconcile import dlq_problems

WHERE = ("orders.raw", 3, 17)


def check(original: bytes | None, letter: bytes, key: bytes | None = b"k") -> list[str]:
    return dlq_problems(dlq_key(key), letter, WHERE, key, original)


def letter(original: bytes | None, reason: str = "bad") -> bytes:
    return dlq_value(reason, *WHERE, original)


CASES = {
    "short text": b'{"not": "an event"',
    "short binary": b"\xff\xfe\x00binary",
    "tombstone": None,
    "long text": b"x" * 200_000,
    "long escaping text": b"\x01" * 100_000,
    "long multibyte": "ä€😀".encode() * 30_000,
    "long binary": bytes(range(256)) * 1000,
    "just fits": b"y" * (DLQ_MAX_BYTES - 200),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_workers_letters_pass(name: str) -> None:
    original = CASES[name]
    assert check(original, letter(original)) == []


def test_a_long_original_must_be_cut_and_described() -> None:
    original = b"x" * 200_000
    doc = orjson.loads(letter(original))
    assert doc["raw_size"] == len(original)
    # Whole: too long.
    whole = {k: v for k, v in doc.items() if not k.startswith("raw_")} | {"raw": "x" * 200_000}
    assert any("bytes, over" in p for p in check(original, orjson.dumps(whole)))
    # Wrong size, wrong hash, a kept part that is not the beginning.
    for field, value in (
        ("raw_size", 5),
        ("raw_size", "200000"),
        ("raw_sha256", hashlib.sha256(b"other").hexdigest()),
        ("raw", "y" + doc["raw"][1:]),
    ):
        assert check(original, orjson.dumps({**doc, field: value})), field
    # Cut, but without saying so: not the whole original.
    unmarked = {k: v for k, v in doc.items() if k not in ("raw_size", "raw_sha256")}
    assert any("whole" in p for p in check(original, orjson.dumps(unmarked)))


def test_a_short_original_must_not_be_cut() -> None:
    original = b"z" * 1000
    cut = {
        **orjson.loads(letter(original)),
        "raw": "z" * 10,
        "raw_size": 1000,
        "raw_sha256": hashlib.sha256(original).hexdigest(),
    }
    assert any("fits" in p for p in check(original, orjson.dumps(cut)))


def test_the_raw_must_be_the_whole_original_when_not_cut() -> None:
    original = b'{"a": 1}'
    doc = orjson.loads(letter(original))
    assert check(original, orjson.dumps({**doc, "raw": '{"a": 2}'}))
    assert check(original, orjson.dumps({**doc, "raw": doc["raw"][:-1]}))


def test_text_goes_in_raw_and_binary_in_raw_b64() -> None:
    text, binary = b"plain", b"\xffbin"
    as_b64 = {**orjson.loads(letter(text)), "raw_b64": base64.b64encode(text).decode()}
    del as_b64["raw"]
    assert check(text, orjson.dumps(as_b64))
    as_text = {**orjson.loads(letter(binary)), "raw": binary.decode("latin-1")}
    del as_text["raw_b64"]
    assert check(binary, orjson.dumps(as_text))
    bad_b64 = {**orjson.loads(letter(binary)), "raw_b64": "not base64!"}
    assert check(binary, orjson.dumps(bad_b64))


def test_a_tombstone_is_raw_null() -> None:
    assert check(None, orjson.dumps({**orjson.loads(letter(None)), "raw": ""}))


def test_reason_and_place() -> None:
    doc = orjson.loads(letter(b"x"))
    assert check(b"x", orjson.dumps({**doc, "reason": ""}))
    assert check(b"x", orjson.dumps({k: v for k, v in doc.items() if k != "reason"}))
    assert check(b"x", orjson.dumps({**doc, "reason": "r" * 1025}))
    assert check(b"x", orjson.dumps({**doc, "offset": 18}))
    assert check(b"x", orjson.dumps({**doc, "partition": "3"}))
    assert check(b"x", orjson.dumps({**doc, "topic": "elsewhere"}))
    # A long reason the codec cut is fine.
    assert check(b"x", letter(b"x", reason="why " * 1000)) == []


def test_key_rule() -> None:
    long_key = b"k" * 513
    ok = letter(b"x")
    hashed = hashlib.sha256(long_key).hexdigest().encode()
    assert dlq_problems(hashed, ok, WHERE, long_key, b"x") == []
    assert dlq_problems(long_key, ok, WHERE, long_key, b"x")
    assert dlq_problems(b"k" * 512, ok, WHERE, b"k" * 512, b"x") == []
    assert dlq_problems(None, ok, WHERE, None, b"x") == []
    assert dlq_problems(b"", ok, WHERE, None, b"x")
    # The later stages may write an empty key for a keyless record.
    assert dlq_problems(b"", ok, WHERE, None, b"x", empty_key_ok=True) == []
    assert dlq_problems(b"other", ok, WHERE, b"k", b"x")


def test_not_a_letter_at_all() -> None:
    assert check(b"x", b"not json")
    assert check(b"x", b"[]")
    assert dlq_problems(b"k", None, WHERE, b"k", b"x")


@given(st.binary(max_size=2000), st.integers(1, 400), st.text(min_size=1, max_size=2000))
def test_any_letter_of_the_workers_passes(chunk: bytes, times: int, reason: str) -> None:
    original = chunk * times
    assert check(original, letter(original, reason)) == []


@given(st.text(min_size=1, max_size=300), st.integers(100, 1500))
def test_any_long_text_letter_passes(chunk: str, times: int) -> None:
    original = chunk.encode("utf-8", errors="replace") * times
    assert check(original, letter(original)) == []
