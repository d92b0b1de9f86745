"""The pure parts of ``bench --recovery``: the tables' records it writes, and what it
reads back from the group and the workers' logs."""

from __future__ import annotations

import argparse
import logging
import zlib

import pytest
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from faust.assignor.client_assignment import ClientAssignment, ClientMetadata

from pipeline.domain.dedup import STREAM_KEY, decode_ms, decode_seen
from pipeline.domain.orders import Balance, Order, Status
from pipeline.eos.partitioner import partition_for
from pipeline.tools.bench_recovery import (
    EVENTS_PER_ORDER,
    FULL_SIZES,
    QUICK_SIZES,
    Member,
    Restore,
    Result,
    Row,
    Sizes,
    add_arguments,
    balance_rows,
    classify,
    decode_member,
    dedup_rows,
    order_rows,
    render,
    restore_remaining,
    restores,
    sizes_from,
)

NOW = 1_800_000_000_000


def test_dedup_rows_place_each_id_with_its_order_and_keep_each_stream_time() -> None:
    rows = list(dedup_rows(1000, 8, NOW))
    ids = [(p, k, v) for p, k, v in rows if k != STREAM_KEY]
    assert len(ids) == 1000
    assert len({k for _, k, _ in ids}) == 1000
    latest: dict[int, int] = {}
    for p, key, value in ids:
        order = key.rsplit(b"-e", 1)[0]
        assert p == partition_for(order, list(range(8)))
        (arrival,) = decode_seen(value)
        assert NOW - 3_600_000 <= arrival <= NOW
        latest[p] = max(latest.get(p, arrival), arrival)
    streams = {p: decode_ms(v) for p, k, v in rows if k == STREAM_KEY}
    assert streams == latest
    # Four events per order, as the generator's lifecycles have about.
    assert len({k.rsplit(b"-e", 1)[0] for _, k, _ in ids}) == 1000 // EVENTS_PER_ORDER


def test_order_and_balance_rows_decode_as_the_stages_read_them() -> None:
    orders = list(order_rows(50, 4, NOW))
    assert len(orders) == 50
    for p, key, value in orders:
        order = Order.decode(value)
        assert order.order_id.encode() == key
        assert order.status is Status.SHIPPED and order.paid_cents == order.amount_cents
        assert p == partition_for(key, [0, 1, 2, 3])
    balances = list(balance_rows(50, 4))
    assert len(balances) == 50
    for p, key, value in balances:
        assert Balance.decode(value).user_id.encode() == key
        assert p == partition_for(key, [0, 1, 2, 3])


def test_a_member_assignment_as_fausts_assignor_writes_it() -> None:
    meta = ClientMetadata(
        assignment=ClientAssignment(
            actives={"src": [1, 2], "app-t-changelog": [1, 2]},
            standbys={"src": [5], "app-t-changelog": [5]},
        ),
        url="http://127.0.0.1:40123",
        changelog_distribution={},
    )
    raw = ConsumerProtocolMemberAssignment(
        0, [("src", [1, 2]), ("app-t-changelog", [1, 2, 5])], zlib.compress(meta.dumps())
    ).encode()
    member = decode_member(raw)
    assert member == Member(
        port=40123,
        actives={"src": {1, 2}, "app-t-changelog": {1, 2}},
        standbys={"src": {5}, "app-t-changelog": {5}},
    )
    assert decode_member(b"") is None


def test_restores_are_read_from_the_restorers_log_line(caplog: pytest.LogCaptureFixture) -> None:
    # The line as pipeline.eos.restore logs it, through logging's own formatting.
    log = logging.getLogger("pipeline.eos.restore")
    with caplog.at_level(logging.INFO, logger="pipeline.eos.restore"):
        log.info("restored %d changelog records of %d partitions in %.2f s", 1_234_567, 9, 12.345)
    (found,) = restores(caplog.text)
    assert (found.records, found.partitions, found.seconds) == (1_234_567, 9, 12.35)
    assert found.per_s == round(1_234_567 / 12.35)


