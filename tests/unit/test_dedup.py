"""tables.dedup: the dedup decision, expiry, the state codec and the DedupWindow model."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from tables.dedup import DedupWindow, Verdict, decide, decode_seen, encode_seen, expired

I64_MIN, I64_MAX = -(2**63), 2**63 - 1

# --------------------------------------------------------------------------- decide / expired


def test_first_copy_is_unique_and_sets_state() -> None:
    assert decide(None, 1_000, 50) == Verdict(unique=True, first_ms=1_000)


def test_copy_inside_window_is_duplicate_and_keeps_state() -> None:
    assert decide(1_000, 1_000, 50) == Verdict(unique=False, first_ms=1_000)
    assert decide(1_000, 1_049, 50) == Verdict(unique=False, first_ms=1_000)


def test_window_end_is_exclusive() -> None:
    assert decide(1_000, 1_050, 50) == Verdict(unique=True, first_ms=1_050)
    assert decide(1_000, 9_999, 50) == Verdict(unique=True, first_ms=9_999)


def test_copy_with_earlier_timestamp_is_duplicate() -> None:
    # A late copy (timestamp before the first accepted one) is still the same event.
    assert decide(1_000, 10, 50) == Verdict(unique=False, first_ms=1_000)


def test_expired_boundary() -> None:
    assert not expired(first_ms=0, stream_ms=59, window_ms=50, grace_ms=10)
    assert expired(first_ms=0, stream_ms=60, window_ms=50, grace_ms=10)
    assert expired(first_ms=0, stream_ms=50, window_ms=50, grace_ms=0)
    assert not expired(first_ms=100, stream_ms=0, window_ms=50, grace_ms=0)


@given(
    first=st.integers(-(10**15), 10**15),
    window=st.integers(1, 10**12),
    offsets=st.lists(st.integers(0, 10**12), max_size=20),
)
def test_property_a_first_unique_later_in_window_duplicates(
    first: int, window: int, offsets: list[int]
) -> None:
    state = decide(None, first, window)
    assert state.unique and state.first_ms == first
    for off in sorted(o % window for o in offsets):
        v = decide(state.first_ms, first + off, window)
        assert v == Verdict(unique=False, first_ms=first)
        state = v
    # And through the stateful model.
    w = DedupWindow(window)
    assert w.offer("id", first)
    assert not any(w.offer("id", first + off % window) for off in sorted(offsets))
    assert w.seen == {"id": first}


@given(first=st.integers(-(10**15), 10**15), window=st.integers(1, 10**12), late=st.integers(0))
def test_outside_window_is_unique_again(first: int, window: int, late: int) -> None:
    v = decide(first, first + window + late, window)
    assert v == Verdict(unique=True, first_ms=first + window + late)


# --------------------------------------------------------------------------- codec


def test_decode_none_is_none() -> None:
    assert decode_seen(None) is None


@pytest.mark.parametrize("n", [0, 1, -1, 1_700_000_000_000, -1_700_000_000_000, I64_MIN, I64_MAX])
def test_codec_known_values(n: int) -> None:
    raw = encode_seen(n)
    assert len(raw) == 8
    assert decode_seen(raw) == n


def test_codec_is_big_endian_signed() -> None:
    assert encode_seen(1) == b"\x00" * 7 + b"\x01"
    assert encode_seen(-1) == b"\xff" * 8


@pytest.mark.parametrize("n", [I64_MAX + 1, I64_MIN - 1])
def test_codec_rejects_out_of_range(n: int) -> None:
    with pytest.raises(OverflowError):
        encode_seen(n)


@given(st.integers(I64_MIN, I64_MAX))
def test_codec_round_trip(n: int) -> None:
    raw = encode_seen(n)
    assert len(raw) == 8
    assert decode_seen(raw) == n


# --------------------------------------------------------------------------- DedupWindow

event_ids = st.sampled_from(["a", "b", "c", "d", "e"])


@st.composite
def ordered_streams(draw: st.DrawFn) -> tuple[int, list[tuple[str, int]]]:
    """(window_ms, [(event_id, ts)]) with non-decreasing timestamps near the window scale."""
    window = draw(st.integers(1, 40))
    start = draw(st.integers(-1_000, 1_000))
    steps = draw(
        st.lists(st.tuples(event_ids, st.integers(0, 2 * window)), min_size=1, max_size=60)
    )
    out, ts = [], start
    for eid, delta in steps:
        ts += delta
        out.append((eid, ts))
    return window, out


def reference_verdicts(window: int, stream: list[tuple[str, int]]) -> list[bool]:
    """Accept iff no accepted copy of the id lies less than ``window`` before this record."""
    accepted: dict[str, list[int]] = {}
    verdicts = []
    for eid, ts in stream:
        ok = all(not (0 <= ts - a < window) for a in accepted.get(eid, []))
        if ok:
            accepted.setdefault(eid, []).append(ts)
        verdicts.append(ok)
    return verdicts


def run(w: DedupWindow, stream: list[tuple[str, int]], *, expire: bool) -> list[bool]:
    verdicts = []
    for eid, ts in stream:
        verdicts.append(w.offer(eid, ts))
        if expire:
            w.expire()
    return verdicts


def test_reference_model_sanity() -> None:
    stream = [("a", 0), ("a", 9), ("a", 10), ("a", 19), ("a", 20), ("b", 20)]
    assert reference_verdicts(10, stream) == [True, False, True, False, True, True]
    assert run(DedupWindow(10), stream, expire=False) == [True, False, True, False, True, True]


@hsettings(max_examples=300)
@given(ordered_streams())
def test_property_b_offer_matches_reference(case: tuple[int, list[tuple[str, int]]]) -> None:
    window, stream = case
    assert run(DedupWindow(window), stream, expire=False) == reference_verdicts(window, stream)


@hsettings(max_examples=300)
@given(ordered_streams(), st.integers(0, 50))
def test_property_c_expiry_never_changes_verdicts(
    case: tuple[int, list[tuple[str, int]]], grace: int
) -> None:
    window, stream = case
    plain = run(DedupWindow(window, grace), stream, expire=False)
    expiring = run(DedupWindow(window, grace), stream, expire=True)
    assert expiring == plain


@st.composite
def late_streams(draw: st.DrawFn) -> tuple[int, int, list[tuple[str, int]]]:
    """Streams whose records are at most ``grace`` behind the newest timestamp seen."""
    window = draw(st.integers(1, 40))
    grace = draw(st.integers(0, 40))
    steps = draw(
        st.lists(
            st.tuples(event_ids, st.booleans(), st.integers(0, 2 * window)),
            min_size=1,
            max_size=60,
        )
    )
    out, newest = [], 0
    for eid, forward, amount in steps:
        if forward:
            newest += amount
            out.append((eid, newest))
        else:
            out.append((eid, newest - min(amount, grace)))
    return window, grace, out


@hsettings(max_examples=300)
@given(late_streams())
def test_expiry_never_changes_verdicts_for_records_late_within_grace(
    case: tuple[int, int, list[tuple[str, int]]],
) -> None:
    window, grace, stream = case
    plain = run(DedupWindow(window, grace), stream, expire=False)
    expiring = run(DedupWindow(window, grace), stream, expire=True)
    assert expiring == plain


def test_late_record_beyond_grace_can_change_verdict() -> None:
    # Shows the grace period is what makes the property above hold: it is not vacuous.
    stream = [("a", 0), ("b", 20), ("a", 5)]  # "a" at 5 is 15 behind the newest, grace 0
    assert run(DedupWindow(10, 0), stream, expire=False) == [True, True, False]
    assert run(DedupWindow(10, 0), stream, expire=True) == [True, True, True]


@hsettings(max_examples=300)
@given(ordered_streams(), st.integers(0, 50), st.integers(1, 10))
def test_property_d_state_is_bounded(
    case: tuple[int, list[tuple[str, int]]], grace: int, every: int
) -> None:
    window, stream = case
    w = DedupWindow(window, grace)
    for i, (eid, ts) in enumerate(stream):
        w.offer(eid, ts)
        if i % every == 0 or i == len(stream) - 1:
            before = dict(w.seen)
            gone = w.expire()
            assert w.stream_ms is not None
            # Everything left is young enough; everything removed was expired.
            assert all(first > w.stream_ms - window - grace for first in w.seen.values()), (
                w.seen,
                w.stream_ms,
            )
            assert set(gone) == set(before) - set(w.seen)
            assert all(expired(before[k], w.stream_ms, window, grace) for k in gone)
            assert all(w.seen[k] == before[k] for k in w.seen)


def test_expire_on_empty_window() -> None:
    w = DedupWindow(10)
    assert w.expire() == []
    assert w.stream_ms is None


def test_stream_time_is_the_maximum_seen() -> None:
    w = DedupWindow(100)
    w.offer("a", 100)
    w.offer("b", 50)
    assert w.stream_ms == 100
    assert w.expire() == []
    w.offer("c", 199)
    assert w.expire() == ["b"]
    w.offer("d", 150)
    assert w.stream_ms == 199
    w.offer("c", 200)
    assert w.expire() == ["a"]
    assert w.seen == {"c": 199, "d": 150}
