"""The fetch ledger answers offset-gap questions from what the consumer fetched.

A log is modelled as a set of committed-record offsets below an end; the consumer hands
it out in batches from its position (each batch the committed records of a range, the
position then at the range's end), and a seek starts reading anywhere. Whatever the
ledger answers must be the true answer; it may only decline (``None``).
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any

from faust.types import TP
from hypothesis import given
from hypothesis import strategies as st

from pipeline.eos import FetchLedger

TP0 = TP("orders.unique", 0)


def truth(records: set[int], start: int) -> int | None:
    after = [o for o in records if o >= start]
    return min(after) if after else None


def fetch(ledger: FetchLedger, records: set[int], lo: int, hi: int) -> None:
    """The consumer, positioned at ``lo``, hands out the records of ``[lo, hi)``."""
    batch = sorted(o for o in records if lo <= o < hi)
    ledger.note(TP0, batch, hi)


def test_a_marker_between_two_fetches_is_answered_without_the_broker() -> None:
    ledger = FetchLedger()
    # offsets 0-4 committed records, 5 a commit marker, 6-9 records, 10 a marker
    records = {0, 1, 2, 3, 4, 6, 7, 8, 9}
    fetch(ledger, records, 0, 6)
    fetch(ledger, records, 6, 11)
    assert ledger.first_at_or_after(TP0, 5) == 6
    assert ledger.first_at_or_after(TP0, 0) == 0
    # nothing known at or after the end of what was fetched
    assert ledger.first_at_or_after(TP0, 10) is None
    assert ledger.first_at_or_after(TP0, 11) is None


def test_a_record_the_stream_dropped_is_still_known() -> None:
    ledger = FetchLedger()
    fetch(ledger, {3, 4, 5, 6}, 3, 7)
    # processed up to 3, then 6 is delivered: 4 was fetched, so it is the hole
    assert ledger.first_at_or_after(TP0, 4) == 4


def test_a_batch_that_does_not_join_starts_a_new_chain() -> None:
    ledger = FetchLedger()
    records = set(range(100))
    fetch(ledger, records, 0, 10)
    # a seek to 50: nothing is known about 10-49 from the fetches
    fetch(ledger, records, 50, 60)
    assert ledger.first_at_or_after(TP0, 20) is None
    assert ledger.first_at_or_after(TP0, 5) is None  # the old chain is gone
    assert ledger.first_at_or_after(TP0, 55) == 55


def test_a_fetch_that_starts_past_the_position_is_not_joined() -> None:
    """Position 6 after the first fetch, but the next batch's first record is 8: the
    records at 6 and 7 may exist (the next fetch started elsewhere) and are unknown."""
    ledger = FetchLedger()
    fetch(ledger, {0, 1, 2}, 0, 6)
    ledger.note(TP0, [8, 9], 10)
    assert ledger.first_at_or_after(TP0, 6) is None
    assert ledger.first_at_or_after(TP0, 8) == 8


def test_the_chain_is_bounded() -> None:
    ledger = FetchLedger(keep=4)
    for lo in range(0, 100, 10):
        ledger.note(TP0, [lo], lo + 10)
    assert ledger.first_at_or_after(TP0, 5) is None
    assert ledger.first_at_or_after(TP0, 61) == 70
    assert ledger.first_at_or_after(TP0, 99) is None


def test_forget_and_unknown_partitions() -> None:
    ledger = FetchLedger()
    fetch(ledger, {0, 1}, 0, 2)
    assert ledger.first_at_or_after(TP("other", 0), 0) is None
    ledger.forget(TP0)
    assert ledger.first_at_or_after(TP0, 0) is None


@given(
    committed=st.sets(st.integers(0, 199), max_size=150),
    cuts=st.lists(st.integers(0, 200), max_size=30),
    seeks=st.sets(st.integers(0, 29), max_size=5),
    questions=st.lists(st.integers(0, 210), min_size=1, max_size=20),
    keep=st.integers(1, 40),
)
def test_every_answer_is_the_truth(
    committed: set[int], cuts: list[int], seeks: set[int], questions: list[int], keep: int
) -> None:
    """Random batch boundaries, random seeks (jumps forward) in between."""
    ledger = FetchLedger(keep=keep)
    bounds = sorted({0, 200, *cuts})
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        if i in seeks:
            lo = (lo + hi) // 2  # a seek into the middle of the range: skips records
        fetch(ledger, committed, lo, hi)
        for q in questions:
            answer = ledger.first_at_or_after(TP0, q)
            if answer is not None:
                assert answer == truth({o for o in committed if o < hi}, q)


class _Record:
    def __init__(self, offset: int) -> None:
        self.offset = offset


async def test_the_consumer_thread_makes_batches_and_trusts_none_a_seek_overlapped(
    monkeypatch: Any,
) -> None:
    """Each fetch's source records become one batch per partition, with the position
    before and after the fetch; a seek while the fetch ran (Faust seeks from the event
    loop's thread) makes its batch untrusted, and the ledger learns nothing from it."""
    from aiokafka import TopicPartition
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    from pipeline.eos import BatchingConsumerThread, Coordinator, Fetched
    from pipeline.eos.stage import Stage
    from pipeline.settings import Settings

    coord = Coordinator(Settings(app_id="t"))
    coord.add_stage(Stage("t", TP0.topic, lambda r, o: None, lambda r, why, o: None))
    thread = BatchingConsumerThread.__new__(BatchingConsumerThread)
    thread.__dict__["app"] = SimpleNamespace(eos=coord)
    position = SimpleNamespace(has_valid_position=True, position=0)
    subscription = SimpleNamespace(assignment=SimpleNamespace(state_value=lambda tp: position))
    consumer = SimpleNamespace(
        _fetcher=SimpleNamespace(_subscriptions=SimpleNamespace(subscription=subscription)),
        last_stable_offset=lambda tp: 80,
    )
    ktp = TopicPartition(TP0.topic, TP0.partition)
    fetches: list[tuple[list[int], int, bool]] = [
        ([0, 1, 2], 4, False),  # offset 3: a commit marker
        ([4, 5], 7, False),
        ([7, 9], 50, True),  # a seek to 50 lands while these are handed out
        ([], 60, False),  # 50..59: markers and aborted records only, nothing handed out
    ]

    async def fetch(self: Any, *args: Any, **kwargs: Any) -> Any:
        offsets, after, seek = fetches.pop(0)
        position.position = after
        if seek:
            self.seek(ktp, after)
        return {ktp: [_Record(o) for o in offsets]} if offsets else {}

    monkeypatch.setattr(AIOKafkaConsumerThread, "_fetch_records", fetch)
    monkeypatch.setattr(AIOKafkaConsumerThread, "seek", lambda self, tp, offset: None)
    batches: list[Fetched] = []
    for _ in range(4):
        (batch,) = (await thread._fetch_records(consumer, {ktp})).values()
        batches.append(batch)
    shapes = [(b.start, b.end, [r.offset for r in b], b.seeks, b.certain) for b in batches]
    assert shapes == [
        (0, 4, [0, 1, 2], 0, True),
        (4, 7, [4, 5], 0, True),
        (7, 50, [7, 9], 0, False),
        (50, 60, [], 1, True),  # the position moved: an empty batch says so
    ]
    assert [b.behind for b in batches] == [76, 73, 30, 20]
    assert thread.seek_counts == {TP0: 1}
    assert coord.ledger.first_at_or_after(TP0, 3) == 4  # the marker, known from the fetch
    assert coord.ledger.first_at_or_after(TP0, 6) is None  # 7.. never noted: ask the broker
    assert coord.ledger.first_at_or_after(TP0, 20) is None