def test_restore_remaining_by_kind() -> None:
    text = (
        "# TYPE pipeline_restore_remaining_records gauge\n"
        'pipeline_restore_remaining_records{kind="active"} 0.0\n'
        'pipeline_restore_remaining_records{kind="standby"} -316565.0\n'
    )
    assert restore_remaining(text) == {"active": 0.0, "standby": -316565.0}


def _m(actives: dict[str, set[int]], standbys: dict[str, set[int]]) -> Member:
    return Member(port=0, actives=actives, standbys=standbys)


def test_classify_moved_partitions_by_the_standby_copies_before_the_kill() -> None:
    before = {
        "A": _m({"s": {0, 1, 2}}, {"cl": {3}}),
        "B": _m({"s": {3}}, {"cl": {0}}),
        "C": _m({"s": set()}, {"cl": {1}}),
    }
    after = {"B": _m({"s": {0, 2, 3}}, {}), "C": _m({"s": {1}}, {})}
    assert classify("s", 0, "cl", before, after, "A") == ("B", "with standby")
    assert classify("s", 1, "cl", before, after, "A") == ("C", "with standby")
    assert classify("s", 2, "cl", before, after, "A") == ("B", "without standby")
    assert classify("s", 3, "cl", before, after, "A") == ("B", "stayed")
    assert classify("s", 2, None, before, after, "A") == ("B", "moved, no table")
    earlier = [{"B": _m({"s": {2}}, {})}]
    assert classify("s", 2, "cl", before, after, "A", earlier) == (
        "B",
        "without standby, owned before",
    )


def test_sizes_default_to_the_issue_and_quick_is_smaller() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--partitions", type=lambda t: [int(t)], default=[8])
    add_arguments(p)
    assert sizes_from(p.parse_args(["--recovery"])) == Sizes(*FULL_SIZES, 8)
    assert sizes_from(p.parse_args(["--recovery", "--quick"])) == Sizes(*QUICK_SIZES, 8)
    got = sizes_from(p.parse_args(["--recovery", "--recovery-ids", "7", "--partitions", "4"]))
    assert got == Sizes(7, FULL_SIZES[1], FULL_SIZES[2], 4)


def test_the_report_names_each_target_and_its_figure() -> None:
    rows = [
        Row("raw-by-order", 5, "B", "with standby", 375_000, 6.2, 16.0),
        Row("raw-by-order", 6, "C", "without standby", 375_000, 4.1, 14.0),
        Row("orders.raw", 6, "C", "moved, no table", None, 4.1, 14.0),
        Row("orders.raw", 1, "B", "stayed", None, None, None),
    ]
    result = Result(
        sizes=Sizes(*QUICK_SIZES),
        prefill_records=300_008,
        prefill_s=1.5,
        cold_start=[Restore(300_008, 24, 1.0)],
        joins={"B": [Restore(150_000, 12, 0.5)]},
        join_s={"B": (30.5, 41.0)},
        standby_left_at_kill=0.0,
        owned_by_killed={"raw-by-order": [5, 6]},
        kill_to_settle_s=10.2,
        rows=rows,
        takeover_restores={"B": [Restore(120_000, 12, 3.0)], "C": [Restore(90_000, 6, 3.0)]},
        loadavg={"start": (1.0, 2.0, 3.0)},
    )
    text = render(result)
    assert "target <= 5 s: missed" in text
    assert "restore by C (took partitions without a standby copy): 30000 records/s" in text
    assert "| raw-by-order:6 | C | without standby | 375000 | 4.1 | 14.0 |" in text
    assert "start: 1.00, 2.00, 3.00" in text
    # The join figures come after the restore table, not inside it.
    table_end = text.index("| after the kill | C |")
    assert text.index("B joined: 30.5 s from its start") > table_end
