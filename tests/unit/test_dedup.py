"""pipeline.domain.dedup: the dedup decision, expiry, the state codec and the DedupWindow model."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from pipeline.domain.dedup import (
    DedupWindow,
    Verdict,
    decide,
    decode_ms,
    decode_seen,
    encode_ms,
    encode_seen,
    expired,
    removable,
)

I64_MIN, I64_MAX = -(2**63), 2**63 - 1

# --------------------------------------------------------------------------- decide / expired

W, G = 50, 10


def test_first_copy_is_unique_and_sets_state() -> None:
    assert decide([], 1_000, 1_000, W, G) == Verdict(unique=True, accepted=[1_000])


def test_copy_inside_window_is_duplicate_and_keeps_state() -> None:
    assert decide([1_000], 1_000, 1_000, W, G) == Verdict(unique=False, accepted=[1_000])
    assert decide([1_000], 1_049, 1_049, W, G) == Verdict(unique=False, accepted=[1_000])


def test_window_end_is_exclusive() -> None:
    assert decide([1_000], 1_050, 1_050, W, G) == Verdict(unique=True, accepted=[1_000, 1_050])


def test_a_copy_that_arrived_earlier_but_comes_later_is_a_duplicate_within_the_window() -> None:
    # Copies of one event in two input partitions reach the table in either order.
    assert decide([1_000], 960, 1_000, W, G) == Verdict(unique=False, accepted=[1_000])
    assert decide([1_000], 950, 1_000, W, G) == Verdict(unique=True, accepted=[950, 1_000])


def test_every_live_acceptance_counts_not_only_the_latest() -> None:
    # Accepted at 0 and 60; a copy that arrived at 5 but comes last is within 0's window.
    assert decide([0, 60], 5, 60, W, 100) == Verdict(unique=False, accepted=[0, 60])


def test_an_expired_acceptance_is_absent_whether_or_not_it_was_swept() -> None:
    # Stream time 60 >= 0 + W + G: the acceptance at 0 no longer counts.
    assert decide([0], 5, 60, W, G) == Verdict(unique=True, accepted=[5])
    assert decide([], 5, 60, W, G) == Verdict(unique=True, accepted=[5])


def test_expired_boundary() -> None:
    assert not expired(first_ms=0, stream_ms=59, window_ms=50, grace_ms=10)
    assert expired(first_ms=0, stream_ms=60, window_ms=50, grace_ms=10)
    assert expired(first_ms=0, stream_ms=50, window_ms=50, grace_ms=0)
    assert not expired(first_ms=100, stream_ms=0, window_ms=50, grace_ms=0)
    assert removable([0, 10], 70, W, G) and not removable([0, 10], 69, W, G)


@given(
    first=st.integers(0, 10**15),
    window=st.integers(1, 10**12),
    offsets=st.lists(st.integers(0, 10**12), max_size=20),
)
def test_property_a_first_unique_later_in_window_duplicates(
    first: int, window: int, offsets: list[int]
) -> None:
    w = DedupWindow(window)
    assert w.offer("id", first)
    assert not any(w.offer("id", first + off % window) for off in sorted(offsets))
    assert w.seen == {"id": [first]}


@given(first=st.integers(0, 10**15), window=st.integers(1, 10**12), late=st.integers(0, 10**12))
def test_outside_window_is_unique_again(first: int, window: int, late: int) -> None:
    again = first + window + late
    v = decide([first], again, again, window, 10**13)
    assert v == Verdict(unique=True, accepted=[first, again])


# --------------------------------------------------------------------------- codec


def test_decode_none_is_empty() -> None:
    assert decode_seen(None) == []
    assert decode_ms(None) is None


@pytest.mark.parametrize("n", [0, 1, -1, 1_700_000_000_000, -1_700_000_000_000, I64_MIN, I64_MAX])
def test_codec_known_values(n: int) -> None:
    raw = encode_seen(n)
    assert len(raw) == 8
    assert decode_seen(raw) == [n]
    assert decode_ms(encode_ms(n)) == n


def test_codec_is_big_endian_signed() -> None:
    assert encode_seen(1) == b"\x00" * 7 + b"\x01"
    assert encode_seen(-1) == b"\xff" * 8


def test_a_row_written_before_several_acceptances_were_kept_still_reads() -> None:
    # Rows of one arrival (8 bytes) are what earlier versions wrote.
    assert decode_seen((1_700_000_000_000).to_bytes(8, "big", signed=True)) == [1_700_000_000_000]


@pytest.mark.parametrize("n", [I64_MAX + 1, I64_MIN - 1])
def test_codec_rejects_out_of_range(n: int) -> None:
    with pytest.raises(OverflowError):
        encode_seen(n)


@given(st.lists(st.integers(I64_MIN, I64_MAX), max_size=5))
def test_codec_round_trip(ns: list[int]) -> None:
    raw = encode_seen(ns)
    assert len(raw) == 8 * len(ns)
    assert decode_seen(raw) == ns


# --------------------------------------------------------------------------- DedupWindow

event_ids = st.sampled_from(["a", "b", "c", "d", "e"])


@st.composite
def streams(draw: st.DrawFn) -> tuple[int, int, list[tuple[str, int]]]:
    """(window, grace, [(event_id, arrival)]): arrivals mostly rising, some late (copies
    from a lagging input partition), by up to twice the window plus the grace."""
    window = draw(st.integers(1, 40))
    grace = draw(st.integers(0, 40))
    steps = draw(
        st.lists(
            st.tuples(event_ids, st.booleans(), st.integers(0, 2 * window + grace)),
            min_size=1,
            max_size=60,
        )
    )
    out, newest = [], 1_000
    for eid, forward, amount in steps:
        if forward:
            newest += amount
            out.append((eid, newest))
        else:
            out.append((eid, newest - amount))
    return window, grace, out


def reference_verdicts(window: int, grace: int, stream: list[tuple[str, int]]) -> list[bool]:
    """The rule in plain words, with nothing ever deleted: a copy is new unless an
    accepted copy of its id arrived within the window of it and has not expired (is
    younger than window + grace, measured against the newest arrival so far)."""
    accepted: dict[str, list[int]] = {}
    newest: int | None = None
    verdicts = []
    for eid, ts in stream:
        newest = ts if newest is None else max(newest, ts)
        live = [a for a in accepted.get(eid, []) if newest - a < window + grace]
        ok = all(abs(ts - a) >= window for a in live)
        if ok:
            accepted.setdefault(eid, []).append(ts)
        verdicts.append(ok)
    return verdicts


def run(w: DedupWindow, stream: list[tuple[str, int]], *, expire_every: int = 0) -> list[bool]:
    verdicts = []
    for i, (eid, ts) in enumerate(stream):
        verdicts.append(w.offer(eid, ts))
        if expire_every and i % expire_every == 0:
            w.expire()
    return verdicts


def test_reference_model_sanity() -> None:
    stream = [("a", 0), ("a", 9), ("a", 10), ("a", 19), ("a", 20), ("b", 20)]
    want = [True, False, True, False, True, True]
    assert reference_verdicts(10, 100, stream) == want
    assert run(DedupWindow(10, 100), stream) == want


@hsettings(max_examples=400)
@given(streams())
def test_property_b_offer_matches_the_plain_rule(
    case: tuple[int, int, list[tuple[str, int]]],
) -> None:
    window, grace, stream = case
    assert run(DedupWindow(window, grace), stream) == reference_verdicts(window, grace, stream)


@hsettings(max_examples=400)
@given(streams(), st.integers(1, 7))
def test_property_c_expiry_never_changes_verdicts(
    case: tuple[int, int, list[tuple[str, int]]], every: int
) -> None:
    # For any stream, late copies included: when the sweep runs is irrelevant.
    window, grace, stream = case
    plain = run(DedupWindow(window, grace), stream)
    expiring = run(DedupWindow(window, grace), stream, expire_every=every)
    assert expiring == plain


@hsettings(max_examples=300)
@given(streams(), st.integers(0, 60))
def test_property_e_a_restart_changes_nothing(
    case: tuple[int, int, list[tuple[str, int]]], cut: int
) -> None:
    # The state that commits (ids and stream time) is all a restarted worker gets back.
    window, grace, stream = case
    whole = run(DedupWindow(window, grace), stream)
    first = DedupWindow(window, grace)
    head = run(first, stream[:cut], expire_every=3)
    restarted = DedupWindow(window, grace)
    restarted.seen = {k: list(v) for k, v in first.seen.items()}
    restarted.stream_ms = first.stream_ms
    assert head + run(restarted, stream[cut:]) == whole


@hsettings(max_examples=300)
@given(streams(), st.integers(1, 10))
def test_property_d_state_is_bounded(
    case: tuple[int, int, list[tuple[str, int]]], every: int
) -> None:
    window, grace, stream = case
    w = DedupWindow(window, grace)
    for i, (eid, ts) in enumerate(stream):
        w.offer(eid, ts)
        if i % every == 0 or i == len(stream) - 1:
            before = {k: list(v) for k, v in w.seen.items()}
            gone = w.expire()
            assert w.stream_ms is not None
            # Everything left has a live acceptance; everything removed had none.
            assert all(any(a > w.stream_ms - window - grace for a in v) for v in w.seen.values()), (
                w.seen,
                w.stream_ms,
            )
            assert set(gone) == set(before) - set(w.seen)
            assert all(removable(before[k], w.stream_ms, window, grace) for k in gone)
            # An id keeps at most one live acceptance per window of its life.
            assert all(len(v) <= (window + grace) // window + 2 for v in w.seen.values())


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
    assert w.seen == {"c": [199], "d": [150]}
